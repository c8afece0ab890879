"""Server behaviour through the wire: hostile input, concurrency, suspend, reload,
memory bounds, holders and the ``pydm serve`` command."""

import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from nbd_support import DISK_SIZE, MiB, make_disk, need, run, start_server
from nbdclient import Client, NBDError, connect, greet, go_data, option, option_replies
from pydm.control import Control
from pydm.nbd import protocol as P


def wait_for(cond, timeout=10.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def expect_closed(sock, timeout=10):
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def disk_bytes(served, off, n):
    with open(served.image("disk.img"), "rb") as f:
        f.seek(off)
        return f.read(n)


@pytest.fixture
def warnings_seen():
    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record)
    h = H(logging.INFO)
    log = logging.getLogger("pydm.nbd")
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(h)
    yield records
    log.removeHandler(h)
    log.setLevel(old)


# ----------------------------------------------------------- hostile input
def test_bad_client_flags_and_option_magic_disconnect(served, warnings_seen):
    s = connect(served.addr)
    greet(s, client_flags=0x80)
    expect_closed(s)
    s = connect(served.addr)
    greet(s)
    s.sendall(struct.pack(">QII", 0xDEADBEEF, P.OPT_GO, 0))
    expect_closed(s)
    wait_for(lambda: len([r for r in warnings_seen if "protocol violation" in r.getMessage()])
             == 2, what="two violations logged")
    with Client(served.addr, "disk") as c:          # the server is fine
        assert c.pread(0, 512) == disk_bytes(served, 0, 512)


def test_unknown_and_oversized_options_keep_the_session(served):
    s = connect(served.addr)
    greet(s)
    assert option_replies(s, 4242, b"whatever")[-1][0] == P.REP_ERR_UNSUP
    assert option_replies(s, P.OPT_EXTENDED_HEADERS)[-1][0] == P.REP_ERR_UNSUP
    big = b"\0" * (P.MAX_OPTION_DATA + 1000)
    assert option_replies(s, P.OPT_LIST, big)[-1][0] == P.REP_ERR_TOO_BIG
    assert option_replies(s, P.OPT_INFO, b"\0\0")[-1][0] == P.REP_ERR_INVALID
    rep = option_replies(s, P.OPT_GO, go_data("disk"))
    assert rep[-1][0] == P.REP_ACK
    s.close()


def test_abort_and_unknown_export_name(served):
    s = connect(served.addr)
    greet(s)
    assert option_replies(s, P.OPT_ABORT)[-1][0] == P.REP_ACK
    expect_closed(s)
    s = connect(served.addr)
    greet(s)
    option(s, P.OPT_EXPORT_NAME, b"no-such-export")
    expect_closed(s)


def test_request_errors_do_not_disconnect(served):
    with Client(served.addr, "disk") as c:
        for cmd, off, n, flags, err in (
                (P.CMD_READ, DISK_SIZE - 512, 1024, 0, P.EINVAL),
                (P.CMD_READ, 3, 512, 0, P.EINVAL),
                (P.CMD_READ, 0, 64 * MiB, 0, P.EINVAL),
                (P.CMD_TRIM, DISK_SIZE, 512, 0, P.EINVAL),
                (P.CMD_BLOCK_STATUS, DISK_SIZE, 512, 0, P.EINVAL),
                (17, 0, 512, 0, P.EINVAL),
                (P.CMD_READ, 0, 512, 0x40, P.EINVAL)):
            cookie = c.send(cmd, off, n, flags)
            got, error, _ = c.reply()
            assert (got, error) == (cookie, err), (cmd, off, n)
        # a WRITE past the end is refused *after* its payload is consumed
        cookie = c.send(P.CMD_WRITE, DISK_SIZE - 512, 4096, 0, b"z" * 4096)
        assert c.reply()[:2] == (cookie, P.ENOSPC)
        assert c.pread(0, 512) == disk_bytes(served, 0, 512)
    with Client(served.addr, "ro") as c:
        cookie = c.send(P.CMD_WRITE, 0, 512, 0, b"w" * 512)
        assert c.reply()[:2] == (cookie, P.EPERM)


def test_violations_in_transmission_leave_others_alone(served, warnings_seen):
    other = Client(served.addr, "disk")
    other.pwrite(4 * MiB, b"o" * 65536)
    for bad in (struct.pack(">IHHQQI", 0x12345678, 0, P.CMD_READ, 1, 0, 512),
                struct.pack(">IHHQQI", P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 64 * MiB)):
        c = Client(served.addr, "disk")
        c.sock.sendall(bad)
        expect_closed(c.sock)
        assert other.pread(4 * MiB, 65536) == b"o" * 65536
    msgs = [r.getMessage() for r in warnings_seen if "protocol violation" in r.getMessage()]
    assert len(msgs) == 2 and "bad request magic" in msgs[0] and "over the" in msgs[1]
    other.close()


def test_disconnect_mid_request_writes_nothing(served):
    before = disk_bytes(served, 0, 65536)
    c = Client(served.addr, "disk")
    c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_WRITE, 1, 0, 65536) +
                   b"x" * 30000)
    c.sock.close()
    c = Client(served.addr, "disk")
    c.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, 1, 0, 4096)[:11])
    c.sock.close()
    wait_for(lambda: not served.server.connections(), what="connections to close")
    assert disk_bytes(served, 0, 65536) == before
    assert served.control.get("disk").open_count == 0


# ------------------------------------------------------------- concurrency
def test_replies_out_of_order(served):
    img = served.image("disk.img")
    # the first MiB is slow (a delay target), the rest is not
    served.control.create("mixed", f"0 2048 delay {img} 0 300\n"
                                   f"2048 20480 linear {img} 2048", readonly=True)
    with Client(served.addr, "mixed") as c:
        slow = c.send(P.CMD_READ, 0, 4096)
        fast = c.send(P.CMD_READ, 2 * MiB, 4096)
        first, err1, data1 = c.reply(lambda _c: 4096)
        second, err2, data2 = c.reply(lambda _c: 4096)
        assert (first, second) == (fast, slow) and not err1 and not err2
        assert data1 == disk_bytes(served, 2 * MiB, 4096)
        assert data2 == disk_bytes(served, 0, 4096)


def test_suspend_holds_requests_not_the_connection(served):
    dev = served.control.get("disk")
    c = Client(served.addr, "disk")
    other = Client(served.addr, "ro")
    served.control.suspend("disk")
    try:
        held = c.send(P.CMD_READ, 0, 4096)
        status = c.send(P.CMD_BLOCK_STATUS, 0, 2 * MiB)
        got, err, payload = c.reply()
        assert got == status and not err
        assert payload == [(1, [(MiB, 0), (MiB, 3)])]
        assert other.pread(0, 4096) == open(served.image("ro.img"), "rb").read(4096)
        assert dev.info()["deferred"] == 1
    finally:
        served.control.resume("disk")
    got, err, data = c.reply(lambda _c: 4096)
    assert (got, err) == (held, 0) and data == disk_bytes(served, 0, 4096)
    c.close()
    other.close()


def test_connection_survives_table_reload(served, tmp_path):
    other = tmp_path / "other.img"
    with open(other, "wb") as f:
        f.write(b"N" * DISK_SIZE)
    with Client(served.addr, "disk") as c:
        old = c.pread(0, 4096)
        served.control.load("disk", f"0 {DISK_SIZE >> 9} linear {other} 0")
        served.control.resume("disk")
        assert c.pread(0, 4096) == b"N" * 4096 != old
        c.pwrite(8192, b"r" * 4096)
        c.flush()
    with open(other, "rb") as f:
        f.seek(8192)
        assert f.read(4096) == b"r" * 4096


def test_sparse_read_sends_holes(served):
    with Client(served.addr, "disk") as c:
        data = c.pread(0, 4 * MiB)
        assert data == disk_bytes(served, 0, 4 * MiB)
        assert P.REPLY_TYPE_OFFSET_HOLE in c.chunk_types
        c.pread(0, 4 * MiB, P.CMD_FLAG_DF)
        assert c.chunk_types == [P.REPLY_TYPE_OFFSET_DATA]
    with Client(served.addr, "disk", structured=False) as c:
        assert c.pread(0, 4 * MiB) == disk_bytes(served, 0, 4 * MiB)


def test_memory_bound_per_connection(tmp_path):
    control = Control()
    img = make_disk(tmp_path / "disk.img")
    control.create("disk", f"0 {DISK_SIZE >> 9} linear {img} 0")
    served = start_server(control, str(tmp_path), max_inflight_bytes=8 * MiB)
    c = Client(served.addr, "disk")
    served.control.suspend("disk")
    n = 40
    payload = b"m" * MiB
    sender = threading.Thread(target=lambda: [c.send(P.CMD_WRITE, i * MiB, MiB, 0, payload)
                                              for i in range(n)])
    sender.start()

    def held():
        conns = served.server.memory()["connections"]
        return conns[0]["bytes"] if conns else 0
    try:
        wait_for(lambda: held() >= 7 * MiB, what="the bound to fill")
        time.sleep(0.2)                 # give an unbounded reader time to overshoot
        assert held() <= 8 * MiB
    finally:
        served.control.resume("disk")
    sender.join(30)
    got = [c.reply() for _ in range(n)]
    assert sorted(r[0] for r in got) == list(range(1, n + 1))
    assert all(r[1] == 0 for r in got)
    assert disk_bytes(served, 39 * MiB, MiB) == payload
    c.close()
    served.server.stop()
    control.shutdown()


def test_disc_answers_outstanding_requests(served):
    img = served.image("disk.img")
    served.control.create("slow", f"0 2048 delay {img} 0 200", readonly=True)
    c = Client(served.addr, "slow")
    cookie = c.send(P.CMD_READ, 0, 4096)
    c.send(P.CMD_DISC, 0, 0)
    got, err, data = c.reply(lambda _c: 4096)
    assert (got, err) == (cookie, 0) and data == disk_bytes(served, 0, 4096)
    expect_closed(c.sock)


# ----------------------------------------------------------------- holders
def test_clients_are_holders(served):
    dev = served.control.get("disk")
    with Client(served.addr, "disk"):
        wait_for(lambda: dev.open_count == 1, what="the client to be counted")
        [desc] = dev.info()["clients"]
        assert desc.startswith("nbd 127.0.0.1:")
        with pytest.raises(Exception, match="in use"):
            served.control.remove("disk")
    wait_for(lambda: dev.open_count == 0, what="the client to go")
    served.control.remove("disk")
    with pytest.raises(NBDError):
        Client(served.addr, "disk")


def test_server_stop_closes_connections(served):
    idle = connect(served.addr)
    greet(idle)
    c = Client(served.addr, "disk")
    served.server.stop()
    expect_closed(idle)
    expect_closed(c.sock)
    assert served.control.get("disk").open_count == 0
    with pytest.raises(OSError):
        socket.create_connection(served.addr, 2)


# ------------------------------------------------------------ pydm serve
def test_pydm_serve_demo_and_dm_ls(tmp_path):
    need("nbdinfo")
    sock = str(tmp_path / "ctl.sock")
    unix = str(tmp_path / "nbd.sock")
    p = subprocess.Popen([sys.executable, "-m", "pydm", "serve", "--port", "0",
                          "--unix", unix, "--state-dir", str(tmp_path / "demo"),
                          "--socket", sock], stdout=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert "serving devices: demo" in line, line
        uri = line.split("NBD on ")[1].split()[0]
        assert uri.startswith("nbd://127.0.0.1:")
        port = int(uri.split(":")[2].split("/")[0])
        out = run(["nbdinfo", "--size", uri + "demo"]).stdout
        assert out.strip() == str(64 * MiB)
        assert run(["nbdinfo", "--size", f"nbd+unix:///demo?socket={unix}"]).stdout.strip() \
            == str(64 * MiB)
        with Client(("127.0.0.1", port), "demo") as c:
            c.pwrite(0, b"d" * 4096)
            ls = run([sys.executable, "-m", "pydm", "dm", "ls", "--socket", sock]).stdout
            # the demo is era (demo) over a writeboost cache (demo-cache) over
            # a two-file linear device (demo-disk)
            assert ls.startswith("demo\t(253:2)\tclients: nbd 127.0.0.1:"), ls
            assert "demo-cache\t(253:1)\tclients: dm:demo" in ls, ls
            assert "demo-disk\t(253:0)\tclients: dm:demo-cache" in ls, ls
            rm = run([sys.executable, "-m", "pydm", "dm", "remove", "demo", "--socket", sock],
                     check=False)
            assert rm.returncode == 1 and "Device or resource busy" in rm.stderr
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    # the write went through the cache: it is in the log, and written home
    # at the latest by the next drop_caches (not here: the log is durable)
    p = subprocess.Popen([sys.executable, "-m", "pydm", "serve", "--no-nbd",
                          "--state-dir", str(tmp_path / "demo"), "--socket", sock],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert "serving devices: demo" in p.stdout.readline()
        run([sys.executable, "-m", "pydm", "dm", "message", "demo-cache", "0", "drop_caches",
             "--socket", sock])
    finally:
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    with open(tmp_path / "demo" / "disk0.img", "rb") as f:
        assert f.read(4096) == b"d" * 4096


def test_serve_listen_options():
    from pydm.cli import build_parser
    from pydm.cli.serve import nbd_listen_spec
    parse = build_parser().parse_args
    assert nbd_listen_spec(parse(["serve"])) == [("tcp", "127.0.0.1", 10809)]
    assert nbd_listen_spec(parse(["serve", "--unix", "/x"])) == [("unix", "/x")]
    assert nbd_listen_spec(parse(["serve", "--unix", "/x", "--port", "7"])) == \
        [("tcp", "127.0.0.1", 7), ("unix", "/x")]
    assert nbd_listen_spec(parse(["serve", "--listen", "[::1]"])) == [("tcp", "::1", 10809)]
    a = parse(["serve", "--tls", "require", "--tls-certificates", "/d"])
    assert (a.tls, a.tls_certificates) == ("require", "/d")


def test_serve_refuses_tls_without_certificates(tmp_path):
    r = run([sys.executable, "-m", "pydm", "serve", "--tls", "require", "--port", "0",
             "--state-dir", str(tmp_path), "--socket", str(tmp_path / "c.sock")],
            check=False, timeout=60)
    assert r.returncode == 1 and "--tls-certificates" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_largest_device_does_not_break_the_export_list(served):
    need("nbdinfo")
    import json
    from pydm.table import MAX_SECTORS
    served.control.create("big", f"0 {MAX_SECTORS} zero")
    r = run(["nbdinfo", "--list", "--json", served.uri()])
    sizes = {e["export-name"]: e["export-size"] for e in json.loads(r.stdout)["exports"]}
    assert sizes["big"] == MAX_SECTORS << 9 and sizes["disk"] == DISK_SIZE
