"""Helpers of the writeboost scenario tests: image files, what a client was
promised (``Acked``), stores that fail or lose writes on cue, the check of a
cache's log after a crash, and an in-process NBD server.

What a client was promised, the block-device contract: a unit (a sector or
a 4 KiB block) read back after a crash holds the data of the newest write
an acknowledged flush covered (a flush covers every write acknowledged
before it was sent; an acknowledged FUA write covers itself), or the data
of a write sent after that one.  Before any such write, the original data
or anything written since.
"""

import contextlib
import errno
import io
import os
import random
import sys
import threading
import time

from pydm.cli import main as pydm_main
from pydm.store import FileStore
from pydm.store_registry import StorePool
from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost import replay

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "targets", "writeboost"))

import wbtest  # noqa: E402
from nbd_support import start_server  # noqa: E402

status = wbtest.status          # the status line as named fields

SECTOR = 512
BLOCK = 4096
SEGMENT = 512 << 10
SB = 1 << 20
FOREVER = 1 << 62


def cache_size(nr_segments):
    return SB + nr_segments * SEGMENT


def make_images(tmp, backing_bytes, nr_segments, seed=1, fill=None):
    """``backing.img`` (random data, or ``fill`` bytes) and a blank
    ``cache.img`` of ``nr_segments`` slots in ``tmp``; (backing, cache,
    the backing's bytes)."""
    back = os.path.join(str(tmp), "backing.img")
    cache = os.path.join(str(tmp), "cache.img")
    data = fill if fill is not None else random.Random(seed).randbytes(backing_bytes)
    with open(back, "wb") as f:
        f.write(data)
    with open(cache, "wb") as f:
        f.truncate(cache_size(nr_segments))
    return back, cache, bytes(data)


def wb_table(back, cache, backing_bytes, opts=""):
    return f"0 {backing_bytes // SECTOR} writeboost {back} {cache} {opts}".rstrip()


def poll(pred, timeout=10.0, what="the condition"):
    """Until ``pred()`` is true (returns its value); AssertionError after
    ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def timed(fn, *args, **kw):
    """(the exception fn raised or None, seconds it took)."""
    t0 = time.monotonic()
    try:
        fn(*args, **kw)
        err = None
    except Exception as e:          # noqa: BLE001 - the caller judges it
        err = e
    return err, time.monotonic() - t0


def serve(control, tmp):
    """An in-process NBD server over ``control`` on a unix socket only."""
    return start_server(control, str(tmp), listen=[("unix", os.path.join(str(tmp), "nbd.sock"))])


# ------------------------------------------------------------ the promises
class Acked:
    """Per unit: every write sent to it, in order, the newest acknowledged
    and the newest made durable (see the module's docstring)."""

    def __init__(self, image, unit=BLOCK):
        self.image = bytes(image)
        self.unit = unit
        self.sent = {}           # unit -> [data, ...] in the order sent
        self.acked = {}          # unit -> index in sent of the newest acknowledged
        self.durable = {}        # unit -> index in sent covered by a flush or FUA
        self.failed = {}         # unit -> indices in sent of writes that got an error
        self.flushes = 0         # acknowledged flushes
        self.lock = threading.Lock()   # clients on several threads (each its own units)

    def write(self, offset, data):
        """Register a write about to be sent; the handle for ``ack``."""
        u = self.unit
        assert offset % u == 0 and len(data) % u == 0
        handle = []
        with self.lock:
            for k in range(len(data) // u):
                n = offset // u + k
                versions = self.sent.setdefault(n, [])
                versions.append(bytes(data[k * u:(k + 1) * u]))
                handle.append((n, len(versions) - 1))
        return handle

    def ack(self, handle, fua=False):
        with self.lock:
            for n, i in handle:
                if i > self.acked.get(n, -1):
                    self.acked[n] = i
                if fua and i > self.durable.get(n, -1):
                    self.durable[n] = i

    def fail(self, handle):
        """A write that got an error: its units hold undefined data (old or new)."""
        with self.lock:
            for n, i in handle:
                self.failed.setdefault(n, []).append(i)

    def flush_sent(self):
        """What a flush sent now covers: the token for ``flush_acked``."""
        with self.lock:
            return dict(self.acked)

    def flush_acked(self, token):
        with self.lock:
            self.flushes += 1
            for n, i in token.items():
                if i > self.durable.get(n, -1):
                    self.durable[n] = i

    def original(self, n):
        return self.image[n * self.unit:(n + 1) * self.unit]

    def latest(self, n):
        """The newest acknowledged data of unit ``n`` (what reads must see
        while the device runs)."""
        i = self.acked.get(n)
        return self.original(n) if i is None else self.sent[n][i]

    def latest_image(self):
        out = bytearray(self.image)
        for n in self.acked:
            out[n * self.unit:(n + 1) * self.unit] = self.latest(n)
        return bytes(out)

    def check_live(self, image):
        """``image`` (the whole device read while it runs) holds each unit's
        newest acknowledged data, or that of a later write that failed."""
        u = self.unit
        want = self.latest_image()
        for n in range(len(image) // u):
            got = image[n * u:(n + 1) * u]
            if got == want[n * u:(n + 1) * u]:
                continue
            later = [self.sent[n][i] for i in self.failed.get(n, ())
                     if i > self.acked.get(n, -1)]
            assert got in later, (f"unit {n} ({u} bytes at {n * u}) reads neither its newest "
                                  f"acknowledged data nor that of a failed write after it")

    def check(self, image, end=None):
        """``image`` (the whole device read back after a crash) keeps every
        promise (in its first ``end`` bytes: the units this model saw
        written); returns how many units held promised (durable) data."""
        assert len(image) == len(self.image)
        u = self.unit
        for n in range((len(image) if end is None else end) // u):
            got = image[n * u:(n + 1) * u]
            versions = self.sent.get(n, [])
            d = self.durable.get(n)
            allowed = versions[d:] if d is not None else [self.original(n)] + versions
            if got not in allowed:
                was = "durable" if d is not None else "original"
                raise AssertionError(
                    f"unit {n} ({u} bytes at {n * u}) lost its {was} data: it holds none of "
                    f"the {len(allowed)} versions allowed ({len(versions)} written, "
                    f"durable index {d})")
        return len(self.durable)


# --------------------------------------------------- stores that misbehave
class FaultStore(FileStore):
    """A file store that counts every read, write and flush (also after a
    failure) and fails the ones ``fail`` arms with EIO.  ``watch(op, n)``,
    if set, is called before each write and flush (on the I/O's thread)."""

    watch = None

    def __init__(self, path, readonly=False):
        super().__init__(path, readonly)
        self._lock = threading.Lock()
        self.counts = {"read": 0, "write": 0, "flush": 0}
        self.failed = []                      # [(op, its number)] of injected errors
        self._bad = {"write": range(0), "flush": range(0)}

    def fail(self, op, nth=1, times=1):
        """The ``nth`` ``op`` ("write" or "flush") from now fails, and the
        ``times - 1`` after it (``times=None``: every one from then on)."""
        with self._lock:
            first = self.counts[op] + nth
            self._bad[op] = range(first, FOREVER if times is None else first + times)

    def _next(self, op):
        with self._lock:
            n = self.counts[op] = self.counts[op] + 1
            bad = n in self._bad.get(op, ())
            if bad:
                self.failed.append((op, n))
        if self.watch is not None and op != "read":
            self.watch(op, n)
        if bad:
            raise OSError(errno.EIO, f"injected {op} error")

    def readinto_at(self, buf, offset):
        self._next("read")
        super().readinto_at(buf, offset)

    def write_at(self, offset, data):
        self._next("write")
        super().write_at(offset, data)

    def flush(self):
        self._next("flush")
        super().flush()

    def changes(self):
        """(writes, flushes) so far."""
        with self._lock:
            return self.counts["write"], self.counts["flush"]


class NamedPool(StorePool):
    """Every file a table names opens as ``factory(path, readonly)``;
    ``pool[name]`` is the store of the file of that base name."""

    def __init__(self, factory):
        self.stores = {}
        self._factory = factory
        super().__init__(opener=self._open_named)

    def _open_named(self, path, readonly):
        s = self._factory(path, readonly)
        self.stores[os.path.basename(path)] = s
        return s

    def __getitem__(self, name):
        return self.stores[name]


class FaultPool(NamedPool):
    """Every file as a ``FaultStore``."""

    def __init__(self):
        super().__init__(FaultStore)

    def changes(self):
        return {name: s.changes() for name, s in sorted(self.stores.items())}


class Power:
    """The machine's power, shared by every store of a ``CutPool``."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cut = False


class CutStore(FileStore):
    """A file store that counts its writes per 4 KiB (a longer write may be
    torn between blocks) and, with a ``budget``, cuts the power after that
    many: from then on no store of the pool writes or flushes anything, and
    says it did."""

    UNIT = 4096

    def __init__(self, path, readonly, power, budget=None):
        super().__init__(path, readonly)
        self.power = power
        self.budget = budget
        self.writes = 0

    def write_at(self, offset, data):
        mv = memoryview(data).cast("B")
        for pos in range(0, len(mv), self.UNIT):
            with self.power.lock:
                self.writes += 1
                if self.budget is not None and self.writes > self.budget:
                    self.power.cut = True
                if self.power.cut:
                    continue
            super().write_at(offset + pos, mv[pos:pos + self.UNIT])

    def flush(self):
        if not self.power.cut:
            super().flush()


class CutPool(NamedPool):
    """Stores for one run of a power-cut test: the file named ``victim``
    cuts the power after ``budget`` 4 KiB writes (None: never)."""

    def __init__(self, victim=None, budget=None):
        self.power = Power()
        self.victim = victim
        self.budget = budget
        super().__init__(self._cut_store)

    def _cut_store(self, path, readonly):
        budget = self.budget if os.path.basename(path) == self.victim else None
        return CutStore(path, readonly, self.power, budget)


# ------------------------------------------------- the log after a crash
def log_after_crash(cache, backing_bytes):
    """Scan ``cache`` as replay does and require it clean but for a torn
    tail: every unsound segment is the one after the log's end, and no
    sound segment lies past it.  Returns (first id, last id, torn)."""
    store = FileStore(cache, readonly=True)
    try:
        geo = L.Geometry(store.size)
        sound, problems = replay.scan(store.read_at, geo, backing_bytes // SECTOR)
    finally:
        store.close()
    start, end = replay.log_run(sound, geo.nr_segments)
    assert all(seg_id == end + 1 for _slot, seg_id, _why in problems), (end, problems)
    past = sorted(i for i in sound if i > end)
    assert not past, f"sound segments {past} past the log's end {end}"
    return start, end, len(problems)


# notes ``pydm wb check`` may print after a crash (anything else fails)
CRASH_NOTES = ("is a torn write at the tail of the log", "of older laps", "the record (")


def wb_check(cache, backing_bytes):
    """``pydm wb check CACHE --backing-size N`` (run in this process): it
    must find no damage and note nothing but what a crash leaves; returns
    its last line."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pydm_main(["wb", "check", str(cache), "--backing-size", str(backing_bytes)])
    text = out.getvalue()
    assert rc == 0 and not err.getvalue(), text + err.getvalue()
    for line in text.splitlines():
        assert not line.startswith("damage:"), text
        if line.startswith("note:"):
            assert any(n in line for n in CRASH_NOTES), text
    return text.splitlines()[-1]
