#!/usr/bin/env python3
"""Benchmark: `pydm era invalidate` against thin-provisioning-tools' era_invalidate.

Builds (with the real era_restore) a metadata image of a 10^6-block era array
with random eras and 10 archived writesets, then times both tools as whole
processes on the same image, alternating, median of N runs; also times the
in-process query (no XML) and measures one commit after marking one bit
(blocks written, flushes, CPU time).

    python tools/bench_era_invalidate.py [--blocks N] [--runs R] [--since T]
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


def build_image(d, nr_blocks, seed=1):
    rnd = random.Random(seed)
    xml = os.path.join(d, "big.xml")
    with open(xml, "w") as f:
        f.write(f'<superblock uuid="" block_size="128" nr_blocks="{nr_blocks}" current_era="20">\n')
        for era in range(10, 20):
            f.write(f'  <writeset era="{era}" nr_bits="{nr_blocks}">\n')
            for b in sorted(rnd.sample(range(nr_blocks), min(2000, nr_blocks))):
                f.write(f'    <bit block="{b}" value="true"/>\n')
            f.write("  </writeset>\n")
        f.write("  <era_array>\n")
        f.write("".join(f'    <era block="{b}" era="{rnd.randint(0, 9)}"/>\n'
                        for b in range(nr_blocks)))
        f.write("  </era_array>\n</superblock>\n")
    img = os.path.join(d, "big.bin")
    with open(img, "wb") as f:
        f.truncate(max(32 << 10, (nr_blocks // 1018 + 200) * 4096 * 2))
    tool = shutil.which("era_restore") or "/usr/sbin/era_restore"
    subprocess.run([tool, "-i", xml, "-o", img], check=True)
    return img


def timed(argv):
    t = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--blocks", type=int, default=10 ** 6)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--since", type=int, default=5)
    a = ap.parse_args(argv)
    from pydm.metadata.era_md import EraMetadata
    from pydm.store import CountingStore, FileStore

    d = tempfile.mkdtemp(prefix="pydm-bench-era-")
    try:
        print(f"building a {a.blocks}-block image with 10 archived writesets (era_restore)...",
              file=sys.stderr)
        img = build_image(d, a.blocks)
        theirs_cmd = [shutil.which("era_invalidate") or "/usr/sbin/era_invalidate",
                      "--written-since", str(a.since), img]
        ours_cmd = [sys.executable, "-m", "pydm", "era", "invalidate",
                    "--written-since", str(a.since), img]
        a_out = subprocess.run(ours_cmd, capture_output=True, text=True).stdout
        b_out = subprocess.run(theirs_cmd, capture_output=True, text=True).stdout
        same = a_out == b_out
        ours, theirs = [], []
        for _ in range(a.runs):
            ours.append(timed(ours_cmd))
            theirs.append(timed(theirs_cmd))
        mo, mt = statistics.median(ours), statistics.median(theirs)
        print(f"\nera invalidate --written-since {a.since}, {a.blocks} blocks, "
              f"median of {a.runs} (alternating), output identical: {same}")
        print(f"{'tool':28} {'median s':>9} {'min':>7} {'max':>7}")
        print(f"{'era_invalidate (0.9.0)':28} {mt:9.3f} {min(theirs):7.3f} {max(theirs):7.3f}")
        print(f"{'pydm era invalidate':28} {mo:9.3f} {min(ours):7.3f} {max(ours):7.3f}")
        print(f"speed-up: {mt / mo:.2f}x (goal >= 2x)")

        md = EraMetadata.open(FileStore(img, readonly=True), readonly=True, load_space_map=False)
        q = []
        for _ in range(a.runs):
            t = time.perf_counter()
            md.changed_since(a.since, include_current=False)
            q.append(time.perf_counter() - t)
        o = []
        for _ in range(a.runs):
            t = time.perf_counter()
            m2 = EraMetadata.open(FileStore(img, readonly=True), readonly=True,
                                  load_space_map=False)
            m2.changed_since(a.since, include_current=False)
            o.append(time.perf_counter() - t)
        print(f"\nin-process query (no XML): {statistics.median(q) * 1000:.1f} ms median "
              f"(goal < 50 ms); open + query {statistics.median(o) * 1000:.1f} ms")

        work = os.path.join(d, "commit.bin")
        shutil.copy(img, work)
        store = CountingStore(FileStore(work))
        md = EraMetadata.open(store)
        md.checkpoint()
        md.commit()
        cpu, blocks, flushes = [], [], []
        for i in range(200):
            store.writes = store.flushes = 0
            t = time.process_time()
            md.mark((i * 7919) % a.blocks)
            md.commit()
            cpu.append(time.process_time() - t)
            blocks.append(store.writes)
            flushes.append(store.flushes)
        print(f"\none commit after marking one bit (200 tries): blocks written "
              f"max {max(blocks)} (goal <= 8), flushes {min(flushes)}..{max(flushes)} "
              f"(goal exactly 2), CPU median {statistics.median(cpu) * 1000:.2f} ms "
              f"(goal < 1 ms)")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
