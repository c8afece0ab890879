"""Crash consistency (writes cut at every point of a commit) and corruption
(every used block, byte flips) of era metadata."""

import io
import random
import shutil

import numpy as np
import pytest

from era_fixtures import era_check_real, fixture_path
from pydm.errors import PydmError
from pydm.metadata import era_xml
from pydm.metadata.era_check import check
from pydm.metadata.era_md import EraMetadata
from pydm.store import CountingStore as CutStore
from pydm.store import FileStore


def signature(path):
    """Everything a reader can observe of the committed state."""
    md = EraMetadata.open(FileStore(path, readonly=True), readonly=True)
    out = io.StringIO()
    era_xml.dump(md, out)
    cur = md.current_bits.tobytes() if md.current_bits is not None else None
    snap = None
    if md.snapshot_block:
        snap = np.flatnonzero(md.changed_since(1, snapshot=True)).tolist()
    return out.getvalue(), md.current_era, cur, snap


def build_base(path):
    path.write_bytes(bytes(2 << 20))
    md = EraMetadata.format(FileStore(str(path)), 8, 5000)
    rnd = random.Random(3)
    for _ in range(6):
        md.checkpoint()
        for _ in range(50):
            md.mark(rnd.randrange(5000))
        md.commit()
    md.digest_step()
    md.commit()


def op_mark(md):
    md.mark(17)
    md.mark(4999)
    md.commit()


def op_checkpoint(md):
    md.checkpoint()
    md.mark(1)
    md.commit()


def op_digest(md):
    md.digest_step(2)
    md.commit()


def op_snapshot_cycle(md):
    md.checkpoint()
    md.commit()
    md.take_snapshot()
    md.commit()
    md.mark(2)
    md.commit()
    md.drop_snapshot()
    md.commit()


def op_resize(md):
    md.resize(7000)
    md.checkpoint()
    md.mark(6999)
    md.commit()


@pytest.mark.parametrize("op", [op_mark, op_checkpoint, op_digest, op_snapshot_cycle,
                                op_resize], ids=lambda f: f.__name__)
def test_cut_commit_at_every_write(tmp_path, op):
    base = tmp_path / "base.bin"
    build_base(base)
    states = [signature(str(base))]
    # a clean run: how many writes, and every committed state along the way
    work = tmp_path / "work.bin"
    shutil.copy(base, work)
    counter = CutStore(FileStore(str(work)))
    md = EraMetadata.open(counter)
    real_commit = md.commit

    def commit_and_record():
        real_commit()
        states.append(signature(str(work)))
    md.commit = commit_and_record
    op(md)
    total = counter.writes
    assert total > 0
    for budget in range(total + 1):
        shutil.copy(base, work)
        cut = CutStore(FileStore(str(work)), budget)
        md = EraMetadata.open(cut)
        try:
            op(md)
        except PydmError:
            pass
        ok, problems = check(FileStore(str(work), readonly=True))
        assert ok, (budget, problems)
        rc, text = era_check_real(str(work))
        assert rc == 0, (budget, text)
        assert signature(str(work)) in states, f"cut after {budget} writes: unknown state"
    assert signature(str(work)) == states[-1]


def used_blocks(path):
    md = EraMetadata.open(FileStore(path, readonly=True), readonly=True)
    return np.flatnonzero(md.sm.counts).tolist()


def answers(path):
    """What dump and invalidate print, or the error they give."""
    out = []
    try:
        md = EraMetadata.open(FileStore(path, readonly=True), readonly=True,
                              load_space_map=False)
        buf = io.StringIO()
        era_xml.dump(md, buf)
        out.append(buf.getvalue())
        for t in (0, 2, 5):
            buf = io.StringIO()
            era_xml.write_blocks_xml(buf, era_xml.invalidate_blocks(md, t))
            out.append(buf.getvalue())
        if md.snapshot_block:
            out.append(str(np.flatnonzero(md.changed_since(1, snapshot=True)).tolist()))
    except PydmError as e:
        return ("error", str(e))
    return ("ok", out)


@pytest.mark.parametrize("source", ["small64", "pydm"])
def test_any_flipped_byte_of_a_used_block_is_detected(tmp_path, source):
    img = tmp_path / "img.bin"
    if source == "pydm":
        build_base(img)
        md = EraMetadata.open(FileStore(str(img)))
        md.checkpoint()
        md.commit()
        md.take_snapshot()
        md.commit()
    else:
        shutil.copy(fixture_path("small64", "small64.bin"), img)
    good = answers(str(img))
    assert good[0] == "ok"
    raw = img.read_bytes()
    rnd = random.Random(11)
    flips = 0
    for b in used_blocks(str(img)):
        for off in {0, 3, 4, 8, 16, 100, 4095, rnd.randrange(4096), rnd.randrange(4096)}:
            bad = bytearray(raw)
            bad[b * 4096 + off] ^= 1 << rnd.randrange(8)
            path = tmp_path / "bad.bin"
            path.write_bytes(bytes(bad))
            ok, problems = check(FileStore(str(path), readonly=True))
            assert not ok, (b, off)
            assert any(f"block {b}" in p for p in problems), (b, off, problems)
            got = answers(str(path))
            # never a silently wrong answer: the same answer, or a clear error
            assert got == good or (got[0] == "error" and f"block {b}" in got[1]), (b, off, got)
            flips += 1
    assert flips > 50
