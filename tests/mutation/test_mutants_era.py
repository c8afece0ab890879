"""Scenarios of the era mutants (mutants_era.py): each passes with no report
on the real code, and under its mutant (PYDM_MUTANT=<name>) the mutant's
monitor reports, which fails the test (a raised VerificationError or the
suite's teardown check).

Rules of this module: ordering comes from events, never from a sleep.  A
write is held in flight by the era origin, a pydm device the test suspends
(bios to a suspended device wait until its resume); the test resumes it in
a finally, and every wait has a timeout, so no scenario can hang.
"""

import json
import threading

import pytest

from helpers import era_control, Waiter, do_io
from pydm.bio import Bio, READ, WRITE
from pydm.lockdep import make_event

BS = 8                      # era block: 8 sectors
NR = 128                    # era blocks


@pytest.fixture
def env(tmp_path):
    with era_control(tmp_path, NR, BS) as c:
        yield c, tmp_path


def _write_block(dev, blk, byte=b"w", n=1):
    return do_io(dev, WRITE, blk * BS, data=byte * (n * BS * 512))[0]


def _changed(c, since):
    r = json.loads(c.message("e", 0, f"changed_since {since}"))
    return {b for lo, hi in r["ranges"] for b in range(lo, hi)}


def _era(c):
    (_s, _n, _t, line), = c.status("e")
    return int(line.split()[2])


def _switch_with_a_write_in_flight(env, monkeypatch, rv_session, message):
    """A write past the fast path (block 42, marked) is held in flight when
    ``message`` comes.  The real code's quiesce waits for it before the
    switch; a switch without the quiesce runs with it in flight."""
    c, tmp = env
    c.create("o", f"0 {NR * BS} linear {tmp}/origin.img 0\n")
    dev = c.create("e", f"0 {NR * BS} era {tmp}/meta.img dm:o {BS}\n")
    drain = rv_session.monitors["era_drain"]
    seen = drain.events_seen
    assert _write_block(dev, 42, b"1") == 0         # marked: the fast path from now on

    # set once the message waits for the write (real code) or is over (mutant)
    progress = make_event()
    real_wait = dev._wait_drained

    def wait_drained(timeout=None):
        progress.set()
        return real_wait(timeout)
    monkeypatch.setattr(dev, "_wait_drained", wait_drained)
    errors = []

    def switch():
        try:
            c.message("e", 0, message)
        except BaseException as e:          # handed to the test below
            errors.append(e)
        finally:
            progress.set()

    held = Waiter()
    switcher = threading.Thread(target=switch, name="era-switch", daemon=True)
    c.suspend("o")                                  # the gate: origin writes wait
    try:
        dev.submit(Bio(WRITE, 42 * BS, BS, memoryview(bytearray(b"2" * BS * 512)), 0, held))
        assert dev.info()["inflight"] == 1 and not held.event.is_set()
        switcher.start()
        assert progress.wait(10), f"{message} neither waited for the write nor finished"
    finally:
        c.resume("o")                               # release the write, whatever happened
        if switcher.ident is not None:
            switcher.join(10)
    assert not switcher.is_alive(), f"{message} did not finish once the write was released"
    assert not errors, errors
    assert held.wait() == 0
    assert _era(c) == 2
    # the new era starts empty, and the next write to block 42 is recorded in it
    assert 42 not in _changed(c, 2)
    assert _write_block(dev, 42, b"3") == 0
    assert _changed(c, 2) == {42}
    assert drain.events_seen > seen
    return c, dev


def test_checkpoint_with_a_write_in_flight(env, monkeypatch, rv_session):
    _switch_with_a_write_in_flight(env, monkeypatch, rv_session, "checkpoint")


def test_take_metadata_snap_with_a_write_in_flight(env, monkeypatch, rv_session):
    c, _dev = _switch_with_a_write_in_flight(env, monkeypatch, rv_session, "take_metadata_snap")
    (_s, _n, _t, line), = c.status("e")
    assert line.split()[3] != "-"                   # the snapshot is held
    c.message("e", 0, "drop_metadata_snap")


def test_first_writes_wait_for_their_mark_commit(env, rv_session):
    """Writes to unmarked blocks, one over several blocks, rewrites of
    marked ones, and the same blocks again after a checkpoint and a
    metadata snapshot (the new era must mark them again): every one is
    recorded, which it is only because it waited for its mark's commit."""
    c, tmp = env
    dev = c.create("e", f"0 {NR * BS} era {tmp}/meta.img {tmp}/origin.img {BS}\n")
    commit = rv_session.monitors["era_commit"]
    seen = commit.events_seen
    for blk in (3, 4, 100):
        assert _write_block(dev, blk) == 0
    assert _write_block(dev, 20, b"m", 10) == 0     # one bio over ten blocks
    assert _write_block(dev, 3, b"r") == 0          # marked: the fast path
    assert do_io(dev, READ, 0, 64)[0] == 0
    assert _changed(c, 1) == {3, 4, 100} | set(range(20, 30))
    c.message("e", 0, "checkpoint")
    assert _write_block(dev, 3, b"n") == 0
    assert _write_block(dev, 7, b"n") == 0
    c.message("e", 0, "take_metadata_snap")
    assert _write_block(dev, 4, b"s") == 0
    assert _write_block(dev, 3, b"s") == 0
    assert _changed(c, 2) == {3, 4, 7}
    assert _changed(c, 3) == {3, 4}
    c.message("e", 0, "drop_metadata_snap")
    assert commit.events_seen > seen
