"""Check era metadata: what era_check checks, plus every reference count.

Rules of this module: read-only.  Problems are collected as text lines, never
raised, so one bad block does not hide the rest.  Beyond era_check 0.9.0
(superblock fields, writeset tree, bitsets, era array values <= current era)
it walks every tree reachable from the superblock and the metadata snapshot,
counts the references each block receives, and compares them with the space
map: a block in use that nothing references is *leaked*, a block referenced
more often than its count is *doubly owned* (it would be freed while still
in use).
"""

import struct
from collections import Counter

import numpy as np

from pydm.metadata import array, btree
from pydm.metadata.block_manager import BlockManager, MetadataError
from pydm.metadata.era_md import (ERA_VALUE, SB_VALIDATOR, WRITESET, Superblock, is_blank,
                                  read_era_array)
from pydm.metadata.space_map import (BITMAP_VALIDATOR, ENTRIES_PER_BITMAP, INDEX_VALIDATOR,
                                     DiskSpaceMap)

_LE64 = struct.Struct("<Q")


class Checker:
    def __init__(self, store):
        self.bm = BlockManager(store, readonly=True)
        self.problems = []
        self.refs = Counter()
        self._seen = set()

    def problem(self, text):
        self.problems.append(text)

    # -- tree walks that count references ----------------------------------
    def _btree(self, root, what, leaf_value_size=None, on_value=None, is_root=True,
               lo=None):
        self.refs[root] += 1
        if root in self._seen:
            return
        self._seen.add(root)
        try:
            n = btree.read_node(self.bm, root)
        except MetadataError as e:
            self.problem(f"{what}: {e}")
            return
        mx = btree.max_entries_for(8 if not n.leaf else n.value_size)
        if n.max_entries != mx:
            self.problem(f"{what}: node {root} has max_entries {n.max_entries}, expected {mx}")
        if leaf_value_size is not None and n.leaf and n.value_size != leaf_value_size:
            self.problem(f"{what}: leaf {root} has value size {n.value_size}, "
                         f"expected {leaf_value_size}")
            return
        if not is_root and len(n.keys) < n.max_entries // 3:
            self.problem(f"{what}: node {root} has too few entries ({len(n.keys)})")
        if n.keys != sorted(set(n.keys)):
            self.problem(f"{what}: node {root} keys are not strictly ascending")
        if lo is not None and n.keys and n.keys[0] < lo:
            self.problem(f"{what}: node {root} has a key below its parent's ({n.keys[0]} < {lo})")
        if n.leaf:
            if on_value is not None:
                for k, v in zip(n.keys, n.values):
                    on_value(k, v)
        else:
            for k, child in zip(n.keys, n.values):
                self._btree(child, what, leaf_value_size, on_value, False, k)

    def _array(self, root, length, value_size, what):
        if root in self._seen:          # shared with a tree already walked
            self.refs[root] += 1
            return
        per = array.max_entries_for(value_size)
        blocks = {}

        def on_value(i, v):
            b = _LE64.unpack(v)[0]
            self.refs[b] += 1
            blocks[i] = b
        self._btree(root, what, 8, on_value)
        want = -(-length // per)
        if sorted(blocks) != list(range(want)):
            self.problem(f"{what}: array has blocks {sorted(blocks)[:8]}..., expected 0..{want - 1}")
        for i, b in blocks.items():
            if b in self._seen:
                continue
            self._seen.add(b)
            try:
                vals = array.read_ablock(self.bm, b, value_size)
            except MetadataError as e:
                self.problem(f"{what}: {e}")
                continue
            expect = min(per, length - i * per) if i < want else 0
            if len(vals) != expect * value_size:
                self.problem(f"{what}: array block {b} (index {i}) holds "
                             f"{len(vals) // value_size} entries, expected {expect}")

    def _writeset_tree(self, root, what, nr_blocks):
        def on_value(era, v):
            # nr_bits may exceed nr_blocks after a shrink: digest uses the minimum
            nr_bits, bs_root = WRITESET.unpack(v)
            self._array(bs_root, -(-nr_bits // 64), 8, f"writeset {era} bitset")
        self._btree(root, what, WRITESET.size, on_value)

    # -- the whole check -------------------------------------------------------
    def run(self, check_space_map=True) -> bool:
        bm = self.bm
        if bm.nr_blocks < 1:
            self.problem("Metadata device/file too small.  Is this binary metadata?")
            return False
        if is_blank(bm.store):
            self.problem("superblock is all zeroes: metadata was never formatted")
            return False
        try:
            sb = Superblock.unpack(bm.read(0, SB_VALIDATOR))
            sb.check(0)
        except MetadataError as e:
            self.problem(str(e))
            return False
        if sb.blocknr != 0:
            self.problem(f"superblock block number field is {sb.blocknr}, expected 0")
        if sb.writeset_tree_root == sb.era_array_root:
            self.problem("writeset tree and era array share a root")
        self.refs[0] += 1
        self._writeset_tree(sb.writeset_tree_root, "writeset tree", sb.nr_blocks)
        self._array(sb.era_array_root, sb.nr_blocks, ERA_VALUE, "era array")
        try:
            eras = read_era_array(bm, sb.era_array_root, sb.nr_blocks)
            bad = np.flatnonzero(eras > sb.current_era)
            for b in bad[:10].tolist():
                self.problem(f"era array: block {b} has era {int(eras[b])} > current era "
                             f"{sb.current_era}")
        except MetadataError as e:
            self.problem(f"era array: {e}")
        if sb.ws_root:
            self._array(sb.ws_root, -(-sb.ws_nr_bits // 64), 8, "current writeset")
        if sb.metadata_snap:
            self._snapshot(sb)
        if check_space_map and not self.problems:
            self._space_map(sb)
        return not self.problems

    def _snapshot(self, sb):
        loc = sb.metadata_snap
        self.refs[loc] += 1
        try:
            snap = Superblock.unpack(self.bm.read(loc, SB_VALIDATOR))
            snap.check(loc)
        except MetadataError as e:
            self.problem(f"metadata snapshot: {e}")
            return
        if snap.blocknr != loc:
            self.problem(f"metadata snapshot at {loc} says it is at {snap.blocknr}")
        # a snapshot holds references only on its two roots (as the kernel)
        self._writeset_tree(snap.writeset_tree_root, "snapshot writeset tree", snap.nr_blocks)
        self._array(snap.era_array_root, snap.nr_blocks, ERA_VALUE, "snapshot era array")

    def _space_map(self, sb):
        bm = self.bm
        try:
            sm = DiskSpaceMap.open(bm, sb.sm_root[:32])
        except MetadataError as e:
            self.problem(f"space map: {e}")
            return
        self.refs[sm.index_loc] += 1
        try:
            idx = bm.read(sm.index_loc, INDEX_VALIDATOR)
        except MetadataError as e:
            self.problem(f"space map index: {e}")
            return
        for i, loc in enumerate(sm.bitmap_locs):
            self.refs[loc] += 1
            bm.read(loc, BITMAP_VALIDATOR)
            nf, nfb = struct.unpack_from("<II", idx, 16 + i * 16 + 8)
            lo = i * ENTRIES_PER_BITMAP
            part = sm.counts[lo:min(lo + ENTRIES_PER_BITMAP, sm.nr_blocks)]
            free = int(np.count_nonzero(part == 0))
            if nf != free:
                self.problem(f"space map: index entry {i} says {nf} free, bitmap has {free}")
        self._btree(sm.ref_root, "space map ref-count tree", 4)
        if sm.nr_blocks > bm.nr_blocks:
            self.problem(f"space map covers {sm.nr_blocks} blocks, device has {bm.nr_blocks}")
        counts = sm.counts
        leaked = []
        for b in np.flatnonzero(counts).tolist():
            want = self.refs.get(b, 0)
            have = int(counts[b])
            if want == 0:
                leaked.append(b)
            elif want != have:
                kind = "doubly owned" if want > have else "count too high"
                self.problem(f"space map: block {b} has count {have} but {want} "
                             f"reference(s) ({kind})")
        for b in sorted(self.refs):
            if b < len(counts) and counts[b] == 0:
                self.problem(f"space map: block {b} is referenced {self.refs[b]} time(s) "
                             f"but marked free (doubly owned)")
            elif b >= len(counts):
                self.problem(f"block {b} is referenced but outside the space map")
        if leaked:
            self.problem(f"space map: {len(leaked)} leaked block(s): "
                         f"{', '.join(map(str, leaked[:20]))}")


def check(store, check_space_map=True):
    """(ok, [problem lines])."""
    c = Checker(store)
    try:
        ok = c.run(check_space_map)
    except MetadataError as e:
        c.problem(str(e))
        ok = False
    return ok, c.problems
