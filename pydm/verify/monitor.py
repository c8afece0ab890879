"""Monitors: run trace events through an automaton, one instance per key.

Rules of this module: a monitor is a trace sink (see pydm.trace).  Each
instance (per device, per bio...) starts in the model's initial state; an
event with no transition from the current state is a violation, handed to the
reactor, and the instance is reset.  A deterministic automaton cannot say
"eventually", so ``end_check`` reports every instance not in a final state
(this is what turns "at most once" into "exactly once").  Reactors never take
pydm locks.
"""

import contextlib
import logging

from pydm import trace
from pydm.lockdep import make_raw_lock
from pydm.verify.dotmodel import load

log = logging.getLogger("pydm.verify")


class VerificationError(AssertionError):
    pass


class Violation:
    def __init__(self, monitor, key, state, event, fields):
        self.monitor = monitor
        self.key = key
        self.state = state
        self.event = event
        self.fields = fields

    def __str__(self):
        what = f"event {self.event}" if self.event else "end of run"
        return f"{self.monitor}[{self.key}]: {what} not allowed in state {self.state}"


class Monitor:
    """``key`` picks the instance from an event's fields; ``start`` events
    reset their instance to the initial state before being applied."""

    def __init__(self, model, key, start=(), reactor="record", name=None):
        self.model = load(model) if isinstance(model, str) else model
        self.name = name or self.model.name
        self.key = key
        self.start = set(start)
        self.reactor = reactor
        self.instances = {}
        self.violations = []
        self._lock = make_raw_lock()

    def __call__(self, fields):
        ev = fields["event"]
        if ev not in self.model.events:
            return
        k = self.key(fields)
        if k is None:
            return
        bad = None
        with self._lock:
            st = self.model.initial if ev in self.start else self.instances.get(k, self.model.initial)
            nxt = self.model.next(st, ev)
            if nxt is None:
                bad = Violation(self.name, k, st, ev, dict(fields))
                self.instances.pop(k, None)
            else:
                self.instances[k] = nxt
        if bad is not None:
            self._react(bad)

    def end_check(self):
        with self._lock:
            left = [(k, s) for k, s in self.instances.items() if s not in self.model.finals]
        for k, s in left:
            self._react(Violation(self.name, k, s, None, {}))

    def _react(self, v):
        self.violations.append(v)
        if self.reactor == "log":
            log.error("verification: %s", v)
        elif self.reactor == "raise":
            raise VerificationError(str(v))


def bio_once(reactor="record"):
    return Monitor("bio_once", key=lambda f: f.get("bio"), reactor=reactor)


def dev_lifecycle(reactor="record"):
    # Keyed by minor, not name: a name can be reused while the old device
    # is still being torn down.
    return Monitor("dev_lifecycle", key=lambda f: f.get("minor"), start=("dev_create",),
                   reactor=reactor)


FACTORIES = {"bio_once": bio_once, "dev_lifecycle": dev_lifecycle}


@contextlib.contextmanager
def enabled(*names, reactor="record"):
    """Attach monitors for the duration; end checks run on exit.

    With ``reactor="raise"`` a violation raises in the emitting thread and any
    violation (including end-of-run ones) is raised again on exit.
    """
    monitors = [FACTORIES[n](reactor) for n in names]
    for m in monitors:
        trace.attach(m)
    try:
        yield monitors
    finally:
        for m in monitors:
            trace.detach(m)
    for m in monitors:
        try:
            m.end_check()
        except VerificationError:
            pass
    bad = [str(v) for m in monitors for v in m.violations]
    if bad and reactor == "raise":
        raise VerificationError("\n".join(bad[:20]))
