"""Monitors: trace events run through an automaton, one instance per key.

Rules of this module:

* A monitor is a trace sink (see ``pydm.trace``) for the events its spec
  names.  The spec's handler for an event turns it into zero or more
  ``(key, model_event)`` pairs; it may keep shadow state (the DLM verifier's
  holder table) in ``monitor.shadow``, and runs under the monitor's own raw
  lock, so handlers see events one at a time.
* Scopes: ``global`` (one instance, key None), ``per_device`` (key = device)
  and ``per_object`` (key from the event; an instance is created only by a
  start event and dropped when it reaches a final state; the keys of the last
  few thousand dropped instances are remembered with their state, so an event
  after the end, such as a second completion, is still checked).
* An event with no transition from the instance's state is a violation: it is
  handed to the reactor once, with the instance's last events (taken from
  the monitor's ring of its last RING events, so recording costs one append),
  and the instance is dropped and ignored from then on (no cascade).
* A deterministic automaton cannot say "eventually": ``end_check`` reports
  instances left in a non-final state (at drain points the spec names, and at
  the end of a run), which turns "at most once" into "exactly once".
* A state with a clock invariant (``clk < T``) arms a deadline on entry; the
  clock watchdog reports an instance still in that state when it expires.
* Reactors never take pydm locks, and a monitor never holds its lock while
  it reacts (a ``raise`` reactor raises in the emitting thread).
"""

import collections
import time

from pydm.lockdep import make_raw_lock
from pydm.verify.dotmodel import load
from pydm.verify.reactors import REACTORS, VerificationError, react

HISTORY = 8           # events shown per instance in a report
RING = 4096           # recent events of a monitor a report's history comes from
REMEMBERED = 4096     # dropped per-object instances still checked

__all__ = ["Monitor", "Spec", "Violation", "VerificationError"]


class Spec:
    """What a monitor is: its model, scope, and how trace events map onto it.

    ``handlers``: trace event name -> fn(fields, shadow) returning an
    iterable of (key, model event) pairs (or None).  ``start``: model events
    that create a per-object instance; ``reset``: model events that put an
instance (new or not) back in the initial state first.  ``end_on``: trace event name ->
    fn(fields) giving a predicate on keys: instances it selects are checked
    (and dropped) when that event is seen.  ``params``: clock thresholds in
    seconds by name.  ``shadow``: factory of the handlers' shadow state.
    """

    def __init__(self, name, model, scope, doc, handlers, start=(), reset=(), end_on=None,
                 params=None, shadow=dict):
        if scope not in ("global", "per_device", "per_object"):
            raise ValueError(f"bad scope {scope!r}")
        self.name = name
        self.model_name = model
        self.scope = scope
        self.doc = doc
        self.handlers = handlers
        self.start = frozenset(start)
        self.reset = frozenset(reset)
        self.end_on = end_on or {}
        self.params = params or {}
        self.shadow = shadow
        self._model = None

    @property
    def model(self):
        if self._model is None:
            self._model = load(self.model_name)
        return self._model

    @property
    def events(self):
        return frozenset(self.handlers) | frozenset(self.end_on)


class Violation:
    def __init__(self, monitor, key, state, event, history, why=None):
        self.monitor = monitor
        self.key = key
        self.state = state
        self.event = event
        self.history = history
        self.why = why
        self.time = time.time()

    def __str__(self):
        what = self.why or (f"event {self.event} not allowed in state {self.state}"
                            if self.event else f"left in state {self.state} at the end")
        last = "; ".join(self.history)
        return f"{self.monitor}[{self.key}]: {what}" + (f" (last events: {last})" if last else "")

    def as_dict(self):
        return {"monitor": self.monitor, "key": repr(self.key), "state": self.state,
                "event": self.event, "history": list(self.history), "report": str(self)}


class Monitor:
    def __init__(self, spec: Spec, reactor="record", params=None, lock=None):
        if reactor not in REACTORS:
            raise ValueError(f"unknown reactor {reactor!r}")
        self.spec = spec
        self.name = spec.name
        self.model = model = spec.model
        self.reactor = reactor
        self.params = dict(spec.params, **(params or {}))
        self.instances = {}           # key -> state
        self.finished = collections.OrderedDict()   # key -> final state (None: violated)
        self.deadlines = {}           # key -> (monotonic deadline, state)
        self.violations = []
        self.shadow = spec.shadow()
        self.events_seen = 0
        self.clock = None             # set by the session when the model has clocks
        self.listener = None          # called with each violation (a report file)
        self._lock = lock or make_raw_lock()     # a session shares one among its monitors
        # the last events of every instance, together: a report picks its own
        self._ring = collections.deque(maxlen=RING)
        self._per_object = spec.scope == "per_object"
        self._invariants = {s: self.params[p] for s, p in model.invariants.items()}
        self._handlers = spec.handlers
        self._end_on = spec.end_on
        self._table = model.table
        self._initial = model.initial
        self._start = spec.start
        self._reset = spec.reset
        self._dead_ends = {s for s in model.finals if not model.has_exits(s)}

    def state_of(self, key):
        """The state of an instance (live, or dropped at a final state), or None."""
        with self._lock:
            if key in self.instances:
                return self.instances[key]
            return self.finished.get(key)

    def set_params(self, **params):
        """Change clock thresholds (seconds); applies to states entered after."""
        unknown = set(params) - set(self.params)
        if unknown:
            raise ValueError(f"{self.name} has no parameter {sorted(unknown)[0]!r}")
        with self._lock:
            self.params.update(params)
            self._invariants = {s: self.params[p] for s, p in self.model.invariants.items()}

    # ------------------------------------------------------------ events
    def __call__(self, fields):
        with self._lock:
            bad = self.handle(fields["event"], fields)
        if bad:
            for v in bad:
                self.report(v)

    def handle(self, ev, fields):
        """One event, with ``_lock`` held by the caller; the violations it
        caused (None if none), to be handed to ``report`` once released."""
        self.events_seen += 1
        bad = None
        handler = self._handlers.get(ev)
        if handler is not None:
            pairs = handler(fields, self.shadow)
            if pairs:
                now = fields.get("t")
                for key, mev in pairs:
                    v = self._step(key, mev, ev, now)
                    if v is not None:
                        bad = (bad or []) + [v]
        ender = self._end_on.get(ev)
        if ender is not None:
            bad = (bad or []) + self._end(ender(fields))
        return bad

    def _step(self, key, mev, trace_ev, now=None):
        self._ring.append((key, trace_ev, mev))
        inst = self.instances
        st = cur = inst.get(key)
        if mev in self._reset:
            st = self._initial
            self.finished.pop(key, None)
        elif st is None:
            if key in self.finished:
                st = self.finished.pop(key)
                if st is None:
                    self.finished[key] = None
                    return None           # already reported: ignored
            elif self._per_object and mev not in self._start:
                return None               # not being monitored
            else:
                st = self._initial
        nxt = self._table.get((st, mev))
        if nxt is None:
            v = Violation(self.name, key, st, mev, self._history(key))
            self._drop(key, None)
            return v
        if nxt == cur:
            return None                   # a self-loop: nothing changes
        if self._invariants:
            self._arm(key, nxt, now)
        if self._per_object and nxt in self._dead_ends:
            self._drop(key, nxt)
        else:
            inst[key] = nxt
        return None

    def _history(self, key):
        out = [mev if tev == mev else f"{tev}->{mev}" for k, tev, mev in self._ring if k == key]
        return tuple(out[-HISTORY:])

    def _drop(self, key, final_state):
        self.instances.pop(key, None)
        self.deadlines.pop(key, None)
        fin = self.finished
        fin[key] = final_state
        if len(fin) > REMEMBERED:
            fin.popitem(last=False)

    def _arm(self, key, state, now=None):
        limit = self._invariants.get(state)
        if limit is None:
            self.deadlines.pop(key, None)
        else:
            self.deadlines[key] = ((time.monotonic() if now is None else now) + limit, state)
            if self.clock is not None:
                self.clock.poke()

    # -------------------------------------------------------- end checks
    def _end(self, select):
        out = []
        finals = self.model.finals
        for key, st in list(self.instances.items()):
            if st not in finals and select(key):
                out.append(Violation(self.name, key, st, None, self._history(key)))
                self._drop(key, None)
        return out

    def end_check(self, select=lambda key: True):
        """Report instances left non-final (all, or those ``select`` picks)."""
        with self._lock:
            bad = self._end(select)
        for v in bad:
            self.report(v, final=True)
        return bad

    def expire(self, now):
        """Report instances whose clock invariant no longer holds; the
        earliest deadline still armed (or None)."""
        bad, nxt = [], None
        with self._lock:
            for key, (deadline, st) in list(self.deadlines.items()):
                if deadline <= now:
                    limit = self._invariants[st]
                    bad.append(Violation(self.name, key, st, None, self._history(key),
                                         why=f"still in state {st} after {limit:g} s "
                                             f"(invariant clk < {limit:g} s)"))
                    self._drop(key, None)
                elif nxt is None or deadline < nxt:
                    nxt = deadline
        for v in bad:
            self.report(v, final=True)
        return nxt

    def report(self, v, final=False):
        """Record a violation and hand it to the reactor (no lock held)."""
        self.violations.append(v)
        if self.listener is not None:
            self.listener(v)
        react(self.reactor, v, in_emitter=not final)

    def clear(self):
        with self._lock:
            self.instances.clear()
            self._ring.clear()
            self.finished.clear()
            self.deadlines.clear()
            self.violations.clear()
            self.shadow = self.spec.shadow()
