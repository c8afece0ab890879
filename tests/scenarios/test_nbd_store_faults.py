"""Faults of a remote NBD store, end to end through pydm's NBD server:

* the server killed with I/O in flight: in-flight and new requests fail with
  EIO within the store's timeout (nothing hangs), and once the server is
  back on the same address the device works again, with every write that
  was acknowledged before the kill still there;
* the same under writeboost (a local cache in front of the remote backing):
  the device may fail, but after the server is back and the device is built
  again over the same cache, every write an acknowledged flush covered reads
  back;
* a server that advertises no flush: no layer above claims durability it
  cannot give (no flush, no FUA in the export; writeboost refuses it as a
  backing).
"""

import errno
import random
import threading
import time

import pytest

from helpers import make_image
from nbd_support import start_server
from nbdclient import Client, NBDError
from pydm.control import Control
from pydm.errors import DMError
from pydm.nbd import protocol as P
from wb_support import Acked

SIZE = 8 << 20
SECTORS = SIZE >> 9
TIMEOUT = 2                     # the store's timeout=, seconds
SLACK = 8                       # what a loaded 2-core machine may add to it


class Writers:
    """Clients writing 4 KiB blocks (each thread its own blocks) over pydm's
    NBD server, and flushing now and then; every request's outcome and how
    long it took are recorded in ``acked``."""

    def __init__(self, sock, export, acked, threads=3, flush_every=8):
        self.sock, self.export, self.acked = sock, export, acked
        self.stop = threading.Event()
        self.errors = []              # (errno, seconds the request took)
        self.slowest = 0.0
        self.ok = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i, threads, flush_every))
                        for i in range(threads)]

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def _timed(self, fn, *args):
        t0 = time.monotonic()
        try:
            return fn(*args), None
        except NBDError as e:
            return None, e.error
        finally:
            took = time.monotonic() - t0
            with self.lock:
                self.slowest = max(self.slowest, took)

    def run(self, i, n, flush_every):
        rnd = random.Random(i)
        blocks = [b for b in range(SIZE // 4096 - 1) if b % n == i]   # the last: works()
        with Client(self.sock, self.export) as c:
            k = 0
            while not self.stop.is_set():
                b = rnd.choice(blocks)
                data = rnd.randbytes(4096)
                h = self.acked.write(b * 4096, data)
                _r, err = self._timed(c.pwrite, b * 4096, data)
                if err is None:
                    self.acked.ack(h)
                else:
                    self.acked.fail(h)
                k += 1
                if k % flush_every == 0:
                    token = self.acked.flush_sent()
                    _r, ferr = self._timed(c.flush)
                    if ferr is None:
                        self.acked.flush_acked(token)
                    err = err or ferr
                with self.lock:
                    if err is None:
                        self.ok += 1
                    else:
                        self.errors.append(err)

    def join(self, timeout):
        self.stop.set()
        for t in self.threads:
            t.join(timeout)
            assert not t.is_alive(), "a client is stuck: a request never completed"


def wait_for(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def read_all(sock, export):
    with Client(sock, export) as c:
        return b"".join(c.pread(o, 1 << 20) for o in range(0, SIZE, 1 << 20))


def works(sock, export):
    try:
        with Client(sock, export) as c:
            c.pwrite(SIZE - 4096, b"\x5a" * 4096)
            return c.pread(SIZE - 4096, 4096) == b"\x5a" * 4096
    except (NBDError, OSError, EOFError):
        return False


def test_a_killed_server_fails_io_in_time_and_the_device_recovers(tmp_path, remote):
    r = remote("file", size=SIZE)
    acked = Acked(bytes(SIZE))
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        c.create("lin", f"0 {SECTORS} linear {r.uri}?timeout={TIMEOUT} 0")
        w = Writers(served.unix, "lin", acked).start()
        wait_for(lambda: w.ok > 200, 30, "writes before the kill")
        r.kill()
        killed = time.monotonic()
        wait_for(lambda: len(w.errors) >= 3, TIMEOUT + SLACK, "requests failing after the kill")
        assert set(w.errors) <= {P.EIO}, w.errors
        time.sleep(TIMEOUT + 1)       # a while without the server: every request still ends
        w.join(TIMEOUT + SLACK)
        assert w.slowest < TIMEOUT + SLACK, f"a request took {w.slowest:.1f} s"
        down_for = time.monotonic() - killed
        r.start()
        wait_for(lambda: works(served.unix, "lin"), 30, "the device to work again")
        # every write acknowledged (the kill lost no data: the file plugin's
        # writes were in the host's page cache) reads back, or a failed
        # later write's data does
        acked.check_live(read_all(served.unix, "lin")[:SIZE - 4096])
        print(f"killed for {down_for:.1f} s: {len(w.errors)} requests failed, slowest "
              f"{w.slowest:.2f} s, {w.ok} succeeded")
    finally:
        served.server.stop()
        c.shutdown()


def test_writeboost_over_a_killed_backing_loses_no_flushed_write(tmp_path, remote):
    r = remote("file", size=SIZE)
    make_image(tmp_path / "cache.img", (1 << 20) + 8 * (512 << 10))
    table = f"0 {SECTORS} writeboost {r.uri}?timeout={TIMEOUT} cache.img 2 writeback_threshold 0"
    acked = Acked(bytes(SIZE))
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        c.create("wb", table, cwd=str(tmp_path))
        w = Writers(served.unix, "wb", acked).start()
        wait_for(lambda: w.ok > 300, 30, "writes before the kill")
        r.kill()
        time.sleep(TIMEOUT + 1)
        w.join(TIMEOUT + SLACK)
        assert w.slowest < TIMEOUT + SLACK, f"a request took {w.slowest:.1f} s"
        r.start()
        t0 = time.monotonic()
        c.remove("wb")                 # never blocks on a store, dead or alive
        assert time.monotonic() - t0 < TIMEOUT + SLACK
        c.create("wb", table, cwd=str(tmp_path))           # replays the cache's log
        durable = acked.check(read_all(served.unix, "wb"))
        assert durable > 100, durable
        print(f"writeboost: {w.ok} ok, {len(w.errors)} failed, {durable} blocks durable, "
              f"all intact")
    finally:
        served.server.stop()
        c.shutdown()


def test_a_server_without_flush_gets_no_durability_claims(tmp_path, remote):
    r = remote("noflush", size=SIZE)
    make_image(tmp_path / "cache.img", (1 << 20) + 8 * (512 << 10))
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        c.create("lin", f"0 {SECTORS} linear {r.uri} 0")
        caps = c.get("lin").capabilities()
        assert not caps.flush and not caps.fua
        with Client(served.unix, "lin") as cl:
            assert not cl.flags & P.TF_SEND_FLUSH and not cl.flags & P.TF_SEND_FUA
            cl.pwrite(4096, b"\x11" * 4096)
            assert cl.pread(4096, 4096) == b"\x11" * 4096
        # a FLUSH that reaches the store anyway is refused, not faked
        from helpers import do_io
        from pydm.bio import FLUSH, REQ_PREFLUSH
        status, _ = do_io(c.get("lin"), FLUSH, 0, flags=REQ_PREFLUSH)
        assert status in (errno.EOPNOTSUPP, errno.EIO), status
        wait_for(lambda: not c.get("lin").holders()[0], 10, "the client to be gone")
        c.remove("lin")
        # beside a file that can flush, the table still claims nothing
        c.create("mixed", f"0 {SECTORS} linear {r.uri} 0\n{SECTORS} 2048 linear "
                 f"{tmp_path / 'cache.img'} 0")
        assert not c.get("mixed").capabilities().flush
        c.remove("mixed")
        # writeboost needs a backing it can make durable before it frees its log
        with pytest.raises(DMError, match="flush"):
            c.create("wb", f"0 {SECTORS} writeboost {r.uri} cache.img", cwd=str(tmp_path))
    finally:
        served.server.stop()
        c.shutdown()
