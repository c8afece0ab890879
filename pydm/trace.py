"""Structured trace events at fixed points, behind one switch.

Rules of this module: call sites read ``if trace.on.NAME: trace.emit("NAME", ...)``
(or ``trace.ENABLED`` for "any sink at all") so an event no sink takes costs
two attribute loads.  Every event name is declared in ``EVENTS``.  ``emit`` hands each event to the
attached sinks that take it (each sink names its events, or takes all:
a recorder, for which each event is stamped with ``seq``, ``thread`` and a
monotonic ``t``),
synchronously, in the emitting thread; sinks must not take pydm locks (they
run inside the I/O and control paths).

Event names used by the core (fields in parentheses):

* data path: ``bio_submit`` (dev, bio, op, sector, nr), ``bio_remap``
  (dev, bio, target, result), ``bio_defer`` (dev, bio), ``bio_requeue``
  (dev, bio), ``bio_complete`` (dev, bio, status);
* device: ``dev_create``, ``dev_load``, ``dev_clear``, ``dev_suspend_begin``,
  ``dev_presuspend``, ``dev_drained``, ``dev_suspended``, ``dev_resume_begin``,
  ``dev_resumed``, ``dev_remove``, ``op_refused`` (op, errno);
* workers: ``worker_gather`` (worker, want): a group commit's wait for
  the items the last commit released begins;
* targets add their own (``era_*``, ``wb_*``: see the monitors in ``pydm/verify/specs``).
"""

import itertools
import os
import threading
from time import monotonic as _monotonic

from pydm.lockdep import make_raw_lock

ENABLED = os.environ.get("PYDM_TRACE", "") not in ("", "0")

EVENTS = (
    "bio_complete",
    "bio_defer",
    "bio_remap",
    "bio_requeue",
    "bio_submit",
    "clone_complete",
    "dev_clear",
    "dev_create",
    "dev_drained",
    "dev_gone",
    "dev_load",
    "dev_presuspend",
    "dev_remove",
    "dev_remove_begin",
    "dev_resume_begin",
    "dev_resumed",
    "dev_suspend_begin",
    "dev_suspended",
    "dev_swap",
    "era_checkpoint_begin",
    "era_checkpoint_done",
    "era_defer",
    "era_dtr",
    "era_init",
    "era_marks_committed",
    "era_marks_loaded",
    "era_rollover",
    "era_write",
    "target_get",
    "target_put",
    "target_unload",
    "wb_ack",
    "wb_advance",
    "wb_backing_flushed",
    "wb_bind",
    "wb_done",
    "wb_durable",
    "wb_fail",
    "wb_late",
    "wb_start",
    "wb_stop",
    "wb_store_io",
    "worker_gather",
)


class _On:
    """One flag per event: does any sink take it.  Call sites read
    ``if trace.on.NAME:`` so an event nobody listens to costs two
    attribute loads, not the building of its fields."""

    __slots__ = EVENTS

    def __init__(self):
        for name in EVENTS:
            setattr(self, name, False)


on = _On()
_sinks = []                     # (sink, events or None)
_routes = {}                    # event name -> tuple of sinks that take it
_catch_all = ()                 # sinks that take every event
_seq = itertools.count(1)
_sink_lock = make_raw_lock()    # guards the sink list only, never held in emit


def emit(event: str, **fields) -> None:
    sinks = _routes.get(event, _catch_all)
    if not sinks:
        return
    fields["event"] = event
    if _catch_all:              # a recorder: order, thread and time for the log
        fields["seq"] = next(_seq)
        fields["thread"] = threading.get_ident()
        fields["t"] = _monotonic()
    for sink in sinks:
        sink(fields)


def _rebuild() -> None:
    global ENABLED, _routes, _catch_all
    catch_all = tuple(s for s, evs in _sinks if evs is None)
    routes = {}
    for s, evs in _sinks:
        for ev in evs or ():
            routes.setdefault(ev, list(catch_all)).append(s)
    _routes = {ev: tuple(v) for ev, v in routes.items()}
    _catch_all = catch_all
    for name in EVENTS:
        setattr(on, name, bool(catch_all) or name in _routes)
    ENABLED = bool(_sinks) or os.environ.get("PYDM_TRACE", "") not in ("", "0")


def attach(sink, events=None) -> None:
    """Add a callable(fields) and switch tracing on.  With ``events`` (names)
    the sink is only called for those events."""
    unknown = set(events or ()) - set(EVENTS)
    if unknown:
        raise ValueError(f"no trace event {sorted(unknown)[0]!r} (see pydm.trace.EVENTS)")
    with _sink_lock:
        _sinks.append((sink, frozenset(events) if events is not None else None))
        _rebuild()


def detach(sink) -> None:
    with _sink_lock:
        _sinks[:] = [(s, e) for s, e in _sinks if s is not sink]
        _rebuild()


def attached() -> bool:
    return bool(_sinks)


class Recorder:
    """A sink that keeps events in a list (tests) or prints them (debugging)."""

    def __init__(self, echo=None):
        self.events = []
        self.echo = echo

    def __call__(self, fields):
        self.events.append(fields)
        if self.echo is not None:
            print(" ".join(f"{k}={v}" for k, v in fields.items()), file=self.echo)

    def __enter__(self):
        attach(self)
        return self

    def __exit__(self, *exc):
        detach(self)

    def named(self, *names):
        return [e for e in self.events if e["event"] in names]
