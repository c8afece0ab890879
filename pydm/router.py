"""The bio router: split an original bio over a table's targets and complete it once.

Rules of this module:

* ``route(dev, table, bio)`` is called by the device with the bio already
  counted in flight; the router guarantees exactly one call of
  ``dev.io_done(bio, status)`` per routed bio, after every fragment is done.
* Fragments are clones: the original's data is shared through memoryview
  slices (no copies), the clone's sector starts device-relative and the target
  rewrites it.  Splits happen at target ends and on each target's
  ``max_io_len`` grid, which is aligned to the target's own start.
* Empty flushes are broadcast to every target (``num_flush_bios`` copies
  each) and never routed by sector.  A flush carrying data is an empty flush
  followed, once that succeeded, by the data without PREFLUSH.
* Discard and write-zeroes are split at target ends only (unless a target
  asks for split discards) and fail with EOPNOTSUPP on a target that takes
  none.
* ``REQ_NOWAIT`` reaches only targets with the ``NOWAIT`` feature: a clone
  for any other target loses the flag, so that target may block as it
  always did, and never answers EAGAIN for want of a wait.
* No lock is taken for a bio that fits one target; a multi-fragment record
  takes its own small lock for the fragment count.  Nothing global.
"""

import errno
import logging
from bisect import bisect_right

from pydm import trace
from pydm.bio import (Bio, DISCARD, FLUSH, READ, REQ_NOWAIT, REQ_PREFLUSH, WRITE,
                      WRITE_ZEROES, SECTOR_SHIFT)
from pydm.lockdep import make_lock
from pydm.target import (DELAY_REQUEUE, ENDIO_REQUEUE, KILL, NOWAIT, REMAPPED, REQUEUE,
                         SUBMITTED)

log = logging.getLogger("pydm.router")

# Internal status meaning "hand the original back to the device" (the
# kernel's BLK_STS_DM_REQUEUE).  Never leaves the core.
STS_REQUEUE = -1


class _Io:
    """One original bio on its way through one table."""

    __slots__ = ("dev", "orig", "remaining", "status", "lock", "table")

    def __init__(self, dev, orig, table, remaining):
        self.dev = dev
        self.orig = orig
        self.table = table
        self.remaining = remaining
        self.status = 0
        self.lock = make_lock("router.io") if remaining > 1 else None


def _merge(old, new):
    # First error wins, but a requeue overrides errors: the original will be
    # retried as a whole, so partial failures do not matter.
    if new == STS_REQUEUE or old == 0:
        return new if new else old
    return old


def _clone_done(clone):
    io = clone.io
    status = clone.status
    t = clone.target
    if trace.on.clone_complete:
        trace.emit("clone_complete", dev=io.dev.name, bio=io.orig.id, clone=clone.id,
                   target=t.name, op=clone.op, status=status)
    if t.end_io is not None:
        try:
            r, status = t.end_io(clone, status)
        except Exception:
            log.exception("%s: end_io failed", t.name)
            r, status = 0, errno.EIO
        if r == ENDIO_REQUEUE:
            status = STS_REQUEUE
    if io.lock is None:
        io.status = status
    else:
        with io.lock:
            if status:
                io.status = _merge(io.status, status)
            io.remaining -= 1
            if io.remaining:
                return
    io.dev.io_done(io.orig, io.status)


def _dispatch(t, clone, dev):
    try:
        r = t.map(clone)
    except Exception:
        log.exception("%s: map failed", t.name)
        r = KILL
    if trace.on.bio_remap:
        trace.emit("bio_remap", dev=dev.name, bio=clone.io.orig.id, clone=clone.id, op=clone.op,
                   target=t.name, result=r)
    if r == REMAPPED:
        clone.dev.submit(clone)
    elif r == SUBMITTED:
        return
    elif r == REQUEUE or r == DELAY_REQUEUE:
        clone.complete(STS_REQUEUE)
    else:
        clone.complete(errno.EIO)


def route(dev, table, bio):
    op = bio.op
    if op == FLUSH:
        _broadcast_flush(dev, table, bio, bio)
        return
    if bio.flags & REQ_PREFLUSH:
        # Phase one: an empty flush of every target; the data follows.
        pre = Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, _preflush_done, (dev, table, bio))
        _broadcast_flush(dev, table, pre, bio)
        return
    _split(dev, table, bio)


def _preflush_done(pre):
    dev, table, bio = pre.private
    if pre.status:
        dev.io_done(bio, pre.status)
        return
    bio.flags &= ~REQ_PREFLUSH
    _split(dev, table, bio)


class _FlushSink:
    """Lets a phase-one flush reuse the normal completion path."""

    __slots__ = ("name", "bio")

    def __init__(self, dev, pre):
        self.name = dev.name
        self.bio = pre

    def io_done(self, _orig, status):
        self.bio.complete(status)


def _broadcast_flush(dev, table, flush, orig):
    copies = [(t, i) for t in table.targets for i in range(t.num_flush_bios)]
    sink = dev if flush is orig else _FlushSink(dev, flush)
    if not copies:
        sink.io_done(flush, 0)
        return
    io = _Io(sink, flush, table, len(copies))
    flags = flush.flags | REQ_PREFLUSH
    for t, i in copies:
        c = Bio(FLUSH, 0, 0, None, flags, _clone_done)
        c.io = io
        c.target = t
        c.bio_nr = i
        _dispatch(t, c, dev)


def _fragment_end(t, s, limit, data_op):
    """Where a fragment starting at ``s`` in target ``t`` must end: the
    target's end (``limit``) or its next ``max_io_len`` boundary, a grid
    aligned to the target's own start."""
    m = t.max_io_len
    if m and (data_op or t.split_discard_bios):
        grid = s + m - (s - t.begin) % m
        if grid < limit:
            return grid
    return limit


def _split(dev, table, bio):
    op = bio.op
    sector = bio.sector
    end = sector + bio.nr_sectors
    if end > table.size or bio.nr_sectors == 0:
        dev.io_done(bio, errno.EIO if bio.nr_sectors else 0)
        return
    ends = table.ends
    idx = bisect_right(ends, sector)
    t = table.targets[idx]
    data_op = op == READ or op == WRITE
    limit = _fragment_end(t, sector, ends[idx], data_op) if t.max_io_len else ends[idx]
    if end <= limit and (data_op or _copies(t, op) == 1):
        # Fast path: one fragment, no lock, the original's buffer as is.
        if not data_op and not _copies(t, op):
            dev.io_done(bio, errno.EOPNOTSUPP)
            return
        flags = bio.flags
        if flags & REQ_NOWAIT and not t.features & NOWAIT:
            flags &= ~REQ_NOWAIT
        c = Bio(op, sector, bio.nr_sectors, bio.data, flags, _clone_done)
        c.io = _Io(dev, bio, table, 1)
        c.target = t
        _dispatch(t, c, dev)
        return
    _split_many(dev, table, bio, data_op)


def _copies(t, op):
    if op == DISCARD:
        return t.num_discard_bios
    if op == WRITE_ZEROES:
        return t.num_write_zeroes_bios
    return 1


def _split_many(dev, table, bio, data_op):
    op = bio.op
    sector = bio.sector
    end = sector + bio.nr_sectors
    ends = table.ends
    targets = table.targets
    frags = []
    s = sector
    idx = bisect_right(ends, s)
    while s < end:
        t = targets[idx]
        n = min(end, _fragment_end(t, s, ends[idx], data_op)) - s
        if data_op:
            frags.append((t, s, n, 0))
        else:
            copies = _copies(t, op)
            if not copies:
                dev.io_done(bio, errno.EOPNOTSUPP)
                return
            for i in range(copies):
                frags.append((t, s, n, i))
        s += n
        if s == ends[idx]:
            idx += 1
    io = _Io(dev, bio, table, len(frags))
    # Slicing a memoryview shares the buffer; slicing bytes would copy.
    data = None if bio.data is None else memoryview(bio.data)
    base = sector
    flags = bio.flags
    for t, s, n, i in frags:
        f = flags
        if f & REQ_NOWAIT and not t.features & NOWAIT:
            f &= ~REQ_NOWAIT
        if data is not None:
            lo = (s - base) << SECTOR_SHIFT
            d = data[lo:lo + (n << SECTOR_SHIFT)]
        else:
            d = None
        c = Bio(op, s, n, d, f, _clone_done)
        c.io = io
        c.target = t
        c.bio_nr = i
        _dispatch(t, c, dev)
