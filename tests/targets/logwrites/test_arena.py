"""The arena that holds small records, alone: bytes carved in order, a chunk
reused only once every record of it is back, a bound on what is kept."""

import os
import threading

import pytest

from pydm.targets.logwrites import format as F
from pydm.targets.logwrites.arena import Arena
from pydm.targets.logwrites.order import Record


def test_records_are_carved_one_after_another_and_do_not_overlap():
    arena = Arena(keep_bytes=1 << 20, chunk=64 << 10)
    taken = []
    for i in range(40):                       # 40 x 4.5 KiB: three chunks
        chunk, view = arena.take(4608)
        view[:] = bytes([i]) * 4608
        taken.append((chunk, view))
    assert len({id(c) for c, _ in taken}) == 3
    for i, (_c, view) in enumerate(taken):
        assert bytes(view) == bytes([i]) * 4608


def test_a_chunk_is_reused_only_when_all_its_records_are_back_and_a_newer_one_took_over():
    arena = Arena(keep_bytes=1 << 20, chunk=16 << 10)
    a1, _ = arena.take(8 << 10)
    a2, _ = arena.take(8 << 10)
    assert a1 is a2
    arena.put(a1)
    b, _ = arena.take(8 << 10)                # a full chunk: a new one
    assert b is not a1
    assert arena.chunks_free == 0             # a2's record is still out
    arena.put(a2)
    assert arena.chunks_free == 1
    arena.put(b)                              # the current chunk stays current
    assert arena.chunks_free == 1
    c, _ = arena.take(16 << 10)               # b, full for this one, is retired and
    assert c is b                             # free at once: the warmest chunk is reused
    assert arena.chunks_free == 1             # a1


def test_it_keeps_at_most_keep_bytes_of_free_chunks():
    arena = Arena(keep_bytes=32 << 10, chunk=16 << 10)
    chunks = [arena.take(16 << 10)[0] for _ in range(6)]
    for c in chunks:
        arena.put(c)
    assert arena.chunks_free == 2


def test_a_record_longer_than_a_chunk_is_refused():
    arena = Arena(keep_bytes=1 << 20, chunk=16 << 10)
    with pytest.raises(ValueError):
        arena.take((16 << 10) + 1)


def test_threads_taking_and_putting_back_never_share_bytes():
    arena = Arena(keep_bytes=256 << 10, chunk=32 << 10)
    bad = []

    def worker(tag):
        for _ in range(2000):
            chunk, view = arena.take(4608)
            view[:] = tag * 4608
            if bytes(view) != tag * 4608:
                bad.append(tag)
            arena.put(chunk)

    threads = [threading.Thread(target=worker, args=(bytes([t]),)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


@pytest.mark.parametrize("ss", [512, 4096])
def test_a_record_in_the_arena_is_the_entry_the_format_packs(ss):
    arena = Arena(keep_bytes=1 << 20)
    payload = os.urandom(2 * ss)
    rec = Record.make(ss, 7, 2, F.FUA, memoryview(payload), arena=arena)
    plain = Record.make(ss, 7, 2, F.FUA, memoryview(payload))
    assert bytes(rec.head) == bytes(plain.head)
    assert bytes(rec.head[:F.HEADER.size]) == F.HEADER.pack(7, 2, F.FUA, 0)
    assert bytes(rec.head[ss:]) == payload
    assert rec.nbytes == 3 * ss
    rec.release()
    assert rec.head == b"" and rec.payload is None
    rec.release()                             # once only: a second one gives nothing back
    assert arena.chunks_free == 0             # the chunk is still the current one
