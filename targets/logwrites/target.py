"""log-writes: ``log-writes <data> <log>``: I/O passes to the data device as
linear's does, and every write, discard, flush, FUA and mark is appended to
the log device in the order it became durable, in dm-log-writes' format, so
that replaying the log up to any entry gives a state the data device really
passed through (``pydm lw replay``).

Rules of this module:

* What is logged when is ``order``'s business, writing the log
  ``logger``'s; this module copies payloads at submit time (into reused
  memory: big ones into buffers of its pool, small records into its arena,
  given back by the logger once logged), watches
  completions (``end_io``) and hands records over, all under one lock
  ("lw.order", taken before the logger's "lw.log"; the arena's "lw.arena"
  is a leaf under both), so the log's order is the order of completions.
* Sectors in the log are target-relative (the kernel's are absolute), in
  log sectors (the data device's logical block size, ``sectorsize``); a
  request that is not a whole number of log sectors is refused (EINVAL),
  never read-modify-written: that would log data the client never wrote.
  The NBD export says so (minimum block size = sectorsize).
* A write that fails on the data device gets its error and is not logged
  (the kernel logs it); failures are counted in status.
* Discards are always taken and logged (and passed on only when the data
  device can discard); write-zeroes are not offered.
* Completed plain writes are held in RAM until a flush covers them (the
  kernel's rule); past ``MAX_HELD`` bytes they spill to the log early
  (``order.LogOrder.spill``): no flush of our own, no entry the client did
  not cause.  While a flush is in flight, the writes completed after it was
  issued cannot spill before it completes: they are held, whatever their
  size, until then.
* The log is started empty at the first resume; removing the device logs
  what is still unflushed, then the ``dm-log-writes-end`` mark, and settles
  the super block, so a cleanly removed log counts every entry.  Logging
  stops for good when the log is full or fails (status: logging_disabled);
  client I/O never notices.
"""

import errno

from pydm.bio import DISCARD, FLUSH, READ, REQ_FUA, WRITE
from pydm.buffers import BufferPool
from pydm.devio import DeviceIO
from pydm.errors import TargetError
from pydm.lockdep import make_lock
from pydm.table import quote_arg
from pydm.target import DONE, NOWAIT, REMAPPED, STATUS_TABLE, SUBMITTED, Target
from pydm.targets.logwrites import format as F
from pydm.targets.logwrites.arena import Arena
from pydm.targets.logwrites.logger import LogWriter
from pydm.targets.logwrites.order import LogOrder, Record

MAX_HELD = 64 << 20               # bytes of completed writes held for a flush before
                                  # they spill to the log (the kernel holds any amount)
KEEP = 4 * MAX_HELD               # record memory kept for reuse: what is held, what the
                                  # log writer is writing, and room (less, and records
                                  # fault in afresh: seen as 3% of a 1 MiB write's time)
POOL_KEEP = 8 * KEEP              # (the pool keeps an eighth of it per size class)


class _Flush:
    """What a flush in flight carries: its id in ``LogOrder``."""

    __slots__ = ("token",)

    def __init__(self, token):
        self.token = token


class LogWritesTarget(Target):
    name = "log-writes"
    version = (1, 1, 0)
    description = "log every write in the order it became durable (dm-log-writes format)"
    features = NOWAIT     # reads are remapped as they are

    def ctr(self, args):
        self.logger = None
        if len(args) != 2:
            raise TargetError("Invalid argument count: <data> <log> (and nothing else)")
        self.data = self.ctx.get_device(args[0], area=(0, self.len))
        if self.data.size < self.len << 9:
            raise TargetError(f"data device {args[0]} is too small: "
                              f"{self.data.size >> 9} sectors for a {self.len}-sector target")
        self.log_dev = self.ctx.get_device(args[1], role="log", exclusive=True)
        below = self.data.capabilities()
        self.ss = max(512, below.min_block)
        self.data_discards = below.discard
        need = 64 * self.ss
        if self.log_dev.size < need:
            raise TargetError(f"log {args[1]} is too small: {self.log_dev.size} bytes; a log "
                              f"needs at least {need} (and room for every write it records)",
                              errno.ENOSPC)
        if self.len * 512 % self.ss:
            raise TargetError(f"the target's length is not a multiple of the data device's "
                              f"{self.ss}-byte blocks")
        self.lock = make_lock("lw.order")
        # payload copies, reused: a fresh 1 MiB buffer faults in page by
        # page, which cost more than the copy (an eighth per size class kept)
        self.pool = BufferPool(keep_bytes=POOL_KEEP)
        self.arena = Arena(keep_bytes=KEEP)     # small records, likewise
        self.order = LogOrder()
        self.failed_writes = 0
        self.num_flush_bios = 1
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 0

    # ------------------------------------------------------ life cycle
    def preresume(self):
        if self.logger is None:
            name = self.ctx.device.name if self.ctx.device else "?"
            logger = LogWriter(name, DeviceIO(self.log_dev, "log"), self.ss)
            try:
                logger.start()
            except Exception as e:
                raise TargetError(f"cannot start the log: {e}", getattr(e, "errno", errno.EIO))
            self.logger = logger

    def postsuspend(self):
        if self.logger is not None:
            self.logger.drain()

    def dtr(self):
        logger = getattr(self, "logger", None)
        if logger is None:
            return
        end = Record.make(self.ss, 0, 0, F.MARK, text=F.END_MARK.encode())
        with self.lock:
            logger.add(self.order.teardown(end))
        logger.stop()

    # ------------------------------------------------------------- I/O
    def map(self, bio):
        op = bio.op
        if op == READ:
            return self._remap(bio)
        if op == FLUSH:
            with self.lock:
                bio.private = _Flush(self.order.flush_issued())
            return self._remap(bio)
        ss = self.ss
        rel = bio.sector - self.begin
        if (rel * 512) % ss or (bio.nr_sectors * 512) % ss:
            bio.complete(errno.EINVAL)
            return SUBMITTED
        if op == WRITE:
            if not bio.nr_sectors:
                return self._remap(bio)
            flags = F.FUA if bio.flags & REQ_FUA else 0
            bio.private = Record.make(ss, rel * 512 // ss, bio.nr_sectors * 512 // ss, flags,
                                      bio.data, pool=self.pool, arena=self.arena)
            return self._remap(bio)
        if op == DISCARD:
            rec = Record.make(ss, rel * 512 // ss, bio.nr_sectors * 512 // ss, F.DISCARD)
            bio.private = rec
            if self.data_discards:
                return self._remap(bio)
            self._completed(rec)           # nothing below to discard: done, and logged
            bio.complete(0)
            return SUBMITTED
        bio.complete(errno.EOPNOTSUPP)
        return SUBMITTED

    def _remap(self, bio):
        bio.dev = self.data
        if bio.nr_sectors:
            bio.sector -= self.begin
        return REMAPPED

    def end_io(self, bio, status):
        item = bio.private
        if item is None:                   # a read, an empty write
            return DONE, status
        if isinstance(item, _Flush):
            self._flush_completed(item.token, status)
        elif status:
            item.release()                 # not logged
            with self.lock:
                self.failed_writes += 1
        else:
            self._completed(item)
        return DONE, status

    def _completed(self, rec):
        with self.lock:
            now = self.order.completed(rec)
            if self.order.held_bytes > MAX_HELD:
                now += self.order.spill()
            if now:
                self.logger.add(now)

    def _flush_completed(self, token, status):
        with self.lock:
            if status:
                self.order.flush_failed(token)
                return
            self.logger.add(self.order.flush_done(token, Record.make(self.ss, 0, 0, F.FLUSH)))

    # --------------------------------------------------------- control
    def message(self, argv):
        if len(argv) != 2:
            raise TargetError("expect 2 arguments: mark <name>", errno.EINVAL)
        if argv[0].lower() != "mark":
            raise TargetError(f"unrecognised message {argv[0]!r} (only: mark <name>)",
                              errno.EINVAL)
        if self.logger is None:
            raise TargetError("log-writes is not active yet", errno.EINVAL)
        text = argv[1].encode()[:F.mark_limit(self.ss)]
        rec = Record.make(self.ss, 0, 0, F.MARK, text=text)
        with self.lock:
            self.logger.add(self.order.mark(rec))
        return None

    def status(self, type_):
        if type_ == STATUS_TABLE:
            return f"{quote_arg(self.data.ref)} {quote_arg(self.log_dev.ref)}"
        lg = self.logger
        if lg is None:
            return f"0 {self.ss // 512 - 1}"
        out = f"{lg.logged} {lg.highest_sector}"
        if self.failed_writes:
            out += f" failed_writes {self.failed_writes}"
        if lg.disabled is not None:
            out += " logging_disabled"
        return out

    def iterate_devices(self):
        return [(self.data, 0, self.len)]

    def capabilities(self):
        caps = super().capabilities()
        caps.discard = True                # always taken (and logged)
        return caps

    def io_hints(self, caps):
        caps.min_block = max(caps.min_block, self.ss)
        caps.preferred_block = max(caps.preferred_block, self.ss)


TARGET = LogWritesTarget
