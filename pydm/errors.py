"""Errors shared by every layer, and the one errno -> NBD reply code map.

Rules of this module: it imports nothing from pydm, so any layer may use it.
Targets and stores report failures as errno values; only the NBD layer turns
them into wire codes, through ``nbd_error``.
"""

import errno as _errno
import os


class PydmError(Exception):
    """A failure a user can act on: printed as one line, never a traceback.

    ``errno`` is the closest errno value (EINVAL for bad input) so the
    control socket and the CLI can report it the way dmsetup does.
    """

    def __init__(self, message: str, errno: int = _errno.EINVAL):
        super().__init__(message)
        self.errno = errno

    @property
    def message(self) -> str:
        return str(self)


class DMError(PydmError):
    """A refused device-mapper control operation (bad table, wrong state...)."""


class TargetError(PydmError):
    """Raised by a target constructor or message handler."""


def strerror(err: int) -> str:
    try:
        return os.strerror(err)
    except ValueError:
        return f"error {err}"


# NBD reply codes are the Linux errno numbers for a small fixed set; anything
# else is reported as EIO (the NBD spec says clients treat unknown values as
# EINVAL, so never send them).
NBD_EPERM, NBD_EIO, NBD_ENOMEM, NBD_EINVAL = 1, 5, 12, 22
NBD_ENOSPC, NBD_EOVERFLOW, NBD_ENOTSUP, NBD_ESHUTDOWN = 28, 75, 95, 108

_NBD_MAP = {
    _errno.EPERM: NBD_EPERM,
    _errno.EROFS: NBD_EPERM,
    _errno.EACCES: NBD_EPERM,
    _errno.EIO: NBD_EIO,
    _errno.ENOMEM: NBD_ENOMEM,
    _errno.EINVAL: NBD_EINVAL,
    _errno.ENOSPC: NBD_ENOSPC,
    _errno.EDQUOT: NBD_ENOSPC,
    _errno.EFBIG: NBD_ENOSPC,
    _errno.EOVERFLOW: NBD_EOVERFLOW,
    _errno.EOPNOTSUPP: NBD_ENOTSUP,
    _errno.ESHUTDOWN: NBD_ESHUTDOWN,
}


def nbd_error(err: int) -> int:
    """Map an errno (positive) to the NBD reply error code."""
    if not err:
        return 0
    return _NBD_MAP.get(abs(err), NBD_EIO)
