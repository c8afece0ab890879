"""By-reference reads (REQ_NOCOPY): who may answer them, what stays pinned.

The NBD server asks for them on large plain-TCP reads and sends the answer
with sendfile; these tests pin down the contract below it.
"""

import os

from helpers import Waiter, make_image
from pydm.bio import READ, REQ_NOCOPY, Bio, FileRange, release_refs
from pydm.control import Control
from pydm.store import FileStore, MemStore, StorePool


def read_nocopy(dev, sector, nr):
    buf = bytearray(nr * 512)
    w = Waiter()
    bio = Bio(READ, sector, nr, memoryview(buf), REQ_NOCOPY, w)
    dev.submit(bio)
    assert w.wait(10) == 0
    return bio, buf


def test_linear_read_is_answered_by_reference_and_pins_the_file(tmp_path):
    img = make_image(tmp_path / "a.img", 1 << 20, fill=b"a")
    c = Control()
    try:
        dev = c.create("d", f"0 2048 linear {img} 0\n")
        bio, buf = read_nocopy(dev, 8, 16)
        ref = bio.ref
        assert isinstance(ref, FileRange) and ref.offset == 8 * 512 and len(ref) == 16 * 512
        assert buf == bytes(len(buf))                 # nothing was copied
        assert os.pread(ref.store.fd, len(ref), ref.offset) == b"a" * len(ref)
        # remove the device: the file stays open while the range is pinned
        fd = ref.store.fd
        c.remove("d")
        assert c.stores.open_count() == 0
        os.fstat(fd)
        part = ref[512:1024]                           # a slice holds its own pin
        ref.release()
        os.fstat(fd)
        assert os.pread(part.store.fd, len(part), part.offset) == b"a" * 512
        release_refs([b"header", part])
        assert ref.store.fd == -1
    finally:
        c.shutdown()


def test_split_reads_and_flakey_reads_are_copied(tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20, fill=b"a")
    b = make_image(tmp_path / "b.img", 1 << 20, fill=b"b")
    c = Control()
    try:
        two = c.create("two", f"0 8 linear {a} 0\n8 8 linear {b} 0\n")
        bio, buf = read_nocopy(two, 4, 8)              # crosses the two lines
        assert bio.ref is None and buf == b"a" * 2048 + b"b" * 2048
        fl = c.create("fl", f"0 2048 flakey {a} 0 0 10 5 corrupt_bio_byte 1 r 7 0\n")
        bio, buf = read_nocopy(fl, 0, 8)
        assert bio.ref is None and buf[0] == 7 and buf[1:] == b"a" * 4095
        # stacked: the reference comes up through both devices
        c.create("lin", f"0 2048 linear {a} 0\n")
        top = c.create("top", "0 2048 linear dm:lin 0\n")
        bio, buf = read_nocopy(top, 16, 8)
        assert bio.ref is not None and bio.ref.offset == 16 * 512
        bio.ref.release()
    finally:
        c.shutdown()


def test_memory_stores_copy(tmp_path):
    m = MemStore(1 << 20)
    w = Waiter()
    buf = bytearray(4096)
    bio = Bio(READ, 0, 8, memoryview(buf), REQ_NOCOPY, w)
    m.submit(bio)
    assert w.wait(1) == 0 and bio.ref is None


def test_pool_close_waits_for_pins(tmp_path):
    img = make_image(tmp_path / "p.img", 4096, fill=b"p")
    pool = StorePool()
    s = pool.acquire(img)
    assert isinstance(s, FileStore) and s.by_ref
    s.pin()
    pool.release(s)
    assert s.fd >= 0 and os.pread(s.fd, 1, 0) == b"p"
    s.unpin()
    assert s.fd == -1
