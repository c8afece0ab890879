"""Options and helpers shared by the client commands (``pydm dm``, ``pydm era``)."""

import json
import sys

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


def fail(message: str):
    raise CommandFailed(message)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
