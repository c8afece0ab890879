"""The buffered reader of one NBD connection: every byte a client sends comes
in through it.

Rules of this module:

* One thread reads (the connection's reader thread); nothing here is shared,
  so nothing here takes a lock.
* One ``recv_into`` into ``rbuf`` usually brings several requests.  The
  bytes not consumed yet are ``rbuf[rpos:rend]``; the transmission loop may
  read ``rbuf``, ``rpos`` and ``rend`` directly (a request header is parsed
  in place, without a call), everything else goes through ``fill``,
  ``read_exact``, ``read_into`` and ``skip``.
* Before it blocks in a receive the reader sends the replies the outbox has
  batched (``Outbox.flush_pending``): a client waiting for them may be what
  the next request waits on.  While reads are in flight on its ring it
  waits for the socket and the ring together, and sends each completed
  read's reply as it comes.
* A receive that would block first polls the socket for a while
  (``_recv_polling``: adaptive, never longer than ``poll_max``, only with
  nothing in flight, off over TLS and during the handshake), so a client
  that waits for every reply
  does not also wait for this thread to wake up.
* While ``deadline`` is set (the handshake) every receive, and every send
  that arms it, gets only what is left of the handshake's time, so a client
  trickling bytes cannot hold a connection slot for longer than that.
* A large payload skips ``rbuf``: what is buffered is copied, the rest is
  received straight into the payload buffer.  End of stream is
  ``Disconnect``.
"""

import socket
import time

from pydm.adaptive import next_window

RBUF_SIZE = 256 << 10
POLL_MAX = 100e-6              # s: the longest a receive polls before it sleeps
POLL_START = 25e-6             # s: the first window, once a short wait was seen
_DONTWAIT = socket.MSG_DONTWAIT
_clock = time.perf_counter


class Disconnect(Exception):
    """The peer went away; nothing more to say to it."""


class Reader:
    """The receive side of one connection over ``transport`` (which STARTTLS
    replaces); ``outbox`` is flushed before any receive that may block;
    ``adm`` says what is in flight."""

    __slots__ = ("sock", "transport", "outbox", "rbuf", "rmv", "rpos", "rend",
                 "fill_cap", "deadline", "ring", "poll_max", "spin", "adm")

    def __init__(self, sock, transport, outbox, adm, poll_max=POLL_MAX):
        self.sock = sock
        self.transport = transport
        self.outbox = outbox
        self.rbuf = bytearray(RBUF_SIZE)
        self.rmv = memoryview(self.rbuf)
        self.rpos = self.rend = 0
        # After a large WRITE, read just the next header: a big read-ahead
        # would pull the next payload's head into rbuf, to be copied out
        # again with the GIL held; recv_all_into takes it straight.
        self.fill_cap = RBUF_SIZE
        self.deadline = None        # monotonic time the handshake must end by
        self.ring = None            # the connection's pydm.aio ring, while transmitting
        self.poll_max = poll_max    # s: the longest a receive polls before it sleeps
        self.spin = 0.0             # s: how long the next one polls (adaptive)
        self.adm = adm              # the connection's admission: what is in flight

    def buffered(self) -> int:
        """Bytes received and not consumed yet."""
        return self.rend - self.rpos

    def arm_deadline(self):
        """Give the socket what is left of the handshake's time."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("handshake time limit")
        self.sock.settimeout(left)

    def fill(self, need):
        """Make ``need`` bytes (<= RBUF_SIZE) available at ``rpos``."""
        rpos, rend = self.rpos, self.rend
        have = rend - rpos
        if not have:
            self.rpos = self.rend = rend = 0
        elif rpos and (RBUF_SIZE - rpos < need or RBUF_SIZE - rend < 65536):
            self.rmv[:have] = bytes(self.rmv[rpos:rend])
            self.rpos, self.rend = 0, have
            rend = have
        outbox = self.outbox
        if outbox.pending:
            outbox.flush_pending()
        if self.deadline is not None:
            self.arm_deadline()
        recv = self.transport.recv_into
        cap = self.fill_cap
        ring = self.ring
        polling = self.poll_max and self.deadline is None and not self.transport.tls
        while have < need:
            if ring is not None and ring.inflight:
                self.await_ring(ring)
            if polling:
                n = self._recv_polling(self.rmv[rend:],
                                       min(RBUF_SIZE - rend, max(cap, need - have)))
            else:
                n = recv(self.rmv[rend:], min(RBUF_SIZE - rend, max(cap, need - have)))
            if not n:
                raise Disconnect()
            rend += n
            have += n
            if have < need and self.deadline is not None:
                self.arm_deadline()
        self.rend = rend

    def _recv_polling(self, view, n) -> int:
        """A receive that polls for up to ``spin`` seconds before it sleeps:
        a client that waits for each reply sends its next request within
        tens of microseconds, and waking a sleeping thread costs about as
        much again.  Only with nothing in flight: while replies are still
        to come the client's next request waits on them, and the workers
        sending them need the CPU.  Adaptive, as QEMU's event loop
        polling: the window doubles (up to ``poll_max``) while the wait it
        could not cover was short, and drops to nothing after a long one
        (an idle client costs no CPU)."""
        sock = self.sock
        try:
            return sock.recv_into(view, n, _DONTWAIT)
        except BlockingIOError:
            pass
        start = _clock()
        spin = self.spin
        if spin and not self.adm.inflight:
            end = start + spin
            while _clock() < end:
                try:
                    return sock.recv_into(view, n, _DONTWAIT)
                except BlockingIOError:
                    pass
        got = sock.recv_into(view, n)
        self._adapt(_clock() - start)
        return got

    def _adapt(self, waited):
        self.spin = next_window(self.spin, waited, POLL_START, self.poll_max)

    def await_ring(self, ring):
        """Before a receive that may block: wait for the socket *and* the
        ring, sending the replies of reads as they complete.  (Over TLS,
        bytes may sit decrypted where poll cannot see them: the ring is
        drained first instead.)"""
        outbox = self.outbox
        if self.transport.tls:
            ring.drain()
        else:
            fd = self.sock.fileno()
            # spin on a lone read only when the client waits for it alone:
            # with more in flight the CPU is better left to the client
            while not ring.wait(fd, self.adm.inflight <= 1):
                if outbox.pending:
                    outbox.flush_pending()
        if outbox.pending:
            outbox.flush_pending()

    def read_exact(self, n) -> bytes:
        if self.rend - self.rpos < n:
            self.fill(n)
        pos = self.rpos
        self.rpos = pos + n
        return bytes(self.rmv[pos:pos + n])

    def read_into(self, view, n):
        """Fill ``view[:n]`` from the stream (a WRITE payload)."""
        if n <= RBUF_SIZE // 2:
            if self.rend - self.rpos < n:
                self.fill(n)
            pos = self.rpos
            view[:n] = self.rmv[pos:pos + n]
            self.rpos = pos + n
            return
        k = min(self.rend - self.rpos, n)
        if k:
            pos = self.rpos
            view[:k] = self.rmv[pos:pos + k]
            self.rpos = pos + k
        if k < n and self.outbox.pending:
            self.outbox.flush_pending()
        recv = self.transport.recv_all_into
        while k < n:
            got = recv(view[k:n], n - k)
            if not got:
                raise Disconnect()
            k += got

    def skip(self, n):
        """Consume ``n`` bytes without keeping them (a body nobody wants)."""
        while n:
            k = min(n, RBUF_SIZE // 2)
            if self.rend - self.rpos < k:
                self.fill(k)
            self.rpos += k
            n -= k
