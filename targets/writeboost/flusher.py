"""The flush task: sealed segments onto the cache device, in id order, and
the barriers acknowledged only when they are durable.

Rules of this module:

* Runs on its own ``pydm.worker.Worker`` thread (lock class "wb.flush",
  taken after the target's lock when a segment is queued).  A round takes
  every segment sealed since the last one and writes each with one bio from
  its RAM buffer (header block and used data blocks), in id order, moving
  ``last_flushed`` after each (so a writer waiting for that RAM buffer goes
  on at once); ``last_flushed`` never passes a segment that is not on the
  cache device.  While a writer urges writeback, each move kicks it (the
  segment whose slot the writer needs may only now be there to write
  back).  If any segment of the round carries a barrier, the cache
  device is FLUSHed once after all of them are written, and only then are
  the barriers acknowledged.
* A failed segment write or cache FLUSH makes the target FAILED; the
  segment and every later one stay unflushed, and their barriers get EIO.
  Once FAILED, nothing is written: queued segments only have their
  barriers failed.
"""

import errno

from pydm import trace
from pydm.worker import Worker
from pydm.devio import IOFailed


class Flusher:
    def __init__(self, engine, name):
        self.engine = engine
        self.worker = Worker(f"pydm-wb-flush {name}", self._process, send=self._ack,
                             lock_class="wb.flush")

    def start(self):
        self.worker.start()

    def stop(self):
        self.worker.stop()

    def add(self, item):
        """Queue (segment id, bytes to write, barriers); called with the
        target's lock held, in id order."""
        self.worker.add(item)

    def _process(self, batch):
        eng = self.engine
        index = eng.index
        barriers = [b for _i, _n, bs in batch for b in bs]
        err = None
        written = 0
        for seg_id, nbytes, _bs in batch:
            if not eng.begin_write():
                break
            try:
                buf = index.buffer_of(seg_id)
                if trace.on.wb_store_io:
                    trace.emit("wb_store_io", eng=id(eng), store="cache", op="write", seg=seg_id)
                eng.cache.write(index.geo.segment_offset(seg_id), memoryview(buf)[:nbytes])
            except IOFailed as e:
                err = e
            finally:
                eng.end_write()
            if err is not None:
                break
            written = seg_id
            with eng.cond:              # at once: the writer may be waiting for its buffer
                index.last_flushed = seg_id
                eng.cond.notify_all()
                if eng.urged:           # a writer waits for a slot this segment's
                    eng.writeback.kick()    # writeback frees: it can go now
        ok = err is None and written == batch[-1][0]
        if ok and barriers:
            if eng.begin_write():
                try:
                    if trace.on.wb_store_io:
                        trace.emit("wb_store_io", eng=id(eng), store="cache", op="flush")
                    eng.cache.flush()
                    if trace.on.wb_durable:     # segments up to ``written`` are durable
                        trace.emit("wb_durable", eng=id(eng), seg=written)
                except IOFailed as e:
                    err = e
                    ok = False
                finally:
                    eng.end_write()
            else:
                ok = False
        if err is not None:
            eng.fail_io(err)
        return [(b, 0 if ok else errno.EIO) for b in barriers] or None

    @staticmethod
    def _ack(acks):
        for barrier, status in acks:
            if trace.on.wb_ack:
                trace.emit("wb_ack", bar=getattr(barrier, "id", -id(barrier)), status=status)
            barrier.complete(status)
