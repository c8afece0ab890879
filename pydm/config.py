"""Daemon configuration: the devices ``pydm serve`` creates at start.

Rules of this module: parse and check only; creating devices is the daemon's
job.  The format is TOML, one ``[[device]]`` table per device, created in
file order (so lower devices come first)::

    [[device]]
    name = "data"
    table = '''
    0 2048 linear a.img 0
    2048 2048 linear b.img 0
    '''
    # or: table_file = "data.table"
    # readonly = false
    # uuid = "..."

Relative file names in tables and ``table_file`` are relative to the
directory holding the config file.
"""

import errno
import os
import tomllib

from pydm.errors import PydmError

_KEYS = {"name", "table", "table_file", "readonly", "uuid"}


class DeviceSpec:
    __slots__ = ("name", "table", "readonly", "uuid", "cwd")

    def __init__(self, name, table, readonly=False, uuid=None, cwd=None):
        self.name = name
        self.table = table
        self.readonly = readonly
        self.uuid = uuid
        self.cwd = cwd


def load_config(path: str) -> list:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise PydmError(f"cannot read config {path}: {e.strerror}", e.errno) from None
    except tomllib.TOMLDecodeError as e:
        raise PydmError(f"{path}: invalid TOML: {e}") from None
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(data) - {"device"}
    if unknown:
        raise PydmError(f"{path}: unknown section(s): {', '.join(sorted(unknown))}")
    devices = data.get("device", [])
    if not isinstance(devices, list):
        raise PydmError(f"{path}: 'device' must be an array of tables ([[device]])")
    specs, names = [], set()
    for i, d in enumerate(devices, 1):
        where = f"{path}: device #{i}"
        extra = set(d) - _KEYS
        if extra:
            raise PydmError(f"{where}: unknown key(s): {', '.join(sorted(extra))}")
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise PydmError(f"{where}: 'name' is required")
        if name in names:
            raise PydmError(f"{where}: duplicate device name {name!r}", errno.EEXIST)
        names.add(name)
        if ("table" in d) == ("table_file" in d):
            raise PydmError(f"{where} ({name}): give exactly one of 'table' or 'table_file'")
        if "table_file" in d:
            tpath = os.path.join(base, d["table_file"])
            try:
                with open(tpath) as f:
                    table = f.read()
            except OSError as e:
                raise PydmError(f"{where} ({name}): cannot read table file {tpath}: "
                                f"{e.strerror}", e.errno) from None
        else:
            table = d["table"]
        if not isinstance(table, str):
            raise PydmError(f"{where} ({name}): 'table' must be a string")
        specs.append(DeviceSpec(name, table, bool(d.get("readonly", False)),
                                d.get("uuid"), base))
    return specs
