"""The target ops vector: what every target plugin implements.

Rules of this module: the core only ever talks to a target through the
methods of ``Target``; a target only talks to the core through the
``TableContext`` it is given (devices, events, quiesce).  A target reports
failures as errno values (I/O) or ``TargetError`` (constructor, messages);
only the NBD layer turns errnos into wire codes.

Lifecycle, as in the kernel's ``struct target_type``:
``__init__`` (= ctr: parse args, open devices, set knobs; raise TargetError),
``dtr`` (must cope with a half-built target; called exactly once),
``map`` / ``end_io`` per bio fragment, ``presuspend`` / ``presuspend_undo`` /
``postsuspend`` / ``preresume`` / ``resume`` around suspend, ``status``,
``message``, ``iterate_devices``, ``capabilities`` / ``io_hints``.

Capabilities (``pydm.caps``) are asked, not assumed: by default a target
offers what the devices it maps onto offer (``iterate_devices``), narrowed by
its knobs (no flush without ``num_flush_bios``, no discard without
``num_discard_bios``...), then adjusted by ``io_hints``.  A target with no
device below, or one that changes what reaches it (a cache), overrides
``capabilities``.  The NBD export's flags and block sizes come from here.
"""

import errno

from pydm.caps import Caps, combine
from pydm.errors import TargetError

# map() results (DM_MAPIO_*).
SUBMITTED = 0      # the target owns the bio and will complete or resubmit it
REMAPPED = 1       # bio.dev / bio.sector were changed: the core submits it there
REQUEUE = 2        # hand back: held if noflush-suspending, else EIO
DELAY_REQUEUE = 3  # like REQUEUE
KILL = 4           # fail with EIO

# end_io() results (DM_ENDIO_*).
DONE = 0
ENDIO_REQUEUE = 2

# Feature bits (DM_TARGET_*).
SINGLETON = 1          # must be the only target in its table
ALWAYS_WRITEABLE = 2   # refuses read-only tables
IMMUTABLE = 4          # the table may not later be replaced by other types
NOWAIT = 8             # passes REQ_NOWAIT down as is on what it remaps, and
                       # takes an EAGAIN from below as no fault (only "retry
                       # where blocking is fine"); what it reads by itself may
                       # still block.  The router strips REQ_NOWAIT from bios
                       # bound for any other target.

STATUS_INFO = "info"
STATUS_TABLE = "table"


class Target:
    """Base class of every target; subclass it and register by entry point."""

    name = None
    version = (1, 0, 0)
    features = 0
    # The kernel's "type" doc string, shown by ``pydm dm targets``.
    description = ""

    def __init__(self, ctx, begin: int, length: int, args: list):
        self.ctx = ctx
        self.begin = begin
        self.len = length
        # Knobs a constructor may change (the kernel's dm_target fields).
        self.max_io_len = 0            # 0 = no split grid
        self.num_flush_bios = 1
        self.num_discard_bios = 0
        self.num_write_zeroes_bios = 0
        self.split_discard_bios = False
        self.error = None
        self.ctr(args)

    # -- construction ---------------------------------------------------
    def ctr(self, args: list) -> None:
        if args:
            raise TargetError("Invalid argument count")

    def dtr(self) -> None:
        pass

    # -- I/O --------------------------------------------------------------
    def map(self, bio) -> int:
        return KILL

    # Override to see completions; ``status`` is 0 or an errno.  Return
    # (DONE, status) to pass it on (possibly rewritten) or (ENDIO_REQUEUE, 0).
    end_io = None

    # -- suspend / resume ------------------------------------------------
    def presuspend(self) -> None:
        pass

    def presuspend_undo(self) -> None:
        pass

    def postsuspend(self) -> None:
        pass

    def preresume(self) -> None:
        pass

    def resume(self) -> None:
        pass

    # -- queries and control ---------------------------------------------
    def status(self, type_: str) -> str:
        return ""

    def message(self, argv: list):
        raise TargetError(f"{self.name}: unrecognised message", errno.EINVAL)

    def iterate_devices(self):
        """[(device, start_sector, nr_sectors)] for each underlying region."""
        return []

    def capabilities(self) -> Caps:
        """What this target offers now (asked at each NBD handshake)."""
        devs = [d for d, _s, _n in self.iterate_devices()]
        below = combine(d.capabilities() for d in devs) if devs else Caps()
        caps = below.narrowed(flush=self.num_flush_bios > 0, fua=self.num_flush_bios > 0,
                              discard=self.num_discard_bios > 0,
                              write_zeroes=self.num_write_zeroes_bios > 0)
        self.io_hints(caps)
        caps.settle()
        return caps

    def io_hints(self, caps: Caps) -> None:
        """Adjust block-size hints on this target's ``caps`` in place (the
        kernel's io_hints: era prefers its block size)."""

    # Block status for NBD metadata contexts.  ``contexts()`` names extra
    # contexts this target publishes (e.g. era's changed-block views);
    # ``block_status`` answers [(nr_sectors, flags)] runs for a range
    # relative to the device, starting at ``sector``.
    def contexts(self):
        return []

    def accepts_context(self, name: str) -> bool:
        return name in self.contexts()

    def block_status(self, context: str, sector: int, nr_sectors: int):
        return [(nr_sectors, 0)]

    # -- helpers for subclasses ------------------------------------------
    def target_sector(self, sector: int) -> int:
        return sector - self.begin

    def __repr__(self):
        return f"<{self.name} {self.begin}+{self.len}>"


def parse_uint(text: str, what: str, limit: int = 1 << 64) -> int:
    """Strict unsigned integer parse, like the kernel's sscanf("%llu%c")."""
    if not text.isdigit() or not text.isascii():
        raise TargetError(f"Invalid {what}: {text!r}")
    value = int(text)
    if value >= limit:
        raise TargetError(f"Invalid {what}: {text} out of range")
    return value
