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

# key -> (type, what a user is told it must be)
_KEYS = {"name": (str, "a string"), "table": (str, "a string"),
         "table_file": (str, "a string (a file name)"), "readonly": (bool, "true or false"),
         "uuid": (str, "a string")}


class DeviceSpec:
    __slots__ = ("name", "table", "readonly", "uuid", "cwd")

    def __init__(self, name, table, readonly=False, uuid=None, cwd=None):
        self.name = name
        self.table = table
        self.readonly = readonly
        self.uuid = uuid
        self.cwd = cwd


def _toml(path):
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise PydmError(f"cannot read config {path}: {e.strerror}", e.errno) from None
    except UnicodeDecodeError as e:
        raise PydmError(f"{path}: not UTF-8 text (byte {e.start}): a config is TOML, "
                        f"which is UTF-8") from None
    except tomllib.TOMLDecodeError as e:
        raise PydmError(f"{path}: invalid TOML: {e}") from None


def _check_types(d, where):
    extra = set(d) - set(_KEYS)
    if extra:
        raise PydmError(f"{where}: unknown key(s): {', '.join(sorted(extra))}")
    for key, value in d.items():
        kind, what = _KEYS[key]
        if not isinstance(value, kind):
            raise PydmError(f"{where}: {key!r} must be {what}, not {type(value).__name__} "
                            f"{value!r}"[:200])


def load_config(path: str) -> list:
    data = _toml(path)
    base = os.path.dirname(os.path.abspath(path))
    unknown = set(data) - {"device"}
    if unknown:
        raise PydmError(f"{path}: unknown section(s): {', '.join(sorted(unknown))}")
    devices = data.get("device", [])
    if not isinstance(devices, list) or not all(isinstance(d, dict) for d in devices):
        raise PydmError(f"{path}: 'device' must be an array of tables ([[device]])")
    specs, names = [], set()
    for i, d in enumerate(devices, 1):
        where = f"{path}: device #{i}"
        _check_types(d, where)
        name = d.get("name")
        if not name:
            raise PydmError(f"{where}: 'name' is required")
        if name in names:
            raise PydmError(f"{where}: duplicate device name {name!r}", errno.EEXIST)
        names.add(name)
        if ("table" in d) == ("table_file" in d):
            raise PydmError(f"{where} ({name}): give exactly one of 'table' or 'table_file'")
        if "table_file" in d:
            tpath = os.path.join(base, d["table_file"])
            try:
                with open(tpath, encoding="utf-8", errors="surrogateescape") as f:
                    table = f.read()
            except OSError as e:
                raise PydmError(f"{where} ({name}): cannot read table file {tpath}: "
                                f"{e.strerror}", e.errno) from None
        else:
            table = d["table"]
        specs.append(DeviceSpec(name, table, d.get("readonly", False), d.get("uuid"), base))
    return specs
