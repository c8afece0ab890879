"""era monitors: the models load, each hand-written bad sequence is caught
exactly once, good ones pass, and a real era device run (writes, a
checkpoint, a metadata snapshot, a failed mark commit, a reload) is quiet
while the events reach both monitors."""

import errno
import json

import pytest

from helpers import do_io, make_image
from pydm.bio import READ, WRITE
from pydm.control import Control
from pydm.verify import dotmodel
from rv_support import feed, fresh

K = 1001                    # a tracker key (id(tracker) in real events)
NR = 64


def ev(name, key=K, **kw):
    return name, dict(dev="e", key=key, **kw)


def init(key=K):
    return ev("era_init", key, nr_blocks=NR)


def write(bio, first, end=None, key=K):
    return ev("era_write", key, bio=bio, first=first, end=first + 1 if end is None else end)


def done(bio, target="era"):
    return "clone_complete", dict(dev="e", bio=bio + 10000, clone=bio, target=target, op=1,
                                  status=0)


def begin(key=K, op="checkpoint"):
    return ev("era_checkpoint_begin", key, op=op)


def end(key=K, op="checkpoint", ok=True):
    return ev("era_checkpoint_done", key, op=op, ok=ok)


def rollover(key=K):
    return ev("era_rollover", key, nr_blocks=NR)


def committed(*ranges, key=K):
    return ev("era_marks_committed", key, ranges=[list(r) for r in ranges])


def loaded(*ranges, key=K):
    return ev("era_marks_loaded", key, nr_blocks=NR, ranges=[list(r) for r in ranges])


def dtr(key=K):
    return ev("era_dtr", key)


def test_models_load_and_are_deterministic():
    d = dotmodel.load("era_drain")
    assert d.initial == "running" and d.finals == {"running", "gone"}
    assert d.next("running", "checkpoint_begin") == "quiesced"
    assert d.next("quiesced", "write_issue") is None
    assert d.next("quiesced", "write_done") is None
    assert d.next("running", "checkpoint_busy") is None
    c = dotmodel.load("era_commit")
    assert c.initial == "new" and c.finals == {"new", "tracking", "gone"}
    assert c.next("tracking", "write_marked") == "tracking"
    assert c.next("tracking", "write_unmarked") is None
    assert c.next("new", "write_marked") is None


# ------------------------------------------------------------- era_drain
@pytest.mark.parametrize("events,bad", [
    # the review race: a write past the fast path still in flight at the switch
    ([init(), write(1, 3), begin()], "checkpoint_busy"),
    # a write issued between the quiesce and the commit
    ([init(), write(1, 3), done(1), begin(), write(2, 4)], "write_issue"),
    # one issued and completed there: reported at its issue, once
    ([init(), begin(), write(2, 4), done(2), end()], "write_issue"),
    # take_metadata_snap is held to the same rule
    ([init(), write(1, 3), write(2, 5), done(1), begin(op="take_metadata_snap")],
     "checkpoint_busy"),
])
def test_era_drain_flags_each_bad_sequence_exactly_once(events, bad):
    m = fresh("era_drain")
    # no cascade after the report
    feed(m, events + [done(1), done(2), end(), write(3, 1), begin(), dtr()])
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    v = m.violations[0]
    assert v.event == bad and v.key == K and "last events" in str(v)


def test_era_drain_reports_a_checkpoint_that_never_finished():
    m = fresh("era_drain")
    feed(m, [init(), write(1, 0), done(1), begin()])
    assert not m.violations
    m.end_check()
    assert len(m.violations) == 1 and m.violations[0].state == "quiesced"


def test_era_drain_good_sequences_pass():
    m = fresh("era_drain")
    feed(m, [init(), write(1, 0), write(2, 9, 12), done(99), done(1, "linear"),
             done(2), begin(), end(), write(3, 0), done(3), begin(op="take_metadata_snap"),
             end(op="take_metadata_snap", ok=False),
             # a second tracker (a reload) runs beside the first
             init(2002), write(4, 1, key=2002), done(4), begin(2002), end(2002),
             dtr(), dtr(2002),
             # a new tracker that got an old one's id starts clean
             init(), write(5, 2), done(5), begin(), end(), dtr()])
    m.end_check()
    assert not m.violations and not m.instances
    assert not m.shadow.bios and not m.shadow.count


def test_era_drain_ignores_trackers_it_never_saw_start():
    m = fresh("era_drain")
    feed(m, [write(1, 0, key=7), begin(7), write(2, 0, key=7), end(7)])
    m.end_check()
    assert not m.violations and not m.instances


# ------------------------------------------------------------ era_commit
@pytest.mark.parametrize("events", [
    # a write to a block whose mark was never committed
    [init(), rollover(), write(1, 5)],
    # one block of the range committed, the next not
    [init(), rollover(), committed((0, 2)), write(1, 1, 3)],
    # a mark committed in the last era does not count in the new one
    [init(), rollover(), committed((5, 6)), write(1, 5), rollover(), write(2, 5)],
    # after going back to the last commit, only what was read back counts
    [init(), rollover(), committed((0, 8)), loaded((0, 4)), write(1, 4)],
    # no write before the first era starts
    [init(), write(1, 0)],
    # a range past the end of the device is not marked
    [init(), rollover(), committed((0, NR)), write(1, NR - 1, NR + 1)],
])
def test_era_commit_flags_each_bad_sequence_exactly_once(events):
    m = fresh("era_commit")
    feed(m, events + [write(3, 40), committed((40, 41)), write(4, 40), dtr()])
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    v = m.violations[0]
    assert v.event == "write_unmarked" and v.key == K and "last events" in str(v)


def test_era_commit_good_sequences_pass():
    m = fresh("era_commit")
    feed(m, [init(), rollover(), committed((0, 2), (10, 13)), write(1, 0, 2), write(2, 1),
             write(3, 10, 13), loaded((0, 2), (10, 13), (20, 21)), write(4, 20),
             rollover(), committed((0, 1)), write(5, 0), committed((1, 3)), write(6, 0, 3),
             dtr()])
    m.end_check()
    assert not m.violations and not m.instances


def test_era_commit_takes_up_a_tracker_at_an_era_change():
    """Enabled after a tracker started: its writes are unknown until an era
    change or a reload tells the monitor the whole committed set."""
    m = fresh("era_commit")
    feed(m, [write(1, 3, key=7), committed((3, 4), key=7)])
    assert not m.instances and not m.violations
    feed(m, [rollover(7), write(2, 3, key=7)])
    assert len(m.violations) == 1
    feed(m, [loaded((3, 4), key=8), write(3, 3, key=8)])
    assert len(m.violations) == 1


# ------------------------------------------------------------- real run
BS = 8


def _fail_next_mark(monkeypatch):
    """The next mark fails (only the worker's batches mark: a digest step
    running meanwhile is not hit)."""
    from pydm.metadata.era_md import EraMetadata
    real = EraMetadata.mark_range
    left = [1]

    def mark_range(self, first, end):
        if left:
            left.pop()
            raise OSError(errno.EIO, "metadata write failed (test)")
        return real(self, first, end)
    monkeypatch.setattr(EraMetadata, "mark_range", mark_range)


def test_a_real_era_run_is_quiet_and_feeds_both_monitors(tmp_path, rv_session, monkeypatch):
    drain, commit = rv_session.monitors["era_drain"], rv_session.monitors["era_commit"]
    seen = drain.events_seen, commit.events_seen
    c = Control()
    c.cwd = str(tmp_path)
    make_image(tmp_path / "meta.img", 4 << 20)
    make_image(tmp_path / "origin.img", NR * BS * 512)
    table = f"0 {NR * BS} era {tmp_path}/meta.img {tmp_path}/origin.img {BS}\n"
    keys = []
    try:
        dev = c.create("e", table)
        keys.append(id(dev.live.targets[0].tracker))

        def wr(blk, n=1):
            return do_io(dev, WRITE, blk * BS, data=b"x" * (n * BS * 512))[0]
        assert wr(1) == 0 and wr(1) == 0 and wr(2, 3) == 0
        c.message("e", 0, "checkpoint")
        assert wr(1) == 0 and wr(10) == 0
        c.message("e", 0, "take_metadata_snap")
        assert wr(10) == 0 and wr(11) == 0
        c.message("e", 0, "drop_metadata_snap")
        assert do_io(dev, READ, 0, 8)[0] == 0
        _fail_next_mark(monkeypatch)
        assert wr(20) == errno.EIO                 # back to the last commit
        monkeypatch.undo()
        assert wr(20) == 0 and wr(1) == 0
        c.load("e", table)                         # a new tracker under the same name
        c.resume("e")
        keys.append(id(dev.live.targets[0].tracker))
        assert wr(30) == 0 and wr(1) == 0
        c.message("e", 0, "checkpoint")
        r = json.loads(c.message("e", 0, "changed_since 1"))
        assert [30, 31] in r["ranges"]
    finally:
        c.shutdown()
    assert drain.events_seen - seen[0] > 20 and commit.events_seen - seen[1] > 10
    # both trackers reached ``gone`` (the suite's teardown check sees any report)
    assert all(m.state_of(k) == "gone" for k in keys for m in (drain, commit))
