"""The set of enabled monitors: what ``pydm rv`` and the test suite drive.

Rules of this module: a Session owns its monitors and their trace
attachments; enabling puts a monitor in its initial state (it knows nothing
of what happened before, as in the kernel), disabling detaches it and keeps
its violations for ``status``.  The lock-order checker appears as the
monitor ``lockdep`` (on only when the process started with PYDM_LOCKDEP=1:
locks are checked from their creation).  Sessions take only their own raw
lock and never call into pydm while holding it.
"""

import contextlib
import threading
import time

from pydm import lockdep, trace
from pydm.lockdep import make_event, make_raw_lock
from pydm.verify.monitor import Monitor, Violation
from pydm.verify.reactors import REACTORS, react
from pydm.verify.specs import SPECS


class RVError(ValueError):
    """A bad monitor or reactor name (a user mistake: one line, exit 1)."""


class LockdepMonitor:
    """The lock-order checker's reports, seen as one more monitor."""

    name = "lockdep"
    doc = "locks are taken in one global order (no ABBA, no recursion)"

    def __init__(self, reactor="record"):
        self.reactor = reactor
        self.violations = []
        self._seen = len(lockdep.reports)
        lockdep.set_reactor("raise" if reactor == "raise" else "record")

    def poll(self):
        new = lockdep.reports[self._seen:]
        self._seen += len(new)
        for text in new:
            v = Violation("lockdep", "-", "-", None, (), why=text.splitlines()[0])
            v.text = text
            self.violations.append(v)
            if self.reactor in ("log", "abort"):
                react(self.reactor, v, in_emitter=False)
        return new

    def end_check(self, select=None):
        return self.poll()

    def close(self):
        lockdep.set_reactor("record")


class Clock:
    """Watchdog of the clock-guarded monitors: wakes at the earliest armed
    deadline and lets the monitor report what expired."""

    def __init__(self):
        self.monitors = []
        self._wake = make_event()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="pydm-rv-clock", daemon=True)
        self._thread.start()

    def poke(self):
        self._wake.set()

    def _run(self):
        while not self._stop:
            now = time.monotonic()
            nxt = None
            for m in tuple(self.monitors):
                d = m.expire(now)
                if d is not None and (nxt is None or d < nxt):
                    nxt = d
            self._wake.wait(None if nxt is None else max(0.0, nxt - time.monotonic()) + 0.01)
            self._wake.clear()

    def stop(self):
        self._stop = True
        self._wake.set()
        self._thread.join(5)


class Session:
    def __init__(self, specs=None):
        self.specs = dict(SPECS if specs is None else specs)
        self.monitors = {}          # name -> Monitor | LockdepMonitor (enabled ones)
        self.retired = {}           # name -> violations of a disabled monitor
        self.clock = None
        self._lock = make_raw_lock()            # enable/disable/reactor
        self._events_lock = make_raw_lock()     # shared by the monitors: one per event
        self._routes = {}                       # trace event -> monitors taking it
        self._sink = self._dispatch             # one bound method: detach finds it
        self._attached = False

    # ----------------------------------------------------------- events
    def _dispatch(self, fields):
        """The session's one trace sink: every monitor taking the event, under
        one lock; reports after it is released."""
        ev = fields["event"]
        bad = None
        with self._events_lock:
            for m in self._routes.get(ev, ()):
                b = m.handle(ev, fields)
                if b:
                    bad = (bad or []) + [(m, v) for v in b]
        if bad:
            for m, v in bad:
                m.report(v)

    def _rewire(self):
        routes = {}
        for m in self.monitors.values():
            if isinstance(m, Monitor):
                for ev in m.spec.events:
                    routes.setdefault(ev, []).append(m)
        if self._attached:
            trace.detach(self._sink)
            self._attached = False
        self._routes = {ev: tuple(ms) for ev, ms in routes.items()}
        if routes:
            trace.attach(self._sink, routes)
            self._attached = True

    # ------------------------------------------------------------ names
    def available(self):
        names = list(self.specs)
        if lockdep.ENABLED:
            names.append("lockdep")
        return names

    def names(self, names):
        """Monitor names (with ``all`` expanded), or RVError for an unknown one."""
        return self._names(names)

    def _names(self, names):
        if isinstance(names, str):
            names = [names]
        out = []
        for n in names:
            if n == "all":
                out.extend(self.available())
            elif n in self.specs or (n == "lockdep" and lockdep.ENABLED):
                out.append(n)
            elif n == "lockdep":
                raise RVError("monitor lockdep needs the process started with PYDM_LOCKDEP=1")
            else:
                raise RVError(f"unknown monitor {n!r} (pydm rv list shows them)")
        return list(dict.fromkeys(out))

    @staticmethod
    def _reactor(reactor):
        if reactor not in REACTORS:
            raise RVError(f"unknown reactor {reactor!r} (one of {', '.join(REACTORS)})")
        return reactor

    # ---------------------------------------------------------- control
    def enable(self, names, reactor="record", params=None, clock=True):
        """Attach fresh monitors; ``clock=False`` (offline replay) leaves
        clock invariants to the caller's ``expire`` on recorded times."""
        self._reactor(reactor)
        todo = self._names(names)
        with self._lock:
            for n in todo:
                if n in self.monitors:
                    continue
                if n == "lockdep":
                    self.monitors[n] = LockdepMonitor(reactor)
                    continue
                spec = self.specs[n]
                m = Monitor(spec, reactor, (params or {}).get(n), lock=self._events_lock)
                if m.model.invariants and clock:
                    if self.clock is None:
                        self.clock = Clock()
                    m.clock = self.clock
                    self.clock.monitors.append(m)
                self.monitors[n] = m
            self._rewire()
        return todo

    def disable(self, names):
        todo = self._names(names)
        with self._lock:
            for n in todo:
                m = self.monitors.pop(n, None)
                if m is None:
                    continue
                if n == "lockdep":
                    m.poll()
                    m.close()
                elif m.clock is not None:
                    m.clock.monitors.remove(m)
                self.retired.setdefault(n, []).extend(m.violations)
            self._rewire()
        return todo

    def set_reactor(self, name, reactor):
        """``all`` means every enabled monitor; a named one must be enabled."""
        self._reactor(reactor)
        names = list(self.monitors) if name == "all" or name == ["all"] else self._names(name)
        for n in names:
            m = self.monitors.get(n)
            if m is None:
                raise RVError(f"monitor {n} is not enabled")
            m.reactor = reactor
            if n == "lockdep":
                lockdep.set_reactor("raise" if reactor == "raise" else "record")

    def set_params(self, name, **params):
        m = self.monitors.get(name)
        if m is None or name == "lockdep":
            raise RVError(f"monitor {name} is not enabled or has no parameters")
        try:
            m.set_params(**params)
        except ValueError as e:
            raise RVError(str(e)) from None

    @contextlib.contextmanager
    def expect(self, *names):
        """For a test that breaks a rule on purpose: these monitors record
        instead of raising inside, and what they report there is handed to
        the caller (a list) and taken out of the session's violations."""
        mons = []
        for n in names:
            m = self.monitors.get(n)
            if m is None:
                raise RVError(f"monitor {n} is not enabled")
            mons.append((m, m.reactor, len(m.violations)))
            m.reactor = "record"
        seen = []
        try:
            yield seen
        finally:
            for m, old, before in mons:
                m.reactor = old
                seen.extend(m.violations[before:])
                del m.violations[before:]

    def close(self):
        self.disable([n for n in list(self.monitors)])
        if self.clock is not None:
            self.clock.stop()
            self.clock = None

    # ----------------------------------------------------------- checks
    def end_check(self):
        """Report instances left non-final in every enabled monitor."""
        out = []
        for m in list(self.monitors.values()):
            out.extend(m.end_check())
        return out

    def violations(self, name=None):
        out = []
        for n in self.available():
            if name is not None and n != name:
                continue
            m = self.monitors.get(n)
            if n == "lockdep" and m is not None:
                m.poll()
            out.extend(self.retired.get(n, []))
            if m is not None:
                out.extend(m.violations)
        return out

    def status(self):
        rows = []
        for n in self.available():
            m = self.monitors.get(n)
            if n == "lockdep" and m is not None:
                m.poll()
            vs = self.retired.get(n, []) + (m.violations if m is not None else [])
            spec = self.specs.get(n)
            rows.append({
                "name": n,
                "enabled": m is not None,
                "reactor": m.reactor if m is not None else None,
                "scope": spec.scope if spec else "global",
                "description": spec.doc if spec else LockdepMonitor.doc,
                "events": getattr(m, "events_seen", None),
                "instances": len(m.instances) if hasattr(m, "instances") else None,
                "violations": len(vs),
                "last": str(vs[-1]) if vs else None,
                "first_at": vs[0].time if vs else None,
                "last_at": vs[-1].time if vs else None,
            })
        return rows


_default = None
_default_lock = make_raw_lock()


def default() -> Session:
    """The process's session (the daemon's, driven by ``pydm rv``)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Session()
        return _default
