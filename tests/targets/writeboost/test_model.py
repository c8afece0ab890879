"""writeboost against a plain bytearray: a Hypothesis state machine of
random partial and unaligned reads and writes, FUA, flushes, writeback,
log wraps, read caching on and off, suspend/resume, clean re-creation and
power cuts.  Reads always equal the model; after a power cut every sector
holds what the last acknowledged flush (or FUA) covered, or something
written after it."""

import os
import random
import sys

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "contract"))

from helpers import do_io  # noqa: E402
from pydm.bio import FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE  # noqa: E402
from pydm.control import Control  # noqa: E402
from volatile_store import VolatilePool  # noqa: E402

SECTOR = 512
SECTORS = 4096                    # a 2 MiB device
CACHE = (1 << 20) + 3 * (512 << 10)   # three segments: the log wraps often


class WriteboostModel(RuleBasedStateMachine):
    @initialize()
    def setup(self):
        import tempfile
        self.dir = tempfile.mkdtemp(prefix="wbmodel-")
        self.backing = os.path.join(self.dir, "backing.img")
        self.cache = os.path.join(self.dir, "cache.img")
        with open(self.backing, "wb") as f:
            f.truncate(SECTORS * SECTOR)
        with open(self.cache, "wb") as f:
            f.truncate(CACHE)
        self.model = bytearray(SECTORS * SECTOR)
        self.durable = bytearray(self.model)           # as of the last acked flush
        self.since = {}                                 # sector -> values written since
        self.readcache = 0
        self._build()

    def _build(self):
        self.pool = VolatilePool()
        self.control = Control(stores=self.pool)
        opts = f" 2 read_cache_threshold {self.readcache}" if self.readcache else ""
        self.dev = self.control.create(
            "wb", f"0 {SECTORS} writeboost {self.backing} {self.cache}{opts}")

    def teardown(self):
        if hasattr(self, "control"):
            self.control.shutdown()
            import shutil
            shutil.rmtree(self.dir, ignore_errors=True)

    def _acked_flush(self):
        self.durable[:] = self.model
        self.since.clear()

    @rule(sector=st.integers(0, SECTORS - 1), n=st.integers(1, 40), fua=st.booleans(),
          seed=st.integers(0, 255))
    def write(self, sector, n, fua, seed):
        n = min(n, SECTORS - sector)
        data = bytes([(seed + i) & 0xFF for i in range(n)]) * SECTOR
        status, _ = do_io(self.dev, WRITE, sector, data=data, flags=REQ_FUA if fua else 0)
        assert status == 0
        self.model[sector * SECTOR:(sector + n) * SECTOR] = data
        for s in range(sector, sector + n):
            self.since.setdefault(s, []).append(data[(s - sector) * SECTOR:
                                                     (s - sector + 1) * SECTOR])
        if fua:
            # FUA covers this write only; later sectors keep their doubt
            for s in range(sector, sector + n):
                self.durable[s * SECTOR:(s + 1) * SECTOR] = \
                    self.model[s * SECTOR:(s + 1) * SECTOR]
                self.since.pop(s, None)

    @rule(sector=st.integers(0, SECTORS - 1), n=st.integers(1, 64))
    def read(self, sector, n):
        n = min(n, SECTORS - sector)
        status, buf = do_io(self.dev, READ, sector, n)
        assert status == 0
        assert bytes(buf) == bytes(self.model[sector * SECTOR:(sector + n) * SECTOR])

    @rule()
    def flush(self):
        assert do_io(self.dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
        self._acked_flush()

    @rule()
    def drop_caches(self):
        self.control.message("wb", 0, "drop_caches")
        self._acked_flush()                 # it seals and flushes first
        assert self.status()[6] == "0"      # nr_dirty

    @rule(threshold=st.sampled_from([0, 1, 4, 127]))
    def read_cache(self, threshold):
        self.control.message("wb", 0, f"read_cache_threshold {threshold}")
        self.readcache = threshold

    @rule()
    def suspend_resume(self):
        self.control.suspend("wb")
        self._acked_flush()                 # postsuspend makes everything durable
        self.control.resume("wb")

    @rule()
    def recreate(self):
        self.control.shutdown()             # a clean remove: suspend flushes
        self._acked_flush()
        self._build()

    @rule(seed=st.none() | st.integers(0, 2 ** 32 - 1))
    def power_cut(self, seed):
        """Lose power; with a seed, a random half of the writes not yet
        flushed reached the media anyway, in any order."""
        if seed is None:
            self.pool.power_cut()
        else:
            rng = random.Random(seed)
            self.pool.power_cut(keep=lambda _off, _data: rng.random() < 0.5)
        self.control.shutdown()
        self._build()
        status, buf = do_io(self.dev, READ, 0, SECTORS)
        assert status == 0
        for s in range(SECTORS):
            got = bytes(buf[s * SECTOR:(s + 1) * SECTOR])
            want = bytes(self.durable[s * SECTOR:(s + 1) * SECTOR])
            if got != want:
                assert got in self.since.get(s, ()), f"sector {s} lost its flushed data"
        self.model[:] = buf
        self._acked_flush()

    def status(self):
        return self.control.status("wb")[0][3].split()

    @invariant()
    def alive(self):
        if hasattr(self, "control"):
            assert self.status()[-1] == "active"


TestWriteboostModel = WriteboostModel.TestCase
TestWriteboostModel.settings = settings(
    max_examples=int(os.environ.get("PYDM_WB_EXAMPLES", "60")), stateful_step_count=40,
    deadline=None, suppress_health_check=[HealthCheck.too_slow])
