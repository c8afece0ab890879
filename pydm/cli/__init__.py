"""The ``pydm`` command: one argparse front end, one module per command group.

Each group module (``serve``, ``dm``, ``era``) exposes ``register(subparsers)``
which adds its parser(s) and sets ``func`` on each leaf; ``func(args)`` returns
an exit status.  A ``PydmError`` anywhere below becomes one line on stderr and
exit status 1: users never see a traceback for their own mistakes.
"""

import argparse
import importlib
import sys

from pydm import __version__
from pydm.errors import PydmError

GROUPS = ("serve", "dm", "era", "wb", "lw", "rv")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error exits 1 like every other pydm failure."""

    def error(self, message):
        self.print_usage(sys.stderr)
        self.exit(1, f"{self.prog}: error: {message}\n")


def build_parser(only=None) -> argparse.ArgumentParser:
    """The full parser, or with ``only`` just that group's commands: a
    command line names its group first, and importing the other groups
    (sockets, the daemon) would cost a one-shot tool like
    ``pydm era invalidate`` a good part of its run time."""
    parser = _Parser(
        prog="pydm",
        description="pydm: a userspace device-mapper served over NBD.",
    )
    parser.add_argument("--version", action="version", version=f"pydm {__version__}")
    sub = parser.add_subparsers(dest="group", metavar="COMMAND", required=True)
    for name in GROUPS:
        if only is None or name == only:
            importlib.import_module(f"pydm.cli.{name}").register(sub)
    return parser


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    # Table output may hold path bytes that are not UTF-8 (surrogate
    # escapes): print them as the bytes they were.
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser(argv[0] if argv and argv[0] in GROUPS else None)
    args = parser.parse_args(argv)
    try:
        rc = args.func(args)
    except PydmError as e:
        print(f"pydm: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    return rc or 0
