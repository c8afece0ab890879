"""Patches the era tests put on from outside the target: a spy that counts
the metadata commits carrying marks, a commit that fails once, messages
without the quiesce (the review race)."""

import contextlib
import errno

from pydm.metadata.era_md import EraMetadata
from pydm.table import TableContext


def count_mark_commits(monkeypatch):
    """A function: how many metadata commits so far carried marks (a spy on
    the metadata class, which only the era worker calls)."""
    count = {"marked": False, "commits": 0}
    real_mark, real_commit = EraMetadata.mark_range, EraMetadata.commit

    def mark_range(self, first, end):
        count["marked"] = True
        return real_mark(self, first, end)

    def commit(self):
        real_commit(self)
        if count["marked"]:
            count["marked"] = False
            count["commits"] += 1
    monkeypatch.setattr(EraMetadata, "mark_range", mark_range)
    monkeypatch.setattr(EraMetadata, "commit", commit)
    return lambda: count["commits"]


def fail_next_commit(monkeypatch):
    """The next metadata commit fails with EIO; a list that empties when it has."""
    real = EraMetadata.commit
    fails = [1]

    def commit_once_failing(self):
        if fails:
            fails.pop()
            raise OSError(errno.EIO, "metadata device I/O error")
        return real(self)
    monkeypatch.setattr(EraMetadata, "commit", commit_once_failing)
    return fails


def without_quiesce(monkeypatch):
    """Messages switch eras without quiescing the device (the review race)."""
    monkeypatch.setattr(TableContext, "quiesce", lambda self: contextlib.nullcontext())
