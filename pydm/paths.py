"""Where pydm keeps its control socket, and the checks that keep it private.

Rules of this module: it imports nothing but ``os`` and ``pydm.errors`` (every
CLI command needs the socket path for its help text; most never open it), and
``default_socket_path`` only computes: it never creates or checks anything.

The default socket is ``control.sock`` in pydm's runtime directory:

* ``/run/pydm`` for root;
* else ``$XDG_RUNTIME_DIR/pydm`` when ``$XDG_RUNTIME_DIR`` is a directory of
  ours that we may write;
* else the fallback ``${TMPDIR:-/tmp}/pydm-UID``.

That directory is pydm's own, so it is held to what ssh-agent and tmux hold
theirs to: the daemon creates it mode 0700, and both the daemon and every
client refuse it when it is not a real directory, is owned by another user
or is open to group or others (someone could swap the socket and capture
commands).  ``$PYDM_SOCKET`` and ``--socket`` name a path the user chose, and
its directory is the user's business.
"""

import errno
import os
import stat

from pydm.errors import PydmError

SOCKET_NAME = "control.sock"


def _usable_runtime_base(path) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid()
            and os.access(path, os.W_OK | os.X_OK))


def runtime_dir() -> str:
    """pydm's runtime directory for this user (computed, not created)."""
    if os.geteuid() == 0:
        return "/run/pydm"
    run = os.environ.get("XDG_RUNTIME_DIR")
    if run and _usable_runtime_base(run):
        return os.path.join(run, "pydm")
    tmp = os.environ.get("TMPDIR") or "/tmp"
    return os.path.join(tmp, f"pydm-{os.geteuid()}")


def default_socket_path() -> str:
    return os.environ.get("PYDM_SOCKET") or os.path.join(runtime_dir(), SOCKET_NAME)


def check_private_dir(path: str, create: bool = False) -> None:
    """Refuse a directory another user could use to intercept pydm.

    With ``create`` a missing directory is made mode 0700 (its parent must
    exist).  Raises ``PydmError`` with one line saying what is wrong.
    """
    if create:
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        except OSError as e:
            raise PydmError(f"cannot create pydm's runtime directory {path}: "
                            f"{os.strerror(e.errno)}", e.errno) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return                       # a client: nobody serves there yet
    except OSError as e:
        raise PydmError(f"cannot use pydm's runtime directory {path}: "
                        f"{os.strerror(e.errno)}", e.errno) from None
    fix = "; remove it, or choose a socket with --socket or PYDM_SOCKET"
    if not stat.S_ISDIR(st.st_mode):
        raise PydmError(f"unsafe runtime directory {path}: it is not a directory{fix}",
                        errno.ENOTDIR)
    if st.st_uid != os.geteuid():
        raise PydmError(f"unsafe runtime directory {path}: owned by uid {st.st_uid}, "
                        f"not by you (uid {os.geteuid()}){fix}", errno.EACCES)
    if st.st_mode & 0o077:
        raise PydmError(f"unsafe runtime directory {path}: mode "
                        f"{stat.S_IMODE(st.st_mode):04o} lets others in (it must be "
                        f"0700){fix}", errno.EACCES)


def socket_path(explicit: str = None, create: bool = False) -> str:
    """The control socket to use: ``explicit`` (``--socket``) or the default.

    The default's directory, when it is pydm's own runtime directory, is
    checked (and with ``create``, made) first.
    """
    if explicit:
        return explicit
    if os.environ.get("PYDM_SOCKET"):
        return os.environ["PYDM_SOCKET"]
    d = runtime_dir()
    check_private_dir(d, create)
    return os.path.join(d, SOCKET_NAME)
