"""Splitting, flush broadcast, completion-once, errors: through a recording target."""

import errno

import pytest

from helpers import Waiter, do_io
from pydm import trace
from pydm.bio import (Bio, DISCARD, FLUSH, READ, REQ_FUA, REQ_NOWAIT, REQ_PREFLUSH, WRITE,
                      WRITE_ZEROES)
from pydm.control import Control
from pydm.target import KILL, NOWAIT, SUBMITTED, Target, parse_uint

LOG = []


class Rec(Target):
    """rec <max_io_len> [fail]: records every fragment it maps."""

    name = "rec"

    def ctr(self, args):
        self.max_io_len = parse_uint(args[0], "max_io_len")
        self.fail = len(args) > 1 and args[1] == "fail"
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 2

    def map(self, bio):
        LOG.append((self.begin, bio.op, bio.sector, bio.nr_sectors, bio.flags, bio.bio_nr,
                    None if bio.data is None else len(bio.data)))
        if self.fail:
            return KILL
        if bio.op == READ:
            bio.data[:] = bytes([self.begin % 251]) * len(bio.data)
        bio.complete(0)
        return SUBMITTED


class RecNowait(Rec):
    """rec, declaring that it passes REQ_NOWAIT down."""

    name = "rec-nowait"
    features = NOWAIT


class Nodiscard(Target):
    name = "nodiscard"

    def map(self, bio):
        bio.complete(0)
        return SUBMITTED


@pytest.fixture
def control():
    LOG.clear()
    c = Control()
    c.targets.register(Rec)
    c.targets.register(Nodiscard)
    c.targets.register(RecNowait)
    yield c
    c.shutdown()


def test_split_at_target_boundaries_and_max_io_len(control):
    dev = control.create("d", "0 100 rec 0\n100 100 rec 16\n200 100 rec 0\n")
    st, buf = do_io(dev, READ, 90, 130)
    assert st == 0
    # grid of 16 is aligned to the second target's start (100), not to sector 0
    assert [(b, s, n) for b, _op, s, n, _f, _i, _l in LOG] == [
        (0, 90, 10), (100, 100, 16), (100, 116, 16), (100, 132, 16), (100, 148, 16),
        (100, 164, 16), (100, 180, 16), (100, 196, 4), (200, 200, 20)]
    # each fragment wrote through a view of the one original buffer
    assert buf[:10 * 512] == bytes([0]) * 5120
    assert buf[10 * 512:11 * 512] == bytes([100]) * 512
    assert buf[-512:] == bytes([200 % 251]) * 512


def test_empty_flush_is_broadcast_not_routed(control):
    dev = control.create("d", "0 100 rec 0\n100 100 rec 8\n200 100 nodiscard\n")
    st, _ = do_io(dev, FLUSH, 12345, 0, flags=REQ_PREFLUSH)
    assert st == 0
    assert sorted((b, op) for b, op, *_ in LOG) == [(0, FLUSH), (100, FLUSH)]


def test_flush_with_data_is_flush_then_data(control):
    dev = control.create("d", "0 100 rec 0\n100 100 rec 0\n")
    st, _ = do_io(dev, WRITE, 98, data=b"x" * 1024, flags=REQ_PREFLUSH | REQ_FUA)
    assert st == 0
    ops = [(op, s, n, f) for _b, op, s, n, f, _i, _l in LOG]
    assert ops[:2] == [(FLUSH, 0, 0, REQ_PREFLUSH)] * 2
    assert ops[2:] == [(WRITE, 98, 2, REQ_FUA)]   # FUA stays, PREFLUSH gone


def test_discard_and_write_zeroes_copies_and_eopnotsupp(control):
    dev = control.create("d", "0 100 rec 8\n100 100 nodiscard\n")
    st, _ = do_io(dev, WRITE_ZEROES, 0, 50)
    assert st == 0
    # not split on the max_io_len grid (no split_discard_bios), two copies
    assert [(op, s, n, i) for _b, op, s, n, _f, i, _l in LOG] == [
        (WRITE_ZEROES, 0, 50, 0), (WRITE_ZEROES, 0, 50, 1)]
    st, _ = do_io(dev, DISCARD, 90, 20)
    assert st == errno.EOPNOTSUPP
    st, _ = do_io(dev, DISCARD, 0, 10)
    assert st == 0


def test_error_in_one_fragment_fails_the_bio_once(control):
    dev = control.create("d", "0 100 rec 0\n100 100 rec 0 fail\n")
    st, _ = do_io(dev, WRITE, 96, data=b"y" * 4096)
    assert st == errno.EIO
    st, _ = do_io(dev, WRITE, 0, data=b"y" * 4096)
    assert st == 0


def test_out_of_range_and_every_bio_completes_exactly_once(control):
    dev = control.create("d", "0 64 rec 4\n")
    with trace.Recorder() as rec:
        waiters = []
        for s in range(0, 70, 3):
            w = Waiter()
            buf = memoryview(bytearray(8 * 512))
            dev.submit(Bio(READ, s, 8, buf, 0, w))
            waiters.append((s, w))
    for s, w in waiters:
        assert w.wait() == (0 if s + 8 <= 64 else errno.EIO)
        assert w.calls == 1
    done = [e["bio"] for e in rec.named("bio_complete")]
    assert len(done) == len(set(done)) == len(waiters)
    assert {e["bio"] for e in rec.named("bio_submit")} == set(done)


def test_double_completion_is_loud():
    from pydm.bio import BioDoubleCompletion
    b = Bio(READ, 0, 1, memoryview(bytearray(512)), 0, lambda b: None)
    b.complete(0)
    with pytest.raises(BioDoubleCompletion):
        b.complete(0)


def test_remap_onto_lower_device(control, tmp_path):
    from helpers import make_image
    make_image(tmp_path / "a.img", 1 << 20)
    control.create("low", f"0 2048 linear {tmp_path / 'a.img'} 0\n")
    up = control.create("up", "0 1000 linear dm:low 1000\n")
    assert do_io(up, WRITE, 10, data=b"z" * 512)[0] == 0
    with open(tmp_path / "a.img", "rb") as f:
        f.seek(1010 * 512)
        assert f.read(512) == b"z" * 512
    assert control.info("low")["open_count"] == 1
    assert control.deps("up") == ["dm:low"]


def test_remapped_result_without_device_is_caught(control):
    class Broken(Target):
        name = "broken"

        def map(self, bio):
            raise RuntimeError("bug in a target")

    control.targets.register(Broken)
    dev = control.create("b", "0 8 broken\n")
    assert do_io(dev, READ, 0, 8)[0] == errno.EIO


def test_req_nowait_reaches_only_targets_that_take_it(control):
    dev = control.create("d", "0 100 rec-nowait 0\n100 100 rec 0\n")
    for sector, n in ((0, 50), (120, 50), (90, 20)):     # one fragment each, then split
        LOG.clear()
        st, _buf = do_io(dev, READ, sector, n, flags=REQ_NOWAIT | REQ_FUA)
        assert st == 0
        flags = {begin: f for begin, _op, _s, _n, f, _nr, _len in LOG}
        for begin, f in flags.items():
            assert f & REQ_FUA                          # other flags always pass
            assert bool(f & REQ_NOWAIT) == (begin == 0), (sector, begin, f)
