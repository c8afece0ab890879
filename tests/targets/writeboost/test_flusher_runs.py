"""The flusher's write runs alone: which sealed segments go to the cache in
one gathered write."""

from pydm.targets.writeboost.flusher import write_runs
from pydm.targets.writeboost.layout import SEGMENT_BYTES as FULL

SLOTS = 6


def slot_of(seg_id):
    return (seg_id - 1) % SLOTS


def ids(runs):
    return [[item[0] for item in run] for run in runs]


def test_full_segments_in_consecutive_slots_are_one_run():
    batch = [(i, FULL, [], 0) for i in (1, 2, 3)]
    assert ids(write_runs(batch, slot_of, True)) == [[1, 2, 3]]


def test_a_short_segment_ends_a_run_and_is_never_followed_in_it():
    batch = [(1, FULL, [], 0), (2, 4096 * 3, [], 0), (3, FULL, [], 0), (4, FULL, [], 0)]
    assert ids(write_runs(batch, slot_of, True)) == [[1, 2], [3, 4]]


def test_the_slot_ring_wrapping_ends_a_run():
    batch = [(i, FULL, [], 0) for i in (5, 6, 7, 8)]      # slots 4 5 | 0 1
    assert ids(write_runs(batch, slot_of, True)) == [[5, 6], [7, 8]]


def test_runs_are_capped():
    batch = [(i, FULL, [], 0) for i in (1, 2, 3, 4, 5)]
    assert ids(write_runs(batch, slot_of, True, most=2)) == [[1, 2], [3, 4], [5]]


def test_a_cache_without_gathered_writes_gets_one_segment_a_write():
    batch = [(i, FULL, [], 0) for i in (1, 2, 3)]
    assert ids(write_runs(batch, slot_of, False)) == [[1], [2], [3]]


def test_barriers_stay_with_their_segments():
    batch = [(1, FULL, ["a"], 0), (2, FULL, [], 0), (3, 8192, ["b", "c"], 0)]
    runs = write_runs(batch, slot_of, True)
    assert runs == [batch]


def test_a_segment_that_needs_one_of_its_run_durable_first_starts_a_new_run():
    batch = [(1, FULL, [], 0), (2, FULL, [], 0), (3, FULL, [], 1), (4, FULL, [], 3)]
    assert ids(write_runs(batch, slot_of, True)) == [[1, 2], [3], [4]]


def test_a_segment_that_needs_an_earlier_run_durable_stays_in_its_run():
    batch = [(3, FULL, [], 0), (4, FULL, [], 2), (5, FULL, [], 1)]
    assert ids(write_runs(batch, slot_of, True)) == [[3, 4, 5]]
