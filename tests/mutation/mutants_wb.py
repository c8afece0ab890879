"""Mutants of the writeboost target: the bugs its monitors are there for.

Rules of this module: each mutant is applied with ``monkeypatch`` only
(production code has no switch for it) and wraps or reorders the real code
rather than rewriting it; where a mutant moves an I/O it keeps the trace
point next to that I/O, as a mutation of the source would.  A mutant that
makes I/O never complete keeps what it forgot in ``STRANDED`` and
``release_stranded()`` completes it, so a test can always tear down.
"""

import errno

from mutant_support import Mutant
from pydm import trace
from pydm.targets.writeboost.engine import Engine
from pydm.targets.writeboost.flusher import Flusher
from pydm.targets.writeboost.writeback import Writeback

T = "tests/mutation/test_mutants_wb.py::"

STRANDED = []       # barriers the stranded-flush mutant forgot


def release_stranded():
    """Fail (EIO) every barrier a mutant forgot; how many there were."""
    out, STRANDED[:] = list(STRANDED), []
    if out:
        Flusher._ack([(b, errno.EIO) for b in out])
    return len(out)


def _ack_before_cache_flush(mp):
    # the flusher acknowledges a round's barriers once its segments are
    # written, and only then FLUSHes the cache store
    real = Flusher._process

    def process(self, batch):
        eng = self.engine
        barriers = [b for _i, _n, bs, _d in batch for b in bs]
        real(self, [(seg, n, [], d) for seg, n, _bs, d in batch])   # segments, no FLUSH
        with eng.cond:
            written = eng.index.last_flushed >= batch[-1][0]
        if barriers:
            self._ack([(b, 0 if written else errno.EIO) for b in barriers])
            if written:
                eng.admitted(lambda: self._flush(batch[-1][0]))
        return None
    mp.setattr(Flusher, "_process", process)


def _segment_after_failed(mp):
    # admission forgets the sticky state: segments sealed before the
    # failure and still queued are written to the cache after it
    def begin_write(self):
        with self.cond:
            self.writes_in_flight += 1
            return True
    mp.setattr(Engine, "begin_write", begin_write)


class _FlushLater(Exception):
    pass


def _advance_before_backing_flush(mp):
    # writeback moves last_writeback as soon as the batch's writes are
    # done; the backing FLUSH is sent after the advance
    real_write, real_step = Writeback._write, Writeback._step

    def write(self, items, reads):
        backing = self.engine.backing

        def later():
            raise _FlushLater()
        backing.flush = later                   # this call only: the FLUSH is moved
        try:
            real_write(self, items, reads)
        except _FlushLater:
            self.flush_owed = True
        finally:
            del backing.flush

    def step(self):
        more = real_step(self)                  # writes, then advances...
        if getattr(self, "flush_owed", False):  # ...and only now the FLUSH
            self.flush_owed = False
            eng = self.engine

            def flush():
                eng.backing.flush()
                if trace.ENABLED:
                    trace.emit("wb_backing_flushed", eng=id(eng))
            if not eng.admitted(flush):
                return False
        return more
    mp.setattr(Writeback, "_write", write)
    mp.setattr(Writeback, "_step", step)


def _flush_stranded_on_dead_cache(mp):
    # a round that failed forgets its barriers instead of failing them:
    # the flush waits for ever once the cache store stops answering
    real = Flusher._process

    def process(self, batch):
        acks = real(self, batch)
        if acks and any(status for _b, status in acks):
            STRANDED.extend(b for b, _s in acks)
            return None
        return acks
    mp.setattr(Flusher, "_process", process)


MUTANTS = (
    Mutant("wb-ack-before-cache-flush",
           "writeboost acknowledges a flush or FUA before the cache store's FLUSH",
           _ack_before_cache_flush,
           [T + "test_flush_and_fua_are_acknowledged_after_the_cache_flush"], "wb_durable"),
    Mutant("wb-segment-after-failed",
           "writeboost writes a queued segment to the cache after entering FAILED",
           _segment_after_failed,
           [T + "test_segments_queued_when_the_cache_fails_are_never_written"], "wb_failed"),
    Mutant("wb-advance-before-backing-flush",
           "writeback advances last_writeback before the backing store's FLUSH",
           _advance_before_backing_flush,
           [T + "test_drop_caches_advances_last_writeback_after_the_backing_flush"],
           "wb_writeback"),
    Mutant("wb-flush-stranded-on-dead-cache",
           "a flush failing on a dead cache store is forgotten instead of failed: it "
           "never completes",
           _flush_stranded_on_dead_cache,
           [T + "test_a_flush_on_a_dead_cache_store_fails_promptly"], "deadline"),
)
