"""Small helpers shared by the tests: synchronous bio submission and stores."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

from pydm import trace
from pydm.bio import Bio, READ, WRITE
from pydm.control import Control

SECTOR = 512


class Waiter:
    """Collects a bio's completion; ``wait`` returns its status."""

    def __init__(self):
        self.event = threading.Event()
        self.calls = 0
        self.status = None

    def __call__(self, bio):
        self.calls += 1
        self.status = bio.status
        self.event.set()

    def wait(self, timeout=10):
        assert self.event.wait(timeout), "bio did not complete"
        return self.status


def do_io(dev, op, sector, nr=0, data=None, flags=0, timeout=10):
    """Submit one bio and wait; returns (status, buffer)."""
    if op == READ:
        buf = bytearray(nr * SECTOR)
    elif op == WRITE:
        buf = bytearray(data)
        nr = len(buf) // SECTOR
    else:
        buf = None
    w = Waiter()
    dev.submit(Bio(op, sector, nr, memoryview(buf) if buf is not None else None, flags, w))
    status = w.wait(timeout)
    assert w.calls == 1
    return status, buf


def make_image(path, size, fill=None):
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return os.fspath(path)


@contextlib.contextmanager
def era_control(tmp_path, nr_blocks, block_sectors):
    """A Control working in ``tmp_path`` with ``meta.img`` (4 MiB) and an
    ``origin.img`` of ``nr_blocks`` era blocks; on exit every device goes
    and no store may be left open."""
    c = Control()
    c.cwd = str(tmp_path)
    make_image(tmp_path / "meta.img", 4 << 20)
    make_image(tmp_path / "origin.img", nr_blocks * block_sectors * 512)
    yield c
    c.shutdown()
    assert c.stores.open_count() == 0


# ------------------------------------------------ a pydm daemon in a subprocess
@contextlib.contextmanager
def trace_seen(event, match=lambda fields: True):
    """An Event that is set once trace event ``event`` is emitted with
    fields that ``match``: a test that must act while something is under
    way waits for it to be seen, not for a while."""
    seen = threading.Event()

    def sink(fields):
        if match(fields):
            seen.set()
    trace.attach(sink, (event,))
    try:
        yield seen
    finally:
        trace.detach(sink)


def pydm_env(sock):
    env = dict(os.environ)
    env["PYDM_SOCKET"] = str(sock)
    env["PYDM_LOCKDEP"] = "1"
    env["PYTHONFAULTHANDLER"] = "1"     # SIGABRT prints every thread's stack
    return env


class Cli:
    def __init__(self, sock, cwd):
        self.sock = sock
        self.cwd = cwd

    def __call__(self, *args, input=None, check=True):
        r = subprocess.run([sys.executable, "-m", "pydm", *map(str, args)],
                           input=input, capture_output=True, text=True,
                           env=pydm_env(self.sock), cwd=self.cwd, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"pydm {' '.join(map(str, args))} failed "
                                 f"({r.returncode}):\n{r.stderr}")
        return r


class Daemon:
    """``pydm serve`` in a subprocess, with every runtime monitor on (a report
    fails ``stop``); ``wrapper`` (e.g. ``["prlimit", "--nofile=40:40"]``)
    runs it under another command."""

    def __init__(self, tmp_path, config=None, extra=(), wrapper=(), sock=None, env=None):
        self.sock = sock or tmp_path / "ctl.sock"
        # Append mode: the daemon writes through the same open file that
        # output() seeks to read, and with a shared offset a seek could make
        # its next line overwrite the start of the file ("ydm: serving...").
        open(tmp_path / "daemon.log", "w").close()
        self.log = open(tmp_path / "daemon.log", "a+")
        extra = list(extra)
        if config is None and "--state-dir" not in extra:
            # the demo stack's images: never the user's own (two daemons on
            # one set of files damage each other's metadata)
            extra += ["--state-dir", str(tmp_path / "demo")]
        if not any(a in extra for a in ("--unix", "--port", "--listen")):
            extra.append("--no-nbd")      # never fight over the default port 10809
        if "--rv" not in extra:           # every monitor watches every daemon too
            extra += ["--rv", "all", "--rv-reactor", "log"]
        args = [sys.executable, "-m", "pydm", "serve", "--socket", str(self.sock), *extra]
        if config is not None:
            args.insert(4, str(config))
        self.proc = subprocess.Popen([*wrapper, *args], stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**pydm_env(self.sock), **(env or {})}, cwd=tmp_path)
        # Ready when it says so: every listener is up by then (the control
        # socket alone is bound before the devices are created).
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.output()}")
            if "pydm: serving devices:" in self.output():
                return
            time.sleep(0.05)
        # where it is stuck: faulthandler prints every thread's stack on SIGABRT
        self.proc.send_signal(signal.SIGABRT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        raise AssertionError("daemon did not start within 30 s:\n" + self.output())

    def output(self):
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGABRT)
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                raise AssertionError("daemon did not stop on SIGTERM:\n" + self.output())
        out = self.output()
        assert "lockdep" not in out, out
        assert "Traceback" not in out, out
        assert "ERROR: rv:" not in out, out       # a monitor's report (or at shutdown)
        return self.proc.returncode


