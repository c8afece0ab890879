"""Structured trace events at fixed points, behind one switch.

Rules of this module: call sites read ``if trace.ENABLED: trace.emit(...)`` so
a disabled trace costs one attribute load.  ``emit`` hands each event to every
attached sink synchronously, in the emitting thread; sinks must not take pydm
locks (they run inside the I/O and control paths).

Event names used by the core (fields in parentheses):

* data path: ``bio_submit`` (dev, bio, op, sector, nr), ``bio_remap``
  (dev, bio, target, result), ``bio_defer`` (dev, bio), ``bio_requeue``
  (dev, bio), ``bio_complete`` (dev, bio, status);
* device: ``dev_create``, ``dev_load``, ``dev_clear``, ``dev_suspend_begin``,
  ``dev_presuspend``, ``dev_drained``, ``dev_suspended``, ``dev_resume_begin``,
  ``dev_resumed``, ``dev_remove``, ``op_refused`` (op, errno);
* targets add their own (``era_checkpoint_begin``, ``era_drained``, ...).
"""

import itertools
import os
import threading

from pydm.lockdep import make_raw_lock

ENABLED = os.environ.get("PYDM_TRACE", "") not in ("", "0")

_sinks = []
_seq = itertools.count(1)
_sink_lock = make_raw_lock()    # guards the sink list only, never held in emit


def emit(event: str, **fields) -> None:
    fields["event"] = event
    fields["seq"] = next(_seq)
    fields["thread"] = threading.get_ident()
    for sink in tuple(_sinks):
        sink(fields)


def attach(sink) -> None:
    """Add a callable(fields) and switch tracing on."""
    global ENABLED
    with _sink_lock:
        _sinks.append(sink)
        ENABLED = True


def detach(sink) -> None:
    global ENABLED
    with _sink_lock:
        if sink in _sinks:
            _sinks.remove(sink)
        ENABLED = bool(_sinks) or os.environ.get("PYDM_TRACE", "") not in ("", "0")


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
