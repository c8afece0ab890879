"""The writeboost target's life: ACTIVE until the first error, then FAILED
for good ("blockup" done right).

Rules of this module (the h11 habit: the machine is data):

* ``TRANSITIONS[state][event] -> new state`` is the whole machine; an event
  with no entry raises ``IllegalMove`` and leaves the state unchanged.
* FAILED is sticky: nothing leads out of it.  There is no message that
  clears it and carries on with the in-memory state (the 2013 design that
  lost data); the way back is a new target, which replays the log.
* The first error is kept (errno, store, operation, sector) for status;
  later ones only count.
* No I/O, no threads; the caller holds whatever lock guards the target.
"""

import errno as _errno

NEW = "NEW"            # constructed; the cache is not read yet (no replay)
ACTIVE = "ACTIVE"      # replayed, serving
FAILED = "FAILED"      # an error made durability unknowable: no write goes out
STOPPED = "STOPPED"    # destroyed

START, FAIL, STOP = "start", "fail", "stop"

TRANSITIONS = {
    NEW: {START: ACTIVE, FAIL: FAILED, STOP: STOPPED},
    ACTIVE: {FAIL: FAILED, STOP: STOPPED},
    FAILED: {STOP: STOPPED},
    STOPPED: {},
}


class IllegalMove(Exception):
    pass


class FirstError:
    """What went wrong first: shown in status after the original fields."""

    __slots__ = ("errno", "store", "op", "sector")

    def __init__(self, err, store, op, sector):
        self.errno = err or _errno.EIO
        self.store = store
        self.op = op
        self.sector = sector

    def fields(self) -> str:
        return f"failed {self.errno} {self.store} {self.op} {self.sector}"

    def __str__(self):
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{self.op} of the {self.store} at sector {self.sector} failed ({name})"


class Lifecycle:
    def __init__(self):
        self.state = NEW
        self.first_error = None
        self.errors = 0

    def move(self, event: str) -> str:
        new = TRANSITIONS[self.state].get(event)
        if new is None:
            raise IllegalMove(f"{event} in state {self.state}")
        self.state = new
        return new

    def fail(self, err, store, op, sector) -> bool:
        """Record an error; True if it is the one that made the target
        FAILED now (the caller then fails what waits and logs once)."""
        self.errors += 1
        if self.state in (FAILED, STOPPED):
            return False
        self.first_error = FirstError(err, store, op, sector)
        self.move(FAIL)
        return True

    @property
    def failed(self) -> bool:
        return self.state == FAILED

    @property
    def active(self) -> bool:
        return self.state == ACTIVE
