"""zero: reads return zeroes, writes succeed and are dropped."""

from pydm.bio import READ
from pydm.caps import Caps
from pydm.store import EXTENT_HOLE, EXTENT_ZERO
from pydm.target import SUBMITTED, Target


class ZeroTarget(Target):
    name = "zero"
    version = (1, 2, 0)
    description = "read zeroes, discard writes"

    def ctr(self, args):
        super().ctr(args)
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1

    def capabilities(self):
        # Nothing is kept, so nothing is volatile: no flush or FUA to offer.
        # Zeroing is free.
        return Caps(discard=True, write_zeroes=True, fast_zero=True)

    def map(self, bio):
        if bio.op == READ:
            bio.data[:] = bytes(len(bio.data))
        bio.complete(0)
        return SUBMITTED

    def block_status(self, context, sector, nr_sectors):
        if context == "base:allocation":
            return [(nr_sectors, EXTENT_HOLE | EXTENT_ZERO)]
        return [(nr_sectors, 0)]


TARGET = ZeroTarget
