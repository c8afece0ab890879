"""The writeboost engine: the state one target's threads share, the
admission of every store write, the sticky failure, syncs and reads; the
write path itself is ``logwriter``.

Rules of this module:

* One condition (``cond``, lock class "target") guards the ``CacheIndex``,
  the lifecycle and the queues.  It is never held while a bio completes or
  while a store's completion could need it: internal reads done with it held
  (a merge's old sectors) only wait on an Event; everything else is
  submitted after it is released.
* Every write of any kind to either store is admitted by ``begin_write``
  and ends with ``end_write``; ``fail`` refuses new admissions, waits for
  those in flight, then enters FAILED.  So after FAILED nothing reaches a
  store, and the log on the cache stays a prefix the next start replays.
  In FAILED, writes and flushes fail at once, reads go on from whatever
  still answers, and every waiter is woken with EIO.
* ``sync`` (suspend, drop_caches, the data synchroniser) seals only a
  segment that holds something: an idle device's sync is a cache FLUSH
  alone.
"""

import errno
import logging

from pydm import trace
from pydm.lockdep import make_condition
from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost.logwriter import Failed, LogWriter
from pydm.targets.writeboost.reads import ReadPlan
from pydm.targets.writeboost.state import Lifecycle
from pydm.devio import IOFailed

log = logging.getLogger("pydm.writeboost")


class Waiter:
    """An internal barrier: a flush the target itself waits for."""

    def __init__(self, cond):
        self.cond = cond
        self.status = None

    def complete(self, status):
        with self.cond:
            self.status = status
            self.cond.notify_all()


class Engine:
    def __init__(self, name, index, cache, backing, tunables):
        self.name = name
        self.index = index
        self.cache = cache               # DeviceIO
        self.backing = backing           # DeviceIO
        self.tunables = tunables
        self.cond = make_condition(name="target")
        self.life = Lifecycle()
        self.flusher = None              # set by the target: .add(item), .flush_written(upto)
        self.writeback = None            # set by the target: .kick()
        self.readcache = None
        self.writes_in_flight = 0
        self.failing = False
        self.forced = 0                  # drop_caches in progress
        self.urged = False
        self.on_fail = None              # fn(first_error), outside the lock
        self.writer = LogWriter(self)    # write, flush: the write path

    # --------------------------------------------------------- admission
    def begin_write(self) -> bool:
        with self.cond:
            if self.failing or self.life.failed:
                return False
            self.writes_in_flight += 1
            return True

    def end_write(self) -> None:
        with self.cond:
            self.writes_in_flight -= 1
            if not self.writes_in_flight:
                self.cond.notify_all()

    def admitted(self, op) -> bool:
        """Run ``op()``, a store write or flush, admitted by ``begin_write``;
        its failure FAILs the target.  False: not admitted, or it failed."""
        if not self.begin_write():
            return False
        try:
            op()
        except IOFailed as e:
            self.end_write()
            self.fail_io(e)
            return False
        self.end_write()
        return True

    def segment_written(self, seg_id, more: bool) -> bool:
        """The flusher's segment write ended well: end its admission, move
        ``last_flushed`` and wake waiters, and admit the next segment's write
        when ``more`` follow, all under one hold of the lock (writers hold
        it while they copy, so each taking costs the flusher a wait).
        Returns whether the next write was admitted."""
        with self.cond:
            self.writes_in_flight -= 1
            self.index.last_flushed = seg_id
            self.cond.notify_all()
            if self.urged:              # a writer waits for a slot this segment's
                self.writeback.kick()   # writeback frees: it can go now
            if not more or self.failing or self.life.failed:
                return False
            self.writes_in_flight += 1
            return True

    def fail(self, err, store, op, sector) -> None:
        """Enter FAILED (once): no write is admitted from here on."""
        with self.cond:
            if self.failing or self.life.failed:
                self.life.errors += 1
                return
            self.failing = True
            while self.writes_in_flight:
                self.cond.wait()
            first = self.life.fail(err, store, op, sector)
            if first and trace.on.wb_fail:
                trace.emit("wb_fail", eng=id(self), errno=err, store=store, op=op, sector=sector)
            self.failing = False
            self.cond.notify_all()
        if first:
            log.error("writeboost %s: %s: FAILED; writes and flushes fail from now on, "
                      "reads go on; remove the device and fix the store, then create it "
                      "again (it replays the log)", self.name, self.life.first_error)
            if self.on_fail is not None:
                self.on_fail()

    def fail_io(self, e: IOFailed) -> None:
        self.fail(e.errno, e.role, e.op, e.sector)

    def sync(self) -> int:
        """Make every write taken so far durable (suspend, drop_caches, the
        data synchroniser); the status (0 or EIO).  Unlike a client's flush
        it seals only a segment that holds something: an idle device's sync
        is a cache FLUSH alone, and takes no slot."""
        with self.cond:
            if not self.life.active:
                return errno.EIO
            if self.index.current_open and self.index.length_of_current():
                w = Waiter(self.cond)
                try:
                    self.writer.seal([w])
                except Failed:
                    return errno.EIO
                while w.status is None and not self.life.failed:
                    self.cond.wait(1.0)
                return w.status if w.status is not None else errno.EIO
            try:
                upto = self.index.last_sealed
                self.wait_flushed(upto)
            except Failed:
                return errno.EIO
        # through the flusher: it counts what is durable
        return 0 if self.admitted(lambda: self.flusher.flush_written(upto)) else errno.EIO

    def wait_flushed(self, seg_id) -> None:
        """Until segment ``seg_id`` is on the cache device (cond held)."""
        while self.index.last_flushed < seg_id:
            if not self.life.active:
                raise Failed()
            self.cond.wait(1.0)

    # ------------------------------------------------------------- reads
    def read(self, bio, rel: int):
        """A ReadPlan for ``bio`` (None: it all lives on the backing device,
        so remap it there)."""
        with self.cond:
            return ReadPlan.make(self, bio, rel)

    # ------------------------------------------------- other write paths
    def write_around(self, bio, rel: int) -> None:
        """write_around_mode: the write goes to the backing device; copies
        the cache holds of its blocks are dropped (they are clean: the cache
        is formatted at every start in this mode)."""
        if not bio.nr_sectors:
            return
        first = rel // L.BLOCK_SECTORS
        last = (rel + bio.nr_sectors - 1) // L.BLOCK_SECTORS
        with self.cond:
            for block in range(first, last + 1):
                idx = self.index.lookup(block)
                if idx >= 0:
                    self.index.unlink(idx)
                elif self.readcache is not None:
                    self.readcache.cancel(block)

    def inject_clean(self, batch) -> int:
        """Read-cached blocks into the log as clean blocks; stops at the
        first that would have to wait for room.  Returns how many went in."""
        index = self.index
        n = 0
        with self.cond:
            for block, data in batch:
                if not self.life.active:
                    break
                if index.lookup(block) >= 0:
                    continue                 # written meanwhile: newer than ours
                if not index.free_in_current():
                    if index.current_open:
                        self.writer.seal([])
                    if index.may_open_next():
                        break
                    index.open_next()
                idx = index.take(block, L.FULL, False)
                buf, at = index.ram_copy(idx)
                buf[at:at + L.BLOCK] = data
                n += 1
        return n
