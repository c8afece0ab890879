"""The cache format byte for byte: the checksum vectors of the dm-writeboost
format, geometry, format and soundness checks."""

import pytest

from pydm.targets.writeboost import layout as L


def segment(seg_id, entries):
    """A segment image built by hand from the format description (not by
    layout.seal): header block, then the data blocks."""
    block0 = bytearray(L.BLOCK)
    for i, (sector, bits, _data) in enumerate(entries):
        block0[512 + 16 * i:512 + 16 * i + 9] = sector.to_bytes(8, "little") + bytes([bits])
    return block0, b"".join(d for _s, _b, d in entries)


@pytest.mark.parametrize("seg_id,entries,crc", [
    (1, [(8, 0xFF, b"A" * 4096), (16, 0x0F, b"B" * 4096)], 2870024834),
    (2, [(8, 0xFF, b"C" * 4096)], 2028256016),
])
def test_checksum_vectors(seg_id, entries, crc):
    block0, data = segment(seg_id, entries)
    assert L.checksum(block0, data) == crc
    buf = bytearray(L.BLOCK) + bytearray(data)
    n = L.seal(buf, seg_id, [s for s, _b, _d in entries], [b for _s, b, _d in entries])
    assert n == L.BLOCK * (len(entries) + 1)
    assert int.from_bytes(buf[0:8], "little") == seg_id
    assert int.from_bytes(buf[8:12], "little") == crc and buf[12] == len(entries)
    assert buf[512:L.BLOCK] == block0[512:]


def test_checksum_of_3584_zero_bytes():
    assert L.checksum(bytes(L.BLOCK), b"") == 143703573


@pytest.mark.parametrize("size,segments", [
    (L.MIN_CACHE_BYTES, 1),
    (L.SB_BYTES + 3 * L.SEGMENT_BYTES + 4096, 3),        # trailing space unused
    (1 << 30, 2046),
])
def test_geometry(size, segments):
    g = L.Geometry(size)
    assert g.nr_segments == segments and g.nr_caches == 127 * segments
    assert g.slot_of(1) == 0 and g.slot_of(segments + 1) == 0
    assert g.block_offset(0) == L.SB_BYTES + L.BLOCK
    assert g.unused_bytes() == size - L.SB_BYTES - segments * L.SEGMENT_BYTES


def test_a_cache_too_small_for_one_segment_is_refused():
    with pytest.raises(L.LayoutError, match="at least"):
        L.Geometry(L.MIN_CACHE_BYTES - 1)


def test_format_writes_put_the_magic_last_after_a_flush():
    g = L.Geometry(L.SB_BYTES + 2 * L.SEGMENT_BYTES)
    w = L.format_writes(g)
    assert w[0] == (0, bytes(L.SB_BYTES), False)
    assert [off for off, _d, _b in w[1:-1]] == [g.slot_offset(0), g.slot_offset(1)]
    off, data, barrier = w[-1]
    assert off == 0 and barrier and data[:4] == b"tsBW" and not any(data[4:])


def test_record_block_is_the_last_sector_of_the_superblock_region():
    blk = L.record_block(77)
    assert len(blk) == L.BLOCK and not any(blk[:L.BLOCK - L.SECTOR])
    assert L.RECORD_BLOCK_OFFSET + L.BLOCK - L.SECTOR == L.RECORD_SECTOR * L.SECTOR
    assert L.parse_record(blk[-L.SECTOR:]) == 77


def test_soundness_checks_each_rule():
    g = L.Geometry(L.SB_BYTES + 4 * L.SEGMENT_BYTES)
    buf = bytearray(L.BLOCK * 3)
    buf[L.BLOCK:] = b"x" * (2 * L.BLOCK)
    L.seal(buf, 6, [8, 16], [0xFF, 0x01])
    hdr = L.parse_header(buf)
    data = bytes(buf[L.BLOCK:])
    assert L.segment_problem(hdr, buf, data, g, g.slot_of(6), 1 << 20) is None
    assert "belongs in slot" in L.segment_problem(hdr, buf, data, g, 0, 1 << 20)
    assert "not a 4 KiB block" in L.segment_problem(hdr, buf, data, g, 1, 16)
    for i in range(512, len(buf)):                   # every byte the CRC covers
        bad = bytearray(buf)
        bad[i] ^= 0x40
        h = L.parse_header(bad)
        assert L.segment_problem(h, bad, bytes(bad[L.BLOCK:]), g, 1, 1 << 20) is not None, i
