"""Transmission on one NBD connection: requests become bios, completions
become replies.

Rules of this module:

* Protocol decisions are the codec's: ``check_request`` judges each header
  (raising ``ProtocolError`` for a MUST violation), and every reply is
  encoded by ``transmission``'s encoders; this module reads the request
  header in place, maps NBD commands and flags onto bios, and submits them.
* The reader thread runs ``serve``: parse, check, admit, take a buffer,
  build the bio, submit.  ``device.submit`` never blocks, so a suspended
  device holds bios, not the reader.  A large WRITE's submit goes to a
  worker, so a 1 MiB pwrite overlaps the next recv; a large READ is read by
  the reader and its reply sent by a worker (``Outbox``), so the next pread
  overlaps this send (the send is the dearer half).
* A READ of up to ``INLINE_MAX`` goes down with ``REQ_NOWAIT``: the page
  cache answers it inline at the cost of a plain read, and what must come
  from the disk is queued on the connection's io_uring (``pydm.aio``),
  whose completions this thread reaps whenever it would wait, so the disk
  sees the client's queue depth.  A read alone goes there too: this thread
  then spins briefly on its completion instead of sleeping in a blocking
  read (a wake-up costs as much as the disk read here).  A large READ
  waits inline (the kernel's readahead overlaps sequential reads already).  A NOWAIT read that
  comes back EAGAIN (it reached its file on a thread with no ring, a delay
  target's timer say) is read again, blocking, by a worker.
* Every request is admitted against the connection's bounds before its
  buffer is taken (a reader over a bound flushes its batch and waits), and
  answered exactly once: its completion hands the encoded reply to the
  outbox, which releases the buffer and the admission once it is sent.
* The per-request path is lean on purpose: methods and constants are bound
  to locals or module globals, and the reader's buffer is read directly.
* This module takes no lock of its own, and calls into a device holding
  none.
* Failed requests are logged once each up to ``ERRORS_LOGGED`` per
  connection, and counted.
"""

import errno
import logging
from errno import EAGAIN

from pydm.bio import (Bio, DISCARD, FLUSH, READ, REQ_FUA, REQ_NOFALLBACK, REQ_NOUNMAP,
                      REQ_NOWAIT, REQ_PREFLUSH, WRITE, WRITE_ZEROES)
from pydm import aio
from pydm.errors import nbd_error
from pydm.nbd.exports import block_status
from pydm.nbd.reader import RBUF_SIZE
from pydm.nbd.transmission import (NO_IO, SOFT_DISCONNECT, block_status_reply,
                                   check_request, error_reply, no_io_reply,
                                   read_header_len, read_reply, simple_reply)
from pydm.nbd.wire import (CMD_BLOCK_STATUS, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
                           CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_NAMES,
                           CMD_READ, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, EINVAL, EIO,
                           REQUEST)
from pydm.nbd.workers import INLINE_MAX

log = logging.getLogger("pydm.nbd")

ERRORS_LOGGED = 5              # per connection; the rest are counted
REQUEST_LEN = REQUEST.size     # 28
_unpack_request = REQUEST.unpack_from


def read_pad(structured: bool) -> int:
    """Where read data starts past a buffer's aligned base: behind the reply
    header (28 bytes structured, 16 simple) it is 64-byte aligned again."""
    return -read_header_len(structured) % 64


class Dispatcher:
    """Serve ``session`` on ``dev`` for the connection ``conn``: requests come
    from its reader, replies go to its outbox, its admission admits, the
    server's pool lends buffers, its workers take large submits."""

    def __init__(self, conn, dev, session):
        self.dev = dev
        self.session = session
        self.structured = session.structured
        self.reader = conn.reader
        self.outbox = conn.outbox
        self.reply = conn.outbox.reply
        self.hand_off = conn.workers.hand_off
        self.adm = conn.adm
        self.pool = conn.server.pool
        self.peer = conn.peer
        self.leaving = conn.is_leaving      # stop waiting for memory
        self.read_pad = read_pad(self.structured)
        self.errors = 0
        self.aio = conn.server.aio
        self.ring = None

    def serve(self):
        """Run requests until the client disconnects (DISC, or a
        ``Disconnect`` / ``ProtocolError`` from below)."""
        ring = self.ring = aio.open_ring() if self.aio == "auto" else None
        aio.install(ring)
        self.reader.ring = ring
        try:
            self._serve()
        finally:
            self.reader.ring = None
            aio.install(None)
            if ring is not None:
                ring.close()           # every read in flight completes first
                self.ring = None

    def _serve(self):
        dev = self.dev
        submit = dev.submit
        session = self.session
        pool = self.pool
        read_pad = self.read_pad
        check = check_request
        rd = self.reader
        rbuf = rd.rbuf
        fill = rd.fill
        read_into = rd.read_into
        try_admit = self.adm.try_admit
        admit = self._admit
        read_done = self._read_done
        write_done = self._simple_done
        hand_off = self.hand_off
        while True:
            if rd.rend - rd.rpos < REQUEST_LEN:
                fill(REQUEST_LEN)
            magic, flags, cmd, cookie, offset, length = _unpack_request(rbuf, rd.rpos)
            rd.rpos += REQUEST_LEN
            err = check(session, dev.size, flags, cmd, offset, length, magic)
            if err:
                if err == NO_IO:                    # zero length, CACHE
                    admit(0)
                    self.reply([no_io_reply(session, cmd, cookie)], None, 0)
                    continue
                if err == SOFT_DISCONNECT:
                    log.debug("nbd %s: soft disconnect", self.peer)
                    return
                if cmd == CMD_WRITE:
                    rd.skip(length)
                self._refuse(cmd, cookie, err, offset, length)
                continue
            if cmd == CMD_READ:
                if not try_admit(length):
                    admit(length)
                buf = pool.get(length)
                # A large read waits here: it is sequential more often
                # than not, the kernel's readahead already keeps the disk
                # busy for it, and reads queued side by side break that up.
                submit(Bio(READ, offset >> 9, length >> 9, buf.read_view(length, read_pad),
                           REQ_NOWAIT if length <= INLINE_MAX else 0,
                           read_done, (cookie, offset, buf, length, flags)))
            elif cmd == CMD_WRITE:
                if not try_admit(length):
                    admit(length)
                buf = pool.get(length)
                view = buf.write_view(length)
                rd.fill_cap = REQUEST_LEN if length > INLINE_MAX else RBUF_SIZE
                try:
                    read_into(view, length)
                except BaseException:
                    self.outbox.release(buf, length)    # the client left mid-payload
                    raise
                bio = Bio(WRITE, offset >> 9, length >> 9, view,
                          REQ_FUA if flags & CMD_FLAG_FUA else 0, write_done,
                          (cookie, buf, length))
                if length > INLINE_MAX:
                    hand_off((submit, bio))
                else:
                    submit(bio)
            else:
                if not try_admit(0):
                    admit(0)
                self._other(cmd, flags, cookie, offset, length)

    def _admit(self, nbytes):
        adm = self.adm
        if not adm.try_admit(nbytes):
            # Over a bound: our own reads in flight and our own batch hold
            # replies that free memory.
            adm.admit(nbytes, self._before_wait, self.leaving)

    def _before_wait(self):
        if self.ring is not None:
            self.ring.drain()
        self.outbox.flush_pending()

    def _other(self, cmd, flags, cookie, offset, length):
        dev = self.dev
        if cmd == CMD_FLUSH:
            dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, self._simple_done,
                           (cookie, None, 0)))
        elif cmd == CMD_TRIM:
            done = self._trim_fua_done if flags & CMD_FLAG_FUA else self._simple_done
            dev.submit(Bio(DISCARD, offset >> 9, length >> 9, None, 0, done,
                           (cookie, None, 0)))
        elif cmd == CMD_WRITE_ZEROES:
            # (a FAST_ZERO that the stack cannot honour was refused already)
            bflags = (REQ_FUA if flags & CMD_FLAG_FUA else 0) | \
                     (REQ_NOUNMAP if flags & CMD_FLAG_NO_HOLE else 0) | \
                     (REQ_NOFALLBACK if flags & CMD_FLAG_FAST_ZERO else 0)
            dev.submit(Bio(WRITE_ZEROES, offset >> 9, length >> 9, None, bflags,
                           self._simple_done, (cookie, None, 0)))
        elif cmd == CMD_BLOCK_STATUS:
            self._block_status(flags, cookie, offset, length)
        else:       # check_request refuses unknown commands; keep it that way
            self.reply([simple_reply(EINVAL, cookie)], None, 0)

    def _block_status(self, flags, cookie, offset, length):
        req_one = bool(flags & CMD_FLAG_REQ_ONE)
        try:
            answers = [(cid, block_status(self.dev, name, offset, length, req_one))
                       for cid, name in sorted(self.session.contexts.items())]
            parts = block_status_reply(cookie, answers)
        except Exception as e:
            log.exception("nbd %s: block status failed", self.peer)
            parts = [error_reply(self.session, CMD_BLOCK_STATUS, cookie, EIO,
                                 f"block status failed: {e}")]
        self.reply(parts, None, 0)

    def _refuse(self, cmd, cookie, err, offset, length):
        self.errors += 1
        if self.errors <= ERRORS_LOGGED:
            log.info("nbd %s: %s %d+%d refused with error %d", self.peer,
                     CMD_NAMES.get(cmd, cmd), offset, length, err)
        self._admit(0)
        self.reply([error_reply(self.session, cmd, cookie, err)], None, 0)

    # ------------------------------------------------------ completions
    def _read_done(self, bio):
        cookie, offset, buf, n, flags = bio.private
        status = bio.status
        if status == EAGAIN and bio.flags & REQ_NOWAIT and not self.outbox.closed:
            # Not in the page cache: a worker reads it, blocking.
            self.hand_off((self.dev.submit, Bio(READ, bio.sector, bio.nr_sectors, bio.data, 0,
                                                self._read_done, bio.private)))
            return
        if status:
            self._count_error(bio)
            parts = [error_reply(self.session, CMD_READ, cookie, nbd_error(status),
                                 "read failed")]
        else:
            parts = read_reply(self.structured, cookie, offset, flags, bio.data,
                               buf.raw, buf.base + self.read_pad)
        self.reply(parts, buf, n)

    def _simple_done(self, bio):
        cookie, buf, n = bio.private
        status = bio.status
        if status:
            self._count_error(bio)
            status = nbd_error(status)
        self.reply([simple_reply(status, cookie)], buf, n)

    def _trim_fua_done(self, bio):
        if bio.status or self.outbox.closed:
            self._simple_done(bio)
            return
        # The store does not tie durability to a discard: FUA means a flush.
        self.dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, self._simple_done, bio.private))

    def _count_error(self, bio):
        self.errors += 1
        if self.errors <= ERRORS_LOGGED:
            log.info("nbd %s: %r failed: %s", self.peer, bio,
                     errno.errorcode.get(bio.status, bio.status))

    def report(self):
        """Log the count of failed requests once the connection is over."""
        if self.errors > ERRORS_LOGGED:
            log.info("nbd %s: %d failed requests in all", self.peer, self.errors)
