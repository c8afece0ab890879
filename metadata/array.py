"""dm-array: fixed-size values in array blocks, indexed by a btree.

Rules of this module: an array is a btree (value size 8) mapping block index
0, 1, 2... to the location of an *array block*: a 24-byte header ``csum u32 |
max_entries u32 | nr_entries u32 | value_size u32 | blocknr u64`` then the
values.  Every array block is full except the last, which holds
``n mod max_entries`` entries.  The array's length is not stored; callers
keep it (era keeps it in the superblock's nr_blocks or writeset nr_bits).
Like btree, every change returns a new root and shadows what it touches.
The values era stores (u32 eras, u64 bitset words) hold no references, so
sharing an array block needs no per-value reference counting.
"""

import errno
import struct

from pydm.metadata import btree
from pydm.metadata.block_manager import BLOCK_SIZE, MetadataError, Validator

HEADER = 24
_AHDR = struct.Struct("<IIIIQ")


def _check_ablock(data):
    _c, mx, nr, vs, _b = _AHDR.unpack_from(data, 0)
    if vs == 0 or HEADER + mx * vs > BLOCK_SIZE:
        return f"max_entries {mx} with value size {vs} does not fit a block"
    if nr > mx:
        return f"nr_entries {nr} > max_entries {mx}"
    return None


VALIDATOR = Validator("array block", 595846735, blocknr_offset=16, check=_check_ablock)
_LE64 = struct.Struct("<Q")


def max_entries_for(value_size: int) -> int:
    return (BLOCK_SIZE - HEADER) // value_size


class ArrayInfo:
    def __init__(self, tm, value_size: int):
        self.tm = tm
        self.value_size = value_size
        self.per_block = max_entries_for(value_size)
        self.btree = btree.BTreeInfo(tm, 8, value_inc=self._inc_ablock,
                                     value_dec=self._dec_ablock)

    def _inc_ablock(self, v):
        self.tm.inc(_LE64.unpack(v)[0])

    def _dec_ablock(self, v):
        self.tm.dec(_LE64.unpack(v)[0])


def _pack_ablock(buf, info, values: bytes):
    nr = len(values) // info.value_size
    buf[4:] = bytes(BLOCK_SIZE - 4)
    _AHDR.pack_into(buf, 0, 0, info.per_block, nr, info.value_size, 0)
    buf[HEADER:HEADER + len(values)] = values


def read_ablock(reader, b: int, value_size: int) -> bytes:
    data = reader.read(b, VALIDATOR)
    _c, _mx, nr, vs, _b = _AHDR.unpack_from(data, 0)
    if vs != value_size:
        raise MetadataError(f"array block {b}: value size {vs}, expected {value_size}",
                            errno.EILSEQ)
    return bytes(data[HEADER:HEADER + nr * vs])


def empty(info) -> int:
    return btree.empty(info.btree)


def _new_ablock(info, values: bytes) -> int:
    b, buf = info.tm.new_block(VALIDATOR)
    _pack_ablock(buf, info, values)
    return b


def set_block(info, root: int, index: int, values: bytes) -> int:
    """Replace the whole contents of array block ``index``; returns the root."""
    old = btree.lookup(info.tm, root, index)
    if old is None:
        raise MetadataError(f"array: no block {index}", errno.EINVAL)
    b = _LE64.unpack(old)[0]
    nb, buf, _shared = info.tm.shadow(b, VALIDATOR)
    _pack_ablock(buf, info, values)
    if nb != b:
        # shadow already dropped our reference to b; the btree still holds
        # it, so put it back before the overwrite drops it for good.
        info.tm.inc(b)
        root = btree.insert(info.btree, root, index, _LE64.pack(nb))
    return root


def get_block(reader, root: int, index: int, value_size: int) -> bytes:
    v = btree.lookup(reader, root, index)
    if v is None:
        raise MetadataError(f"array: no block {index}", errno.EINVAL)
    return read_ablock(reader, _LE64.unpack(v)[0], value_size)


def resize(info, root: int, old_len: int, new_len: int, default: bytes) -> int:
    """Grow (new entries = ``default``) or shrink the array; returns the root."""
    per = info.per_block
    vs = info.value_size
    old_blocks = -(-old_len // per)
    new_blocks = -(-new_len // per)
    if new_len < old_len:
        for i in range(old_blocks - 1, new_blocks - 1, -1):
            root = btree.remove(info.btree, root, i)
        tail = new_len - (new_blocks - 1) * per
        if new_blocks and tail != min(per, old_len - (new_blocks - 1) * per):
            vals = get_block(info.tm, root, new_blocks - 1, vs)[:tail * vs]
            root = set_block(info, root, new_blocks - 1, vals)
        return root
    if new_len == old_len:
        return root
    if old_blocks:
        last = old_blocks - 1
        have = old_len - last * per
        want = min(per, new_len - last * per)
        if want > have:
            vals = get_block(info.tm, root, last, vs) + default * (want - have)
            root = set_block(info, root, last, vals)
    for i in range(old_blocks, new_blocks):
        n = min(per, new_len - i * per)
        b = _new_ablock(info, default * n)
        root = btree.insert(info.btree, root, i, _LE64.pack(b))
    return root


def read_all(reader, root: int, length: int, value_size: int) -> bytes:
    """All values of an array of ``length`` entries, in order, checked."""
    per = max_entries_for(value_size)
    out = []
    expect = 0
    nblocks = -(-length // per)
    for i, v in btree.walk(reader, root):
        if i != expect:
            raise MetadataError(f"array: block index {i} where {expect} was expected",
                                errno.EILSEQ)
        vals = read_ablock(reader, _LE64.unpack(v)[0], value_size)
        want = min(per, length - i * per)
        if len(vals) != want * value_size:
            raise MetadataError(f"array block {i}: {len(vals) // value_size} entries, "
                                f"expected {want}", errno.EILSEQ)
        out.append(vals)
        expect += 1
    if expect != nblocks:
        raise MetadataError(f"array: {expect} blocks, expected {nblocks}", errno.EILSEQ)
    return b"".join(out)


def delete(info, root: int) -> None:
    btree.delete(info.btree, root)


def block_locations(reader, root: int):
    """[(index, array block location)] in index order."""
    return [(i, _LE64.unpack(v)[0]) for i, v in btree.walk(reader, root)]
