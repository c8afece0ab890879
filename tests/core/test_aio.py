"""pydm.aio alone, and the file store's REQ_NOWAIT reads on top of it:
reads of a file evicted from the page cache, on a real io_uring."""

import errno
import os
import random
import socket
import threading

import pytest

from pydm import aio
from pydm.bio import READ, REQ_NOWAIT, Bio
from pydm.store import FileStore
from nbd_support import evict

pytestmark = pytest.mark.skipif(not aio.available(), reason="io_uring is not usable here")

SIZE = 4 << 20
BLOCK = 4096


@pytest.fixture
def image(tmp_path):
    path = str(tmp_path / "img")
    data = random.Random(5).randbytes(SIZE)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return path, data


@pytest.fixture
def installed():
    """A ring installed on this thread (as the NBD reader installs its own)."""
    ring = aio.open_ring(16)
    aio.install(ring)
    yield ring
    aio.install(None)
    ring.close()


def test_reads_complete_once_each_with_their_data(image):
    path, data = image
    evict(path)
    ring = aio.open_ring(8)            # fewer slots than reads: a full queue is pushed
    fd = os.open(path, os.O_RDONLY)
    try:
        results = []
        bufs = []
        for i in range(20):
            buf = bytearray(BLOCK)
            bufs.append(buf)
            ring.read(fd, buf, i * 3 * BLOCK, lambda arg, res: results.append((arg, res)), i)
        assert ring.pending == 20
        ring.drain()
        assert ring.pending == 0
        assert sorted(results) == [(i, BLOCK) for i in range(20)]
        for i, buf in enumerate(bufs):
            assert buf == data[i * 3 * BLOCK:(i * 3 + 1) * BLOCK]
    finally:
        ring.close()
        os.close(fd)


def test_a_failed_read_reports_its_errno_and_eof_reads_short(image):
    path, _data = image
    ring = aio.open_ring(4)
    r, w = os.pipe()
    os.close(w)
    fd = os.open(path, os.O_WRONLY)        # reading a write-only fd fails: EBADF
    try:
        out = {}
        ring.read(fd, bytearray(BLOCK), 0, out.__setitem__, "bad")
        rfd = os.open(path, os.O_RDONLY)
        ring.read(rfd, bytearray(BLOCK), SIZE - 100, out.__setitem__, "tail")
        ring.drain()
        os.close(rfd)
        assert out == {"bad": -errno.EBADF, "tail": 100}
    finally:
        ring.close()
        os.close(fd)
        os.close(r)


def test_wait_returns_for_the_socket_or_for_completions(image):
    path, _data = image
    evict(path)
    ring = aio.open_ring(4)
    a, b = socket.socketpair()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert ring.wait(a.fileno()) is True        # nothing in flight: at once
        done = []
        ring.read(fd, bytearray(BLOCK), 0, lambda _a, res: done.append(res), None)
        assert ring.wait(a.fileno()) is False       # the read completed first
        assert done == [BLOCK]
        ring.read(fd, bytearray(BLOCK), 1 << 20, lambda _a, res: done.append(res), None)
        b.send(b"x")
        while not ring.wait(a.fileno()):            # the socket, or the read first
            pass
        ring.drain()
        assert done == [BLOCK, BLOCK]
    finally:
        ring.close()
        os.close(fd)
        a.close()
        b.close()


def test_each_thread_sees_only_its_own_ring(installed):
    seen = []
    t = threading.Thread(target=lambda: seen.append(aio.current()))
    t.start()
    t.join()
    assert aio.current() is installed and seen == [None]


def test_stats_count_the_reads_queued(image):
    path, _data = image
    before = aio.stats()
    ring = aio.open_ring(4)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert aio.stats()["rings"] == before["rings"] + 1
        ring.read(fd, bytearray(BLOCK), 0, lambda *_: None, None)
        ring.read(fd, bytearray(BLOCK), BLOCK, lambda *_: None, None)
    finally:
        ring.close()
        os.close(fd)
    after = aio.stats()
    assert after == {"rings": before["rings"], "queued": before["queued"] + 2}


# ------------------------------------------------------- the file store
def nowait_read(store, offset, length=BLOCK):
    out = {}
    bio = Bio(READ, offset >> 9, length >> 9, bytearray(length), REQ_NOWAIT,
              lambda b: out.setdefault("status", b.status))
    store.submit(bio)
    return bio, out


def test_a_cached_nowait_read_completes_at_once(image):
    path, data = image
    store = FileStore(path, readonly=True)
    try:
        store.read_at(0, BLOCK)                     # now in the page cache
        bio, out = nowait_read(store, 0)
        assert out == {"status": 0} and bio.data == data[:BLOCK]
    finally:
        store.close()


def test_an_uncached_nowait_read_without_a_ring_says_eagain(image):
    """The NOWAIT read itself starts the kernel's readahead, which on a fast
    disk may end before the kernel looks at the page again: then the read
    answers with the data (which must be right).  So it is tried a few times,
    and one must say EAGAIN."""
    path, data = image
    at = 2 << 20
    store = FileStore(path, readonly=True)
    try:
        for _attempt in range(5):
            evict(path)
            bio, out = nowait_read(store, at)
            if out == {"status": errno.EAGAIN}:
                break
            assert out == {"status": 0} and bio.data == data[at:at + BLOCK]
        assert out == {"status": errno.EAGAIN}
    finally:
        store.close()


def test_an_uncached_nowait_read_completes_on_the_threads_ring(image, installed):
    path, data = image
    evict(path)
    store = FileStore(path, readonly=True)
    try:
        reads = [nowait_read(store, off, 64 << 10) for off in range(0, SIZE, 512 << 10)]
        installed.drain()
        for (bio, out), off in zip(reads, range(0, SIZE, 512 << 10)):
            assert out == {"status": 0}
            assert bio.data == data[off:off + (64 << 10)]
    finally:
        store.close()


def test_a_file_that_shrank_reads_zeroes_past_its_end(image, installed):
    path, data = image
    store = FileStore(path)
    try:
        os.truncate(path, SIZE - 2048)              # the store still thinks SIZE
        evict(path)
        bio, out = nowait_read(store, SIZE - BLOCK)
        installed.drain()
        assert out == {"status": 0}
        assert bio.data == data[SIZE - BLOCK:SIZE - 2048] + bytes(2048)
    finally:
        store.close()


def test_the_spin_on_a_lone_read_adapts_to_how_long_reads_take():
    """A read that took longer than SPIN_MAX turns the spin off (a slow
    disk costs no CPU); reads that come at once turn it back on, doubling
    up to SPIN_MAX.  A pipe makes a read as slow as the test wants."""
    ring = aio.open_ring(4)
    r, w = os.pipe()
    a, b = socket.socketpair()
    done = []
    try:
        ring.read(r, bytearray(3), 0, lambda _a, res: done.append(res), None)
        timer = threading.Timer(0.05, os.write, (w, b"abc"))
        timer.start()
        assert ring.wait(a.fileno()) is False          # it spun, then slept, then reaped
        timer.join()
        assert done == [3] and ring.spin == 0.0
        seen = []
        for _ in range(6):
            os.write(w, b"def")
            ring.read(r, bytearray(3), 0, lambda _a, res: done.append(res), None)
            while ring.wait(a.fileno()):
                pass
            seen.append(ring.spin)
        assert done == [3] * 7
        assert seen[0] == aio.SPIN_START
        assert seen == sorted(seen) and seen[-1] == aio.SPIN_MAX
    finally:
        ring.close()
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
