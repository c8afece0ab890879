"""Admission control: how much a connection may have in flight, and how
much all connections together may hold.

Rules of this module:

* A request is admitted before its payload buffer is taken and released when
  its reply has been sent (or dropped), so the counters are exactly the
  memory pinned for requests and replies.
* Per connection: at most ``max_requests`` requests and ``max_bytes`` of
  payload in flight (a connection with nothing in flight may always take
  one request, whatever its size, as far as its own bounds go).
* Across connections: the first ``reserve`` bytes in flight of every
  connection are its own; anything beyond them is drawn from one
  ``ServerBudget``.  A connection whose replies are not being read keeps its
  requests in flight, so it soon waits here, and waiting here means its
  reader stops reading requests: however many clients stop reading, the
  memory they pin stays under ``connections x reserve + budget``.
* Locks (leaves, from ``pydm.lockdep``): ``nbd.conn.mem`` guards one
  connection's counters and is taken before ``nbd.budget``, which guards the
  shared pool.  Neither is held while waiting for the other.
"""

from pydm.lockdep import make_condition

MAX_INFLIGHT_BYTES = 64 << 20   # payload per connection
MAX_INFLIGHT_REQUESTS = 512
CONNECTION_RESERVE = 2 << 20    # per connection, not drawn from the budget
SERVER_BUDGET = 256 << 20       # shared by every connection, beyond the reserves


class Leaving(Exception):
    """The connection is being closed while it waited for memory."""


class ServerBudget:
    """The shared pool of in-flight payload bytes."""

    def __init__(self, nbytes: int = SERVER_BUDGET):
        self.limit = nbytes
        self.free = nbytes
        self.cond = make_condition(name="nbd.budget")

    def take(self, n: int) -> bool:
        with self.cond:
            if self.free < n:
                return False
            self.free -= n
            return True

    def give(self, n: int) -> None:
        with self.cond:
            self.free += n
            self.cond.notify_all()

    def wait_for(self, n: int, leaving) -> None:
        """Block until ``n`` bytes are free (not taken), or ``leaving()``."""
        with self.cond:
            while self.free < n:
                if leaving():
                    raise Leaving()
                self.cond.wait(1.0)

    def wake(self) -> None:
        with self.cond:
            self.cond.notify_all()

    @property
    def used(self) -> int:
        return self.limit - self.free


class Admission:
    """One connection's in-flight counters."""

    def __init__(self, budget: ServerBudget, reserve: int = CONNECTION_RESERVE,
                 max_bytes: int = MAX_INFLIGHT_BYTES,
                 max_requests: int = MAX_INFLIGHT_REQUESTS):
        self.budget = budget
        self.reserve = reserve
        self.max_bytes = max_bytes
        self.max_requests = max_requests
        self.mem = make_condition(name="nbd.conn.mem")
        self.inflight = 0
        self.inflight_bytes = 0
        self.borrowed = 0           # bytes of inflight_bytes drawn from the budget
        self.waiting = False

    def _fits_locally(self, n) -> bool:
        return not self.inflight or (self.inflight < self.max_requests and
                                     self.inflight_bytes + n <= self.max_bytes)

    def try_admit(self, n: int) -> bool:
        """Admit without waiting (the fast path); False when it would wait."""
        with self.mem:
            if not self._fits_locally(n):
                return False
            over = self.inflight_bytes + n - self.reserve - self.borrowed
            if over > 0:
                if not self.budget.take(over):
                    return False
                self.borrowed += over
            self.inflight += 1
            self.inflight_bytes += n
            return True

    def admit(self, n: int, before_wait, leaving) -> None:
        """Admit, waiting as long as it takes.  ``before_wait()`` runs before
        the first wait (the reader sends the replies it has batched: they
        free memory); ``leaving()`` says the connection is going away."""
        if self.try_admit(n):
            return
        before_wait()
        while True:
            with self.mem:
                self.waiting = True
                while not self._fits_locally(n):
                    if leaving():
                        self.waiting = False
                        raise Leaving()
                    self.mem.wait(1.0)
                self.waiting = False
                over = self.inflight_bytes + n - self.reserve - self.borrowed
            if over > 0:
                self.budget.wait_for(over, leaving)
            if self.try_admit(n):
                return

    def release(self, count: int, nbytes: int) -> None:
        mem = self.mem
        with mem:
            self.inflight -= count
            self.inflight_bytes -= nbytes
            give = self.borrowed - max(0, self.inflight_bytes - self.reserve)
            if give > 0:
                self.borrowed -= give
            if self.waiting or not self.inflight:
                mem.notify_all()
        if give > 0:
            self.budget.give(give)

    def wait_drained(self, timeout) -> bool:
        with self.mem:
            return not self.inflight or self.mem.wait_for(lambda: not self.inflight, timeout)

    def wake(self) -> None:
        with self.mem:
            self.mem.notify_all()
        self.budget.wake()
