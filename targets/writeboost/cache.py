"""The RAM side of a writeboost cache: which backing block is in which
cache block, what of it is valid and dirty, the segment being filled, and
the RAM buffers of the last segments.

Rules of this module:

* No I/O, no threads, no waiting.  Every method runs under the target's
  lock (the caller's); the flusher and the writeback task read and change
  this state only through these methods.
* Per cache block state is flat arrays (``sector``: array('q'), ``bits``
  and ``dirty``: bytearrays), fast to index one at a time on the I/O path,
  with numpy views (``*_np``) over the same memory for whole-segment work;
  the map from backing block to cache block is a ``BlockMap``.  About 10
  bytes a block plus 24 bytes a map slot, never a Python object per block.
* Cache index ``i`` is block ``i % 127`` of slot ``i // 127``.  Blocks are
  handed out in order (``cursor``); segment ``current_id`` fills slot
  ``slot_of(current_id)`` in RAM buffer ``(current_id - 1) % NR_BUFFERS``.
* ``bits`` says which of the block's 8 sectors hold valid data; for a dirty
  block it is the set of dirty sectors (the union of every write since the
  block was last clean), for a clean one what may be read from it (0xFF
  for a read-cached block).  Dirty blocks are counted in ``nr_dirty``.
* At most one cache block is registered for a backing block; a newer copy
  replaces the older (which becomes clean and unlinked).
* Counters, with last_writeback <= last_flushed <= last_sealed < current_id:
  ``last_sealed`` (sealed and handed to the flusher), ``last_flushed``
  (written to the cache store, in id order), ``last_writeback`` (written
  back and the backing flushed).
"""

from array import array

import numpy as np

from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost.blockmap import BlockMap

NR_BUFFERS = 8
NR_STATS = 16
LOW_WATER = 32          # free slots under which writeback is urged ahead


def low_water(nr_segments: int) -> int:
    """Free slots under which a writer urges writeback before it has to
    wait for a slot: 32 (16 MiB), or a 16th of a smaller log (0 for a log
    under 16 segments: urged only when a slot is needed)."""
    return min(LOW_WATER, nr_segments // 16)


class CacheIndex:
    def __init__(self, geo: L.Geometry):
        self.geo = geo
        self.low_water = low_water(geo.nr_segments)
        n = geo.nr_caches
        self.sector = array("q", [-1]) * n               # backing sector, -1 = none
        self.bits = bytearray(n)
        self.dirty = bytearray(n)                         # 0 or 1
        self.sector_np = np.frombuffer(self.sector, dtype=np.int64)
        self.bits_np = np.frombuffer(self.bits, dtype=np.uint8)
        self.dirty_np = np.frombuffer(self.dirty, dtype=np.uint8)
        self.map = BlockMap(n)
        self.nr_dirty = 0
        self.slot_id = [0] * geo.nr_segments       # segment id each slot holds
        self.slot_readers = [0] * geo.nr_segments  # reads in flight from a slot
        # per slot: the newest segment whose write dropped a dirty block of
        # the segment there (its copy lives only in that newer segment now)
        self.superseded = array("q", [0]) * geo.nr_segments
        self.superseded_np = np.frombuffer(self.superseded, dtype=np.int64)
        self.durable_before = [0] * NR_BUFFERS     # see open_next
        # memoryviews: a slice assignment into one is a plain memcpy
        self.buffers = [memoryview(bytearray(L.SEGMENT_BYTES)) for _ in range(NR_BUFFERS)]
        self.buffer_id = [0] * NR_BUFFERS          # segment id each buffer holds
        self.current_id = 0                        # the last segment opened
        self.current_open = False                  # and it still takes blocks
        self.cursor = 0                            # next cache index to hand out
        self.seg_end = 0                           # cursor limit while one is open
        self.last_sealed = 0
        self.last_flushed = 0
        self.last_writeback = 0
        self.stats = [0] * NR_STATS
        self.count_non_full_flushed = 0

    # ----------------------------------------------------------- lookup
    def lookup(self, block: int) -> int:
        """Cache index of backing 4 KiB block ``block``, or -1."""
        return self.map.get(block)

    def lookup_many(self, blocks) -> np.ndarray:
        return self.map.get_many(blocks)

    def segment_of(self, idx: int) -> int:
        return self.slot_id[idx // L.BLOCKS_PER_SEGMENT]

    def in_current(self, idx: int) -> bool:
        """True if cache block ``idx`` belongs to the segment being filled."""
        return (self.current_open
                and self.slot_id[idx // L.BLOCKS_PER_SEGMENT] == self.current_id)

    def ram_copy(self, idx: int):
        """(buffer, offset) of block ``idx``'s data while its segment is still
        in a RAM buffer, else None."""
        seg = self.segment_of(idx)
        b = (seg - 1) % NR_BUFFERS
        if seg and self.buffer_id[b] == seg:
            return self.buffers[b], (idx % L.BLOCKS_PER_SEGMENT + 1) * L.BLOCK
        return None

    # ---------------------------------------------------------- changes
    def free_in_current(self) -> int:
        """Blocks still free in the segment being filled (0: none open)."""
        return self.seg_end - self.cursor if self.current_open else 0

    def free_slots(self) -> int:
        """Slots whose segment is written back, past the one being filled."""
        return self.last_writeback + self.geo.nr_segments - self.current_id

    def length_of_current(self) -> int:
        return self.cursor - self.geo.slot_of(self.current_id) * L.BLOCKS_PER_SEGMENT

    def take(self, block: int, bits: int, dirty: bool) -> int:
        """The next block of the current segment for backing ``block``
        (the caller copies the data into the RAM buffer)."""
        idx = self.cursor
        self.cursor = idx + 1
        self.sector[idx] = block * L.BLOCK_SECTORS
        self.bits[idx] = bits
        self.dirty[idx] = 1 if dirty else 0
        if dirty:
            self.nr_dirty += 1
        self.map.put(block, idx)
        return idx

    def replace_run(self, blocks, positions) -> int:
        """Whole dirty blocks into the next ``len(blocks)`` cache blocks, in
        one vectorised update (the write path of a large write).
        ``positions`` are the blocks' places in the map (``find_many``); the
        copies they point at now are dropped, and the map is pointed at the
        new ones in place.  Returns the first new cache index."""
        c = self.cursor
        k = len(blocks)
        new = np.arange(c, c + k, dtype=np.int64)
        found = positions >= 0
        old = self.map.values_at(positions[found])
        if len(old):
            dirty = old[self.dirty_np[old] != 0]
            self.superseded_np[dirty // L.BLOCKS_PER_SEGMENT] = self.current_id
            self.nr_dirty -= len(dirty)
            self.dirty_np[old] = 0
            self.sector_np[old] = -1
            self.bits_np[old] = 0
            self.map.set_at(positions[found], new[found])
        self.cursor = c + k
        self.sector_np[c:c + k] = blocks * L.BLOCK_SECTORS
        self.bits_np[c:c + k] = L.FULL
        self.dirty_np[c:c + k] = 1
        self.nr_dirty += k
        if len(old) < k:
            put = self.map.put
            for i in np.nonzero(~found)[0].tolist():
                put(int(blocks[i]), c + i)
        return c

    def make_dirty(self, idx: int, bits: int) -> None:
        self.bits[idx] |= bits
        if not self.dirty[idx]:
            self.dirty[idx] = 1
            self.nr_dirty += 1

    def make_clean(self, idx: int) -> None:
        if self.dirty[idx]:
            self.dirty[idx] = 0
            self.nr_dirty -= 1

    def supersede(self, idx: int) -> None:
        """Drop block ``idx``: a write into the current segment replaces it
        (``unlink``, and noted in ``superseded`` when it was dirty)."""
        if self.dirty[idx]:
            self.superseded[idx // L.BLOCKS_PER_SEGMENT] = self.current_id
        self.unlink(idx)

    def unlink(self, idx: int) -> None:
        """Forget block ``idx`` (a newer copy replaces it, or its slot is
        reused): clean, and no longer found by lookup."""
        self.make_clean(idx)
        s = self.sector[idx]
        if s >= 0:
            self.map.delete(s // L.BLOCK_SECTORS, idx)
            self.sector[idx] = -1
            self.bits[idx] = 0

    def durable_before_of(self, seg_id: int) -> int:
        """The segment that must be durable on the cache before ``seg_id``
        (still in its RAM buffer) is written into its slot (0: none)."""
        return self.durable_before[(seg_id - 1) % NR_BUFFERS]

    def buffer_of(self, seg_id: int) -> memoryview:
        return self.buffers[(seg_id - 1) % NR_BUFFERS]

    def seal(self) -> int:
        """Seal the segment being filled (header, metablocks, checksum into
        its RAM buffer); returns the number of bytes to write."""
        seg = self.current_id
        slot = self.geo.slot_of(seg)
        base = slot * L.BLOCKS_PER_SEGMENT
        n = self.cursor - base
        idxs = slice(base, base + n)
        sectors = self.sector_np[idxs]
        dirty_bits = np.where(self.dirty_np[idxs], self.bits_np[idxs], 0)
        nbytes = L.seal(self.buffer_of(seg), seg, sectors, dirty_bits)
        self.last_sealed = seg
        self.current_open = False
        self.seg_end = 0
        return nbytes

    def may_open_next(self) -> str:
        """Why the next segment cannot be opened yet, or "" (its RAM buffer
        still holds an unflushed segment, its slot one not written back, or
        reads from its slot are in flight)."""
        nxt = self.current_id + 1
        if self.last_flushed < nxt - NR_BUFFERS:
            return "buffer"
        if self.last_writeback < nxt - self.geo.nr_segments:
            return "writeback"
        if self.slot_readers[self.geo.slot_of(nxt)]:
            return "readers"
        return ""

    def open_next(self) -> None:
        """Start segment ``current_id + 1`` (``may_open_next()`` said yes):
        what its slot held is forgotten (it was written back).  Its
        ``durable_before`` is the newest segment that superseded a dirty
        block of the slot's old segment: the old copy was never written
        home, so that newer one must be durable before the slot is
        overwritten (see the flusher)."""
        nxt = self.current_id + 1
        slot = self.geo.slot_of(nxt)
        base = slot * L.BLOCKS_PER_SEGMENT
        for idx in np.nonzero(self.sector_np[base:base + L.BLOCKS_PER_SEGMENT] >= 0)[0]:
            self.unlink(base + int(idx))
        self.slot_id[slot] = nxt
        self.buffer_id[(nxt - 1) % NR_BUFFERS] = nxt
        self.durable_before[(nxt - 1) % NR_BUFFERS] = self.superseded[slot]
        self.superseded[slot] = 0
        self.current_id = nxt
        self.current_open = True
        self.cursor = base
        self.seg_end = base + L.BLOCKS_PER_SEGMENT

    def start(self, last_flushed: int, last_writeback: int) -> None:
        """After replay: the log ends at ``last_flushed``; the next segment
        opens when its slot is free (its old segment may still need
        writing back)."""
        self.current_id = self.last_sealed = self.last_flushed = last_flushed
        self.last_writeback = last_writeback
        self.current_open = False

    # ---------------------------------------------------------- queries
    def dirty_blocks_of(self, seg_id: int):
        """Cache indexes of blocks of segment ``seg_id`` still dirty."""
        slot = self.geo.slot_of(seg_id)
        if self.slot_id[slot] != seg_id:
            return np.zeros(0, dtype=np.int64)
        base = slot * L.BLOCKS_PER_SEGMENT
        return base + np.nonzero(self.dirty_np[base:base + L.BLOCKS_PER_SEGMENT])[0]

    def memory_bytes(self) -> int:
        return (self.sector_np.nbytes + self.bits_np.nbytes + self.dirty_np.nbytes
                + self.superseded_np.nbytes
                + len(self.map.keys) * 8 + len(self.map.vals) * 4
                + NR_BUFFERS * L.SEGMENT_BYTES)


def estimate_memory(geo: L.Geometry) -> int:
    """Bytes of RAM a cache of this geometry costs (see ``memory_bytes``)."""
    n = geo.nr_caches
    slots = 1 << max(4, (2 * max(1, n) - 1).bit_length())
    return (n * (8 + 1 + 1) + slots * 12 + geo.nr_segments * 8
            + NR_BUFFERS * L.SEGMENT_BYTES)
