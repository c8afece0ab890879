"""tools/mutants: lists every mutant, and runs one to a named verdict."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "mutants")


def run(*args):
    return subprocess.run([sys.executable, TOOL, *args], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)


def test_list_names_each_mutant_and_its_monitor():
    r = run("--list")
    assert r.returncode == 0, r.stderr
    rows = [l.split()[:2] for l in r.stdout.splitlines()]
    assert len(rows) >= 10
    assert ["era-write-before-commit", "era_commit"] in rows
    assert ["wb-flush-stranded-on-dead-cache", "deadline"] in rows


def test_one_mutant_is_caught_by_its_monitor():
    r = run("era-write-before-commit", "abba-control-path")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "baseline:" in r.stdout
    assert "caught by era_commit" in r.stdout and "caught by lockdep" in r.stdout
    assert "2/2 mutants caught" in r.stdout


def test_unknown_mutant_is_one_line():
    r = run("nope")
    assert r.returncode == 1 and r.stderr.strip() == \
        "mutants: unknown mutant 'nope' (--list shows them)"
