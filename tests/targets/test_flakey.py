"""flakey, as xfstests uses it (drop_writes power-cut idiom), and every feature."""

import errno
import time

import pytest

from helpers import do_io, make_image
from pydm.bio import DISCARD, FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE, WRITE_ZEROES
from pydm.control import Control
from pydm.errors import DMError

SECTORS = 2048


@pytest.fixture
def env(tmp_path):
    c = Control()
    img = make_image(tmp_path / "disk.img", SECTORS * 512, fill=b"\x11")
    yield c, img
    c.shutdown()


def go_down(c, name="f"):
    """Move the target's clock into its down interval (no sleeping)."""
    t = c.get(name).live.targets[0]
    t.started = time.monotonic() - t.up - 0.5
    assert t.is_down()


def switch(c, name, table):
    """xfstests' _load_flakey_table: suspend --nolockfs, load, resume."""
    c.suspend(name)
    c.load(name, table)
    c.resume(name)


def file_bytes(img, sector, n):
    with open(img, "rb") as f:
        f.seek(sector * 512)
        return f.read(n)


def test_drop_writes_like_xfstests(env):
    c, img = env
    allow = f"0 {SECTORS} flakey {img} 0 180 0\n"
    drop = f"0 {SECTORS} flakey {img} 0 0 180 1 drop_writes\n"
    dev = c.create("f", allow)
    assert do_io(dev, WRITE, 0, data=b"A" * 4096)[0] == 0
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    switch(c, "f", drop)
    assert c.table("f") == [(0, SECTORS, "flakey", f"{img} 0 0 180 1 drop_writes")]
    assert c.status("f") == [(0, SECTORS, "flakey", "")]
    # writes, flushes, discards, write-zeroes: acknowledged, never stored
    assert do_io(dev, WRITE, 0, data=b"B" * 4096, flags=REQ_FUA)[0] == 0
    assert do_io(dev, WRITE, 100, data=b"B" * 512)[0] == 0
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    assert do_io(dev, DISCARD, 200, 8)[0] == 0
    assert do_io(dev, WRITE_ZEROES, 300, 8)[0] == 0
    # reads are unaffected: they see what is really there
    st, buf = do_io(dev, READ, 0, 8)
    assert st == 0 and buf == b"A" * 4096
    switch(c, "f", allow)
    assert do_io(dev, READ, 0, 8)[1] == b"A" * 4096
    assert file_bytes(img, 100, 512) == b"\x11" * 512
    assert file_bytes(img, 200, 4096) == b"\x11" * 4096
    assert file_bytes(img, 300, 4096) == b"\x11" * 4096


def test_up_interval_behaves_like_linear_then_down_interval_drops(env):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 3600 60 1 drop_writes\n")
    assert not dev.live.targets[0].is_down()
    assert do_io(dev, WRITE, 8, data=b"U" * 512)[0] == 0
    assert file_bytes(img, 8, 512) == b"U" * 512
    go_down(c)
    assert do_io(dev, WRITE, 8, data=b"D" * 512)[0] == 0
    assert file_bytes(img, 8, 512) == b"U" * 512


def test_schedule_is_periodic(env):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 2 3\n")
    t = dev.live.targets[0]
    now = time.monotonic()
    downs = []
    for sec in range(10):
        t.started = now - sec - 0.5
        downs.append(t.is_down())
    assert downs == [False, False, True, True, True] * 2


@pytest.mark.parametrize("features,read_err,write_err", [
    ("", errno.EIO, errno.EIO),
    ("0", errno.EIO, errno.EIO),
    ("1 error_reads", errno.EIO, 0),
    ("1 error_writes", 0, errno.EIO),
    ("2 error_reads error_writes", errno.EIO, errno.EIO),
    ("2 random_read_corrupt 0", errno.EIO, errno.EIO),
])
def test_error_features(env, features, read_err, write_err):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 0 10 {features}\n")
    go_down(c)
    assert do_io(dev, READ, 0, 8)[0] == read_err
    assert do_io(dev, WRITE, 0, data=b"W" * 4096)[0] == write_err
    assert file_bytes(img, 0, 4096) == (b"\x11" if write_err else b"W") * 4096
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == write_err
    assert do_io(dev, DISCARD, 0, 8)[0] == write_err
    assert do_io(dev, WRITE_ZEROES, 0, 8)[0] == write_err


def test_corrupt_bio_byte_read(env):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 0 10 5 corrupt_bio_byte 7 r 171 0\n")
    go_down(c)
    st, buf = do_io(dev, READ, 0, 8)
    assert st == 0
    assert buf[6] == 171 and buf[:6] == b"\x11" * 6 and buf[7:] == b"\x11" * (4096 - 7)
    assert file_bytes(img, 0, 4096) == b"\x11" * 4096       # the store is untouched
    assert do_io(dev, WRITE, 0, data=b"w" * 512)[0] == 0     # writes pass


def test_corrupt_bio_byte_write_uses_a_private_copy(env):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 0 10 5 corrupt_bio_byte 1 w 0 0\n")
    go_down(c)
    payload = bytearray(b"P" * 1024)
    from helpers import Waiter
    from pydm.bio import Bio
    w = Waiter()
    dev.submit(Bio(WRITE, 16, 2, memoryview(payload), 0, w))
    assert w.wait() == 0
    assert payload == b"P" * 1024                     # caller's buffer intact
    assert file_bytes(img, 16, 1024) == b"\x00" + b"P" * 1023
    # a payload shorter than N is left alone
    c.suspend("f")
    c.load("f", f"0 {SECTORS} flakey {img} 0 0 10 5 corrupt_bio_byte 600 w 0 0\n")
    c.resume("f")
    go_down(c)
    assert do_io(dev, WRITE, 32, data=b"S" * 512)[0] == 0
    assert file_bytes(img, 32, 512) == b"S" * 512


def test_corrupt_bio_byte_flags_mask(env):
    c, img = env
    mask = WRITE | (REQ_FUA << 8)            # only FUA writes
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 0 10 5 corrupt_bio_byte 1 w 88 {mask}\n")
    go_down(c)
    assert do_io(dev, WRITE, 0, data=b"n" * 512)[0] == 0
    assert do_io(dev, WRITE, 8, data=b"f" * 512, flags=REQ_FUA)[0] == 0
    assert file_bytes(img, 0, 1) == b"n"
    assert file_bytes(img, 8, 2) == b"Xf"


def test_random_corruption(env):
    c, img = env
    dev = c.create("f", f"0 {SECTORS} flakey {img} 0 0 10 "
                        f"4 random_read_corrupt 1000000000 random_write_corrupt 1000000000\n")
    go_down(c)
    changed_reads = 0
    for _ in range(20):
        st, buf = do_io(dev, READ, 64, 8)
        assert st == 0
        diff = sum(1 for b in buf if b != 0x11)
        assert diff <= 1
        changed_reads += diff
    assert changed_reads >= 15
    changed_writes = 0
    for i in range(20):
        assert do_io(dev, WRITE, 128 + i * 8, data=b"\x22" * 4096)[0] == 0
        got = file_bytes(img, 128 + i * 8, 4096)
        diff = sum(1 for b in got if b != 0x22)
        assert diff <= 1
        changed_writes += diff
    assert changed_writes >= 15


@pytest.mark.parametrize("features,printed", [
    ("", "2 error_reads error_writes"),
    ("1 drop_writes", "1 drop_writes"),
    ("2 error_writes error_reads", "2 error_reads error_writes"),
    ("5 corrupt_bio_byte 32 r 1 0", "5 corrupt_bio_byte 32 r 1 0"),
    ("7 random_write_corrupt 5 corrupt_bio_byte 1 r 2 0", 
     "7 corrupt_bio_byte 1 r 2 0 random_write_corrupt 5"),
    ("4 random_read_corrupt 0 random_read_corrupt 9", "2 random_read_corrupt 9"),
])
def test_status_table_shape_and_reload(env, features, printed):
    c, img = env
    c.create("f", f"0 {SECTORS} flakey {img} 0 1 2 {features}\n")
    (start, n, ttype, params), = c.table("f")
    assert params == f"{img} 0 1 2 {printed}"
    c.create("g", f"{start} {n} {ttype} {params}\n", readonly=True)   # "f" writes img
    assert c.table("g") == c.table("f")


@pytest.mark.parametrize("args,words", [
    ("0 1", "Invalid argument count"),
    ("0 0 0", "Total (up + down) interval is zero"),
    ("0 4294967295 1", "Interval overflow"),
    ("0 x 1", "Invalid up interval"),
    ("0 1 1 1 bogus", "Unrecognised flakey feature"),
    ("0 1 1 2 drop_writes drop_writes", "duplicated"),
    ("0 1 1 2 drop_writes error_writes", "mutually exclusive"),
    ("0 1 1 2 error_writes drop_writes", "mutually exclusive"),
    ("0 1 1 3 drop_writes random_write_corrupt 5", "incompatible"),
    ("0 1 1 6 error_writes corrupt_bio_byte 1 w 0 0", "incompatible"),
    ("0 1 1 3 error_reads random_read_corrupt 5", "incompatible"),
    ("0 1 1 6 error_reads corrupt_bio_byte 1 r 0 0", "incompatible"),
    ("0 1 1 3 drop_writes", "Insufficient feature arguments"),
    ("0 1 1 12 a b c d e f g h i j k l", "number of feature args"),
    ("0 1 1 3 corrupt_bio_byte 1 r", "requires 4 parameters"),
    ("0 1 1 5 corrupt_bio_byte 0 r 0 0", "1-based"),
    ("0 1 1 5 corrupt_bio_byte 1 x 0 0", "direction"),
    ("0 1 1 5 corrupt_bio_byte 1 r 256 0", "value"),
    ("0 1 1 10 corrupt_bio_byte 1 r 0 0 corrupt_bio_byte 2 r 0 0", "duplicated"),
    ("0 1 1 2 random_read_corrupt 1000000001", "probability"),
    ("0 1 1 4 random_read_corrupt 1 random_read_corrupt 2", "duplicated"),
    ("0 1 1 1 drop_writes extra", "Invalid argument count"),
    ("7x 1 1", "Invalid device sector"),
])
def test_constructor_errors(env, args, words):
    c, img = env
    with pytest.raises(DMError) as e:
        c.create("f", f"0 {SECTORS} flakey {img} {args}\n")
    assert words in str(e.value)
    assert c.names() == []
    assert c.stores.open_count() == 0
