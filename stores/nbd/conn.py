"""One libnbd connection of an NBD store, and the thread that runs it.

Rules of this module:

* A ``Conn`` has one libnbd handle at a time and one loop thread, which
  alone connects (asynchronously: a silent server cannot hold it), polls
  the handle's fd with an eventfd (the wake-up), runs the state machine
  (``aio_notify_read``/``aio_notify_write``) and drops the handle.  libnbd
  runs the completion callbacks on this thread; they never call libnbd.
* Requests reach a connection through ``put``: a deque append, and an
  eventfd write only when the loop sleeps (the loop sets ``sleeping``
  before its last look at the queue, the submitter appends before it looks
  at ``sleeping``: under the GIL one sees the other).  ``put`` never
  blocks, never calls libnbd and takes no lock, so a completion may submit
  (to any store) with any lock of its caller's held.  (Submitters issuing
  on the handle themselves was tried: it saved the wake-up but made them
  wait on libnbd's handle lock while the loop ran callbacks, a deadlock
  with the callers' locks, and it was no faster through pydm's NBD server.)
* A request belongs to one connection for life: its issue, completion,
  retry and time-out happen on that loop thread, without a lock.  libnbd
  calls are few on purpose: each lets go of the GIL, and another thread
  may then keep it a while; so the loop asks for the handle's direction
  once per batch it issued (even a 28-byte request may not fit: a Unix
  socket's buffer counts every message whole), after POLLOUT, and after
  a hang-up or error event.
* Every request has a deadline (its submission + ``timeout``).  The loop
  wakes at the earliest; a queued request past it fails with EIO, an
  issued one too, and then the connection counts as dead (the server has
  not answered in time): it is dropped and opened again.
* A dead connection (reset, EOF, ENOTCONN/ESHUTDOWN completions, a timed
  out reply) gives its issued requests back to the front of its queue;
  they are issued again once it is back.  It reconnects forever while
  open, the first attempt at once, then backing off from 0.1 s doubling to
  2 s; one attempt (connect and handshake) may take ``handshake_timeout``.
* Durability bookkeeping (see store.py): each write-type completion without
  FUA stamps ``dirty`` from the global sequence ``SEQ``; each flush takes
  ``covers`` from it when issued.  A flush or FUA request is "durable" and
  asks the store, when it completes, whether durability was lost.
* ``stop`` ends the loop: everything it holds fails with EIO, the handle is
  dropped (a disconnect is sent if nothing is in flight), and a ``put``
  after that fails its requests itself (``exited`` is set before the last
  drain, and ``put`` looks at it after it appends).
* The eventfd lives as long as the ``Conn`` object (closed by ``__del__``),
  so a late wake-up can never land on a reused descriptor.
"""

import errno
import logging
import math
import os
import select
import threading
import time
from collections import deque
from itertools import count

import nbd

from pydm.lockdep import make_event

log = logging.getLogger("pydm.store.nbd")

# What a request asks of the server.
READ, WRITE, FLUSH, TRIM, ZERO, BLOCK_STATUS = range(6)
OP_NAMES = ("read", "write", "flush", "trim", "zero", "block-status")

FUA = nbd.CMD_FLAG_FUA
FAST_ZERO = nbd.CMD_FLAG_FAST_ZERO
BACKOFF_MIN = 0.1
BACKOFF_MAX = 2.0
_RETRY = frozenset((errno.ENOTCONN, errno.ESHUTDOWN))   # the connection died, not the request
DEAD = -1                         # what _issue says besides 0 and an errno
_POLLIN, _POLLOUT = select.POLLIN, select.POLLOUT
_TROUBLE = select.POLLHUP | select.POLLERR | select.POLLRDHUP | select.POLLNVAL
_UP_EVENTS = _POLLIN | select.POLLRDHUP
_READ_EVENTS = _POLLIN | _TROUBLE
_EIO = errno.EIO
_monotonic = time.monotonic

SEQ = count(1)        # orders write completions against flush issues


def libnbd_message(e: "nbd.Error") -> str:
    """A libnbd error in a user's words: the function name taken off."""
    text = e.string or str(e)
    head, sep, rest = text.partition(": ")
    if sep and head.startswith("nbd_"):
        text = rest
    if text.startswith("connect: ") and e.errnum:
        text = os.strerror(e.errnum)
    return text


class ServerInfo:
    """What one handshake told: size, flags, block sizes."""

    __slots__ = ("size", "readonly", "can_flush", "can_fua", "can_trim", "can_zero",
                 "can_fast_zero", "can_multi_conn", "can_cache", "extents",
                 "min_block", "preferred_block", "max_block")

    def __init__(self, h):
        self.size = h.get_size()
        self.readonly = bool(h.is_read_only())
        self.can_flush = bool(h.can_flush())
        self.can_fua = bool(h.can_fua())
        self.can_trim = bool(h.can_trim())
        self.can_zero = bool(h.can_zero())
        self.can_fast_zero = bool(h.can_fast_zero())
        self.can_multi_conn = bool(h.can_multi_conn())
        self.can_cache = bool(h.can_cache())
        self.extents = bool(h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
        self.min_block = h.get_block_size(nbd.SIZE_MINIMUM)
        self.preferred_block = h.get_block_size(nbd.SIZE_PREFERRED)
        self.max_block = h.get_block_size(nbd.SIZE_MAXIMUM)


def new_handle(params, index):
    """A configured handle, not connected yet."""
    h = nbd.NBD()
    h.set_handle_name(f"pydm-nbd-{index}")
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.set_request_structured_replies(True)
    h.set_export_name(params.export)
    # The store never looks at a buffer whose read failed: skip the memset.
    h.set_pread_initialize(False)
    if params.tls:
        h.set_tls(nbd.TLS_REQUIRE)
        if params.tls_certificates:
            h.set_tls_certificates(params.tls_certificates)
        if params.tls_psk_file:
            h.set_tls_psk_file(params.tls_psk_file)
        if params.tls_username:
            h.set_tls_username(params.tls_username)
        if not params.tls_verify_peer:
            h.set_tls_verify_peer(False)
    else:
        h.set_tls(nbd.TLS_DISABLE)
    return h


class Req:
    """One request to the server, and libnbd's completion callback for it.

    ``done`` has ``complete(status)`` (a Bio, a split, a waiter); ``after``
    holds the ops still to run once this one succeeds (a flush after a
    write that wanted FUA, the data op after a pre-flush)."""

    __slots__ = ("done", "op", "offset", "length", "buf", "cflags", "after", "durable",
                 "deadline", "conn", "epoch", "covers", "extents")

    def __init__(self, done, op, offset, length, buf, cflags, after, durable, deadline):
        self.done = done
        self.op = op
        self.offset = offset
        self.length = length
        self.buf = buf
        self.cflags = cflags
        self.after = after
        self.durable = durable
        self.deadline = deadline
        self.conn = None
        self.epoch = -1
        self.extents = None

    def __call__(self, err):
        conn = self.conn
        if self.epoch != conn.epoch:            # a handle already dropped
            return 1
        conn.inflight.discard(self)
        e = err.value
        op = self.op
        if e:
            if e in _RETRY:
                conn.casualties.append(self)
            else:
                conn.finish(self, e)
        elif op == READ:
            try:
                self.done.complete(0)
            except Exception:
                log.exception("nbd store: completion of a read failed")
        else:
            if op == FLUSH:
                conn.store._flushed(self.covers)
            elif op != BLOCK_STATUS and not self.cflags & FUA:
                conn.dirty = next(SEQ)
            after = self.after
            if after:
                self.op, self.after = after[0], after[1:]
                conn.queue.appendleft(self)
            else:
                conn.finish(self, conn.store._durable_status() if self.durable else 0)
        return 1

    def extent(self, metacontext, offset, entries, err):
        if metacontext == nbd.CONTEXT_BASE_ALLOCATION:
            self.extents = entries
        return 0


class _Link:
    """The handle side of a connection: connecting, polling, dropping."""

    def __init__(self, store, index, params):
        self.store = store             # None once closed (no cycle to keep)
        self.index = index
        self.params = params
        self.h = None
        self.fd = -1
        self.events = 0
        self.up = False                # handshake done, issuing
        self.epoch = 0                 # bumped when a handle is dropped
        self.info = None
        self.size = 0
        self.ro = False
        self.want_write = False        # output pending: poll for POLLOUT too
        self.check_state = True        # ask libnbd for the direction next time
        self.retry_at = 0.0
        self.backoff = BACKOFF_MIN
        self.connect_deadline = 0.0
        self.first = make_event()      # set at the first connect's outcome
        self.first_error = None
        self.wfd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.poller = select.poll()
        self.poller.register(self.wfd, _POLLIN)

    def __del__(self):
        fd, self.wfd = getattr(self, "wfd", -1), -1
        if fd >= 0:
            os.close(fd)

    def _start_connect(self, now):
        p = self.params
        try:
            h = new_handle(p, self.index)
            if p.transport == "tcp":
                h.aio_connect_tcp(p.host, str(p.port))
            else:
                h.aio_connect_unix(p.socket)
        except nbd.Error as e:
            self._connect_failed(libnbd_message(e), e.errnum)
            return
        self.h = h
        self.up = False
        self.connect_deadline = now + p.handshake_timeout
        self.fd = h.aio_get_fd()
        self.events = 0
        self.poller.register(self.fd, 0)

    def _step_connect(self, h, now):
        if now >= self.connect_deadline:
            self._connect_failed(f"no handshake within {self.params.handshake_timeout:g} s")
            return
        try:
            # The handshake may be over already: libnbd runs the state
            # machine in aio_connect too, and on loopback a whole handshake
            # can finish there.  Polling first would wait for a byte that
            # never comes (the deadline: a 30 s stall, seen in a table load).
            if h.aio_is_ready():
                self._connected(h)
                return
            d = h.aio_get_direction()
            if d:
                self._poll(h, (_POLLIN if d & 1 else 0) | (_POLLOUT if d & 2 else 0),
                           min(self.connect_deadline, self.check_at) - now)
            if h.aio_is_ready():
                self._connected(h)
                return
            if not d or h.aio_is_dead() or h.aio_is_closed():
                self._connect_failed("the server closed the connection during the handshake")
        except nbd.Error as e:
            self._connect_failed(libnbd_message(e), e.errnum)

    def _connected(self, h):
        info = ServerInfo(h)
        self.info = info
        self.size = info.size
        self.ro = info.readonly
        self.backoff = BACKOFF_MIN
        self.want_write = False
        self.check_state = True
        self.up = True
        store = self.store
        if store is not None:
            store._conn_up(self, info)
        self.first.set()

    def _connect_failed(self, why, err=0):
        self._drop_handle()
        if not self.first.is_set():
            self.first_error = (why, err or errno.EIO)
            self.first.set()
        else:
            log.debug("nbd store: connection %d: reconnect failed: %s", self.index, why)
        self.retry_at = _monotonic() + self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def _drop_handle(self):
        h, self.h = self.h, None
        self.up = False
        self.epoch += 1
        if h is not None and self.fd >= 0:
            try:
                self.poller.unregister(self.fd)
            except KeyError:
                pass
        self.fd = -1
        self.events = 0
        return h

    def _poll(self, h, ev, wait):
        """Wait up to ``wait`` s for ``ev`` on the handle (if any) or for a
        wake-up, and let libnbd run on what came."""
        if h is not None and ev != self.events:
            self.poller.modify(self.fd, ev)
            self.events = ev
        ms = 0 if wait <= 0 else min(int(wait * 1000) + 1, 60000)
        for fd, rev in self.poller.poll(ms):
            if fd == self.fd and h is not None:
                if rev & _POLLOUT:
                    h.aio_notify_write()
                    self.check_state = True
                if rev & _READ_EVENTS:
                    h.aio_notify_read()
                if rev & _TROUBLE:          # EOF, reset: libnbd may have closed it
                    self.check_state = True
            elif fd == self.wfd:
                try:
                    os.eventfd_read(self.wfd)
                except BlockingIOError:
                    pass


class Conn(_Link):
    """One connection: its queue, its requests in flight, its loop thread."""

    def __init__(self, store, index, params):
        super().__init__(store, index, params)
        self.timeout = params.timeout
        self.queue = deque()           # submitters append, the loop pops left
        self.inflight = set()
        self.casualties = []           # completed with ENOTCONN/ESHUTDOWN
        self.dirty = 0                 # SEQ of the last write completed without FUA
        self.sleeping = False
        self.stopping = False
        self.exited = False
        self.check_at = 0.0            # next deadline scan
        self.thread = threading.Thread(target=self._run, daemon=True,
                                       name=f"pydm-nbd-{index}")

    # -- submitters' side ------------------------------------------------
    def put(self, req) -> None:
        req.conn = self
        self.queue.append(req)
        if self.sleeping:
            os.eventfd_write(self.wfd, 1)
        if self.exited:
            self._fail_queue()

    def put_many(self, reqs) -> None:
        for req in reqs:
            req.conn = self
        self.queue.extend(reqs)
        if self.sleeping:
            os.eventfd_write(self.wfd, 1)
        if self.exited:
            self._fail_queue()

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping = True
        os.eventfd_write(self.wfd, 1)

    def join(self, timeout=None) -> None:
        if self.thread.ident is not None and self.thread is not threading.current_thread():
            self.thread.join(timeout)

    def _run(self):
        try:
            while not self.stopping:
                try:
                    self._step()
                except Exception as e:         # a bug: never leave requests hanging
                    log.exception("nbd store: connection %d: loop failed", self.index)
                    if self.h is not None:
                        self._lost(f"internal error: {e}")
                    self.retry_at = _monotonic() + BACKOFF_MAX
        finally:
            self._exit()

    def _step(self):
        now = _monotonic()
        if now >= self.check_at:
            self._expire(now)
        h = self.h
        if h is None:
            if now >= self.retry_at:
                self._start_connect(now)
            else:
                self._poll(None, 0, min(self.retry_at, self.check_at) - now)
            return
        if not self.up:
            self._step_connect(h, now)
            return
        q = self.queue
        if q:
            for _ in range(len(q)):         # a batch: replies get their turn too
                req = q.popleft()
                r = self._issue(req, h)
                if r > 0:
                    self.finish(req, r)
            self.check_state = True         # did the socket take them all?
        if self.casualties:
            self._lost("the connection failed")
            return
        if self.check_state:
            # (only now and then: every libnbd call lets go of the GIL, and
            # each time another thread may take it for a while)
            self.check_state = False
            d = h.aio_get_direction()
            if not d:
                self._lost("the server closed the connection")
                return
            self.want_write = bool(d & 2)
        self.sleeping = True
        if q:
            self.sleeping = False
            return
        try:
            self._poll(h, _UP_EVENTS | _POLLOUT if self.want_write else _UP_EVENTS,
                       self.check_at - now)
        except nbd.Error as e:
            self.sleeping = False
            self._lost(libnbd_message(e))
            return
        self.sleeping = False
        if self.casualties:
            self._lost("the connection failed")

    def _issue(self, req, h):
        """Send ``req`` on ``h``: 0 (in flight, perhaps not all sent yet),
        an errno (to complete it with), or ``DEAD`` (the handle is dead: the
        request waits in ``casualties``)."""
        op = req.op
        req.epoch = self.epoch
        try:
            if op == READ:
                if req.offset + req.length > self.size:
                    return _EIO
                self.inflight.add(req)
                h.aio_pread(req.buf, req.offset, req, req.cflags)
                return 0
            info = self.info
            if op == BLOCK_STATUS:
                self.inflight.add(req)
                h.aio_block_status(req.length, req.offset, req.extent, req, 0)
                return 0
            if op == FLUSH:
                if not info.can_flush:
                    return errno.EOPNOTSUPP
                req.covers = next(SEQ)
                self.inflight.add(req)
                h.aio_flush(req, 0)
                return 0
            if self.ro:
                return errno.EROFS
            if req.offset + req.length > self.size:
                return _EIO
            if op == WRITE:
                self.inflight.add(req)
                h.aio_pwrite(req.buf, req.offset, req, req.cflags)
                return 0
            if op == TRIM:
                if not info.can_trim:
                    return errno.EOPNOTSUPP
                self.inflight.add(req)
                h.aio_trim(req.length, req.offset, req, req.cflags)
                return 0
            if op == ZERO:
                if not info.can_zero or (req.cflags & FAST_ZERO and not info.can_fast_zero):
                    return errno.EOPNOTSUPP
                self.inflight.add(req)
                h.aio_zero(req.length, req.offset, req, req.cflags)
                return 0
            return errno.EOPNOTSUPP
        except nbd.Error as e:
            self.inflight.discard(req)
            if h.aio_is_dead() or h.aio_is_closed():
                self.casualties.append(req)
                return DEAD
            return e.errnum or _EIO

    def finish(self, req, status):
        try:
            req.done.complete(status)
        except Exception:
            log.exception("nbd store: completion of a %s failed", OP_NAMES[req.op])

    def _expire(self, now):
        """Fail what is past its deadline; an issued one kills the connection."""
        soonest = now + self.timeout
        late = []
        for req in self.inflight:
            d = req.deadline
            if d <= now:
                late.append(req)
            elif d < soonest:
                soonest = d
        q = self.queue
        keep = []
        stale = []
        for _ in range(len(q)):     # the left end is ours; submitters append right
            try:
                req = q.popleft()
            except IndexError:
                break
            d = req.deadline
            if d <= now:
                stale.append(req)
            else:
                keep.append(req)
                if d < soonest:
                    soonest = d
        q.extendleft(reversed(keep))
        self.check_at = soonest
        for req in late:
            self.inflight.discard(req)
        for req in stale + late:
            self.finish(req, _EIO)
        if late and self.h is not None:
            self._lost(f"no reply within {self.timeout:g} s")

    def _lost(self, why):
        """The connection is dead: give its requests back, reconnect."""
        self._drop_handle()                 # the handle closes here (last reference)
        # (no submitter adds to these now: they see ``up`` False)
        reqs = self.casualties + list(self.inflight)
        self.casualties = []
        self.inflight = set()
        self.queue.extendleft(reversed(reqs))
        store = self.store
        if store is not None:
            store._conn_lost(self, why)
        self.dirty = 0
        self.retry_at = _monotonic()
        self.backoff = BACKOFF_MIN

    def _exit(self):
        self.sleeping = False
        self.exited = True
        h = self.h
        if h is not None and self.up and not self.inflight and not self.casualties:
            try:
                h.aio_disconnect()          # a polite goodbye, sent if it fits now
            except nbd.Error:
                pass
        del h
        self._drop_handle()
        reqs = self.casualties + list(self.inflight)
        self.casualties = []
        self.inflight = set()
        for req in reqs:
            self.finish(req, _EIO)
        self._fail_queue()
        if not self.first.is_set():
            self.first_error = ("closed", errno.EIO)
            self.first.set()

    def _fail_queue(self):
        q = self.queue
        while q:
            try:
                self.finish(q.popleft(), _EIO)
            except IndexError:          # another thread took the last one
                return


def wait_all(conns, timeout):
    """Wait for each connection's first connect: (why, errno) of the first
    that failed, or None."""
    end = _monotonic() + timeout
    for c in conns:
        if not c.first.wait(max(0.0, end - _monotonic())):
            return (f"no handshake within {math.ceil(timeout)} s", errno.ETIMEDOUT)
        if c.first_error is not None:
            return c.first_error
    return None
