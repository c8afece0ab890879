"""Replay: rebuild the RAM index from a cache device's log.

Rules of this module:

* ``replay`` only reads the cache (through the ``read(offset, length)``
  function it is given) and never writes anywhere; what must reach the
  backing device (older dirty sectors a newer partial copy does not cover)
  is returned as ``merges`` for the caller to write, then flush.
* A segment counts only when it is sound: its checksum matches, its id sits
  in its own slot, its length is at most 127 and every metablock names a
  4 KiB block inside the backing device.
* The log replayed is a run of consecutive ids, each in its own slot,
  starting from the oldest sound segment that can still be part of the log
  (ids above ``max - nr_segments``), and ending at the first id that is not
  sound.  So a segment that never reached the media (a torn tail, or a lost
  middle one whose slot still holds an older lap's segment) ends the log:
  what follows it was never covered by an acknowledged flush, and the older
  segment left in its slot is never applied after newer ones (the original
  target's stale-data bug).
* A dirty copy dropped for a newer segment's is noted in the index's
  ``superseded`` (as the write path does): the replayed segments may sit
  in a page cache only, and the old copy's slot must not be overwritten
  before the newer one is durable.
* The superblock record (last written-back id) is clamped into
  [max(start - 1, last_flushed - nr_segments), last_flushed].
* Replaying the same image twice gives the same index and merges.
* Sound segments past the log's end (after a gap) are reported as
  ``beyond``: they were never covered by an acknowledged flush, and the
  caller must make them unsound before the log grows back up to their ids,
  or a later replay would take them for part of the log.
"""

import numpy as np

from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost.cache import CacheIndex


class Segment:
    """A sound segment found by ``scan``: its metablocks kept as their 16
    bytes each (not lists of ints: a 1 GiB cache has 260 000 of them)."""

    __slots__ = ("id", "slot", "length", "metablocks")

    def __init__(self, hdr, slot, block0):
        self.id = hdr.id
        self.slot = slot
        self.length = hdr.length
        self.metablocks = bytes(block0[L.HEADER_BYTES:L.HEADER_BYTES + 16 * hdr.length])

    def entries(self):
        """[(backing sector, dirty bits)] of its blocks, in order."""
        mb = np.frombuffer(self.metablocks, dtype=L.METABLOCK_DTYPE)
        return zip(mb["sector"].tolist(), mb["dirty_bits"].tolist())


class Replayed:
    """What replay found: the index to serve from, and what it decided."""

    def __init__(self, index, merges, start, record, problems, beyond=()):
        self.index = index
        self.beyond = list(beyond)    # [(slot, id)] sound segments past the log's end
        self.merges = merges          # [(backing sector, bytes)]
        self.start = start            # first id applied (0: none)
        self.record = record          # the record as found
        self.problems = problems      # [(slot, id, why)] of unsound segments

    @property
    def segments(self) -> int:
        return self.index.last_flushed - self.start + 1 if self.start else 0


def scan(read, geo: L.Geometry, backing_sectors: int):
    """({id: Segment} of every sound segment, [(slot, id, why)] of the others)."""
    sound, problems = {}, []
    for slot in range(geo.nr_segments):
        off = geo.slot_offset(slot)
        block0 = read(off, L.BLOCK)
        hdr = L.parse_header(block0)
        if hdr.id == 0:
            continue
        n = min(hdr.length, L.BLOCKS_PER_SEGMENT)
        data = read(off + L.BLOCK, n * L.BLOCK) if n else b""
        why = L.segment_problem(hdr, block0, data, geo, slot, backing_sectors)
        if why is None:
            sound[hdr.id] = Segment(hdr, slot, block0)
        else:
            problems.append((slot, hdr.id, why))
    return sound, problems


def log_run(sound: dict, nr_segments: int):
    """(first, last) ids of the log to replay, or (0, 0)."""
    if not sound:
        return 0, 0
    top = max(sound)
    lo = max(1, top - nr_segments + 1)
    start = min(i for i in sound if i >= lo)
    end = start
    while end + 1 in sound:
        end += 1
    return start, end


def replay(read, geo: L.Geometry, backing_sectors: int) -> Replayed:
    sound, problems = scan(read, geo, backing_sectors)
    start, end = log_run(sound, geo.nr_segments)
    record = L.parse_record(read(L.RECORD_SECTOR * L.SECTOR, L.SECTOR))
    index = CacheIndex(geo)
    merges = []
    if start:
        last_writeback = min(max(record, start - 1, end - geo.nr_segments), end)
    else:
        last_writeback = 0
    for seg_id in range(start, end + 1 if start else 0):
        _apply(index, sound[seg_id], seg_id <= last_writeback, read, merges)
    index.start(end, last_writeback)
    beyond = sorted((s.slot, i) for i, s in sound.items() if i > end)
    return Replayed(index, merges, start, record, problems, beyond)


def _apply(index, seg, written_back, read, merges):
    base = seg.slot * L.BLOCKS_PER_SEGMENT
    index.slot_id[seg.slot] = seg.id
    geo = index.geo
    for k, (sector, dbits) in enumerate(seg.entries()):
        block = sector // L.BLOCK_SECTORS
        old = index.lookup(block)
        new_dirty = dbits != 0 and not written_back
        if old >= 0:
            extra = index.bits[old] & ~dbits & L.FULL if index.dirty[old] else 0
            if extra:
                # older dirty sectors this copy does not carry: they go home
                data = read(geo.block_offset(old), L.BLOCK)
                for j in range(L.BLOCK_SECTORS):
                    if extra >> j & 1:
                        merges.append((sector + j, data[j * L.SECTOR:(j + 1) * L.SECTOR]))
            if index.dirty[old]:        # its slot waits for this one to be durable
                index.superseded[old // L.BLOCKS_PER_SEGMENT] = seg.id
            index.unlink(old)
        bits = dbits if dbits else L.FULL
        idx = base + k
        index.cursor = idx
        index.take(block, bits, new_dirty)
