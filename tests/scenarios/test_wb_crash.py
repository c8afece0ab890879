"""writeboost after crashes: kill -9 of a ``pydm serve`` daemon in the middle
of random 4 KiB writes and flushes over NBD (a recording client on the lower
half of the device, which knows what it was promised, and fio randwrite
with an fsync every 4 writes on the upper half), many times over the same
files (the log wraps), and a power-cut matrix (every write to the cache, or to the
backing, after the Nth is lost, for N across a whole fixed workload).  Each
time the cache's log must be clean but for a torn tail, and a new target
over the files must read back every write an acknowledged flush (or FUA)
covered; newer data is allowed."""

import os
import random
import signal
import subprocess
import threading

from helpers import Daemon, do_io
from nbd_support import need
from nbdclient import Client, NBDError
from pydm.bio import FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE
from pydm.control import Control
from pydm.ctlsock import ControlClient
from wb_support import (BLOCK, SECTOR, Acked, CutPool, log_after_crash, make_images, poll,
                        wb_check, wb_table)

KILLS = int(os.environ.get("PYDM_WB_KILLS", "100"))


def read_device(table, sectors):
    """The whole device, read by a new target over the files (a fresh
    Control with plain stores); it is then removed cleanly."""
    c = Control()
    try:
        dev = c.create("wb", table)
        st, buf = do_io(dev, READ, 0, sectors, timeout=60)
        assert st == 0
        return bytes(buf)
    finally:
        c.shutdown()


# ------------------------------------------------------------- kill -9
KILL_BACKING = 4 << 20            # 1024 blocks
KILL_SEGMENTS = 6                 # 762 cache blocks: a run or two wraps the log
KILL_HALF = KILL_BACKING // 2     # the recording client below, fio above


class Writer(threading.Thread):
    """Random 4 KiB writes over NBD, a flush every 1 to 6 of them, until the
    daemon dies; what was acknowledged goes into ``model``."""

    def __init__(self, addr, model, seed):
        super().__init__(daemon=True)
        self.addr, self.model = addr, model
        self.rnd = random.Random(seed)
        self.writes = 0
        self.error = None

    def run(self):
        rnd, model = self.rnd, self.model
        try:
            with Client(self.addr, "wb") as c:
                while True:
                    for _ in range(rnd.randint(1, 6)):
                        block = rnd.randrange(KILL_HALF // BLOCK)
                        data = rnd.randbytes(BLOCK)
                        handle = model.write(block * BLOCK, data)
                        c.pwrite(block * BLOCK, data)
                        model.ack(handle)
                        self.writes += 1
                    token = model.flush_sent()
                    c.flush()
                    model.flush_acked(token)
        except (EOFError, OSError):
            pass                            # the daemon was killed under us
        except NBDError as e:               # an error reply: never expected
            self.error = e


def fio_writes(log):
    """The 4 KiB writes fio says it issued before the daemon died."""
    for line in log.splitlines():
        line = line.strip()
        if line.startswith("issued rwts:"):
            return int(line.split("total=")[1].split(",")[1])
    return 0


def test_kill_9_during_flushed_random_writes_keeps_every_flushed_write(tmp_path):
    back, cache, baseline = make_images(tmp_path, KILL_BACKING, KILL_SEGMENTS)
    table = wb_table(back, cache, KILL_BACKING)
    config = tmp_path / "pydm.toml"
    config.write_text(f'[[device]]\nname = "wb"\ntable = "{table}"\n')
    nbd = str(tmp_path / "nbd.sock")
    rnd = random.Random(2024)
    totals = {"kills": 0, "writes": 0, "fio_writes": 0, "flushes": 0, "durable_blocks": 0,
              "torn_tails": 0, "wrapped_runs": 0}
    need("fio")
    fio_log = tmp_path / "fio.log"
    for run in range(KILLS):
        if os.path.exists(nbd):
            os.unlink(nbd)
        model = Acked(baseline)
        d = Daemon(tmp_path, config, extra=["--unix", nbd])
        with open(fio_log, "w") as log:
            fio = subprocess.Popen(
                ["fio", "--name=kill", "--ioengine=nbd", f"--uri=nbd+unix:///wb?socket={nbd}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=8", "--fsync=4",
                 f"--offset={KILL_HALF}", f"--size={KILL_HALF}", "--time_based",
                 "--runtime=60", f"--randseed={run + 1}"],
                stdout=log, stderr=subprocess.STDOUT)
        writer = Writer(nbd, model, seed=run)
        try:
            with ControlClient(str(d.sock)) as ctl:      # fio is connected
                poll(lambda: ctl.call("info", name="wb")[0]["open_count"] >= 1, timeout=60,
                     what="fio to connect")
            writer.start()
            goal = rnd.randint(0, 150)      # acknowledged writes before the kill
            poll(lambda: writer.writes >= goal or not writer.is_alive(), timeout=60,
                 what=f"{goal} acknowledged writes")
        finally:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            out = d.output()
            d.log.close()
            try:
                fio.wait(30)                # it stops at the lost connection
            finally:
                fio.kill()
        writer.join(30)
        assert not writer.is_alive() and writer.error is None, writer.error
        totals["fio_writes"] += fio_writes(fio_log.read_text())
        assert "Traceback" not in out and "lockdep" not in out, out
        totals["kills"] += 1
        totals["writes"] += writer.writes
        totals["flushes"] += model.flushes
        wb_check(cache, KILL_BACKING)
        start, end, torn = log_after_crash(cache, KILL_BACKING)
        totals["torn_tails"] += torn
        totals["wrapped_runs"] += end > KILL_SEGMENTS
        image = read_device(table, KILL_BACKING // SECTOR)
        totals["durable_blocks"] += model.check(image, KILL_HALF)
        baseline = image                    # the next run starts from what was there
    print("kill -9:", totals)
    assert totals["kills"] == KILLS
    if KILLS >= 20:                         # the runs did what they are for
        assert totals["flushes"] > KILLS * 5 and totals["wrapped_runs"] > KILLS // 2
        assert totals["fio_writes"] > KILLS * 10


# ------------------------------------------------------- power-cut matrix
CUT_BACKING = 2 << 20             # 512 blocks, writes to the first 192
CUT_SEGMENTS = 3                  # the log wraps every three flushes
OPS = 240
POINTS = int(os.environ.get("PYDM_WB_CUT_POINTS", "0"))   # cut points per store (0: every one)


def workload(dev, model, power, seed=11):
    """A fixed mix: 4 KiB writes, partial ones (1-7 sectors), a few FUA, a
    flush every sixth op; stops at the power cut.  A flush or FUA counts as
    acknowledged only if the power was still on when it returned."""
    rnd = random.Random(seed)
    for i in range(OPS):
        if power.cut:
            return
        if i % 6 == 5:
            token = model.flush_sent()
            assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
            if not power.cut:
                model.flush_acked(token)
            continue
        block = rnd.randrange(192)
        off, cnt = 0, 8
        if rnd.random() < 0.2:
            off = rnd.randrange(8)
            cnt = rnd.randint(1, 8 - off)
        fua = rnd.random() < 0.05
        data = rnd.randbytes(cnt * SECTOR)
        sector = block * 8 + off
        handle = model.write(sector * SECTOR, data)
        assert do_io(dev, WRITE, sector, data=data, flags=REQ_FUA if fua else 0)[0] == 0
        model.ack(handle, fua=fua and not power.cut)
    token = model.flush_sent()
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    if not power.cut:
        model.flush_acked(token)


def cut_run(tmp, victim, budget):
    """The workload over fresh files with the power cut after ``budget``
    4 KiB writes to ``victim``; (model, files, the victim's write count)."""
    back, cache, image = make_images(tmp, CUT_BACKING, CUT_SEGMENTS, seed=3)
    pool = CutPool(victim, budget)
    c = Control(stores=pool)
    model = Acked(image, unit=SECTOR)
    try:
        dev = c.create("wb", wb_table(back, cache, CUT_BACKING))
        workload(dev, model, pool.power)
    finally:
        c.shutdown()                # after a cut nothing of it reaches the files
    return model, (back, cache), pool.stores[victim].writes


def cut_points(total):
    if not POINTS or total <= POINTS:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (POINTS - 1)) for i in range(POINTS)})


def check_power_cut_matrix(tmp_path, victim):
    model, _files, total = cut_run(tmp_path, victim, None)
    assert model.flushes > OPS // 8
    points = cut_points(total)
    figures = {"writes": total, "points": len(points), "durable_sectors": 0, "torn_tails": 0}
    for n in points:
        model, (back, cache), _ = cut_run(tmp_path, victim, n)
        _start, _end, torn = log_after_crash(cache, CUT_BACKING)
        figures["torn_tails"] += torn
        image = read_device(wb_table(back, cache, CUT_BACKING), CUT_BACKING // SECTOR)
        try:
            figures["durable_sectors"] += model.check(image)
        except AssertionError as e:
            raise AssertionError(f"power cut after write {n} of {total} to {victim}: {e}")
    print(f"power cut under {victim}:", figures)
    return figures


def test_a_power_cut_at_any_cache_write_keeps_every_flushed_write(tmp_path):
    figures = check_power_cut_matrix(tmp_path, "cache.img")
    assert figures["torn_tails"] > 0          # some cuts did tear a segment


def test_a_power_cut_at_any_backing_write_keeps_every_flushed_write(tmp_path):
    figures = check_power_cut_matrix(tmp_path, "backing.img")
    assert figures["writes"] > 100            # writeback did run: the log wrapped
