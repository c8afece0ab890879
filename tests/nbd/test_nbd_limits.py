"""What one client, or many, may cost the server: time in the handshake and
memory for replies nobody reads."""

import os
import socket
import time

import pytest

from helpers import Daemon
from nbd_support import MiB, make_disk, start_server
from nbdclient import Client, recv_exact
from pydm.control import Control
from pydm.nbd import protocol as P


@pytest.fixture
def quick(tmp_path):
    """A server whose handshake must be over within 1 s."""
    control = Control()
    img = make_disk(tmp_path / "disk.img", 4 * MiB)
    control.create("disk", f"0 8192 linear {img} 0")
    s = start_server(control, str(tmp_path), handshake_limit=1.0)
    yield s
    s.server.stop()
    control.shutdown()


def test_a_trickling_handshake_is_cut_at_the_limit(quick):
    s = socket.create_connection(quick.addr, 10)
    start = time.monotonic()
    recv_exact(s, 18)                                    # the greeting
    # A valid handshake (the client flags, then options), one byte every
    # 0.1 s: each receive is quick, the whole never ends in time.
    msg = b"\0\0\0\3" + P.OPTION_HEADER.pack(P.IHAVEOPT, P.OPT_LIST, 0) * 10
    closed = None
    for b in msg:
        try:
            s.send(bytes([b]))
            s.settimeout(0.1)
            if s.recv(65536) == b"":
                closed = time.monotonic() - start
                break
        except socket.timeout:
            continue
        except (BrokenPipeError, ConnectionResetError):
            closed = time.monotonic() - start
            break
    s.close()
    assert closed is not None and closed < 3, f"still connected after {len(msg) * 0.1} s"


def test_the_limit_is_for_the_handshake_only(quick):
    with Client(quick.addr, "disk") as c:
        time.sleep(1.5)                                  # idle past the limit
        assert len(c.pread(0, 4096)) == 4096


RSS_BOUND = 640 * MiB       # 64 x 2 MiB reserves + 256 MiB budget + 256 MiB for the rest


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_clients_that_never_read_replies_cannot_exhaust_memory(tmp_path):
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.write(os.urandom(64 * MiB))
    (tmp_path / "pydm.toml").write_text(
        f'[[device]]\nname = "disk"\ntable = "0 {(64 * MiB) >> 9} linear {img} 0"\n')
    nbd = str(tmp_path / "nbd.sock")
    d = Daemon(tmp_path, tmp_path / "pydm.toml", ["--unix", nbd])
    bad = []
    try:
        base = rss(d.proc.pid)
        for _ in range(64):
            c = Client(nbd, "disk", structured=False)
            # 256 MiB of reads asked by each, in one message
            c.sock.sendall(b"".join(P.REQUEST.pack(P.REQUEST_MAGIC, 0, P.CMD_READ, i,
                                                   (i % 64) * MiB, MiB) for i in range(256)))
            bad.append(c)
        peak, deadline, last_growth = 0, time.monotonic() + 60, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - last_growth < 3:
            now = rss(d.proc.pid)
            if now > peak + MiB:
                last_growth = time.monotonic()
            peak = max(peak, now)
            time.sleep(0.2)
        print(f"nbd memory: 64 clients not reading: peak resident {peak / MiB:.0f} MiB, started at {base / MiB:.0f} MiB, bound {RSS_BOUND / MiB:.0f} MiB")
        assert peak < RSS_BOUND, f"resident {peak / MiB:.0f} MiB (started at {base / MiB:.0f})"
        # A well-behaved client is still served meanwhile, from its reserve.
        with Client(nbd, "disk") as good:
            assert len(good.pread(0, 65536)) == 65536
    finally:
        for c in bad:
            c.sock.close()
        assert d.stop() == 0
