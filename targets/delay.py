"""delay: hold bios for a while before issuing them (slow-disk emulation).

``delay <dev> <offset> <delay_ms> [<write_dev> <write_offset> <write_delay_ms>
[<flush_dev> <flush_offset> <flush_delay_ms>]]`` - 3, 6 or 9 arguments, as
dm-delay.  Reads use the first class; writes (and discards, write-zeroes) the
second if given; flushes the third if given, else the write class.

Delayed bios wait on a timer heap served by one thread per target, so a slow
bio never blocks the submitter or the bios behind it.  ``presuspend`` releases
every held bio at once and stops delaying until ``resume`` (as the kernel).
"""

import heapq
import itertools
import time

from pydm.bio import FLUSH, READ
from pydm.errors import TargetError
from pydm.lockdep import make_condition
from pydm.table import quote_arg
from pydm.target import NOWAIT, REMAPPED, STATUS_TABLE, SUBMITTED, Target, parse_uint
from pydm.targets.linear import area_block_status, open_area

import threading


class _Class:
    __slots__ = ("dev", "start", "delta", "delay", "arg")

    def __init__(self, target, dev_arg, offset_arg, delay_arg):
        self.dev, self.start = open_area(target, dev_arg, offset_arg)
        self.delta = self.start - target.begin
        self.delay = parse_uint(delay_arg, "delay", 1 << 31) / 1000.0
        self.arg = (dev_arg, offset_arg, delay_arg)


class DelayTarget(Target):
    name = "delay"
    version = (1, 4, 0)
    description = "delay reads, writes and flushes (slow-disk emulation)"
    features = NOWAIT     # reads are remapped as they are

    def ctr(self, args):
        if len(args) not in (3, 6, 9):
            raise TargetError("Invalid argument count: expected 3, 6 or 9")
        self._cond = make_condition(name="target")
        self._heap = []
        self._seq = itertools.count()
        self._may_delay = True
        self._stop = False
        self._thread = None
        self.read = _Class(self, *args[0:3])
        self.write = _Class(self, *args[3:6]) if len(args) >= 6 else self.read
        self.flush = _Class(self, *args[6:9]) if len(args) == 9 else self.write
        self.nargs = len(args)
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1
        self._thread = threading.Thread(target=self._run, name="pydm-delay", daemon=True)
        self._thread.start()

    def dtr(self):
        cond = getattr(self, "_cond", None)
        if cond is None:
            return
        with cond:
            self._stop = True
            cond.notify_all()
        if self._thread is not None:
            self._thread.join()
        self._release_all()

    def _class_of(self, bio):
        if bio.op == READ:
            return self.read
        if bio.op == FLUSH:
            return self.flush
        return self.write

    def map(self, bio):
        c = self._class_of(bio)
        bio.dev = c.dev
        if bio.nr_sectors:
            bio.sector += c.delta
        if not c.delay:
            return REMAPPED
        with self._cond:
            if self._may_delay and not self._stop:
                heapq.heappush(self._heap, (time.monotonic() + c.delay, next(self._seq), bio))
                self._cond.notify()
                return SUBMITTED
        return REMAPPED

    def _run(self):
        cond = self._cond
        while True:
            with cond:
                while not self._stop:
                    if self._heap:
                        wait = self._heap[0][0] - time.monotonic()
                        if wait <= 0:
                            break
                        cond.wait(wait)
                    else:
                        cond.wait()
                if self._stop:
                    return
                due = []
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[2])
            for bio in due:
                bio.dev.submit(bio)

    def _release_all(self):
        with self._cond:
            held = [b for _d, _s, b in sorted(self._heap)]
            self._heap.clear()
        for bio in held:
            bio.dev.submit(bio)

    def presuspend(self):
        with self._cond:
            self._may_delay = False
        self._release_all()

    def presuspend_undo(self):
        self.resume()

    def resume(self):
        with self._cond:
            self._may_delay = True

    def status(self, type_):
        if type_ == STATUS_TABLE:
            words = []
            for c in (self.read, self.write, self.flush)[:self.nargs // 3]:
                words += [quote_arg(c.dev.ref), str(c.start), str(int(c.delay * 1000))]
            return " ".join(words)
        return ""

    def iterate_devices(self):
        seen, out = set(), []
        for c in (self.read, self.write, self.flush):
            if id(c) not in seen:
                seen.add(id(c))
                out.append((c.dev, c.start, self.len))
        return out

    def block_status(self, context, sector, nr_sectors):
        return area_block_status(self.read.dev, context, sector + self.read.delta, nr_sectors)


TARGET = DelayTarget
