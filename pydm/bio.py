"""The bio: one I/O request flowing down a stack of devices.

Rules of this module: a Bio is plain data plus one completion callback.  It
knows nothing of tables, targets or sockets.  Units are 512-byte sectors;
``data`` is a writable buffer of exactly ``nr_sectors << 9`` bytes for READ
(the target fills it) and WRITE (the payload), and None for every other op.

Completion happens exactly once: ``complete()`` drops the callback before it
calls it, so a second call is a loud bug instead of a silent double reply.
"""

from itertools import count

SECTOR_SHIFT = 9
SECTOR_SIZE = 1 << SECTOR_SHIFT

# Operations (the kernel's REQ_OP_*).
READ = 0
WRITE = 1
FLUSH = 2          # always empty: a flush carrying data is split by the router
DISCARD = 3
WRITE_ZEROES = 4

OP_NAMES = ("read", "write", "flush", "discard", "write_zeroes")
# Ops that change the device; flakey's drop/error features and era's
# tracking key off this.
WRITE_OPS = frozenset((WRITE, FLUSH, DISCARD, WRITE_ZEROES))

# Flags (the kernel's REQ_* modifiers).
REQ_FUA = 1         # this bio's data must be durable before completion
REQ_PREFLUSH = 2    # everything completed before must be durable first
REQ_RAHEAD = 4      # read-ahead: may be failed instead of queued
REQ_NOUNMAP = 8     # write-zeroes must allocate, not punch a hole (NBD NO_HOLE)
REQ_NOFALLBACK = 16  # write-zeroes: fail with EOPNOTSUPP rather than write zeroes
                     # (NBD FAST_ZERO; the kernel's BLKDEV_ZERO_NOFALLBACK)
REQ_NOWAIT = 32     # fail with EAGAIN rather than block (a read not in the page
                    # cache); only targets with the NOWAIT feature pass it down

_ids = count(1)


class BioDoubleCompletion(RuntimeError):
    pass


class Bio:
    # dev/target/io/bio_nr belong to the router: where a clone is sent, which
    # target mapped it, its io record, and which copy of a broadcast it is.
    __slots__ = ("op", "flags", "sector", "nr_sectors", "data", "end_io",
                 "status", "private", "id", "dev", "target", "io", "bio_nr")

    def __init__(self, op, sector=0, nr_sectors=0, data=None, flags=0,
                 end_io=None, private=None):
        self.op = op
        self.flags = flags
        self.sector = sector
        self.nr_sectors = nr_sectors
        self.data = data
        self.end_io = end_io
        self.status = 0
        self.private = private
        self.dev = None
        self.target = None
        self.io = None
        self.bio_nr = 0
        # next() on itertools.count is atomic under the GIL: ids stay unique
        # without a lock on the hot path.
        self.id = next(_ids)

    def complete(self, status=0):
        """Finish this bio with ``status`` (0 or a positive errno)."""
        cb = self.end_io
        if cb is None:
            raise BioDoubleCompletion(f"bio {self.id} completed twice")
        self.end_io = None
        self.status = status
        cb(self)

    @property
    def done(self) -> bool:
        return self.end_io is None

    @property
    def offset(self) -> int:
        return self.sector << SECTOR_SHIFT

    @property
    def nbytes(self) -> int:
        return self.nr_sectors << SECTOR_SHIFT

    def __repr__(self):
        return (f"<Bio {self.id} {OP_NAMES[self.op]} {self.sector}+{self.nr_sectors}"
                f" flags={self.flags:#x}>")


def zero_length_flush(end_io=None, private=None) -> Bio:
    return Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, end_io, private)
