"""Block manager: fixed 4 KiB metadata blocks on a store, checksummed by type.

Rules of this module: the lowest layer of persistent-data.  It knows blocks
and their validators, nothing about trees or transactions.  A store is any
object with ``read_at(offset, length)``, ``write_at(offset, data)``,
``flush()`` and ``size`` (bytes), e.g. ``pydm.store.FileStore``.

Every block type has a validator: the checksum is CRC32C (Castagnoli, seed
0xFFFFFFFF, no final inversion) of bytes 4..4095, xor'ed with a per-type
constant and stored little-endian at offset 0; the block's own number sits at
a per-type offset.  A block that fails its validator raises
``CorruptBlockError`` naming the block, its type and the reason.
"""

import errno
import struct

import google_crc32c

from pydm.errors import PydmError

BLOCK_SIZE = 4096
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


class MetadataError(PydmError):
    """Metadata that cannot be used (bad format, out of space, I/O error)."""


class CorruptBlockError(MetadataError):
    def __init__(self, block, kind, reason):
        super().__init__(f"metadata block {block} ({kind}): {reason}", errno.EILSEQ)
        self.block = block
        self.kind = kind
        self.reason = reason


def checksum(data, xor: int) -> int:
    """dm-persistent-data's block checksum of ``data[4:]``."""
    return (google_crc32c.value(bytes(data[4:])) ^ 0xFFFFFFFF ^ xor) & 0xFFFFFFFF


class Validator:
    """Checksum constant and blocknr position of one block type."""

    def __init__(self, kind: str, xor: int, blocknr_offset: int = 8, check=None):
        self.kind = kind
        self.xor = xor
        self.blocknr_offset = blocknr_offset
        self.extra_check = check      # optional fn(data) -> reason or None

    def prepare(self, data: bytearray, block: int) -> None:
        """Stamp the block number and checksum before a write."""
        _U64.pack_into(data, self.blocknr_offset, block)
        _U32.pack_into(data, 0, checksum(data, self.xor))

    def check(self, data, block: int) -> None:
        want = _U32.unpack_from(data, 0)[0]
        got = checksum(data, self.xor)
        if want != got:
            raise CorruptBlockError(block, self.kind,
                                    f"bad checksum (stored {want:#010x}, computed {got:#010x})")
        found = _U64.unpack_from(data, self.blocknr_offset)[0]
        if found != block:
            raise CorruptBlockError(block, self.kind,
                                    f"block number field says {found} (wrong location)")
        if self.extra_check is not None:
            reason = self.extra_check(data)
            if reason:
                raise CorruptBlockError(block, self.kind, reason)


class BlockManager:
    """Reads and writes whole blocks; keeps a small cache of validated blocks."""

    CACHE_BLOCKS = 4096

    def __init__(self, store, readonly: bool = False):
        self.store = store
        self.readonly = readonly
        self.nr_blocks = store.size // BLOCK_SIZE
        self._cache = {}          # block -> (bytes as on disk, validator it passed)
        self.reads = 0
        self.writes = 0
        self.flushes = 0

    def _check_range(self, block):
        if not 0 <= block < self.nr_blocks:
            raise MetadataError(f"metadata block {block} is outside the metadata device "
                                f"({self.nr_blocks} blocks)", errno.EINVAL)

    def read_raw(self, block: int) -> bytes:
        self._check_range(block)
        try:
            data = self.store.read_at(block * BLOCK_SIZE, BLOCK_SIZE)
        except OSError as e:
            raise MetadataError(f"cannot read metadata block {block}: {e.strerror or e}",
                                e.errno or errno.EIO) from None
        self.reads += 1
        return data

    def read(self, block: int, validator: Validator) -> bytes:
        hit = self._cache.get(block)
        if hit is not None:
            if hit[1] is validator:
                return hit[0]
            # cached as another block type: a reference of the wrong kind
            validator.check(hit[0], block)
            return hit[0]
        data = self.read_raw(block)
        validator.check(data, block)
        if len(self._cache) >= self.CACHE_BLOCKS:
            self._cache.clear()
        self._cache[block] = (data, validator)
        return data

    def write(self, block: int, data: bytearray, validator: Validator) -> None:
        """Seal (blocknr + checksum) and write one block."""
        self._check_range(block)
        if self.readonly:
            raise MetadataError("metadata is open read-only", errno.EROFS)
        validator.prepare(data, block)
        buf = bytes(data)
        try:
            self.store.write_at(block * BLOCK_SIZE, buf)
        except OSError as e:
            self._cache.pop(block, None)
            raise MetadataError(f"cannot write metadata block {block}: {e.strerror or e}",
                                e.errno or errno.EIO) from None
        self.writes += 1
        self._cache[block] = (buf, validator)

    def write_many(self, items) -> None:
        """Seal and write [(block, data, validator)] in block order, one store
        write per run of adjacent blocks: a commit's blocks are mostly
        adjacent, and each system call is a GIL hand-off in a busy daemon."""
        if self.readonly:
            raise MetadataError("metadata is open read-only", errno.EROFS)
        items = sorted(items, key=lambda it: it[0])
        i = 0
        while i < len(items):
            j = i + 1
            while j < len(items) and items[j][0] == items[j - 1][0] + 1:
                j += 1
            run = []
            for block, data, validator in items[i:j]:
                self._check_range(block)
                validator.prepare(data, block)
                run.append(bytes(data))
            first = items[i][0]
            try:
                self.store.write_at(first * BLOCK_SIZE, run[0] if len(run) == 1 else b"".join(run))
            except OSError as e:
                for block, _d, _v in items[i:j]:
                    self._cache.pop(block, None)
                raise MetadataError(f"cannot write metadata blocks {first}-{items[j - 1][0]}: "
                                    f"{e.strerror or e}", e.errno or errno.EIO) from None
            for (block, _d, validator), buf in zip(items[i:j], run):
                self._cache[block] = (buf, validator)
            self.writes += j - i
            i = j

    def write_zeroes(self, block: int) -> None:
        self._check_range(block)
        self.store.write_at(block * BLOCK_SIZE, bytes(BLOCK_SIZE))
        self._cache.pop(block, None)
        self.writes += 1

    def flush(self) -> None:
        try:
            self.store.flush()
        except OSError as e:
            raise MetadataError(f"cannot flush metadata: {e.strerror or e}",
                                e.errno or errno.EIO) from None
        self.flushes += 1

    def forget(self) -> None:
        """Drop the cache (after a failed commit the disk is the truth)."""
        self._cache.clear()
