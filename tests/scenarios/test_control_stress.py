"""Control-plane stress: 8 threads racing control commands over the real control
socket while I/O runs (acceptance: no deadlock, every bio completed exactly once,
no double remove, no lock-order report).  The tables include writeboost caches
(loads over a cache another table of the same device still holds, drop_caches
racing suspends and removes), log-writes logs (marks racing the same), and
areas of a remote disk over the NBD store.

PYDM_STRESS_SECONDS sets the length (default 30).
"""

import errno
import os
import random
import sys
import threading
import time
import traceback

from helpers import make_image
from pydm import lockdep, trace
from pydm.bio import Bio, FLUSH, READ, REQ_PREFLUSH, WRITE
from pydm.control import Control
from pydm.ctlsock import ControlClient, ControlError, ControlServer
from pydm.errors import DMError
from pydm.target import REMAPPED, Target

SECONDS = float(os.environ.get("PYDM_STRESS_SECONDS", "30"))
NAMES = [f"d{i}" for i in range(4)]


class Chk(Target):
    """chk <store>: linear, plus a 'checkpoint' message that quiesces the device
    and runs under a target lock (the era pattern)."""

    name = "chk"

    def ctr(self, args):
        self.dev = self.ctx.get_device(args[0])
        self.lock = lockdep.make_lock("target")
        self.checkpoints = 0
        self.num_discard_bios = 1

    def map(self, bio):
        bio.dev = self.dev
        return REMAPPED

    def message(self, argv):
        if argv != ["checkpoint"]:
            return super().message(argv)
        with self.ctx.quiesce():
            with self.lock:
                self.checkpoints += 1
                time.sleep(0.001)
        return str(self.checkpoints)


class IoStats:
    def __init__(self):
        self.lock = threading.Lock()
        self.outstanding = {}
        self.completed = {}

    def done(self, bio):
        with self.lock:
            self.completed[bio.id] = self.completed.get(bio.id, 0) + 1
            self.outstanding.pop(bio.id, None)


REMOTE_LOADS = []               # tables over the remote disk that loaded


def control_worker(n, sock, tables, stop, errors):
    rnd = random.Random(n)
    c = ControlClient(str(sock))
    ops = 0
    try:
        while not stop.is_set():
            name = rnd.choice(NAMES)
            op = rnd.choice(["create", "load", "resume", "resume", "suspend", "suspend_nf",
                             "message", "remove", "status", "info", "clear", "table",
                             "remove_force"])
            try:
                if op in ("create", "load"):
                    table = rnd.choice(tables[name])
                    c.call(op, name=name, table=table)
                    if "nbd://" in table:
                        REMOTE_LOADS.append(name)
                elif op == "resume":
                    c.call("resume", name=name)
                elif op == "suspend":
                    c.call("suspend", name=name)
                elif op == "suspend_nf":
                    c.call("suspend", name=name, noflush=True)
                elif op == "message":
                    c.call("message", name=name, sector=0,
                           text=rnd.choice(["checkpoint", "checkpoint", "bogus",
                                            "drop_caches"]))
                elif op == "remove":
                    c.call("remove", name=name)
                elif op == "remove_force":
                    c.call("remove", name=rnd.choice(NAMES + ["base"]), force=True)
                else:
                    c.call(op, name=name)
            except ControlError as e:
                if e.errno not in (errno.ENXIO, errno.EBUSY, errno.EINVAL):
                    errors.append(f"{op} {name}: {e} ({e.errno})")
                if "internal error" in str(e):
                    errors.append(f"{op} {name}: {e}")
            ops += 1
    finally:
        c.close()
    return ops


def io_worker(n, control, stats, stop, errors):
    rnd = random.Random(1000 + n)
    while not stop.is_set():
        with stats.lock:
            busy = len(stats.outstanding)
        if busy > 64:
            time.sleep(0.001)
            continue
        try:
            dev = control.get(rnd.choice(NAMES))
        except DMError:
            time.sleep(0.0005)
            continue
        kind = rnd.random()
        if kind < 0.05:
            b = Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, stats.done)
        else:
            op = READ if kind < 0.5 else WRITE
            sector = rnd.randrange(0, 1024) * 8
            b = Bio(op, sector, 8, memoryview(bytearray(4096)), 0, stats.done)
        with stats.lock:
            stats.outstanding[b.id] = (time.monotonic(), b)
        dev.submit(b)


def all_stacks():
    """Every thread's stack, to show where a hang is."""
    names = {t.ident: t.name for t in threading.enumerate()}
    return "\n".join(f"--- {names.get(ident, ident)}\n" + "".join(traceback.format_stack(frame))
                     for ident, frame in sys._current_frames().items())


def test_control_plane_stress(tmp_path, rv_session, remote):
    # Each name has its own files (two devices may not write one file), and
    # one file is shared, so that loads racing for it meet the claims.  A
    # remote disk (nbdkit, over the NBD store) has an area per name and one
    # shared: stores open and close over the network under the races too.
    shared = make_image(tmp_path / "shared.img", 8 << 20)
    far = remote("memory", size=(len(NAMES) + 1) * (4 << 20)).uri
    tables = {}
    for i, name in enumerate(NAMES):
        a = make_image(tmp_path / f"a-{name}.img", 8 << 20)
        b = make_image(tmp_path / f"b-{name}.img", 8 << 20)
        cache = make_image(tmp_path / f"c-{name}.img", 3 << 20)
        lwlog = make_image(tmp_path / f"l-{name}.img", 16 << 20)
        tables[name] = [
            f"0 8192 log-writes {b} {lwlog}\n",
            f"0 8192 writeboost {a} {cache}\n",
            f"0 8192 writeboost {b} {cache} 2 writeback_threshold 100\n",
            f"0 8192 linear {a} 0\n",
            f"0 4096 linear {a} 0\n4096 4096 linear {b} 0\n",
            f"0 8192 chk {b}\n",
            f"0 8192 flakey {a} 0 1 1 1 drop_writes\n",
            f"0 8192 delay {b} 0 2\n",
            "0 8192 zero\n",
            f"0 4096 chk {a}\n4096 4096 error\n",
            "0 8192 linear dm:base 0\n",
            f"0 8192 linear {shared} 0\n",
            f"0 8192 linear {far} {i * 8192}\n",
            f"0 4096 linear {far} {len(NAMES) * 8192}\n4096 4096 linear {a} 0\n",
        ]
    b = make_image(tmp_path / "base.img", 8 << 20)
    control = Control()
    control.targets.register(Chk)
    base_minor = control.create("base", f"0 8192 linear {b} 0\n").minor
    server = ControlServer(control, str(tmp_path / "ctl.sock"))
    server.start()
    stats = IoStats()
    stop = threading.Event()
    errors = []
    results = {}
    rec = trace.Recorder()
    trace.attach(rec)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(
                   i, control_worker(i, tmp_path / "ctl.sock", tables, stop, errors)))
               for i in range(8)]
    threads += [threading.Thread(target=io_worker, args=(i, control, stats, stop, errors))
                for i in range(3)]
    try:
        for t in threads:
            t.start()
        time.sleep(SECONDS)
        stop.set()
        for t in threads:
            t.join(60)
        hung = [t.name for t in threads if t.is_alive()]
        assert not hung, f"threads did not finish (deadlock?): {hung}\n{all_stacks()}"
        # Let held I/O go: resume what is suspended, then remove everything.
        for name in control.names():
            try:
                control.resume(name)
            except DMError:
                pass
        control.shutdown()
        deadline = time.monotonic() + 30
        while stats.outstanding and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        trace.detach(rec)
        server.stop()
    # every monitor has watched the run (tests/conftest.py); after the
    # shutdown nothing may be left half-way (a bio never completed...)
    rv_session.end_check()
    assert rv_session.monitors["control_plane"].events_seen
    assert not errors, "\n".join(errors[:20])
    assert not stats.outstanding, f"{len(stats.outstanding)} bios never completed"
    assert all(v == 1 for v in stats.completed.values()), "a bio completed twice"
    assert sum(results.values()) > 200, results
    assert len(stats.completed) > 1000
    removes = {}
    for e in rec.named("dev_remove"):
        removes[e["minor"]] = removes.get(e["minor"], 0) + 1
    assert removes and all(v == 1 for v in removes.values()), "a device was removed twice"
    creates = {e["minor"] for e in rec.named("dev_create")}
    assert set(removes) <= creates | {base_minor}
    assert REMOTE_LOADS, "no table over the remote disk ever loaded"
    print(f"control ops: {sum(results.values())}, bios: {len(stats.completed)}, "
          f"devices removed: {len(removes)}, loads over the remote disk: {len(REMOTE_LOADS)}")
