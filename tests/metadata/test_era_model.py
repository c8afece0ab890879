"""Random era workloads against a plain Python model; both checkers after every commit.

One long seeded run (thousands of marks, checkpoints, digests, snapshots,
resizes) and a hypothesis search over shorter ones.  After every commit the
image passes the real era_check and pydm's checker (exact reference counts),
and every query agrees with the model.
"""

import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from era_fixtures import era_check_real
from pydm.metadata.block_manager import MetadataError
from pydm.metadata import era_md
from pydm.metadata.era_check import check
from pydm.metadata.era_md import ERAS_PER_BLOCK, EraMetadata
from pydm.store import FileStore


class Model:
    """What the metadata must answer, kept in plain dicts and sets."""

    def __init__(self, nr_blocks):
        self.nr_blocks = nr_blocks
        self.era = 0
        self.current = None            # (nr_bits, set) or None
        self.archived = {}             # era -> (nr_bits, set)
        self.eras = [0] * nr_blocks
        self.snap = None               # (nr_blocks, eras copy, archived copy)
        self.digesting = None          # (era, nr_blocks, era array blocks done)

    def checkpoint(self):
        self.archive()
        self.current = (self.nr_blocks, set())
        self.era += 1

    def archive(self):
        if self.current is not None:
            self.archived[self.era] = self.current
            self.current = None

    def mark(self, b):
        self.current[1].add(b)

    def digest(self, step_blocks):
        """The oldest writeset's blocks in its next window of ``step_blocks``
        era array blocks' worth of origin blocks, from its next set bit; it
        goes with its last window (a resize starts it over)."""
        if not self.archived:
            return
        era = min(self.archived)
        nr_bits, bits = self.archived[era]
        n = min(nr_bits, self.nr_blocks)
        span = step_blocks * ERAS_PER_BLOCK
        pos = 0
        if self.digesting is not None and self.digesting[:2] == (era, self.nr_blocks):
            pos = self.digesting[2]
        rest = sorted(b for b in bits if pos <= b < n)
        if rest:
            lo = rest[0]
            for b in rest:
                if b < lo + span:
                    self.eras[b] = era
            pos = min(lo + span, n)
        if any(pos <= b < n for b in bits):
            self.digesting = (era, self.nr_blocks, pos)
        else:
            del self.archived[era]
            self.digesting = None

    def resize(self, n):
        self.eras = (self.eras + [0] * n)[:n]
        self.nr_blocks = n

    def take_snap(self):
        self.checkpoint()
        self.snap = (self.nr_blocks, list(self.eras),
                     {e: (n, set(s)) for e, (n, s) in self.archived.items()})

    def changed(self, since, include_current=True, snapshot=False):
        if snapshot:
            n, eras, archived = self.snap
            current = None
        else:
            n, eras, archived = self.nr_blocks, self.eras, self.archived
            current = self.current if include_current and self.era >= since else None
        out = {b for b in range(n) if eras[b] >= since}
        for era, (nr_bits, bits) in archived.items():
            if era >= since:
                out |= {b for b in bits if b < min(nr_bits, n)}
        if current is not None:
            out |= {b for b in current[1] if b < min(current[0], n)}
        return out


def as_set(mask):
    return set(np.flatnonzero(mask).tolist())


class Runner:
    def __init__(self, path, nr_blocks, real_check_every=1):
        self.path = path
        self.store = FileStore(path)
        self.md = EraMetadata.format(self.store, 8, nr_blocks)
        self.model = Model(nr_blocks)
        self.commits = 0
        self.real_every = real_check_every

    def verify(self, rnd):
        self.commits += 1
        ok, problems = check(FileStore(self.path, readonly=True))
        assert ok, problems
        if self.commits % self.real_every == 0:
            rc, text = era_check_real(self.path)
            assert rc == 0, text
        md, m = self.md, self.model
        assert md.current_era == m.era and md.nr_blocks == m.nr_blocks
        for since in {0, 1, m.era, max(m.era - 1, 0), rnd.randrange(m.era + 2)}:
            assert as_set(md.changed_since(since)) == m.changed(since)
            assert as_set(md.changed_since(since, include_current=False)) == \
                m.changed(since, include_current=False)
            if m.snap is not None:
                assert as_set(md.changed_since(since, snapshot=True)) == \
                    m.changed(since, snapshot=True)

    def step(self, op, rnd):
        md, m = self.md, self.model
        if op == "mark":
            if m.current is None:
                return
            for _ in range(rnd.randrange(1, 40)):
                b = rnd.randrange(m.current[0])
                md.mark(b)
                m.mark(b)
        elif op == "checkpoint":
            md.checkpoint()
            m.checkpoint()
        elif op == "digest":
            md.digest_step()
            m.digest(era_md.DIGEST_BLOCKS)
        elif op == "archive":
            md.archive()
            m.archive()
        elif op == "snap":
            if m.snap is None:
                md.checkpoint()
                md.commit()
                md.take_snapshot()
                m.take_snap()
        elif op == "drop":
            if m.snap is not None:
                md.drop_snapshot()
                m.snap = None
        elif op == "resize":
            n = max(1, m.nr_blocks + rnd.randrange(-300, 600))
            md.resize(n)
            m.resize(n)
        elif op == "reopen":
            md.commit()
            self.store.close()
            self.store = FileStore(self.path)
            self.md = EraMetadata.open(self.store)
            m.digesting = None             # a reopened writeset is digested from its start
            return
        md.commit()
        self.verify(rnd)


OPS = ["mark"] * 8 + ["checkpoint"] * 3 + ["digest"] * 2 + ["archive", "snap", "drop",
                                                            "resize", "reopen"]


@pytest.mark.parametrize("step_blocks", [era_md.DIGEST_BLOCKS, 1])
def test_long_seeded_workload(tmp_path, monkeypatch, step_blocks):
    # step 1: 3000 blocks make 3 era array blocks, so digests stop part-way
    # through a writeset and meet checkpoints, snapshots, resizes and reopens
    monkeypatch.setattr(era_md, "DIGEST_BLOCKS", step_blocks)
    path = tmp_path / "era.bin"
    path.write_bytes(bytes(8 << 20))
    r = Runner(str(path), 3000, real_check_every=5)
    rnd = random.Random(2026)
    r.md.checkpoint()
    r.model.checkpoint()
    r.md.commit()
    marks = 0
    for _ in range(700):
        op = rnd.choice(OPS)
        r.step(op, rnd)
        marks += op == "mark"
    rc, text = era_check_real(str(path))
    assert rc == 0, text
    assert marks > 250 and r.model.era > 50 and r.commits > 500


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(OPS), min_size=5, max_size=40), st.integers(1, 5000),
       st.integers(0, 2 ** 32))
def test_hypothesis_workloads(tmp_path_factory, ops, nr_blocks, seed):
    path = tmp_path_factory.mktemp("era") / "era.bin"
    path.write_bytes(bytes(4 << 20))
    r = Runner(str(path), nr_blocks, real_check_every=3)
    rnd = random.Random(seed)
    for op in ["checkpoint"] + ops:
        r.step(op, rnd)


def test_era_counter_does_not_wrap(tmp_path):
    path = tmp_path / "era.bin"
    path.write_bytes(bytes(1 << 20))
    md = EraMetadata.format(FileStore(str(path)), 8, 10)
    md.sb.current_era = 0xFFFFFFFE
    md.checkpoint()
    md.commit()
    assert md.current_era == 0xFFFFFFFF
    with pytest.raises(MetadataError, match="maximum"):
        md.checkpoint()
    assert era_check_real(str(path))[0] == 0


def test_digest_fits_in_less_space_than_a_second_era_array(tmp_path, monkeypatch):
    """A writeset touching every era array block is digested step by step,
    each step committed, so its old copies are freed as it goes: metadata
    with room for far less than a second era array is enough (folding it
    in one go ran out of space, and the live target then failed writes to
    unmarked blocks)."""
    monkeypatch.setattr(era_md, "DIGEST_BLOCKS", 8)
    nr = 64 * ERAS_PER_BLOCK                     # 64 era array blocks
    probe = tmp_path / "probe.bin"
    probe.write_bytes(bytes(4 << 20))
    md = EraMetadata.format(FileStore(str(probe)), 8, nr)
    md.checkpoint()
    md.commit()
    need = md.metadata_usage()[0] + 3 * 8         # what is used, and room for ~3 steps
    path = tmp_path / "era.bin"
    path.write_bytes(bytes(need * 4096))
    md = EraMetadata.format(FileStore(str(path)), 8, nr)
    md.checkpoint()
    written = list(range(5, nr, ERAS_PER_BLOCK))  # one block in each array block
    for b in written:
        md.mark(b)
    md.commit()
    md.checkpoint()
    md.commit()
    used, total = md.metadata_usage()
    assert total - used < 64 // 2, "the test needs less room than half an era array"
    steps = 0
    while md.digest_step():
        md.commit()
        steps += 1
    md.commit()
    assert steps >= 64 // 8 - 1 and not md.has_archived()
    assert md.current_era == 2
    assert as_set(md.changed_since(1)) == set(written)
    assert as_set(md.changed_since(2)) == set()
    rc, text = era_check_real(str(path))
    assert rc == 0, text
