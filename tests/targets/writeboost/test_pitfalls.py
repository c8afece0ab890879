"""Every pitfall of the dm-writeboost design as a named test: format, the
4 KiB split, overwrites, partial blocks, barriers, log wrap, writeback
order, replay, write-around, drop_caches and the messages."""

import os
import sys
import threading
import time

import pytest

from helpers import Waiter
from pydm.bio import Bio, REQ_FUA, WRITE
from pydm.errors import DMError
from pydm.store import FileStore
from pydm.store_registry import StorePool
from pydm.targets.writeboost import layout as L
from wbtest import (BLOCK, SB, SECTOR, SEGMENT, FaultyPool, KillablePool, Rig, stat,
                    wait_until)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "contract"))
from volatile_store import VolatileStore  # noqa: E402


@pytest.fixture
def rig(tmp_path):
    r = Rig(tmp_path)
    yield r
    r.close()


def pattern(n, seed):
    return bytes((seed + i) & 0xFF for i in range(n * SECTOR))


# ------------------------------------------------------------------ format
def test_a_blank_cache_is_formatted(tmp_path):
    with open(tmp_path / "cache.img", "wb") as f:
        f.write(b"\xee" * (SB + 3 * SEGMENT))      # stale bytes everywhere...
        f.seek(0)
        f.write(bytes(SECTOR))                      # ...but a blank first sector
    with open(tmp_path / "backing.img", "wb") as f:
        f.write(os.urandom(8192 * SECTOR))
    r = Rig(tmp_path, segments=3)
    with open(r.cache, "rb") as f:
        img = f.read()
    assert img[:4] == b"tsBW" and not any(img[4:SB])          # record 0
    for slot in range(3):
        head = img[SB + slot * SEGMENT:SB + slot * SEGMENT + BLOCK]
        assert not any(head), slot
        assert img[SB + slot * SEGMENT + BLOCK:][:BLOCK] == b"\xee" * BLOCK   # data untouched
    r.close()


def test_a_cache_with_a_foreign_first_sector_is_refused(tmp_path):
    r = Rig(tmp_path)
    r.close()
    with open(r.cache, "r+b") as f:
        f.write(b"XFSB")                                    # somebody's filesystem
    with pytest.raises(DMError, match="is not a writeboost cache"):
        Rig(tmp_path)


def test_trailing_space_smaller_than_a_segment_is_unused(tmp_path):
    cache = tmp_path / "cache.img"
    r = Rig(tmp_path)
    r.close()
    os.truncate(cache, SB + 2 * SEGMENT + 12345)
    with open(cache, "r+b") as f:
        f.write(bytes(SECTOR))                              # blank: formats again
    r = Rig(tmp_path)
    s = r.status()
    assert s["nr_segments"] == 2 and s["nr_caches"] == 254
    r.close()


# ------------------------------------------------------------------- split
def test_an_8k_write_at_sector_4_is_three_pieces_setting_only_their_sectors(rig):
    assert rig.write(4, pattern(16, 1)) == 0
    s = rig.status()
    assert stat(s, 1, 0, 0, 0) == 2 and stat(s, 1, 0, 0, 1) == 1   # 4..7, 16..19; 8..15
    rig.expect(0, 24)                     # sectors 0..3 and 20..23 still the backing's


# -------------------------------------------------------------- overwrites
def test_an_overwrite_in_the_ram_buffer_takes_no_new_block(rig):
    rig.write(0, pattern(8, 1))
    cursor = rig.status()["cursor"]
    rig.write(2, pattern(2, 9))
    s = rig.status()
    assert s["cursor"] == cursor and stat(s, 1, 1, 1, 0) == 1
    rig.expect(0, 8)


def test_an_overwrite_of_a_sealed_block_takes_one_and_unions_the_dirty_sectors(rig):
    rig.write(0, pattern(2, 1))                # sectors 0,1 dirty
    assert rig.flush() == 0                    # sealed
    before = rig.status()
    rig.write(6, pattern(2, 7))                # sectors 6,7: the old 0,1 are read back
    s = rig.status()
    assert s["current_id"] == before["current_id"] + 1        # a block of a new segment
    assert s["cursor"] % 127 == 1 and s["nr_dirty"] == 1
    assert stat(s, 1, 1, 0, 0) == 1
    rig.expect(0, 8)
    rig.control.message("wb", 0, "drop_caches")       # write back the union
    assert rig.backing_bytes(0, 8) == bytes(rig.shadow[:8 * SECTOR])


def test_reads_of_partly_dirty_blocks_overlay_the_backing(rig):
    rig.write(3, pattern(2, 5))                        # in the RAM buffer
    rig.expect(0, 8)
    assert rig.flush() == 0                            # sealed, still in a RAM buffer
    rig.expect(0, 8)
    for _ in range(9):                                 # push it out of the RAM ring
        rig.write(8 * 64, pattern(1, 3))
        assert rig.flush() == 0
    rig.expect(0, 8)                                   # from the cache device
    rig.control.message("wb", 0, "drop_caches")
    rig.expect(0, 8)                                   # written back, partial bits kept


# ---------------------------------------------------------------- barriers
def test_fua_and_flush_wait_for_the_segment_and_the_cache_flush(tmp_path):
    pool = FaultyPool()
    r = Rig(tmp_path, stores=pool)
    cache = pool.by_name["cache.img"]
    flushes = cache.flushes
    s0 = r.status()
    assert r.write(0, pattern(8, 1), REQ_FUA) == 0
    s = r.status()
    assert s["last_flushed"] == s["current_id"] > s0["current_id"]
    assert cache.flushes == flushes + 1
    assert s["non_full"] == 1
    assert r.flush() == 0                              # an empty segment, sealed anyway
    s2 = r.status()
    assert s2["current_id"] == s["current_id"] + 1 and s2["non_full"] == 2
    assert cache.flushes == flushes + 2
    r.close()


def test_a_flush_is_not_acknowledged_before_its_segment_is_durable(tmp_path):
    pool = FaultyPool()
    r = Rig(tmp_path, stores=pool)
    pool.by_name["cache.img"].fail_flush = True
    r.write(0, pattern(8, 1))
    assert r.flush() != 0                              # the cache FLUSH failed: EIO
    assert r.status()["state"][0] == "failed"
    r.close()


# ---------------------------------------------------------------- log wrap
def test_the_log_wraps_through_urged_writeback_with_data_intact(tmp_path):
    r = Rig(tmp_path, sectors=8192, segments=3)        # 381 cache blocks
    for i in range(1200):                              # 3x the cache
        b = (i * 7) % 1024
        r.write(b * 8, pattern(8, i))
    s = r.status()
    assert s["current_id"] > 3 * s["nr_segments"] and s["last_writeback"] > 0
    assert s["nr_cur_batched_writeback"] <= 2          # few free slots: small batches
    r.expect(0, 8192)
    r.close()


def test_writeback_is_urged_ahead_once_free_slots_drop_under_the_low_water(tmp_path):
    """A log of 64 segments urges writeback with 4 slots still free (a 16th),
    so writers rarely wait for it a slot at a time: segments are written
    back before any writer needs a slot, and only until 4 are free again."""
    r = Rig(tmp_path, sectors=65536, segments=64)      # distinct blocks: all dirty
    chunk = 254 * BLOCK // SECTOR                      # 2 segments' blocks a write
    for i in range(30):                                # fills segments 1..60
        r.write(i * chunk, pattern(chunk, i))
    s = r.status()
    assert s["current_id"] <= 61 and s["last_writeback"] == 0  # nothing urged yet
    r.write(30 * chunk, pattern(chunk, 30))            # opens 61 and 62: 2 free
    wait_until(lambda: r.status()["last_writeback"] > 0)
    s = r.status()
    assert s["current_id"] <= 64                       # no slot was needed yet...
    assert 0 < s["last_writeback"]                     # ...but writeback ran
    assert s["last_writeback"] + 64 - s["current_id"] >= 4    # back at the low water
    assert s["last_writeback"] < s["last_flushed"] - 32       # and no further
    r.expect(0, 31 * chunk)
    r.close()


class SlowCachePool(StorePool):
    """Stores whose writes to ``cache.img`` take ``delay`` seconds each: the
    flusher lags behind the writers."""

    def __init__(self, delay):
        self.delay = delay
        super().__init__(opener=self._open)

    def _open(self, path, readonly):
        if os.path.basename(path) != "cache.img":
            return FileStore(path, readonly)
        store = SlowStore(path, readonly)
        store.delay = self.delay
        return store


class SlowStore(FileStore):
    """A file whose every write takes ``delay`` seconds more (a subclass, so
    a gathered write of several segments is still one delayed write each)."""

    delay = 0.0

    def write_at(self, offset, data):
        time.sleep(self.delay)
        super().write_at(offset, data)


def test_a_writer_urging_writeback_before_the_flusher_caught_up_is_not_stranded(tmp_path):
    """The log wraps while the flusher lags: the writer needs the oldest slot
    written back before that segment is even on the cache, so the writeback
    it urges finds nothing to do yet; it must still run once the flusher
    catches up (it used to sleep until kicked again: writers hung for ever)."""
    r = Rig(tmp_path, sectors=8192, segments=3, stores=SlowCachePool(0.3))
    done = threading.Event()

    def writer():
        for i in range(4 * 127):                       # > 3 segments: the log wraps
            assert r.write((i % 1024) * 8, pattern(8, i)) == 0
        done.set()
    t = threading.Thread(target=writer, daemon=True)
    t.start()
    t.join(30)
    assert done.is_set(), "the writer waiting for room was never woken"
    r.expect(0, 8192)
    r.close()


def test_writeback_writes_home_only_the_newest_copy_sorted(tmp_path):
    pool = FaultyPool()
    r = Rig(tmp_path, stores=pool)
    r.write(64, pattern(8, 1))
    r.write(8, pattern(8, 2))
    assert r.flush() == 0
    r.write(64, pattern(8, 3))                         # the older copy is now stale
    assert r.flush() == 0
    backing = pool.by_name["backing.img"]
    writes, flushes = backing.writes, backing.flushes
    r.control.message("wb", 0, "drop_caches")
    assert backing.writes - writes == 2 and backing.flushes > flushes
    assert r.backing_bytes(64, 8) == pattern(8, 3)
    s = r.status()
    assert s["nr_dirty"] == 0 and s["last_writeback"] == s["last_flushed"]
    r.close()


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize("flushes", [1, 3, 9])
def test_replay_after_a_kill_keeps_every_flushed_write(tmp_path, flushes):
    """Killed after N acknowledged flushes: the RAM buffer is gone, the files
    keep what reached them; a new target replays every flushed write."""
    pool = KillablePool()
    r = Rig(tmp_path, stores=pool)
    for f in range(flushes):
        for i in range(50):
            r.write(((f * 50 + i) * 8) % 8192, pattern(8, f * 50 + i))
        assert r.flush() == 0
    flushed = bytes(r.shadow)
    r.write(0, pattern(8, 99))                         # not flushed: may be lost
    pool.kill()
    r.recreate()
    got = r.read(0, 8192)
    assert got[8 * SECTOR:] == flushed[8 * SECTOR:]
    assert got[:8 * SECTOR] in (flushed[:8 * SECTOR], pattern(8, 99))
    r.close()


def test_replay_stops_at_a_lost_middle_segment_instead_of_resurrecting_stale_data(tmp_path):
    """Segment N lost (never reached the media), N+1 there: the slot of N
    still holds an older lap's segment, which must not be applied after newer
    ones (the Linux target's bug)."""
    pool = KillablePool()
    r = Rig(tmp_path, segments=3, stores=pool)
    geo = L.Geometry(os.path.getsize(r.cache))
    saved = None
    for i in range(1, 8):                              # segments 1..7 over 3 slots
        r.write(0, pattern(8, i))
        assert r.flush() == 0
        assert r.status()["last_flushed"] == i
        if i == 3:
            with open(r.cache, "rb") as f:
                f.seek(geo.segment_offset(3))
                saved = f.read(SEGMENT)
    pool.kill()
    r.close()
    with open(r.cache, "r+b") as f:                    # segment 6 lost: its slot
        f.seek(geo.segment_offset(6))                  # still holds segment 3
        f.write(saved)
    r = Rig(tmp_path, segments=3)
    s = r.status()
    assert s["last_flushed"] == 5                      # the log ends before the gap
    assert r.read(0, 8) == pattern(8, 5)               # neither 7 nor the stale 3
    r.close()


class CutAtOffsetStore(VolatileStore):
    """A cache behind a volatile write cache that loses power right after
    the write at ``cut_at`` (once armed), keeping that write and every
    unflushed one except those at ``lost``: the reordering a device may do
    without a FLUSH between them."""

    cut_at = lost = None

    def write_at(self, offset, data):
        super().write_at(offset, data)
        if offset == self.cut_at:
            self.power_cut(keep=lambda off, _d: off != self.lost)


class CutPool(StorePool):
    """The cache a ``CutAtOffsetStore``, its write cache holding ``held``
    from the start (what a killed daemon left in the page cache)."""

    def __init__(self, held=()):
        self.by_name = {}
        self.held = list(held)
        super().__init__(opener=self._open)

    def _open(self, path, readonly):
        if os.path.basename(path) != "cache.img":
            return FileStore(path, readonly)
        s = CutAtOffsetStore(path, readonly)
        s.cache = list(self.held)
        self.by_name["cache.img"] = s
        return s


def test_a_slot_is_overwritten_only_once_newer_copies_of_its_dirty_blocks_are_durable(tmp_path):
    """Block 0 is written and flushed in segment 1, then rewritten in segment
    2: segment 1's copy is dropped, never written home.  The log wraps to
    segment 1's slot with no flush since.  Segment 5 must not reach that slot
    before segment 2 is durable: a power cut that kept segment 5's write but
    not segment 2's (allowed without a FLUSH between them) would leave
    neither copy of block 0, whose first version an acknowledged flush
    covered."""
    pool = CutPool()
    r = Rig(tmp_path, segments=4, stores=pool)         # 1024 blocks, 4 slots
    geo = L.Geometry(os.path.getsize(r.cache))
    r.write(0, pattern(8, 1))
    assert r.flush() == 0                              # segment 1: durable
    cache = pool.by_name["cache.img"]
    cache.cut_at, cache.lost = geo.segment_offset(5), geo.segment_offset(2)
    r.write(0, pattern(8, 2))                          # segment 2 drops 1's copy
    for first in range(1, 381, 20):                    # fill segments 2, 3 and 4
        r.write(first * 8, pattern(20 * 8, first))
    r.write(381 * 8, pattern(8, 3), flags=REQ_FUA)     # seals 4; 5 takes slot 0
    assert cache.dead                                  # the cut came
    r.recreate()
    assert r.read(0, 8) in (pattern(8, 1), pattern(8, 2))
    r.close()


def test_a_replayed_log_is_durable_before_a_slot_it_superseded_is_overwritten(tmp_path):
    """A daemon killed after segment 2 reached the cache's write cache but
    no FLUSH: the next start replays it (block 0's copy in segment 1 is
    dropped for segment 2's) and must make it durable before segment 1's
    slot is overwritten, or the power cut of the test above loses block 0
    in the same way."""
    pool = CutPool()
    r = Rig(tmp_path, segments=4, stores=pool)
    geo = L.Geometry(os.path.getsize(r.cache))
    r.write(0, pattern(8, 1))
    assert r.flush() == 0                              # segment 1: durable
    r.write(0, pattern(8, 2))
    r.write(8, pattern(126 * 8, 7))                    # segment 2 full...
    r.write(127 * 8, pattern(8, 8))                    # ...sealed, written, not flushed
    wait_until(lambda: r.status()["last_flushed"] >= 2)
    cache = pool.by_name["cache.img"]
    held = list(cache.cache)
    assert any(off == geo.segment_offset(2) for off, _d in held)
    cache.power_cut()                                  # kill -9: the page cache stays
    pool = CutPool(held)
    r.recreate(pool)
    assert r.read(0, 8) == pattern(8, 2)
    cache = pool.by_name["cache.img"]
    cache.cut_at, cache.lost = geo.segment_offset(5), geo.segment_offset(2)
    for first in (128, 255):                           # fill segments 3 and 4
        r.write(first * 8, pattern(127 * 8, first))
    r.write(382 * 8, pattern(8, 3), flags=REQ_FUA)     # 5 takes segment 1's slot
    assert cache.dead
    r.recreate()
    assert r.read(0, 8) == pattern(8, 2)
    r.close()


def wait_flushed(r, seg_id):
    wait_until(lambda: r.status()["last_flushed"] >= seg_id)
    assert r.status()["last_flushed"] >= seg_id


def fill_to_segment_13(r, cache, flush_first):
    """Segment 1 (blocks 0-126, flushed by a client if ``flush_first``); 2
    drops 1's block 0; 3-12 full, 12 sealed and written.  The cache's
    FLUSH count once segment 1 is in."""
    r.write(0, pattern(127 * 8, 1))                    # segment 1: blocks 0-126
    if flush_first:
        assert r.flush() == 0                          # seals 1: durable
    flushes = cache.flushes
    r.write(127 * 8, pattern(8, 2))                    # seals it; 2 takes block 127
    r.write(0, pattern(8, 3))                          # and drops 1's block 0
    r.write(128 * 8, pattern((125 + 10 * 127) * 8, 4))  # 2 full, then 3-12
    r.write(1523 * 8, pattern(8, 5))                   # 12 sealed, 13 open
    wait_flushed(r, 12)
    return flushes


def test_the_cache_is_flushed_ahead_when_a_slot_due_soon_will_need_it(tmp_path):
    """Segment 1 is flushed by a client.  Segment 2 drops a dirty block of
    it, so segment 17, which reuses its slot, needs 2 durable first: the
    cache is FLUSHed off the flusher's thread once segment 17 is due within
    a quarter of the log (4 segments), not before, and not when no slot
    needs it."""
    pool = FaultyPool()
    r = Rig(tmp_path, sectors=65536, segments=16, stores=pool)
    cache = pool.by_name["cache.img"]
    before = cache.flushes
    r.write(0, pattern(14 * 127 * 8 + 8, 1))           # segments 1-14 of distinct
    r.write(14 * 127 * 8 + 8, pattern(8, 2))           # blocks, 14 sealed: nothing
    wait_flushed(r, 14)                                # superseded, no FLUSH
    assert cache.flushes == before
    r.close()

    (tmp_path / "b").mkdir()
    pool = FaultyPool()
    r = Rig(tmp_path / "b", sectors=65536, segments=16, stores=pool)
    cache = pool.by_name["cache.img"]
    before = fill_to_segment_13(r, cache, flush_first=True)
    assert cache.flushes == before                     # 17 is 5 away: not yet
    r.write(1524 * 8, pattern(126 * 8, 6))             # 13 full
    r.write(1650 * 8, pattern(8, 7))                   # 13 sealed: 17 is 4 away
    wait_until(lambda: cache.flushes > before)
    assert cache.flushes > before
    assert r.status()["current_id"] == 14
    assert r.read(0, 8) == pattern(8, 3)
    r.close()


def test_a_slot_whose_old_segment_was_never_flushed_is_reused_without_a_flush(tmp_path):
    """The same log with no client flush: segment 1 was never durable, so no
    acknowledged write lives in it and its slot is reused with no FLUSH
    (a workload that never flushes never waits for one)."""
    pool = FaultyPool()
    r = Rig(tmp_path, sectors=65536, segments=16, stores=pool)
    cache = pool.by_name["cache.img"]
    before = fill_to_segment_13(r, cache, flush_first=False)
    r.write(1524 * 8, pattern(126 * 8, 6))             # 13 full
    r.write(1650 * 8, pattern(508 * 8, 7))             # 14-17: 17 reuses 1's slot
    r.write(2158 * 8, pattern(8, 8))                   # 17 sealed
    wait_flushed(r, 17)
    assert cache.flushes == before
    assert r.read(0, 8) == pattern(8, 3)
    r.close()


def test_a_copy_flushed_for_an_older_slot_is_kept_in_its_turn(tmp_path):
    """Block 0 is flushed in segment 1, rewritten unflushed in segment 3, and
    again in 6.  Segment 5 reuses 1's slot, so 3 is FLUSHed first; no client
    flush ever covered 3, but it now holds the only copy at least as new as
    the acknowledged one.  So segment 7, reusing 3's slot, must wait for 6
    to be durable too: a power cut that kept 7's write and lost 6's would
    leave no such copy of block 0 (1 and 3 overwritten, 6 lost)."""
    pool = CutPool()
    r = Rig(tmp_path, segments=4, stores=pool)         # 1024 blocks, 4 slots
    geo = L.Geometry(os.path.getsize(r.cache))
    r.write(0, pattern(8, 1))
    assert r.flush() == 0                              # segment 1: block 0, durable
    r.write(8, pattern(127 * 8, 2))                    # 2: blocks 1-127
    r.write(0, pattern(8, 3))                          # 3: block 0 again...
    r.write(128 * 8, pattern(126 * 8, 4))              # ...and 128-253
    r.write(254 * 8, pattern(254 * 8, 5))              # 4 and 5 (1's slot)
    cache = pool.by_name["cache.img"]
    cache.cut_at, cache.lost = geo.segment_offset(7), geo.segment_offset(6)
    r.write(0, pattern(8, 6))                          # 6: block 0 again...
    wait_flushed(r, 5)
    r.write(508 * 8, pattern(126 * 8, 7))              # ...and 508-633
    r.write(634 * 8, pattern(8, 8), flags=REQ_FUA)     # 7 takes 3's slot
    assert cache.dead                                  # the cut came
    r.recreate()
    assert r.read(0, 8) in (pattern(8, 1), pattern(8, 3), pattern(8, 6))
    r.close()


def test_a_failed_flush_ahead_makes_the_target_failed_and_nothing_more_is_written(tmp_path):
    """The FLUSH ahead of need is a store write like any other: when it fails
    the target enters FAILED (status names the cache's flush), writes fail
    at once, nothing more reaches the cache, and reads still answer."""
    pool = FaultyPool()
    r = Rig(tmp_path, sectors=65536, segments=16, stores=pool)
    cache = pool.by_name["cache.img"]
    fill_to_segment_13(r, cache, flush_first=True)     # as in the test above
    cache.fail_flush = True
    r.write(1524 * 8, pattern(126 * 8, 6))
    r.write(1650 * 8, pattern(8, 7))                   # 13 sealed: the FLUSH ahead
    wait_until(lambda: r.status()["state"][0] == "failed")
    s = r.status()
    assert s["state"][0] == "failed" and "cache" in s["state"] and "flush" in s["state"]
    writes = cache.writes
    assert r.write(2000 * 8, pattern(8, 8)) != 0       # EIO at once
    assert r.flush() != 0
    assert cache.writes == writes
    assert r.read(0, 8) == pattern(8, 3)
    r.close()


def test_a_record_above_the_end_of_the_log_is_clamped(tmp_path):
    r = Rig(tmp_path)
    r.write(0, pattern(8, 1))
    assert r.flush() == 0
    r.close()
    with open(r.cache, "r+b") as f:
        f.seek(L.RECORD_BLOCK_OFFSET)
        f.write(L.record_block(1000))
    r = Rig(tmp_path)
    s = r.status()
    assert s["last_writeback"] <= s["last_flushed"]
    r.close()


def test_replay_twice_gives_the_same_index_and_writes_nothing(tmp_path):
    from pydm.targets.writeboost.replay import replay
    r = Rig(tmp_path)
    for i in range(300):
        r.write((i * 11) % 1000 * 8 + i % 3, pattern(5, i))
        if i % 40 == 0:
            assert r.flush() == 0
    r.close()
    before = open(r.cache, "rb").read()
    with open(r.cache, "rb") as f:
        def read(off, n):
            f.seek(off)
            return f.read(n)
        geo = L.Geometry(len(before))
        a, b = replay(read, geo, 8192), replay(read, geo, 8192)
    for field in ("sector", "bits", "dirty"):
        assert getattr(a.index, field) == getattr(b.index, field)
    assert (a.merges, a.start, a.index.last_flushed) == (b.merges, b.start, b.index.last_flushed)
    assert open(r.cache, "rb").read() == before
    again = Rig(tmp_path)
    again.shadow = r.shadow
    again.expect(0, 8192)
    again.close()


# ----------------------------------------------------------- write-around
def test_write_around_writes_to_the_backing_and_drops_cached_copies(tmp_path):
    r = Rig(tmp_path)
    r.write(0, pattern(8, 1))
    r.control.message("wb", 0, "drop_caches")
    r.close()
    r = Rig(tmp_path, opts="2 write_around_mode 1")
    assert r.write(0, pattern(8, 2)) == 0
    assert r.backing_bytes(0, 8) == pattern(8, 2)
    assert r.status()["nr_dirty"] == 0
    r.expect(0, 8)
    r.close()


def test_write_around_refuses_a_log_with_dirty_blocks(tmp_path):
    r = Rig(tmp_path)
    r.write(0, pattern(8, 1))
    assert r.flush() == 0
    r.close()                                          # dirty blocks stay in the log
    with pytest.raises(DMError, match="dirty blocks"):
        Rig(tmp_path, opts="2 write_around_mode 1")


# ---------------------------------------------------------- drop_caches
def test_drop_caches_seals_the_ram_buffer_first_and_returns(rig):
    rig.write(0, pattern(8, 1))                        # only in the RAM buffer
    t0 = time.monotonic()
    rig.control.message("wb", 0, "drop_caches")
    assert time.monotonic() - t0 < 5
    s = rig.status()
    assert s["nr_dirty"] == 0 and s["last_writeback"] == s["last_flushed"]
    assert rig.backing_bytes(0, 8) == pattern(8, 1)


# --------------------------------------------------------------- messages
def test_messages_set_tunables_and_refuse_static_or_out_of_range_ones(rig):
    rig.control.message("wb", 0, "writeback_threshold 70")
    assert rig.status()["writeback_threshold"] == 70
    for bad, words in (("write_around_mode 1", "static"), ("nr_read_cache_cells 5", "static"),
                       ("writeback_threshold 101", "Invalid"), ("read_cache_threshold x",
                                                                 "Invalid"),
                       ("bogus", "unrecognised")):
        with pytest.raises(DMError, match=words):
            rig.control.message("wb", 0, bad)
    assert rig.control.table("wb")[0][3].endswith("cache.img")   # table as constructed


def test_table_keeps_the_constructor_arguments(tmp_path):
    r = Rig(tmp_path, opts="4 WriteBack_Threshold 0 sync_data_interval 3")
    r.control.message("wb", 0, "sync_data_interval 5")
    assert r.control.table("wb")[0][3].endswith("4 WriteBack_Threshold 0 sync_data_interval 3")
    assert r.status()["sync_data_interval"] == 5
    r.close()


def test_discard_is_refused_as_unsupported(rig):
    import errno
    from helpers import do_io
    from pydm.bio import DISCARD
    assert do_io(rig.dev, DISCARD, 0, 8)[0] == errno.EOPNOTSUPP
    assert not rig.dev.capabilities().discard


@pytest.mark.parametrize("role", ["backing", "cache"])
def test_a_store_no_flush_reaches_is_refused(tmp_path, role):
    """Writeboost frees its log once data is written back and counts a
    segment as safe once the cache flushed: a store that may hold writes in
    a cache no flush reaches (an NBD server with no flush) cannot be either."""
    from pydm.caps import Caps

    class Unflushable(FileStore):
        def capabilities(self):
            return Caps(unflushable=True)

    def opener(path, readonly):
        cls = Unflushable if os.path.basename(path) == f"{role}.img" else FileStore
        return cls(path, readonly)
    with pytest.raises(DMError, match=f"{role} .* cannot flush"):
        Rig(tmp_path, stores=StorePool(opener=opener))
    r = Rig(tmp_path)                                       # the same files, flushable
    assert r.status()["state"] == ["active"]
    r.close()


def test_a_write_in_flight_completes_once(rig):
    w = Waiter()
    rig.dev.submit(Bio(WRITE, 0, 8, memoryview(bytearray(pattern(8, 4))), REQ_FUA, w))
    assert w.wait() == 0 and w.calls == 1
