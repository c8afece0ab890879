#!/usr/bin/env python3
"""Microbenchmark: the router's own cost per 4 KiB bio.

Measures submit -> split -> map -> store -> complete for 4 KiB bios through
(1) a linear target over an in-memory store, (2) two stacked devices (linear
over linear over memory), and (3) the memory store alone, so the router's
share is the difference.  Medians of several rounds; nothing touches a disk.

    python tools/bench_router.py [--bios N] [--rounds R]
"""

import argparse
import gc
import random
import statistics
import sys
import time

from pydm.bio import READ, WRITE, Bio
from pydm.device import MappedDevice
from pydm.registry import TargetRegistry
from pydm.store import MemStore
from pydm.table import Table

SECTORS = 131072          # 64 MiB


def make_stack(depth: int):
    reg = TargetRegistry()
    mem = MemStore(SECTORS * 512)
    lower = mem
    dev = None
    for i in range(depth):
        below = lower

        def resolver(arg, ro, for_dev, below=below, **_use):
            return below, (lambda: None)
        dev = MappedDevice(f"bench{i}")
        dev.install_inactive(Table(f"0 {SECTORS} linear lower 0", reg, resolver, dev))
        dev.resume()
        lower = dev
    return mem, dev


def run(target, op, sectors, per_bio_new=True):
    buf = memoryview(bytearray(4096))

    def done(_b):
        pass
    gc.disable()
    t0 = time.perf_counter()
    for s in sectors:
        target.submit(Bio(op, s, 8, buf, 0, done))
    el = time.perf_counter() - t0
    gc.enable()
    return el / len(sectors) * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bios", type=int, default=100000, help="bios per round")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args(argv)
    rnd = random.Random(1)
    sectors = [rnd.randrange(0, SECTORS // 8) * 8 for _ in range(a.bios)]
    mem, one = make_stack(1)
    _mem2, two = make_stack(2)
    cases = [("memory store alone", mem), ("linear over memory", one),
             ("linear over linear over memory", two)]
    print(f"{'path':34} {'op':6} {'median us/bio':>14} {'min':>8} {'max':>8}")
    medians = {}
    for label, target in cases:
        for op, opname in ((READ, "read"), (WRITE, "write")):
            times = [run(target, op, sectors) for _ in range(a.rounds)]
            m = statistics.median(times)
            medians[(label, opname)] = m
            print(f"{label:34} {opname:6} {m:14.2f} {min(times):8.2f} {max(times):8.2f}")
    print()
    for opname in ("read", "write"):
        base = medians[("memory store alone", opname)]
        r1 = medians[("linear over memory", opname)] - base
        r2 = medians[("linear over linear over memory", opname)] - base
        print(f"router cost per 4 KiB {opname}: {r1:.2f} us through one device, "
              f"{r2:.2f} us through two stacked devices (store time {base:.2f} us excluded)")
    own = max(medians[("linear over memory", o)] - medians[("memory store alone", o)]
              for o in ("read", "write"))
    total = max(medians[("linear over memory", o)] for o in ("read", "write"))
    print(f"\ngoal: the router's own cost under 10 us per bio through one linear device -> "
          f"{'met' if own < 10 else 'MISSED'} ({own:.2f} us; {total:.2f} us with the store)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
