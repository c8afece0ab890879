"""The NBD store plugin: ``nbd://``, ``nbds://``, ``nbd+unix://`` and
``nbds+unix://`` store arguments, opened as ``NbdStore``.

Rules of this module: ``parse`` does no I/O (but the socket's realpath, for
its identity) and raises ``PydmError`` with one line for a bad argument;
``open`` connects, all or nothing: a store, or ``PydmError`` with one line
and nothing left open.  ``nbd`` (libnbd's Python module) is imported only
by ``open``, so parsing works, and says so, where libnbd is missing.
"""

import errno

from pydm.errors import PydmError

from .uri import parse_spec


class NbdPlugin:
    name = "nbd"
    schemes = ("nbd", "nbds", "nbd+unix", "nbds+unix")

    def parse(self, arg: str, cwd=None):
        return parse_spec(arg, cwd, self.name)

    def open(self, spec, readonly: bool):
        try:
            from .store import NbdStore
        except ImportError as e:
            raise PydmError(f"cannot open {spec.ref}: libnbd's Python module is "
                            f"missing ({e})", errno.ENOSYS) from None
        return NbdStore(spec, readonly)


PLUGIN = NbdPlugin()
