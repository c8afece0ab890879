"""File stores against real files: holes, zeroing, ENOSPC from a full filesystem."""

import errno

import pytest

from helpers import do_io, make_image
from pydm.bio import READ, WRITE, Bio
from pydm.control import Control
from pydm.errors import PydmError
from pydm.store import EXTENT_HOLE, EXTENT_ZERO, FileStore, MemStore
from pydm.store_registry import StorePool


def test_file_store_byte_face(tmp_path):
    s = FileStore(make_image(tmp_path / "x.img", 1 << 20))
    assert s.size == 1 << 20
    s.write_at(4096, b"abc")
    assert s.read_at(4095, 5) == b"\0abc\0"
    s.flush()
    assert s.extents(0, 1 << 20)[0] == (4096, EXTENT_HOLE | EXTENT_ZERO)
    s.write_zeroes(4096, 4096, may_unmap=False)
    assert s.read_at(4096, 3) == bytes(3)
    s.close()


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(PydmError, match="No such file"):
        FileStore(str(tmp_path / "nope.img"))
    with pytest.raises(PydmError, match="Is a directory"):
        FileStore(str(tmp_path))
    with pytest.raises(PydmError, match="not a regular file or block device"):
        FileStore("/dev/null", readonly=True)


def test_read_only_store_refuses_writes(tmp_path):
    s = FileStore(make_image(tmp_path / "x.img", 1 << 16), readonly=True)
    b = Bio(WRITE, 0, 1, memoryview(bytearray(512)), 0, lambda b: None)
    s.submit(b)
    assert b.status == errno.EROFS
    s.close()


def test_store_pool_shares_and_closes(tmp_path):
    p = StorePool()
    path = make_image(tmp_path / "x.img", 1 << 16)
    a = p.acquire(path)
    b = p.acquire(str(tmp_path / "." / "x.img"))
    assert a is b and p.open_count() == 1
    p.release(a)
    assert a.fd >= 0
    p.release(b)
    assert a.fd == -1 and p.open_count() == 0


def test_mem_store():
    m = MemStore(8192)
    m.write_at(100, b"hi")
    assert m.read_at(99, 4) == b"\0hi\0"
    with pytest.raises(OSError):
        m.write_at(8190, b"toolong")


def test_full_filesystem_gives_enospc_and_leaves_device_usable(small_fs):
    c = Control()
    img = make_image(small_fs / "sparse.img", 4 << 20)      # 4 MiB sparse on 1 MiB
    dev = c.create("full", f"0 8192 linear {img} 0\n")
    try:
        assert do_io(dev, WRITE, 0, data=b"k" * 4096)[0] == 0
        status = 0
        sector = 8
        while status == 0 and sector < 8192:
            status, _ = do_io(dev, WRITE, sector, data=b"f" * 65536)
            sector += 128
        assert status == errno.ENOSPC
        assert dev.state == "ACTIVE"
        st, buf = do_io(dev, READ, 0, 8)
        assert st == 0 and buf == b"k" * 4096
        assert c.table("full") == [(0, 8192, "linear", f"{img} 0")]
    finally:
        c.shutdown()


def test_a_malformed_bio_fails_instead_of_hanging(caplog):
    """A read without a buffer is a caller's bug, but its completion must
    still come (EIO), or the device would wait for it for ever."""
    from helpers import Waiter
    from pydm.bio import Bio, READ
    from pydm.store import MemStore
    w = Waiter()
    MemStore(1 << 20).submit(Bio(READ, 0, 8, None, 0, w))
    assert w.wait(1) == 5 and w.calls == 1


def test_a_gathered_write_lands_back_to_back(tmp_path, monkeypatch):
    """``write_gather_at``: more buffers than one pwritev takes, of every
    size, land back to back; a short pwritev is finished piece by piece; a
    store that wraps ``write_at`` sees every piece (and MemStore, with the
    generic path, agrees)."""
    import os
    import random
    import pydm.store as S
    rnd = random.Random(3)
    bufs = [rnd.randbytes(rnd.choice((1, 511, 512, 4608, 70000))) for _ in range(2500)]
    want = b"".join(bufs)
    path = tmp_path / "g.img"
    path.write_bytes(bytes(len(want) + 4096))
    st = FileStore(str(path))
    st.write_gather_at(4096, bufs)
    assert st.read_at(4096, len(want)) == want and st.read_at(0, 4096) == bytes(4096)

    real = os.pwritev
    monkeypatch.setattr(S.os, "pwritev", lambda fd, part, off: real(fd, part[:1], off))
    path.write_bytes(bytes(len(want) + 4096))
    st.write_gather_at(4096, bufs)
    assert st.read_at(4096, len(want)) == want
    monkeypatch.undo()
    st.close()

    seen = []

    class Wrapped(FileStore):
        def write_at(self, offset, data):
            seen.append((offset, len(data)))
            super().write_at(offset, data)
    w = Wrapped(str(path))
    w.write_gather_at(0, bufs[:10])
    assert seen == [(sum(map(len, bufs[:i])), len(bufs[i])) for i in range(10)]
    w.close()
    m = MemStore(len(want))
    m.write_gather_at(0, bufs)
    assert m.read_at(0, len(want)) == want
