"""Byte transports under an NBD connection: plain sockets and TLS.

Rules of this module:

* A transport offers ``recv_into(view, n) -> count`` (0 at end of stream)
  for the connection's single reader, and ``send(parts)`` for writers, which
  the connection serialises with its write lock: ``send`` writes all of one
  message or raises, and never interleaves two messages.
* TLS is sans-IO underneath: an ``ssl.SSLObject`` over two memory BIOs, so no
  OpenSSL call ever blocks on the socket while holding the TLS lock and a
  reader waiting for data never stops a writer (OpenSSL does not allow one
  SSL object to read and write from two threads at once; the lock makes
  those calls take turns, each of them short).
* Lock order: the connection's write lock, then the TLS lock.  Both are
  leaves: nothing here calls into devices.
"""

import os
import socket
import ssl

from pydm.errors import PydmError
from pydm.lockdep import make_lock

_RAW_RECV = 256 << 10


class PlainTransport:
    tls = False

    def __init__(self, sock):
        self.sock = sock
        self.recv_into = sock.recv_into

    def recv_all_into(self, view, n) -> int:
        """Like recv_into, but one syscall waits for all ``n`` bytes: a 1 MiB
        payload otherwise arrives in dozens of pieces, each a GIL round trip."""
        return self.sock.recv_into(view, n, socket.MSG_WAITALL)

    def send(self, parts) -> None:
        sock = self.sock
        if len(parts) == 1:
            sock.sendall(parts[0])
            return
        total = 0
        for p in parts:
            total += len(p)
        sent = sock.sendmsg(parts)
        if sent != total:
            self._send_rest(parts, sent)

    def _send_rest(self, parts, sent):
        # A blocking sendmsg only stops short when a signal interrupts it
        # after some progress: rare, so this path may be slow.
        views = []
        for p in parts:
            v = memoryview(p).cast("B")
            if sent >= len(v):
                sent -= len(v)
                continue
            views.append(v[sent:])
            sent = 0
        while views:
            n = self.sock.sendmsg(views)
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if views and n:
                views[0] = views[0][n:]


class TLSTransport:
    tls = True

    def __init__(self, sock, context, wlock):
        self.sock = sock
        self.wlock = wlock
        self.lock = make_lock("nbd.conn.tls")
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)

    def _push_out(self):
        """Send whatever OpenSSL produced (caller holds the write lock)."""
        with self.lock:
            data = self.outgoing.read()
        if data:
            self.sock.sendall(data)

    def _pull_in(self) -> bool:
        raw = self.sock.recv(_RAW_RECV)
        if not raw:
            return False
        with self.lock:
            self.incoming.write(raw)
        return True

    def handshake(self) -> None:
        while True:
            try:
                with self.lock:
                    self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError:
                with self.wlock:       # let the client see our alert
                    try:
                        self._push_out()
                    except OSError:
                        pass
                raise
            with self.wlock:
                self._push_out()
            if not self._pull_in():
                raise ConnectionResetError("client closed the connection during TLS handshake")
        with self.wlock:
            self._push_out()

    def peer_subject(self) -> str:
        cert = self.obj.getpeercert()
        if not cert:
            return ""
        for rdn in cert.get("subject", ()):
            for key, value in rdn:
                if key == "commonName":
                    return value
        return ""

    def recv_into(self, view, n) -> int:
        while True:
            with self.lock:
                try:
                    return self.obj.read(n, view)
                except ssl.SSLWantReadError:
                    pending = self.outgoing.pending
                except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                    return 0
            if pending:
                with self.wlock:
                    self._push_out()
            if not self._pull_in():
                return 0

    recv_all_into = recv_into

    def send(self, parts) -> None:
        with self.lock:
            for p in parts:
                self.obj.write(p)
            data = self.outgoing.read()
        self.sock.sendall(data)

    def close_notify(self) -> None:
        try:
            with self.wlock:
                with self.lock:
                    self.obj.unwrap()
        except (ssl.SSLError, OSError, ValueError):
            pass
        try:
            with self.wlock:
                self._push_out()
        except OSError:
            pass


CERT_FILES = ("server-cert.pem", "server-key.pem")
CA_FILE = "ca-cert.pem"


def make_tls_context(cert_dir: str, verify_peer: bool = False) -> ssl.SSLContext:
    """A server context from a qemu/libnbd style certificate directory.

    ``server-cert.pem`` and ``server-key.pem`` are required.  With
    ``ca-cert.pem`` present, client certificates are checked against it when
    offered, and required with ``verify_peer``.
    """
    if not cert_dir:
        raise PydmError("TLS needs --tls-certificates DIR (with server-cert.pem and "
                        "server-key.pem)")
    cert, key = (os.path.join(cert_dir, f) for f in CERT_FILES)
    ca = os.path.join(cert_dir, CA_FILE)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise PydmError(f"cannot load TLS certificate {cert} / key {key}: {e}") from None
    if os.path.exists(ca):
        try:
            ctx.load_verify_locations(ca)
        except (OSError, ssl.SSLError) as e:
            raise PydmError(f"cannot load CA certificate {ca}: {e}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if verify_peer else ssl.CERT_OPTIONAL
    elif verify_peer:
        raise PydmError(f"--tls-verify-peer needs {ca}")
    return ctx


def set_nodelay(sock) -> None:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
