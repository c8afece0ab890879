"""Listening sockets: Unix sockets that never clobber a file, and accept
loops that survive running out of descriptors.

Rules of this module (shared by the control socket and the NBD server):

* A path is only ever removed when it is a *stale* socket: a socket on which
  nobody answers (connect says ECONNREFUSED).  A regular file, a directory,
  or a socket somebody is listening on is refused with one line and left
  alone.
* On exit a listener removes its path only if the path is still the very
  socket it created (same device and inode), so a daemon that exits never
  removes a newer daemon's socket.
* An accept loop returns only when its owner is closing.  Any other accept
  error is survived: out of descriptors or memory is logged once per episode
  and retried with a growing back-off (the pending clients wait in the
  backlog meanwhile), anything else is retried at once.
"""

import errno
import logging
import os
import socket
import stat

from pydm.errors import PydmError, strerror

log = logging.getLogger("pydm.sockets")

# Errors that mean "no resources now": wait, then accept again.
_RESOURCE_ERRORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BACKOFF_MIN = 0.01
BACKOFF_MAX = 1.0
PROBE_TIMEOUT = 1.0


def _probe(path) -> bool:
    """True if a process accepts connections on the Unix socket ``path``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(PROBE_TIMEOUT)
    try:
        s.connect(path)
    except ConnectionRefusedError:
        return False
    except OSError:
        return True            # EAGAIN (full backlog), EACCES...: somebody is there
    finally:
        s.close()
    return True


def bind_unix(path: str, what: str, mode: int = None, backlog: int = 128):
    """Bind and listen on a Unix socket at ``path``; returns (sock, identity).

    ``what`` names the socket in messages ("control socket"); ``mode`` (e.g.
    0o600) is applied atomically through the umask.  ``identity`` is what
    ``unlink_if_ours`` needs to remove exactly this socket later.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise PydmError(f"cannot use {path} for the {what}: {strerror(e.errno)}",
                        e.errno) from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise PydmError(f"cannot use {path} for the {what}: it exists and is not a "
                            f"socket (pydm never replaces other files)", errno.EEXIST)
        if _probe(path):
            raise PydmError(f"cannot use {path} for the {what}: another process is "
                            f"already listening on it", errno.EADDRINUSE)
        try:
            os.unlink(path)               # a stale socket: nobody answers on it
        except FileNotFoundError:
            pass
        except OSError as e:
            raise PydmError(f"cannot remove the stale socket {path}: "
                            f"{strerror(e.errno)}", e.errno) from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode) if mode is not None else None
    try:
        sock.bind(path)
        st = os.lstat(path)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            msg = "another process took it first"
        else:
            msg = strerror(e.errno)
        raise PydmError(f"cannot create the {what} {path}: {msg}", e.errno) from None
    finally:
        if old is not None:
            os.umask(old)
    sock.listen(backlog)
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, identity) -> bool:
    """Remove ``path`` if it is still the socket ``bind_unix`` made."""
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != tuple(identity):
            return False
        os.unlink(path)
        return True
    except OSError:
        return False


def accept_loop(lsock, closing, on_accept, label: str) -> None:
    """Accept on ``lsock`` until ``closing`` (a ``threading.Event``) is set.

    ``on_accept(sock, addr)`` owns the new socket.  Never returns on an
    error while the owner still wants connections.
    """
    delay = 0
    failures = 0
    while not closing.is_set():
        try:
            sock, addr = lsock.accept()
        except OSError as e:
            if closing.is_set():
                return
            failures += 1
            if e.errno in _RESOURCE_ERRORS:
                if failures == 1:
                    log.warning("%s: cannot accept connections: %s; retrying with back-off",
                                label, strerror(e.errno))
                delay = min(BACKOFF_MAX, max(BACKOFF_MIN, delay * 2))
            elif e.errno in (errno.EBADF, errno.EINVAL, errno.ENOTSOCK):
                log.error("%s: listening socket is gone (%s); not accepting any more",
                          label, strerror(e.errno))
                return
            else:
                if failures == 1:
                    log.info("%s: accept failed: %s", label, strerror(e.errno or errno.EIO))
                delay = BACKOFF_MIN
            closing.wait(delay)
            continue
        if failures:
            log.warning("%s: accepting again after %d failed attempts", label, failures)
            failures = 0
            delay = 0
        on_accept(sock, addr)


class Refusals:
    """Logs refused connections once per episode, not once per connection:
    a flood of clients past a cap must not flood the log too."""

    def __init__(self, label: str):
        self.label = label
        self.count = 0

    def refused(self, why: str) -> None:
        self.count += 1
        if self.count == 1:
            log.warning("%s: refusing connections: %s", self.label, why)

    def accepted(self) -> None:
        if self.count:
            log.warning("%s: accepting connections again (%d refused)", self.label,
                        self.count)
            self.count = 0
