"""Fixtures for the NBD tests: an in-process Control + NBDServer over tmp images.

The lock checker is on (as for the whole suite), and any ERROR logged by
pydm during a test fails it: the server logs protocol violations as
warnings, so an error record means an internal bug.
"""

import logging
import os
import shutil
import subprocess

os.environ.setdefault("PYDM_LOCKDEP", "1")

import pytest  # noqa: E402

from pydm import lockdep  # noqa: E402
from pydm.control import Control  # noqa: E402
from pydm.nbd.server import NBDServer  # noqa: E402

MiB = 1 << 20
DISK_SIZE = 64 * MiB

# CI installs these (tools/install-deps.sh); a missing one is a failure there.
CLIENT_TOOLS = ("nbdinfo", "nbdsh", "nbdcopy", "qemu-img", "qemu-io", "fio", "openssl")


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must install {', '.join(missing)}")
        pytest.skip(f"not installed: {', '.join(missing)}")


class _ErrorCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_errors_logged():
    before = len(lockdep.reports)
    catcher = _ErrorCatcher()
    root = logging.getLogger("pydm")
    root.addHandler(catcher)
    yield catcher
    root.removeHandler(catcher)
    assert not lockdep.reports[before:], "lock checker:\n" + "\n".join(lockdep.reports[before:])
    msgs = [catcher.format(r) for r in catcher.records]
    assert not msgs, "pydm logged errors:\n" + "\n".join(msgs)


def run(cmd, check=True, timeout=120, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {r.returncode}\nstdout:\n{r.stdout}\n"
                             f"stderr:\n{r.stderr}")
    return r


def make_disk(path, size=DISK_SIZE, data_at=((0, MiB),), seed=1):
    """A sparse image with random data in the given (offset, length) ranges."""
    import random
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off, n in data_at:
            f.seek(off)
            f.write(rnd.randbytes(n))
    return str(path)


class Served:
    def __init__(self, control, server, tmp):
        self.control = control
        self.server = server
        self.tmp = tmp
        tcp = [a for a in server.addresses if a[0] == "tcp"]
        unix = [a for a in server.addresses if a[0] == "unix"]
        self.addr = (tcp[0][1], tcp[0][2]) if tcp else None
        self.unix = unix[0][1] if unix else None

    @property
    def port(self):
        return self.addr[1]

    def uri(self, export="", host="127.0.0.1", scheme="nbd", query=""):
        return f"{scheme}://{host}:{self.port}/{export}{query}"

    def unix_uri(self, export=""):
        return f"nbd+unix:///{export}?socket={self.unix}"

    def image(self, name):
        return os.path.join(self.tmp, name)


def start_server(control, tmp, **kw):
    listen = kw.pop("listen", None) or [("tcp", "127.0.0.1", 0),
                                        ("unix", os.path.join(tmp, "nbd.sock"))]
    server = NBDServer(control, listen, **kw)
    server.start()
    return Served(control, server, tmp)


@pytest.fixture
def served(tmp_path):
    """Devices ``disk`` (64 MiB: 1 MiB of data, then holes, a second data
    MiB at 8 MiB) and ``ro`` (read-only, 4 MiB), served on TCP and unix."""
    control = Control()
    disk = make_disk(tmp_path / "disk.img", data_at=((0, MiB), (8 * MiB, MiB)))
    ro = make_disk(tmp_path / "ro.img", 4 * MiB, ((0, 4 * MiB),), seed=2)
    control.create("disk", f"0 {DISK_SIZE >> 9} linear {disk} 0")
    control.create("ro", f"0 {(4 * MiB) >> 9} linear {ro} 0", readonly=True)
    s = start_server(control, str(tmp_path))
    yield s
    s.server.stop()
    control.shutdown()
