"""The flush task: sealed segments onto the cache device, in id order, and
the barriers acknowledged only when they are durable.

Rules of this module:

* Runs on its own ``pydm.worker.Worker`` thread (lock class "wb.flush",
  taken after the target's lock when a segment is queued).  A round takes
  every segment sealed since the last one, writes each with one bio from
  its RAM buffer (header block and used data blocks), in id order, then,
  if any of them carries a barrier, FLUSHes the cache device once for all:
  only then is ``last_flushed`` moved and are the barriers acknowledged.
  ``last_flushed`` never passes a segment that is not on the cache device.
* A failed segment write or cache FLUSH makes the target FAILED; the
  segment and every later one stay unflushed, and their barriers get EIO.
  Once FAILED, nothing is written: queued segments only have their
  barriers failed.
"""

import errno

from pydm.worker import Worker
from pydm.targets.writeboost.storeio import IOFailed


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
        done = 0
        err = None
        for seg_id, nbytes, _bs in batch:
            if not eng.begin_write():
                break
            try:
                buf = index.buffer_of(seg_id)
                eng.cache.write(index.geo.segment_offset(seg_id), memoryview(buf)[:nbytes])
            except IOFailed as e:
                err = e
            finally:
                eng.end_write()
            if err is not None:
                break
            done = seg_id
        if err is None and done and barriers and done == batch[-1][0]:
            if eng.begin_write():
                try:
                    eng.cache.flush()
                except IOFailed as e:
                    err = e
                finally:
                    eng.end_write()
            else:
                done = 0
        if err is not None:
            eng.fail_io(err)
        elif done:
            with eng.cond:
                index.last_flushed = done
                eng.cond.notify_all()
        ok = err is None and done == batch[-1][0]
        return [(b, 0 if ok else errno.EIO) for b in barriers] or None

    @staticmethod
    def _ack(acks):
        for barrier, status in acks:
            barrier.complete(status)
