"""Reads: find the newest copy of every sector a read asks for.

Rules of this module:

* A plan is made with the target's lock held (``ReadPlan.make``) and run
  without it (``run``).  What is in a RAM buffer is copied into the bio at
  once, under the lock, so the buffer may change right after; what is on the
  cache or the backing device becomes an asynchronous bio.
* A sector comes from the cache block that holds the backing block when the
  block's ``bits`` say the sector is valid there, else from the backing
  device.  A read with no cached block at all is not planned: the caller
  remaps the bio to the backing device as it is.
* A read that needs a cache slot holds it (``slot_readers``) until its bios
  complete, so the slot is not reused under it.
* An error fails that read only (EIO, first error wins); no state changes.
"""

import errno

from pydm.bio import READ
from pydm.targets.writeboost import layout as L

SECTOR = L.SECTOR
_CACHE, _BACKING = 0, 1


class ReadPlan:
    __slots__ = ("engine", "bio", "ops", "holds", "remaining", "status")

    def __init__(self, engine, bio):
        self.engine = engine
        self.bio = bio
        self.ops = []            # [kind, bio byte offset, device sector, sectors]
        self.holds = []          # slots held
        self.remaining = 0
        self.status = 0

    @classmethod
    def make(cls, engine, bio, rel):
        index = engine.index
        end = rel + bio.nr_sectors
        first, last = rel // L.BLOCK_SECTORS, (end - 1) // L.BLOCK_SECTORS
        if first == last:
            idxs = [index.lookup(first)]
        else:
            idxs = index.lookup_many(range(first, last + 1)).tolist()
        if max(idxs) < 0:
            for block in range(first, last + 1):
                full = rel <= block * L.BLOCK_SECTORS and (block + 1) * L.BLOCK_SECTORS <= end
                index.stats[full] += 1
            return None
        plan = cls(engine, bio)
        pos = rel
        for idx in idxs:
            block = pos // L.BLOCK_SECTORS
            off = pos % L.BLOCK_SECTORS
            cnt = min(L.BLOCK_SECTORS - off, end - pos)
            plan._piece(idx, block, off, cnt, (pos - rel) * SECTOR)
            pos += cnt
        return plan

    def _piece(self, idx, block, off, cnt, dst):
        index = self.engine.index
        full = cnt == L.BLOCK_SECTORS
        if idx < 0:
            index.stats[full] += 1
            self._add(_BACKING, dst, block * L.BLOCK_SECTORS + off, cnt)
            return
        ram = index.ram_copy(idx)
        index.stats[0b0100 | (index.in_current(idx) << 1) | full] += 1
        bits = index.bits[idx]
        cache_sector = index.geo.block_offset(idx) // SECTOR
        data = self.bio.data
        held = False
        j = off
        while j < off + cnt:
            valid = bits >> j & 1
            k = j
            while k < off + cnt and (bits >> k & 1) == valid:
                k += 1
            at = dst + (j - off) * SECTOR
            n = k - j
            if not valid:
                self._add(_BACKING, at, block * L.BLOCK_SECTORS + j, n)
            elif ram is not None:
                buf, base = ram
                data[at:at + n * SECTOR] = buf[base + j * SECTOR:base + k * SECTOR]
            else:
                if not held:
                    slot = idx // L.BLOCKS_PER_SEGMENT
                    index.slot_readers[slot] += 1
                    self.holds.append(slot)
                    held = True
                self._add(_CACHE, at, cache_sector + j, n)
            j = k

    def _add(self, kind, at, sector, n):
        ops = self.ops
        if ops:
            last = ops[-1]
            if (last[0] == kind and last[1] + last[3] * SECTOR == at
                    and last[2] + last[3] == sector):
                last[3] += n
                return
        ops.append([kind, at, sector, n])

    # ------------------------------------------------------------ running
    def run(self) -> None:
        """Submit the plan's bios (lock not held); completes the read."""
        if not self.ops:
            self._finish()
            return
        self.remaining = len(self.ops)
        data = self.bio.data
        for kind, at, sector, n in list(self.ops):
            dev = self.engine.cache if kind == _CACHE else self.engine.backing
            try:
                dev.submit(READ, sector, data[at:at + n * SECTOR], self._done)
            except Exception:
                self._done(errno.EIO)

    def _done(self, status):
        with self.engine.cond:
            if status and not self.status:
                self.status = status
            self.remaining -= 1
            if self.remaining:
                return
        self._finish()

    def _finish(self):
        if self.holds:
            index = self.engine.index
            with self.engine.cond:
                for slot in self.holds:
                    index.slot_readers[slot] -= 1
                self.engine.cond.notify_all()
        self.bio.complete(self.status)
