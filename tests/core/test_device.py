"""Device lifecycle, suspend/resume with I/O in flight, noflush requeue, quiesce."""

import errno
import random
import threading
import time

import pytest

from helpers import Waiter, do_io, make_image
from pydm import trace
from pydm.bio import Bio, READ, WRITE
from pydm.control import Control
from pydm.errors import DMError
from pydm.target import REMAPPED, REQUEUE, Target
from pydm.targets.delay import DelayTarget


class Slow(DelayTarget):
    """slow <store>: delay's timer queue (5 ms) without its presuspend flush,
    so a suspend really has to wait for the held bios to finish."""

    name = "slow"

    def ctr(self, args):
        super().ctr([args[0], "0", "5"])

    def presuspend(self):
        pass


class Bounce(Target):
    """bounce <store>: hands every bio back (REQUEUE) while ``bouncing``."""

    name = "bounce"
    bouncing = True

    def ctr(self, args):
        self.dev = self.ctx.get_device(args[0])

    def map(self, bio):
        if Bounce.bouncing:
            return REQUEUE
        bio.dev = self.dev
        return REMAPPED


@pytest.fixture
def control(tmp_path):
    c = Control()
    c.targets.register(Slow)
    c.targets.register(Bounce)
    make_image(tmp_path / "a.img", 4 << 20)
    make_image(tmp_path / "b.img", 4 << 20)
    c.cwd = str(tmp_path)
    yield c
    c.shutdown()
    assert c.stores.open_count() == 0


def refused(fn, err):
    with pytest.raises(DMError) as e:
        fn()
    assert e.value.errno == err


def test_lifecycle_and_refusals_leave_state_unchanged(control):
    c = control
    dev = c.create("d")
    assert dev.state == "NEW"
    refused(lambda: c.suspend("d"), errno.EINVAL)
    c.resume("d")                                 # nothing to do: a no-op
    assert dev.state == "NEW"
    refused(lambda: c.create("d"), errno.EBUSY)
    c.load("d", "0 8 zero\n", cwd=c.cwd)
    assert dev.inactive is not None and dev.live is None
    c.clear("d")
    assert dev.inactive is None
    c.load("d", "0 8 zero\n")
    c.resume("d")
    assert dev.state == "ACTIVE" and dev.live is not None and dev.inactive is None
    c.suspend("d")
    c.suspend("d")                                # already suspended: no-op
    assert dev.state == "SUSPENDED"
    c.resume("d")
    assert dev.state == "ACTIVE"
    refused(lambda: c.message("d", 0, "hello"), errno.EINVAL)
    refused(lambda: c.message("d", 8, "hello"), errno.EINVAL)
    refused(lambda: c.rename("d", "bad/name"), errno.EINVAL)
    c.rename("d", "e")
    refused(lambda: c.info("d"), errno.ENXIO)
    c.remove("e")
    assert dev.state == "REMOVED"
    refused(lambda: c.remove("e"), errno.ENXIO)
    refused(lambda: dev.resume(), errno.ENXIO)
    refused(lambda: dev.suspend(), errno.ENXIO)
    assert do_io(dev, READ, 0, 8)[0] == errno.EIO


def test_suspend_with_io_in_flight(control):
    """No bio completes after suspend returns; none is lost; all held ones finish after resume."""
    c = control
    dev = c.create("d", "0 8192 slow a.img\n", cwd=c.cwd)
    lock = threading.Lock()
    completions = []            # (time, bio id, status)
    submitted = []
    stop = threading.Event()

    def on_done(bio):
        with lock:
            completions.append((time.monotonic(), bio.id, bio.status))

    def writer(n):
        rnd = random.Random(n)
        while not stop.is_set():
            sector = rnd.randrange(0, 8192 // 8) * 8
            payload = bytes([rnd.randrange(256)]) * 4096
            b = Bio(WRITE, sector, 8, memoryview(bytearray(payload)), 0, on_done)
            with lock:
                submitted.append(b.id)
            dev.submit(b)
            time.sleep(rnd.uniform(0, 0.004))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    try:
        for _ in range(8):
            time.sleep(0.05)
            c.suspend("d")
            t_suspended = time.monotonic()
            assert dev.inflight == 0
            time.sleep(0.1)           # bios keep arriving; they must be held
            with lock:
                late = [x for x in completions if x[0] > t_suspended]
            assert not late, f"{len(late)} bios completed while suspended"
            assert dev.info()["deferred"] > 0
            c.resume("d")
    finally:
        stop.set()
        for t in threads:
            t.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with lock:
            if len(completions) == len(submitted):
                break
        time.sleep(0.01)
    ids = [i for _t, i, _s in completions]
    assert len(ids) == len(set(ids)), "a bio completed twice"
    assert set(ids) == set(submitted), "a bio was lost"
    assert all(s == 0 for _t, _i, s in completions)
    assert len(submitted) > 500


def test_noflush_suspend_holds_requeued_bios_until_resume(control):
    c = control
    Bounce.bouncing = True
    dev = c.create("d", "0 64 bounce a.img\n", cwd=c.cwd)
    # not suspending: a requeue is an I/O error
    assert do_io(dev, READ, 0, 8)[0] == errno.EIO
    # noflush suspend: requeued bios are held, then re-run through the new table
    waiters = []

    def submit_some():
        for s in range(0, 64, 8):
            w = Waiter()
            dev.submit(Bio(WRITE, s, 8, memoryview(bytearray(b"q" * 4096)), 0, w))
            waiters.append(w)

    dev.noflush_suspending = True        # as the first step of a noflush suspend does
    submit_some()
    dev.noflush_suspending = False
    c.suspend("d", noflush=True)
    assert dev.info()["deferred"] == 8
    assert not any(w.event.is_set() for w in waiters)
    c.load("d", "0 64 linear b.img 0\n", cwd=c.cwd)
    c.resume("d")
    assert [w.wait() for w in waiters] == [0] * 8
    with open(c.cwd + "/b.img", "rb") as f:
        assert f.read(64 * 512) == b"q" * 64 * 512


def test_quiesce_drains_and_holds(control):
    c = control
    dev = c.create("d", "0 8192 slow a.img\n", cwd=c.cwd)
    waiters = []
    for s in range(0, 800, 8):
        w = Waiter()
        dev.submit(Bio(WRITE, s, 8, memoryview(bytearray(4096)), 0, w))
        waiters.append(w)
    with dev.quiesce():
        assert dev.inflight == 0
        assert all(w.event.is_set() for w in waiters)
        late = Waiter()
        dev.submit(Bio(READ, 0, 8, memoryview(bytearray(4096)), 0, late))
        time.sleep(0.05)
        assert not late.event.is_set()
        with dev.quiesce():                       # nests
            pass
        assert not late.event.is_set()
    assert late.wait() == 0


def test_deferred_bio_is_traced_held_before_a_resume_resubmits_it(control, rv_session):
    """A resume racing a deferring submit must not let the bio's bio_submit
    be traced before its bio_defer (CI once saw exactly that)."""
    c = control
    c.create("d", "0 64 linear a.img 0\n", cwd=c.cwd)
    c.suspend("d")
    racers = []

    def race_resume(fields):
        # Runs inside submit's bio_defer emit: resume as soon as it can.
        if fields["event"] == "bio_defer" and not racers:
            t = threading.Thread(target=c.resume, args=("d",))
            racers.append(t)
            t.start()
            t.join(0.2)

    # bio_once runs for the whole suite (tests/conftest.py): a bio_submit
    # seen before its bio_defer would be reported and fail this test
    trace.attach(race_resume, ("bio_defer",))
    try:
        status, _ = do_io(c.get("d"), READ, 0, 8)
        racers[0].join(10)
    finally:
        trace.detach(race_resume)
    assert status == 0
    assert rv_session.monitors["bio_once"].events_seen


def test_remove_refused_while_held_and_deferred_remove(control):
    c = control
    c.create("low", "0 64 linear a.img 0\n", cwd=c.cwd)
    c.create("up", "0 64 linear dm:low 0\n")
    refused(lambda: c.remove("low"), errno.EBUSY)
    c.remove("low", deferred=True)
    assert "low" in c.names()
    c.remove("up")
    deadline = time.monotonic() + 5
    while c.names() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.names() == []


def test_stacking_loop_refused(control):
    c = control
    c.create("a", "0 64 zero\n")
    c.create("b", "0 64 linear dm:a 0\n")
    refused(lambda: c.load("a", "0 64 linear dm:b 0\n"), errno.EINVAL)
    refused(lambda: c.load("a", "0 64 linear dm:a 0\n"), errno.EINVAL)


def test_preresume_failure_keeps_device_suspended(control):
    class Picky(Target):
        name = "picky"

        def preresume(self):
            raise DMError("not today")

    c = control
    c.targets.register(Picky)
    dev = c.create("d", "0 8 zero\n")
    c.load("d", "0 8 picky\n")
    refused(lambda: c.resume("d"), errno.EINVAL)
    assert dev.state == "SUSPENDED"
    w = Waiter()
    dev.submit(Bio(READ, 0, 8, memoryview(bytearray(4096)), 0, w))
    assert not w.event.wait(0.05)
    c.load("d", "0 8 zero\n")
    c.resume("d")
    assert w.wait() == 0


def test_wait_event(control):
    c = control
    dev = c.create("d", "0 8 zero\n")
    nr = dev.event_nr
    t = threading.Timer(0.05, dev.raise_event)
    t.start()
    assert c.wait("d", nr, timeout=5) == nr + 1
