"""Writeback: dirty blocks of the oldest segments copied home to the backing
device, so their slots can take new segments.

Rules of this module:

* One batch per background step of a ``pydm.worker.Worker`` (lock class
  "wb.writeback"), asked for by the modulator (backing utilisation under
  ``writeback_threshold``), by a writer that needs the oldest slot or sees
  the free slots drop under ``low_water`` (urged, until they are back at
  it), or by ``drop_caches`` (forced).
* A batch is the next ``min(flushed - written back, nr_max_batched_writeback,
  free slots + 1)`` segments.  Only blocks still dirty in RAM are copied (a
  block overwritten later is already clean); they are written sorted by
  backing sector, then segment id; a run of dirty sectors is one write, and
  adjacent runs are joined (up to 1 MiB); up to 64 writes are in flight at
  once, so a slow backing serves them side by side.
* ``last_writeback`` moves only after every write of the batch and a FLUSH
  of the backing device succeeded; only then are the blocks marked clean.
  A failed batch is retried (3 tries, backing off), then the target FAILs.
* Nothing is written once the target is FAILED (``begin_write``).
"""

import errno
import time

from pydm import trace
from pydm.worker import Worker
from pydm.targets.writeboost import layout as L
from pydm.devio import IOFailed

SECTOR = L.SECTOR
TRIES = 3
BACKOFF = 0.1                      # s, doubled each retry


class Writeback:
    def __init__(self, engine, name):
        self.engine = engine
        self.allowed = False           # set by the modulator
        self.last_batch = 0            # segments in the last batch (status)
        self.worker = Worker(f"pydm-wb-writeback {name}", lambda _b: None,
                             step=self._step, lock_class="wb.writeback")

    def start(self):
        self.worker.start()

    def stop(self):
        self.worker.stop()

    def kick(self):
        self.worker.kick()

    def _wanted(self, index) -> int:
        """Segments the next batch takes (0: none wanted now; cond held)."""
        eng = self.engine
        pending = index.last_flushed - index.last_writeback
        if pending <= 0 or not eng.life.active:
            return 0
        if not (eng.urged or eng.forced or self.allowed):
            return 0
        return max(1, min(pending, eng.tunables["nr_max_batched_writeback"],
                          index.free_slots() + 1))

    def _step(self) -> bool:
        eng = self.engine
        rc = eng.readcache
        if rc is not None:
            with eng.cond:
                batch = rc.take_ready()
            if batch:
                eng.inject_clean(batch)
        with eng.cond:
            n = self._wanted(eng.index)
            if not n:
                return False
            first = eng.index.last_writeback + 1
            items, reads = self._collect(first, first + n)
        for attempt in range(TRIES):
            try:
                self._write(items, reads)
                break
            except IOFailed as e:
                if attempt == TRIES - 1 or not eng.life.active:
                    eng.fail_io(e)
                    return False
                time.sleep(BACKOFF * (1 << attempt))
        with eng.cond:
            index = eng.index
            for _s, seg_id, idx, _b, _d in items:
                if index.segment_of(idx) == seg_id:
                    index.make_clean(idx)
            index.last_writeback = first + n - 1
            if trace.on.wb_advance:
                trace.emit("wb_advance", eng=id(eng), upto=first + n - 1)
            self.last_batch = n
            if index.free_slots() >= max(1, index.low_water):
                eng.urged = False
            eng.cond.notify_all()
            return self._wanted(index) > 0

    def _collect(self, first, end):
        """[(sector, seg id, idx, bits, data or None)] of the dirty blocks of
        segments first..end-1 (data copied from RAM where it still is), and
        the segments to read from the cache device.  cond held."""
        index = self.engine.index
        items, reads = [], {}
        for seg_id in range(first, end):
            idxs = index.dirty_blocks_of(seg_id).tolist()
            for idx in idxs:
                ram = index.ram_copy(idx)
                data = None
                if ram is not None:
                    buf, at = ram
                    data = bytes(buf[at:at + L.BLOCK])
                else:
                    reads.setdefault(seg_id, []).append(idx)
                items.append((index.sector[idx], seg_id, idx, index.bits[idx],
                              data))
        return items, reads

    def _write(self, items, reads):
        eng = self.engine
        geo = eng.index.geo
        fetched = {}
        for seg_id, idxs in reads.items():
            lo, hi = min(idxs), max(idxs)
            raw = eng.cache.read(geo.block_offset(lo), (hi - lo + 1) * L.BLOCK)
            for idx in idxs:
                at = (idx - lo) * L.BLOCK
                fetched[idx] = raw[at:at + L.BLOCK]
        writes = _coalesce(
            (sector + j, (data if data is not None else fetched[idx])[j * SECTOR:k * SECTOR])
            for sector, _seg, idx, bits, data in sorted(items, key=lambda t: (t[0], t[1]))
            for j, k in _runs(bits))
        if not items:
            return
        if not eng.begin_write():
            raise IOFailed(errno.EIO, "backing", "write", writes[0][0] // SECTOR)
        try:
            if trace.on.wb_store_io:
                trace.emit("wb_store_io", eng=id(eng), store="backing", op="write")
            eng.backing.write_many(writes)
            if trace.on.wb_store_io:
                trace.emit("wb_store_io", eng=id(eng), store="backing", op="flush")
            eng.backing.flush()
            if trace.on.wb_backing_flushed:
                trace.emit("wb_backing_flushed", eng=id(eng))
        finally:
            eng.end_write()


MAX_WRITE = 1 << 20


def _coalesce(runs):
    """[(byte offset, data)] from sorted (sector, data) runs, adjacent ones
    joined up to MAX_WRITE (one bio where the kernel target sends many)."""
    out = []
    for sector, data in runs:
        off = sector * SECTOR
        if out:
            last_off, parts, size = out[-1]
            if last_off + size == off and size + len(data) <= MAX_WRITE:
                parts.append(data)
                out[-1] = (last_off, parts, size + len(data))
                continue
        out.append((off, [data], len(data)))
    return [(off, parts[0] if len(parts) == 1 else b"".join(parts)) for off, parts, _n in out]


def _runs(bits):
    """[(first, end)] sector runs of the set bits of a block's 8."""
    out, j = [], 0
    while j < L.BLOCK_SECTORS:
        if bits >> j & 1:
            k = j
            while k < L.BLOCK_SECTORS and bits >> k & 1:
                k += 1
            out.append((j, k))
            j = k
        else:
            j += 1
    return out


class Modulator:
    """Backing utilisation over the last second, as writeback's gate."""

    def __init__(self, writeback, backing_io, tunables):
        self.writeback = writeback
        self.backing = backing_io
        self.tunables = tunables
        self.last = (time.monotonic(), backing_io.busy.seconds())
        self.utilisation = 0.0

    def tick(self) -> None:
        now, busy = time.monotonic(), self.backing.busy.seconds()
        t0, b0 = self.last
        self.last = (now, busy)
        if now > t0:
            self.utilisation = min(100.0, 100.0 * (busy - b0) / (now - t0))
        threshold = self.tunables["writeback_threshold"]
        allowed = threshold > 0 and self.utilisation < threshold
        self.writeback.allowed = allowed
        if allowed:
            self.writeback.kick()
