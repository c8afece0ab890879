"""The writeboost monitors: each bad hand-written event sequence is caught
exactly once, the good ones pass, and a real writeboost run (writes,
flushes, FUA, writeback, a failed cache store) is quiet with events seen.

Rules of this module: sequences are fed to fresh monitors with the record
reactor (rv_support); the real run uses the suite's session, whose teardown
check fails the test on any violation of any monitor.
"""

import errno
import os
import sys

import pytest

from pydm import trace
from pydm.bio import FLUSH, REQ_FUA, REQ_PREFLUSH, WRITE
from pydm.verify import dotmodel
from rv_support import feed, fresh

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "targets", "writeboost"))

from wbtest import FaultyPool, Rig  # noqa: E402

ENG = 7001                     # an engine's id() in the hand-written sequences


def wb(ev, **fields):
    fields.setdefault("eng", ENG)
    return ev, fields


def ack(bar, status=0):
    return "wb_ack", {"bar": bar, "status": status}


def test_the_models_load():
    d = dotmodel.load("wb_durable")
    assert d.initial == "unbound" and d.finals == {"acked", "errored"}
    assert d.next("pending", "ack_ok") is None          # no ack before durability
    f = dotmodel.load("wb_failed")
    assert f.next("failed", "store_io") is None and "failed" not in f.finals
    w = dotmodel.load("wb_writeback")
    assert w.next("written", "advance") is None


# ------------------------------------------------------------ wb_durable
GOOD_DURABLE = [
    wb("wb_start"),
    wb("wb_bind", bar=1, seg=1), wb("wb_durable", seg=1), ack(1),
    # two barriers, the durable point covers both at once
    wb("wb_bind", bar=2, seg=2), wb("wb_bind", bar=-99, seg=3), wb("wb_durable", seg=3),
    ack(-99), ack(2),
    # a failed round: the barrier gets EIO, not durable
    wb("wb_bind", bar=3, seg=4), ack(3, errno.EIO),
    # the target fails a flush itself (FAILED): fine
    wb("wb_done", bio=4, op=FLUSH, flags=REQ_PREFLUSH, status=errno.EIO),
    wb("wb_done", bio=5, op=WRITE, flags=0, status=0),          # a plain write
    wb("wb_stop"),
]


@pytest.mark.parametrize("events,why", [
    ([wb("wb_bind", bar=1, seg=5), wb("wb_durable", seg=4), ack(1)],
     "event ack_ok not allowed in state pending"),                  # durable < S
    ([wb("wb_bind", bar=1, seg=2), ack(1)], "not allowed in state pending"),
    ([wb("wb_done", bio=9, op=WRITE, flags=REQ_FUA, status=0)],
     "event ack_ok not allowed in state unbound"),                  # FUA never bound
    ([wb("wb_bind", bar=1, seg=2), wb("wb_stop")], "left in state pending"),
    ([wb("wb_bind", bar=1, seg=2),                                  # a durable point after
      wb("wb_fail", errno=errno.EIO, store="cache", op="write", sector=0),   # FAILED
      wb("wb_durable", seg=2), ack(1)], "event ack_ok not allowed in state pending"),
])
def test_wb_durable_catches_each_bad_sequence_once(events, why):
    m = fresh("wb_durable")
    feed(m, [wb("wb_start")] + events + [wb("wb_durable", seg=9), ack(1)])
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    assert why in str(m.violations[0])


def test_wb_durable_good_sequence_passes():
    m = fresh("wb_durable")
    assert not feed(m, GOOD_DURABLE)
    m.end_check()
    assert not m.violations and not m.instances


def test_wb_durable_keeps_engines_apart():
    m = fresh("wb_durable")
    feed(m, [wb("wb_start"), wb("wb_start", eng=8002),
             wb("wb_bind", bar=1, seg=3), wb("wb_bind", eng=8002, bar=2, seg=3),
             wb("wb_durable", eng=8002, seg=3), ack(2), ack(1)])
    assert [v.key for v in m.violations] == [(ENG, 1)]


# ------------------------------------------------------------- wb_failed
GOOD_FAILED = [
    wb("wb_start"), wb("wb_store_io", store="cache", op="write", seg=1),
    wb("wb_store_io", store="cache", op="flush"),
    wb("wb_done", bio=3, op=WRITE, flags=0, status=0),
    wb("wb_fail", errno=errno.EIO, store="cache", op="write", sector=2048),
    wb("wb_done", bio=4, op=WRITE, flags=0, status=0),  # taken before FAILED: may succeed
    wb("wb_late", bio=5), wb("wb_done", bio=5, op=WRITE, flags=0, status=errno.EIO),
    wb("wb_late", bio=6), ack(6, errno.EIO),
    wb("wb_stop"),
]


def test_wb_failed_good_sequence_passes():
    m = fresh("wb_failed")
    assert not feed(m, GOOD_FAILED)
    m.end_check()
    assert not m.violations


FAIL = wb("wb_fail", errno=errno.EIO, store="cache", op="flush", sector=0)


@pytest.mark.parametrize("events,why", [
    ([FAIL, wb("wb_store_io", store="cache", op="write", seg=4)],
     "event store_io not allowed in state failed"),
    ([FAIL, wb("wb_store_io", store="backing", op="flush")], "store_io"),
    ([FAIL, wb("wb_late", bio=5), wb("wb_done", bio=5, op=WRITE, flags=0, status=0)],
     "event late_ok not allowed in state failed"),
    ([FAIL, wb("wb_late", bio=5), ack(5, 0)], "late_ok"),
    ([FAIL], "left in state failed"),                       # never destroyed
])
def test_wb_failed_catches_each_bad_sequence_once(events, why):
    m = fresh("wb_failed")
    feed(m, [wb("wb_start")] + events)
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    assert why in str(m.violations[0])


def test_wb_failed_reports_once_and_a_reused_engine_id_starts_afresh():
    m = fresh("wb_failed")
    feed(m, [wb("wb_start"), FAIL, wb("wb_store_io", store="cache", op="write"),
             wb("wb_store_io", store="backing", op="write"), wb("wb_stop")])
    assert len(m.violations) == 1                            # no cascade
    feed(m, [wb("wb_start"), wb("wb_store_io", store="cache", op="write")])
    assert len(m.violations) == 1


# ---------------------------------------------------------- wb_writeback
def bwrite():
    return wb("wb_store_io", store="backing", op="write")


GOOD_WRITEBACK = [
    wb("wb_start"), wb("wb_advance", upto=1),               # a batch with nothing dirty
    bwrite(), wb("wb_store_io", store="backing", op="flush"), wb("wb_backing_flushed"),
    wb("wb_advance", upto=3),
    bwrite(), bwrite(),                                     # a failed try, then a retry
    wb("wb_backing_flushed"), wb("wb_advance", upto=4),
    wb("wb_store_io", store="cache", op="write"),           # not writeback's business
    bwrite(), wb("wb_stop"),                                # the flush failed: FAILED
]


def test_wb_writeback_good_sequence_passes():
    m = fresh("wb_writeback")
    assert not feed(m, GOOD_WRITEBACK)
    m.end_check()
    assert not m.violations


@pytest.mark.parametrize("events", [
    [bwrite(), wb("wb_advance", upto=1)],
    [bwrite(), wb("wb_store_io", store="backing", op="flush"), wb("wb_advance", upto=1)],
    [bwrite(), wb("wb_backing_flushed"), bwrite(), wb("wb_advance", upto=2)],
])
def test_wb_writeback_catches_an_advance_over_unflushed_writes_once(events):
    m = fresh("wb_writeback")
    feed(m, [wb("wb_start")] + events + [wb("wb_advance", upto=5)])
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    assert "event advance not allowed in state written" in str(m.violations[0])


# ------------------------------------------------------------- a real run
WB = ("wb_durable", "wb_failed", "wb_writeback")


def test_a_real_writeboost_run_is_quiet_and_seen(tmp_path, rv_session):
    before = {n: rv_session.monitors[n].events_seen for n in WB}
    pool = FaultyPool()
    with trace.Recorder() as rec:
        r = Rig(tmp_path, segments=4, stores=pool)
        try:
            block = bytes(range(256)) * 16
            for i in range(40):
                assert r.write(i * 8, block) == 0
                if i % 10 == 9:
                    assert r.flush() == 0
            assert r.write(400, block, REQ_FUA) == 0
            r.control.message("wb", 0, "drop_caches")        # writeback, backing flushed
            assert r.status()["last_writeback"] == r.status()["last_flushed"] > 0
            assert r.write(800, block) == 0
            r.control.suspend("wb")                          # an internal sync seals it
            r.control.resume("wb")
            r.expect(0, 8 * 40)
            assert r.write(0, block) == 0
            pool.by_name["cache.img"].fail_flush = True      # the cache store fails
            assert r.flush() == errno.EIO
            assert r.status()["state"][0] == "failed"
            assert r.write(8, block) == errno.EIO            # new writes fail at once
            assert r.write(16, block, REQ_FUA) == errno.EIO
            assert r.flush() == errno.EIO
        finally:
            r.close()
    seen = {n: rv_session.monitors[n].events_seen - before[n] for n in WB}
    assert all(seen.values()), seen
    names = {e["event"] for e in rec.events}
    assert names >= {"wb_start", "wb_bind", "wb_store_io", "wb_durable", "wb_ack",
                     "wb_backing_flushed", "wb_advance", "wb_fail", "wb_late", "wb_done",
                     "wb_stop"}, names
    assert any(e["event"] == "wb_bind" and e["bar"] < 0 for e in rec.events)  # the suspend
    eng = rec.named("wb_start")[0]["eng"]      # its engine ended destroyed
    assert rv_session.monitors["wb_failed"].state_of(eng) == "stopped"
    assert rv_session.monitors["wb_writeback"].state_of(eng) == "stopped"
