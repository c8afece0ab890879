"""Helpers for monitor tests: a fresh monitor of a shipped spec, fed by hand."""

import itertools

from pydm.verify.monitor import Monitor
from pydm.verify.specs import SPECS

_seq = itertools.count(1)


def fresh(name, **params):
    """A monitor of spec ``name`` with the record reactor, attached to nothing."""
    return Monitor(SPECS[name], "record", params or None)


def feed(mon, events):
    """Feed (trace event name, fields dict) pairs, as trace.emit would."""
    for ev, fields in events:
        f = dict(fields)
        f["event"] = ev
        f.setdefault("seq", next(_seq))
        f.setdefault("thread", 0)
        mon(f)
    return mon.violations
