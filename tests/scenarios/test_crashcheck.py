"""The crash harness (pydm.crashcheck, tools/crashcheck) on each stack: a
short workload checked at every log entry, a longer one at every flush, FUA
and promise; and mutants of writeboost and era, applied from here by
monkeypatching, that it must catch, printing how to rebuild the state."""

import os
import subprocess
import sys
import threading

import pytest

from nbd_support import need
from pydm import crashcheck as C
from pydm.bio import Bio, WRITE
from pydm.target import SUBMITTED
from pydm.targets.era import EraTarget
from pydm.targets.writeboost.flusher import Flusher

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 4 << 20


def run(tmp_path, kind, ops, every_write, seed=3):
    stack = C.make_stack(kind, SIZE)
    rec = C.record(stack, str(tmp_path), "script", ops, seed)
    return rec, C.crash_points(rec, every_write)


@pytest.mark.parametrize("kind,ops,every", [("linear", 60, True), ("era", 25, True),
                                            ("writeboost", 40, True), ("era-wb", 20, True),
                                            ("era", 120, False), ("writeboost", 250, False)])
def test_every_crash_point_passes(tmp_path, kind, ops, every):
    need("era_check")
    rec, verdicts = run(tmp_path, kind, ops, every)
    bad = [(v.entry, v.problems) for v in verdicts if not v.ok]
    assert not bad, bad[:3]
    assert len(verdicts) >= (rec.entries if every else 20)
    print(f"{kind}: {len(verdicts)} crash points of {rec.entries} entries, all ok")


# ------------------------------------------------------------------ mutants
def wb_acks_before_the_cache_flush(monkeypatch):
    """writeboost acknowledges a flush before its segment is durable: the
    flusher's cache FLUSH is skipped."""
    real = Flusher._process

    def process(self, batch):
        cache = self.engine.cache
        cache.flush = lambda: None
        try:
            return real(self, batch)
        finally:
            del cache.flush
    monkeypatch.setattr(Flusher, "_process", process)


def era_writes_before_the_commit(monkeypatch):
    """era sends a first write to its origin before the commit of its mark."""
    real = EraTarget.map

    def early(self, bio):
        r = real(self, bio)
        if r == SUBMITTED:
            done = threading.Event()
            self.origin.submit(Bio(WRITE, bio.sector, bio.nr_sectors, bio.data, 0,
                                   lambda _b: done.set()))
            done.wait(10)
        return r
    monkeypatch.setattr(EraTarget, "map", early)


@pytest.mark.parametrize("kind,mutant,ops", [("writeboost", wb_acks_before_the_cache_flush, 60),
                                             ("era", era_writes_before_the_commit, 40)])
def test_a_mutant_is_caught_with_its_replay_command(tmp_path, monkeypatch, kind, mutant, ops):
    need("era_check")
    with monkeypatch.context() as m:
        mutant(m)
        stack = C.make_stack(kind, SIZE)
        rec = C.record(stack, str(tmp_path), "script", ops, 5)
    verdicts = C.crash_points(rec, every_write=False)
    bad = [v for v in verdicts if not v.ok]
    assert bad, f"{mutant.__name__}: no crash point failed ({len(verdicts)} checked)"
    how = C.reproduce(rec, bad[0])
    assert f"--limit {bad[0].entry + 1}" in how and "pydm dm create dut" in how
    print(f"{mutant.__name__}: {len(bad)} of {len(verdicts)} crash points fail; first: "
          f"entry {bad[0].entry}: {bad[0].problems[0]}")


def test_the_tool_runs_and_says_what_it_did(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "crashcheck"),
                        "--stack", "linear", "--ops", "40", "--size-mib", "4", "--dir",
                        str(tmp_path), "-q"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "crash points of" in r.stdout and "0 failed" in r.stdout
