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
from pydm.errors import DMError, PydmError, strerror
from pydm.paths import default_socket_path  # noqa: F401 (re-exported)

log = logging.getLogger("pydm.control")

MAX_LINE = 16 << 20


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
}


class ControlServer:
    def __init__(self, control, path: str, handlers=None):
        self.control = control
        self.path = path
        self.handlers = dict(HANDLERS)
        if handlers:
            self.handlers.update(handlers)
        self._sock = None
        self._thread = None
        self._closing = False
        self._conns = set()

    def start(self) -> None:
        d = os.path.dirname(self.path)
        if d:
            os.makedirs(d, mode=0o700, exist_ok=True)
        if os.path.exists(self.path):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(self.path)
            except OSError:
                os.unlink(self.path)        # stale socket of a dead daemon
            else:
                probe.close()
                raise PydmError(f"another pydm daemon is already listening on {self.path}",
                                errno.EADDRINUSE)
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(self.path)
        except OSError as e:
            sock.close()
            raise PydmError(f"cannot create control socket {self.path}: "
                            f"{strerror(e.errno)}", e.errno) from None
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(64)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name="pydm-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._closing = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        for conn in list(self._conns):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)
        try:
            os.unlink(self.path)
        except OSError:
            pass

    def _accept(self):
        while not self._closing:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn,), name="pydm-control-conn",
                             daemon=True).start()

    def _serve(self, conn):
        f = conn.makefile("rb")
        try:
            while True:
                line = f.readline(MAX_LINE)
                if not line:
                    return
                reply = self.handle_line(line)
                conn.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            return
        finally:
            self._conns.discard(conn)
            f.close()
            conn.close()

    def handle_line(self, line: bytes) -> dict:
        try:
            req = json.loads(line)
            op = req["op"]
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ValueError("args must be an object")
        except (ValueError, KeyError, TypeError) as e:
            return {"ok": False, "error": f"malformed request: {e}", "errno": errno.EINVAL}
        handler = self.handlers.get(op)
        if handler is None:
            return {"ok": False, "error": f"unknown command {op!r}", "errno": errno.EINVAL}
        try:
            return {"ok": True, "result": handler(self.control, args)}
        except PydmError as e:
            return {"ok": False, "error": str(e), "errno": e.errno}
        except KeyError as e:
            return {"ok": False, "error": f"missing argument {e}", "errno": errno.EINVAL}
        except (ValueError, TypeError) as e:
            return {"ok": False, "error": f"bad argument: {e}", "errno": errno.EINVAL}
        except Exception as e:     # a bug: report it, keep the daemon alive
            log.exception("control command %s failed", op)
            return {"ok": False, "error": f"internal error in {op}: {e!r}",
                    "errno": errno.EIO}


class ControlError(PydmError):
    """A command the daemon refused; carries the daemon's errno."""


class ControlClient:
    def __init__(self, path: str = None, timeout=None):
        self.path = path or default_socket_path()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
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
            line = self._file.readline(MAX_LINE)
        except OSError as e:
            raise PydmError(f"lost the connection to the pydm daemon: {strerror(e.errno)}",
                            e.errno or errno.EPIPE) from None
        if not line:
            raise PydmError("the pydm daemon closed the connection", errno.EPIPE)
        reply = json.loads(line)
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
