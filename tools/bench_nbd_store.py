#!/usr/bin/env python3
"""Benchmark pydm's NBD store: pydm linear over ``nbd://`` against the same
NBD server used directly.

Method: one 256 MiB file of random data (in the page cache), served by
nbdkit's file plugin on a loopback port.  pydm serves a linear device over
``nbd://127.0.0.1:PORT/`` (its NBD store, in front of that same nbdkit) on
another port.  fio's nbd engine runs each job against nbdkit directly and
through pydm, alternating within every round (each job's round starts with a
discarded run); the table shows the medians of ``--runs`` rounds and the
ratio pydm/direct.  ``--backend qemu-nbd`` puts qemu-nbd behind instead.

    .venv/bin/python tools/bench_nbd_store.py [--runs 5] [--runtime 4] [--dir DIR]
        [--backend nbdkit|qemu-nbd] [--conns N]

Needs fio (with the nbd engine) and nbdkit (or qemu-nbd) on PATH.  This is
a benchmark, not a test: it prints numbers and the goals, it asserts nothing.
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from nbdbench import fio_version, fmt, free_port, make_image, run_fio, start_pydm, stop, wait_port

JOBS = [  # (name, rw, bs, iodepth, metric)
    ("randread 4k QD16", "randread", "4k", 16, "iops"),
    ("read 1m QD4", "read", "1m", 4, "bw"),
    ("randwrite 4k QD16", "randwrite", "4k", 16, "iops"),
    ("write 1m QD4", "write", "1m", 4, "bw"),
    ("randread 4k QD1", "randread", "4k", 1, "iops"),
]
GOALS = {"randread 4k QD16": 0.7, "read 1m QD4": 0.7}     # the issue's, pydm/direct
SIZE = 256 << 20


def start_backend(kind, image):
    port = free_port()
    if kind == "nbdkit":
        cmd = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "file", image]
        proc = subprocess.Popen(cmd)
    else:
        cmd = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t",
               "--shared=16", "-x", "", image]
        proc = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    wait_port(port, proc)
    return proc, port


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--backend", choices=("nbdkit", "qemu-nbd"), default="nbdkit")
    ap.add_argument("--conns", type=int, help="connections of the NBD store (conns=N)")
    ap.add_argument("--jobs", help="comma-separated job numbers (1-5) to run")
    args = ap.parse_args()
    for tool in ("fio", args.backend):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed (apt-get install fio nbdkit qemu-utils)")
    jobs = JOBS if not args.jobs else [JOBS[int(i) - 1] for i in args.jobs.split(",")]
    work = args.dir or tempfile.mkdtemp(prefix="pydm-bench-store-")
    os.makedirs(work, exist_ok=True)
    procs = []
    try:
        image = os.path.join(work, "disk.img")
        make_image(image, SIZE)
        backend, bport = start_backend(args.backend, image)
        procs.append(backend)
        query = f"?conns={args.conns}" if args.conns else ""
        pport = free_port()
        pydm, _sock = start_pydm(work, [("bench", f"0 {SIZE >> 9} linear "
                                         f"nbd://127.0.0.1:{bport}/{query} 0")], pport)
        procs.append(pydm)
        uris = {"direct": f"nbd://127.0.0.1:{bport}/",
                "pydm": f"nbd://127.0.0.1:{pport}/bench"}
        print(f"# pydm linear over nbd:// vs {args.backend} direct; {fio_version()}; "
              f"{args.runs} runs of {args.runtime} s; 256 MiB file in the page cache",
              flush=True)
        samples = {}
        for name, rw, bs, qd, metric in jobs:
            order = ["direct", "pydm"]
            run_fio(uris[order[0]], rw, bs, qd, 1)               # discarded
            for r in range(args.runs):
                for who in (order if r % 2 == 0 else order[::-1]):
                    bw, iops = run_fio(uris[who], rw, bs, qd, args.runtime)
                    samples.setdefault((name, who), []).append(bw if metric == "bw" else iops)
            med = {w: statistics.median(samples[(name, w)]) for w in order}
            ratio = med["pydm"] / med["direct"] if med["direct"] else 0.0
            goal = GOALS.get(name)
            verdict = "" if goal is None else (f"  goal {goal}x: "
                                               f"{'met' if ratio >= goal else 'NOT met'}")
            print(f"{name:20s} direct {fmt(metric, med['direct'])}   pydm "
                  f"{fmt(metric, med['pydm'])}   {ratio:5.2f}x{verdict}", flush=True)
    finally:
        stop(procs)
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
