"""Asynchronous file reads on one thread's io_uring: a read that is not in the
page cache goes to the disk without holding up the thread that asked for it.

Rules of this module:

* A ``Ring`` belongs to the thread that made it (an NBD connection's reader)
  and is used from that thread only, so the I/O path takes no lock.  The
  thread installs it (``install``) for the code below it: a store asked to
  read with ``REQ_NOWAIT`` uses ``current()``, as a kernel driver uses the
  task's plug.  Any other thread has no ring, and such a read answers
  EAGAIN instead of blocking.
* ``read`` queues one read and returns at once; its callback runs later on
  the owning thread, inside ``reap``, with the byte count or ``-errno``.
  Nothing else ever calls it, and it is called exactly once.
* The owner reaps whenever it would otherwise block: ``wait(fd)`` waits for
  a readable socket *or* a completion (``poll`` on both, the GIL released),
  and ``drain`` waits for every read in flight (before the owner waits for
  anything else, and before it goes away), so a completion is never left
  for a thread that is not coming back.
* Each read's buffer and iovec are held here until its completion is
  reaped: the kernel writes into them until then.
* With one read in flight and the caller's say-so (a client waiting for
  that read alone), ``wait`` first spins
  on the completion queue for up to ``spin`` seconds before it sleeps in
  ``poll``: a disk read takes tens of microseconds here, and waking a
  sleeping thread costs about as much again.  Adaptive, as the NBD
  reader's socket polling: the window doubles (up to ``SPIN_MAX``) while
  the read came within it and drops to nothing after a longer wait (a slow
  disk costs no CPU).
* The owner must never block on anything that waits for one of its own
  queued reads (only ``wait`` and ``drain`` reap them).  The NBD reader
  blocks in a receive, which waits through ``wait``; in an admission wait,
  which ``drain``s first; and in its own synchronous I/O (a write, a
  flush, a large read), which waits for no read of the ring.
* Lock (a leaf, from ``pydm.lockdep``): ``aio.stats`` guards the set of open
  rings, taken when a ring opens or closes and by ``stats``.
* The ring is the ``liburing`` binding's (io_uring(7)); where it cannot be
  made (no module, a kernel or sandbox without io_uring) ``open_ring``
  answers None and reads stay synchronous, as they were before.
"""

import errno
import logging
import os
import select
import threading
from time import perf_counter as _clock

from pydm.adaptive import next_window
from pydm.lockdep import make_lock

log = logging.getLogger("pydm.aio")

RING_ENTRIES = 256            # submission slots; more reads wait for a submit
COLD_AFTER = 4                # page cache misses in a row before reads skip the probe
PROBE_EVERY = 8               # then one read in this many still probes
SPIN_MAX = 200e-6             # s the owner spins on one read in flight before it sleeps
SPIN_START = 25e-6            # the first window once a read came that fast
_local = threading.local()
_stats_lock = make_lock("aio.stats")    # a leaf: the set of open rings, at open and close
_open = set()
_closed_queued = 0
_uring = None                 # the liburing module once imported, False if absent
_refused = None               # why io_uring is unusable here (logged once)


def _liburing():
    global _uring
    if _uring is None:
        try:
            import liburing
            _uring = liburing
        except ImportError:
            _uring = False
    return _uring


def available() -> bool:
    """Whether rings can be made here (answered once, by trying)."""
    ring = open_ring(4)
    if ring is None:
        return False
    ring.close()
    return True


def open_ring(entries: int = RING_ENTRIES):
    """A new ring for the calling thread, or None where io_uring is unusable."""
    global _refused
    if _refused is not None:
        return None
    u = _liburing()
    if not u:
        _refused = "the liburing module is not installed"
        log.info("asynchronous reads off: %s", _refused)
        return None
    try:
        return Ring(u, entries)
    except OSError as e:
        _refused = f"io_uring refused: {os.strerror(e.errno) if e.errno else e}"
        log.info("asynchronous reads off: %s", _refused)
        return None


def stats() -> dict:
    """Rings open now, and reads queued on rings since the process began
    (what went to the disk through a ring rather than inline)."""
    with _stats_lock:
        rings = list(_open)
        queued = _closed_queued
    return {"rings": len(rings), "queued": queued + sum(r.queued_total for r in rings)}


def current():
    """The ring installed on the calling thread, or None."""
    return getattr(_local, "ring", None)


def install(ring) -> None:
    """Make ``ring`` (or None) the calling thread's ring."""
    _local.ring = ring


class Ring:
    """One thread's io_uring for file reads."""

    __slots__ = ("u", "ring", "cqe", "fd", "inflight", "next_id", "queued", "poller",
                 "closed", "misses", "skips", "queued_total", "spin", "__weakref__")

    def __init__(self, u, entries):
        self.u = u
        self.ring = u.Ring()
        self.cqe = u.Cqe()
        try:
            u.io_uring_queue_init(entries, self.ring)
        except OSError:
            raise
        except Exception as e:          # the binding's own errors: treat as refusal
            raise OSError(errno.ENOSYS, str(e)) from None
        self.fd = self.ring.ring_fd
        self.inflight = {}              # id -> (callback, arg, buffer, iovec)
        self.next_id = 1
        self.queued = 0                 # prepared, not yet submitted
        self.poller = None
        self.closed = False
        self.misses = 0                 # page cache probes missed in a row
        self.skips = 0                  # probes skipped since the last one
        self.queued_total = 0           # reads ever queued here (stats)
        self.spin = SPIN_START          # s to spin on a lone read before sleeping
        with _stats_lock:
            _open.add(self)

    def probe(self) -> bool:
        """Whether to ask the page cache first (a RWF_NOWAIT read, whose
        miss costs a readahead's setup) or queue the read at once: after
        ``COLD_AFTER`` misses in a row reads go straight to the ring (which
        serves a cached page inline too), with one probe in
        ``PROBE_EVERY`` to notice the data warming up."""
        if self.misses < COLD_AFTER:
            return True
        self.skips += 1
        if self.skips < PROBE_EVERY:
            return False
        self.skips = 0
        return True

    def probed(self, hit: bool) -> None:
        self.misses = 0 if hit else self.misses + 1

    @property
    def pending(self) -> int:
        """Reads queued or in flight (their callbacks not run yet)."""
        return len(self.inflight)

    def read(self, fd, buf, offset, callback, arg) -> None:
        """Read ``len(buf)`` bytes at ``offset`` of ``fd`` into ``buf``;
        ``callback(arg, result)`` runs on this thread once it is done.
        It goes to the kernel at once: holding reads back to submit a burst
        with one system call measured no better (IOPS and CPU per request
        within the noise, cold randread 4k QD16)."""
        u = self.u
        sqe = u.io_uring_get_sqe(self.ring)
        if sqe is None:                 # the submission queue is full: push it
            self.submit()
            sqe = u.io_uring_get_sqe(self.ring)
        iov = u.Iovec([buf])
        u.io_uring_prep_readv(sqe, fd, iov, offset)
        rid = self.next_id
        self.next_id = rid + 1
        u.io_uring_sqe_set_data64(sqe, rid)
        self.inflight[rid] = (callback, arg, buf, iov)
        self.queued += 1
        self.queued_total += 1
        self.submit()

    def submit(self) -> None:
        if self.queued:
            self.queued = 0
            self.u.io_uring_submit(self.ring)

    def reap(self) -> int:
        """Run the callbacks of every completed read; how many ran."""
        u = self.u
        ring = self.ring
        n = u.io_uring_cq_ready(ring)
        if not n:
            if not self.inflight or not u.io_uring_cq_has_overflow(ring):
                return 0
            # More completions than the queue holds: the kernel kept the
            # rest aside, and hands them over when asked.
            u.io_uring_get_events(ring)
            n = u.io_uring_cq_ready(ring)
            if not n:
                return 0
        cqe = self.cqe
        inflight = self.inflight
        done = []
        for _ in range(n):
            u.io_uring_peek_cqe(ring, cqe)
            e = cqe[0]
            try:
                res = e.res
            except OSError as err:          # the binding raises a failed result
                res = -(err.errno or errno.EIO)
            done.append((e.user_data, res))
            u.io_uring_cq_advance(ring, 1)
        for rid, res in done:
            callback, arg, _buf, _iov = inflight.pop(rid)
            try:
                callback(arg, res)
            except Exception:
                log.exception("read completion failed")
        return n

    def wait(self, fd, spin=True) -> bool:
        """Block until ``fd`` is readable (True) or some reads have completed
        and their callbacks have run (False: the caller sends what they
        produced and waits again).  With nothing in flight, True at once.
        ``spin``: whether a lone read may be spun on (the caller knows
        whether anyone waits for it alone)."""
        if self.queued:
            self.submit()
        lone = spin and len(self.inflight) == 1
        if self.reap():
            if lone:
                self._adapt(0.0)            # a spin would have caught it
            return False
        if not self.inflight:
            return True
        start = _clock() if lone else 0.0
        if lone and self.spin:
            if self._spin(start + self.spin):
                self._adapt(_clock() - start)
                return False
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        poller.register(fd, select.POLLIN)
        try:
            while True:
                ready = poller.poll()
                if self.reap():
                    if lone:
                        self._adapt(_clock() - start)
                    return False
                for f, _ev in ready:
                    if f == fd:
                        return True
        finally:
            poller.unregister(fd)

    def _spin(self, end) -> bool:
        """Spin on the completion queue until ``end``; True once the
        completions that came were reaped."""
        ready, ring = self.u.io_uring_cq_ready, self.ring
        while _clock() < end:
            if ready(ring):
                return self.reap() > 0
        return False

    def _adapt(self, waited) -> None:
        self.spin = next_window(self.spin, waited, SPIN_START, SPIN_MAX)

    def drain(self) -> None:
        """Block until every read in flight has completed and been reaped."""
        poller = self.poller
        if poller is None:
            poller = self.poller = select.poll()
            poller.register(self.fd, select.POLLIN)
        if self.queued:
            self.submit()
        while self.inflight:
            if not self.reap():
                poller.poll()

    def close(self) -> None:
        """Drain, then free the ring."""
        if self.closed:
            return
        global _closed_queued
        self.drain()
        self.closed = True
        self.u.io_uring_queue_exit(self.ring)
        with _stats_lock:
            _open.discard(self)
            _closed_queued += self.queued_total
