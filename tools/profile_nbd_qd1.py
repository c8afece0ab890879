#!/usr/bin/env python3
"""Where one request's time goes: fio randread 4k at QD1 over NBD (a client
that waits for every reply), pydm against nbdkit on the same warm file.

For each server, from one fio run: the round trip (fio's completion
latency), the server's CPU time per request (user and system, from
/proc/PID/stat) and how often its threads went to sleep per request
(voluntary context switches of every thread, /proc/PID/task/*/status, over
the middle of the run): a sleeping thread must be woken for the next
request, and on a VM a wake-up costs tens of microseconds.

    .venv/bin/python tools/profile_nbd_qd1.py [--runtime 6] [--runs 3]
        [--baseline OTHER_CHECKOUT/.venv/bin/python] [-- pydm serve options]

Needs fio (nbd engine) and nbdkit.  Prints numbers; asserts nothing.
"""

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from nbdbench import free_port, make_image, start_pydm, stop, wait_port

SIZE = 256 << 20
TICK = os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])         # utime, stime


def sleeps(pid):
    n = 0
    for path in glob.glob(f"/proc/{pid}/task/*/status"):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches"):
                        n += int(line.split()[1])
        except OSError:
            pass                                    # a thread that just ended
    return n


def one_run(pid, uri, runtime):
    """fio QD1 for ``runtime`` s; the counters are read 1 s in and 1 s
    before the end, so connection set-up and teardown stay out."""
    marks = {}

    def sample():
        time.sleep(1.0)
        marks["a"] = (time.monotonic(), cpu_ticks(pid), sleeps(pid))
        time.sleep(runtime - 2.0)
        marks["b"] = (time.monotonic(), cpu_ticks(pid), sleeps(pid))

    t = threading.Thread(target=sample)
    cmd = ["fio", "--name=p", "--ioengine=nbd", f"--uri={uri}", "--rw=randread",
           "--bs=4k", "--iodepth=1", "--time_based", f"--runtime={runtime}",
           f"--size={SIZE >> 20}m", "--output-format=json"]
    t.start()
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    t.join()
    job = json.loads(out[out.index("{"):])["jobs"][0]["read"]
    iops = job["iops"]
    (ta, (ua, sa), wa), (tb, (ub, sb), wb) = marks["a"], marks["b"]
    reqs = iops * (tb - ta)
    return {"iops": iops, "rtt_us": 1e6 / iops,
            "user_us": (ub - ua) / TICK / reqs * 1e6, "sys_us": (sb - sa) / TICK / reqs * 1e6,
            "sleeps": (wb - wa) / reqs}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runtime", type=float, default=6.0)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--baseline", metavar="PYTHON",
                    help="another pydm checkout's venv python, measured as pydm-base")
    ap.add_argument("pydm_args", nargs="*", help="extra `pydm serve` options (after --)")
    args = ap.parse_args()
    if args.runtime < 4:
        ap.error("--runtime must be at least 4 s (1 s is cut at each end)")
    for tool in ("fio", "nbdkit"):
        if shutil.which(tool) is None:
            sys.exit(f"profile_nbd_qd1: {tool} is not installed")
    work = tempfile.mkdtemp(prefix="pydm-qd1-")
    procs = []
    try:
        image = os.path.join(work, "warm.img")
        make_image(image, SIZE)
        with open(image, "rb") as f:                # warm: in the page cache
            while f.read(1 << 20):
                pass
        table = f"0 {SIZE >> 9} linear {image} 0"
        servers = {}
        port = free_port()
        proc, _sock = start_pydm(work, [("d", table)], port, args.pydm_args)
        procs.append(proc)
        servers["pydm"] = (proc.pid, f"nbd://127.0.0.1:{port}/d")
        if args.baseline:
            port = free_port()
            proc, _sock = start_pydm(work, [("d", table)], port, args.pydm_args,
                                     python=args.baseline, label="base")
            procs.append(proc)
            servers["pydm-base"] = (proc.pid, f"nbd://127.0.0.1:{port}/d")
        port = free_port()
        proc = subprocess.Popen(["nbdkit", "-f", "-p", str(port), "file", image],
                                stdout=subprocess.DEVNULL)
        procs.append(proc)
        wait_port(port, proc)
        servers["nbdkit"] = (proc.pid, f"nbd://127.0.0.1:{port}/")
        samples = {name: [] for name in servers}
        names = list(servers)
        for r in range(args.runs):
            for name in names[r % len(names):] + names[:r % len(names)]:
                pid, uri = servers[name]
                samples[name].append(one_run(pid, uri, args.runtime))
                print(f"run {r + 1} {name}: {samples[name][-1]['iops']:.0f} IOPS",
                      file=sys.stderr, flush=True)
    finally:
        stop(procs)
        shutil.rmtree(work, ignore_errors=True)
    print(f"randread 4k QD1, warm 256 MiB file, medians of {args.runs} runs of "
          f"{args.runtime:g} s (per request; counters over the middle of each run)")
    print(f"{'server':<10}{'IOPS':>9}{'round trip':>12}{'CPU user':>10}{'CPU sys':>9}"
          f"{'sleeps':>8}")
    for name in names:
        med = {k: statistics.median(s[k] for s in samples[name]) for k in samples[name][0]}
        print(f"{name:<10}{med['iops']:>9.0f}{med['rtt_us']:>10.1f}us{med['user_us']:>8.1f}us"
              f"{med['sys_us']:>7.1f}us{med['sleeps']:>8.2f}")


if __name__ == "__main__":
    main()
