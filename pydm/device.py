"""MappedDevice: live and inactive tables, suspend/resume/quiesce, in-flight I/O.

Rules of this module:

* Locks, outermost first: ``dev.control`` (an RLock serialising load, clear,
  suspend, resume, message and remove of this device; a target's message may
  re-enter it through ``quiesce``), then ``dev.io`` (a leaf: in-flight count,
  deferred queue, live-table pointer, table users), ``dev.open`` (leaf: open
  count and clients) and ``dev.event`` (leaf).  No lock is held while calling
  into a target's I/O path or a bio's completion.
* Every submitted bio is either counted in flight and routed, or held on the
  deferred queue while I/O is blocked; ``io_done`` completes the caller's bio
  *before* dropping the in-flight count, so when a suspend returns no bio can
  still complete.
* A refused operation raises ``DMError`` and leaves the state unchanged.
"""

import contextlib
import errno
import logging
import time
from collections import deque

from pydm import trace
from pydm.bio import REQ_RAHEAD
from pydm.caps import Caps
from pydm.errors import DMError
from pydm.lockdep import make_condition, make_lock, make_rlock
from pydm.router import STS_REQUEUE, route

log = logging.getLogger("pydm.device")


class MappedDevice:
    def __init__(self, name: str, uuid: str = None, readonly: bool = False):
        self.name = name
        self.uuid = uuid
        self.minor = 0
        self.readonly = readonly
        self.control_lock = make_rlock("dev.control")
        self._io_lock = make_lock("dev.io")
        self._drained = make_condition(self._io_lock)
        self._users_gone = make_condition(self._io_lock)
        self._open_lock = make_lock("dev.open")
        self._event = make_condition(name="dev.event")
        self.live = None
        self.inactive = None
        self.suspended = False
        self.noflush_suspending = False
        self.dead = False
        self.deferred_remove = False
        self.event_nr = 0
        self.clients = {}           # holder key -> description (NBD clients, upper devices)
        self._block = 0             # reasons I/O is held: user suspend + quiesces
        self._quiescing = 0         # quiesces in progress (noflush semantics)
        self._inflight = 0
        self._deferred = deque()
        self._table_users = {}      # id(table) -> count (status/table readers)
        self._ever_resumed = False

    # ------------------------------------------------------------------ I/O
    def submit(self, bio) -> None:
        lock = self._io_lock
        lock.acquire()
        if self._block:
            if bio.flags & REQ_RAHEAD:
                lock.release()
                self._fail(bio)
                return
            self._deferred.append(bio)
            # Emitted under the lock: once released, a resume may resubmit
            # the bio and its bio_submit must not be seen before this.
            if trace.on.bio_defer:
                trace.emit("bio_defer", dev=self.name, minor=self.minor, bio=bio.id)
            lock.release()
            return
        table = self.live
        if table is None:
            lock.release()
            self._fail(bio)
            return
        self._inflight += 1
        lock.release()
        if trace.on.bio_submit:
            trace.emit("bio_submit", dev=self.name, minor=self.minor, bio=bio.id, op=bio.op,
                       flags=bio.flags, sector=bio.sector, nr=bio.nr_sectors)
        route(self, table, bio)

    def _fail(self, bio, status=errno.EIO):
        if trace.on.bio_complete:
            trace.emit("bio_complete", dev=self.name, minor=self.minor, bio=bio.id,
                       status=status)
        bio.complete(status)

    def io_done(self, bio, status) -> None:
        """Called by the router exactly once per routed bio."""
        if status == STS_REQUEUE:
            with self._io_lock:
                if self.noflush_suspending or self._quiescing:
                    self._deferred.appendleft(bio)
                    self._dec_inflight()
                    if trace.on.bio_requeue:
                        trace.emit("bio_requeue", dev=self.name, minor=self.minor, bio=bio.id)
                    return
            status = errno.EIO
        try:
            if trace.on.bio_complete:
                trace.emit("bio_complete", dev=self.name, minor=self.minor, bio=bio.id,
                           status=status)
            bio.complete(status)
        finally:
            with self._io_lock:
                self._dec_inflight()

    def _dec_inflight(self):
        self._inflight -= 1
        if self._inflight == 0:
            self._drained.notify_all()

    @property
    def size(self) -> int:
        """Size in bytes of the live table (0 without one)."""
        t = self.live
        return t.size << 9 if t is not None else 0

    @property
    def size_sectors(self) -> int:
        t = self.live
        return t.size if t is not None else 0

    @property
    def ref(self) -> str:
        """How a table names this device when stacking on it."""
        return f"dm:{self.name}"

    def capabilities(self) -> Caps:
        """What the live table offers (nothing without one), read-only if
        the device is: what a device stacked on this one, or an NBD client,
        may use."""
        with self.table_ref() as t:
            caps = Caps(discard=False, extents=False) if t is None else t.capabilities()
        return caps.narrowed(readonly=True) if self.readonly else caps

    def contexts(self, caps: Caps = None):
        """Names of the NBD metadata contexts the live table publishes."""
        caps = caps or self.capabilities()
        with self.table_ref() as t:
            base = ["base:allocation"] if caps.extents else []
            return base + ([] if t is None else t.contexts())

    def accepts_context(self, name: str) -> bool:
        """True if a target answers block status for ``name``, listed or not."""
        if name == "base:allocation":
            return self.capabilities().extents
        with self.table_ref() as t:
            return t is not None and any(x.accepts_context(name) for x in t.targets)

    def block_status(self, context: str, sector: int, nr_sectors: int):
        """[(nr_sectors, flags)] runs from ``sector``; may cover less than asked."""
        with self.table_ref() as t:
            if t is None or sector >= t.size:
                return [(nr_sectors, 0)]
            nr_sectors = min(nr_sectors, t.size - sector)
            idx = t.find(sector)
            tgt = t.targets[idx]
            n = min(nr_sectors, t.ends[idx] - sector)
            runs = tgt.block_status(context, sector, n)
            return runs or [(n, 0)]

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def state(self) -> str:
        if self.dead:
            return "REMOVED"
        if self.suspended:
            return "SUSPENDED"
        return "ACTIVE" if self._ever_resumed else "NEW"

    # ------------------------------------------------------ blocking I/O
    def _block_io(self):
        with self._io_lock:
            self._block += 1

    def _wait_drained(self, timeout=None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._io_lock:
            while self._inflight:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._drained.wait(left)
        if trace.on.dev_drained:
            trace.emit("dev_drained", dev=self.name, minor=self.minor)
        return True

    def _unblock_io(self):
        with self._io_lock:
            self._block -= 1
            if self._block:
                return
            held, self._deferred = self._deferred, deque()
        for bio in held:
            self.submit(bio)

    @contextlib.contextmanager
    def quiesce(self, timeout=None):
        """Internal noflush suspend: no bio in flight inside, new ones held.

        No target hooks run (the kernel's dm_internal_suspend_fast).  Nests,
        and a user suspend or resume waits until it is over.
        """
        with self.control_lock:
            self._check_alive()
            with self._io_lock:
                self._block += 1
                self._quiescing += 1
            try:
                if not self._wait_drained(timeout):
                    raise DMError(f"{self.name}: timed out waiting for I/O to drain",
                                  errno.ETIMEDOUT)
                yield self
            finally:
                with self._io_lock:
                    self._quiescing -= 1
                self._unblock_io()

    # --------------------------------------------------------- lifecycle
    def _check_alive(self):
        if self.dead:
            raise DMError(f"{self.name}: no such device", errno.ENXIO)

    def _targets(self):
        return self.live.targets if self.live is not None else []

    def install_inactive(self, table) -> None:
        with self.control_lock:
            if self.dead:
                table.destroy()
                self._check_alive()
            live = self.live
            if (live is not None and live.immutable_type is not None
                    and [t.name for t in table.targets] != [t.name for t in live.targets]):
                table.destroy()
                raise DMError(f"{self.name}: live table has immutable target type "
                              f"{live.immutable_type}; it cannot be replaced")
            old, self.inactive = self.inactive, table
            if old is not None:
                old.destroy()
            if trace.on.dev_load:
                trace.emit("dev_load", dev=self.name, minor=self.minor)

    def clear(self) -> None:
        with self.control_lock:
            self._check_alive()
            old, self.inactive = self.inactive, None
            if old is not None:
                old.destroy()
            if trace.on.dev_clear:
                trace.emit("dev_clear", dev=self.name, minor=self.minor)

    def suspend(self, noflush: bool = False, timeout=None) -> None:
        with self.control_lock:
            self._check_alive()
            if self.suspended:
                return
            if self.live is None:
                raise DMError(f"{self.name}: cannot suspend a device without a live table")
            self._suspend(noflush, timeout)

    def _suspend(self, noflush, timeout=None):
        if trace.on.dev_suspend_begin:
            trace.emit("dev_suspend_begin", dev=self.name, minor=self.minor, noflush=noflush)
        self.noflush_suspending = noflush
        done = []
        try:
            for t in self._targets():
                t.presuspend()
                done.append(t)
        except Exception as e:
            for t in reversed(done):
                t.presuspend_undo()
            self.noflush_suspending = False
            raise DMError(f"{self.name}: presuspend failed: {e}", errno.EIO) from None
        if trace.on.dev_presuspend:
            trace.emit("dev_presuspend", dev=self.name, minor=self.minor)
        self._block_io()
        if not self._wait_drained(timeout):
            for t in reversed(done):
                t.presuspend_undo()
            self.noflush_suspending = False
            self._unblock_io()
            raise DMError(f"{self.name}: suspend interrupted: I/O did not drain in time",
                          errno.EINTR)
        self.suspended = True
        self.noflush_suspending = False
        for t in self._targets():
            try:
                t.postsuspend()
            except Exception:
                log.exception("%s: %s postsuspend failed", self.name, t.name)
        if trace.on.dev_suspended:
            trace.emit("dev_suspended", dev=self.name, minor=self.minor)

    def resume(self, noflush: bool = False) -> None:
        with self.control_lock:
            self._check_alive()
            if self.inactive is None:
                if not self.suspended:
                    return
                if self.live is None:
                    raise DMError(f"{self.name}: cannot resume without a table")
            if trace.on.dev_resume_begin:
                trace.emit("dev_resume_begin", dev=self.name, minor=self.minor)
            if self.inactive is not None:
                if self.live is not None and not self.suspended:
                    self._suspend(noflush)
                old, self.live = self.live, self.inactive
                self.inactive = None
                if trace.on.dev_swap:
                    trace.emit("dev_swap", dev=self.name, minor=self.minor)
                if old is not None:
                    self._retire(old)
            if not self.suspended:
                # First table of a new device: nothing ran, so nothing was
                # held; a failed preresume must still leave it suspended.
                self.suspended = True
                self._block_io()
            try:
                self.live.refresh_sizes()
                for t in self._targets():
                    t.preresume()
            except Exception as e:
                raise DMError(f"{self.name}: preresume failed, device stays suspended: {e}",
                              getattr(e, "errno", errno.EIO)) from None
            for t in self._targets():
                t.resume()
            self.suspended = False
            self._ever_resumed = True
            self._unblock_io()
            if trace.on.dev_resumed:
                trace.emit("dev_resumed", dev=self.name, minor=self.minor)
        self.raise_event()

    def _retire(self, table):
        """Destroy a table once no status/table reader still holds it."""
        with self._io_lock:
            while self._table_users.get(id(table)):
                self._users_gone.wait()
        table.destroy()

    def destroy(self) -> None:
        """Remove: drain, destroy both tables, fail held I/O.  Idempotent."""
        with self.control_lock:
            if self.dead:
                return
            if trace.on.dev_remove_begin:
                trace.emit("dev_remove_begin", dev=self.name, minor=self.minor)
            if self.live is not None and not self.suspended:
                try:
                    self._suspend(False)
                except DMError:
                    log.warning("%s: removing with I/O that did not drain", self.name)
            with self._io_lock:
                self.dead = True
                live, self.live = self.live, None
                held, self._deferred = self._deferred, deque()
                self._block = 0
            for table in (self.inactive, live):
                if table is not None:
                    self._retire(table)
            self.inactive = None
            if trace.on.dev_remove:
                trace.emit("dev_remove", dev=self.name, minor=self.minor)
        for bio in held:
            self._fail(bio)
        if trace.on.dev_gone:
            trace.emit("dev_gone", dev=self.name, minor=self.minor)
        self.raise_event()

    # ----------------------------------------------------------- queries
    @contextlib.contextmanager
    def table_ref(self, inactive=False):
        """Hold a table so it cannot be destroyed while it is read."""
        with self._io_lock:
            table = self.inactive if inactive else self.live
            if table is not None:
                self._table_users[id(table)] = self._table_users.get(id(table), 0) + 1
        try:
            yield table
        finally:
            if table is not None:
                with self._io_lock:
                    n = self._table_users[id(table)] - 1
                    if n:
                        self._table_users[id(table)] = n
                    else:
                        del self._table_users[id(table)]
                        self._users_gone.notify_all()

    def message(self, sector: int, argv: list):
        with self.control_lock:
            self._check_alive()
            table = self.live
            if table is None:
                raise DMError(f"{self.name}: no live table for message")
            if sector >= table.size:
                raise DMError(f"{self.name}: message sector {sector} is past the end "
                              f"of the device ({table.size} sectors)")
            t = table.targets[table.find(sector)]
            return t.message(argv)

    def raise_event(self) -> None:
        with self._event:
            self.event_nr += 1
            self._event.notify_all()

    def wait_event(self, event_nr: int, timeout=None) -> int:
        with self._event:
            self._event.wait_for(lambda: self.event_nr != event_nr or self.dead, timeout)
            return self.event_nr

    # ----------------------------------------------------- open / holders
    def open(self, key, description: str = "") -> None:
        with self._open_lock:
            if self.dead:
                raise DMError(f"{self.name}: no such device", errno.ENXIO)
            self.clients[key] = description

    def close(self, key) -> bool:
        """Drop a holder; True when a deferred remove is now due."""
        with self._open_lock:
            self.clients.pop(key, None)
            return self.deferred_remove and not self.clients

    @property
    def open_count(self) -> int:
        return len(self.clients)

    def holders(self):
        with self._open_lock:
            return len(self.clients), dict(self.clients)

    def info(self) -> dict:
        live, inactive = self.live, self.inactive
        count, clients = self.holders()
        return {
            "name": self.name,
            "state": self.state,
            "suspended": self.suspended,
            "readonly": self.readonly,
            "live": live is not None,
            "inactive": inactive is not None,
            "open_count": count,
            "clients": sorted(clients.values()),
            "event_nr": self.event_nr,
            "targets": len(live.targets) if live is not None else 0,
            "size_sectors": live.size if live is not None else 0,
            "uuid": self.uuid,
            "major": 253,
            "minor": self.minor,
            "inflight": self._inflight,
            "deferred": len(self._deferred),
        }

    def __repr__(self):
        return f"<MappedDevice {self.name} {self.state}>"
