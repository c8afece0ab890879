"""After a replay that stopped at a gap (a lost middle segment), the sound
segments it dropped must never come back: once the log grows up to their
ids again, a later replay would apply them after newer segments, and stale
data would win over acknowledged, flushed writes."""

from wbtest import BLOCK, SB, SEGMENT, Rig


def test_a_segment_dropped_at_a_gap_never_comes_back(tmp_path):
    r = Rig(tmp_path, segments=4)
    original = r.backing_bytes(16, 8)
    for sector, fill in ((0, b"A"), (8, b"B"), (16, b"O")):     # segments 1, 2, 3
        assert r.write(sector, fill * BLOCK) == 0
        assert r.flush() == 0
    r.close()
    with open(r.cache, "r+b") as f:               # segment 2 (slot 1) never reached the media
        f.seek(SB + SEGMENT + BLOCK + 10)
        f.write(b"\0lost")
    r.recreate()                                  # replay: log 1..1; segment 3 is dropped
    assert r.read(16, 8) == original
    assert r.write(16, b"N" * BLOCK) == 0         # a new segment 2, flushed and acknowledged
    assert r.flush() == 0
    assert r.read(16, 8) == b"N" * BLOCK
    r.recreate()                                  # replay: 1, new 2, and the old 3 again
    try:
        assert r.read(16, 8) == b"N" * BLOCK, "stale segment 3 of the old log was applied"
    finally:
        r.close()
