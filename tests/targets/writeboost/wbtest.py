"""Helpers of the writeboost target tests: a device over two image files, its
status as named fields, and stores that count or fail their writes."""

import errno
import os
import time

from helpers import do_io
from pydm.bio import FLUSH, READ, REQ_PREFLUSH, WRITE
from pydm.control import Control
from pydm.store import FileStore
from pydm.store_registry import StorePool

SECTOR = 512
BLOCK = 4096
SEGMENT = 512 << 10
SB = 1 << 20
FIELDS = ("cursor", "nr_caches", "nr_segments", "current_id", "last_flushed",
          "last_writeback", "nr_dirty")


def status(control, name="wb"):
    """The status line as a dict: the seven counters by name, ``stats`` (16),
    ``non_full``, the tunables, and ``state`` (the words after them)."""
    words = control.status(name)[0][3].split()
    out = {k: int(v) for k, v in zip(FIELDS, words)}
    out["stats"] = [int(w) for w in words[7:23]]
    out["non_full"] = int(words[23])
    assert words[24] == "10"
    pairs = words[25:35]
    out.update({pairs[i]: int(pairs[i + 1]) for i in range(0, 10, 2)})
    out["state"] = words[35:]
    return out


def wait_until(pred, timeout=10.0):
    """Poll ``pred`` until it holds or ``timeout`` s pass (the caller's
    assertions then say what was wanted)."""
    deadline = time.monotonic() + timeout
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.01)


def stat(s, write, hit, on_buffer, full):
    return s["stats"][write << 3 | hit << 2 | on_buffer << 1 | full]


class Rig:
    """A writeboost device ``wb`` over ``backing.img`` (random data) and a
    blank ``cache.img`` of ``segments`` segments, in ``tmp``."""

    def __init__(self, tmp, sectors=8192, segments=4, opts="", stores=None):
        self.tmp = str(tmp)
        self.sectors = sectors
        self.backing = os.path.join(self.tmp, "backing.img")
        self.cache = os.path.join(self.tmp, "cache.img")
        if not os.path.exists(self.backing):
            with open(self.backing, "wb") as f:
                f.write(os.urandom(sectors * SECTOR))
            with open(self.cache, "wb") as f:
                f.truncate(SB + segments * SEGMENT)
        self.shadow = bytearray(open(self.backing, "rb").read())
        self.opts = opts
        self.stores = stores
        self.control = Control(stores=stores)
        self.dev = self.control.create("wb", self.table())

    def table(self):
        opts = f" {self.opts}" if self.opts else ""
        return f"0 {self.sectors} writeboost {self.backing} {self.cache}{opts}"

    def status(self):
        return status(self.control)

    def write(self, sector, data, flags=0):
        st, _ = do_io(self.dev, WRITE, sector, data=data, flags=flags)
        if st == 0:
            self.shadow[sector * SECTOR:sector * SECTOR + len(data)] = data
        return st

    def read(self, sector, n):
        st, buf = do_io(self.dev, READ, sector, n)
        assert st == 0
        return bytes(buf)

    def expect(self, sector, n):
        assert self.read(sector, n) == bytes(self.shadow[sector * SECTOR:(sector + n) * SECTOR])

    def flush(self):
        return do_io(self.dev, FLUSH, 0, flags=REQ_PREFLUSH)[0]

    def recreate(self, stores=None):
        self.control.shutdown()
        self.stores = stores
        self.control = Control(stores=stores)
        self.dev = self.control.create("wb", self.table())

    def close(self):
        self.control.shutdown()

    def backing_bytes(self, sector, n):
        with open(self.backing, "rb") as f:
            f.seek(sector * SECTOR)
            return f.read(n * SECTOR)


class FaultyStore(FileStore):
    """A file store that counts writes and flushes and fails the ones the
    test arms: ``fail_write_at`` (the Nth write from now) or ``fail_flush``."""

    def __init__(self, path, readonly=False):
        super().__init__(path, readonly)
        self.writes = 0
        self.flushes = 0
        self.fail_write_at = None
        self.fail_flush = False

    def write_at(self, offset, data):
        self.writes += 1
        if self.fail_write_at is not None and self.writes >= self.fail_write_at:
            raise OSError(errno.EIO, "injected write error")
        super().write_at(offset, data)

    def flush(self):
        self.flushes += 1
        if self.fail_flush:
            raise OSError(errno.EIO, "injected flush error")
        super().flush()


class FaultyPool(StorePool):
    def __init__(self):
        self.by_name = {}
        super().__init__(opener=self._open)

    def _open(self, path, readonly):
        s = FaultyStore(path, readonly)
        self.by_name[os.path.basename(path)] = s
        return s


class KillableStore(FileStore):
    """A file store whose writes stop reaching the file once ``killed``: what
    a killed daemon leaves (everything written before stays)."""

    killed = False

    def write_at(self, offset, data):
        if not self.killed:
            super().write_at(offset, data)

    def flush(self):
        if not self.killed:
            super().flush()


class KillablePool(StorePool):
    def __init__(self):
        self.opened = []
        super().__init__(opener=self._open)

    def _open(self, path, readonly):
        s = KillableStore(path, readonly)
        self.opened.append(s)
        return s

    def kill(self):
        for s in self.opened:
            s.killed = True
