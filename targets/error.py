"""error: every bio fails with EIO (used to wipe a table, and in tests)."""

from pydm.caps import Caps
from pydm.target import KILL, Target


class ErrorTarget(Target):
    name = "error"
    version = (1, 6, 0)
    description = "fail every I/O with EIO"

    def ctr(self, args):
        super().ctr(args)
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1

    def capabilities(self):
        # It takes every kind of request, and fails it; nothing is kept, so
        # no flush or FUA to offer.
        return Caps(discard=True, write_zeroes=True, extents=False)

    def map(self, bio):
        return KILL


TARGET = ErrorTarget
