"""pydm.worker: calls across threads, inline calls, stop, group commit's
bounded wait, the background step and the issuer's order.  Ordering comes
from events and from the worker's own rounds, never from sleeps."""

import threading
import time

import pytest

from pydm.worker import Worker

T = 10                       # seconds any wait here may take before it is a failure


class Rig:
    """A worker and what it did: the batches it processed, those it sent
    and the threads that sent them.  ``on_process(rig, batch)`` and
    ``on_send(rig, batch)`` add behaviour to each."""

    def __init__(self, on_process=None, on_send=None, step=None):
        self.batches = []
        self.sent = []
        self.senders = []
        self.on_process = on_process
        self.on_send = on_send
        self.worker = Worker("test-worker", self._process, step=step, send=self._send)

    def _process(self, batch):
        self.batches.append(list(batch))
        if self.on_process is not None:
            self.on_process(self, batch)
        return batch

    def _send(self, batch):
        self.senders.append(threading.current_thread().name)
        if self.on_send is not None:
            self.on_send(self, batch)
        self.sent.append(list(batch))

    def items(self, batches):
        return [x for b in batches for x in b]

    def rounds_pass(self, until):
        """Let the worker run rounds (a call each) until ``until()``."""
        deadline = time.monotonic() + T
        while not until() and time.monotonic() < deadline:
            self.worker.call(lambda: None)
        return until()


@pytest.fixture
def rig():
    r = Rig()
    r.worker.start()
    yield r
    r.worker.stop()


def in_thread(fn, *args):
    """Run fn in a new thread: (thread, outcome list: ("ok", v) or ("err", e))."""
    out = []

    def run():
        try:
            out.append(("ok", fn(*args)))
        except BaseException as e:
            out.append(("err", e))
    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_calls_from_other_threads_return_results_and_raise_errors(rig):
    w = rig.worker

    def where(x):
        return x * 2, threading.current_thread().name

    def boom():
        raise KeyError("nope")
    runs = [in_thread(w.call, where, i) for i in range(8)] + [in_thread(w.call, boom)]
    for t, _out in runs:
        t.join(T)
    assert [out for _t, out in runs[:8]] == [[("ok", (2 * i, "test-worker"))] for i in range(8)]
    (kind, err), = runs[8][1]
    assert kind == "err" and isinstance(err, KeyError) and err.args == ("nope",)


def test_a_call_from_the_worker_runs_inline_and_so_before_start_and_after_stop():
    w = Rig().worker
    me = threading.current_thread()
    assert w.call(threading.current_thread) is me          # not started: inline
    w.start()
    # a call made by a call (on the worker) does not wait for itself
    inner, outer = w.call(lambda: (w.call(threading.current_thread), threading.current_thread()))
    assert inner is outer and inner.name == "test-worker"
    w.stop()
    assert not w.running and w.call(threading.current_thread) is me


def test_stop_finishes_the_queued_items_and_calls_first():
    busy, release = threading.Event(), threading.Event()

    def first_round_waits(rig, batch):
        if not busy.is_set():
            busy.set()
            release.wait(T)
    r = Rig(on_process=first_round_waits)
    w = r.worker
    w.start()
    w.add(1)
    assert busy.wait(T)                  # the worker is in its first round now
    w.add(2)
    w.add(3)
    caller, answer = in_thread(w.call, lambda: "answered")
    stopper, stopped = in_thread(w.stop)
    release.set()
    for t in (caller, stopper):
        t.join(T)
        assert not t.is_alive()
    assert stopped == [("ok", None)] and answer == [("ok", "answered")]
    assert r.items(r.batches) == r.items(r.sent) == [1, 2, 3]
    assert not w.running


def test_group_commit_gathers_as_many_as_released_without_waiting_out_the_commit(rig):
    w = rig.worker
    w.call(w.note_commit, 60.0, 3)       # a 60 s commit released 3 items
    t0 = time.monotonic()
    for i in range(3):
        w.add(i)
    assert rig.rounds_pass(lambda: rig.batches)
    assert rig.batches == [[0, 1, 2]] and time.monotonic() - t0 < T


def test_group_commit_wait_is_bounded_by_the_commit_time():
    processed = threading.Event()
    r = Rig(on_process=lambda rig, batch: processed.set())
    w = r.worker
    w.start()
    try:
        w.call(w.note_commit, 0.3, 100)  # 100 released; only one comes back
        t0 = time.monotonic()
        w.add("lone")
        assert processed.wait(T)
        assert 0.25 <= time.monotonic() - t0 < T and r.batches == [["lone"]]
        # the wait is over: a single item wakes the worker again, at once
        processed.clear()
        w.add("next")
        assert processed.wait(T) and r.batches[-1] == ["next"]
    finally:
        w.stop()


def test_a_call_ends_the_group_commit_wait(rig):
    w = rig.worker
    w.call(w.note_commit, 60.0, 100)
    t0 = time.monotonic()
    w.add("held")
    assert w.call(lambda: list(rig.batches)) == [["held"]]
    assert time.monotonic() - t0 < T


def test_the_background_step_runs_once_per_round_until_done():
    log = []
    done = threading.Event()

    def client(rig, batch):
        log.append("p")
        if len(log) < 10:
            rig.worker.add("again")      # a client sending its next request

    def step():
        log.append("s")
        more = log.count("s") < 10
        if not more:
            done.set()
        return more
    r = Rig(on_process=client, step=step)
    w = r.worker
    w.start()
    try:
        w.call(lambda: (w.kick(), w.add("first")))
        assert done.wait(T)
        w.call(lambda: None)             # a round after the last step
        assert not w.stepping
        assert "".join(log) == "s" + "ps" * 5 + "ssss"
    finally:
        w.stop()


def test_a_kick_during_a_step_is_not_lost():
    steps = []
    in_step, go_on = threading.Event(), threading.Event()

    def step():
        steps.append(1)
        if len(steps) == 1:
            in_step.set()
            go_on.wait(T)
        return False                     # "done", but a kick came meanwhile
    r = Rig(step=step)
    w = r.worker
    w.start()
    try:
        w.kick()
        assert in_step.wait(T)
        w.kick()
        go_on.set()
        assert r.rounds_pass(lambda: not w.stepping)
        assert len(steps) == 2
    finally:
        w.stop()


def test_the_issuer_sends_batches_in_the_order_processed():
    """Batch a goes to the issuer (b waits) and is held there; b and c
    must follow it through the issuer, although nothing waits behind c."""
    go, c_done = threading.Event(), threading.Event()

    def client(rig, batch):
        nxt = {"a": "b", "b": "c"}.get(batch[0])
        if nxt:
            rig.worker.add(nxt)
        else:
            c_done.set()

    def hold_a(rig, batch):
        if batch == ["a"]:
            go.wait(T)
    r = Rig(on_process=client, on_send=hold_a)
    w = r.worker
    w.start()
    try:
        w.add("a")
        assert c_done.wait(T)
        w.call(lambda: None)             # the round that processed c has sent it on
        go.set()
        assert r.rounds_pass(lambda: len(r.sent) == 3)
    finally:
        w.stop()
    assert r.sent == [["a"], ["b"], ["c"]]
    assert r.senders == ["test-worker-issue"] * 3


def test_a_batch_is_sent_inline_when_nothing_waits(rig):
    rig.worker.add("x")
    assert rig.rounds_pass(lambda: rig.sent)
    assert rig.sent == [["x"]] and rig.senders == ["test-worker"]


def test_callbacks_run_without_the_condition_held(rig):
    cond = rig.worker.cond

    def others_can_take_it():
        t, out = in_thread(lambda: cond.acquire(timeout=T) and (cond.release() or True))
        t.join(T)
        return out == [("ok", True)]
    assert rig.worker.call(others_can_take_it)
