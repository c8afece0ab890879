"""The write path of writeboost: writes into the RAM buffer of the segment
being filled, sealing it, and the room a new segment needs.

Rules of this module:

* Everything here runs with the target's condition (``engine.cond``)
  held, except ``write`` and ``flush``, which take it themselves; nothing
  here completes a bio (the caller completes it with the returned status)
  or submits one.
* A plain write is acknowledged once its data is in the RAM buffer (a disk's
  volatile write cache).  A FUA write or a flush seals the segment being
  filled (even an empty one) with itself attached as a barrier; the flusher
  acknowledges barriers only after their segment and every earlier one are
  on the cache device and a cache FLUSH succeeded.
* Writes never span what they cannot see: a piece that needs a free block
  first waits for room (``_make_room``, which may seal, wait for the
  flusher, urge the writeback), then looks its block up again.  Writeback
  is urged also ahead of need, once the free slots drop under the index's
  ``low_water``, so writers rarely wait for it one slot at a time.
* Only the ACTIVE state takes writes; a wait for room ends with ``Failed``
  as soon as the target is not ACTIVE.
"""

import errno
import logging

import numpy as np

from pydm import trace
from pydm.bio import REQ_FUA
from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost.cache import NR_BUFFERS
from pydm.targets.writeboost.state import ACTIVE
from pydm.devio import IOFailed

log = logging.getLogger("pydm.writeboost")

SECTOR = L.SECTOR


def copy(dst, src) -> None:
    """``dst[:] = src`` with the GIL released (numpy's copy lets it go,
    a memoryview's does not): the flusher and the NBD threads go on while a
    writer copies a large write."""
    np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


class Failed(Exception):
    """The target is FAILED (or stopping): the I/O gets EIO."""


class LogWriter:
    """The write path of one engine (see the module rules)."""

    def __init__(self, engine):
        self.engine = engine
        self.name = engine.name
        self.cond = engine.cond
        self.index = engine.index
        self.life = engine.life
        self.cache = engine.cache

    def write(self, bio, rel: int) -> int:
        """Take a write into the log; returns its status, or None when a
        barrier now owns it (FUA)."""
        if bio.nr_sectors == L.BLOCK_SECTORS and not rel & 7 and not bio.flags & REQ_FUA:
            status = self._write_block(rel >> 3, bio.data)
            if status is not None:
                return status
        data = bio.data
        end = rel + bio.nr_sectors
        with self.cond:
            if not self.life.active:
                return errno.EIO
            try:
                pos = rel
                while pos < end:
                    off = pos & 7
                    if not off and end - pos >= 2 * L.BLOCK_SECTORS:
                        n = (end - pos) >> 3               # whole blocks, several
                        lo = (pos - rel) * SECTOR
                        self._write_blocks(pos >> 3, n, data[lo:lo + n * L.BLOCK])
                        pos += n << 3
                        continue
                    cnt = min(L.BLOCK_SECTORS - off, end - pos)
                    lo = (pos - rel) * SECTOR
                    self._write_piece(pos >> 3, off, cnt, data[lo:lo + cnt * SECTOR])
                    pos += cnt
                if bio.flags & REQ_FUA:
                    self.seal([bio])
                    return None
            except Failed:
                return errno.EIO
            except IOFailed as e:
                log.warning("writeboost %s: %s", self.name, e)
                return e.errno
        return 0

    def _write_block(self, block, src):
        """The common case made cheap: one whole, aligned 4 KiB block, with
        room in the segment being filled.  None: take the general path."""
        index = self.index
        imap = index.map
        with self.cond:
            if self.life.state is not ACTIVE:
                return errno.EIO
            pos = imap.find(block)
            idx = imap.vals[pos] if pos >= 0 else -1
            if idx >= 0 and index.current_open and \
                    index.slot_id[idx // L.BLOCKS_PER_SEGMENT] == index.current_id:
                index.stats[0b1111] += 1                   # in the RAM buffer: in place
                at = (idx % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK
                index.buffers[(index.current_id - 1) % NR_BUFFERS][at:at + L.BLOCK] = src
                index.make_dirty(idx, L.FULL)
                return 0
            c = index.cursor
            if c >= index.seg_end:
                return None
            if idx >= 0:                                   # a sealed copy: dropped
                index.stats[0b1101] += 1
                if index.dirty[idx]:
                    index.dirty[idx] = 0
                    index.nr_dirty -= 1
                    index.superseded[idx // L.BLOCKS_PER_SEGMENT] = index.current_id
                index.sector[idx] = -1
                index.bits[idx] = 0
                imap.vals[pos] = c
            else:
                index.stats[0b1001] += 1
                if self.engine.readcache.cells:
                    self.engine.readcache.cancel(block)
                imap.put(block, c)
            index.cursor = c + 1
            index.sector[c] = block << 3
            index.bits[c] = L.FULL
            index.dirty[c] = 1
            index.nr_dirty += 1
            at = (c % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK
            index.buffers[(index.current_id - 1) % NR_BUFFERS][at:at + L.BLOCK] = src
            return 0

    def _write_piece(self, block, off, cnt, src):
        """One piece inside one 4 KiB block (cond held)."""
        index = self.index
        full = cnt == L.BLOCK_SECTORS
        mask = ((1 << cnt) - 1) << off
        while True:
            idx = index.map.get(block)
            if (idx >= 0 and index.current_open
                    and index.slot_id[idx // L.BLOCKS_PER_SEGMENT] == index.current_id):
                index.stats[0b1110 | full] += 1           # a hit in the RAM buffer
                at = (idx % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK + off * SECTOR
                index.buffers[(index.current_id - 1) % NR_BUFFERS][at:at + cnt * SECTOR] = src
                index.make_dirty(idx, mask)
                return
            if index.cursor < index.seg_end:
                break
            self._make_room()
        old_bits, old = 0, None
        if idx >= 0:
            index.stats[0b1100 | full] += 1
            if not full and index.dirty[idx]:
                old_bits = index.bits[idx] & ~mask & L.FULL
                if old_bits:
                    old = self.block_data(idx)
            index.supersede(idx)
        else:
            index.stats[0b1000 | full] += 1
            if self.engine.readcache.cells:
                self.engine.readcache.cancel(block)
        new = index.take(block, mask | old_bits, True)
        buf = index.buffers[(index.current_id - 1) % NR_BUFFERS]
        base = (new % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK
        if old is not None:
            for j in range(L.BLOCK_SECTORS):
                if old_bits >> j & 1:
                    buf[base + j * SECTOR:base + (j + 1) * SECTOR] = \
                        old[j * SECTOR:(j + 1) * SECTOR]
        buf[base + off * SECTOR:base + (off + cnt) * SECTOR] = src

    def _write_blocks(self, first, n, src):
        """``n`` whole blocks from backing block ``first`` (cond held): runs
        of blocks not in the RAM buffer go in with one copy and vectorised
        index updates; a block already in the RAM buffer is overwritten in
        place."""
        index = self.index
        stats = index.stats
        done = 0
        while done < n:
            if index.cursor >= index.seg_end:
                self._make_room()
            k = min(n - done, index.seg_end - index.cursor)
            blocks = np.arange(first + done, first + done + k, dtype=np.int64)
            positions = index.map.find_many(blocks)
            found = positions >= 0
            if found.any():
                idxs = index.map.values_at(positions)
                in_ram = found & (idxs // L.BLOCKS_PER_SEGMENT
                                  == index.geo.slot_of(index.current_id))
                if in_ram.any():
                    j = int(np.argmax(in_ram))
                    if j == 0:                              # this one in place
                        lo = done * L.BLOCK
                        self._write_piece(first + done, 0, L.BLOCK_SECTORS,
                                          src[lo:lo + L.BLOCK])
                        done += 1
                        continue
                    k = j                                   # up to it
                    blocks, positions, found = blocks[:k], positions[:k], found[:k]
            hits = int(found.sum())
            stats[0b1101] += hits
            stats[0b1001] += k - hits
            if self.engine.readcache.cells:
                for b in blocks[~found].tolist():
                    self.engine.readcache.cancel(b)
            c = index.replace_run(blocks, positions)
            buf = index.buffers[(index.current_id - 1) % NR_BUFFERS]
            base = (c % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK
            lo = done * L.BLOCK
            copy(buf[base:base + k * L.BLOCK], src[lo:lo + k * L.BLOCK])
            done += k

    def block_data(self, idx) -> bytes:
        """The 4 KiB of cache block ``idx`` (from RAM while its segment is
        there, else read from the cache device; cond held)."""
        ram = self.index.ram_copy(idx)
        if ram is not None:
            buf, at = ram
            return bytes(buf[at:at + L.BLOCK])
        return self.cache.read(self.index.geo.block_offset(idx), L.BLOCK)

    def _make_room(self):
        """Until the segment being filled has a free block: seal a full one,
        open the next when its RAM buffer and slot are free (cond held)."""
        index = self.index
        while not index.free_in_current():
            if not self.life.active:
                raise Failed()
            if index.current_open:
                self.seal([])
                continue
            why = index.may_open_next()
            if not why:
                index.open_next()
                if index.free_slots() < index.low_water:
                    self._urge()       # ahead of need: one batch, not a wait per slot
                return
            if why == "writeback":
                self._urge()
            self.cond.wait(1.0)

    def _urge(self):
        if not self.engine.urged:
            self.engine.urged = True
            self.engine.writeback.kick()

    def seal(self, barriers):
        """Seal the segment being filled (opening an empty one first if
        none is open) and hand it to the flusher with ``barriers``."""
        index = self.index
        if not index.current_open:
            self._make_room()
        full = index.length_of_current() == L.BLOCKS_PER_SEGMENT
        nbytes = index.seal()
        if barriers and not full:
            index.count_non_full_flushed += 1
        if trace.on.wb_bind and barriers:
            for b in barriers:          # bar: a bio's id, or -id() of a sync's Waiter
                trace.emit("wb_bind", eng=id(self.engine), bar=getattr(b, "id", -id(b)),
                           seg=index.last_sealed)
        seg = index.last_sealed
        self.engine.flusher.add((seg, nbytes, barriers, index.durable_before_of(seg)))

    def flush(self, bio) -> int:
        """An empty flush: seal, even an empty segment, with it attached."""
        with self.cond:
            if not self.life.active:
                return errno.EIO
            try:
                self.seal([bio])
            except Failed:
                return errno.EIO
        return None
