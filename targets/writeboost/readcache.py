"""Read caching: whole-block read misses staged in cells, then put into the
log as clean blocks.

Rules of this module (the Linux target's, the riskiest part of it, so off
unless ``read_cache_threshold`` > 0):

* Only a read made of whole, aligned 4 KiB blocks that are all misses is
  staged, one cell a block, while cells are free.  A cell gets its data
  when the backing read completes; a failed read cancels it.
* A write to a staged block cancels its cell (``cancel``, called from the
  write path with the target's lock held), so a cell never holds data older
  than the device's.
* Sequential runs are not cached: a run of more than ``read_cache_threshold``
  consecutive blocks is cancelled as it grows, and again when the batch is
  sorted before injection.
* When every cell of a batch has completed, the writeback worker injects
  the live cells into the log as clean blocks (``Engine.inject_clean``),
  but never waits for room: what does not fit is dropped (it is a cache).
"""

from pydm.bio import READ
from pydm.targets.writeboost import layout as L


class ReadCache:
    def __init__(self, engine, tunables):
        self.engine = engine
        self.tunables = tunables
        self.cells = {}          # block -> bytearray (filled) | None (waiting)
        self.cancelled = set()
        self.waiting = 0
        self.last_block = -2
        self.run = []            # blocks of the current sequential run
        self.ready = None        # a full batch waiting to be injected

    @property
    def on(self) -> bool:
        return self.tunables["read_cache_threshold"] > 0

    def cancel(self, block) -> None:
        """A write to ``block``: its staged data is stale (lock held)."""
        if block in self.cells:
            self.cancelled.add(block)

    def stage(self, bio, begin) -> bool:
        """Stage a whole-block read miss; True if the bio is now ours."""
        rel = bio.sector - begin
        if not self.on or rel % L.BLOCK_SECTORS or bio.nr_sectors % L.BLOCK_SECTORS:
            return False
        eng = self.engine
        n = bio.nr_sectors // L.BLOCK_SECTORS
        first = rel // L.BLOCK_SECTORS
        blocks = range(first, first + n)
        with eng.cond:
            limit = self.tunables["nr_read_cache_cells"]
            if (self.ready is not None or len(self.cells) + n > limit
                    or any(b in self.cells for b in blocks)):
                return False
            for b in blocks:
                self.cells[b] = None
                self._follow(b)
            self.waiting += n
        eng.backing.submit(READ, rel, bio.data, lambda st: self._done(bio, blocks, st))
        return True

    def _follow(self, block):
        """Sequential detection as blocks are staged (lock held)."""
        if block == self.last_block + 1:
            self.run.append(block)
        else:
            self.run = [block]
        self.last_block = block
        if len(self.run) > self.tunables["read_cache_threshold"]:
            self.cancelled.update(self.run)

    def _done(self, bio, blocks, status):
        eng = self.engine
        data = bio.data
        with eng.cond:
            for i, b in enumerate(blocks):
                if status:
                    self.cancelled.add(b)
                else:
                    self.cells[b] = bytes(data[i * L.BLOCK:(i + 1) * L.BLOCK])
            self.waiting -= len(blocks)
            full = len(self.cells) >= self.tunables["nr_read_cache_cells"]
            if full and not self.waiting:
                self.ready = self._batch()
        bio.complete(status)
        if self.ready is not None:
            eng.writeback.kick()

    def _batch(self):
        """The live cells sorted, sequential runs cut out; resets (lock held)."""
        th = self.tunables["read_cache_threshold"]
        blocks = sorted(b for b in self.cells if b not in self.cancelled)
        keep, run = [], []
        for b in blocks + [None]:
            if run and (b is None or b != run[-1] + 1):
                if len(run) <= th:
                    keep += run
                run = []
            if b is not None:
                run.append(b)
        batch = [(b, self.cells[b]) for b in keep]
        self.cells, self.cancelled, self.run, self.last_block = {}, set(), [], -2
        return batch

    def take_ready(self):
        """The batch to inject, if one is complete (lock held)."""
        batch, self.ready = self.ready, None
        return batch
