"""Mutants of the era target, each caught by one era monitor.

Rules of this module: as ``mutant_support`` says, a mutant only
monkeypatches (no switch in production code) and names the scenario tests
(tests/mutation/test_mutants_era.py) that pass on the real code and make
its monitor report under it.
"""

import contextlib

from mutant_support import Mutant

_SCENARIOS = "tests/mutation/test_mutants_era.py::"


def _checkpoint_without_quiesce(monkeypatch):
    # era is the only user of the table context's quiesce
    from pydm.table import TableContext
    monkeypatch.setattr(TableContext, "quiesce", lambda self: contextlib.nullcontext())


class _EverythingMarked:
    """A ``committed`` set that claims every era block is marked."""

    def find(self, *_args):
        return -1


def _write_before_commit(monkeypatch):
    # the fast path reads the target's ``committed``: with every block seen
    # as marked, map passes each write straight to the origin, mark or not
    from pydm.targets.era import EraTarget
    real_ctr = EraTarget.ctr

    def ctr(self, args):
        real_ctr(self, args)
        self.committed = _EverythingMarked()
    monkeypatch.setattr(EraTarget, "ctr", ctr)


MUTANTS = (
    Mutant("era-checkpoint-without-quiesce",
           "checkpoint and take_metadata_snap switch eras without quiescing the device, so "
           "a write that passed the fast path is still in flight (the dm-era review race)",
           _checkpoint_without_quiesce,
           [_SCENARIOS + "test_checkpoint_with_a_write_in_flight",
            _SCENARIOS + "test_take_metadata_snap_with_a_write_in_flight"],
           "era_drain"),
    Mutant("era-write-before-commit",
           "map lets a write to an era block not yet marked go to the origin before the "
           "commit of its mark",
           _write_before_commit,
           [_SCENARIOS + "test_first_writes_wait_for_their_mark_commit"],
           "era_commit"),
)
