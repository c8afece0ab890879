"""Options and helpers shared by the commands (``pydm dm``, ``pydm era``,
``pydm wb``): client options, one-line failures, JSON output, a progress bar."""

import json
import sys
import time

from pydm.paths import default_socket_path
from pydm.errors import PydmError


def add_client_options(p) -> None:
    p.add_argument("--socket", metavar="PATH",
                   help="daemon control socket (default: $PYDM_SOCKET or "
                        f"{default_socket_path()})")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")


def client(args):
    """A ControlClient (imported here: offline commands never need sockets)."""
    from pydm.ctlsock import ControlClient
    return ControlClient(getattr(args, "socket", None))


class CommandFailed(PydmError):
    pass


def open_file(path, readonly=True):
    """A FileStore for an offline tool; one opened for writing is held
    (refused while a daemon or another tool writes the file)."""
    from pydm.store import FileStore
    store = FileStore(path, readonly=readonly)
    if not readonly:
        try:
            store.hold_for_writing()
        except PydmError:
            store.close()
            raise
    return store


def fail(message: str):
    raise CommandFailed(message)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


class Progress:
    """A bar on stderr while it is a terminal; else only a final line."""

    WIDTH = 30

    def __init__(self, what, total, unit="blocks"):
        self.what, self.total, self.unit = what, total, unit
        self.done = 0
        self.tty = sys.stderr.isatty()
        self.shown = 0.0

    def update(self, done, total=None):
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if self.tty and (now - self.shown > 0.1 or done >= self.total):
            self.shown = now
            sys.stderr.write(f"\r{self._line()}")
            sys.stderr.flush()

    def _line(self):
        total = max(self.total, self.done)
        fill = self.WIDTH * self.done // total if total else self.WIDTH
        return (f"{self.what}: [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                f"{self.done}/{total} {self.unit}")

    def finish(self, ok=True):
        """End the bar: a newline on a terminal, the final state elsewhere
        (nothing after a failure, whose one line says it all)."""
        if self.tty:
            sys.stderr.write(f"\r{self._line()}\n" if ok else "\n")
        elif ok:
            sys.stderr.write(f"{self._line()}\n")
        sys.stderr.flush()
