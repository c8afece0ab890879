#!/usr/bin/env python3
"""writeboost against linear over NBD, replay time, and memory per GiB of cache.

Method: one `pydm serve` holds, each over its own copy of a 256 MiB image of
random data, ``lin`` (linear) and ``wb`` (writeboost with a preallocated
cache of --cache-mib), and over a delay device slowing writes by --delay-ms:
``lin-slow`` and ``wb-slow``.  fio's nbd engine runs each job against each
pair, alternating within every round, --runs rounds; the table shows medians
and wb/linear.  The cache is drained (drop_caches) after each writeboost run,
so every run starts from an empty log, as a cache in front of a slow disk
does between bursts.  Then, in-process: a cache of --replay-mib filled with
dirty 4 KiB blocks is replayed by a new device (the time is construction and
first resume), and resident memory is read without a cache and with full caches of
--replay-mib and twice that: its growth per GiB is the cost of the cache.

    .venv/bin/python tools/bench_writeboost.py [--runs 3] [--runtime 4]

Goals (the writeboost issue): randwrite 4k QD16 on the delayed backing at
least 10x linear; undelayed, at least 0.8x linear for randwrite 4k QD16 and
write 1m QD4; a full 1 GiB cache replayed in under 3 s; under 16 MiB of
resident memory per GiB of cache.  A benchmark, not a test: it prints
numbers and the goals, it asserts nothing.
"""

import argparse
import os
import statistics
import subprocess
import sys

from nbdbench import (fmt, free_port, make_image, preallocated, pydm, run_fio, run_in_workdir,
                      start_pydm, stop)

SIZE = 256 << 20
JOBS = [("randwrite 4k QD16", "randwrite", "4k", 16, "iops"),
        ("write 1m QD4", "write", "1m", 4, "bw")]




def serve(work, args):
    sectors = SIZE >> 9
    images = {}
    for name in ("lin", "wb", "lin-slow", "wb-slow"):
        images[name] = os.path.join(work, f"{name}.img")
        make_image(images[name], SIZE)    # each written alike (not copied: make_image)
    cache = preallocated(os.path.join(work, "cache.img"), args.cache_mib)
    slow_cache = preallocated(os.path.join(work, "slow-cache.img"), args.cache_mib)
    ms = args.delay_ms
    devices = [
        ("lin", f"0 {sectors} linear {images['lin']} 0"),
        ("wb", f"0 {sectors} writeboost {images['wb']} {cache}"),
        ("d1", f"0 {sectors} delay {images['lin-slow']} 0 0 {images['lin-slow']} 0 {ms}"),
        ("d2", f"0 {sectors} delay {images['wb-slow']} 0 0 {images['wb-slow']} 0 {ms}"),
        ("lin-slow", f"0 {sectors} linear dm:d1 0"),
        ("wb-slow", f"0 {sectors} writeboost dm:d2 {slow_cache}"),
    ]
    port = free_port()
    proc, sock = start_pydm(work, devices, port)
    return proc, sock, port


def bench_nbd(work, args):
    proc, sock, port = serve(work, args)
    pairs = [("", "lin", "wb"), (f" (writes +{args.delay_ms} ms)", "lin-slow", "wb-slow")]
    samples = {}
    try:
        for r in range(args.runs):
            for j, (name, rw, bs, qd, metric) in enumerate(JOBS):
                for label, lin, wb in pairs:
                    if label and rw != "randwrite":
                        continue              # 1 MiB writes on the slow disk: minutes
                    order = (lin, wb) if (r + j) % 2 == 0 else (wb, lin)
                    for dev in order:
                        bw, iops = run_fio(f"nbd://127.0.0.1:{port}/{dev}", rw, bs, qd,
                                           args.runtime)
                        samples.setdefault((name + label, dev), []).append(
                            bw if metric == "bw" else iops)
                        print(f"round {r + 1} {name + label:<32} {dev:<9} "
                              f"{fmt(metric, samples[(name + label, dev)][-1])}",
                              file=sys.stderr, flush=True)
                        if dev.startswith("wb"):
                            pydm(sock, "dm", "message", dev, "0", "drop_caches")
    finally:
        stop([proc])
    print(f"medians of {args.runs} runs, {args.runtime} s each, 256 MiB device, "
          f"{args.cache_mib} MiB cache")
    print(f"{'job':<34}{'linear':>14}{'writeboost':>14}{'wb/linear':>11}{'goal':>7}")
    for name, _rw, _bs, _qd, metric in JOBS:
        for label, lin, wb in pairs:
            key = name + label
            if (key, lin) not in samples:
                continue
            a = statistics.median(samples[(key, lin)])
            b = statistics.median(samples[(key, wb)])
            goal = ">=10" if label else ">=0.8"
            print(f"{key:<34}{fmt(metric, a):>14}{fmt(metric, b):>14}{b / a:>10.2f}x"
                  f"{goal:>7}")


FILL_SCRIPT = r"""
import os, sys
os.environ["PYDM_LOCKDEP"] = "0"
from pydm.control import Control
from pydm.bio import Bio, WRITE
work, mib = sys.argv[1], int(sys.argv[2])
backing, cache = os.path.join(work, "rb.img"), os.path.join(work, "rc.img")
with open(backing, "wb") as f:
    f.truncate(4 * mib << 20)
sectors = (4 * mib << 20) >> 9
c = Control()
d = c.create("wb", f"0 {sectors} writeboost {backing} {cache}")
buf = memoryview(os.urandom(1 << 20))
caches = int(c.status("wb")[0][3].split()[1])
done = lambda b: None
for i in range(caches * 4096 // (1 << 20)):          # fill the log once round
    d.submit(Bio(WRITE, (i << 20 >> 9) % sectors, 2048, buf, 0, done))
c.shutdown()
"""

REPLAY_SCRIPT = r"""
import os, sys, time
os.environ["PYDM_LOCKDEP"] = "0"
from pydm.control import Control
work, mib = sys.argv[1], int(sys.argv[2])
backing, cache = os.path.join(work, "rb.img"), os.path.join(work, "rc.img")
sectors = (4 * mib << 20) >> 9
c = Control()
if sys.argv[3] == "none":
    import numpy, pydm.targets.writeboost.target
    c.create("z", "0 8 zero")
else:
    t = time.monotonic()
    c.create("wb", f"0 {sectors} writeboost {backing} {cache}")
    took = time.monotonic() - t
    words = c.status("wb")[0][3].split()
    print(f"{took:.2f} {words[4]} {words[6]}")
with open("/proc/self/status") as f:
    print([l for l in f if l.startswith("VmRSS")][0].split()[1])
"""


def replay_once(work, mib):
    """(seconds, last segment, dirty blocks, resident KiB) of replaying a
    full cache of ``mib`` MiB in a fresh process."""
    preallocated(os.path.join(work, "rc.img"), mib)
    py = [sys.executable, "-c"]
    subprocess.run(py + [FILL_SCRIPT, work, str(mib)], check=True)
    out = subprocess.run(py + [REPLAY_SCRIPT, work, str(mib), "wb"],
                         capture_output=True, text=True, check=True).stdout.split("\n")
    took, last, dirty = out[0].split()
    return float(took), last, dirty, int(out[1])


def bench_replay(work, args):
    mib = args.replay_mib
    took, last, dirty, rss = replay_once(work, mib)
    _t2, _l2, _d2, rss2 = replay_once(work, 2 * mib)
    py = [sys.executable, "-c"]
    base = int(subprocess.run(py + [REPLAY_SCRIPT, work, str(mib), "none"],
                              capture_output=True, text=True, check=True).stdout.split()[-1])
    slope = (rss2 - rss) / 1024 * 1024 / mib
    print(f"replay of a full {mib} MiB cache ({last} segments, {dirty} dirty blocks): "
          f"{took:.2f} s (goal < 3 s for 1 GiB)")
    print(f"resident memory: {base / 1024:.0f} MiB without a cache, {rss / 1024:.0f} MiB "
          f"with {mib} MiB, {rss2 / 1024:.0f} MiB with {2 * mib} MiB: {slope:.1f} MiB per "
          f"GiB of cache (goal < 16; estimated {estimate(mib):.1f})")


def estimate(mib):
    from pydm.targets.writeboost.cache import estimate_memory
    from pydm.targets.writeboost.layout import Geometry
    return estimate_memory(Geometry(mib << 20)) / (1 << 20) * 1024 / mib


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--cache-mib", type=int, default=1024)
    ap.add_argument("--replay-mib", type=int, default=1024)
    ap.add_argument("--delay-ms", type=int, default=5)
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--skip-nbd", action="store_true")
    args = ap.parse_args()
    run_in_workdir(args, "pydm-wbbench-", [bench_nbd, bench_replay])


if __name__ == "__main__":
    main()
