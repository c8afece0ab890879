"""Copy-on-write btrees of u64 keys and fixed-size values (dm-btree format).

Rules of this module: functions take a ``BTreeInfo`` (transaction manager,
value size, optional inc/dec callbacks for values that are references) and a
root block, and return the new root: every change shadows the path from the
root down, so the tree reachable from the last committed root never changes.
Reading functions take any *reader* with ``read(block, validator)`` (a
transaction manager or a block manager), so tools walk trees without one.

Node layout: 32-byte header ``csum u32 | flags u32 (1 internal, 2 leaf) |
blocknr u64 | nr_entries u32 | max_entries u32 | value_size u32 | pad u32``,
then ``max_entries`` le64 keys, then the values at ``32 + 8 * max_entries``.
Internal values are le64 child blocks and key[i] is a lower bound of child
i's keys.  Non-root nodes keep at least max_entries // 3 entries.
"""

import errno
import struct
from bisect import bisect_left, bisect_right

from pydm.metadata.block_manager import BLOCK_SIZE, MetadataError, Validator

INTERNAL = 1
LEAF = 2
HEADER = 32
_HDR = struct.Struct("<IIQIIII")


def max_entries_for(value_size: int) -> int:
    n = (BLOCK_SIZE - HEADER) // (8 + value_size)
    return 3 * (n // 3)


def _check_node(data):
    flags, nr, mx, vs = (struct.unpack_from("<I", data, 4)[0],
                         *struct.unpack_from("<III", data, 16))
    if not flags & (INTERNAL | LEAF):
        return f"neither internal nor leaf (flags {flags})"
    if HEADER + (8 + vs) * mx > BLOCK_SIZE:
        return f"max_entries {mx} with value size {vs} does not fit a block"
    if nr > mx:
        return f"nr_entries {nr} > max_entries {mx}"
    return None


VALIDATOR = Validator("btree node", 121107, check=_check_node)


class Node:
    __slots__ = ("flags", "keys", "values", "max_entries", "value_size")

    def __init__(self, flags, keys, values, max_entries, value_size):
        self.flags = flags
        self.keys = keys
        self.values = values
        self.max_entries = max_entries
        self.value_size = value_size

    @property
    def leaf(self) -> bool:
        return bool(self.flags & LEAF)

    @classmethod
    def parse(cls, data, block=None):
        _c, flags, _b, nr, mx, vs, _p = _HDR.unpack_from(data, 0)
        keys = list(struct.unpack_from(f"<{nr}Q", data, HEADER))
        voff = HEADER + 8 * mx
        if flags & INTERNAL:
            if vs != 8:
                raise MetadataError(f"btree node {block}: internal node with value size {vs}",
                                    errno.EILSEQ)
            values = list(struct.unpack_from(f"<{nr}Q", data, voff))
        else:
            raw = bytes(data[voff:voff + nr * vs])
            values = [raw[i * vs:(i + 1) * vs] for i in range(nr)]
        return cls(flags, keys, values, mx, vs)

    def pack_into(self, buf: bytearray) -> None:
        nr = len(self.keys)
        buf[4:] = bytes(BLOCK_SIZE - 4)
        _HDR.pack_into(buf, 0, 0, self.flags, 0, nr, self.max_entries, self.value_size, 0)
        struct.pack_into(f"<{nr}Q", buf, HEADER, *self.keys)
        voff = HEADER + 8 * self.max_entries
        if self.flags & INTERNAL:
            struct.pack_into(f"<{nr}Q", buf, voff, *self.values)
        else:
            buf[voff:voff + nr * self.value_size] = b"".join(self.values)


class BTreeInfo:
    def __init__(self, tm, value_size: int, value_inc=None, value_dec=None):
        self.tm = tm
        self.value_size = value_size
        self.value_inc = value_inc       # fn(value bytes): take a reference
        self.value_dec = value_dec       # fn(value bytes): drop a reference
        self.leaf_max = max_entries_for(value_size)
        self.internal_max = max_entries_for(8)


def read_node(reader, b: int) -> Node:
    return Node.parse(reader.read(b, VALIDATOR), b)


def _shadow(info, b):
    """Shadow node ``b``: (new block, buffer, parsed node)."""
    nb, buf, shared = info.tm.shadow(b, VALIDATOR)
    node = Node.parse(buf, b)
    if shared:
        if node.leaf:
            if info.value_inc is not None:
                for v in node.values:
                    info.value_inc(v)
        else:
            for c in node.values:
                info.tm.inc(c)
    return nb, buf, node


def empty(info) -> int:
    b, buf = info.tm.new_block(VALIDATOR)
    Node(LEAF, [], [], info.leaf_max, info.value_size).pack_into(buf)
    return b


def _new_node(info, flags, keys, values):
    b, buf = info.tm.new_block(VALIDATOR)
    leaf = flags & LEAF
    node = Node(flags, keys, values, info.leaf_max if leaf else info.internal_max,
                info.value_size if leaf else 8)
    node.pack_into(buf)
    return b


# -------------------------------------------------------------- lookups
def lookup(reader, root: int, key: int):
    b = root
    while True:
        n = read_node(reader, b)
        if n.leaf:
            i = bisect_left(n.keys, key)
            if i < len(n.keys) and n.keys[i] == key:
                return n.values[i]
            return None
        i = bisect_right(n.keys, key) - 1
        if i < 0:
            return None
        b = n.values[i]


def walk(reader, root: int, value_size: int = None):
    """Every (key, value) in key order."""
    stack = [root]
    while stack:
        n = read_node(reader, stack.pop())
        if n.leaf:
            yield from zip(n.keys, n.values)
        else:
            stack.extend(reversed(n.values))


def walk_nodes(reader, root: int):
    """(block, node, depth) for every node, parents before children."""
    stack = [(root, 0)]
    while stack:
        b, d = stack.pop()
        n = read_node(reader, b)
        yield b, n, d
        if not n.leaf:
            stack.extend((c, d + 1) for c in reversed(n.values))


# --------------------------------------------------------------- insert
def insert(info, root: int, key: int, value: bytes, dec_old: bool = True) -> int:
    """Insert or overwrite; returns the new root.  Overwriting drops a
    reference on the old value (``dec_old``) unless it is the same value."""
    if len(value) != info.value_size:
        raise ValueError(f"value of {len(value)} bytes for a tree of {info.value_size}")
    new_root, buf, node = _shadow(info, root)
    b = new_root
    parent = None          # (block, buf, node, index of b in parent)
    while True:
        mx = info.leaf_max if node.leaf else info.internal_max
        if len(node.keys) >= mx:
            if parent is None:
                rbuf = buf
                b, buf, node, rnode, idx = _split_root(info, b, buf, node, key)
                parent = (new_root, rbuf, rnode, idx)
            else:
                b, buf, node = _split_child(info, parent, b, buf, node, key)
        if node.leaf:
            i = bisect_left(node.keys, key)
            if i < len(node.keys) and node.keys[i] == key:
                old = node.values[i]
                if dec_old and info.value_dec is not None and old != value:
                    info.value_dec(old)
                node.values[i] = value
            else:
                node.keys.insert(i, key)
                node.values.insert(i, value)
            node.pack_into(buf)
            return new_root
        i = bisect_right(node.keys, key) - 1
        if i < 0:
            node.keys[0] = key          # the new key becomes the lower bound
            i = 0
        child = node.values[i]
        cb, cbuf, cnode = _shadow(info, child)
        node.values[i] = cb
        node.pack_into(buf)
        parent = (b, buf, node, i)
        b, buf, node = cb, cbuf, cnode


def _reparse(info, b):
    buf = info.tm.read(b, VALIDATOR)
    return buf, Node.parse(buf, b)


def _split_root(info, b, buf, node, key):
    """The root stays where it is and becomes an internal node over two new
    children holding its halves; returns the child that should get ``key``."""
    mid = len(node.keys) // 2
    flags = LEAF if node.leaf else INTERNAL
    lb = _new_node(info, flags, node.keys[:mid], node.values[:mid])
    rb = _new_node(info, flags, node.keys[mid:], node.values[mid:])
    rkey = node.keys[mid]
    root = Node(INTERNAL, [node.keys[0], rkey], [lb, rb], info.internal_max, 8)
    root.pack_into(buf)
    idx = 0 if key < rkey else 1
    pick = root.values[idx]
    pbuf, pnode = _reparse(info, pick)
    return pick, pbuf, pnode, root, idx


def _split_child(info, parent, b, buf, node, key):
    pb, pbuf, pnode, idx = parent
    mid = len(node.keys) // 2
    flags = LEAF if node.leaf else INTERNAL
    rkey = node.keys[mid]
    rb = _new_node(info, flags, node.keys[mid:], node.values[mid:])
    del node.keys[mid:]
    del node.values[mid:]
    node.pack_into(buf)
    pnode.keys.insert(idx + 1, rkey)
    pnode.values.insert(idx + 1, rb)
    pnode.pack_into(pbuf)
    if key >= rkey:
        rbuf, rnode = _reparse(info, rb)
        return rb, rbuf, rnode
    return b, buf, node


# --------------------------------------------------------------- remove
def remove(info, root: int, key: int) -> int:
    """Remove ``key`` (which must exist), dropping a reference on its value."""
    if lookup(info.tm, root, key) is None:
        raise MetadataError(f"btree: key {key} not found", errno.ENODATA)
    new_root, buf, node = _shadow(info, root)
    b = new_root
    is_root = True
    while not node.leaf:
        if is_root and len(node.keys) == 1:
            _collapse_into(info, b, buf, node)
            node = Node.parse(buf)
            continue
        i = max(bisect_right(node.keys, key) - 1, 0)
        i = _rebalance(info, buf, node, i, key)
        if len(node.keys) == 1 and is_root:
            _collapse_into(info, b, buf, node)
            node = Node.parse(buf)
            continue
        child = node.values[i]
        cb, cbuf, cnode = _shadow(info, child)
        node.values[i] = cb
        node.pack_into(buf)
        b, buf, node = cb, cbuf, cnode
        is_root = False
    i = bisect_left(node.keys, key)
    old = node.values[i]
    del node.keys[i]
    del node.values[i]
    node.pack_into(buf)
    if info.value_dec is not None:
        info.value_dec(old)
    return new_root


def _collapse_into(info, b, buf, node):
    """An internal root with one child takes the child's contents in place."""
    child = node.values[0]
    cb, cbuf, cnode = _shadow(info, child)
    cnode.pack_into(buf)
    # The root now points at the child's children; the child block goes.
    info.tm.dec(cb)


def _min_entries(node, info):
    return (info.leaf_max if node.leaf else info.internal_max) // 3


def _rebalance(info, pbuf, pnode, i, key):
    """Make sure child i has more than the minimum before descending, by
    merging with or borrowing from a sibling; returns the child index for key."""
    if len(pnode.keys) < 2:
        return i
    j = i + 1 if i + 1 < len(pnode.keys) else i - 1
    lo, hi = min(i, j), max(i, j)
    lb, lbuf, left = _shadow(info, pnode.values[lo])
    rb, rbuf, right = _shadow(info, pnode.values[hi])
    pnode.values[lo] = lb
    pnode.values[hi] = rb
    mx = info.leaf_max if left.leaf else info.internal_max
    total = len(left.keys) + len(right.keys)
    if total < mx:
        left.keys += right.keys
        left.values += right.values
        left.pack_into(lbuf)
        del pnode.keys[hi]
        del pnode.values[hi]
        info.tm.dec(rb)          # its entries now belong to left
    else:
        keys = left.keys + right.keys
        values = left.values + right.values
        half = total // 2
        left.keys, right.keys = keys[:half], keys[half:]
        left.values, right.values = values[:half], values[half:]
        left.pack_into(lbuf)
        right.pack_into(rbuf)
        pnode.keys[hi] = right.keys[0]
    pnode.pack_into(pbuf)
    k = bisect_right(pnode.keys, key) - 1
    return max(k, 0)


# ---------------------------------------------------------------- delete
def delete(info, root: int) -> None:
    """Drop this reference to the tree; free what nothing else shares."""
    tm = info.tm
    stack = [root]
    while stack:
        b = stack.pop()
        if tm.get_count(b) > 1:
            tm.dec(b)
            continue
        n = read_node(tm, b)
        if n.leaf:
            if info.value_dec is not None:
                for v in n.values:
                    info.value_dec(v)
        else:
            stack.extend(n.values)
        tm.dec(b)
