"""What goes into the log, and in which order: dm-log-writes' rules.

Rules of this module:

* Pure: records in, lists of records to append to the log out, in the order
  they must be appended.  No I/O, no threads, no lock: the target calls it
  with its own lock held, and appends what it returns to the log queue under
  that same lock, so the queue's order is exactly this module's order.
* A plain write (or discard) is logged only once a flush covers it: when it
  completes it joins ``unflushed`` (in completion order).  A flush covers
  exactly the writes that had completed when it was *issued*: it takes the
  ``unflushed`` list then, and when it completes that list is logged, then
  the flush's own entry.  Writes completing meanwhile wait for the next
  flush.  (The kernel's rst and code; the header comment of
  dm-log-writes.c says otherwise and is wrong.)
* A FUA write and a mark go straight to the log when they complete (ahead
  of older unflushed writes: they are durable now, those are not).
* A flush that completes also covers the writes of flushes issued before it
  and still in flight (pydm: the kernel's log can otherwise show a later
  write durable without an earlier one that was).
* A flush that failed on the data device covers nothing: its writes go back
  to the front of ``unflushed`` (pydm; the kernel logs it anyway).
* Memory is bounded (pydm; the kernel holds any amount): past the bound the
  target *spills*, logging held writes early, still in completion order and
  still ahead of the flush entry that will cover them, but without any
  entry of its own.  A spill takes the writes the oldest flush in flight
  covers, or, with no flush in flight, every unflushed write; writes that
  completed after a flush in flight was issued belong behind its entry and
  cannot spill before it completes.  A spilled write is not claimed
  durable: only a later FLUSH entry (and the super block's count) does
  that.  Replaying to a FUA or mark may now show a spilled write, which is
  a state the device could be in after a power cut there too (it had
  completed).
* Teardown logs what is still unflushed, then the end mark.
"""

from pydm.targets.logwrites import format as F

POOLED = 64 << 10       # a payload this big is copied into a pooled buffer: a
                        # fresh one would fault in page by page, at more cost than the copy


class Record:
    """One entry waiting for the log: ``head`` (its header sector, followed
    by the payload when that is small), ``payload`` (a big payload, in a
    buffer of a pool, written right after ``head``; else None) and its
    flags.  ``release`` gives the pooled memory back once the log holds the
    record (or never will): the big payload's buffer, or the arena's bytes
    that hold a small record whole."""

    __slots__ = ("head", "payload", "flags", "_buf", "_pool")

    def __init__(self, head, flags, payload=None, buf=None, pool=None):
        self.head = head
        self.flags = flags
        self.payload = payload
        self._buf = buf
        self._pool = pool

    @classmethod
    def make(cls, sectorsize, sector, nr_sectors, flags, payload=None, text=b"", pool=None,
             arena=None):
        """A record; ``payload`` (a buffer of ``nr_sectors`` log sectors) is
        copied in now, the client may reuse its buffer once it has a reply:
        a small one behind the header, in bytes of ``arena`` (an
        ``arena.Arena``) when given, a big one (``POOLED`` bytes or more)
        into a buffer of ``pool`` (a ``pydm.buffers.BufferPool``), when
        given.  Only a mark has ``text``, and a mark has no payload."""
        if payload is None or flags & F.DISCARD:
            return cls(F.pack_header(sectorsize, sector, nr_sectors, flags, text), flags)
        n = len(payload)
        if n < POOLED and arena is not None:
            chunk, view = arena.take(sectorsize + n)
            F.pack_entry_into(view, sectorsize, sector, nr_sectors, flags, payload)
            return cls(view, flags, None, chunk, arena)
        if n < POOLED or pool is None:
            out = bytearray(sectorsize + n)
            F.pack_entry_into(out, sectorsize, sector, nr_sectors, flags, payload)
            return cls(out, flags)
        head = F.pack_header(sectorsize, sector, nr_sectors, flags, text)
        buf = pool.get(n)
        view = buf.write_view(n)
        view[:] = payload
        return cls(head, flags, view, buf, pool)

    @property
    def nbytes(self) -> int:
        return len(self.head) + (len(self.payload) if self.payload is not None else 0)

    def release(self) -> None:
        """The pooled memory goes back (once; from here on the record has
        no payload, and no head either when the head was in the arena)."""
        buf, self._buf = self._buf, None
        if buf is not None:
            if self.payload is None:
                self.head = b""            # its bytes are the arena's again
            self.payload = None
            self._pool.put(buf)


class LogOrder:
    def __init__(self):
        self.unflushed = []
        self.held_bytes = 0           # of every record held here (unflushed and pending)
        self.pending = []             # [(flush id, the writes it covers)], in issue order
        self._next_id = 0

    def completed(self, rec: Record) -> list:
        """A write or discard completed successfully: what to log now."""
        if rec.flags & F.FUA:
            return [rec]
        self.unflushed.append(rec)
        self.held_bytes += rec.nbytes
        return []

    def flush_issued(self) -> int:
        """A flush is being sent to the data device: it covers the writes
        completed so far; returns its id for ``flush_done``/``flush_failed``."""
        fid = self._next_id
        self._next_id += 1
        self.pending.append((fid, self.unflushed))
        self.unflushed = []
        return fid

    def flush_done(self, fid: int, rec: Record) -> list:
        """The flush succeeded: the writes it covers, then its own entry.
        It covers the writes of every flush issued before it that is still
        in flight too (they had completed before it was issued), so they
        are logged now, ahead of it, in completion order (the kernel leaves
        them to their own flush, and its log can then show a later write
        durable without an earlier one that was)."""
        out = []
        while self.pending and self.pending[0][0] <= fid:
            out += self.pending.pop(0)[1]
        self.held_bytes -= sum(r.nbytes for r in out)
        return out + [rec]

    def flush_failed(self, fid: int) -> None:
        """The flush failed: its writes are not durable after all (unless a
        later flush already logged them)."""
        for i, (f, recs) in enumerate(self.pending):
            if f == fid:
                del self.pending[i]
                self.unflushed[:0] = recs
                return

    def spill(self) -> list:
        """Held writes that may go to the log now, ahead of the entry of the
        flush that will cover them (see the rules): the oldest flush in
        flight's, or every unflushed one when no flush is in flight; [] when
        neither can."""
        if self.pending:
            fid, out = self.pending[0]
            self.pending[0] = (fid, [])
        else:
            out, self.unflushed = self.unflushed, []
        self.held_bytes -= sum(r.nbytes for r in out)
        return out

    @staticmethod
    def mark(rec: Record) -> list:
        return [rec]

    def teardown(self, end: Record) -> list:
        """The target goes away: everything left, then the end mark."""
        out = [r for _f, recs in self.pending for r in recs] + self.unflushed + [end]
        self.pending, self.unflushed = [], []
        self.held_bytes = 0
        return out
