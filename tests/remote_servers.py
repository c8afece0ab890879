"""Real NBD servers for pydm's NBD store to connect to: nbdkit (any plugin,
with filters) and qemu-nbd, on a loopback TCP port or a Unix socket; they
can be killed, stopped and started again on the same address.

Fixtures: ``server(name, plugin args, ...)`` (an nbdkit) and
``remote(kind, ...)`` (a disk of a kind: nbdkit memory or file, qemu-nbd, or
a file nbdkit serves without flush)."""

import os
import signal
import socket
import subprocess
import time

import pytest

from nbd_support import need


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Nbdkit:
    """One nbdkit in the foreground, on a Unix socket or a loopback port;
    it can be killed, stopped, and started again on the same address."""

    tool = "nbdkit"

    def __init__(self, tmp, name, plugin, filters=(), tcp=False, extra=()):
        need(self.tool)
        self.plugin = list(plugin)
        self.filters = list(filters)
        self.extra = list(extra)
        self.port = free_port() if tcp else None
        self.sock = None if tcp else os.path.join(tmp, f"{name}.sock")
        self.log = os.path.join(tmp, f"{name}.log")
        self.proc = None

    @property
    def uri(self):
        if self.port:
            return f"nbd://127.0.0.1:{self.port}/"
        return f"nbd+unix:///?socket={self.sock}"

    def argv(self):
        where = ["-i", "127.0.0.1", "-p", str(self.port)] if self.port else ["-U", self.sock]
        return ["nbdkit", "-f", "--exit-with-parent", *where, *self.extra,
                *[f"--filter={f}" for f in self.filters], *self.plugin]

    def start(self, plugin=None, filters=None, extra=None):
        if plugin is not None:
            self.plugin = list(plugin)
        if filters is not None:
            self.filters = list(filters)
        if extra is not None:
            self.extra = list(extra)
        if self.sock and os.path.exists(self.sock):
            os.unlink(self.sock)
        argv = self.argv()
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while not self._accepts():             # bounded: until it listens
            if self.proc.poll() is not None:
                raise AssertionError(f"{argv} exited {self.proc.returncode}: "
                                     + open(self.log, errors="replace").read()[-1500:])
            if time.monotonic() > deadline:
                raise AssertionError(f"{argv} did not listen")
            time.sleep(0.02)
        return self

    def _accepts(self):
        try:
            if self.port:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
            else:
                with socket.socket(socket.AF_UNIX) as s:
                    s.settimeout(0.5)
                    s.connect(self.sock)
            return True
        except OSError:
            return False

    def signal(self, sig):
        self.proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self.proc.wait(10)
        elif sig == signal.SIGSTOP:
            # A stop is not instant: until a thread takes the signal, another
            # may still answer a request.  Wait until every thread is stopped.
            wait_until(self._stopped, 10, f"{self.tool} to stop")

    def kill(self):
        self.signal(signal.SIGKILL)

    def _stopped(self):
        task = f"/proc/{self.proc.pid}/task"
        states = []
        for tid in os.listdir(task):
            try:
                with open(f"{task}/{tid}/stat") as f:
                    states.append(f.read().rpartition(")")[2].split()[0])
            except FileNotFoundError:
                pass
        return states and all(s in "tT" for s in states)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


class QemuNbd(Nbdkit):
    """qemu-nbd serving a raw image (``plugin`` is [image path])."""

    tool = "qemu-nbd"

    def argv(self):
        where = ["-b", "127.0.0.1", "-p", str(self.port)] if self.port else ["-k", self.sock]
        return ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", "--cache=writeback",
                "--discard=unmap", *where, *self.extra, *self.plugin]


def remote_disk(tmp, kind, size=32 << 20, name="remote", tcp=True, filters=(), params=()):
    """A started server of a disk of ``size`` bytes: ``kind`` "memory" or
    "file" (nbdkit's plugins), "qemu" (qemu-nbd), or "noflush" (a file that
    nbdkit's eval plugin serves, offering neither flush nor FUA).  File
    kinds keep their bytes in ``.image``."""
    image = os.path.join(tmp, f"{name}.img")
    if kind != "memory" and not os.path.exists(image):
        with open(image, "wb") as f:
            f.truncate(size)
    if kind == "memory":
        plugin = ["memory", f"size={size}"]
    elif kind == "noflush":
        plugin = ["eval", f"get_size=echo {size}", "can_write=exit 0", "can_flush=exit 3",
                  "can_fua=echo none",
                  f"pread=dd if={image} skip=$4 count=$3 iflag=skip_bytes,count_bytes "
                  "status=none",
                  f"pwrite=dd of={image} seek=$4 conv=notrunc oflag=seek_bytes status=none"]
    elif kind == "file":
        plugin = ["file", image]
    else:
        plugin = [image]
    cls = QemuNbd if kind == "qemu" else Nbdkit
    srv = cls(tmp, name, [*plugin, *params], filters=filters, tcp=tcp)
    srv.image = image
    return srv.start()


@pytest.fixture
def server(tmp_path):
    """server(name, plugin args, ...) -> a started Nbdkit, killed at teardown."""
    started = []

    def make(name, plugin, **kw):
        s = Nbdkit(str(tmp_path), name, plugin, **kw)
        started.append(s)
        return s.start()
    yield make
    for s in started:
        s.stop()


@pytest.fixture
def remote(tmp_path):
    """remote(kind, ...) -> a started ``remote_disk``, stopped at teardown."""
    started = []

    def make(kind, **kw):
        s = remote_disk(str(tmp_path), kind, **kw)
        started.append(s)
        return s
    yield make
    for s in started:
        s.stop()
