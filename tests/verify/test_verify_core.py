"""Core monitors: the models load, each bad sequence is caught exactly once,
good ones pass, clocks expire, and a real device run is quiet."""

import time

import pytest

from helpers import do_io, make_image
from pydm.bio import FLUSH, READ, REQ_FUA, WRITE
from pydm.control import Control
from pydm.verify import dotmodel
from pydm.verify.session import Clock, RVError, Session
from rv_support import feed, fresh


def bio(ev, b, minor=0, **kw):
    return ev, dict(minor=minor, bio=b, dev="d", **kw)


def dev(ev, minor=0):
    return ev, dict(minor=minor, dev="d")


def test_models_load_and_are_deterministic():
    m = dotmodel.load("bio_once")
    assert m.initial == "new" and m.finals == {"done"}
    assert m.next("inflight", "bio_complete") == "done"
    assert m.next("done", "bio_complete") is None
    assert dotmodel.load("deadline").invariants == {"inflight": "flush_timeout",
                                                   "removing": "remove_timeout"}


def test_parser_rejects_bad_models():
    with pytest.raises(dotmodel.ModelError, match="first line"):
        dotmodel.parse("graph x {}")
    head = ('digraph state_automaton {\n{node [shape = plaintext, style=invis, label=""] '
            '"__init_a"};\n{node [shape = ellipse] "a"};\n{node [shape = ellipse] "b"};\n'
            '"__init_a" -> "a";\n')
    with pytest.raises(dotmodel.ModelError, match="not deterministic"):
        dotmodel.parse(head + '"a" -> "b" [ label = "x" ];\n"a" -> "a" [ label = "x" ];\n}')
    with pytest.raises(dotmodel.ModelError, match="unreachable"):
        dotmodel.parse(head + '"a" -> "a" [ label = "x" ];\n}')
    bad_clock = head.replace('[shape = ellipse] "b"', '[shape = circle, label = "b\\nclk > 3"] "b"')
    with pytest.raises(dotmodel.ModelError, match="clk < NAME"):
        dotmodel.parse(bad_clock + '"a" -> "b" [ label = "x" ];\n}')


@pytest.mark.parametrize("events", [
    [bio("bio_submit", 1), bio("bio_complete", 1), bio("bio_complete", 1)],   # twice
    [bio("bio_submit", 1), bio("bio_submit", 1)],                             # mapped twice
    [bio("bio_complete", 1), bio("bio_requeue", 1)],                          # after done
])
def test_bio_once_flags_each_bad_sequence_exactly_once(events):
    m = fresh("bio_once")
    feed(m, events + [bio("bio_complete", 1)])      # no cascade after the report
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]
    assert "last events" in str(m.violations[0])


def test_bio_once_end_check_at_dev_gone_names_the_stuck_bio():
    m = fresh("bio_once")
    feed(m, [bio("bio_submit", 7), bio("bio_submit", 8), bio("bio_complete", 8),
             bio("bio_submit", 9, minor=1), dev("dev_gone")])
    assert [v.key for v in m.violations] == [(0, 7)]
    m.end_check()
    assert [v.key for v in m.violations] == [(0, 7), (1, 9)]


def test_bio_once_good_sequences_pass():
    m = fresh("bio_once")
    feed(m, [bio("bio_defer", 1), bio("bio_submit", 1), bio("bio_requeue", 1),
             bio("bio_submit", 1), bio("bio_complete", 1), bio("bio_complete", 2)])
    m.end_check()
    assert not m.violations and not m.instances


def test_dev_lifecycle():
    m = fresh("dev_lifecycle")
    assert len(feed(m, [dev("dev_create"), dev("dev_suspended")])) == 1
    m = fresh("dev_lifecycle")
    feed(m, [dev("dev_create"), dev("dev_resumed"), dev("dev_suspended"), dev("dev_resumed"),
             dev("dev_remove"), dev("dev_create"), dev("dev_remove")])
    m.end_check()
    assert not m.violations


def test_inactive_slot():
    good = [dev("dev_create"), dev("dev_load"), dev("dev_resume_begin"), dev("dev_swap"),
            dev("dev_resumed"), dev("dev_resume_begin"), dev("dev_resumed"), dev("dev_load"),
            dev("dev_clear"), dev("dev_remove")]
    m = fresh("inactive_slot")
    assert not feed(m, good)
    m = fresh("inactive_slot")        # a resume that kept a loaded table out
    assert len(feed(m, [dev("dev_create"), dev("dev_load"), dev("dev_resume_begin"),
                        dev("dev_resumed")])) == 1
    m = fresh("inactive_slot")        # a swap with nothing loaded
    assert len(feed(m, [dev("dev_create"), dev("dev_resume_begin"), dev("dev_swap")])) == 1


def test_control_plane():
    m = fresh("control_plane")
    assert len(feed(m, [dev("dev_create"), bio("bio_submit", 1), dev("dev_remove"),
                        bio("bio_submit", 2), dev("dev_remove")])) == 1
    m = fresh("control_plane")
    assert len(feed(m, [dev("dev_create"), dev("dev_remove"), dev("dev_remove")])) == 1
    m = fresh("control_plane")        # a minor reused by a new device is a new device
    assert not feed(m, [dev("dev_create"), dev("dev_remove"), dev("dev_create"),
                        bio("bio_submit", 1), dev("dev_remove")])


def test_target_types():
    t = lambda ev: (ev, {"type": "era"})      # noqa: E731
    m = fresh("target_types")
    assert not feed(m, [t("target_get"), t("target_get"), t("target_put"), t("target_put"),
                        t("target_unload")])
    m = fresh("target_types")
    assert len(feed(m, [t("target_get"), t("target_unload")])) == 1
    m = fresh("target_types")
    assert len(feed(m, [t("target_put")])) == 1


def test_deadline_clock_expires_only_in_the_guarded_state():
    m = fresh("deadline", flush_timeout=0.05, remove_timeout=0.05)
    feed(m, [bio("bio_submit", 1, op=FLUSH), bio("bio_submit", 2, op=WRITE, flags=REQ_FUA),
             bio("bio_submit", 3, op=WRITE, flags=0), bio("bio_requeue", 2),
             bio("bio_complete", 3)])
    assert m.expire(time.monotonic()) is not None and not m.violations
    assert m.expire(time.monotonic() + 1) is None
    assert [v.key for v in m.violations] == [(0, 1)]          # the held FUA is not in flight
    assert "clk < 0.05" in str(m.violations[0])
    feed(m, [bio("bio_complete", 1)])                          # reported once only
    assert len(m.violations) == 1


def test_deadline_watchdog_reports_a_stuck_remove():
    m = fresh("deadline", remove_timeout=0.05)
    clock = Clock()
    m.clock = clock
    clock.monitors.append(m)
    try:
        feed(m, [("dev_remove_begin", {"dev": "x", "minor": 99})])
        t0 = time.monotonic()
        while not m.violations and time.monotonic() - t0 < 5:
            time.sleep(0.01)        # a bounded wait for the watchdog, not ordering
        assert len(m.violations) == 1 and "removing" in str(m.violations[0])
    finally:
        clock.stop()


def test_session_rejects_bad_names():
    s = Session()
    with pytest.raises(RVError, match="unknown monitor 'nope'"):
        s.enable("nope")
    with pytest.raises(RVError, match="unknown reactor 'panic'"):
        s.enable("bio_once", reactor="panic")
    with pytest.raises(RVError, match="not enabled"):
        s.set_reactor("bio_once", "log")
    s.close()


def test_real_device_run_is_quiet_and_seen(tmp_path, rv_session):
    make_image(tmp_path / "a.img", 1 << 20)
    before = {n: m.events_seen for n, m in rv_session.monitors.items() if n != "lockdep"}
    c = Control()
    d = c.create("v", f"0 2048 linear {tmp_path}/a.img 0\n")
    for s in range(0, 256, 8):
        assert do_io(d, WRITE, s, data=b"v" * 4096)[0] == 0
        assert do_io(d, READ, s, 8)[0] == 0
    assert do_io(d, FLUSH, 0, 0)[0] == 0
    c.suspend("v")
    c.load("v", f"0 1024 linear {tmp_path}/a.img 0\n")
    c.resume("v")
    c.shutdown()
    seen = {n: m.events_seen - before[n] for n, m in rv_session.monitors.items()
            if n in before}
    assert all(seen[n] > 0 for n in ("bio_once", "dev_lifecycle", "inactive_slot",
                                     "control_plane", "target_types", "deadline")), seen
