"""log-writes after kill -9 of the daemon: a client writes random 4 KiB blocks
over NBD, one at a time, with a flush every 1 to 6 writes, and the daemon is
killed at a random moment.  The log (read by the independent reader) must
replay to its last durable point, and what it holds must be a state the data
device really passed through: the client's first m writes, in order, and
every write before the last FLUSH entry it holds."""

import os
import random
import signal
import sys
import threading

from helpers import Daemon
from nbdclient import Client, NBDError
from wb_support import poll

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "targets", "logwrites"))
from lw_spec_reader import apply, read_log  # noqa: E402

KILLS = int(os.environ.get("PYDM_LW_KILLS", "20"))
SIZE = 4 << 20
BLOCK = 4096


class Writer(threading.Thread):
    def __init__(self, addr, seed):
        super().__init__(daemon=True)
        self.addr = addr
        self.rnd = random.Random(seed)
        self.sent = []                  # (block, data) in the order written
        self.acked = 0
        self.flushes = 0
        self.error = None

    def run(self):
        rnd = self.rnd
        try:
            with Client(self.addr, "lw") as c:
                while True:
                    for _ in range(rnd.randint(1, 6)):
                        block, data = rnd.randrange(SIZE // BLOCK), rnd.randbytes(BLOCK)
                        self.sent.append((block, data))
                        c.pwrite(block * BLOCK, data)
                        self.acked += 1
                    c.flush()
                    self.flushes += 1
        except (EOFError, OSError):
            pass                        # killed under us
        except NBDError as e:
            self.error = e


def test_kill_9_leaves_a_log_that_replays_to_a_state_the_device_passed_through(tmp_path):
    data, log = tmp_path / "data.img", tmp_path / "log.img"
    initial = os.urandom(SIZE)
    config = tmp_path / "pydm.toml"
    config.write_text(f'[[device]]\nname = "lw"\ntable = "0 {SIZE // 512} log-writes '
                      f'{data} {log}"\n')
    nbd = str(tmp_path / "nbd.sock")
    rnd = random.Random(7)
    totals = {"kills": 0, "writes": 0, "flushes": 0, "logged_writes": 0, "logged_flushes": 0}
    for run in range(KILLS):
        data.write_bytes(initial)
        with open(log, "wb") as f:
            f.truncate(64 << 20)
        if os.path.exists(nbd):
            os.unlink(nbd)
        d = Daemon(tmp_path, config, extra=["--unix", nbd])
        w = Writer(nbd, seed=run)
        try:
            w.start()
            goal = rnd.randint(0, 200)
            poll(lambda: w.acked >= goal or not w.is_alive(), timeout=60, what="writes")
        finally:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()
            out = d.output()
            d.log.close()
        w.join(30)
        assert w.error is None and "Traceback" not in out, out
        ss, entries = read_log(log)
        writes = [(e["sector"] * ss // BLOCK, e["data"]) for e in entries
                  if e["data"] is not None]
        flush_at = [i for i, e in enumerate(entries) if e["flags"] == 1]
        m = len(writes)
        # a prefix of what the client wrote, in the order it wrote it
        assert writes == w.sent[:m], f"run {run}: the log is not a prefix of the writes"
        # up to its last durable point: nothing after the last FLUSH but the
        # start of the next flush's writes
        before_last = sum(1 for e in entries[:flush_at[-1]] if e["data"] is not None) \
            if flush_at else 0
        assert before_last <= m <= len(w.sent)
        # and replayed, it is that state of the device
        image = bytearray(initial)
        for block, payload in w.sent[:m]:
            image[block * BLOCK:(block + 1) * BLOCK] = payload
        assert apply(entries, ss, bytearray(initial)) == image
        totals["kills"] += 1
        totals["writes"] += w.acked
        totals["flushes"] += w.flushes
        totals["logged_writes"] += m
        totals["logged_flushes"] += len(flush_at)
    print("log-writes kill -9:", totals)
    assert totals["logged_flushes"] > KILLS
