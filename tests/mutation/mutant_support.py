"""Named mutants: deliberate bugs applied from test code by monkeypatching.

Rules of this module: a mutant never touches production source or adds a
switch to it; ``apply(monkeypatch)`` replaces a function or method for the
duration of one test.  ``tests`` are the node ids (from the repository root)
that exercise the mutant; on the real code they pass with no violation, and
under the mutant the monitor named ``monitor`` is expected to report it.
``tools/mutants`` runs them one mutant at a time (PYDM_MUTANT=<name>).
"""

import os


class Mutant:
    def __init__(self, name, description, apply, tests, monitor):
        self.name = name
        self.description = description
        self.apply = apply
        self.tests = tuple(tests)
        self.monitor = monitor


def active_name():
    return os.environ.get("PYDM_MUTANT") or None
