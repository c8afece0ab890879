#!/usr/bin/env python3
"""Era tracking overhead: fio over NBD through era vs. linear on the same file.

One `pydm serve` holds two devices, each over its own 256 MiB file of the
same random data (pydm refuses two devices writing one file): ``lin``
(linear) and ``era`` (era, metadata in its own file).  For each job
and round, each device runs two phases, the devices alternating:

* first:  `pydm era checkpoint era` (a new era: nothing is marked), then one
  pass over the whole device, so the first write to each era block waits for
  a metadata commit (the 1 MiB job's pass is 256 writes, so it runs 7
  passes, each after a checkpoint, and keeps their median);
* marked: a time-based run right after, when every block is marked in the
  current era and writes go straight through.

linear runs the same fio jobs (its "first" needs no checkpoint).  The table
shows medians and era/linear; the issue's goals are >= 0.8 marked, >= 0.5 first.

By default it measures two era block sizes, each with its own server:

* 128 sectors (64 KiB): what the demo and the reference fixtures use, and
  qemu's default dirty-bitmap granularity; a 4 KiB random first pass waits
  for a commit on the first of each 16 writes to a block;
* 8 sectors (4 KiB), the worst case: every 4 KiB write of the first pass
  waits for a commit of its own mark.

    .venv/bin/python tools/bench_era.py [--runs 3] [--runtime 4] [--block-size 128,8]

A benchmark, not a test: it prints numbers and the goals, it asserts nothing.
It also times the metadata commit alone (in-process, on a scratch file next
to the image) and prints the ceiling that puts on first writes: a write to
an unmarked block waits for a commit, a commit needs two fdatasyncs (the
new blocks, then the superblock, as the kernel's transaction manager), and
at iodepth 16 one commit carries the queue (the era worker gathers it), so
the queue turns over once per commit plus one client round trip.
"""

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from nbdbench import fio_version, fmt, free_port, make_image, run_fio, start_pydm, stop

SIZE = 256 << 20
META_SIZE = 32 << 20
JOBS = [  # (name, rw, bs, iodepth, metric, first-phase passes per round)
    ("randwrite 4k QD16", "randwrite", "4k", 16, "iops", 1),
    # one pass is only 256 writes (~0.1 s): take the median of several
    ("write 1m QD4", "write", "1m", 4, "bw", 7),
]
GOALS = {"marked": 0.8, "first": 0.5}
COMMIT_SAMPLES = 300


def commit_floor(work, block_size):
    """Median seconds of one fdatasync after a 4 KiB write, and of one era
    commit carrying 1 and 16 new marks, on ``work``'s filesystem."""
    from pydm.metadata.era_md import EraMetadata
    from pydm.store import FileStore

    path = os.path.join(work, "commit-probe.img")
    with open(path, "wb") as f:
        f.truncate(META_SIZE)
    store = FileStore(path)
    try:
        block = bytes(4096)
        sync = []
        for i in range(COMMIT_SAMPLES):
            t = time.perf_counter()
            store.write_at((i % 64) * 4096 + (META_SIZE >> 1), block)
            store.flush()
            sync.append(time.perf_counter() - t)
        nr = SIZE // (block_size << 9)
        md = EraMetadata.open_or_format(store, block_size, nr)
        md.checkpoint()
        md.commit()
        order = list(range(nr))
        random.Random(1).shuffle(order)
        out = [statistics.median(sync)]
        pos = 0
        for marks in (1, 16):
            times = []
            for _ in range(COMMIT_SAMPLES):
                if pos + marks > nr:     # every block marked: a new era, untimed
                    md.checkpoint()
                    md.commit()
                    pos = 0
                t = time.perf_counter()
                for b in order[pos:pos + marks]:
                    md.mark_range(b, b + 1)
                md.commit()
                times.append(time.perf_counter() - t)
                pos += marks
            out.append(statistics.median(times))
        md.close()
        return out
    finally:
        store.close()
        os.unlink(path)


def checkpoint(sock):
    subprocess.run([sys.executable, "-m", "pydm", "era", "checkpoint", "era", "--socket", sock],
                   check=True, capture_output=True)


def block_sizes(text):
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of sector counts: {text!r}") from None
    if not sizes or any(b <= 0 or b % 8 for b in sizes):
        raise argparse.ArgumentTypeError("era block sizes are positive multiples of 8 sectors")
    return sizes


def measure(work, image, lin_image, block_size, args):
    """{(job, phase, dev): median} for one era block size, own server."""
    meta = os.path.join(work, "meta.img")
    with open(meta, "wb") as f:      # blank: era formats it at first load
        f.truncate(META_SIZE)
    sectors = SIZE >> 9
    port = free_port()
    proc, sock = start_pydm(work, [("lin", f"0 {sectors} linear {lin_image} 0"),
                                   ("era", f"0 {sectors} era {meta} {image} {block_size}")],
                            port)
    names = ["lin", "era"]
    samples = {}
    try:
        for r in range(args.runs):
            for j, (name, rw, bs, qd, metric, passes) in enumerate(JOBS):
                order = names if (r + j) % 2 == 0 else names[::-1]
                for dev in order:
                    uri = f"nbd://127.0.0.1:{port}/{dev}"
                    for phase in ("first", "marked"):
                        vs = []
                        for _ in range(passes if phase == "first" else 1):
                            if dev == "era" and phase == "first":
                                checkpoint(sock)
                            bw, iops = run_fio(uri, rw, bs, qd,
                                               None if phase == "first" else args.runtime)
                            vs.append(bw if metric == "bw" else iops)
                        v = statistics.median(vs)
                        samples.setdefault((name, phase, dev), []).append(v)
                        print(f"era block {block_size}: round {r + 1} {name:<18} {phase:<7} "
                              f"{dev:<4} {fmt(metric, v)}", file=sys.stderr, flush=True)
    finally:
        stop([proc])
    return {k: statistics.median(v) for k, v in samples.items()}


def report(block_size, med, floor, runs):
    print(f"era block {block_size} sectors ({block_size // 2} KiB): medians of {runs} runs; "
          f"256 MiB random file; {fio_version()}")
    print(f"{'job':<18}{'phase':<8}{'linear':>16}{'era':>16}{'era/linear':>12}{'goal':>7}")
    for name, _rw, _bs, _qd, metric, _passes in JOBS:
        for phase in ("first", "marked"):
            lin, era = med[(name, phase, "lin")], med[(name, phase, "era")]
            print(f"{name:<18}{phase:<8}{fmt(metric, lin):>16}{fmt(metric, era):>16}"
                  f"{era / lin:>11.2f}x{'>=' + str(GOALS[phase]):>7}")
    sync, c1, c16 = floor
    print(f"metadata commit here (medians of {COMMIT_SAMPLES}): fdatasync {sync * 1e6:.0f} us; "
          f"commit with 1 new mark {c1 * 1e6:.0f} us, with 16 {c16 * 1e6:.0f} us")
    print(f"  -> writes to unmarked blocks at QD16 (one commit per queue, then the "
          f"clients' round trip) top out below {16 / c16 / 1000:.1f}k/s")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=3, help="rounds per job (the table shows medians)")
    ap.add_argument("--runtime", type=int, default=4, help="seconds per marked run")
    ap.add_argument("--block-size", type=block_sizes, default=[128, 8],
                    help="era block sizes in sectors, comma-separated (default 128,8: "
                         "the demo's 64 KiB, then the 4 KiB worst case)")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    args = ap.parse_args()
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    work = args.dir or tempfile.mkdtemp(prefix="pydm-bench-era-")
    os.makedirs(work, exist_ok=True)
    image = os.path.join(work, "disk.img")
    make_image(image, SIZE)
    lin_image = os.path.join(work, "lin.img")
    make_image(lin_image, SIZE)       # written alike (not copied: make_image)
    results = [(bs, measure(work, image, lin_image, bs, args), commit_floor(work, bs))
               for bs in args.block_size]
    for i, (bs, med, floor) in enumerate(results):
        if i:
            print()
        report(bs, med, floor, args.runs)
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)

if __name__ == "__main__":
    main()
