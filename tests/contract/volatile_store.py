"""A store with a volatile write cache, for checking what flush and FUA
promise: writes sit in the cache until a flush; ``power_cut()`` throws the
cache away and drops every later write, as a machine that lost power would.
The files under it then hold exactly what was durable."""

import threading

from pydm.store import FileStore, Store
from pydm.store_registry import StorePool


class VolatileStore(Store):
    def __init__(self, path, readonly=False):
        self.inner = FileStore(path, readonly)
        self.path, self.name, self.key = self.inner.path, self.inner.name, self.inner.key
        self.readonly = readonly
        self.size = self.inner.size
        self.is_file = self.inner.is_file
        self.cache = []             # (offset, bytes), oldest first
        self.dead = False
        self.flushes = 0
        self.lock = threading.Lock()

    def refresh_size(self):
        self.size = self.inner.refresh_size()
        return self.size

    def capabilities(self):
        return self.inner.capabilities()

    def readinto_at(self, buf, offset):
        self.inner.readinto_at(buf, offset)
        end = offset + len(buf)
        mv = memoryview(buf).cast("B")
        with self.lock:
            for off, data in self.cache:
                lo, hi = max(off, offset), min(off + len(data), end)
                if lo < hi:
                    mv[lo - offset:hi - offset] = data[lo - off:hi - off]

    def write_at(self, offset, data):
        with self.lock:
            if not self.dead:
                self.cache.append((offset, bytes(data)))

    def discard(self, offset, length):
        self.write_at(offset, bytes(length))

    def write_zeroes(self, offset, length, may_unmap=True, fallback=True):
        self.write_at(offset, bytes(length))

    def flush(self):
        with self.lock:
            if self.dead:
                return
            cache, self.cache = self.cache, []
            self.flushes += 1
        for off, data in cache:
            self.inner.write_at(off, data)
        self.inner.flush()

    def power_cut(self, keep=None):
        """Lose power: the write cache is gone, and so is every later write.
        ``keep(offset, data)``, when given, names cached writes that reached
        the media anyway (a device may persist unflushed writes in any
        order); they are applied, oldest first."""
        with self.lock:
            cache, self.cache = self.cache, []
            self.dead = True
        kept = [(off, data) for off, data in cache if keep is not None and keep(off, data)]
        for off, data in kept:
            self.inner.write_at(off, data)
        if kept:
            self.inner.flush()

    def extents(self, offset, length):
        return self.inner.extents(offset, length)

    def close(self):
        self.inner.close()


class VolatilePool(StorePool):
    """A StorePool whose files sit behind volatile caches."""

    def __init__(self):
        self.opened = []
        super().__init__(opener=self._open_volatile)

    def _open_volatile(self, path, readonly):
        s = VolatileStore(path, readonly)
        self.opened.append(s)
        return s

    def power_cut(self, keep=None):
        for s in self.opened:
            s.power_cut(keep)
