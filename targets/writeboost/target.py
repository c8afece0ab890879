"""writeboost: a log-structured write-back cache in dm-writeboost's on-disk
layout (``writeboost <backing> <cache> [<#opt_args> <key> <value>...]``).

Rules of this module: it is the only part of the package that knows
``pydm.target`` and the table, and it only wires the others together:
``layout`` (the format), ``cache`` (the RAM index), ``engine`` (shared
state, admission and the sticky FAILED state), ``logwriter`` (the write
path), ``reads``, ``flusher``, ``writeback``,
``ticker``, ``replay`` and ``startup``.

* Construction checks (argument ranges, sizes, the cache's first sector, the
  memory the index needs) and writes nothing.  The first resume formats a
  blank cache or replays the log, after any earlier table over the same
  cache has been suspended (its log flushed) and destroyed.
* Suspend seals and flushes the segment being filled (unless FAILED, so it
  never waits on a dead store); remove stops the threads, never blocking on
  a dead store either.
* Discard and write-zeroes are not offered (the Linux target's choice:
  discarding only the backing would break read-after-discard); flush and
  FUA are, with the durability the engine's rules give them.
* Trace events (``wb_*``, an engine named by ``id(engine)``, listed in
  ``pydm/verify/specs/writeboost.py``) mark the points the writeboost
  monitors check; they are emitted only under ``trace.on.NAME`` and change
  nothing.
"""

import errno

from pydm import trace
from pydm.bio import FLUSH, READ
from pydm.caps import Caps, combine
from pydm.errors import TargetError
from pydm.table import quote_arg
from pydm.target import ALWAYS_WRITEABLE, NOWAIT, REMAPPED, STATUS_TABLE, SUBMITTED, Target
from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost import tunables as T
from pydm.targets.writeboost.engine import Engine
from pydm.targets.writeboost.flusher import Flusher
from pydm.targets.writeboost.readcache import ReadCache
from pydm.targets.writeboost.startup import bring_up, inspect
from pydm.devio import DeviceIO, IOFailed
from pydm.targets.writeboost.ticker import Ticker
from pydm.targets.writeboost.writeback import Modulator, Writeback


class WriteboostTarget(Target):
    name = "writeboost"
    version = (2, 2, 17)
    features = ALWAYS_WRITEABLE | NOWAIT    # uncached reads go to the backing as they are
    description = "log-structured write-back cache (dm-writeboost layout)"

    def ctr(self, args):
        self.engine = None
        if len(args) < 2:
            raise TargetError("Invalid argument count: <backing> <cache> [<#opt_args> ...]")
        self.values, self.opt_words = T.parse(args[2:])
        self.args = args[:2]
        backing = self.ctx.get_device(args[0], role="backing", area=(0, self.len))
        if backing.size < self.len << 9:
            raise TargetError(f"backing {args[0]} is too small: {backing.size >> 9} sectors "
                              f"for a {self.len}-sector target")
        cache = self.ctx.get_device(args[1], role="cache", exclusive=True)
        for role, dev, arg in (("backing", backing, args[0]), ("cache", cache, args[1])):
            if dev.capabilities().unflushable:
                # the log is freed once written back, and a segment counts as
                # flushed once the cache says so: both need a real flush
                raise TargetError(f"{role} {arg} cannot flush (its server offers no flush): "
                                  f"writeboost could not make data durable on it", errno.EINVAL)
        try:
            self.geo = L.Geometry(cache.size)
        except L.LayoutError as e:
            raise TargetError(f"cache {args[1]}: {e}", errno.ENOSPC) from None
        self.backing_io = DeviceIO(backing, "backing")
        self.cache_io = DeviceIO(cache, "cache")
        try:
            self.action = inspect(self.cache_io, self.geo)
        except IOFailed as e:
            raise TargetError(f"cache {args[1]}: {e}", e.errno) from None
        self.num_flush_bios = 1
        self.num_discard_bios = 0
        self.num_write_zeroes_bios = 0

    # ------------------------------------------------------ life cycle
    def preresume(self):
        if self.engine is None:
            self._bring_up()
        else:
            self.ticker.start()

    def _bring_up(self):
        try:
            found = bring_up(self.cache_io, self.backing_io, self.geo, self.len, self.action,
                             self.values["write_around_mode"])
        except IOFailed as e:
            raise TargetError(f"cache start-up failed: {e}", e.errno) from None
        eng = Engine(self.ctx.device.name if self.ctx.device else "?", found.index,
                     self.cache_io, self.backing_io, self.values)
        self.flusher = Flusher(eng, eng.name)
        self.writeback = Writeback(eng, eng.name)
        self.ticker = Ticker(eng, Modulator(self.writeback, self.backing_io, self.values),
                             eng.name)
        eng.flusher, eng.writeback = self.flusher, self.writeback
        eng.readcache = ReadCache(eng, self.values)    # on while read_cache_threshold > 0
        eng.on_fail = self.ctx.event
        self.engine = eng
        self.flusher.start()
        self.writeback.start()
        self.ticker.start()
        with eng.cond:
            eng.life.move("start")
            if trace.on.wb_start:
                trace.emit("wb_start", eng=id(eng))
        self.writeback.kick()

    def postsuspend(self):
        eng = self.engine
        if eng is not None:
            self.ticker.stop()
            if eng.life.active and not eng.sync():
                # what is written back stays so at the next start (pydm:
                # the Linux target leaves that to the periodic updater)
                self.ticker.write_record()

    def dtr(self):
        eng = getattr(self, "engine", None)
        if eng is None:
            return
        self.ticker.stop()
        with eng.cond:
            if eng.life.active:
                eng.life.move("stop")
            eng.cond.notify_all()
        self.writeback.stop()
        self.flusher.stop()
        if trace.on.wb_stop:
            trace.emit("wb_stop", eng=id(eng))

    # ------------------------------------------------------------- I/O
    def map(self, bio):
        eng = self.engine
        op = bio.op
        if op == READ:
            plan = eng.read(bio, bio.sector - self.begin)
            if plan is None:
                if eng.readcache is not None and eng.readcache.stage(bio, self.begin):
                    return SUBMITTED
                bio.dev = self.backing_io.dev
                bio.sector -= self.begin
                return REMAPPED
            plan.run()
            return SUBMITTED
        if self.values["write_around_mode"] and eng.life.active:
            eng.write_around(bio, bio.sector - self.begin)
            bio.dev = self.backing_io.dev
            if bio.nr_sectors:
                bio.sector -= self.begin
            return REMAPPED
        if trace.on.wb_late and eng.life.failed:
            trace.emit("wb_late", eng=id(eng), bio=bio.id)
        if op == FLUSH:
            status = eng.writer.flush(bio)
        else:
            status = eng.writer.write(bio, bio.sector - self.begin)
        if status is not None:
            if trace.on.wb_done:
                trace.emit("wb_done", eng=id(eng), bio=bio.id, op=op, flags=bio.flags,
                           status=status)
            bio.complete(status)
        return SUBMITTED

    def capabilities(self):
        below = combine([self.backing_io.dev.capabilities(),
                         self.cache_io.dev.capabilities()])
        return Caps(flush=True, fua=True, multi_conn=True, cache=True, extents=True,
                    min_block=below.min_block, preferred_block=max(L.BLOCK,
                                                                   below.preferred_block),
                    max_block=below.max_block)

    def iterate_devices(self):
        return [(self.backing_io.dev, 0, self.len),
                (self.cache_io.dev, 0, self.geo.cache_bytes >> 9)]

    # --------------------------------------------------------- control
    def message(self, argv):
        eng = self.engine
        if eng is None:
            raise TargetError("writeboost is not active yet", errno.EINVAL)
        cmd = argv[0].lower()
        if cmd == "clear_stat" and len(argv) == 1:
            with eng.cond:
                eng.index.stats[:] = [0] * len(eng.index.stats)
                eng.index.count_non_full_flushed = 0
            return None
        if cmd == "drop_caches" and len(argv) == 1:
            self._drop_caches()
            return None
        if len(argv) == 2 and cmd in T.KEYS:
            with eng.cond:
                T.set_by_message(self.values, cmd, argv[1])
            self.writeback.kick()
            return None
        raise TargetError(f"unrecognised message {' '.join(argv)!r}", errno.EINVAL)

    def _drop_caches(self):
        eng = self.engine
        if eng.sync():
            raise TargetError("drop_caches failed: the target is FAILED", errno.EIO)
        # Everything written before this message is now in segments up to
        # ``goal``: wait for those to be home, not for nr_dirty to reach 0,
        # which writes arriving meanwhile could put off for ever.
        with eng.cond:
            eng.forced += 1
            goal = eng.index.last_sealed
        try:
            self.writeback.kick()
            with eng.cond:
                while eng.index.last_writeback < goal and eng.life.active:
                    eng.cond.wait(0.5)
                    self.writeback.kick()
                if not eng.life.active:
                    raise TargetError("drop_caches failed: the target is FAILED", errno.EIO)
        finally:
            with eng.cond:
                eng.forced -= 1
        self.ticker.write_record()

    def status(self, type_):
        if type_ == STATUS_TABLE:
            words = [quote_arg(self.backing_io.dev.ref), quote_arg(self.cache_io.dev.ref)]
            return " ".join(words + self.opt_words)
        eng = self.engine
        if eng is None:
            geo = self.geo
            return (f"0 {geo.nr_caches} {geo.nr_segments} 0 0 0 0 " + "0 " * 17 +
                    T.status_pairs(self.values, 0) + " new")
        with eng.cond:
            ix = eng.index
            head = [ix.cursor, self.geo.nr_caches, self.geo.nr_segments, ix.current_id,
                    ix.last_flushed, ix.last_writeback, ix.nr_dirty, *ix.stats,
                    ix.count_non_full_flushed]
            life = eng.life
            tail = life.first_error.fields() if life.failed else life.state.lower()
        return (" ".join(map(str, head)) + " " +
                T.status_pairs(self.values, self.writeback.last_batch) + " " + tail)


TARGET = WriteboostTarget
