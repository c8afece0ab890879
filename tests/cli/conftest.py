"""A real ``pydm serve`` daemon in a subprocess, and a runner for ``pydm`` commands."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest


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
    def __init__(self, tmp_path, config=None, extra=()):
        self.sock = tmp_path / "ctl.sock"
        self.log = open(tmp_path / "daemon.log", "w+")
        args = [sys.executable, "-m", "pydm", "serve", "--socket", str(self.sock), *extra]
        if config is not None:
            args.insert(4, str(config))
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=pydm_env(self.sock), cwd=tmp_path)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited: {self.output()}")
            try:
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(self.sock))
                s.close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("daemon did not start")

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
        return self.proc.returncode


@pytest.fixture
def start_daemon(tmp_path):
    daemons = []

    def start(config=None, extra=()):
        d = Daemon(tmp_path, config, extra)
        daemons.append(d)
        return d
    yield start
    for d in daemons:
        assert d.stop() == 0


@pytest.fixture
def cli(tmp_path):
    return Cli(tmp_path / "ctl.sock", tmp_path)
