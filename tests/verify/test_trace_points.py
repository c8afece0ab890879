"""Trace points: every emit in the tree names a declared event behind its own
flag (free when no monitor takes it), and the flags follow the sinks."""

import os
import re

import pytest

from pydm import trace
from pydm.verify.specs import SPECS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMIT = re.compile(r'trace\.emit\("(\w+)"')


def _sources():
    for top in ("pydm", "targets", "metadata", "stores"):
        for d, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py") and f != "trace.py":
                    yield os.path.join(d, f)


def test_every_emit_is_declared_and_behind_its_flag():
    seen = set()
    for path in _sources():
        lines = open(path).read().splitlines()
        for i, line in enumerate(lines):
            m = EMIT.search(line)
            if not m:
                continue
            name = m.group(1)
            seen.add(name)
            assert name in trace.EVENTS, f"{path}:{i + 1}: undeclared event {name}"
            j = i
            while not lines[j].strip().startswith("if "):
                j -= 1
            assert f"trace.on.{name}" in lines[j], f"{path}:{i + 1}: {name} not behind " \
                                                   f"'if trace.on.{name}' ({lines[j].strip()})"
    assert seen == set(trace.EVENTS), set(trace.EVENTS) ^ seen


def test_every_monitor_listens_to_declared_events():
    for spec in SPECS.values():
        assert spec.events <= set(trace.EVENTS), spec.name


def test_flags_follow_the_sinks():
    def sink(fields):
        pass
    was = trace.on.dev_swap
    trace.attach(sink, ("dev_swap",))
    try:
        assert trace.on.dev_swap and trace.ENABLED
    finally:
        trace.detach(sink)
    assert trace.on.dev_swap == was
    with pytest.raises(ValueError, match="no trace event 'nope'"):
        trace.attach(sink, ("nope",))
