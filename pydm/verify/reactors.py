"""Reactors: what a monitor does with a violation (the kernel's rv reactors).

Rules of this module: a reactor runs in the thread that emitted the event
(or the clock watchdog's), so it takes no pydm lock and does no I/O beyond
logging.  Every reactor records: the monitor keeps the violation whatever
happens next.

* ``record``: nothing more (tests and ``pydm rv status`` read the list);
* ``log``: one error line on the ``pydm.verify`` logger;
* ``raise``: ``VerificationError`` in the emitting thread when that is the
  main thread, so the test that caused it fails there; in any other thread
  (a worker, a server thread, the clock watchdog) it is logged instead, since
  killing that thread would turn the report into a hang, and the test
  suite's teardown check fails the test from the recorded violation;
* ``abort``: log, then ``os.abort()`` (stress runs: the core shows the state).
"""

import logging
import os
import threading

log = logging.getLogger("pydm.verify")

REACTORS = ("record", "log", "raise", "abort")


class VerificationError(AssertionError):
    pass


def react(reactor, violation, in_emitter=True):
    if reactor == "record":
        return
    log.error("rv: %s", violation)
    if reactor == "abort":
        logging.shutdown()
        os.abort()
    if reactor == "raise" and in_emitter and threading.current_thread() is threading.main_thread():
        raise VerificationError(str(violation))
