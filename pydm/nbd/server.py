"""NBD server: the listener service of a pydm daemon.

Rules of this module:

* ``NBDServer`` owns the listeners, the accept threads (``pydm.sockets``'
  ``accept_loop``, which survives running out of descriptors) and the set
  of connections; each connection is a ``Connection`` (``connection.py``)
  with its own threads.  Protocol decisions are the codec's
  (``protocol.py``), moving bytes and building bios the connection's.
* Everything connections share lives here and is safe to share: the export
  ``Catalog``, the TLS context, the buffer pool and the memory budget every
  connection draws from beyond its reserve (``admission.py``).
* At most ``max_connections`` at once; one over is refused at accept, as is
  any while stopping, logged once per episode (``Refusals``).
* ``stop`` closes the listeners, asks every connection to shut down, wakes
  whoever waits for memory and joins the threads, each with a bound.
* Lock (a leaf, made by ``pydm.lockdep``): ``nbd.server`` guards the
  connection set, held only to look at or change it (and to build the
  connection that joins it), never while calling into a device.  The
  connections' own locks are listed in ``connection.py``.
"""

import errno
import logging
import socket
import threading

from pydm.errors import PydmError
from pydm.lockdep import make_event, make_lock
from pydm.nbd.admission import (CONNECTION_RESERVE, MAX_INFLIGHT_BYTES, SERVER_BUDGET,
                                ServerBudget)
from pydm.buffers import BufferPool
from pydm.nbd.connection import STOP_DRAIN_TIMEOUT, Connection
from pydm.nbd.exports import Catalog
from pydm.nbd.handshake import TLS_MODES
from pydm.nbd.reader import POLL_MAX
from pydm.nbd.transport import make_tls_context, set_nodelay
from pydm.nbd.workers import DEFAULT_WORKERS
from pydm.sockets import Refusals, accept_loop, bind_unix, unlink_if_ours

log = logging.getLogger("pydm.nbd")

DEFAULT_PORT = 10809
HANDSHAKE_LIMIT = 10.0         # s for the whole handshake (qemu-nbd's default)
MAX_CONNECTIONS = 256
AIO_MODES = ("auto", "off")


class NBDServer:
    """The NBD listener service of a pydm daemon (``start()`` / ``stop()``).

    ``listen`` is a list of ("tcp", host, port) and ("unix", path) entries.
    ``aio`` is how a read that misses the page cache is served: "auto" on
    the connection's io_uring where the kernel allows one, "off" inline.
    ``poll_max`` (seconds) is the longest a connection's reader polls its
    socket before it sleeps (0: never polls).
    ``handshake_limit`` bounds the whole handshake in seconds; the memory
    bounds are admission.py's (per connection, its reserve, and the budget
    every connection draws from beyond its reserve).
    """

    def __init__(self, control, listen=(("tcp", "127.0.0.1", DEFAULT_PORT),),
                 tls="off", tls_certificates=None, tls_verify_peer=False,
                 default_export=None, readonly=False, workers=DEFAULT_WORKERS,
                 handshake_limit=HANDSHAKE_LIMIT, max_connections=MAX_CONNECTIONS,
                 max_inflight_bytes=MAX_INFLIGHT_BYTES, reserve=CONNECTION_RESERVE,
                 budget=SERVER_BUDGET, aio="auto", poll_max=POLL_MAX):
        if tls not in TLS_MODES:
            raise PydmError(f"--tls must be one of {', '.join(TLS_MODES)}")
        self.control = control
        self.listen = list(listen)
        self.tls_mode = tls
        self.ssl_context = None
        if tls != "off":
            self.ssl_context = make_tls_context(tls_certificates, tls_verify_peer)
        self.catalog = Catalog(control, default_export, readonly)
        self.workers = workers
        if aio not in AIO_MODES:
            raise PydmError(f"--aio must be one of {', '.join(AIO_MODES)}")
        self.aio = aio              # uncached reads: "auto" (io_uring where it works) or "off"
        if not 0 <= poll_max <= 0.01:
            raise PydmError("--poll-max-us must be between 0 and 10000")
        self.poll_max = poll_max
        self.handshake_limit = handshake_limit
        self.max_connections = max_connections
        self.max_inflight_bytes = max_inflight_bytes
        self.reserve = reserve
        self.budget = ServerBudget(budget)
        self.pool = BufferPool()
        self._closing = make_event()
        self._refusals = Refusals("NBD server")
        self._lock = make_lock("nbd.server")
        self._conns = set()
        self._listeners = []
        self._threads = []
        self.addresses = []        # what we really bound (port 0 resolved)

    @property
    def stopping(self) -> bool:
        return self._closing.is_set()

    # -------------------------------------------------------- lifecycle
    def bind(self):
        """Take every listening socket (once): a daemon does this before
        it opens a device, so a second daemon on the same port or socket
        stops without touching the first one's files."""
        if self._listeners:
            return
        try:
            for entry in self.listen:
                self._listeners.append(self._bind(entry))
        except BaseException:
            self._close_listeners()
            raise

    def start(self):
        self.bind()
        for sock, label, _ident in self._listeners:
            t = threading.Thread(target=accept_loop, daemon=True,
                                 name=f"pydm-nbd-accept {label}",
                                 args=(sock, self._closing,
                                       lambda c, a, ls=sock: self._accepted(ls, c, a),
                                       f"NBD {label}"))
            t.start()
            self._threads.append(t)
            log.info("NBD listening on %s%s", label,
                     f" (TLS {self.tls_mode})" if self.tls_mode != "off" else "")

    def _bind(self, entry):
        if entry[0] == "unix":
            path = entry[1]
            sock, ident = bind_unix(path, "NBD socket", backlog=128)
            self.addresses.append(("unix", path))
            return sock, f"unix:{path}", (path, ident)
        _kind, host, port = entry
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, stype, proto, _c, addr = infos[0]
            sock = socket.socket(family, stype, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as e:
            raise PydmError(f"cannot listen on {host}:{port}: "
                            f"{e.strerror or e}", e.errno or errno.EINVAL) from None
        sock.listen(128)
        bound = sock.getsockname()
        self.addresses.append(("tcp", bound[0], bound[1]))
        where = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        return sock, f"{where}:{bound[1]}", None

    def stop(self):
        self._closing.set()
        self._close_listeners()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown()
        self.budget.wake()
        for c in conns:
            c.thread.join(STOP_DRAIN_TIMEOUT + 5)
        for t in self._threads:
            t.join(5)

    def _close_listeners(self):
        for sock, _label, owned in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            if owned is not None:
                unlink_if_ours(*owned)
        self._listeners = []

    def _accepted(self, lsock, sock, addr):
        if lsock.family == socket.AF_UNIX:
            peer = f"unix:{sock.fileno()}"
        elif lsock.family == socket.AF_INET6:
            peer = f"[{addr[0]}]:{addr[1]}"
        else:
            peer = f"{addr[0]}:{addr[1]}"
        with self._lock:
            full = len(self._conns) >= self.max_connections or self.stopping
            if not full:
                set_nodelay(sock)
                conn = Connection(self, sock, peer)
                self._conns.add(conn)
        refusals = self._refusals
        if full:
            refusals.refused(f"{self.max_connections} connections already (first: {peer})")
            sock.close()
            return
        try:
            conn.thread.start()
        except RuntimeError:         # no thread to be had now: as if full
            refusals.refused(f"cannot start a thread (first: {peer})")
            self.forget(conn)
            sock.close()
            return
        refusals.accepted()

    def forget(self, conn):
        """A connection is over (it calls this itself, last)."""
        with self._lock:
            self._conns.discard(conn)

    def connections(self):
        with self._lock:
            return [c.peer for c in self._conns]

    def memory(self) -> dict:
        """In-flight payload: the shared budget's use, and each connection's
        requests and bytes (for ``pydm`` status and the tests)."""
        with self._lock:
            conns = list(self._conns)
        return {"budget": self.budget.limit, "budget_used": self.budget.used,
                "connections": [c.memory() for c in conns]}

    def uri(self, export="") -> str:
        """An nbd:// URI for the first listener (for messages and tests)."""
        if not self.addresses:
            return ""
        scheme = "nbds" if self.tls_mode == "require" else "nbd"
        a = self.addresses[0]
        if a[0] == "unix":
            return f"{scheme}+unix:///{export}?socket={a[1]}"
        host = f"[{a[1]}]" if ":" in a[1] else a[1]
        return f"{scheme}://{host}:{a[2]}/{export}"
