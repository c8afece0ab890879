"""Block manager, space map, transaction manager, btree, array, bitset: each alone."""

import random
import struct

import numpy as np
import pytest

from era_fixtures import fixture_path
from pydm.metadata import array, bitset, btree
from pydm.metadata.block_manager import BlockManager, CorruptBlockError, MetadataError, checksum
from pydm.metadata.era_md import SB_VALIDATOR
from pydm.metadata.space_map import (DiskSpaceMap, NoSpace, SpaceMap, decode_bitmap,
                                     encode_bitmap)
from pydm.metadata.transaction import TransactionManager
from pydm.store import FileStore, MemStore


def mem_tm(blocks=1024):
    bm = BlockManager(MemStore(blocks * 4096))
    sm = SpaceMap(bm.nr_blocks)
    sm.set(0, 1)
    return TransactionManager(bm, sm)


def test_checksums_match_the_kernel_on_fixture_blocks(fixtures_dir):
    s = FileStore(fixture_path("small64", "small64.bin"), readonly=True)
    data = s.read_at(0, 4096)
    assert struct.unpack_from("<I", data)[0] == checksum(data, 146538381)
    bm = BlockManager(s, readonly=True)
    bm.read(0, SB_VALIDATOR)
    with pytest.raises(CorruptBlockError, match=r"block 1 .*era superblock.*checksum"):
        bm.read(1, SB_VALIDATOR)


def test_validator_names_block_and_reason():
    bm = BlockManager(MemStore(8 * 4096))
    buf = bytearray(4096)
    bm.write(3, buf, SB_VALIDATOR)
    bm.forget()
    bm.read(3, SB_VALIDATOR)
    raw = bytearray(bm.read_raw(3))
    bm.store.write_at(5 * 4096, bytes(raw))          # right checksum, wrong place
    with pytest.raises(CorruptBlockError, match="block 5 .*block number field says 3"):
        bm.read(5, SB_VALIDATOR)
    with pytest.raises(MetadataError, match="outside the metadata device"):
        bm.read(8, SB_VALIDATOR)


def test_bitmap_bit_order_matches_fixtures(fixtures_dir):
    assert encode_bitmap(np.array([1, 1, 1, 1], np.uint32))[0] == 0xAA
    assert encode_bitmap(np.array([2, 2, 2, 2], np.uint32))[0] == 0x55
    data = open(fixture_path("snap64", "snap64.bin"), "rb").read()
    sb = data[:4096]
    idx_loc = struct.unpack_from("<Q", sb, 44 + 16)[0]
    bm_loc = struct.unpack_from("<Q", data, idx_loc * 4096 + 16)[0]
    counts = decode_bitmap(data[bm_loc * 4096:(bm_loc + 1) * 4096])[:12]
    assert counts.tolist() == [1, 1, 1, 1, 2, 2, 1, 1, 1, 1, 1, 1]


def test_space_map_alloc_until_enospc_and_no_reuse_before_commit():
    sm = SpaceMap(16)
    got = [sm.alloc() for _ in range(16)]
    assert sorted(got) == list(range(16))
    with pytest.raises(NoSpace):
        sm.alloc()
    sm.mark_committed()
    sm.dec(5)
    with pytest.raises(NoSpace):      # freed in this transaction: not yet reusable
        sm.alloc()
    sm.mark_committed()
    assert sm.alloc() == 5


def test_space_map_counts_to_255_and_back_through_the_ref_count_tree(tmp_path):
    path = tmp_path / "sm.bin"
    path.write_bytes(bytes(64 * 4096))
    bm = BlockManager(FileStore(str(path)))
    sm = DiskSpaceMap(64)
    sm.set(0, 1)
    tm = TransactionManager(bm, sm)
    sm.attach(tm)
    sm.ref_root = btree.empty(sm.rc_info)
    b = sm.alloc()
    for n in range(2, 256):
        sm.inc(b)
        if n in (2, 3, 4, 100, 255):
            sb = bytearray(4096)
            tm.commit(sb, SB_VALIDATOR, lambda buf, root: buf.__setitem__(slice(44, 76), root))
            again = DiskSpaceMap.open(bm, bytes(sb[44:76]))
            assert again.get(b) == n
            assert dict(btree.walk(bm, again.ref_root)) == (
                {b: struct.pack("<I", n)} if n >= 3 else {})
    for _ in range(254):
        sm.dec(b)
    sb = bytearray(4096)
    tm.commit(sb, SB_VALIDATOR, lambda buf, root: buf.__setitem__(slice(44, 76), root))
    again = DiskSpaceMap.open(bm, bytes(sb[44:76]))
    assert again.get(b) == 1 and again.overflow == {}
    assert again.nr_allocated == sm.nr_allocated


def test_shadow_copies_once_per_transaction_and_reports_sharing():
    tm = mem_tm()
    b, buf = tm.new_block(SB_VALIDATOR)
    tm.commit(bytearray(4096), SB_VALIDATOR)
    nb, _buf, shared = tm.shadow(b, SB_VALIDATOR)
    assert nb != b and not shared and tm.get_count(b) == 0
    assert tm.shadow(nb, SB_VALIDATOR)[0] == nb        # second time: in place
    tm.inc(nb)
    tm.commit(bytearray(4096), SB_VALIDATOR)
    nb2, _buf, shared = tm.shadow(nb, SB_VALIDATOR)
    assert shared and tm.get_count(nb) == 1


def _check_tree(tm, info, root):
    for b, n, _d in btree.walk_nodes(tm, root):
        assert n.keys == sorted(set(n.keys))
        if b != root:
            mx = info.leaf_max if n.leaf else info.internal_max
            assert len(n.keys) >= mx // 3


def test_btree_against_a_dict_model():
    tm = mem_tm(4096)
    info = btree.BTreeInfo(tm, 12)
    root = btree.empty(info)
    model = {}
    rnd = random.Random(7)
    for step in range(6000):
        k = rnd.randrange(2500)
        if rnd.random() < 0.6:
            v = struct.pack("<IQ", k, step)
            root = btree.insert(info, root, k, v)
            model[k] = v
        elif k in model:
            root = btree.remove(info, root, k)
            del model[k]
        if step % 1000 == 999:
            assert list(btree.walk(tm, root)) == sorted(model.items())
            _check_tree(tm, info, root)
    for k in range(2500):
        assert btree.lookup(tm, root, k) == model.get(k)
    nodes = sum(1 for _ in btree.walk_nodes(tm, root))
    assert tm.sm.nr_allocated == nodes + 1          # nothing leaked (+ block 0)
    btree.delete(info, root)
    assert tm.sm.nr_allocated == 1


def test_btree_shared_subtrees_are_refcounted():
    tm = mem_tm(4096)
    released = []
    info = btree.BTreeInfo(tm, 8, value_inc=lambda v: released.append(("inc", v)),
                           value_dec=lambda v: released.append(("dec", v)))
    root = btree.empty(info)
    for k in range(600):
        root = btree.insert(info, root, k, struct.pack("<Q", k))
    tm.commit(bytearray(4096), SB_VALIDATOR)
    tm.inc(root)                                    # a snapshot shares the tree
    snap = root
    root = btree.insert(info, root, 10_000, struct.pack("<Q", 1))
    assert root != snap
    assert dict(btree.walk(tm, snap)).get(10_000) is None
    assert len(dict(btree.walk(tm, root))) == 601
    btree.delete(info, snap)
    btree.delete(info, root)
    assert tm.sm.nr_allocated == 1


def test_array_resize_and_set_block():
    tm = mem_tm(4096)
    info = array.ArrayInfo(tm, 4)
    root = array.resize(info, array.empty(info), 0, 3000, b"\1\0\0\0")
    vals = np.frombuffer(array.read_all(tm, root, 3000, 4), "<u4")
    assert len(vals) == 3000 and set(vals.tolist()) == {1}
    root = array.set_block(info, root, 1, struct.pack("<1018I", *range(1018)))
    root = array.resize(info, root, 3000, 1500, b"\0" * 4)
    vals = np.frombuffer(array.read_all(tm, root, 1500, 4), "<u4")
    assert vals[1018:].tolist() == list(range(1500 - 1018))
    root = array.resize(info, root, 1500, 2100, b"\7\0\0\0")
    vals = np.frombuffer(array.read_all(tm, root, 2100, 4), "<u4")
    assert vals[1500:].tolist() == [7] * 600
    with pytest.raises(MetadataError):
        array.read_all(tm, root, 5000, 4)


def test_bitset_round_trip():
    tm = mem_tm(4096)
    info = bitset.info_for(tm)
    n = 100_000
    root = bitset.create(info, n)
    bits = bitset.zeros(n)
    for i in (0, 63, 64, 32575, 32576, 99_999):
        bits[i] = 1
    root = bitset.write_blocks(info, root, bits, {0, 1, 3})
    assert bitset.read(tm, root, n)[:n] == bits[:n]


def test_space_map_extend_survives_commit_and_reopen(tmp_path):
    from pydm.metadata.era_md import EraMetadata
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(16 * 4096))
    store = FileStore(str(path))
    md = EraMetadata.format(store, 8, 100)
    with open(path, "ab") as f:
        f.truncate(20000 * 4096)
    store.refresh_size()
    md.bm.nr_blocks = store.size // 4096
    md.sm.extend(20000 - 16)
    md.checkpoint()
    for b in range(100):
        md.mark(b)
    md.commit()
    again = EraMetadata.open(FileStore(str(path), readonly=True), readonly=True)
    assert again.sm.nr_blocks == 20000 and again.metadata_usage() == md.metadata_usage()
    from pydm.metadata.era_check import check
    assert check(FileStore(str(path), readonly=True)) == (True, [])


def test_format_with_several_bitmaps_reopens(tmp_path):
    from pydm.metadata.era_check import check
    from pydm.metadata.era_md import EraMetadata
    path = tmp_path / "m.bin"
    path.write_bytes(bytes(40000 * 4096))          # three bitmaps, two never used
    EraMetadata.format(FileStore(str(path)), 8, 1000)
    md = EraMetadata.open(FileStore(str(path), readonly=True), readonly=True)
    assert md.sm.nr_blocks == 40000 and md.metadata_usage()[0] < 20
    assert check(FileStore(str(path), readonly=True)) == (True, [])


def test_a_block_cached_as_one_type_is_checked_as_another():
    bm = BlockManager(MemStore(8 * 4096))
    bm.write(2, bytearray(4096), SB_VALIDATOR)
    from pydm.metadata.space_map import BITMAP_VALIDATOR
    with pytest.raises(CorruptBlockError, match="block 2 .*space map bitmap"):
        bm.read(2, BITMAP_VALIDATOR)
