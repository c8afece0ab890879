"""Helpers of the NBD tests (the fixtures are in conftest.py): disks,
external clients, an in-process server."""

import json
import os
import shutil
import subprocess

import pytest

from pydm.nbd.server import NBDServer

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


def run(cmd, check=True, timeout=120, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd!r} exited {r.returncode}\nstdout:\n{r.stdout}\n"
                             f"stderr:\n{r.stderr}")
    return r


def fio(uri, *options, timeout=300):
    """One fio job over NBD; its JSON result (fio must exit 0: no I/O or
    verify error)."""
    r = run(["fio", "--name=job", "--ioengine=nbd", f"--uri={uri}",
             "--output-format=json", *options], check=False, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr
    job = json.loads(r.stdout[r.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0, job["error"]
    return job


def evict(path):
    """Drop a file from the page cache (written back first: dirty pages
    stay), so the next reads of it go to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


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
