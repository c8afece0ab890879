"""Runtime verifier: the models load, bad event logs are caught, real runs pass."""

import pytest

from helpers import do_io, make_image
from pydm import trace
from pydm.bio import READ, WRITE
from pydm.control import Control
from pydm.verify import dotmodel, monitor


def feed(mon, events):
    for ev, key in events:
        mon({"event": ev, "bio": key, "dev": key, "minor": key})


def test_models_load_and_are_deterministic():
    m = dotmodel.load("bio_once")
    assert m.initial == "new" and m.finals == {"done"}
    assert m.next("inflight", "bio_complete") == "done"
    assert m.next("done", "bio_complete") is None
    d = dotmodel.load("dev_lifecycle")
    assert d.next("new", "dev_suspended") is None


def test_parser_rejects_bad_models():
    with pytest.raises(dotmodel.ModelError, match="first line"):
        dotmodel.parse("graph x {}")
    bad = ('digraph state_automaton {\n{node [shape = plaintext, style=invis, label=""] '
           '"__init_a"};\n{node [shape = ellipse] "a"};\n{node [shape = ellipse] "b"};\n'
           '"__init_a" -> "a";\n"a" -> "b" [ label = "x" ];\n"a" -> "a" [ label = "x" ];\n}')
    with pytest.raises(dotmodel.ModelError, match="not deterministic"):
        dotmodel.parse(bad)


@pytest.mark.parametrize("events", [
    [("bio_submit", 1), ("bio_complete", 1), ("bio_complete", 1)],      # twice
    [("bio_submit", 1), ("bio_submit", 1)],                              # mapped twice
    [("bio_complete", 1), ("bio_requeue", 1)],                           # after done
])
def test_bio_once_flags_each_bad_log_exactly_once(events):
    m = monitor.bio_once()
    feed(m, events)
    m.end_check()
    assert len(m.violations) == 1, [str(v) for v in m.violations]


def test_bio_never_completed_is_caught_at_end():
    m = monitor.bio_once()
    feed(m, [("bio_submit", 7), ("bio_submit", 8), ("bio_complete", 8)])
    m.end_check()
    assert [v.key for v in m.violations] == [7]


def test_lifecycle_suspend_of_new_device_is_a_violation():
    m = monitor.dev_lifecycle()
    feed(m, [("dev_create", "a"), ("dev_suspended", "a")])
    assert len(m.violations) == 1
    m.violations.clear()
    feed(m, [("dev_create", "b"), ("dev_resumed", "b"), ("dev_suspended", "b"),
             ("dev_resumed", "b"), ("dev_remove", "b")])
    m.end_check()
    assert not m.violations


def test_real_device_run_passes_both_monitors(tmp_path):
    make_image(tmp_path / "a.img", 1 << 20)
    c = Control()
    with monitor.enabled("bio_once", "dev_lifecycle", reactor="raise") as mons:
        dev = c.create("v", f"0 2048 linear {tmp_path}/a.img 0\n")
        for s in range(0, 256, 8):
            assert do_io(dev, WRITE, s, data=b"v" * 4096)[0] == 0
            assert do_io(dev, READ, s, 8)[0] == 0
        c.suspend("v")
        c.resume("v")
        c.shutdown()
    assert all(not m.violations for m in mons)
    assert not trace._sinks
