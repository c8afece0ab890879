"""Sending replies on one NBD connection: batches on the reader thread, one
outbox drained by one thread at a time for everybody else.

Rules of this module:

* Replies arrive encoded (lists of buffers from the codec's encoders); this
  module never packs a byte, it only decides when and from which thread
  the buffers go out, and frees what each reply pinned once it is gone.
* A small reply completed on the reader thread (a synchronous store) is
  batched while batching is on, and the batch is sent with one ``sendmsg``
  when it is full or just before the reader would block (the reader calls
  ``flush_pending``).
* Big replies and replies from workers and foreign threads meet in the
  outbox, and one thread at a time drains it: a worker finding nobody
  sending becomes the sender; the reader and foreign threads (a delay
  timer, a resume, an era commit releasing a burst) never send there, they
  hand a drain job to a worker.  So the socket is not handed from thread to
  thread per reply, and a client that stops reading stalls only its own
  workers.
* Every reply releases what it holds exactly once, sent or not: its payload
  buffer back to the pool, its request and bytes back to admission.
* Once ``closed`` (the connection ends, or a send failed) nothing is sent;
  replies are released at once.
* Locks (made by ``pydm.lockdep``): ``nbd.conn.outbox``, a leaf, guards the
  outbox and who drains it, and is never held while sending;
  ``nbd.conn.write`` serialises messages on the socket, with only
  ``nbd.conn.tls`` (a TLS transport's) ever taken inside it.  Neither is held
  while calling into a device or admission.
"""

import logging
import socket
import threading

from pydm.lockdep import make_lock
from pydm.nbd.workers import INLINE_MAX

log = logging.getLogger("pydm.nbd")

BATCH_PARTS = 128              # iovec entries per batched sendmsg (IOV_MAX 1024)
BATCH_BYTES = 2 << 20

_get_ident = threading.get_ident


class Outbox:
    """The reply side of one connection.

    ``transport`` is replaced by STARTTLS; ``wlock`` is the connection's
    write lock (a TLS transport takes it too); ``pool`` and ``adm`` get back
    what each reply held; ``workers`` run drain jobs.
    """

    def __init__(self, sock, transport, wlock, peer, pool, adm, workers):
        self.sock = sock
        self.transport = transport
        self.wlock = wlock
        self.peer = peer
        self.pool = pool
        self.adm = adm
        self.hand_off = workers.hand_off
        self.worker_idents = workers.idents
        self.closed = False
        self.reader_ident = None
        self.batching = False
        self.pending = []           # the reader's batch: buffers, and what they hold
        self.pending_rel = []
        self.pending_bytes = 0
        self.flock = make_lock("nbd.conn.outbox")
        self.outbox = []            # replies waiting for the connection's sender
        self.outbox_rel = []
        self.sending = False        # a thread drains the outbox, or a job to do so is queued

    def send(self, parts):
        """Write one message now, from this thread (the handshake's replies)."""
        with self.wlock:
            self.transport.send(parts)

    def start_batching(self):
        """Batch the small replies completed on this thread (the reader)."""
        self.reader_ident = _get_ident()
        self.batching = True

    def stop_batching(self):
        self.batching = False

    def reply(self, parts, buf, n):
        """Send one reply; ``buf`` (or None) and ``n`` payload bytes are
        released once it has gone."""
        if self.closed:
            self.release(buf, n)
            return
        ident = _get_ident()
        if ident == self.reader_ident and n <= INLINE_MAX:
            if self.batching:
                self.pending += parts
                self.pending_rel.append((buf, n))
                self.pending_bytes += n
                if len(self.pending) >= BATCH_PARTS or self.pending_bytes >= BATCH_BYTES:
                    self.flush_pending()
                return
        # 1 MiB reads, QD4: reading and sending all on the reader was
        # CPU-bound on one thread, and every worker doing its own read and
        # send paid ~4 context switches a request (both ~0.75x nbdkit); the
        # reader reading and one worker sending made it ~0.9x.
        with self.flock:
            self.outbox += parts
            self.outbox_rel.append((buf, n))
            if self.sending:
                return
            self.sending = True
        if ident in self.worker_idents:
            self._drain(None)
        else:
            self.hand_off((self._drain, None))

    def _drain(self, _arg):
        flock = self.flock
        try:
            while True:
                with flock:
                    parts, rel = self.outbox, self.outbox_rel
                    if not rel:
                        self.sending = False
                        return
                    self.outbox, self.outbox_rel = [], []
                self._send_batch(parts, rel)
        except BaseException:
            with flock:
                self.sending = False
            raise

    def flush_pending(self):
        """Send the reader's batch (before it blocks, or waits for memory)."""
        parts = self.pending
        if not parts:
            return
        rel = self.pending_rel
        self.pending = []
        self.pending_rel = []
        self.pending_bytes = 0
        self._send_batch(parts, rel)

    def _send_batch(self, parts, rel):
        try:
            for i in range(0, len(parts), BATCH_PARTS):     # sendmsg takes <= IOV_MAX
                if not self.closed:
                    self.send(parts[i:i + BATCH_PARTS])
        except OSError as e:
            self._send_failed(e)
        finally:
            put = self.pool.put
            nbytes = 0
            for buf, n in rel:
                if buf is not None:
                    put(buf)
                nbytes += n
            self.adm.release(len(rel), nbytes)

    def _send_failed(self, e):
        if not self.closed:
            self.closed = True
            log.info("nbd %s: cannot send reply: %s", self.peer, e)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def release(self, buf, n):
        """Give back what one request held, without a reply."""
        if buf is not None:
            self.pool.put(buf)
        self.adm.release(1, n)
