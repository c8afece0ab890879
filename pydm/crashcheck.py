"""The crash harness: record a workload on a stack whose stores all live on
one log-writes device, then check the device under test at every point a
power cut could have hit (``tools/crashcheck``).

Rules of this module:

* Every store of the device under test is an area of one disk image, mapped
  by ``linear`` over one ``log-writes`` device (``lwdisk``), so one log holds
  every write to every store in the order it became durable: a prefix of the
  log is a consistent crash state of all the stores at once.
* Recording runs the stack in this process (a fresh ``Control``); the
  workload is a seeded script of writes, FUA writes and flushes (its
  promises are kept in a model, and a mark ``p<N>`` goes into the log after
  each acknowledged flush or FUA write) or a fio job over NBD (no model:
  only the stack's own rules are checked).
* Checking walks the log once, replaying it onto a running image; at every
  FLUSH and FUA entry and every promise mark (every entry with
  ``every_write``) a copy of that image
  gets a fresh ``Control`` with the device under test built over it, and the
  checkers run: ``era`` (the real era_check passes, and every era block whose
  origin data changed is reported changed), ``writeboost`` (``pydm wb
  check`` finds no damage, the device starts, it reads back) and ``data``
  (with a script workload: every unit holds its last promised data or newer).
* Nothing here prints: each crash point's verdict is handed to ``say``;
  a failure carries the commands that rebuild that state.
"""

import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field

from pydm.bio import FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE, Bio
from pydm.lockdep import make_event
from pydm.store import FileStore

MiB = 1 << 20
BLOCK = 4096
UNIT = 4096                       # the script's writes and the model's unit


# ------------------------------------------------------------------ stacks
@dataclass
class Stack:
    """Areas of the disk (name, bytes) and the devices built over them, the
    device under test last; ``checks`` names the checkers that apply."""
    kind: str
    size: int
    areas: list
    devices: list                 # [(name, table with {area} and {dev} fields)]
    checks: tuple

    def offsets(self):
        out, at = {}, 0
        for name, nbytes in self.areas:
            out[name] = at
            at += nbytes
        return out

    @property
    def disk_bytes(self) -> int:
        return sum(n for _a, n in self.areas)

    def tables(self, disk_ref):
        """[(device name, table)] over the disk (a file or ``dm:lwdisk``)."""
        offsets = self.offsets()
        out = [(name, f"0 {nbytes // 512} linear {disk_ref} {offsets[name] // 512}")
               for name, nbytes in self.areas]
        return out + [(name, table.format(n=self.size // 512)) for name, table in self.devices]


def make_stack(kind: str, size: int = 16 * MiB) -> Stack:
    cache = MiB + 8 * 512 * 1024                # eight segments: the log wraps
    if kind == "linear":
        return Stack(kind, size, [("data", size)], [("dut", "0 {n} linear dm:data 0")],
                     ("data",))
    if kind == "era":
        return Stack(kind, size, [("meta", 4 * MiB), ("origin", size)],
                     [("dut", "0 {n} era dm:meta dm:origin 128")], ("era", "data"))
    if kind == "writeboost":
        return Stack(kind, size, [("cache", cache), ("backing", size)],
                     [("dut", "0 {n} writeboost dm:backing dm:cache")], ("writeboost", "data"))
    if kind == "era-wb":
        return Stack(kind, size, [("meta", 4 * MiB), ("cache", cache), ("backing", size)],
                     [("wb", "0 {n} writeboost dm:backing dm:cache"),
                      ("dut", "0 {n} era dm:meta dm:wb 128")], ("writeboost", "era", "data"))
    raise ValueError(f"unknown stack {kind!r} (linear, era, writeboost, era-wb)")


# ------------------------------------------------------------------ model
class Promises:
    """What the device under test promised the script: per unit the data
    sent, in order, and after each acknowledged flush or FUA write which
    version of each unit is durable (``p<N>`` marks name them)."""

    def __init__(self):
        self.sent = {}                # unit -> [data, ...]
        self.acked = {}               # unit -> index of the newest acknowledged
        self.promises = []            # [{unit: index}] durable by promise N

    def durable_at(self, n: int) -> dict:
        out = {}
        for p in self.promises[:n + 1]:
            for unit, i in p.items():
                if i > out.get(unit, -1):
                    out[unit] = i
        return out

    def check(self, image: bytes, durable: dict, original: bytes):
        """None, or why ``image`` breaks a promise."""
        for unit, versions in self.sent.items():
            got = image[unit * UNIT:(unit + 1) * UNIT]
            d = durable.get(unit)
            allowed = versions[d:] if d is not None else \
                [original[unit * UNIT:(unit + 1) * UNIT]] + versions
            if got not in allowed:
                return (f"unit {unit} (byte {unit * UNIT}) lost its "
                        f"{'promised' if d is not None else 'original'} data")
        return None


def _io(dev, op, sector, data=None, nr=0, flags=0):
    done = make_event()
    box = []

    def end(bio):
        box.append(bio.status)
        done.set()
    if data is not None:
        nr = len(data) // 512
        data = memoryview(bytearray(data))
    elif op == READ:
        data = memoryview(bytearray(nr * 512))
    dev.submit(Bio(op, sector, nr, data, flags, end))
    done.wait()
    return box[0], data


def run_script(control, dut, size, ops, seed, model):
    """``ops`` random 4 KiB writes (one in 20 FUA), a flush every 1-8 of
    them; a mark after each acknowledged flush or FUA write."""
    rnd = random.Random(seed)
    units = size // UNIT
    since = 0
    for _ in range(ops):
        unit = rnd.randrange(units)
        data = rnd.randbytes(UNIT)
        fua = rnd.random() < 0.05
        model.sent.setdefault(unit, []).append(data)
        status, _ = _io(dut, WRITE, unit * UNIT // 512, data, flags=REQ_FUA if fua else 0)
        if status:
            raise RuntimeError(f"a write failed while recording: errno {status}")
        model.acked[unit] = len(model.sent[unit]) - 1
        if fua:
            model.promises.append({unit: model.acked[unit]})
            control.message("lwdisk", 0, f"mark p{len(model.promises) - 1}")
        since += 1
        if since >= rnd.randint(1, 8):
            token = dict(model.acked)
            if _io(dut, FLUSH, 0, flags=REQ_PREFLUSH)[0]:
                raise RuntimeError("a flush failed while recording")
            model.promises.append(token)
            control.message("lwdisk", 0, f"mark p{len(model.promises) - 1}")
            since = 0


def run_fio(control, work, fio_args):
    """A fio job over NBD (a Unix socket) against ``dut``."""
    from pydm.nbd.server import NBDServer
    sock = os.path.join(work, "nbd.sock")
    server = NBDServer(control, [("unix", sock)])
    server.start()
    try:
        r = subprocess.run(["fio", "--name=crash", "--ioengine=nbd",
                            f"--uri=nbd+unix:///dut?socket={sock}", *fio_args],
                           capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"fio failed: {r.stderr.strip() or r.stdout[-500:]}")
    finally:
        server.stop()


@dataclass
class Recording:
    stack: Stack
    work: str
    disk: str                     # the disk image the log was written over
    log: str
    model: Promises = None
    entries: int = 0


def record(stack, work, workload="script", ops=300, seed=1, fio_args=(),
           log_bytes=512 * MiB) -> Recording:
    """Run the workload on the stack over a log-writes device; returns where
    the log is.  The disk starts blank (sparse zeros)."""
    from pydm.control import Control
    disk, log = os.path.join(work, "disk.img"), os.path.join(work, "log.img")
    for path, nbytes in ((disk, stack.disk_bytes), (log, log_bytes)):
        with open(path, "wb") as f:
            f.truncate(nbytes)
    c = Control()
    rec = Recording(stack, work, disk, log)
    try:
        c.create("lwdisk", f"0 {stack.disk_bytes // 512} log-writes {disk} {log}")
        for name, table in stack.tables("dm:lwdisk"):
            c.create(name, table)
        if workload == "script":
            rec.model = Promises()
            run_script(c, c.get("dut"), stack.size, ops, seed, rec.model)
        else:
            run_fio(c, work, fio_args)
    finally:
        c.shutdown()
    return rec


# ------------------------------------------------------------------ checks
@dataclass
class Verdict:
    entry: int
    flags: str
    problems: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _area(image, stack, name, out):
    """Copy area ``name`` of the disk image ``image`` into the file ``out``."""
    at = stack.offsets()[name]
    nbytes = dict(stack.areas)[name]
    with open(image, "rb") as src, open(out, "wb") as dst:
        src.seek(at)
        left = nbytes
        while left:
            chunk = src.read(min(left, 8 * MiB))
            if not chunk:
                dst.truncate(nbytes)
                break
            dst.write(chunk)
            left -= len(chunk)


def check_point(rec, image, entry, flags, last_promise) -> Verdict:
    """Build the device under test over a copy of the disk at this crash
    point and run the stack's checkers."""
    from pydm.control import Control
    v = Verdict(entry, flags)
    stack, work = rec.stack, rec.work
    if "era" in stack.checks:
        meta = os.path.join(work, "meta-check.img")
        _area(image, stack, "meta", meta)
        blank = open(meta, "rb").read(4096) == bytes(4096)
        if not blank:
            r = subprocess.run(["era_check", meta], capture_output=True, text=True)
            if r.returncode:
                v.problems.append(f"era_check: {(r.stdout + r.stderr).strip()[-300:]}")
    if "writeboost" in stack.checks:
        cache = os.path.join(work, "cache-check.img")
        _area(image, stack, "cache", cache)
        if open(cache, "rb").read(512) != bytes(512):
            problem = _wb_check(cache, stack.size)
            if problem:
                v.problems.append(problem)
    if v.problems:
        return v
    c = Control()
    try:
        for name, table in stack.tables(image):
            c.create(name, table)
        status, data = _io(c.get("dut"), READ, 0, nr=stack.size // 512)
    except Exception as e:                  # noqa: BLE001 - it is the verdict
        v.problems.append(f"the device under test does not start: {e}")
        return v
    finally:
        c.shutdown()
    if status:
        v.problems.append(f"the device under test cannot be read: errno {status}")
        return v
    if "era" in stack.checks:
        if not blank:
            _era_changed(meta, bytes(data), v)
        elif any(data):
            v.problems.append("the origin holds written data, but era's metadata was "
                              "never committed")
    if rec.model is not None and "data" in stack.checks:
        durable = rec.model.durable_at(last_promise) if last_promise is not None else {}
        why = rec.model.check(bytes(data), durable, bytes(stack.size))
        if why:
            v.problems.append(why)
    return v


def _wb_check(cache, size):
    from pydm.cli import main as pydm_main
    import contextlib
    import io
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = pydm_main(["wb", "check", cache, "--backing-size", str(size)])
    if rc:
        return f"pydm wb check: {(out.getvalue() + err.getvalue()).strip()[-300:]}"
    return None


def _era_changed(meta, data, v):
    """Every era block whose data differs from the disk's first state (zeros)
    is reported changed by the metadata as it was at the crash point (the
    era target's rule: a block's mark is committed before its write reaches
    the origin)."""
    from pydm.metadata.era_md import EraMetadata
    store = FileStore(meta, readonly=True)
    try:
        md = EraMetadata.open(store, readonly=True, load_space_map=False)
        changed = md.changed_since(1)
        bs = md.data_block_size * 512
    finally:
        store.close()
    zero = bytes(bs)
    for b in range(len(data) // bs):
        if data[b * bs:(b + 1) * bs] != zero and not changed[b]:
            v.problems.append(f"era block {b} holds written data but is not reported "
                              f"changed")
            return


# ------------------------------------------------------------------ driver
def crash_points(rec, every_write=False, say=None):
    """Walk the log once; at every FLUSH or FUA entry and every promise mark
    (right after a promise is where a broken one shows), or at every entry
    with ``every_write``, check the crash state.  Returns the verdicts."""
    from pydm.targets.logwrites import format as F
    from pydm.targets.logwrites.replay import Log
    work = rec.work
    running = os.path.join(work, "running.img")
    with open(running, "wb") as f:
        f.truncate(rec.stack.disk_bytes)
    image = os.path.join(work, "point.img")
    log_store = FileStore(rec.log, readonly=True)
    target = FileStore(running)
    verdicts = []
    last_promise = None
    try:
        log = Log(log_store)
        rec.entries = log.nr_entries
        for e in log.walk():
            if e.flags & F.DISCARD:
                target.write_zeroes(e.sector * log.ss, e.nr_sectors * log.ss, True)
            elif e.nr_sectors:
                target.write_at(e.sector * log.ss, log.payload(e))
            if e.flags & F.MARK and e.text.startswith(b"p"):
                last_promise = int(e.text[1:])
            promise = e.flags & F.MARK and e.text.startswith(b"p")
            if not (every_write or promise or e.flags & (F.FLUSH | F.FUA)):
                continue
            shutil.copyfile(running, image)
            v = check_point(rec, image, e.index, F.flag_names(e.flags), last_promise)
            verdicts.append(v)
            if say is not None:
                say(v)
    finally:
        log_store.close()
        target.close()
    return verdicts


def reproduce(rec, v) -> str:
    """Commands that rebuild the state of crash point ``v``."""
    lines = [f"truncate -s {rec.stack.disk_bytes} crash.img",
             f"pydm lw replay --log {rec.log} --replay crash.img --limit {v.entry + 1}"]
    lines += [f"pydm dm create {name} --table '{table}'"
              for name, table in rec.stack.tables("crash.img")]
    return "\n".join(lines)
