"""The on-disk layout of a dm-writeboost cache device, byte for byte.

Rules of this module: pure functions and constants, no I/O and no state
beyond a ``Geometry``.  Everything here is the Linux out-of-tree target's
format (dm-writeboost 2.2, as its writeboost-cli tools read it):

    [0, 1 MiB)                    superblock region
        sector 0                  header: u32 magic 0x57427374 ("tsBW" on disk)
        sector 2047               record: u64 last_writeback_segment_id
    1 MiB + k * 512 KiB           segment slot k, k = 0 .. nr_segments - 1
        block 0                   segment header (512 B) + 127 metablocks
        block 1 .. 127            data blocks (4 KiB each)

A segment header is ``u64 id, u32 checksum, u8 length`` then zeroes to byte
512; metablock i (16 bytes from byte 512 + 16 i) is ``u64 backing sector,
u8 dirty_bits``.  The checksum is CRC-32C (init and final xor 0xFFFFFFFF)
over bytes [512, 4096 * (length + 1)) of the slot: the metablocks and the
zero tail of block 0, and the first ``length`` data blocks in full.  Segment
id ``n`` (ids start at 1) lives in slot ``(n - 1) mod nr_segments``, a
number not stored anywhere: the cache must keep its size.  All integers are
little-endian.
"""

import struct

import google_crc32c
import numpy as np

SECTOR = 512
BLOCK = 4096                       # a cache block
BLOCK_SECTORS = BLOCK // SECTOR    # 8
FULL = 0xFF                        # dirty/data bits of a whole block
MAGIC = 0x57427374
SB_BYTES = 1 << 20                 # the superblock region
SB_SECTORS = SB_BYTES // SECTOR    # 2048
RECORD_SECTOR = SB_SECTORS - 1     # the record's sector
RECORD_BLOCK_OFFSET = SB_BYTES - BLOCK   # written as one 4 KiB FUA write
SEGMENT_BYTES = 512 << 10
SEGMENT_SECTORS = SEGMENT_BYTES // SECTOR   # 1024
BLOCKS_PER_SEGMENT = SEGMENT_BYTES // BLOCK - 1   # 127 data blocks
HEADER_BYTES = 512
METABLOCK = struct.Struct("<QB7x")            # 16 bytes
HEADER = struct.Struct("<QIB")                # id, checksum, length
U32 = struct.Struct("<I")
U64 = struct.Struct("<Q")
MIN_CACHE_BYTES = SB_BYTES + SEGMENT_BYTES
METABLOCK_DTYPE = np.dtype([("sector", "<u8"), ("dirty_bits", "u1"), ("pad", "V7")])
_ZERO_BLOCK = bytes(BLOCK)


class LayoutError(Exception):
    """A cache image that is not a valid writeboost cache."""


class Geometry:
    """Where things are on a cache of ``cache_bytes`` (fixed by its size)."""

    __slots__ = ("cache_bytes", "nr_segments", "nr_caches")

    def __init__(self, cache_bytes: int):
        if cache_bytes < MIN_CACHE_BYTES:
            raise LayoutError(f"a cache needs at least {MIN_CACHE_BYTES} bytes (1 MiB of "
                              f"superblock and one 512 KiB segment); it has {cache_bytes}")
        self.cache_bytes = cache_bytes
        self.nr_segments = (cache_bytes - SB_BYTES) // SEGMENT_BYTES
        self.nr_caches = self.nr_segments * BLOCKS_PER_SEGMENT

    def slot_of(self, seg_id: int) -> int:
        return (seg_id - 1) % self.nr_segments

    def slot_offset(self, slot: int) -> int:
        return SB_BYTES + slot * SEGMENT_BYTES

    def segment_offset(self, seg_id: int) -> int:
        return self.slot_offset(self.slot_of(seg_id))

    def block_offset(self, cache_index: int) -> int:
        """Byte offset of data block ``cache_index`` (slot * 127 + i)."""
        slot, i = divmod(cache_index, BLOCKS_PER_SEGMENT)
        return self.slot_offset(slot) + (i + 1) * BLOCK

    def unused_bytes(self) -> int:
        return self.cache_bytes - SB_BYTES - self.nr_segments * SEGMENT_BYTES


# -------------------------------------------------------------- segments
def checksum(block0, data) -> int:
    """CRC-32C of a segment: ``block0`` from byte 512, then ``data`` (the
    first ``length`` data blocks, whole).  (google_crc32c takes bytes only:
    the copies cost ~20 us a segment.)"""
    crc = google_crc32c.value(bytes(memoryview(block0)[HEADER_BYTES:BLOCK]))
    return google_crc32c.extend(crc, bytes(data))


def seal(buf, seg_id: int, sectors, dirty_bits) -> int:
    """Fill block 0 of the segment image ``buf`` (bytearray, at least
    ``BLOCK * (length + 1)``) for ``seg_id`` whose data blocks 1.. hold the
    blocks of backing ``sectors`` with ``dirty_bits`` (0 = clean); returns
    the number of bytes to write."""
    length = len(sectors)
    if length > BLOCKS_PER_SEGMENT:
        raise ValueError(f"{length} blocks do not fit a segment")
    mv = memoryview(buf)
    mv[:BLOCK] = _ZERO_BLOCK
    if length:
        mb = np.zeros(length, dtype=METABLOCK_DTYPE)
        mb["sector"] = sectors
        mb["dirty_bits"] = dirty_bits
        mv[HEADER_BYTES:HEADER_BYTES + METABLOCK.size * length] = mb.tobytes()
    end = BLOCK * (length + 1)
    crc = checksum(mv[:BLOCK], mv[BLOCK:end])
    HEADER.pack_into(buf, 0, seg_id, crc, length)
    return end


class SegmentHeader:
    __slots__ = ("id", "checksum", "length", "sectors", "dirty_bits")

    def __init__(self, seg_id, crc, length, sectors, dirty_bits):
        self.id = seg_id
        self.checksum = crc
        self.length = length
        self.sectors = sectors
        self.dirty_bits = dirty_bits


def parse_header(block0) -> SegmentHeader:
    """The header and metablocks of block 0 (no check of the data)."""
    seg_id, crc, length = HEADER.unpack_from(block0, 0)
    n = min(length, BLOCKS_PER_SEGMENT)
    sectors, bits = [], []
    for i in range(n):
        s, b = METABLOCK.unpack_from(block0, HEADER_BYTES + METABLOCK.size * i)
        sectors.append(s)
        bits.append(b)
    return SegmentHeader(seg_id, crc, length, sectors, bits)


def segment_problem(hdr: SegmentHeader, block0, data, geo: Geometry, slot: int,
                    backing_sectors: int):
    """Why a segment read from ``slot`` must not be replayed, or None.
    ``data`` holds at least its ``length`` data blocks."""
    if hdr.id == 0:
        return "never written"
    if hdr.length > BLOCKS_PER_SEGMENT:
        return f"length {hdr.length} is over {BLOCKS_PER_SEGMENT}"
    if geo.slot_of(hdr.id) != slot:
        return f"id {hdr.id} belongs in slot {geo.slot_of(hdr.id)}"
    if len(data) < BLOCK * hdr.length:
        return "data runs past the end of the cache"
    if checksum(block0, memoryview(data)[:BLOCK * hdr.length]) != hdr.checksum:
        return "checksum mismatch"
    for i, s in enumerate(hdr.sectors):
        if s % BLOCK_SECTORS or s + BLOCK_SECTORS > backing_sectors:
            return f"metablock {i}: sector {s} is not a 4 KiB block of the backing device"
    return None


# ------------------------------------------------------------ superblock
def superblock_magic(sector0) -> int:
    return U32.unpack_from(sector0, 0)[0]


def is_blank(sector0) -> bool:
    return not any(sector0[:SECTOR])


def header_block() -> bytes:
    return U32.pack(MAGIC) + bytes(BLOCK - U32.size)


def record_block(last_writeback: int) -> bytes:
    """The 4 KiB write that ends at the record sector (sectors 2040..2047)."""
    return bytes(BLOCK - SECTOR) + U64.pack(last_writeback) + bytes(SECTOR - U64.size)


def parse_record(sector2047) -> int:
    return U64.unpack_from(sector2047, 0)[0]


def format_writes(geo: Geometry):
    """[(offset, bytes, barrier)] that format a cache, in order: the whole
    superblock region zeroed, block 0 of every slot zeroed, then (after a
    flush: ``barrier``) the magic last, so an interrupted format is simply
    redone."""
    zero_block = bytes(BLOCK)
    out = [(0, bytes(SB_BYTES), False)]
    out += [(geo.slot_offset(s), zero_block, False) for s in range(geo.nr_segments)]
    out.append((0, header_block(), True))
    return out
