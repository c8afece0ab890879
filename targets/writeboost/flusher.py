"""The flush task: sealed segments onto the cache device, in id order, and
the barriers acknowledged only when they are durable.

Rules of this module:

* Runs on its own ``pydm.worker.Worker`` thread (lock class "wb.flush",
  taken after the target's lock when a segment is queued).  A round takes
  every segment sealed since the last one and writes them in id order from
  their RAM buffers (header block and used data blocks): each alone, or,
  on a cache that takes gathered writes (a file), full segments in
  consecutive slots up to ``MAX_GROUP`` in one pwritev.  ``last_flushed``
  moves after each write, in the same taking of the target's lock that
  ends the write's admission and admits the next (writers hold that lock
  while they copy: each taking costs a wait), so a writer waiting for a
  RAM buffer goes on at once; it never passes a segment that is not on
  the cache device.  While a writer urges writeback, each move kicks it (the
  segment whose slot the writer needs may only now be there to write
  back).  If any segment of the round carries a barrier, the cache
  device is FLUSHed once after all of them are written, and only then are
  the barriers acknowledged.
* A slot is overwritten only once the dirty blocks its old segment lost to
  newer writes are durable in those newer segments: such a block was never
  written home, so if the newer segment were still volatile when the old
  one is overwritten, a power cut that kept the new write and lost the
  newer segment (allowed without a FLUSH between them) would lose a block
  an acknowledged flush covered, the old copy and the newer one both gone.
  Each segment carries the newest segment that must be durable first
  (``CacheIndex.open_next``); when that is past what the flusher last
  FLUSHed, it FLUSHes the cache before writing it.  Only an old segment
  that may be durable has a copy to keep: one FLUSHed (``durable``), or
  found by replay (an acknowledged flush may have covered it).  An old
  segment never FLUSHed held no acknowledged write, nor any copy a FLUSH
  was needed for: the slot of the copy before it was reused first, and
  would have FLUSHed it.  So a log that never sees a client flush never
  FLUSHes for this; ``durable`` is read when each write starts, never for
  a whole round (a FLUSH for one group may make the next need one).  To
  keep that off the write path, a second thread (lock class
  "wb.preflush") FLUSHes the cache ahead of need once a slot due within a
  quarter of the log (of 16 segments or more) will need it by that rule;
  ``durable`` only grows, whichever thread FLUSHed.
* A failed segment write or cache FLUSH makes the target FAILED; the
  segment and every later one stay unflushed, and their barriers get EIO.
  Once FAILED, nothing is written: queued segments only have their
  barriers failed.
"""

import errno

from pydm import trace
from pydm.worker import Worker
from pydm.devio import IOFailed
from pydm.targets.writeboost import layout as L

MAX_GROUP = 8            # segments (4 MiB) in one gathered write at most


def write_runs(batch, slot_of, gathers: bool, most: int = MAX_GROUP):
    """The round's ``(segment id, bytes, barriers, durable before)`` as runs
    written with one call each: where the cache takes gathered writes, full
    segments in consecutive slots, up to ``most`` (a short segment may end a
    run, never be followed in it: its end is not the next slot's start; a
    segment that needs one of its run durable first starts a new run); else
    one segment a run."""
    if not gathers:
        return [[item] for item in batch]
    runs = []
    for item in batch:
        run = runs[-1] if runs else None
        if (run is not None and len(run) < most and run[-1][1] == L.SEGMENT_BYTES
                and slot_of(item[0]) == slot_of(run[-1][0]) + 1
                and item[3] < run[0][0]):
            run.append(item)
        else:
            runs.append([item])
    return runs


class Flusher:
    def __init__(self, engine, name):
        self.engine = engine
        self.worker = Worker(f"pydm-wb-flush {name}", self._process, send=self._ack,
                             lock_class="wb.flush")
        self.durable = 0       # segments up to this one were written and FLUSHed
        # FLUSHes ahead of need, on their own thread: see _flush_ahead
        self.ahead = Worker(f"pydm-wb-preflush {name}", lambda _b: None,
                            step=self._flush_ahead, lock_class="wb.preflush")
        n = self.nr_segments = engine.index.geo.nr_segments
        self.ahead_lag = n // 4 if n >= 16 else 0          # (never, in a tiny log)
        # segments up to this one were on the cache at start: any may have
        # been covered by an acknowledged flush
        self.replayed = engine.index.last_flushed

    def start(self):
        self.worker.start()
        self.ahead.start()

    def stop(self):
        self.ahead.stop()
        self.worker.stop()

    def add(self, item):
        """Queue (segment id, bytes to write, barriers, the segment that must
        be durable before this one is written); called with the target's
        lock held, in id order."""
        self.worker.add(item)

    def _process(self, batch):
        eng = self.engine
        index = eng.index
        barriers = [b for _i, _n, bs, _d in batch for b in bs]
        err = None
        written = 0
        groups = write_runs(batch, index.geo.slot_of, eng.cache.gathers)
        admitted = eng.begin_write()
        for i, group in enumerate(groups):
            if not admitted:
                break
            try:
                if max(self._first_durable(s, d) for s, _n, _bs, d in group) > self.durable:
                    self._flush(index.last_flushed)
                if trace.on.wb_store_io:
                    for seg_id, _n, _bs, _d in group:
                        trace.emit("wb_store_io", eng=id(eng), store="cache", op="write",
                                   seg=seg_id)
                offset = index.geo.segment_offset(group[0][0])
                bufs = [index.buffer_of(seg_id)[:nbytes] for seg_id, nbytes, _bs, _d in group]
                if len(bufs) == 1:
                    eng.cache.write(offset, bufs[0])
                else:
                    eng.cache.write_gather(offset, bufs)
            except IOFailed as e:
                err = e
                eng.end_write()
                break
            written = group[-1][0]
            if not barriers and self._durable_soon_needed(written):
                self.ahead.kick()           # (with barriers: FLUSHed below)
            # one taking of the lock: the write ends, last_flushed moves (a
            # writer waiting for those RAM buffers goes on at once), the
            # next write is admitted
            admitted = eng.segment_written(written, i + 1 < len(groups))
        if err is not None:
            eng.fail_io(err)
        ok = err is None and written == batch[-1][0]
        if ok and barriers:
            ok = eng.admitted(lambda: self._flush(written))
        return [(b, 0 if ok else errno.EIO) for b in barriers] or None

    def _kept_upto(self) -> int:
        """Old segments up to this one may hold a copy that must be kept
        until its newer copies are durable (see the module's rules)."""
        return max(self.durable, self.replayed)

    def _first_durable(self, seg_id, before) -> int:
        """The segment that must be durable before ``seg_id`` is written
        (``before``, its slot's newest superseding segment), or 0 when the
        slot's old segment was never durable."""
        return before if seg_id - self.nr_segments <= self._kept_upto() else 0

    def _durable_soon_needed(self, written) -> bool:
        """Whether a segment due within ``ahead_lag`` of ``written`` will
        reuse a slot whose dropped dirty blocks' newer copies are not yet
        durable (read without the target's lock: a stale value only moves
        a FLUSH ahead of need, or leaves it to the write that needs it)."""
        sup = self.engine.index.superseded_np
        n = len(sup)
        # segments written + j, j <= k, whose old segment may be durable
        k = min(self.ahead_lag, self._kept_upto() + n - written)
        if k <= 0:
            return False
        first = written % n                 # the slot of segment written + 1
        end = first + k
        if end <= n:
            newest = sup[first:end].max()
        else:
            newest = max(sup[first:].max(), sup[:end - n].max())
        return newest > self.durable

    def _flush_ahead(self) -> bool:
        """A cache FLUSH off the flusher's thread, once a slot due within a
        quarter of the log will need one: by the time the slot is reused its
        newer copies are durable, and the flusher wrote on meanwhile (a
        file's fdatasync writes back everything dirty: for a log that never
        saw a client flush, the whole log)."""
        eng = self.engine
        upto = eng.index.last_flushed    # written: a FLUSH issued now covers them
        if upto > self.durable:
            eng.admitted(lambda: self._flush(upto))
        return False

    def flush_written(self, upto):
        """FLUSH the cache (admitted by the caller): segments up to ``upto``,
        all written, become durable."""
        self._flush(upto)

    def _flush(self, upto):
        """See ``flush_written``."""
        eng = self.engine
        if trace.on.wb_store_io:
            trace.emit("wb_store_io", eng=id(eng), store="cache", op="flush")
        eng.cache.flush()
        # two threads may FLUSH at once: durable only grows (a lost update
        # leaves it lower, which only costs an extra FLUSH)
        if upto > self.durable:
            self.durable = upto
        if trace.on.wb_durable:
            trace.emit("wb_durable", eng=id(eng), seg=upto)

    @staticmethod
    def _ack(acks):
        for barrier, status in acks:
            if trace.on.wb_ack:
                trace.emit("wb_ack", bar=getattr(barrier, "id", -id(barrier)), status=status)
            barrier.complete(status)
