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
# A READ that the bottom store may answer by reference instead of filling
# ``data``: it sets ``ref`` to a pinned FileRange and the issuer sends from
# the file (zero copy) and unpins it.  A target that needs the read data
# clears the flag in map(); the router clears it on split bios.
REQ_NOCOPY = 16

_ids = count(1)


class BioDoubleCompletion(RuntimeError):
    pass


class FileRange:
    """A READ answered by reference (REQ_NOCOPY): ``length`` bytes of a file
    store at ``offset``.  Each FileRange holds one pin on its store (the file
    stays open, even through a table swap, until ``release()``); a slice is a
    new FileRange with its own pin."""

    __slots__ = ("store", "offset", "length")

    def __init__(self, store, offset, length):      # the caller pinned store
        self.store = store
        self.offset = offset
        self.length = length

    def __len__(self):
        return self.length

    def __getitem__(self, s):
        start, stop, _step = s.indices(self.length)
        self.store.pin()
        return FileRange(self.store, self.offset + start, max(0, stop - start))

    def release(self):
        self.store.unpin()

    def hole_runs(self):
        """(start, length) runs inside the range that are holes in the file."""
        out = []
        pos = 0
        for length, flags in self.store.extents(self.offset, self.length):
            if flags & 1:                       # the store's EXTENT_HOLE
                out.append((pos, length))
            pos += length
        return out


def release_refs(parts) -> None:
    """Unpin every FileRange among ``parts`` (after they were sent or dropped)."""
    for p in parts:
        if type(p) is FileRange:
            p.release()


class Bio:
    # dev/target/io/bio_nr belong to the router: where a clone is sent, which
    # target mapped it, its io record, and which copy of a broadcast it is.
    __slots__ = ("op", "flags", "sector", "nr_sectors", "data", "end_io",
                 "status", "private", "id", "dev", "target", "io", "bio_nr", "ref")

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
        self.ref = None
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
