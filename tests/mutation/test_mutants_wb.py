"""Scenarios the writeboost mutants are caught in (tests/mutation/mutants_wb.py).

Rules of this module: on the real code each test passes with no monitor
report; under its mutant (PYDM_MUTANT=<name>) the monitor the mutant names
reports (from the flusher's or the writeback's thread, so the suite's
teardown check fails the test; the clock watchdog for ``deadline``).
Nothing here can hang: every wait is bounded, a store held on a gate is
released and stranded barriers are failed (``release_stranded``) before the
device is removed.  No sleep orders anything.
"""

import errno
import os
import sys
import threading

import pytest

from helpers import Waiter
from mutants_wb import release_stranded
from pydm.bio import Bio, FLUSH, REQ_FUA, REQ_PREFLUSH

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scenarios"))

from wb_support import FaultPool  # noqa: E402
from wbtest import Rig  # noqa: E402

DATA = bytes(range(256)) * 16          # one 4 KiB block
WAIT = 10.0                            # s: a bound for what the real code does at once
STUCK = 3.0                            # s: waiting for a flush that may be stranded


@pytest.fixture
def rig(tmp_path):
    """A writeboost device over counting, failing stores (``rig.pool``)."""
    pool = FaultPool()
    r = Rig(tmp_path, segments=4, stores=pool)
    r.pool = pool
    r.gate = threading.Event()         # a store held on it is let go at teardown
    try:
        yield r
    finally:
        r.gate.set()
        release_stranded()
        r.close()


def submit_flush(rig):
    """An empty flush sent without waiting; its Waiter."""
    w = Waiter()
    rig.dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, w))
    return w


def test_flush_and_fua_are_acknowledged_after_the_cache_flush(rig):
    cache = rig.pool["cache.img"]
    for i in range(4):
        assert rig.write(i * 8, DATA) == 0
    flushes = cache.changes()[1]
    assert rig.flush() == 0
    assert cache.changes()[1] == flushes + 1
    assert rig.write(64, DATA, REQ_FUA) == 0
    assert cache.changes()[1] == flushes + 2
    s = rig.status()
    assert s["last_flushed"] == s["current_id"] == 2 and s["state"] == ["active"]
    rig.recreate()                      # a new target replays both segments
    rig.expect(0, 72)


def test_segments_queued_when_the_cache_fails_are_never_written(rig):
    cache = rig.pool["cache.img"]
    assert rig.write(0, DATA) == 0 and rig.flush() == 0             # segment 1 durable
    held = threading.Event()

    def hold(op, _n):
        if op == "write":
            held.set()
            rig.gate.wait(WAIT)
    cache.fail("write", 1)              # the next cache write fails...
    cache.watch = hold                  # ...once the gate lets it go
    assert rig.write(8, DATA) == 0
    first = submit_flush(rig)           # seals segment 2: the flusher holds on its write
    assert held.wait(WAIT), "the flusher never wrote segment 2"
    assert rig.write(16, DATA) == 0
    second = submit_flush(rig)          # seals segment 3: queued behind the held write
    assert rig.status()["current_id"] == 3
    writes_then = cache.changes()
    cache.watch = None
    rig.gate.set()                      # segment 2's write fails: FAILED
    assert first.wait(WAIT) == errno.EIO
    assert second.wait(WAIT) == errno.EIO
    assert cache.changes() == writes_then                           # segment 3 never written
    s = rig.status()
    assert s["state"][0] == "failed" and s["last_flushed"] == 1


def test_drop_caches_advances_last_writeback_after_the_backing_flush(rig):
    backing = rig.pool["backing.img"]
    for i in range(3):
        for j in range(5):
            assert rig.write((i * 5 + j) * 8, DATA) == 0
        assert rig.flush() == 0
    assert backing.changes() == (0, 0)
    rig.control.message("wb", 0, "drop_caches")
    s = rig.status()
    assert s["last_writeback"] == s["last_flushed"] == 3 and s["nr_dirty"] == 0
    writes, flushes = backing.changes()
    assert writes > 0 and flushes > 0
    assert rig.backing_bytes(0, 120) == bytes(rig.shadow[:120 * 512])


def test_a_flush_on_a_dead_cache_store_fails_promptly(rig, rv_session):
    assert rig.write(0, DATA) == 0 and rig.flush() == 0
    rv_session.set_params("deadline", flush_timeout=1.0)
    try:
        rig.pool["cache.img"].fail("write", 1, times=None)          # the cache is dead
        assert rig.write(8, DATA) == 0                              # RAM only
        w = submit_flush(rig)
        w.event.wait(STUCK)             # bounded; the watchdog reports a stuck one at 1 s
    finally:
        release_stranded()
        rv_session.set_params("deadline", flush_timeout=30.0)
    assert w.wait(WAIT) == errno.EIO
    assert rig.status()["state"][0] == "failed"
    assert rig.flush() == errno.EIO     # and at once from now on
