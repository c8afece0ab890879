#!/usr/bin/env python3
"""Benchmark pydm's NBD server against nbdkit (file plugin) and qemu-nbd.

Method, warm section: one 256 MiB file of random data (in the page cache);
pydm serves it through a linear device, nbdkit and qemu-nbd serve the same
file; fio's nbd engine runs each job against each server in turn (servers
alternate within every round), three rounds by default; the table shows the
medians and the ratios to nbdkit and qemu-nbd.

Cold section: the same, on a 1 GiB file of random data that is evicted from
the page cache (fdatasync, then posix_fadvise(POSIX_FADV_DONTNEED) on the
whole file) before every fio run, for the read jobs: randread 4k QD16 and
QD1 (time-based) and read 1m QD4 (one pass over the file, so no block is
read twice): what a VM image that is not in the host's cache sees.

In both sections each job's round starts with one discarded run on its
first server: the first run after a change of job was up to 3x slower
whichever server took it.

    .venv/bin/python tools/bench_nbd.py [--runs 3] [--runtime 4] [--dir DIR]
        [--cold | --warm]                               # one section only
        [--baseline OTHER_CHECKOUT/.venv/bin/python]   # same-run A/B

Needs fio (with the nbd engine), nbdkit and qemu-nbd on PATH.  This is a
benchmark, not a test: it prints numbers and the goals, it asserts nothing.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from nbdbench import fio_version, fmt, free_port, make_image, run_fio, start_pydm, stop, wait_port

JOBS = [  # (name, rw, bs, iodepth, metric)
    ("read 1m QD4", "read", "1m", 4, "bw"),
    ("write 1m QD4", "write", "1m", 4, "bw"),
    ("randread 4k QD16", "randread", "4k", 16, "iops"),
    ("randwrite 4k QD16", "randwrite", "4k", 16, "iops"),
    ("randread 4k QD1", "randread", "4k", 1, "iops"),
]
# The goals: pydm / nbdkit at least this (and ahead of qemu-nbd on
# the first four jobs).
GOALS = {"read 1m QD4": 0.8, "write 1m QD4": 0.8, "randread 4k QD16": 0.5,
         "randwrite 4k QD16": 0.5}
SIZE = 256 << 20
COLD_SIZE = 1 << 30
COLD_JOBS = [  # (name, rw, bs, iodepth, metric, time-based)
    ("cold randread 4k QD16", "randread", "4k", 16, "iops", True),
    ("cold randread 4k QD1", "randread", "4k", 1, "iops", True),
    ("cold read 1m QD4", "read", "1m", 4, "bw", False),
]
# The uncached-reads issue's goals, pydm / nbdkit.
COLD_GOALS = {"cold randread 4k QD16": 1.0, "cold randread 4k QD1": 0.9,
              "cold read 1m QD4": 0.9}


def evict(path):
    """Drop ``path`` from the page cache (every server reads the same file)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def start_servers(work, image, names, pydm_args, baseline=None, size=SIZE):
    servers = {}
    for name, python in (("pydm", None), ("pydm-base", baseline)):
        if name in names:
            port = free_port()
            proc, _sock = start_pydm(work, [("bench", f"0 {size >> 9} linear {image} 0")],
                                     port, pydm_args, python=python, label=name)
            servers[name] = (proc, port, "bench")
    if "nbdkit" in names:
        port = free_port()
        cmd = ["nbdkit", "-f", "-p", str(port), "-i", "127.0.0.1", "file", image]
        servers["nbdkit"] = (subprocess.Popen(cmd), port, "")
    if "qemu-nbd" in names:
        port = free_port()
        cmd = ["qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", str(port), "-t",
               "-x", "", image]
        # stderr off: the readiness probe makes qemu-nbd log a failed negotiation
        servers["qemu-nbd"] = (subprocess.Popen(cmd, stderr=subprocess.DEVNULL), port, "")
    for proc, port, _e in servers.values():
        wait_port(port, proc)
    return servers


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--runtime", type=int, default=4, help="seconds per fio run")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--servers", default="pydm,nbdkit,qemu-nbd")
    ap.add_argument("--jobs", help="comma-separated warm job numbers (1-5) to run")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--cold", action="store_true",
                         help="only the cold section (the file evicted before every run)")
    which.add_argument("--warm", action="store_true",
                         help="only the warm section (the file in the page cache)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw samples here")
    ap.add_argument("--baseline", metavar="PYTHON",
                    help="A/B: the python of another pydm checkout's venv (e.g. a clone "
                         "of the previous commit: CLONE/.venv/bin/python), served as "
                         "pydm-base in the same rounds; the table adds pydm/pydm-base")
    ap.add_argument("pydm_args", nargs="*", help="extra `pydm serve` options (after --)")
    args = ap.parse_args()
    for tool in ("fio", "nbdkit", "qemu-nbd"):
        if shutil.which(tool) is None and tool.replace("fio", "") in args.servers + "fio":
            raise SystemExit(f"{tool} is not installed (apt-get install fio nbdkit qemu-utils)")
    names = [s for s in args.servers.split(",") if s]
    if args.baseline and "pydm-base" not in names:
        names.insert(1, "pydm-base")
    jobs = [(*j, True) for j in JOBS]
    if args.jobs:
        jobs = [jobs[int(i) - 1] for i in args.jobs.split(",")]
    work = args.dir or tempfile.mkdtemp(prefix="pydm-bench-")
    os.makedirs(work, exist_ok=True)
    try:
        if not args.cold:
            image = os.path.join(work, "disk.img")
            make_image(image, SIZE)
            section(args, work, image, SIZE, names, jobs, GOALS, None,
                    "256 MiB random file in the page cache")
        if not args.warm:
            image = os.path.join(work, "cold.img")
            make_image(image, COLD_SIZE)
            section(args, work, image, COLD_SIZE, names, COLD_JOBS, COLD_GOALS, evict,
                    "1 GiB random file evicted from the page cache before every run")
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def section(args, work, image, size, names, jobs, goals, before_run, what):
    servers = start_servers(work, image, names, args.pydm_args, args.baseline, size)
    samples = {(j[0], s): [] for j in jobs for s in names}
    try:
        for r in range(args.runs):
            for j, (name, rw, bs, qd, metric, timed) in enumerate(jobs):
                order = names[(r + j) % len(names):] + names[:(r + j) % len(names)]
                # A discarded run first, on the round's first server: the
                # first run after a change of job was up to 3x slower
                # whichever server took it (the cold sequential pass after
                # the random jobs; warm, the 1 MiB reads after QD1), and
                # with 4 servers in 5 rounds one server comes first twice.
                _proc, port, export = servers[order[0]]
                if before_run is not None:
                    before_run(image)
                run_fio(f"nbd://127.0.0.1:{port}/{export}", rw, bs, qd,
                        min(args.runtime, 2) if timed else None, size=f"{size >> 20}m")
                for s in order:
                    _proc, port, export = servers[s]
                    if before_run is not None:
                        before_run(image)
                    bw, iops = run_fio(f"nbd://127.0.0.1:{port}/{export}", rw, bs, qd,
                                       args.runtime if timed else None,
                                       size=f"{size >> 20}m")
                    v = bw if metric == "bw" else iops
                    samples[(name, s)].append(v)
                    print(f"round {r + 1} {name:<18} {s:<9} {fmt(metric, v)}",
                          file=sys.stderr, flush=True)
    finally:
        stop([proc for proc, _p, _e in servers.values()])
    report(args, names, jobs, goals, samples, what)


def report(args, names, jobs, goals, samples, what):
    med = {k: statistics.median(v) for k, v in samples.items()}
    head = f"{'job':<22}" + "".join(f"{s:>16}" for s in names)
    if "pydm" in names and "nbdkit" in names:
        head += f"{'pydm/nbdkit':>13}{'goal':>6}"
    if "pydm" in names and "qemu-nbd" in names:
        head += f"{'pydm/qemu-nbd':>15}"
    if "pydm" in names and "pydm-base" in names:
        head += f"{'pydm/base':>11}"
    print(f"medians of {args.runs} runs, {args.runtime} s each (a pass over the file for "
          f"sequential cold jobs), {what}, {fio_version()}")
    print(head)
    for name, _rw, _bs, _qd, metric, _t in jobs:
        row = f"{name:<22}" + "".join(f"{fmt(metric, med[(name, s)]):>16}" for s in names)
        if "pydm" in names and "nbdkit" in names:
            ratio = med[(name, "pydm")] / med[(name, "nbdkit")]
            goal = goals.get(name)
            row += f"{ratio:>12.2f}x" + (f"{'>=' + str(goal):>6}" if goal else f"{'':>6}")
        if "pydm" in names and "qemu-nbd" in names:
            row += f"{med[(name, 'pydm')] / med[(name, 'qemu-nbd')]:>14.2f}x"
        if "pydm" in names and "pydm-base" in names:
            row += f"{med[(name, 'pydm')] / med[(name, 'pydm-base')]:>10.2f}x"
        print(row, flush=True)
    if args.json:
        mode = "a" if os.path.exists(args.json) else "w"
        with open(args.json, mode) as f:
            json.dump({f"{k[0]}|{k[1]}": v for k, v in samples.items()}, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
