"""Recorded trace events (JSON lines) and their offline replay.

Rules of this module: the recorder is a trace sink that writes one JSON
object per event, in emit order, under its own raw lock (never a pydm
lock); values JSON cannot hold are written as their repr.  Replay feeds
the same events, in the same order, to fresh monitors of the same specs
with the record reactor (clock invariants measured on the recorded event
times, ``t``), then runs the end check: the online and offline
verdicts come from one code path (Monitor).
"""

import json

from pydm import trace
from pydm.errors import PydmError
from pydm.lockdep import make_raw_lock
from pydm.verify.session import Session


class EventLog:
    """Record every trace event to ``path`` while attached."""

    def __init__(self, path):
        try:
            self._f = open(path, "w", buffering=1 << 16)
        except OSError as e:
            raise PydmError(f"cannot write the event log {path}: {e.strerror}") from None
        self._lock = make_raw_lock()
        self.count = 0

    def __call__(self, fields):
        line = json.dumps(fields, default=repr, separators=(",", ":"))
        with self._lock:
            if self._f is not None:
                self._f.write(line + "\n")
                self.count += 1

    def start(self):
        trace.attach(self)
        return self

    def close(self):
        trace.detach(self)
        with self._lock:
            if self._f is not None:
                self._f.close()
                self._f = None


def read(path):
    """Events of a log, in order; a bad line is one clear error."""
    try:
        f = open(path)
    except OSError as e:
        raise PydmError(f"cannot read {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                raise PydmError(f"{path}:{n}: not a JSON event") from None
            if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
                raise PydmError(f"{path}:{n}: an event needs an 'event' name")
            yield ev


def replay(path, names=("all",), params=None):
    """Run the events of ``path`` through fresh monitors; (session, count)."""
    s = Session()
    try:
        todo = [n for n in s.names(names) if n != "lockdep"]
        s.enable(todo, "record", params, clock=False)
        monitors = [s.monitors[n] for n in todo]
        count = 0
        clocked = [m for m in monitors if m.model.invariants]
        last = None
        for ev in read(path):
            count += 1
            last = ev.get("t", last)
            if last is not None:
                for m in clocked:          # recorded time, not the replay's
                    m.expire(last)
            for m in monitors:
                if ev["event"] in m.spec.events:
                    m(ev)
        s.end_check()
        return s, count
    finally:
        # detach from live tracing (the replay only fed them by hand), keep verdicts
        s.close()
