"""A daemon that cannot be knocked over through its sockets: descriptor
exhaustion, paths that are not its own, a squatted runtime directory."""

import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from helpers import Daemon, pydm_env
from nbdclient import Client
from pydm.ctlsock import ControlClient
from pydm.errors import PydmError

CONFIG = '[[device]]\nname = "z"\ntable = "0 2048 zero"\n'


def wait_log(d, text, timeout=15):
    deadline = time.monotonic() + timeout
    while text not in d.output():
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{d.output()}"
        time.sleep(0.05)


def connect_many(path, n):
    out = []
    for _ in range(n):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))           # blocking: waits for room in the backlog
        s.settimeout(5)
        out.append(s)
    return out


@pytest.fixture
def config(tmp_path):
    p = tmp_path / "pydm.toml"
    p.write_text(CONFIG)
    return p


# ------------------------------------------------------------ 1. descriptors
def test_listeners_survive_running_out_of_descriptors(tmp_path, config, start_daemon):
    nbd = tmp_path / "nbd.sock"
    d = start_daemon(config, ["--unix", str(nbd)], wrapper=["prlimit", "--nofile=40:40"])
    burst = connect_many(d.sock, 60) + connect_many(nbd, 60)
    wait_log(d, "cannot accept connections: Too many open files")
    for s in burst:
        s.close()
    # Both listeners must serve a normal client again, soon.
    with ControlClient(str(d.sock), timeout=10) as c:
        assert [x["name"] for x in c.call("ls")] == ["z"]
    with Client(str(nbd), "z") as c:
        assert c.pread(0, 4096) == bytes(4096)
    assert d.output().count("cannot accept connections") <= 2     # once per listener
    wait_log(d, "accepting again")


def test_control_socket_caps_its_connections(config, start_daemon):
    from pydm.ctlsock import MAX_CONNECTIONS
    d = start_daemon(config)
    idle = connect_many(d.sock, MAX_CONNECTIONS)
    try:
        with ControlClient(str(d.sock), timeout=10) as c:
            with pytest.raises(PydmError, match="too many control connections"):
                c.call("ls")
    finally:
        for s in idle[:4]:
            s.close()
    # Room again once the daemon has seen those close.
    deadline = time.monotonic() + 10
    while True:
        try:
            with ControlClient(str(d.sock), timeout=10) as c:
                assert c.call("ls")[0]["name"] == "z"
            break
        except PydmError as e:
            assert "too many" in str(e) and time.monotonic() < deadline
            time.sleep(0.05)
    for s in idle[4:]:
        s.close()
    wait_log(d, "accepting connections again")


# ------------------------------------------------------------- 2. paths
def serve(tmp_path, *args, timeout=30):
    return subprocess.run([sys.executable, "-m", "pydm", "serve", *map(str, args)],
                          capture_output=True, text=True, env=pydm_env(tmp_path / "x.sock"),
                          cwd=tmp_path, timeout=timeout)


@pytest.mark.parametrize("flag", ["--socket", "--unix"])
def test_a_regular_file_is_never_replaced_by_a_socket(tmp_path, config, flag):
    victim = tmp_path / "precious.txt"
    victim.write_text("keep me")
    args = [config, flag, victim] + (["--socket", tmp_path / "c.sock"] if flag == "--unix"
                                     else ["--no-nbd"])
    r = serve(tmp_path, *args)
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and "is not a socket" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert victim.read_text() == "keep me"


def test_a_second_daemon_never_takes_over_or_removes_the_first_ones_sockets(
        tmp_path, config, start_daemon):
    nbd = tmp_path / "nbd.sock"
    first = start_daemon(config, ["--unix", str(nbd)])
    # The same NBD socket, its own control socket: refused, one line.
    r = serve(tmp_path, config, "--socket", tmp_path / "other.sock", "--unix", nbd)
    assert r.returncode == 1 and "already listening" in r.stderr, r.stderr
    with Client(str(nbd), "z") as c:          # the first daemon still serves it
        c.pread(0, 512)
    assert not (tmp_path / "other.sock").exists()
    # When the first daemon's paths are taken over (after someone removed
    # them), its exit leaves the newcomer's sockets alone.
    os.unlink(first.sock)
    os.unlink(nbd)
    (tmp_path / "b").mkdir()
    second = Daemon(tmp_path / "b", config, ["--unix", str(nbd)], sock=first.sock)
    try:
        assert first.stop() == 0
        assert stat.S_ISSOCK(os.lstat(first.sock).st_mode)
        assert stat.S_ISSOCK(os.lstat(nbd).st_mode)
        with ControlClient(str(first.sock), timeout=10) as c:
            assert c.call("version")["pid"] == second.proc.pid
        with Client(str(nbd), "z") as c:
            c.pread(0, 512)
    finally:
        assert second.stop() == 0
    assert not os.path.exists(first.sock) and not os.path.exists(nbd)


@pytest.mark.parametrize("listen", ["port", "unix"])
def test_a_second_daemon_on_a_taken_nbd_address_never_touches_the_devices_files(
        tmp_path, start_daemon, listen):
    """The demo stack (era over writeboost) twice over one state directory,
    the second daemon with a control socket of its own but the first one's
    NBD port or socket: it stops before it opens a device, so the era
    metadata and the cache the first daemon is using are left as they were
    (era's and writeboost's start-up would write to them)."""
    state = tmp_path / "demo"
    if listen == "unix":
        where = ["--unix", str(tmp_path / "nbd.sock")]
    else:
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        probe.close()
        where = ["--port", str(port)]
    start_daemon(None, where + ["--state-dir", str(state)])
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    r = serve(tmp_path, "--socket", tmp_path / "other.sock", "--state-dir", state, *where)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert ("already listening" if listen == "unix" else "cannot listen") in r.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert not (tmp_path / "other.sock").exists()


def test_a_second_daemon_on_the_same_files_is_refused_and_changes_nothing(
        tmp_path, start_daemon):
    """Sockets and addresses of its own, but the first daemon's demo
    images: each file a device writes is held while it is open, so the
    second daemon stops with one line before it writes any of them, and
    the first goes on serving."""
    state = tmp_path / "demo"
    nbd = tmp_path / "nbd.sock"
    first = start_daemon(None, ["--unix", str(nbd), "--state-dir", str(state)])
    before = {p.name: p.read_bytes() for p in state.iterdir()}
    r = serve(tmp_path, "--socket", tmp_path / "other.sock", "--unix", tmp_path / "nbd2.sock",
              "--state-dir", state)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    assert "is in use: another process writes it" in r.stderr and "Traceback" not in r.stderr
    assert {p.name: p.read_bytes() for p in state.iterdir()} == before
    assert not (tmp_path / "other.sock").exists() and not (tmp_path / "nbd2.sock").exists()
    with Client(str(nbd), "demo") as c:
        c.pread(0, 4096)
    assert first.stop() == 0
    # once the first is gone (even killed), the files are free again
    second = Daemon(tmp_path, None, ["--unix", str(nbd), "--state-dir", str(state)])
    second.proc.kill()
    second.proc.wait(10)
    third = start_daemon(None, ["--unix", str(tmp_path / "nbd3.sock"), "--state-dir", str(state)])
    with Client(str(tmp_path / "nbd3.sock"), "demo") as c:
        c.pread(0, 4096)
    assert third.stop() == 0


def test_a_stale_socket_is_replaced(tmp_path, config, start_daemon):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(tmp_path / "ctl.sock"))
    stale.close()                         # a socket file nobody listens on
    d = start_daemon(config)
    with ControlClient(str(d.sock), timeout=10) as c:
        assert c.call("version")["pid"] == d.proc.pid


# ------------------------------------------------------- 3. runtime dir
NOBODY = 65534


@pytest.fixture
def public_tmp():
    """A world-writable sticky directory, like /tmp, that uid 65534 can use."""
    d = tempfile.mkdtemp(prefix="pydm-rt-", dir="/tmp")
    os.chmod(d, 0o1777)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def as_nobody(args, tmpdir, timeout=30, **kw):
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYDM_SOCKET", "XDG_RUNTIME_DIR")}
    env.update(TMPDIR=tmpdir, HOME=tmpdir, PYDM_LOCKDEP="1")
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups",
           sys.executable, "-m", "pydm", *args]
    return subprocess.Popen(cmd, env=env, cwd=tmpdir, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def finish(p, timeout=30):
    """(stdout, stderr) of ``p`` once it exits; killed if it has not within
    ``timeout`` (a daemon that should have refused to start is not left
    running as nobody)."""
    try:
        return p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"still running after {timeout} s: {out} {err}") from None


def nobody_config(tmpdir):
    cfg = os.path.join(tmpdir, "cfg.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG)
    return cfg


def test_fallback_runtime_dir_is_created_private(public_tmp):
    rt = os.path.join(public_tmp, f"pydm-{NOBODY}")
    p = as_nobody(["serve", nobody_config(public_tmp), "--no-nbd"], public_tmp)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(rt, "control.sock")):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        st = os.lstat(rt)
        assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o700
        ls = as_nobody(["dm", "ls"], public_tmp)
        out, err = finish(ls)
        assert ls.returncode == 0 and out.startswith("z\t"), err
    finally:
        p.terminate()
        finish(p)
    assert p.returncode == 0


@pytest.mark.parametrize("owner,mode,words", [
    (0, 0o700, "owned by uid 0, not by you"),
    (NOBODY, 0o777, "mode 0777 lets others in"),
    (NOBODY, 0o750, "mode 0750 lets others in"),
])
def test_a_squatted_runtime_dir_is_refused(public_tmp, owner, mode, words):
    rt = os.path.join(public_tmp, f"pydm-{NOBODY}")
    os.mkdir(rt)
    os.chown(rt, owner, owner)
    os.chmod(rt, mode)
    for args in (["serve", nobody_config(public_tmp), "--no-nbd"], ["dm", "ls"]):
        p = as_nobody(args, public_tmp)
        out, err = finish(p)
        assert p.returncode == 1, (args, out, err)
        assert err.count("\n") == 1 and words in err and "unsafe runtime directory" in err
    assert os.listdir(rt) == []
