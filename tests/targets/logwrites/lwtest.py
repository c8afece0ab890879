"""Helpers of the log-writes tests: a device over a data file and a log
file, a store that holds chosen writes until the test lets them complete
(so completions can be put in any order), and the log as the independent
reader sees it."""

import os
import threading

from helpers import do_io
from pydm.bio import DISCARD, FLUSH, REQ_FUA, REQ_PREFLUSH, WRITE
from pydm.control import Control
from pydm.store import FileStore
from pydm.store_registry import StorePool
from lw_spec_reader import read_log

SECTOR = 512


class Gate:
    """A write held in its store until ``release``; ``entered`` is set once
    it is there (in flight)."""

    def __init__(self):
        self.entered = threading.Event()
        self.go = threading.Event()

    def release(self):
        self.go.set()


class GatedStore(FileStore):
    """A file store whose writes at an offset in ``gates`` (and the next
    flush, under the key "flush") wait for their gate."""

    def __init__(self, path, readonly, gates):
        super().__init__(path, readonly)
        self.gates = gates

    def write_at(self, offset, data):
        self._wait(offset)
        super().write_at(offset, data)

    def flush(self):
        self._wait("flush")
        super().flush()

    def _wait(self, key):
        gate = self.gates.pop(key, None)
        if gate is not None:
            gate.entered.set()
            assert gate.go.wait(30), "a gated I/O was never released"


class GatedPool(StorePool):
    """Every file as a GatedStore sharing one ``gates`` dict (byte offset ->
    Gate; the data file is the only one the tests gate)."""

    def __init__(self):
        self.gates = {}
        super().__init__(opener=lambda path, ro: GatedStore(path, ro, self.gates))


class Rig:
    """A log-writes device ``lw`` over ``data.img`` (random) and ``log.img``."""

    def __init__(self, tmp, sectors=8192, log_bytes=8 << 20, stores=None, data=None,
                 table=None):
        self.tmp = str(tmp)
        self.sectors = sectors
        self.data = os.path.join(self.tmp, "data.img")
        self.log = os.path.join(self.tmp, "log.img")
        if not os.path.exists(self.data):
            with open(self.data, "wb") as f:
                f.write(data if data is not None else os.urandom(sectors * SECTOR))
            with open(self.log, "wb") as f:
                f.truncate(log_bytes)
        self.initial = open(self.data, "rb").read()
        self.stores = stores
        self.control = Control(stores=stores)
        self.dev = self.control.create(
            "lw", table or f"0 {sectors} log-writes {self.data} {self.log}")

    def write(self, sector, data, flags=0):
        return do_io(self.dev, WRITE, sector, data=data, flags=flags)[0]

    def fua(self, sector, data):
        return self.write(sector, data, REQ_FUA)

    def flush(self):
        return do_io(self.dev, FLUSH, 0, flags=REQ_PREFLUSH)[0]

    def discard(self, sector, n):
        return do_io(self.dev, DISCARD, sector, n)[0]

    def mark(self, name):
        self.control.message("lw", 0, f"mark {name}")

    def status(self):
        return self.control.status("lw")[0][3]

    def settle(self):
        """Suspend and resume: the log writer has written all it was given."""
        self.control.suspend("lw")
        self.control.resume("lw")

    def entries(self):
        """The log as the independent reader sees it now."""
        return read_log(self.log)[1]

    def close(self):
        self.control.shutdown()


def kinds(entries):
    """A compact view: W<sector>, F<sector> (FUA), D<sector>, FLUSH, M:<name>."""
    out = []
    for e in entries:
        f = e["flags"]
        if f == 8:
            out.append(f"M:{e['mark']}")
        elif f & 4:
            out.append(f"D{e['sector']}")
        elif f == 1 and not e["nr"]:
            out.append("FLUSH")
        elif f & 2:
            out.append(f"F{e['sector']}")
        else:
            out.append(f"W{e['sector']}")
    return out
