"""A worker thread for a target: batched work items, calls from other
threads, group commit, a background step and an issuer thread.

A target that must do slow work (a metadata commit) before it lets bios go
on queues them here with ``add``; one thread takes everything queued as one
batch and hands it to the target's ``process``.  Other threads (messages,
status, NBD block status) run code on that thread with ``call``.  era uses
it; a write-back cache that logs writes before acknowledging them is the
same shape.

Rules of this module:

* One thread runs every round: it takes all queued items as one batch and
  every pending call, runs ``process(batch)``, sends what it returns on
  (``send``), runs the calls in the order they came, then, while a
  background step is asked for, one ``step()``.  Nothing else runs these
  callbacks while the worker is running, so the state they share needs no
  lock of its own.
* ``call(fn, *args)`` from another thread waits until the worker has run
  ``fn`` and returns its result or raises its error; both are stored before
  the waiter is woken.  On the worker thread itself, before ``start`` and
  after ``stop`` it runs ``fn`` inline, so a call can never wait for itself.
* ``add`` is the hot path: it takes the condition, appends the item, and
  notifies only when enough items wait (group commit's threshold).  Nothing
  else is done per item.
* Group commit: after ``process`` reports a commit (``note_commit(seconds,
  released)``), the next round waits before taking its batch for as many
  items as that commit released plus those already waiting, but never
  longer than the commit took, and not at all once a call or ``stop``
  comes.  A bounded wait costs no more than committing at once, which would
  split a queue into halves that take turns.
* With ``send``, a processed batch is sent inline when nothing else waits;
  else an issuer thread (started at the first such batch) sends it while
  the worker commits the next.  Batches are sent in the order processed:
  while the issuer still holds one, the next goes to it too.
* ``stop`` lets the worker finish the round under way and one more for what
  is queued, joins it, then the issuer, and runs inline what came too late:
  every item added and every call made before ``stop`` returns has been
  processed, sent or answered.  Call it once, never from the worker thread.
* The condition is the one lock: made by ``pydm.lockdep`` under the class
  the owner names ("target" for a target), held only for the queues, never
  while a callback runs.  ``process``, ``step`` and ``send`` handle their
  own errors; one that escapes is logged and the worker goes on.
"""

import logging
import queue
import threading
import time

from pydm import trace
from pydm.lockdep import make_condition, make_event

log = logging.getLogger("pydm.worker")


class _Call:
    __slots__ = ("fn", "args", "result", "error", "done")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args
        self.result = None
        self.error = None
        self.done = make_event()

    def run(self):
        try:
            self.result = self.fn(*self.args)
        except BaseException as e:       # handed to the caller, never lost
            self.error = e
        self.done.set()


class Worker:
    """One worker thread; see the module rules.

    ``process(batch)`` gets the items queued since the last round (a list)
    and returns what to ``send`` on (or None); ``step()`` does one piece of
    background work and returns whether more is left; ``send(batch)``
    passes a processed batch on (to the origin).
    """

    def __init__(self, name, process, step=None, send=None, lock_class="target"):
        self.name = name
        self.cond = make_condition(name=lock_class)
        self._process = process
        self._step = step
        self._send = send
        self._items = []
        self._calls = []
        self._stop = False
        self._thread = None
        self._wake_at = 1            # queued items that wake the worker
        self._expect = 0             # queued items that make a full batch
        self._commit_time = 0.0      # how long the last commit took (s)
        self._step_pending = False
        self._kicks = 0              # step requests (a kick during a step is kept)
        self._issuer = None
        self._issue_q = None
        self._queued = 0             # batches handed to the issuer (worker writes)
        self._sent = 0               # batches it has sent (issuer writes)

    # ---------------------------------------------------------- lifecycle
    @property
    def running(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Start the thread (nothing if it runs already)."""
        if self._thread is None:
            self._stop = False
            t = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread = t
            t.start()

    def stop(self) -> None:
        """Finish what is queued, then end the worker and the issuer."""
        t = self._thread
        if t is None:
            return
        with self.cond:
            self._stop = True
            self.cond.notify_all()
        t.join()
        with self.cond:
            self._thread = None          # from here on, calls run inline
            batch, self._items = self._items, []
            calls, self._calls = self._calls, []
        if self._issuer is not None:     # after the worker: it feeds the issuer
            self._issue_q.put(None)
            self._issuer.join()
            self._issuer = None
        if batch:
            self._round(batch)
        for call in calls:
            call.run()

    # ------------------------------------------------- from other threads
    def add(self, item) -> None:
        """Queue ``item`` for the next batch (the hot path)."""
        with self.cond:
            self._items.append(item)
            if len(self._items) >= self._wake_at:
                self.cond.notify()

    def add_many(self, items) -> None:
        """Queue several items at once, in order (one wake-up for all)."""
        with self.cond:
            self._items.extend(items)
            if len(self._items) >= self._wake_at:
                self.cond.notify()

    def call(self, fn, *args):
        """Run ``fn(*args)`` on the worker; its result, or its error raised."""
        t = self._thread
        if t is None or t is threading.current_thread():
            return fn(*args)
        call = _Call(fn, args)
        with self.cond:
            queued = self._thread is not None
            if queued:
                self._calls.append(call)
                self.cond.notify()
        if not queued:                   # stopped meanwhile
            return fn(*args)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def kick(self) -> None:
        """Ask for background steps: one a round until ``step`` says done."""
        with self.cond:
            self._step_pending = True
            self._kicks += 1
            self.cond.notify()

    @property
    def stepping(self) -> bool:
        """Background steps are asked for and not yet done."""
        return self._step_pending

    # ------------------------------------------------ from the worker thread
    def note_commit(self, seconds: float, released: int) -> None:
        """``process`` committed, taking ``seconds``, and releases
        ``released`` items: the next round gathers for them."""
        self._commit_time = seconds
        self._expect = len(self._items) + released

    # ------------------------------------------------------------ the loop
    def _run(self):
        cond = self.cond
        while True:
            with cond:
                while not (self._items or self._calls or self._stop or self._step_pending):
                    cond.wait()
                if self._items and self._expect:
                    self._gather()
                batch, self._items = self._items, []
                calls, self._calls = self._calls, []
                stop = self._stop
            if batch:
                self._round(batch)
            for call in calls:
                call.run()
            if stop:
                return
            # one step per round, even under load, so background work
            # (era's digest) never falls behind for good
            if self._step_pending:
                self._run_step()

    def _gather(self):
        """Group commit: wait for the items the last commit released (they
        come back as their clients' next requests), never longer than it
        took; a call or a stop ends the wait.  Called with ``cond`` held."""
        want, self._expect = self._expect, 0
        if trace.on.worker_gather:
            trace.emit("worker_gather", worker=self.name, want=want)
        deadline = time.monotonic() + self._commit_time
        self._wake_at = want             # add() wakes us only when all are here
        try:
            while len(self._items) < want and not (self._calls or self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.cond.wait(left)
        finally:
            self._wake_at = 1

    def _round(self, batch):
        try:
            out = self._process(batch)
        except Exception:
            log.exception("%s: processing a batch of %d failed", self.name, len(batch))
            return
        if out and self._send is not None:
            self._send_on(out)

    def _run_step(self):
        kicks = self._kicks
        try:
            more = self._step()
        except Exception:
            log.exception("%s: background step failed", self.name)
            more = False
        with self.cond:
            self._step_pending = bool(more) or self._kicks != kicks

    def _send_on(self, batch):
        """Send ``batch`` inline, or through the issuer when more items wait
        (their commit then overlaps these sends) or it still holds one."""
        if not self._items and self._sent == self._queued:
            self._send_safely(batch)
            return
        if self._issuer is None:
            self._issue_q = queue.SimpleQueue()
            self._issuer = threading.Thread(target=self._run_issuer,
                                            name=f"{self.name}-issue", daemon=True)
            self._issuer.start()
        self._queued += 1
        self._issue_q.put(batch)

    def _run_issuer(self):
        get = self._issue_q.get
        while True:
            batch = get()
            if batch is None:
                return
            self._send_safely(batch)
            self._sent += 1

    def _send_safely(self, batch):
        try:
            self._send(batch)
        except Exception:
            log.exception("%s: sending a batch of %d failed", self.name, len(batch))
