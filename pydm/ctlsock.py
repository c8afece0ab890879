"""The local control socket: JSON lines between ``pydm`` commands and the daemon.

Rules of this module: one request per line, ``{"op": NAME, "args": {...}}``;
one reply per line, ``{"ok": true, "result": ...}`` or ``{"ok": false,
"error": TEXT, "errno": N}``.  The server knows the ``Control`` object and a
table of handlers; it never formats output for people (the CLI does).  The
socket is a Unix socket created with mode 0600, so only its owner can drive
the daemon.  Each client connection gets a thread, so a long ``wait`` does
not hold up anyone else.
"""

import errno
import json
import logging
import os
import socket
import threading

from pydm import __version__
from pydm.ctlargs import check_request
from pydm.errors import DMError, PydmError, strerror
from pydm.lockdep import make_event, make_lock
from pydm.paths import socket_path
from pydm.sockets import Refusals, accept_loop, bind_unix, unlink_if_ours

log = logging.getLogger("pydm.control")

MAX_LINE = 16 << 20          # bytes in one request line
MAX_CONNECTIONS = 64         # control connections open at once


# --------------------------------------------------------------- handlers
def _h_create(c, a):
    c.create(a["name"], a.get("table"), a.get("uuid"), a.get("readonly", False), a.get("cwd"))


def _h_load(c, a):
    c.load(a["name"], a["table"], a.get("cwd"))


def _h_info(c, a):
    names = [a["name"]] if a.get("name") else c.names()
    return [c.info(n) for n in names]


def _lines(c, a, fn):
    names = [a["name"]] if a.get("name") else c.names()
    out = []
    for n in names:
        try:
            lines = fn(n)
        except DMError as e:
            if a.get("name") or e.errno != errno.ENXIO:
                raise
            continue      # removed while listing: skip it, as dmsetup does
        for start, length, ttype, text in lines:
            if a.get("target") and ttype != a["target"]:
                continue
            out.append({"name": n, "start": start, "length": length,
                        "target": ttype, "params": text})
    return out


def _h_ls(c, a):
    out = []
    for d in c.devices():
        if a.get("target"):
            with d.table_ref() as t:
                if t is None or all(x.name != a["target"] for x in t.targets):
                    continue
        info = d.info()
        out.append({"name": d.name, "major": info["major"], "minor": info["minor"],
                    "clients": info["clients"], "state": info["state"]})
    return out


HANDLERS = {
    "version": lambda c, a: {"version": __version__, "pid": os.getpid()},
    "create": _h_create,
    "load": _h_load,
    "resume": lambda c, a: c.resume(a["name"], a.get("noflush", False)),
    "suspend": lambda c, a: c.suspend(a["name"], a.get("noflush", False), a.get("timeout")),
    "remove": lambda c, a: c.remove(a["name"], a.get("force", False), a.get("deferred", False)),
    "clear": lambda c, a: c.clear(a["name"]),
    "rename": lambda c, a: c.rename(a["name"], a["new_name"]),
    "wipe_table": lambda c, a: c.wipe_table(a["name"]),
    "message": lambda c, a: c.message(a["name"], int(a.get("sector", 0)), a["text"]),
    "status": lambda c, a: _lines(c, a, c.status),
    "table": lambda c, a: _lines(c, a, lambda n: c.table(n, a.get("inactive", False))),
    "info": _h_info,
    "ls": _h_ls,
    "deps": lambda c, a: c.deps(a["name"]),
    "wait": lambda c, a: c.wait(a["name"], a.get("event_nr"), a.get("timeout")),
    "targets": lambda c, a: [{"name": n, "version": list(v), "description": d}
                             for n, v, d in c.targets.available()],
    "stores": lambda c, a: _stores(c),
}


def _stores(c):
    plugins, broken = c.stores.registry.plugins()
    out = [{"name": "dm", "schemes": ["dm"], "loaded": True}]    # devices: the core's own
    out += [{"name": n, "schemes": s, "loaded": True} for n, s in plugins]
    out += [{"name": n, "schemes": [], "loaded": False, "error": why}
            for n, why in sorted(broken.items())]
    return out


class ControlServer:
    def __init__(self, control, path: str, handlers=None,
                 max_connections: int = MAX_CONNECTIONS):
        self.control = control
        self.path = path
        self.handlers = dict(HANDLERS)
        if handlers:
            self.handlers.update(handlers)
        self.max_connections = max_connections
        self._sock = None
        self._identity = None
        self._thread = None
        self._closing = make_event()
        self._lock = make_lock("control.conns")
        self._conns = set()
        self._refusals = Refusals("control socket")

    def bind(self) -> None:
        """Claim the socket path (refusing one in use); accept nothing yet."""
        if self._sock is not None:
            return
        d = os.path.dirname(self.path)
        if d:
            try:
                os.makedirs(d, mode=0o700, exist_ok=True)
            except OSError as e:
                raise PydmError(f"cannot create the directory of the control socket "
                                f"{self.path}: {strerror(e.errno)}", e.errno) from None
        self._sock, self._identity = bind_unix(self.path, "control socket", 0o600, 64)

    def start(self) -> None:
        self.bind()
        self._thread = threading.Thread(
            target=accept_loop, name="pydm-control", daemon=True,
            args=(self._sock, self._closing, self._accepted, "control socket"))
        self._thread.start()

    def stop(self) -> None:
        self._closing.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        if self._identity is not None:
            unlink_if_ours(self.path, self._identity)
            self._identity = None

    def _accepted(self, conn, _addr):
        with self._lock:
            full = len(self._conns) >= self.max_connections
            if not full:
                self._conns.add(conn)
        if full:
            # Say why in the protocol's own words, then hang up: the client
            # reads this as the reply to whatever it sends first.
            self._refusals.refused(f"{self.max_connections} already open")
            try:
                conn.settimeout(0)
                conn.send(_encode({"ok": False, "errno": errno.EBUSY,
                                   "error": f"too many control connections "
                                            f"({self.max_connections} open); try again"}))
            except OSError:
                pass
            conn.close()
            return
        self._refusals.accepted()
        try:
            threading.Thread(target=self._serve, args=(conn,), name="pydm-control-conn",
                             daemon=True).start()
        except RuntimeError:          # no thread to be had: like a full table
            self._forget(conn)
            conn.close()

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline(MAX_LINE + 1)
                if not line:
                    return
                if len(line) > MAX_LINE:
                    # Too long: the whole line is refused, never cut in two.
                    while line and not line.endswith(b"\n"):
                        line = f.readline(MAX_LINE)
                    reply = _error(f"request longer than {MAX_LINE} bytes", errno.E2BIG)
                else:
                    reply = self.handle_line(line)
                conn.sendall(_encode(reply))
        except OSError:
            return
        finally:
            self._forget(conn)
            f.close()
            conn.close()

    def handle_line(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
        except RecursionError:
            return _error("malformed request: nested too deeply")
        except ValueError as e:          # includes UnicodeDecodeError
            return _error(f"malformed request: {e}")
        try:
            op, args = check_request(req, self.handlers)
        except PydmError as e:
            return _error(str(e), e.errno)
        handler = self.handlers[op]
        try:
            return {"ok": True, "result": handler(self.control, args)}
        except PydmError as e:
            return _error(str(e), e.errno)
        except KeyError as e:
            return _error(f"missing argument {e}")
        except Exception as e:     # a bug: report it, keep the daemon alive
            log.exception("control command %s failed", op)
            return _error(f"internal error in {op}: {e!r}", errno.EIO)


def _error(text, err=errno.EINVAL) -> dict:
    return {"ok": False, "error": text, "errno": err}


def _encode(reply) -> bytes:
    return json.dumps(reply).encode() + b"\n"


class ControlError(PydmError):
    """A command the daemon refused; carries the daemon's errno."""


class ControlClient:
    def __init__(self, path: str = None, timeout=None):
        self.path = socket_path(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # A blocking connect waits for room in a busy daemon's backlog;
            # the timeout is for the replies.
            sock.connect(self.path)
            sock.settimeout(timeout)
        except OSError as e:
            sock.close()
            raise PydmError(f"cannot reach the pydm daemon at {self.path}: "
                            f"{strerror(e.errno)} (is `pydm serve` running? "
                            f"--socket / PYDM_SOCKET choose another)", e.errno) from None
        self._sock = sock
        self._file = sock.makefile("rb")

    def call(self, op: str, **args):
        msg = json.dumps({"op": op, "args": args}).encode() + b"\n"
        try:
            self._sock.sendall(msg)
        except OSError as e:
            # The daemon may have refused the connection with a reply first.
            line = self._pending_line()
            if not line:
                raise PydmError(f"lost the connection to the pydm daemon: "
                                f"{strerror(e.errno)}", e.errno or errno.EPIPE) from None
        else:
            line = self._read_line()
        return self._result(line)

    def _pending_line(self):
        try:
            self._sock.settimeout(1)
            return self._file.readline(MAX_LINE)
        except OSError:
            return b""

    def _read_line(self):
        try:
            return self._file.readline(MAX_LINE)
        except OSError as e:
            raise PydmError(f"lost the connection to the pydm daemon: {strerror(e.errno)}",
                            e.errno or errno.EPIPE) from None

    @staticmethod
    def _result(line):
        if not line:
            raise PydmError("the pydm daemon closed the connection", errno.EPIPE)
        try:
            reply = json.loads(line)
        except ValueError:
            raise PydmError("the pydm daemon sent a malformed reply", errno.EPROTO) from None
        if not reply.get("ok"):
            raise ControlError(reply.get("error", "failed"), reply.get("errno", errno.EIO))
        return reply.get("result")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
