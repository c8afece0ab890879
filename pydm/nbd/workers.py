"""The worker threads of one NBD connection.

Rules of this module:

* A connection has at most ``limit`` workers, started as needed: the first
  when transmission begins, another when a job is handed off while the
  queue already holds one (all seem busy).  They take jobs ``(fn, arg)``
  from one queue and run ``fn(arg)``: a large WRITE's submit, a drain of the
  outbox.
* A job that raises is logged and the worker goes on; ``stop`` ends every
  worker after the jobs queued before it, and no worker starts after it.
* Lock (a leaf, made by ``pydm.lockdep``): ``nbd.conn.workers`` guards the
  count of workers, taken only to start one or to stop them all; never held
  while running a job.
"""

import logging
import queue
import threading

from pydm.lockdep import make_lock

log = logging.getLogger("pydm.nbd")

DEFAULT_WORKERS = 4            # at most, per connection; started as needed
INLINE_MAX = 128 << 10         # larger READ/WRITE replies and submits run on a worker


class Workers:
    """The worker pool of the connection with peer ``peer``."""

    def __init__(self, peer: str, limit: int = DEFAULT_WORKERS):
        self.peer = peer
        self.limit = limit
        self.lock = make_lock("nbd.conn.workers")
        self.work = queue.SimpleQueue()
        self.count = 0
        self.stopped = False
        self.idents = set()         # thread idents of the workers (Outbox asks)

    def start(self):
        """Start the first worker (transmission begins)."""
        self._add()

    def _add(self):
        with self.lock:             # completions on foreign threads may race here
            i = self.count
            if self.stopped or (i and i >= self.limit):
                return
            self.count = i + 1
        threading.Thread(target=self._run, name=f"pydm-nbd-w{i} {self.peer}",
                         daemon=True).start()

    def hand_off(self, job):
        """Queue a job ``(fn, arg)``, adding a worker while all seem busy."""
        work = self.work
        work.put(job)
        if work.qsize() > 1 and self.count < self.limit and not self.stopped:
            self._add()

    def stop(self):
        """End every worker once the jobs queued so far have run."""
        with self.lock:
            self.stopped = True
            n = self.count
        for _ in range(n):
            self.work.put(None)

    def _run(self):
        self.idents.add(threading.get_ident())
        get = self.work.get
        while True:
            job = get()
            if job is None:
                return
            fn, arg = job
            try:
                fn(arg)
            except Exception:
                log.exception("nbd %s: worker job failed", self.peer)
