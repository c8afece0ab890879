"""Space maps: reference counts of metadata blocks.

Rules of this module: ``SpaceMap`` keeps the counts of the current
transaction and of the last commit in memory (numpy arrays), allocates only
blocks free in *both* (so a block freed in this transaction is reused only
after the commit), and remembers which blocks it touched so a commit costs
what changed, not the size of the device.  ``DiskSpaceMap`` adds the kernel's
on-disk format (dm-space-map-metadata):

* an index block (csum, padding, blocknr, then 255 entries of
  ``blocknr u64 | nr_free u32 | none_free_before u32``), one entry per
  bitmap;
* bitmap blocks (16-byte header, then 16320 two-bit counts; in each le64 word
  the entry's *high* bit comes first), 3 meaning "see the ref-count tree";
* a btree (u64 block -> le32 count) holding every count >= 3.

The disk structures are written by ``commit``, which shadows each changed
bitmap and the index (a committed block is never written in place) and
iterates until allocating those blocks changes nothing more.
"""

import errno
import struct

import numpy as np

from pydm.metadata import btree
from pydm.metadata.block_manager import BLOCK_SIZE, MetadataError, Validator

ENTRIES_PER_BITMAP = (BLOCK_SIZE - 16) * 4        # 16320
MAX_BITMAPS = 255
MAX_METADATA_BLOCKS = MAX_BITMAPS * ENTRIES_PER_BITMAP
ALLOC_BATCH = 256
SM_ROOT_SIZE = 32

BITMAP_VALIDATOR = Validator("space map bitmap", 240779)
INDEX_VALIDATOR = Validator("space map index", 160478)

_ROOT = struct.Struct("<QQQQ")
_INDEX_ENTRY = struct.Struct("<QII")


class NoSpace(MetadataError):
    def __init__(self, nr_blocks):
        super().__init__(f"out of metadata space ({nr_blocks} blocks all in use)", errno.ENOSPC)


class SpaceMap:
    """In-memory reference counts (also the bootstrap map for formatting)."""

    def __init__(self, nr_blocks: int):
        nr_blocks = min(nr_blocks, MAX_METADATA_BLOCKS)
        self.nr_blocks = nr_blocks
        self.counts = np.zeros(nr_blocks, dtype=np.uint32)
        self.committed = np.zeros(nr_blocks, dtype=np.uint32)
        self.nr_allocated = 0
        self._touched = []          # blocks whose count changed since the commit
        self._hint = 0
        self._cand = []             # free blocks found by the last scan

    # -- counts ----------------------------------------------------------
    def get(self, b: int) -> int:
        return int(self.counts[b])

    def _set(self, b, v):
        old = int(self.counts[b])
        if old == v:
            return
        if v < 0:
            raise MetadataError(f"space map: reference count of block {b} would go "
                                f"below zero", errno.EINVAL)
        self.counts[b] = v
        if old == 0:
            self.nr_allocated += 1
        elif v == 0:
            self.nr_allocated -= 1
        self._touched.append(b)

    def set(self, b: int, v: int) -> None:
        self._set(b, v)

    def inc(self, b: int, n: int = 1) -> None:
        self._set(b, int(self.counts[b]) + n)

    def dec(self, b: int, n: int = 1) -> None:
        self._set(b, int(self.counts[b]) - n)

    @property
    def nr_free(self) -> int:
        return self.nr_blocks - self.nr_allocated

    def alloc(self) -> int:
        """A block free now and at the last commit, with its count set to 1."""
        counts, committed = self.counts, self.committed
        cand = self._cand
        while cand:                 # candidates of the last scan, lowest last
            b = cand.pop()
            if counts[b] == 0 and committed[b] == 0:
                return self._take(b)
        n = self.nr_blocks
        for start, stop in ((self._hint, n), (0, self._hint)):
            pos = start
            while pos < stop:
                end = min(stop, pos + 8192)
                free = np.flatnonzero((counts[pos:end] == 0) & (committed[pos:end] == 0))
                if len(free):
                    # one numpy scan serves the next allocations too (a
                    # commit takes several); each is re-checked when popped
                    self._cand = (pos + free[1:ALLOC_BATCH])[::-1].tolist()
                    return self._take(pos + int(free[0]))
                pos = end
        raise NoSpace(n)

    def _take(self, b):
        self._hint = b + 1
        self._set(b, 1)
        return b

    def extend(self, extra: int) -> None:
        new = min(self.nr_blocks + extra, MAX_METADATA_BLOCKS)
        grow = new - self.nr_blocks
        if grow <= 0:
            return
        self.counts = np.concatenate([self.counts, np.zeros(grow, np.uint32)])
        self.committed = np.concatenate([self.committed, np.zeros(grow, np.uint32)])
        self.nr_blocks = new
        self._cand = []

    def touched(self):
        return self._touched

    def mark_committed(self) -> None:
        if self._touched:
            idx = np.fromiter(set(self._touched), dtype=np.int64)
            self.committed[idx] = self.counts[idx]
            self._hint = 0          # the next scan finds the blocks this commit freed
        self._touched = []

    def rollback(self) -> None:
        """Forget the uncommitted transaction."""
        if self._touched:
            idx = np.fromiter(set(self._touched), dtype=np.int64)
            self.counts[idx] = self.committed[idx]
            self.nr_allocated = int(np.count_nonzero(self.counts))
        self._touched = []
        self._cand = []


# -------------------------------------------------------------- bitmaps
def _entry_bits(c):
    """A count (0-3, int or array) as its two on-disk bits: high bit first."""
    return ((c & 1) << 1) | (c >> 1)


def encode_bitmap(counts) -> bytes:
    """Two-bit entries, high bit first within each pair, little-endian words."""
    c = np.zeros(ENTRIES_PER_BITMAP, np.uint8)
    c[:len(counts)] = np.minimum(counts, 3)
    sw = _entry_bits(c).reshape(-1, 4)
    return (sw[:, 0] | (sw[:, 1] << 2) | (sw[:, 2] << 4) | (sw[:, 3] << 6)).astype(np.uint8).tobytes()


def decode_bitmap(data) -> np.ndarray:
    b = np.frombuffer(data, np.uint8, count=ENTRIES_PER_BITMAP // 4, offset=16)
    sw = np.stack([(b >> (2 * j)) & 3 for j in range(4)], axis=1).reshape(-1)
    return (((sw & 1) << 1) | (sw >> 1)).astype(np.uint32)


class DiskSpaceMap(SpaceMap):
    """The kernel's metadata space map, loaded from and committed to disk."""

    def __init__(self, nr_blocks: int):
        super().__init__(nr_blocks)
        nbm = -(-self.nr_blocks // ENTRIES_PER_BITMAP)
        self.bitmap_locs = [0] * nbm        # committed location of each bitmap
        self.index_loc = 0
        self.ref_root = 0                   # overflow btree root
        self.overflow = {}                  # block -> count, as in the ref-count tree
        self._fresh_bitmaps = set()
        self._fresh_index = False
        self._entries = [(0, 0)] * nbm      # (nr_free, none_free_before) per bitmap
        self._bitmaps = {}                  # bitmap index -> its last written body
        self.rc_info = None
        # A new map writes every bitmap at its first commit, used or not.
        self._touched.extend(range(0, self.nr_blocks, ENTRIES_PER_BITMAP))

    def attach(self, tm) -> None:
        self.rc_info = btree.BTreeInfo(tm, 4)

    # -- load --------------------------------------------------------------
    @classmethod
    def open(cls, reader, root_bytes: bytes):
        nr_blocks, nr_alloc, index_loc, ref_root = _ROOT.unpack_from(root_bytes, 0)
        if nr_blocks == 0 or nr_blocks > MAX_METADATA_BLOCKS:
            raise MetadataError(f"space map: bad number of blocks {nr_blocks}")
        sm = cls(nr_blocks)
        sm.index_loc = index_loc
        sm.ref_root = ref_root
        idx = reader.read(index_loc, INDEX_VALIDATOR)
        for i in range(len(sm.bitmap_locs)):
            loc, nf, nfb = _INDEX_ENTRY.unpack_from(idx, 16 + i * 16)
            sm.bitmap_locs[i] = loc
            sm._entries[i] = (nf, nfb)
            data = reader.read(loc, BITMAP_VALIDATOR)
            lo = i * ENTRIES_PER_BITMAP
            hi = min(lo + ENTRIES_PER_BITMAP, sm.nr_blocks)
            sm.counts[lo:hi] = decode_bitmap(data)[:hi - lo]
        for key, value in btree.walk(reader, ref_root, 4):
            if key >= sm.nr_blocks:
                raise MetadataError(f"space map: ref-count entry for block {key} past the end")
            sm.overflow[key] = struct.unpack("<I", value)[0]
            sm.counts[key] = sm.overflow[key]
        sm.committed[:] = sm.counts
        sm._touched = []
        sm.nr_allocated = int(np.count_nonzero(sm.counts))
        if sm.nr_allocated != nr_alloc:
            raise MetadataError(f"space map: {sm.nr_allocated} blocks in use but the root "
                                f"says {nr_alloc}")
        return sm

    # -- commit ------------------------------------------------------------
    def commit(self, tm) -> bytes:
        """Write changed bitmaps, the index and the ref-count tree through
        ``tm``; return the 32-byte root for the superblock."""
        if not self._touched:
            return self.root_bytes()
        processed = 0
        changed = set()
        while True:
            new = sorted(set(self._touched[processed:]))
            changed.update(new)
            processed = len(self._touched)
            for b in new:
                want = int(self.counts[b])
                want = want if want >= 3 else None
                if self.overflow.get(b) != want:
                    if want is None:
                        self.ref_root = btree.remove(self.rc_info, self.ref_root, b)
                        del self.overflow[b]
                    else:
                        self.ref_root = btree.insert(self.rc_info, self.ref_root, b,
                                                     struct.pack("<I", want))
                        self.overflow[b] = want
            for i in sorted({b // ENTRIES_PER_BITMAP for b in new}):
                if i not in self._fresh_bitmaps:
                    # a committed bitmap is never rewritten in place
                    self._fresh_bitmaps.add(i)
                    old = self.bitmap_locs[i]
                    self.bitmap_locs[i] = self.alloc()
                    if old:
                        self.dec(old)
            if not self._fresh_index:
                self._fresh_index = True
                old = self.index_loc
                self.index_loc = self.alloc()
                if old:
                    self.dec(old)
            if len(self._touched) == processed:
                break
        index = bytearray(BLOCK_SIZE)
        for i, loc in enumerate(self.bitmap_locs):
            if i in self._fresh_bitmaps:
                lo = i * ENTRIES_PER_BITMAP
                part = self.counts[lo:min(lo + ENTRIES_PER_BITMAP, self.nr_blocks)]
                tm.put_block(loc, self._bitmap_block(i, part, changed), BITMAP_VALIDATOR)
                nf = len(part) - int(np.count_nonzero(part))
                self._entries[i] = (nf, int(np.argmin(part != 0)) if nf else len(part))
            nf, nfb = self._entries[i]
            _INDEX_ENTRY.pack_into(index, 16 + i * 16, loc, nf, nfb)
        tm.put_block(self.index_loc, index, INDEX_VALIDATOR)
        return self.root_bytes()

    def _bitmap_block(self, i, part, changed):
        """Bitmap block ``i`` (16-byte header space + entries); a bitmap
        encoded before is patched at the entries that changed, which costs
        far less than encoding 16320 entries for the few a commit touches."""
        body = self._bitmaps.get(i)
        lo = i * ENTRIES_PER_BITMAP
        if body is None:
            body = bytearray(16) + encode_bitmap(part)
            self._bitmaps[i] = body
        else:
            for b in changed:
                j = b - lo
                if 0 <= j < len(part):
                    v = min(int(part[j]), 3)
                    shift = 2 * (j & 3)
                    k = 16 + (j >> 2)
                    body[k] = (body[k] & ~(3 << shift)) | (_entry_bits(v) << shift)
        return bytearray(body)

    def rollback(self) -> None:
        super().rollback()
        self._bitmaps = {}

    def root_bytes(self) -> bytes:
        return _ROOT.pack(self.nr_blocks, self.nr_allocated, self.index_loc, self.ref_root)

    def mark_committed(self) -> None:
        super().mark_committed()
        self._fresh_bitmaps = set()
        self._fresh_index = False

    def extend(self, extra: int) -> None:
        old = self.nr_blocks
        super().extend(extra)
        if self.nr_blocks == old:
            return
        nbm = -(-self.nr_blocks // ENTRIES_PER_BITMAP)
        while len(self.bitmap_locs) < nbm:
            self.bitmap_locs.append(0)
            self._entries.append((0, 0))
        # every bitmap that gained entries must be rewritten at the commit
        for b in range(old, self.nr_blocks, ENTRIES_PER_BITMAP):
            self._touched.append(b)
        self._touched.append(self.nr_blocks - 1)
