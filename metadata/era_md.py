"""dm-era metadata: superblock, writesets, era array and metadata snapshots.

Rules of this module: one ``EraMetadata`` per open metadata store, used by one
thread at a time (the era target's worker; tools are single-threaded).  It
speaks only to the persistent-data layers below (transaction manager, space
map, btree, array, bitset) and writes exactly the Linux dm-era format:

* block 0: the superblock (magic 0x7EC1077B, version 1, space map root at
  the unaligned offset 44, data block size, nr_blocks, current era, the
  current writeset record, the writeset tree root, the era array root, the
  metadata snapshot location);
* the writeset tree: era (u64 key) -> ``nr_bits u32 | bitset root u64``,
  each entry holding a reference on its bitset;
* the era array: one le32 per origin block, the last digested era it was
  written in.

In memory: the current writeset as a bitarray (dirty array blocks noted as
bits are set), the era array as a numpy array (dirty array blocks noted as
writesets are digested).  ``commit`` writes those, then the transaction
manager's commit writes every dirty block, flushes, writes the superblock
last and flushes again.
"""

import errno
import os
import struct

import numpy as np
from bitarray import bitarray

from pydm.metadata import array, bitset, btree
from pydm.metadata.block_manager import (BLOCK_SIZE, BlockManager, CorruptBlockError,
                                         MetadataError, Validator)
from pydm.metadata.space_map import MAX_METADATA_BLOCKS, DiskSpaceMap, NoSpace
from pydm.metadata.transaction import TransactionManager

MAGIC = 2126579579
VERSION = 1
METADATA_BLOCK_SECTORS = 8
UUID_LEN = 16
MAX_ERA = 0xFFFFFFFF
ERA_VALUE = 4
ERAS_PER_BLOCK = array.max_entries_for(ERA_VALUE)        # 1018
MIN_METADATA_BLOCKS = 8
# Era array blocks one digest step rewrites.  A step shadows them, and their
# old copies are freed only when it commits, so this bounds the space a digest
# needs beyond what is committed (a whole writeset at once could need a second
# era array: 1 TiB at 64 KiB blocks is 64 MiB) and how long a step holds the
# era worker.
DIGEST_BLOCKS = 256

_SB = struct.Struct("<IIQ16sQI128sIIIIIQQQQ")            # 224 bytes
WRITESET = struct.Struct("<IQ")                          # writeset record: nr_bits, root
SB_VALIDATOR = Validator("era superblock", 146538381)


class Superblock:
    """The 224 bytes at the start of block 0 (or of a snapshot copy)."""

    __slots__ = ("flags", "blocknr", "uuid", "magic", "version", "sm_root",
                 "data_block_size", "metadata_block_size", "nr_blocks", "current_era",
                 "ws_nr_bits", "ws_root", "writeset_tree_root", "era_array_root",
                 "metadata_snap")

    @classmethod
    def unpack(cls, data):
        sb = cls()
        (_c, sb.flags, sb.blocknr, sb.uuid, sb.magic, sb.version, sb.sm_root,
         sb.data_block_size, sb.metadata_block_size, sb.nr_blocks, sb.current_era,
         sb.ws_nr_bits, sb.ws_root, sb.writeset_tree_root, sb.era_array_root,
         sb.metadata_snap) = _SB.unpack_from(data, 0)
        return sb

    def pack(self) -> bytearray:
        buf = bytearray(BLOCK_SIZE)
        _SB.pack_into(buf, 0, 0, self.flags, self.blocknr, self.uuid, self.magic,
                      self.version, self.sm_root, self.data_block_size,
                      self.metadata_block_size, self.nr_blocks, self.current_era,
                      self.ws_nr_bits, self.ws_root, self.writeset_tree_root,
                      self.era_array_root, self.metadata_snap)
        return buf

    def check(self, where=0):
        if self.magic != MAGIC:
            raise CorruptBlockError(where, "era superblock", f"bad magic {self.magic:#x}")
        if self.version != VERSION:
            raise CorruptBlockError(where, "era superblock",
                                    f"unsupported version {self.version}")
        if self.metadata_block_size != METADATA_BLOCK_SECTORS:
            raise CorruptBlockError(where, "era superblock",
                                    f"metadata block size {self.metadata_block_size} "
                                    f"sectors (expected {METADATA_BLOCK_SECTORS})")
        if not self.writeset_tree_root or not self.era_array_root:
            raise CorruptBlockError(where, "era superblock", "missing tree roots")

    @property
    def uuid_text(self) -> str:
        return self.uuid.split(b"\0", 1)[0].decode("ascii", "replace")


def read_superblock(bm, location=0) -> Superblock:
    data = bm.read(location, SB_VALIDATOR)
    sb = Superblock.unpack(data)
    sb.check(location)
    return sb


def is_blank(store) -> bool:
    """True when block 0 (exactly bytes 0..4095) is all zero: format it."""
    return store.read_at(0, BLOCK_SIZE) == bytes(BLOCK_SIZE)


def writeset_info(tm):
    """Btree info for the writeset tree: values hold references on bitsets."""
    bs_info = bitset.info_for(tm)

    def inc(v):
        tm.inc(WRITESET.unpack(v)[1])

    def dec(v):
        bitset.delete(bs_info, WRITESET.unpack(v)[1])
    return btree.BTreeInfo(tm, WRITESET.size, value_inc=inc, value_dec=dec)


def read_writesets(reader, root):
    """{era: (nr_bits, bitset root)} of a writeset tree."""
    return {era: WRITESET.unpack(v) for era, v in btree.walk(reader, root)}


def read_era_array(reader, root, nr_blocks) -> np.ndarray:
    raw = array.read_all(reader, root, nr_blocks, ERA_VALUE)
    return np.frombuffer(raw, dtype="<u4").astype(np.uint32)


def usable_blocks(store) -> int:
    """Metadata blocks ``store`` can hold (the space map's index bounds them)."""
    return min(store.size // BLOCK_SIZE, MAX_METADATA_BLOCKS)


def space_advice(nr_blocks: int) -> str:
    """How much metadata ``nr_blocks`` era blocks want, in words for people."""
    writeset = -(-nr_blocks // bitset.BITS_PER_BLOCK)
    mib = 1 << 20
    return (f"the era array takes 4 bytes per block and each writeset "
            f"{-(-writeset * BLOCK_SIZE // 1024)} KiB; give it at least "
            f"{-(-metadata_blocks_wanted(nr_blocks) * BLOCK_SIZE // mib)} MiB")


def restore_blocks_wanted(nr_blocks: int, writeset_bits) -> int:
    """Metadata blocks a restore of ``nr_blocks`` era blocks with writesets
    of ``writeset_bits`` bits each writes (era_restore's sizing, doubled as
    room for the space map and the btrees' splits)."""
    need = 16 + 2 * -(-nr_blocks // ERAS_PER_BLOCK)
    for bits in writeset_bits:
        need += 2 + 2 * -(-bits // bitset.BITS_PER_BLOCK)
    return 2 * need


def metadata_blocks_wanted(nr_blocks: int) -> int:
    """Metadata blocks to format for ``nr_blocks`` era blocks and keep
    working: the era array and its btree, the current writeset and a few
    archived ones, and a digest window."""
    era_array = -(-nr_blocks // ERAS_PER_BLOCK)
    writeset = -(-nr_blocks // bitset.BITS_PER_BLOCK)
    return (era_array + era_array // 127 + 6 * writeset + 16
            + min(DIGEST_BLOCKS, era_array))


def bits_to_bool(bits: bitarray, n: int) -> np.ndarray:
    """The first n bits of a little-endian bitarray as a numpy bool array."""
    raw = np.frombuffer(bits.tobytes(), dtype=np.uint8)
    return np.unpackbits(raw, bitorder="little")[:n].astype(bool)


class EraMetadata:
    def __init__(self, store, bm, tm, sm, sb, readonly=False):
        self.store = store
        self.bm = bm
        self.tm = tm
        self.sm = sm
        self.readonly = readonly
        self.sb = sb
        self.ws_info = writeset_info(tm)
        self.bs_info = bitset.info_for(tm)
        self.ea_info = array.ArrayInfo(tm, ERA_VALUE)
        self.current_bits = None
        self._ws_dirty = set()
        self.era_array = None
        self._ea_dirty = set()
        self.archived = {}
        self._digest = None      # [era, root, nr_blocks, bits, next block] (digest_step)

    # ------------------------------------------------------------ opening
    @classmethod
    def format(cls, store, data_block_size: int, nr_blocks: int, uuid: bytes = None):
        nr_meta = usable_blocks(store)
        if nr_meta < MIN_METADATA_BLOCKS:
            raise MetadataError(f"metadata device too small: {store.size} bytes "
                                f"(at least {MIN_METADATA_BLOCKS * BLOCK_SIZE})", errno.ENOSPC)
        if not 0 < nr_blocks < 1 << 31:
            raise MetadataError(f"bad number of era blocks {nr_blocks}", errno.EINVAL)
        bm = BlockManager(store)
        sm = DiskSpaceMap(nr_meta)
        sm.set(0, 1)
        tm = TransactionManager(bm, sm)
        sm.attach(tm)
        sb = Superblock()
        sb.flags = 0
        sb.blocknr = 0
        if uuid is None:
            uuid = os.urandom(8).hex()[:UUID_LEN - 1].encode()
        sb.uuid = uuid.ljust(UUID_LEN, b"\0")[:UUID_LEN]
        sb.magic, sb.version = MAGIC, VERSION
        sb.sm_root = bytes(128)
        sb.data_block_size = data_block_size
        sb.metadata_block_size = METADATA_BLOCK_SECTORS
        sb.nr_blocks = nr_blocks
        sb.current_era = 0
        sb.ws_nr_bits = 0
        sb.ws_root = 0
        sb.metadata_snap = 0
        md = cls(store, bm, tm, sm, sb)
        sm.ref_root = btree.empty(sm.rc_info)
        try:
            sb.writeset_tree_root = btree.empty(md.ws_info)
            sb.era_array_root = array.resize(md.ea_info, array.empty(md.ea_info), 0,
                                             nr_blocks, bytes(ERA_VALUE))
            md.era_array = np.zeros(nr_blocks, np.uint32)
            md.commit()
        except NoSpace:
            # nothing was written: the superblock goes last
            raise MetadataError(f"metadata device too small for {nr_blocks} era blocks "
                                f"({store.size} bytes): {space_advice(nr_blocks)}",
                                errno.ENOSPC) from None
        return md

    @classmethod
    def open(cls, store, readonly: bool = False, load_space_map: bool = True):
        bm = BlockManager(store, readonly)
        if bm.nr_blocks < 1:
            raise MetadataError("metadata device too small: not even one 4 KiB block")
        if is_blank(store):
            raise MetadataError("metadata is not formatted (block 0 is all zero)",
                                errno.ENODATA)
        sb = read_superblock(bm, 0)
        if sb.blocknr != 0:
            raise CorruptBlockError(0, "era superblock",
                                    f"block number field says {sb.blocknr}")
        sm = DiskSpaceMap.open(bm, sb.sm_root[:32]) if load_space_map else None
        tm = TransactionManager(bm, sm)
        if sm is not None:
            sm.attach(tm)
        md = cls(store, bm, tm, sm, sb, readonly)
        md._load()
        return md

    @classmethod
    def open_or_format(cls, store, data_block_size: int, nr_blocks: int):
        if is_blank(store):
            return cls.format(store, data_block_size, nr_blocks)
        md = cls.open(store)
        if md.sb.data_block_size != data_block_size:
            raise MetadataError(f"metadata was made for a data block size of "
                                f"{md.sb.data_block_size} sectors, not {data_block_size}; "
                                f"changing it is not supported", errno.EINVAL)
        return md

    def _load(self):
        sb = self.sb
        if sb.ws_root:
            self.current_bits = bitset.read(self.tm, sb.ws_root, sb.ws_nr_bits)
        self.archived = read_writesets(self.tm, sb.writeset_tree_root)
        self.era_array = read_era_array(self.tm, sb.era_array_root, sb.nr_blocks)

    def close(self) -> None:
        self.current_bits = None
        self.era_array = None
        self._digest = None

    # ------------------------------------------------------------- fields
    @property
    def current_era(self) -> int:
        return self.sb.current_era

    @property
    def nr_blocks(self) -> int:
        return self.sb.nr_blocks

    @property
    def data_block_size(self) -> int:
        return self.sb.data_block_size

    @property
    def snapshot_block(self):
        return self.sb.metadata_snap or None

    @property
    def uuid_text(self) -> str:
        return self.sb.uuid_text

    def grow_to_store(self) -> bool:
        """Take in the blocks a metadata file gained since its space map was
        made (the file was made bigger); True if it grew.  The next commit
        writes the larger space map."""
        refresh = getattr(self.store, "refresh_size", None)
        if refresh is not None:
            refresh()
        have = usable_blocks(self.store)
        if have <= self.sm.nr_blocks:
            return False
        self.bm.nr_blocks = have
        self.sm.extend(have - self.sm.nr_blocks)
        return True

    def metadata_usage(self):
        return self.sm.nr_allocated, self.sm.nr_blocks

    def has_archived(self) -> bool:
        return bool(self.archived)

    def known_eras(self):
        return sorted(set(self.archived) | {self.current_era})

    # ------------------------------------------------------ current writeset
    def marked(self, block: int) -> bool:
        return self.current_bits is not None and bool(self.current_bits[block])

    def mark(self, block: int) -> bool:
        """Set ``block`` in the current writeset; True if it was not set."""
        return self.mark_range(block, block + 1)

    def mark_range(self, first: int, end: int) -> bool:
        """Set blocks [first, end) in the current writeset; True if any was
        not set."""
        bits = self.current_bits
        if bits is None:
            raise MetadataError("no current writeset (the device has not been resumed)",
                                errno.EINVAL)
        if not 0 <= first < end <= self.sb.ws_nr_bits:
            raise MetadataError(f"blocks {first}-{end - 1} outside the current writeset "
                                f"({self.sb.ws_nr_bits} bits)", errno.EINVAL)
        if bits.find(0, first, end) < 0:
            return False
        bits[first:end] = 1
        per = bitset.BITS_PER_BLOCK
        self._ws_dirty.update(range(first // per, (end - 1) // per + 1))
        return True

    def _flush_writeset(self):
        if self._ws_dirty:
            self.sb.ws_root = bitset.write_blocks(self.bs_info, self.sb.ws_root,
                                                  self.current_bits, self._ws_dirty)
            self._ws_dirty = set()

    def archive(self) -> None:
        """Move the current writeset into the writeset tree under its era."""
        sb = self.sb
        if not sb.ws_root:
            return
        self._flush_writeset()
        record = WRITESET.pack(sb.ws_nr_bits, sb.ws_root)
        sb.writeset_tree_root = btree.insert(self.ws_info, sb.writeset_tree_root,
                                             sb.current_era, record)
        self.archived[sb.current_era] = (sb.ws_nr_bits, sb.ws_root)
        sb.ws_root = 0
        sb.ws_nr_bits = 0
        self.current_bits = None

    def checkpoint(self) -> int:
        """Roll over: archive the current writeset, start an empty one, era+1."""
        sb = self.sb
        if sb.current_era >= MAX_ERA:
            raise MetadataError("the era counter is at its maximum (2^32 - 1); "
                                "tracking must be reset", errno.EOVERFLOW)
        self.archive()
        sb.ws_nr_bits = sb.nr_blocks
        sb.ws_root = bitset.create(self.bs_info, sb.nr_blocks)
        self.current_bits = bitset.zeros(sb.nr_blocks)
        sb.current_era += 1
        return sb.current_era

    def add_archived(self, era: int, nr_bits: int, bits) -> None:
        """Put a finished writeset straight into the tree (restore)."""
        if era in self.archived:
            raise MetadataError(f"writeset for era {era} already exists", errno.EEXIST)
        b = bitset.zeros(nr_bits)
        for i in bits:
            b[i] = 1
        root = bitset.create(self.bs_info, nr_bits)
        root = bitset.write_blocks(self.bs_info, root, b,
                                   range(-(-len(b) // bitset.BITS_PER_BLOCK)))
        self.sb.writeset_tree_root = btree.insert(self.ws_info, self.sb.writeset_tree_root,
                                                  era, WRITESET.pack(nr_bits, root))
        self.archived[era] = (nr_bits, root)

    def set_eras(self, blocks, eras) -> None:
        """Set era array entries (restore, tests)."""
        idx = np.asarray(blocks, dtype=np.int64)
        self.era_array[idx] = np.asarray(eras, dtype=np.uint32)
        self._ea_dirty.update(np.unique(idx // ERAS_PER_BLOCK).tolist())

    # ------------------------------------------------------------- digest
    def digest_step(self, max_steps: int = 1) -> bool:
        """Fold the oldest archived writeset into the era array, one window
        of DIGEST_BLOCKS era array blocks' worth of origin blocks (from the
        next set bit; fewer when metadata space is short) per step; True if
        more remain.

        The writeset leaves the tree with its last step, so until then both
        say the same of its blocks, and a crash or reopen mid-way only means
        that writeset is folded again from its start (setting an entry to
        the era it already holds)."""
        sb = self.sb
        for _ in range(max_steps):
            if not self.archived:
                break
            # a step needs about as many free blocks as it rewrites, plus a
            # few for the btree and the space map: with little room left,
            # smaller steps still get through (and free the writesets)
            span = max(1, min(DIGEST_BLOCKS, (self.sm.nr_free - 16) // 2)) * ERAS_PER_BLOCK
            era = min(self.archived)
            nr_bits, root = self.archived[era]
            cur = self._digest
            if cur is None or cur[:3] != [era, root, sb.nr_blocks]:
                bits = bitset.read(self.tm, root, nr_bits)[:min(nr_bits, sb.nr_blocks)]
                cur = self._digest = [era, root, sb.nr_blocks, bits, 0]
            bits, pos = cur[3], cur[4]
            first = bits.find(1, pos)
            if first >= 0:
                lo = first
                hi = min(lo + span, len(bits))
                part = lo + np.flatnonzero(bits_to_bool(bits[lo:hi], hi - lo))
                self.era_array[part] = era
                self._ea_dirty.update(np.unique(part // ERAS_PER_BLOCK).tolist())
                pos = cur[4] = hi
            if first < 0 or bits.find(1, pos) < 0:
                sb.writeset_tree_root = btree.remove(self.ws_info, sb.writeset_tree_root, era)
                del self.archived[era]
                self._digest = None
        return bool(self.archived)

    def digest_all(self) -> None:
        while self.digest_step(64):
            pass

    def _flush_era_array(self):
        if self._ea_dirty:
            root = self.sb.era_array_root
            arr = self.era_array
            for j in sorted(self._ea_dirty):
                # per block: converting the whole array would copy all of it
                # (64 MiB for 1 TiB at 64 KiB blocks) for every digest step
                vals = arr[j * ERAS_PER_BLOCK:(j + 1) * ERAS_PER_BLOCK].astype("<u4")
                root = array.set_block(self.ea_info, root, j, vals.tobytes())
            self.sb.era_array_root = root
            self._ea_dirty = set()

    # ------------------------------------------------------------- resize
    def resize(self, nr_blocks: int) -> None:
        """Grow or shrink the era array (new entries 0).  The current writeset
        keeps its size until the next rollover, as in the kernel."""
        if not 0 < nr_blocks < 1 << 31:
            raise MetadataError(f"bad number of era blocks {nr_blocks}", errno.EINVAL)
        sb = self.sb
        old = sb.nr_blocks
        if nr_blocks == old:
            return
        self._flush_era_array()
        sb.era_array_root = array.resize(self.ea_info, sb.era_array_root, old, nr_blocks,
                                         bytes(ERA_VALUE))
        if nr_blocks > old:
            self.era_array = np.concatenate([self.era_array,
                                             np.zeros(nr_blocks - old, np.uint32)])
        else:
            self.era_array = self.era_array[:nr_blocks].copy()
        sb.nr_blocks = nr_blocks

    # ----------------------------------------------------------- snapshots
    def take_snapshot(self) -> int:
        """Keep a copy of the just-committed superblock for readers; the live
        trees become shared with it.  Callers roll over and commit first."""
        sb = self.sb
        if sb.metadata_snap:
            raise MetadataError("a metadata snapshot already exists", errno.EINVAL)
        self.commit()
        self.tm.inc(0)
        clone, _buf, _shared = self.tm.shadow(0, SB_VALIDATOR)
        self.tm.inc(sb.writeset_tree_root)
        self.tm.inc(sb.era_array_root)
        sb.metadata_snap = clone
        return clone

    def drop_snapshot(self) -> None:
        sb = self.sb
        loc = sb.metadata_snap
        if not loc:
            raise MetadataError("no metadata snapshot to drop", errno.EINVAL)
        snap = read_superblock(self.tm, loc)
        sb.metadata_snap = 0
        btree.delete(self.ws_info, snap.writeset_tree_root)
        array.delete(self.ea_info, snap.era_array_root)
        self.tm.dec(loc)

    def read_snapshot(self) -> Superblock:
        if not self.sb.metadata_snap:
            raise MetadataError("no metadata snapshot taken", errno.EINVAL)
        return read_superblock(self.tm, self.sb.metadata_snap)

    # ------------------------------------------------------------- queries
    def changed_since(self, since: int, include_current: bool = True,
                      snapshot: bool = False) -> np.ndarray:
        """Bool array over origin blocks: written in era ``since`` or later."""
        if snapshot:
            snap = self.read_snapshot()
            n = snap.nr_blocks
            eras = read_era_array(self.tm, snap.era_array_root, n)
            archived = read_writesets(self.tm, snap.writeset_tree_root)
        else:
            n = self.sb.nr_blocks
            eras = self.era_array
            archived = self.archived
        out = eras >= since if since > 0 else np.ones(n, dtype=bool)
        for era, (nr_bits, root) in archived.items():
            if era >= since:
                m = min(nr_bits, n)
                out[:m] |= bits_to_bool(bitset.read(self.tm, root, nr_bits), m)
        if (include_current and not snapshot and self.current_bits is not None
                and self.sb.current_era >= since):
            m = min(self.sb.ws_nr_bits, n)
            out[:m] |= bits_to_bool(self.current_bits, m)
        return out

    # -------------------------------------------------------------- commit
    def commit(self) -> None:
        if self.readonly:
            raise MetadataError("metadata is open read-only", errno.EROFS)
        self._flush_writeset()
        self._flush_era_array()
        sb = self.sb

        def set_root(buf, root):
            buf[44:44 + len(root)] = root
        buf = sb.pack()
        self.tm.commit(buf, SB_VALIDATOR, set_root)
        sb.sm_root = bytes(buf[44:172])
