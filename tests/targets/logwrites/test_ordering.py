"""log-writes: what is logged when, and in which order, every pitfall of the
format's ordering rules as a named test.  Completions are put in a chosen
order by holding writes (and flushes) in a gated store until the test lets
them go; the log is read by the independent reader."""

import random
import threading
import time

import pytest

from lwtest import SECTOR, Gate, GatedPool, Rig, kinds


@pytest.fixture
def gated(tmp_path):
    pool = GatedPool()
    r = Rig(tmp_path, stores=pool)
    r.gates = pool.gates
    yield r
    r.close()


def held(rig, key, fn, *args):
    """Start ``fn(*args)`` on a thread, its I/O held at ``key`` (a byte
    offset of the data file, or "flush"); returns (gate, thread) once the
    I/O is in flight."""
    gate = rig.gates[key] = Gate()
    t = threading.Thread(target=fn, args=args, daemon=True)
    t.start()
    assert gate.entered.wait(10)
    return gate, t


def let_go(gate, t):
    gate.release()
    t.join(10)
    assert not t.is_alive()


def wait_for_entries(rig, n):
    """The log vouches for ``n`` entries (a flush in flight keeps ``settle``
    from being used: a suspend would wait for it)."""
    deadline = time.monotonic() + 10
    while len(rig.entries()) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return kinds(rig.entries())


def data(n, seed):
    return bytes([seed]) * (n * SECTOR)


def test_a_flush_covers_only_writes_completed_before_it_was_issued(gated):
    # W1 W2 W3 issued; 3 and 2 complete; flush; then 1 completes
    g1 = held(gated, 8 * SECTOR, gated.write, 8, data(8, 1))
    assert gated.write(24, data(8, 3)) == 0
    assert gated.write(16, data(8, 2)) == 0
    assert gated.flush() == 0
    let_go(*g1)
    gated.settle()
    assert kinds(gated.entries()) == ["W24", "W16", "FLUSH"]
    assert gated.flush() == 0
    gated.settle()
    assert kinds(gated.entries()) == ["W24", "W16", "FLUSH", "W8", "FLUSH"]


def test_a_write_completing_while_the_flush_is_in_flight_waits_for_the_next(gated):
    # Wa Wb Wc, Cc Ca, FLUSH issued, FUA d, Cb, flush completes, FUA d completes:
    # the log is c a FLUSH FUAd, and b comes with the next flush (the code and
    # the rst; the header comment of dm-log-writes.c says "c a b flush fuad")
    ga = held(gated, 8 * SECTOR, gated.write, 8, data(8, 0xA))
    gb = held(gated, 16 * SECTOR, gated.write, 16, data(8, 0xB))
    assert gated.write(24, data(8, 0xC)) == 0
    let_go(*ga)
    gf = held(gated, "flush", gated.flush)
    gd = held(gated, 32 * SECTOR, gated.fua, 32, data(8, 0xD))
    let_go(*gb)
    let_go(*gf)
    let_go(*gd)
    gated.settle()
    assert kinds(gated.entries()) == ["W24", "W8", "FLUSH", "F32"]
    assert gated.flush() == 0
    gated.settle()
    assert kinds(gated.entries())[4:] == ["W16", "FLUSH"]


def test_a_flush_also_covers_what_an_earlier_flush_still_in_flight_covers(gated):
    """W1 completes; flush A is issued and held; W2 completes; flush B is
    issued and completes first.  B covers W1 too (it had completed before B
    was issued), so the log says W1 W2 FLUSH, never W2 FLUSH with W1 later:
    that would be a state with W2 durable and W1 not, which never existed.
    (The crash harness found it: writeboost's segments seemed lost in the
    middle of its log.)"""
    assert gated.write(8, data(8, 1)) == 0
    ga = held(gated, "flush", gated.flush)
    assert gated.write(16, data(8, 2)) == 0
    assert gated.flush() == 0
    assert wait_for_entries(gated, 3) == ["W8", "W16", "FLUSH"]
    let_go(*ga)
    gated.settle()
    assert kinds(gated.entries()) == ["W8", "W16", "FLUSH", "FLUSH"]


def test_a_fua_write_goes_ahead_of_older_unflushed_writes(tmp_path):
    r = Rig(tmp_path)
    assert r.write(8, data(8, 1)) == 0
    assert r.fua(16, data(8, 2)) == 0
    r.settle()
    assert kinds(r.entries()) == ["F16"]
    assert r.flush() == 0
    r.settle()
    assert kinds(r.entries()) == ["F16", "W8", "FLUSH"]
    r.close()


def test_a_discard_is_ordered_like_a_write(tmp_path):
    r = Rig(tmp_path)
    assert r.write(8, data(8, 1)) == 0
    assert r.discard(8, 8) == 0
    assert r.flush() == 0
    r.settle()
    es = r.entries()
    assert kinds(es) == ["W8", "D8", "FLUSH"]
    assert es[1]["data"] is None and es[2]["pos"] == es[1]["pos"] + 1   # no payload
    r.close()


def test_a_mark_is_not_deferred(tmp_path):
    r = Rig(tmp_path)
    assert r.write(8, data(8, 1)) == 0
    r.mark("here")
    assert r.flush() == 0
    r.settle()
    assert kinds(r.entries()) == ["M:here", "W8", "FLUSH"]
    r.close()


def test_teardown_logs_what_is_unflushed_then_the_end_mark(tmp_path):
    r = Rig(tmp_path)
    assert r.write(8, data(8, 1)) == 0
    assert r.flush() == 0
    assert r.write(16, data(8, 2)) == 0
    r.close()
    es = r.entries()
    assert kinds(es) == ["W8", "FLUSH", "W16", "M:dm-log-writes-end"]


def test_the_super_counts_entries_at_every_flush(tmp_path):
    """The kernel updates nr_entries only after FUA and MARK entries, so a
    log with a write and a flush reads as empty until teardown; pydm's
    reads as those two entries (and they are on the log before it says so)."""
    r = Rig(tmp_path)
    assert r.write(8, data(8, 1)) == 0
    assert r.flush() == 0
    r.settle()
    assert kinds(r.entries()) == ["W8", "FLUSH"]
    assert r.status().split()[:2] == ["2", str((1 + 1 + 8 + 1) - 1)]
    r.close()


def test_zero_length_writes_and_reads_are_not_logged(tmp_path):
    r = Rig(tmp_path)
    assert r.write(8, b"") == 0
    from helpers import do_io
    from pydm.bio import READ
    assert do_io(r.dev, READ, 0, 64)[0] == 0
    r.settle()
    assert r.entries() == [] and r.status() == "0 0"
    r.close()


def test_a_failed_data_write_is_not_logged_and_is_counted(tmp_path):
    # the data device is a flakey device that fails writes
    r = Rig(tmp_path, table=None)
    r.close()
    from pydm.control import Control
    c = Control()
    c.create("f", f"0 8192 flakey {r.data} 0 0 3600 1 error_writes")
    dev = c.create("lw", f"0 8192 log-writes dm:f {r.log}")
    from helpers import do_io
    from pydm.bio import WRITE
    assert do_io(dev, WRITE, 8, data=data(8, 1))[0] != 0
    c.suspend("lw")
    c.resume("lw")
    status = c.status("lw")[0][3].split()
    c.shutdown()
    assert status[2:4] == ["failed_writes", "1"]
    from lw_spec_reader import read_log
    assert kinds(read_log(r.log)[1]) == ["M:dm-log-writes-end"]     # teardown: nothing else


def test_sectors_are_target_relative(tmp_path):
    """A log-writes target that does not start at 0 logs sectors relative to
    its own start (the kernel logs absolute ones): replaying the log onto its
    data device reproduces it."""
    r = Rig(tmp_path, table=None)
    r.close()
    from pydm.control import Control
    c = Control()
    with open(tmp_path / "front.img", "wb") as f:
        f.truncate(1 << 20)
    dev = c.create("lw", f"0 2048 linear {tmp_path / 'front.img'} 0\n"
                         f"2048 8192 log-writes {r.data} {r.log}\n")
    from helpers import do_io
    from pydm.bio import FLUSH, REQ_PREFLUSH, WRITE
    assert do_io(dev, WRITE, 2048 + 8, data=data(8, 7))[0] == 0
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    c.shutdown()
    from lw_spec_reader import read_log
    es = read_log(r.log)[1]
    assert es[0]["sector"] == 8 and es[0]["data"] == data(8, 7)


# ------------------------------------------------------------ concurrency
def test_random_completion_order_never_puts_a_write_after_a_flush_that_covered_it(tmp_path):
    """Writes over a data device whose two halves have different delays (so
    completions reorder) from four threads, flushes from a fifth: each flush
    covers exactly the writes that had completed when it was issued: every
    write seen completed before it was issued is logged before its entry, and
    every write issued after it completed is logged after it.  Then the log
    replays to the device's contents."""
    from pydm.control import Control
    from helpers import Waiter
    from pydm.bio import Bio, FLUSH, REQ_PREFLUSH, WRITE
    r = Rig(tmp_path)
    r.close()
    c = Control()
    c.create("d", f"0 4096 delay {r.data} 0 0 {r.data} 0 0\n"
                  f"4096 4096 delay {r.data} 4096 0 {r.data} 4096 3\n")
    dev = c.create("lw", f"0 8192 log-writes dm:d {r.log}")
    lock = threading.Lock()
    events = []                                # ("done", write id) / ("flush", id, phase)
    seq = iter(range(1, 10 ** 9))

    submitted_after = {}                       # write id -> flushes completed before it

    def writer(k):
        rnd = random.Random(k)
        for _ in range(60):
            wid = next(seq)
            with lock:
                submitted_after[wid] = sum(1 for e in events if e[0] == "flush")
            sector = rnd.randrange(1024) * 8
            payload = wid.to_bytes(8, "little") * 512
            w = Waiter()
            dev.submit(Bio(WRITE, sector, 8, memoryview(bytearray(payload)), 0, w))
            assert w.wait() == 0
            with lock:
                events.append(("done", wid))

    def flusher():
        for i in range(25):
            with lock:
                seen = {e[1] for e in events if e[0] == "done"}
            w = Waiter()
            dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, w))
            assert w.wait() == 0
            with lock:
                events.append(("flush", i, seen))
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    threads.append(threading.Thread(target=flusher))
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    c.shutdown()
    from lw_spec_reader import apply, read_log
    ss, es = read_log(r.log)
    where = {}                                  # write id -> its entry index
    flushes = []
    for e in es:
        if e["data"] is not None:
            where[int.from_bytes(e["data"][:8], "little")] = e["index"]
        elif e["flags"] == 1:
            flushes.append(e["index"])
    assert len(where) == 240 and len(flushes) >= 25
    flush_events = [e for e in events if e[0] == "flush"]
    for (_f, i, seen), at in zip(flush_events, flushes):
        assert all(where[w] < at for w in seen), f"flush {i} logged before a write it covered"
    for wid, n in submitted_after.items():     # issued after flush n-1 completed
        assert n == 0 or where[wid] > flushes[n - 1], f"write {wid} logged before flush {n - 1}"
    image = apply(es, ss, bytearray(r.initial))
    assert bytes(image) == open(r.data, "rb").read()


def test_past_the_bound_held_writes_spill_to_the_log_without_a_flush_entry(tmp_path,
                                                                         monkeypatch):
    """Completed writes wait in RAM for a flush; past the bound they go to
    the log early, in completion order, with no entry of their own: the
    log shows no flush the client did not send."""
    from pydm.targets.logwrites import target as lw_target
    monkeypatch.setattr(lw_target, "MAX_HELD", 16 << 10)     # 3 records held, the 4th spills
    r = Rig(tmp_path)
    for i in range(20):
        assert r.write(i * 8, data(8, i)) == 0
    r.mark("m")
    r.close()
    assert kinds(r.entries()) == [f"W{i * 8}" for i in range(20)] + ["M:m",
                                                                      "M:dm-log-writes-end"]


def test_a_spill_never_puts_a_write_ahead_of_a_flush_in_flight_that_does_not_cover_it(
        gated, monkeypatch):
    """W8 W16 complete; flush A is issued (covers them) and held; W24
    completes and the bound is passed: W8 and W16 spill (ahead of A's
    entry, where they go anyway).  W32 and W40 complete past the bound too,
    but they belong behind A's entry: they are held until A completes, and
    spill with the next completion after it."""
    from pydm.targets.logwrites import target as lw_target
    monkeypatch.setattr(lw_target, "MAX_HELD", 10 << 10)     # 2 records held, the 3rd spills
    for sector in (8, 16):
        assert gated.write(sector, data(8, sector)) == 0
    ga = held(gated, "flush", gated.flush)
    for sector in (24, 32, 40):
        assert gated.write(sector, data(8, sector)) == 0
    gated.mark("m")                         # makes the super vouch for what is queued
    assert wait_for_entries(gated, 3) == ["W8", "W16", "M:m"]
    let_go(*ga)
    assert gated.write(48, data(8, 48)) == 0
    assert gated.flush() == 0
    gated.settle()
    assert kinds(gated.entries()) == ["W8", "W16", "M:m", "FLUSH",
                                      "W24", "W32", "W40", "W48", "FLUSH"]
