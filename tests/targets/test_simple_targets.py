"""linear, delay, error and zero through real image files."""

import errno
import threading
import time

import pytest

from helpers import Waiter, do_io, make_image
from pydm.bio import Bio, DISCARD, FLUSH, READ, REQ_NOUNMAP, REQ_PREFLUSH, WRITE, WRITE_ZEROES
from pydm.control import Control
from pydm.errors import DMError
from pydm.store import EXTENT_HOLE, EXTENT_ZERO


@pytest.fixture
def env(tmp_path):
    c = Control()
    a = make_image(tmp_path / "a.img", 1 << 20)
    b = make_image(tmp_path / "b.img", 1 << 20, fill=b"\x5a")
    yield c, a, b
    c.shutdown()


def test_linear_offsets_and_passthrough(env):
    c, a, b = env
    dev = c.create("l", f"0 100 linear {a} 50\n100 100 linear {b} 0\n")
    assert do_io(dev, WRITE, 98, data=b"x" * 2048)[0] == 0
    with open(a, "rb") as f:
        f.seek(148 * 512)
        assert f.read(1024) == b"x" * 1024
    with open(b, "rb") as f:
        assert f.read(1536) == b"x" * 1024 + b"\x5a" * 512
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    assert do_io(dev, WRITE_ZEROES, 100, 2, flags=REQ_NOUNMAP)[0] == 0
    assert do_io(dev, DISCARD, 102, 8)[0] == 0
    with open(b, "rb") as f:
        assert f.read(1024) == bytes(1024)
    assert c.status("l") == [(0, 100, "linear", ""), (100, 100, "linear", "")]
    caps = dev.capabilities()
    assert caps.discard and caps.write_zeroes and caps.flush and caps.fua


def test_linear_block_status_reports_holes(env):
    c, a, _b = env
    dev = c.create("l", f"0 2048 linear {a} 0\n")
    assert dev.block_status("base:allocation", 0, 2048) == [(2048, EXTENT_HOLE | EXTENT_ZERO)]
    do_io(dev, WRITE, 64, data=b"d" * 4096)
    runs = dev.block_status("base:allocation", 0, 2048)
    assert sum(n for n, _f in runs) == 2048
    assert (8, 0) in runs and runs[0][1] == EXTENT_HOLE | EXTENT_ZERO


def test_readonly_device_and_readonly_file(env, tmp_path):
    c, a, _b = env
    dev = c.create("r", f"0 100 linear {a} 0\n", readonly=True)
    assert do_io(dev, READ, 0, 8)[0] == 0
    assert do_io(dev, WRITE, 0, data=b"n" * 512)[0] == errno.EROFS


def test_readonly_file_refused_for_a_writable_table(env, readonly_dir):
    c, _a, _b = env
    ro = readonly_dir / "ro.img"
    with pytest.raises(DMError, match="cannot open .* read-write: Read-only file system"):
        c.create("w", f"0 100 linear {ro} 0\n")
    assert c.names() == [] and c.stores.open_count() == 0
    dev = c.create("w", f"0 100 linear {ro} 0\n", readonly=True)
    assert do_io(dev, READ, 0, 8)[0] == 0


def test_error_and_zero(env):
    c, _a, _b = env
    dev = c.create("ez", "0 8 error\n8 8 zero\n")
    assert do_io(dev, READ, 0, 8)[0] == errno.EIO
    assert do_io(dev, WRITE, 0, data=b"x" * 512)[0] == errno.EIO
    st, buf = do_io(dev, READ, 8, 8)
    assert st == 0 and buf == bytes(4096)
    assert do_io(dev, WRITE, 8, data=b"x" * 4096)[0] == 0
    assert do_io(dev, READ, 8, 8)[1] == bytes(4096)
    assert dev.block_status("base:allocation", 8, 8) == [(8, EXTENT_HOLE | EXTENT_ZERO)]
    c.wipe_table("ez")
    assert c.table("ez") == [(0, 16, "error", "")]


def test_delay_holds_bios_without_blocking_the_submitter(env):
    c, a, b = env
    dev = c.create("d", f"0 100 delay {a} 0 200 {b} 0 0\n")
    assert c.table("d") == [(0, 100, "delay", f"{a} 0 200 {b} 0 0")]
    w = Waiter()
    t0 = time.monotonic()
    dev.submit(Bio(READ, 0, 8, memoryview(bytearray(4096)), 0, w))
    assert time.monotonic() - t0 < 0.1          # submit returned at once
    assert do_io(dev, WRITE, 0, data=b"w" * 512)[0] == 0   # writes: no delay
    assert not w.event.is_set()
    assert w.wait() == 0
    assert time.monotonic() - t0 >= 0.19


def test_delay_suspend_releases_held_bios(env):
    c, a, _b = env
    dev = c.create("d", f"0 100 delay {a} 0 60000\n")
    w = Waiter()
    dev.submit(Bio(READ, 0, 8, memoryview(bytearray(4096)), 0, w))
    t = threading.Thread(target=c.suspend, args=("d",))
    t.start()
    assert w.wait(5) == 0                       # presuspend flushed the timer queue
    t.join(5)
    assert dev.suspended
    c.resume("d")


@pytest.mark.parametrize("args", ["a.img", "a.img 0", "a.img 0 1 b.img", "a.img 0 x"])
def test_delay_bad_args(env, tmp_path, args):
    c, _a, _b = env
    with pytest.raises(DMError):
        c.create("d", f"0 8 delay {args}\n", cwd=str(tmp_path))
    assert c.stores.open_count() == 0
