#!/usr/bin/env python3
"""log-writes against linear over NBD, and the replay tool's speed.

Method: one `pydm serve` holds ``lin`` (linear over a 256 MiB image of
random data) and ``lw`` (log-writes over another such image, logging to a
preallocated log of --log-mib); fio's nbd engine runs each job against both,
alternating within every round, --runs rounds, medians and lw/linear.  The
log is started afresh (the device is reloaded) before every log-writes run.
fio's jobs issue no flush, so log-writes holds completed writes in RAM and
spills them to the log every 64 MiB (no flush of either device: the log's
pages are left dirty, as linear's are).  Then, in-process: a log of --entries 4 KiB writes
(a flush every 8) is replayed onto a file with ``pydm lw replay``.

    .venv/bin/python tools/bench_logwrites.py [--runs 3] [--runtime 4] [--jobs 1,2]

Goals (the log-writes issue): log-writes costs at most 2x linear's time
(lw/linear >= 0.5) for randwrite 4k QD16 and write 1m QD4; 10^5 entries
replay in under 5 s.  A benchmark, not a test: it prints, it asserts nothing.
"""

import argparse
import os
import statistics
import subprocess
import sys
import time

from nbdbench import (fmt, free_port, make_image, preallocated, pydm, run_fio, run_in_workdir,
                      start_pydm, stop)

SIZE = 256 << 20
JOBS = [("randwrite 4k QD16", "randwrite", "4k", 16, "iops"),
        ("write 1m QD4", "write", "1m", 4, "bw")]




def bench_nbd(work, args):
    lin, data = os.path.join(work, "lin.img"), os.path.join(work, "data.img")
    make_image(lin, SIZE)
    make_image(data, SIZE)      # written alike (a copy's page cache differs: make_image)
    log = preallocated(os.path.join(work, "log.img"), args.log_mib)
    sectors = SIZE >> 9
    lw_table = f"0 {sectors} log-writes {data} {log}"
    port = free_port()
    proc, sock = start_pydm(work, [("lin", f"0 {sectors} linear {lin} 0"), ("lw", lw_table)],
                            port)
    samples, full = {}, set()
    jobs = args.jobs or JOBS
    try:
        for r in range(args.runs):
            for j, (name, rw, bs, qd, metric) in enumerate(jobs):
                for dev in (("lin", "lw") if (r + j) % 2 == 0 else ("lw", "lin")):
                    if dev == "lw":             # a fresh log for every run
                        pydm(sock, "dm", "load", "lw", "--table", lw_table)
                        pydm(sock, "dm", "resume", "lw")
                    bw, iops = run_fio(f"nbd://127.0.0.1:{port}/{dev}", rw, bs, qd,
                                       args.runtime)
                    samples.setdefault((name, dev), []).append(bw if metric == "bw" else iops)
                    note = ""
                    if dev == "lw" and "logging_disabled" in pydm(sock, "dm", "status", "lw"):
                        full.add(name)          # the rest of the run went unlogged
                        note = "  LOG FULL: not a valid run"
                    print(f"round {r + 1} {name:<20} {dev:<4} "
                          f"{fmt(metric, samples[(name, dev)][-1])}{note}", file=sys.stderr)
    finally:
        stop([proc])
    print(f"medians of {args.runs} runs, {args.runtime} s each, 256 MiB device, "
          f"{args.log_mib} MiB log")
    print(f"{'job':<22}{'linear':>14}{'log-writes':>14}{'lw/linear':>11}{'goal':>7}")
    for name, _rw, _bs, _qd, metric in jobs:
        a = statistics.median(samples[(name, "lin")])
        b = statistics.median(samples[(name, "lw")])
        print(f"{name:<22}{fmt(metric, a):>14}{fmt(metric, b):>14}{b / a:>10.2f}x{'>=0.5':>7}"
              + ("  NOT VALID: the log filled up (give --log-mib more)" if name in full else ""))


WRITE_LOG = r"""
import os, random, sys
os.environ["PYDM_LOCKDEP"] = "0"
from pydm.bio import Bio, FLUSH, REQ_PREFLUSH, WRITE
from pydm.control import Control
work, n = sys.argv[1], int(sys.argv[2])
data, log = os.path.join(work, "rdata.img"), os.path.join(work, "rlog.img")
with open(data, "wb") as f:
    f.truncate(256 << 20)
with open(log, "wb") as f:
    f.truncate((n + n // 8 + 16) * 4608)
c = Control()
d = c.create("lw", f"0 {(256 << 20) >> 9} log-writes {data} {log}")
rnd = random.Random(1)
buf = memoryview(os.urandom(4096))
done = lambda b: None
for i in range(n):
    d.submit(Bio(WRITE, rnd.randrange(65536) * 8, 8, buf, 0, done))
    if i % 8 == 7:
        d.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, done))
c.shutdown()
"""


def bench_replay(work, args):
    subprocess.run([sys.executable, "-c", WRITE_LOG, work, str(args.entries)], check=True)
    log = os.path.join(work, "rlog.img")
    target = os.path.join(work, "replayed.img")
    with open(target, "wb") as f:
        f.truncate(256 << 20)
    entries = subprocess.run([sys.executable, "-m", "pydm", "lw", "replay", "--log", log,
                              "--num-entries"], capture_output=True, text=True,
                             check=True).stdout.strip()
    t = time.monotonic()
    subprocess.run([sys.executable, "-m", "pydm", "lw", "replay", "--log", log, "--replay",
                    target], check=True)
    took = time.monotonic() - t
    print(f"pydm lw replay of {entries} entries: {took:.2f} s (goal < 5 s for 10^5)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--log-mib", type=int, default=8192,
                    help="log size; a run that fills it is reported as not valid")
    ap.add_argument("--jobs", help="comma-separated job numbers (1: randwrite 4k QD16, "
                    "2: write 1m QD4) to run")
    ap.add_argument("--entries", type=int, default=100000)
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--skip-nbd", action="store_true")
    args = ap.parse_args()
    if args.jobs:
        try:
            picks = [int(k) for k in args.jobs.split(",")]
        except ValueError:
            picks = [0]
        if not all(1 <= k <= len(JOBS) for k in picks):
            ap.error(f"--jobs: numbers from 1 to {len(JOBS)}, comma-separated")
        args.jobs = [JOBS[k - 1] for k in picks]
    run_in_workdir(args, "pydm-lwbench-", [bench_nbd, bench_replay])


if __name__ == "__main__":
    main()
