"""The lock-order checker: ABBA found without a real deadlock, conditions, coverage."""

import threading

import pytest

from pydm import lockdep
from pydm.control import Control
from pydm.lockdep import make_condition, make_lock, make_rlock
from pydm.target import Target

pytestmark = pytest.mark.skipif(not lockdep.ENABLED, reason="needs PYDM_LOCKDEP=1")

class Abba(Target):
    """Test-only target with a deliberate lock inversion between two messages."""

    name = "abba"

    def ctr(self, args):
        self.a = make_lock("test.abba.A")
        self.b = make_lock("test.abba.B")

    def message(self, argv):
        first, second = (self.a, self.b) if argv[0] == "ab" else (self.b, self.a)
        with first:
            with second:
                return argv[0]


@pytest.fixture
def clean_graph():
    lockdep.reset()
    yield
    lockdep.reset()
    lockdep.set_reactor("record")


def test_abba_in_a_target_is_reported_with_both_stacks(clean_graph):
    c = Control()
    c.targets.register(Abba)
    c.create("x", "0 8 abba\n")
    assert c.message("x", 0, "ab") == "ab"
    assert not lockdep.reports
    # single-threaded, no deadlock happens: the checker still sees the cycle
    assert c.message("x", 0, "ba") == "ba"
    c.shutdown()
    [report] = [r for r in lockdep.reports if "ABBA" in r]
    assert "test.abba.B -> test.abba.A" in report
    assert "test.abba.A -> test.abba.B" in report
    assert report.count("in message") >= 2          # both stacks are shown
    lockdep.reports.clear()


def test_raise_reactor_stops_before_blocking(clean_graph):
    lockdep.set_reactor("raise")
    a, b = make_lock("test.r.A"), make_lock("test.r.B")
    with a, b:
        pass
    with b:
        with pytest.raises(lockdep.LockOrderError):
            a.acquire()
    assert not a.locked()
    lockdep.reports.clear()


def test_declared_order_violation(clean_graph):
    metadata = make_lock("metadata")
    control = make_rlock("dev.control")
    with metadata:
        with control:
            pass
    assert any("against the declared order" in r for r in lockdep.reports)
    lockdep.reports.clear()


def test_recursion_and_rlock(clean_graph):
    r = make_rlock("test.rl")
    with r, r:
        pass
    assert not lockdep.reports
    one, two = make_lock("test.same"), make_lock("test.same")
    with one, two:
        pass
    assert any("recursive locking of one class" in x for x in lockdep.reports)
    lockdep.reports.clear()
    one2, two2 = make_lock("test.nest"), make_lock("test.nest").nested(1)
    with one2, two2:
        pass
    assert not lockdep.reports


def test_condition_wait_keeps_the_held_stack_right(clean_graph):
    lock = make_lock("test.cond")
    cond = make_condition(lock)
    other = make_lock("test.after")
    ready = []

    def waker():
        with cond:
            ready.append(1)
            cond.notify()

    with cond:
        threading.Thread(target=waker).start()
        assert cond.wait_for(lambda: ready, 5)
        with other:
            pass
    with other:
        pass
    assert not lockdep.reports
    r = make_rlock("test.rcond")
    rc = make_condition(r)
    with r, r:
        threading.Timer(0.01, lambda: (r.acquire(), rc.notify(), r.release())).start()
        rc.wait(5)
        assert r._count == 2
    assert not lockdep.reports
