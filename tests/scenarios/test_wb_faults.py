"""writeboost's FAILED state (spec §8.2) seen by a real NBD client: a store
under the cache or the backing that fails one write or flush (or a flakey
device under the cache flipped into its down interval) makes the target
FAILED.  The flush in flight gets EIO, every later write and flush EIO at
once, reads go on from RAM, cache and backing, suspend, drop_caches and
remove return at once, status names the store, nothing more reaches either
store, and a new target over the same files replays every flushed write.
The writeback side: a backing that fails is retried (3 tries) before the
target FAILs, and last_writeback never passes a failed backing flush."""

import errno
import os
import random
import threading
import time

import pytest

from helpers import do_io
from nbd_support import need, run
from nbdclient import Client, NBDError
from pydm.bio import READ
from pydm.control import Control
from pydm.errors import DMError
from pydm.nbd import protocol as P
from pydm.targets.writeboost.writeback import Writeback
from wb_support import (BLOCK, SB, SECTOR, SEGMENT, Acked, FaultPool, log_after_crash,
                        make_images, poll, serve, status, timed, wb_table)

BACKING = 8 << 20
NR_BLOCKS = BACKING // BLOCK
ROUND = 10                 # writes per flush: a flush seals one partial segment
FAST = 0.5                 # s: "at once"
QUICK = 1.0                # s: suspend, drop_caches, remove in FAILED


def report(name, fig):
    """The figures a test measured (shown by pytest -rP)."""
    print(name + ": " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                 for k, v in fig.items()))


class Session:
    """One NBD connection's random 4 KiB writes and flushes, recorded in the
    shared ``model``; with ``lanes`` > 1 it writes only the blocks ``lane``
    mod ``lanes`` (each block's writes then come from one connection)."""

    def __init__(self, addr, model, seed, lane=0, lanes=1):
        self.client = Client(addr, "wb")
        self.model = model
        self.rnd = random.Random(seed)
        self.lane, self.lanes = lane, lanes

    def write(self, fua=False):
        """One random 4 KiB write; its NBD error (0: acknowledged)."""
        block = self.rnd.randrange(NR_BLOCKS // self.lanes) * self.lanes + self.lane
        data = self.rnd.randbytes(BLOCK)
        handle = self.model.write(block * BLOCK, data)
        try:
            self.client.pwrite(block * BLOCK, data, P.CMD_FLAG_FUA if fua else 0)
        except NBDError as e:
            self.model.fail(handle)
            return e.error
        self.model.ack(handle, fua)
        return 0

    def flush(self):
        token = self.model.flush_sent()
        try:
            self.client.flush()
        except NBDError as e:
            return e.error
        self.model.flush_acked(token)
        return 0

    def round(self, n=ROUND, barrier="flush"):
        """n writes and a flush (``barrier="fua"``: the last write is FUA
        instead): None, or (op, NBD error) of the first that failed."""
        for i in range(n):
            err = self.write(fua=barrier == "fua" and i == n - 1)
            if err:
                return "fua" if barrier == "fua" and i == n - 1 else "write", err
        err = self.flush() if barrier == "flush" else 0
        return ("flush", err) if err else None

    def close(self):
        self.client.close()


class Rig:
    """A writeboost device ``wb`` over counting stores (``pool``), served
    over NBD, with the promises it made (``model``) and one connection's
    ``write``, ``flush`` and ``round``.  With ``flakey``, the cache is
    ``dm:c``, a flakey device over the file."""

    def __init__(self, tmp, nr_segments=16, opts="", flakey=False, seed=5):
        self.back, self.cache, image = make_images(tmp, BACKING, nr_segments, seed)
        self.pool = FaultPool()
        self.control = Control(stores=self.pool)
        cache_ref = self.cache
        if flakey:
            self.control.create("c", self.flakey_table(down=False))
            cache_ref = "dm:c"
        self.control.create("wb", wb_table(self.back, cache_ref, BACKING, opts))
        self.served = serve(self.control, tmp)
        self.model = Acked(image)
        self.session = Session(self.served.unix, self.model, seed)
        self.write, self.flush, self.round = (self.session.write, self.session.flush,
                                              self.session.round)

    def flakey_table(self, down):
        n = os.path.getsize(self.cache) // SECTOR
        timing = "0 3600" if down else "3600 0"       # always down / never down
        return f"0 {n} flakey {self.cache} 0 {timing} 1 error_writes"

    def status(self):
        return status(self.control)

    def failed_status(self):
        """The status once it shows failed (polled)."""
        def failed():
            st = self.status()
            return st if st["state"][0] == "failed" else None
        return poll(failed, what="status to show failed")

    def rounds_until_error(self, limit=20, barrier="flush"):
        for _ in range(limit):
            failed = self.round(barrier=barrier)
            if failed:
                return failed
        raise AssertionError(f"{limit} rounds and no error; status {self.status()}")

    def read_all(self):
        out = bytearray()
        for off in range(0, BACKING, 1 << 20):
            out += self.session.client.pread(off, 1 << 20)
        return bytes(out)

    def close(self):
        if self.control is not None:
            self.session.close()
            self.served.server.stop()
            self.control.shutdown()
            self.control = None


@pytest.fixture
def rigs():
    made = []
    yield made
    for r in made:
        r.close()


def is_eio(e):
    """A refused message's error is EIO."""
    return isinstance(e, DMError) and e.errno == errno.EIO


def check_failed(rig, store, op, cache_reads=True, reads=True):
    """Everything §8.2 promises once FAILED; returns (status when first seen
    failed, figures)."""
    st = rig.failed_status()
    before = rig.pool.changes()            # what both stores had when it FAILED
    assert st["state"][:4] == ["failed", str(errno.EIO), store, op], st["state"]
    assert len(st["state"]) == 5 and int(st["state"][4]) >= 0
    fig = {}
    # every later write and flush: EIO at once
    times = []
    for _ in range(10):
        for fn in (rig.write, rig.flush):
            t0 = time.monotonic()
            assert fn() == errno.EIO
            times.append(time.monotonic() - t0)
    fig["eio_max_s"] = max(times)
    assert fig["eio_max_s"] < FAST, times
    # reads: what was acknowledged, from RAM, the cache and the backing
    cache_store = rig.pool["cache.img"]
    counted = cache_store.counts["read"], rig.pool["backing.img"].counts["read"]
    image = rig.read_all()
    if reads:                   # (else the model does not know what was written)
        rig.model.check_live(image)
    assert rig.pool["backing.img"].counts["read"] > counted[1]
    if cache_reads:
        assert cache_store.counts["read"] > counted[0]
    # drop_caches: EIO at once
    err, fig["drop_caches_s"] = timed(rig.control.message, "wb", 0, "drop_caches")
    assert is_eio(err), err
    assert fig["drop_caches_s"] < QUICK
    # suspend returns; resume does not clear FAILED (no in-place resume)
    err, fig["suspend_s"] = timed(rig.control.suspend, "wb")
    assert err is None and fig["suspend_s"] < QUICK, err
    rig.control.resume("wb")
    assert rig.status()["state"] == st["state"]
    assert rig.write() == errno.EIO and rig.flush() == errno.EIO
    # remove returns, once the client is gone
    rig.session.close()
    poll(lambda: rig.control.info("wb")["open_count"] == 0, what="the NBD client to go")
    err, fig["remove_s"] = timed(rig.control.remove, "wb")
    assert err is None and fig["remove_s"] < QUICK, err
    # and nothing reached either store after the failure
    after = rig.pool.changes()
    assert after == before, (before, after)
    fig["writes_after_failure"] = sum(a[0] - b[0] for a, b in zip(after.values(),
                                                                  before.values()))
    fig["flushes_after_failure"] = sum(a[1] - b[1] for a, b in zip(after.values(),
                                                                   before.values()))
    return st, fig


def recreate_and_check(rig):
    """A fresh Control with plain stores over the same files replays the
    log: every write an acknowledged flush covered reads back.  Returns how
    many blocks held promised data."""
    rig.close()
    c = Control()
    try:
        dev = c.create("wb", wb_table(rig.back, rig.cache, BACKING))
        assert status(c)["state"] == ["active"]
        st, buf = do_io(dev, READ, 0, BACKING // SECTOR)
        assert st == 0
        return rig.model.check(bytes(buf))
    finally:
        c.shutdown()


def segment_sector(seg_id, nr_segments):
    return (SB + (seg_id - 1) % nr_segments * SEGMENT) // SECTOR


# ------------------------------------------------------------ the cache fails
@pytest.mark.parametrize("op,nth,barrier", [("write", 1, "flush"), ("write", 3, "flush"),
                                            ("write", 2, "fua"), ("flush", 1, "flush"),
                                            ("flush", 2, "fua")])
def test_a_cache_error_fails_the_flush_in_flight_and_everything_after(tmp_path, rigs, op, nth,
                                                                       barrier):
    rig = Rig(tmp_path)
    rigs.append(rig)
    for _ in range(10):                    # ten segments: the oldest left their RAM buffers
        assert rig.round(barrier=barrier) is None
    assert rig.status()["last_flushed"] == 10
    rig.pool["cache.img"].fail(op, nth)
    failed = rig.rounds_until_error(barrier=barrier)
    assert failed == (barrier, errno.EIO), failed          # the flush (or FUA) in flight
    assert [o for o, _n in rig.pool["cache.img"].failed] == [op]      # one error only
    st, fig = check_failed(rig, "cache", op)
    assert st["last_flushed"] == 10 + nth - (op == "write")
    assert st["last_writeback"] == 0
    if op == "write":       # the segment after the last flushed one, in its slot
        assert int(st["state"][4]) == segment_sector(st["last_flushed"] + 1, 16)
    else:
        assert st["state"][4] == "0"
    fig["durable_blocks"] = recreate_and_check(rig)
    per_round = ROUND if barrier == "flush" else 1        # FUA promises only itself
    assert fig["durable_blocks"] >= (10 + nth - 1) * per_round * 0.9
    report(f"cache {op} #{nth}, {barrier}", fig)


def test_a_failed_record_write_at_suspend_fails_the_target(tmp_path, rigs):
    rig = Rig(tmp_path, nr_segments=4)
    rigs.append(rig)
    for _ in range(5):                     # the log wrapped: segment 1 is written back
        assert rig.round() is None
    assert rig.status()["last_writeback"] >= 1
    rig.pool["cache.img"].fail("write", 1)
    err, t = timed(rig.control.suspend, "wb")       # writes the superblock record
    assert err is None and t < QUICK, err
    rig.control.resume("wb")
    st, fig = check_failed(rig, "cache", "write", cache_reads=False)
    assert st["state"][4] == str((SB - BLOCK) // SECTOR)        # the record's 4 KiB
    fig["durable_blocks"] = recreate_and_check(rig)
    assert fig["durable_blocks"] >= 5 * ROUND * 0.9
    report("cache record write at suspend", fig)


def test_flakey_under_the_cache_flipped_down_fails_the_target(tmp_path, rigs):
    rig = Rig(tmp_path, flakey=True)
    rigs.append(rig)
    for _ in range(10):
        assert rig.round() is None
    for _ in range(3):                     # unflushed writes in the RAM buffer
        assert rig.write() == 0
    # flip flakey into its down interval: a new table, live after suspend+resume
    rig.control.load("c", rig.flakey_table(down=True))
    rig.control.suspend("c")
    rig.control.resume("c")
    assert rig.control.table("c")[0][3].split()[2:4] == ["0", "3600"]
    assert rig.write() == 0                # still only RAM
    assert rig.flush() == errno.EIO        # the flush in flight
    st, fig = check_failed(rig, "cache", "write")
    assert st["last_flushed"] == 10
    assert int(st["state"][4]) == segment_sector(11, 16)
    fig["durable_blocks"] = recreate_and_check(rig)
    assert fig["durable_blocks"] >= 10 * ROUND * 0.9
    report("flakey cache down", fig)


# ---------------------------------------------------------- the backing fails
def fail_tries(monkeypatch, backing, op, times):
    """Every ``op`` of the backing fails during the first ``times`` writeback
    tries (a try writes a batch, up to 64 writes at once, then flushes);
    returns the list of tries made, each as the ``op`` errors it met."""
    tries = []
    real = Writeback._write

    def counted(self, items, reads):
        bad = len(tries) < times
        backing.fail(op, 1, None if bad else 0)
        before = len(backing.failed)
        try:
            return real(self, items, reads)
        finally:
            tries.append(len(backing.failed) - before)
    monkeypatch.setattr(Writeback, "_write", counted)
    return tries


def test_a_backing_that_fails_writeback_fails_the_write_waiting_for_a_slot(tmp_path, rigs,
                                                                           monkeypatch):
    rig = Rig(tmp_path, nr_segments=4)
    rigs.append(rig)
    for _ in range(2):
        assert rig.round() is None
    backing = rig.pool["backing.img"]
    tries = fail_tries(monkeypatch, backing, "write", 3)
    # two more segments fill the log; the next needs segment 1 written back
    failed = rig.rounds_until_error()
    assert failed == ("write", errno.EIO), failed
    assert rig.model.flushes == 4
    assert len(tries) == 3 and all(tries), tries               # three tries, all failed
    assert {o for o, _n in backing.failed} == {"write"}
    st, fig = check_failed(rig, "backing", "write", cache_reads=False)
    assert st["last_writeback"] == 0 and st["last_flushed"] == 4
    assert int(st["state"][4]) % 8 == 0
    assert int(st["state"][4]) // 8 in rig.model.acked      # a block the log holds
    fig["durable_blocks"] = recreate_and_check(rig)
    assert fig["durable_blocks"] >= 4 * ROUND * 0.9
    report("backing write (urged writeback)", fig)


@pytest.mark.parametrize("op,times", [("write", 2), ("write", 3), ("flush", 1), ("flush", 2),
                                      ("flush", 3)])
def test_writeback_retries_three_times_and_never_passes_a_failed_flush(tmp_path, rigs, op,
                                                                       times, monkeypatch):
    rig = Rig(tmp_path)
    rigs.append(rig)
    for _ in range(3):
        assert rig.round() is None
    for _ in range(4):
        assert rig.write() == 0            # and some only in RAM
    backing = rig.pool["backing.img"]
    assert backing.changes() == (0, 0)     # nothing written back yet
    tries = fail_tries(monkeypatch, backing, op, times)
    seen = []                              # last_writeback at every backing write and flush
    backing.watch = lambda _op, _n: seen.append(rig.status()["last_writeback"])
    err, t = timed(rig.control.message, "wb", 0, "drop_caches")
    backing.watch = None
    assert len(tries) == min(times + 1, 3) and all(tries[:times]), tries
    assert {o for o, _n in backing.failed} == {op}
    # the retries (after a failed write or flush) still see nothing written back
    assert len(seen) >= times and set(seen) == {0}, seen
    if times < 3:                          # the last try succeeded
        assert err is None, err
        st = rig.status()
        assert st["state"] == ["active"] and st["nr_dirty"] == 0
        assert st["last_writeback"] == st["last_flushed"] == 4
        with open(rig.back, "rb") as f:
            assert f.read() == rig.model.latest_image()
        return
    assert is_eio(err), err
    st, fig = check_failed(rig, "backing", op, cache_reads=False)
    assert st["last_writeback"] == 0, st       # never past the failed flush
    assert st["last_flushed"] == 4 and st["nr_dirty"] > 0
    if op == "flush":
        assert st["state"][4] == "0"
        assert backing.changes()[0] > 0        # the writes went out, the flush failed
    fig["drop_caches_until_failed_s"] = t
    fig["durable_blocks"] = recreate_and_check(rig)
    assert fig["durable_blocks"] >= 3 * ROUND * 0.9
    report(f"backing {op} x{times} (drop_caches)", fig)


# ------------------------------------------------------ several clients
def test_four_connections_all_get_eio_and_keep_their_flushed_writes(tmp_path, rigs):
    rig = Rig(tmp_path)
    rigs.append(rig)
    for _ in range(3):
        assert rig.round() is None
    rig.pool["cache.img"].fail("write", 8)
    seen, problems = {}, []

    def client(lane):
        s = Session(rig.served.unix, rig.model, 100 + lane, lane, 4)
        try:
            for _ in range(200):
                failed = s.round(s.rnd.randint(1, 5))
                if failed:
                    rig.failed_status()
                    seen[lane] = failed + (s.write(), s.flush())      # and it stays so
                    return
        except Exception as e:          # noqa: BLE001 - reported below
            problems.append(e)
        finally:
            s.close()

    threads = [threading.Thread(target=client, args=(lane,), daemon=True) for lane in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not problems, problems
    assert sorted(seen) == [0, 1, 2, 3], seen
    for failed in seen.values():
        assert failed[1:] == (errno.EIO, errno.EIO, errno.EIO), seen
    st, fig = check_failed(rig, "cache", "write")
    fig["flushes_acked"] = rig.model.flushes
    fig["durable_blocks"] = recreate_and_check(rig)
    report("four connections, cache write", fig)


def test_fio_in_flight_when_the_cache_fails_gets_eio_and_exits(tmp_path, rigs):
    need("fio")
    rig = Rig(tmp_path)
    rigs.append(rig)
    assert rig.round() is None
    rig.pool["cache.img"].fail("write", 20)
    t0 = time.monotonic()
    r = run(["fio", "--name=f", "--ioengine=nbd", f"--uri={rig.served.unix_uri('wb')}",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--fsync=8", "--time_based",
             "--runtime=60", "--randseed=3"], check=False, timeout=90)
    took = time.monotonic() - t0
    assert r.returncode != 0 and "Input/output error" in r.stdout + r.stderr, r.stdout
    assert took < 30, took                 # stopped at the error, not at the runtime
    st, fig = check_failed(rig, "cache", "write", cache_reads=False, reads=False)
    fig["fio_s"] = took
    rig.close()
    # the log is a clean prefix (the write that failed never happened), and
    # a new target starts over it
    _start, end, torn = log_after_crash(rig.cache, BACKING)
    assert end == st["last_flushed"] and torn == 0
    c = Control()
    c.create("wb", wb_table(rig.back, rig.cache, BACKING))
    try:
        assert status(c)["state"] == ["active"] and status(c)["last_flushed"] == end
    finally:
        c.shutdown()
    report("fio, cache write", fig)
