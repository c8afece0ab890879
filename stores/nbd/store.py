"""The NBD store: a pydm store whose bytes live on a remote NBD server.

Rules of this module:

* ``NbdStore(spec, readonly)`` connects or raises ``PydmError`` with one
  line, leaving nothing open.  It opens one connection, and up to
  ``conns`` only when the server advertises multi-conn (every connection
  then sees one device, and a flush on one covers writes done on all).
* The bio face never blocks on the network: ``submit`` turns a bio into
  requests and puts them on the least loaded connection that is up (see
  conn.py); completions run on that connection's loop thread.  The byte
  face submits the same requests and waits on an event, so it must not be
  called from a completion callback of this store.
* Reads and writes over the server's maximum block size (at most 32 MiB)
  and trims and zeroes over 1 GiB are split; all parts of one bio go to
  one connection, and the bio completes once, with the first error.
* Honest capabilities, honest completions:

  - without flush on the server, a FLUSH and a FUA (or PREFLUSH) request
    fail with EOPNOTSUPP and are not sent: nothing is claimed durable;
  - with flush but no FUA, FUA is kept by a flush after the write;
  - without trim, a DISCARD fails with EOPNOTSUPP; without zero, a
    WRITE_ZEROES writes zeroes, or fails with EOPNOTSUPP under
    REQ_NOFALLBACK (so does a FAST_ZERO the server cannot do fast);
  - a read-only store (asked, or the server says so) fails writes with
    EROFS; a request past the end of the export (it may shrink across a
    reconnect) fails with EIO.

* Faults: every request completes within ``timeout`` seconds of its
  submission, with EIO if it must (conn.py).  Lost connections come back
  by themselves and their requests are retried.  If a write completed on
  a connection that then died, and no flush succeeded after it, the server
  may have lost it: the next flush or FUA request to complete fails with
  EIO (once; then the flag is cleared).
* Logging (``pydm.store.nbd``): one warning when the store loses a
  connection while all were up, one info line once all are back.
* ``close`` is idempotent and never hangs: the loops stop, everything still
  queued or in flight fails with EIO, the threads are joined.
* Locks (leaves; nothing is called while one is held): "store.nbd" guards
  the durability state and the server info, "store.nbd.split" the count
  of a split bio's parts (they may fail on a submitter's thread at close).
"""

import errno
import logging
import time

import nbd

from pydm import bio as _bio
from pydm.caps import MAX_PAYLOAD, SECTOR, Caps
from pydm.errors import PydmError, strerror
from pydm.lockdep import make_event, make_lock
from pydm.store import EXTENT_HOLE, EXTENT_ZERO, Store

from .conn import (BLOCK_STATUS, FAST_ZERO, FLUSH, FUA, READ, TRIM, WRITE, ZERO, Conn,
                   Req, wait_all)
from .uri import describe

log = logging.getLogger("pydm.store.nbd")

NO_HOLE = nbd.CMD_FLAG_NO_HOLE
TRIM_MAX = 1 << 30                # per request, for trims and zeroes
ZERO_CHUNK = 1 << 20              # writes of zeroes, when the server cannot zero
_ZEROS = memoryview(bytes(ZERO_CHUNK))
_monotonic = time.monotonic
_EIO = errno.EIO
_BIO_READ = _bio.READ


class _Split:
    """One bio in several requests: completes it once, with the first error."""

    __slots__ = ("bio", "left", "status", "lock")

    def __init__(self, bio, parts):
        self.bio = bio
        self.left = parts
        self.status = 0
        self.lock = make_lock("store.nbd.split")

    def complete(self, status):
        with self.lock:
            if status and not self.status:
                self.status = status
            self.left -= 1
            last = self.left == 0
        if last:
            self.bio.complete(self.status)


class _Waiter:
    """The byte face's completion: an event and a status."""

    __slots__ = ("event", "status")

    def __init__(self):
        self.event = make_event()
        self.status = None

    def complete(self, status):
        self.status = status
        self.event.set()


def _max_io(info) -> int:
    return min(MAX_PAYLOAD, info.max_block or MAX_PAYLOAD)


class NbdStore(Store):
    """A store on an NBD server (see the module rules)."""

    def __init__(self, spec, readonly: bool = False):
        p = spec.params
        self.params = p
        self.key = spec.key
        self.name = spec.ref
        self.where = describe(p)
        self.asked_readonly = bool(readonly)
        self.readonly = self.asked_readonly
        self.timeout = p.timeout
        self.size = 0
        self.info = None
        self.max_io = MAX_PAYLOAD
        self.closed = False
        self._lock = make_lock("store.nbd")
        self._durability_lost = False
        self._flushed_seq = 0
        self._degraded = False
        self.conns = []
        try:
            self._open_conns(1)
            if p.conns > 1 and self.info.can_multi_conn:
                self._open_conns(p.conns - 1)
        except BaseException:
            self.close()
            raise

    def _open_conns(self, n):
        new = [Conn(self, len(self.conns) + i, self.params) for i in range(n)]
        self.conns = self.conns + new           # a new list: _pick iterates without a lock
        for c in new:
            c.start()
        failed = wait_all(new, self.params.handshake_timeout + 5)
        if failed is not None:
            why, err = failed
            raise PydmError(f"cannot connect to {self.where}: {why}", err)

    # -- what the connections report ------------------------------------
    def _conn_up(self, conn, info):
        with self._lock:
            old = self.size if self.info is not None else None
            self.info = info
            self.size = info.size
            self.readonly = self.asked_readonly or info.readonly
            self.max_io = _max_io(info)
            back = self._degraded and all(c.up for c in self.conns) and not self.closed
            if back:
                self._degraded = False
        if old is not None and old != info.size:
            log.warning("nbd store %s: the export is now %d bytes (was %d)",
                        self.name, info.size, old)
        if back:
            log.info("nbd store %s: connected again", self.name)

    def _conn_lost(self, conn, why):
        with self._lock:
            if conn.dirty > self._flushed_seq:
                self._durability_lost = True
            warn = not self._degraded and not self.closed
            self._degraded = True
        if warn:
            log.warning("nbd store %s: connection lost (%s); reconnecting", self.name, why)

    def _flushed(self, covers):
        with self._lock:
            if covers > self._flushed_seq:
                self._flushed_seq = covers

    def _durable_status(self) -> int:
        """EIO once after writes may have been lost, else 0."""
        if not self._durability_lost:
            return 0
        with self._lock:
            lost, self._durability_lost = self._durability_lost, False
        return _EIO if lost else 0

    # -- requests --------------------------------------------------------
    def _pick(self):
        conns = self.conns
        if len(conns) == 1:
            return conns[0]
        best, least = None, 1 << 62
        for c in conns:
            if c.up:
                n = len(c.inflight) + len(c.queue)
                if n < least:
                    best, least = c, n
        return best if best is not None else conns[0]

    def _start(self, done, op, offset, length, buf=None, cflags=0, after=(),
               durable=False, preflush=False, limit=None):
        """Queue ``op`` on one connection, split at ``limit`` bytes."""
        if self.closed:
            done.complete(_EIO)
            return None
        deadline = _monotonic() + self.timeout
        conn = self._pick()
        if limit is None or length <= limit:
            if buf is _ZEROS:
                buf = _ZEROS[:length]
            if preflush:
                req = Req(done, FLUSH, offset, length, buf, cflags, (op,) + after,
                          True, deadline)
            else:
                req = Req(done, op, offset, length, buf, cflags, after, durable, deadline)
            conn.put(req)
            return req
        parts = []
        split = _Split(done, (length + limit - 1) // limit)
        zeroes = buf is _ZEROS
        mv = memoryview(buf).cast("B") if buf is not None and not zeroes else None
        pos = 0
        while pos < length:
            n = min(limit, length - pos)
            part = _ZEROS[:n] if zeroes else (mv[pos:pos + n] if mv is not None else None)
            if preflush:
                parts.append(Req(split, FLUSH, offset + pos, n, part, cflags, (op,) + after,
                                 True, deadline))
            else:
                parts.append(Req(split, op, offset + pos, n, part, cflags, after, durable,
                                 deadline))
            pos += n
        conn.put_many(parts)
        return None

    def _request(self, done, op, offset, length, data, flags):
        """A bio's worth of work (byte offsets, pydm REQ_* flags)."""
        if op == _BIO_READ:
            if not length:
                done.complete(0)
            else:
                self._start(done, READ, offset, length, data, limit=self.max_io)
            return
        info = self.info
        if op == _bio.FLUSH:
            if not info.can_flush:
                done.complete(errno.EOPNOTSUPP)
            else:
                self._start(done, FLUSH, 0, 0, durable=True)
            return
        if self.readonly:
            done.complete(errno.EROFS)
            return
        cflags = 0
        buf = None
        limit = TRIM_MAX
        if op == _bio.WRITE:
            kind, buf, limit = WRITE, data, self.max_io
        elif op == _bio.DISCARD:
            if not info.can_trim:
                done.complete(errno.EOPNOTSUPP)
                return
            kind = TRIM
        elif op == _bio.WRITE_ZEROES:
            if info.can_zero:
                kind = ZERO
                if flags & _bio.REQ_NOUNMAP:
                    cflags |= NO_HOLE
                if flags & _bio.REQ_NOFALLBACK:
                    if not info.can_fast_zero:
                        done.complete(errno.EOPNOTSUPP)
                        return
                    cflags |= FAST_ZERO
            elif flags & _bio.REQ_NOFALLBACK:
                done.complete(errno.EOPNOTSUPP)
                return
            else:                       # the server cannot zero: write zeroes
                kind, buf, limit = WRITE, _ZEROS, min(ZERO_CHUNK, self.max_io)
        else:
            done.complete(errno.EOPNOTSUPP)
            return
        after = ()
        durable = False
        preflush = bool(flags & _bio.REQ_PREFLUSH)
        if flags & _bio.REQ_FUA:
            durable = True
            if info.can_fua:
                cflags |= FUA
            elif info.can_flush:
                after = (FLUSH,)
            else:
                done.complete(errno.EOPNOTSUPP)
                return
        if preflush and not info.can_flush:
            done.complete(errno.EOPNOTSUPP)
            return
        if not length:
            if not preflush:
                done.complete(0)
                return
            kind, after, preflush = FLUSH, (), False
            durable = True
        self._start(done, kind, offset, length, buf, cflags, after, durable, preflush, limit)

    # -- bio face --------------------------------------------------------
    def submit(self, bio) -> None:
        try:
            self._request(bio, bio.op, bio.sector << 9, bio.nr_sectors << 9, bio.data,
                          bio.flags)
        except Exception:               # a malformed bio: fail it, never leave it hanging
            log.exception("%s: %r failed", self.name, bio)
            if not bio.done:
                bio.complete(_EIO)

    # -- byte face -------------------------------------------------------
    def _wait(self, op, offset, length, data=None, flags=0):
        w = _Waiter()
        self._request(w, op, offset, length, data, flags)
        self._await(w)

    def _await(self, w):
        # Requests complete within the timeout; the margin only guards a bug.
        if not w.event.wait(self.timeout + 5):
            raise OSError(_EIO, f"{self.name}: no completion")
        if w.status:
            raise OSError(w.status, strerror(w.status))

    def readinto_at(self, buf, offset: int) -> None:
        mv = memoryview(buf).cast("B")
        self._wait(_bio.READ, offset, mv.nbytes, mv)

    def write_at(self, offset: int, data) -> None:
        mv = memoryview(data).cast("B")
        self._wait(_bio.WRITE, offset, mv.nbytes, mv)

    def flush(self) -> None:
        self._wait(_bio.FLUSH, 0, 0)

    def discard(self, offset: int, length: int) -> None:
        self._wait(_bio.DISCARD, offset, length)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fallback: bool = True) -> None:
        flags = (0 if may_unmap else _bio.REQ_NOUNMAP) | (0 if fallback else _bio.REQ_NOFALLBACK)
        self._wait(_bio.WRITE_ZEROES, offset, length, None, flags)

    def extents(self, offset: int, length: int):
        """[(length, flags)] from base:allocation, the first byte at least."""
        end = min(offset + length, self.size)
        if offset >= end or not self.info.extents:
            return [(length, 0)]
        w = _Waiter()
        req = self._start(w, BLOCK_STATUS, offset, min(end - offset, TRIM_MAX))
        if req is None:
            raise OSError(_EIO, strerror(_EIO))
        self._await(w)
        entries = req.extents or ()
        out = []
        pos = offset
        for i in range(0, len(entries) - 1, 2):
            n = min(entries[i], end - pos)
            if n <= 0:
                break
            out.append((n, entries[i + 1] & (EXTENT_HOLE | EXTENT_ZERO)))
            pos += n
        return out or [(end - offset, 0)]

    # -- the rest of the store ops --------------------------------------
    def refresh_size(self) -> int:
        """The size of the export as the last handshake gave it."""
        return self.size

    def capabilities(self) -> Caps:
        info = self.info
        min_block = max(SECTOR, info.min_block or SECTOR)
        caps = Caps(readonly=self.readonly, flush=info.can_flush, fua=info.can_fua,
                    discard=info.can_trim, write_zeroes=info.can_zero,
                    fast_zero=info.can_fast_zero, multi_conn=info.can_multi_conn,
                    cache=info.can_cache, extents=info.extents, min_block=min_block,
                    preferred_block=info.preferred_block or 4096,
                    max_block=max(min_block, _max_io(info)),
                    # no flush offered: the server may still cache writes, and
                    # nothing above may claim they are durable (pydm.caps)
                    unflushable=not info.can_flush and not self.readonly)
        caps.settle()
        return caps

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
        conns = self.conns
        for c in conns:
            c.stop()
        for c in conns:
            c.join()
            if not c.thread.is_alive():
                c.store = None          # no cycle: the Conn (and its eventfd) can go
