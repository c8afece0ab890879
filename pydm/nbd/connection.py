"""One NBD connection: its life cycle, the handshake driven over the socket,
and the start of transmission.

Rules of this module:

* A connection is one reader thread (``run``) that owns the socket's
  receive side (``Reader``), drives the codec's ``ServerHandshake``, opens
  the export as a holder of the device and hands transmission to a
  ``Dispatcher``; replies go out through its ``Outbox``, large jobs to its
  ``Workers``.  This module decides nothing about the protocol.
* The whole handshake must end by ``handshake_limit`` seconds after the
  connection starts: every receive and send of it gets only what is left.
* ``shutdown`` (server stop, from another thread) only asks: the reader
  sees end of stream, a reader waiting for memory stops waiting.  The
  reader itself finishes: it sends what is batched, waits (bounded) for
  the requests in flight, closes the socket, stops the workers, closes the
  device and leaves the server's connection set, in that order.
* Locks (leaves, made by ``pydm.lockdep``): ``nbd.conn.write`` serialises
  messages on the socket (then ``nbd.conn.tls`` inside it), made here and
  shared by the outbox and a TLS transport.  The outbox, workers and
  admission own the others (``nbd.conn.outbox``, ``nbd.conn.workers``,
  ``nbd.conn.mem`` -> ``nbd.budget``).  None is held while calling into a
  device.
* Malformed input: the spec's error reply, or for MUST violations a
  disconnect, logged once per event with the peer's address.
"""

import logging
import socket
import threading
import time

from pydm.errors import DMError
from pydm.lockdep import make_lock
from pydm.nbd.admission import Admission, Leaving
from pydm.nbd.dispatch import Dispatcher
from pydm.nbd.handshake import CONTINUE, STARTTLS, TRANSMIT, ServerHandshake
from pydm.nbd.outbox import Outbox
from pydm.nbd.reader import Disconnect, Reader
from pydm.nbd.transport import PlainTransport, TLSTransport
from pydm.nbd.wire import MAX_OPTION_DATA, ProtocolError
from pydm.nbd.workers import Workers

log = logging.getLogger("pydm.nbd")

DRAIN_TIMEOUT = 30.0           # wait for in-flight bios when a client leaves
STOP_DRAIN_TIMEOUT = 5.0


class Connection:
    """One client of ``server`` on ``sock``; ``thread`` runs it."""

    def __init__(self, server, sock, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.wlock = make_lock("nbd.conn.write")
        self.transport = PlainTransport(sock)
        self.adm = Admission(server.budget, server.reserve, server.max_inflight_bytes)
        self.workers = Workers(peer, server.workers)
        self.outbox = Outbox(sock, self.transport, self.wlock, peer, server.pool, self.adm,
                             self.workers)
        self.reader = Reader(sock, self.transport, self.outbox, self.adm, server.poll_max)
        self.leaving = False        # server stop: stop waiting for memory
        self.handshake = None
        self.dev = None
        self.dispatch = None
        self.key = object()
        self.thread = threading.Thread(target=self.run, name=f"pydm-nbd {peer}", daemon=True)

    # ------------------------------------------------------------ life
    def run(self):
        try:
            self.reader.deadline = time.monotonic() + self.server.handshake_limit
            session = self._handshake()
            if session is not None:
                self.reader.deadline = None
                self.sock.settimeout(None)
                self._transmission(session)
        except (Disconnect, Leaving):
            log.debug("%s: disconnected", self.peer)
        except ProtocolError as e:
            log.warning("nbd %s: protocol violation: %s; disconnecting", self.peer, e)
        except socket.timeout:
            log.warning("nbd %s: handshake timed out; disconnecting", self.peer)
        except OSError as e:
            if not self.outbox.closed:
                log.info("nbd %s: connection lost: %s", self.peer, e)
        except Exception:
            log.exception("nbd %s: internal error; disconnecting", self.peer)
        finally:
            self._finish()

    def shutdown(self):
        """Ask the reader to stop (server stop): it sees end of stream."""
        self.leaving = True
        self.adm.wake()
        if self.handshake is not None:
            self.handshake.shutting_down = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def is_leaving(self) -> bool:
        """The connection is going away: nobody should wait for memory."""
        return self.leaving or self.outbox.closed

    def memory(self) -> dict:
        """This connection's requests and payload bytes in flight."""
        return {"peer": self.peer, "requests": self.adm.inflight,
                "bytes": self.adm.inflight_bytes}

    def _finish(self):
        outbox = self.outbox
        outbox.stop_batching()
        if self.dev is not None:
            try:
                outbox.flush_pending()
            except OSError:
                pass
            timeout = STOP_DRAIN_TIMEOUT if self.server.stopping else DRAIN_TIMEOUT
            if not self.adm.wait_drained(timeout):
                log.warning("nbd %s: closing with %d requests still in flight",
                            self.peer, self.adm.inflight)
        outbox.closed = True
        if self.transport.tls:
            self.transport.close_notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        self.workers.stop()
        if self.dev is not None:
            self.server.control.close(self.dev, self.key)
        if self.dispatch is not None:
            self.dispatch.report()
        self.server.forget(self)

    # -------------------------------------------------------- handshake
    def _send_handshake(self, parts):
        self.reader.arm_deadline()
        self.outbox.send(parts)

    def _handshake(self):
        srv = self.server
        rd = self.reader
        hs = ServerHandshake(srv.catalog, srv.tls_mode, srv.ssl_context is not None)
        self.handshake = hs
        if srv.stopping:
            hs.shutting_down = True
        self._send_handshake([hs.greeting()])
        hs.client_flags(rd.read_exact(4))
        while True:
            opt, length = hs.option_header(rd.read_exact(16))
            if length > MAX_OPTION_DATA:
                rd.skip(length)
                out = hs.option_too_big(opt)
            else:
                out = hs.option(opt, rd.read_exact(length))
            if out.message:
                log.info("nbd %s: %s", self.peer, out.message)
            if out.reply:
                self._send_handshake([out.reply])
            if out.action == CONTINUE:
                continue
            if out.action == STARTTLS:
                self._start_tls()
                hs.tls_established()
                continue
            if out.action == TRANSMIT:
                return out.session
            return None

    def _start_tls(self):
        if self.reader.buffered():
            raise ProtocolError("data sent after STARTTLS before the TLS handshake")
        t = TLSTransport(self.sock, self.server.ssl_context, self.wlock)
        self.reader.arm_deadline()
        t.handshake()
        self.transport = self.reader.transport = self.outbox.transport = t
        who = t.peer_subject()
        log.info("nbd %s: TLS established (%s)%s", self.peer, t.obj.version(),
                 f", client {who}" if who else "")

    # ----------------------------------------------------- transmission
    def _transmission(self, session):
        name = session.export.name
        desc = f"nbd {self.peer}" + (" tls" if self.transport.tls else "")
        try:
            self.dev = self.server.control.open(name, self.key, desc)
        except DMError as e:
            log.warning("nbd %s: export %s vanished during the handshake: %s",
                        self.peer, name, e)
            return
        log.info("nbd %s: serving %s (%s replies)", self.peer, name,
                 "structured" if session.structured else "simple")
        self.dispatch = Dispatcher(self, self.dev, session)
        self.workers.start()
        self.outbox.start_batching()
        self.dispatch.serve()
