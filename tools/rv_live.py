#!/usr/bin/env python3
"""A live daemon under load with every monitor on: does any monitor speak?

    .venv/bin/python tools/rv_live.py [--seconds 60] [--mutant NAME] [--dir DIR]

Starts ``pydm serve --rv all`` (the automata and the lock-order checker)
with an ``era`` device and a ``wb`` (writeboost) device, runs fio randwrite
4k QD16 with an fsync every 32 writes over NBD on both for --seconds, and
beside them four threads racing control commands (create, load, resume,
suspend, message, remove...) over the control socket on four more devices
(linear, flakey, delay, zero, era, writeboost tables), while ``rv status``
is polled every 0.1 s.  At the end the daemon is idle: ``rv status --check``
runs the end check too.  With --mutant NAME the daemon runs with that
mutant (tests/mutation) applied, and the tool reports when the violation
happened (the daemon's clock) and when ``rv status`` first showed it.
Exit 0 when the verdict is the expected one: no violation without a
mutant, a violation of the mutant's monitor with one.
"""

import argparse
import errno
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from nbdbench import free_port, make_image, stop, wait_port  # noqa: E402

SIZE = 256 << 20
NAMES = [f"s{i}" for i in range(4)]

SERVE_WITH_MUTANT = r"""
import sys
sys.path[:0] = [sys.argv[1] + "/tests/mutation", sys.argv[1] + "/tests"]
import pytest
from mutants import MUTANTS
mp = pytest.MonkeyPatch()
MUTANTS[sys.argv[2]].apply(mp)
from pydm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def python():
    venv = os.path.join(ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def start(work, port, sock, mutant):
    conf = os.path.join(work, "live.toml")
    with open(conf, "w") as f:
        f.write(f'[[device]]\nname = "era"\ntable = "0 {SIZE >> 9} era {work}/meta.img '
                f'{work}/origin.img 128"\n')
        f.write(f'[[device]]\nname = "wb"\ntable = "0 {SIZE >> 9} writeboost '
                f'{work}/backing.img {work}/cache.img"\n')
    serve = ["serve", conf, "--port", str(port), "--socket", sock, "--rv", "all",
             "--rv-reactor", "record"]
    if mutant:
        cmd = [python(), "-c", SERVE_WITH_MUTANT, ROOT, mutant, *serve]
    else:
        cmd = [python(), "-m", "pydm", *serve]
    log = open(os.path.join(work, "serve.log"), "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=work)
    wait_port(port, proc)
    return proc


def stress(sock, tables, stop_ev, n, counts):
    from pydm.ctlsock import ControlClient, ControlError
    rnd = random.Random(n)
    ops = 0
    with ControlClient(sock) as c:
        while not stop_ev.is_set():
            name = rnd.choice(NAMES)
            op = rnd.choice(["create", "load", "resume", "resume", "suspend", "suspend_nf",
                             "message", "remove", "status", "clear", "checkpoint"])
            try:
                if op in ("create", "load"):
                    c.call(op, name=name, table=rnd.choice(tables[name]))
                elif op == "suspend_nf":
                    c.call("suspend", name=name, noflush=True)
                elif op == "message":
                    c.call("message", name=name, sector=0,
                           text=rnd.choice(["checkpoint", "drop_caches", "bogus"]))
                elif op == "checkpoint":
                    c.call("message", name="era", sector=0, text="checkpoint")
                else:
                    c.call(op, name=name)
            except ControlError as e:
                if e.errno not in (errno.ENXIO, errno.EBUSY, errno.EINVAL, errno.EEXIST):
                    counts.setdefault("errors", []).append(f"{op} {name}: {e}")
            ops += 1
    counts[n] = ops


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--mutant", metavar="NAME", help="run the daemon with this mutant")
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    args = ap.parse_args()
    expected = None
    if args.mutant:
        sys.path[:0] = [os.path.join(ROOT, "tests", "mutation"), os.path.join(ROOT, "tests")]
        from mutants import MUTANTS
        if args.mutant not in MUTANTS:
            raise SystemExit(f"rv_live: unknown mutant {args.mutant!r}")
        expected = MUTANTS[args.mutant].monitor
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    work = args.dir or tempfile.mkdtemp(prefix="pydm-rvlive-")
    os.makedirs(work, exist_ok=True)
    from pydm.ctlsock import ControlClient
    try:
        make_image(os.path.join(work, "origin.img"), SIZE)
        shutil.copyfile(os.path.join(work, "origin.img"), os.path.join(work, "backing.img"))
        for name, size in (("meta.img", 64 << 20), ("cache.img", 512 << 20)):
            with open(os.path.join(work, name), "wb") as f:
                f.truncate(size)
        tables = {}
        for i, n in enumerate(NAMES):
            files = {}
            for kind, size in (("a", 8 << 20), ("m", 4 << 20), ("c", 4 << 20)):
                files[kind] = os.path.join(work, f"{n}-{kind}.img")
                with open(files[kind], "wb") as f:
                    f.truncate(size)
            a, m, c = files["a"], files["m"], files["c"]
            tables[n] = [f"0 16384 linear {a} 0", f"0 16384 flakey {a} 0 1 1",
                         f"0 16384 delay {a} 0 1", "0 16384 zero",
                         f"0 16384 era {m} {a} 128", f"0 16384 writeboost {a} {c}"]
        port, sock = free_port(), os.path.join(work, "ctl.sock")
        proc = start(work, port, sock, args.mutant)
        stop_ev = threading.Event()
        counts = {}
        threads = [threading.Thread(target=stress, args=(sock, tables, stop_ev, i, counts))
                   for i in range(4)]
        fio = [subprocess.Popen(
            ["fio", "--name=live", "--ioengine=nbd", f"--uri=nbd://127.0.0.1:{port}/{dev}",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=256m", "--fsync=32",
             "--time_based", f"--runtime={args.seconds}", "--output-format=json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for dev in ("era", "wb")]
        t0 = time.time()
        for t in threads:
            t.start()
        first_seen = None
        polls = 0
        with ControlClient(sock) as c:
            while any(f.poll() is None for f in fio):
                rows = c.call("rv_status")
                polls += 1
                if first_seen is None and any(r["violations"] for r in rows):
                    first_seen = (time.time(), [r for r in rows if r["violations"]])
                time.sleep(0.1)
            stop_ev.set()
            for t in threads:
                t.join(60)
            c.call("rv_check")
            rows = c.call("rv_status")
        iops = {}
        for dev, f in zip(("era", "wb"), fio):
            out = f.communicate()[0]
            try:
                iops[dev] = json.loads(out[out.index("{"):])["jobs"][0]["write"]["iops"]
            except ValueError:
                iops[dev] = None
        stop([proc])
        ops = sum(v for k, v in counts.items() if isinstance(k, int))
        print(f"{args.seconds} s: fio randwrite 4k QD16 fsync=32: era "
              f"{(iops['era'] or 0) / 1e3:.1f}k IOPS, wb {(iops['wb'] or 0) / 1e3:.1f}k IOPS; "
              f"{ops} control commands from 4 threads; {polls} rv status polls"
              + (f"; mutant {args.mutant}" if args.mutant else ""))
        for r in rows:
            seen = f"{r['events']} events, " if r.get("events") is not None else ""
            print(f"  {r['name']:<14} {seen}{r['violations']} violation(s)"
                  + (f"\n      {r['last'][:200]}" if r["last"] else ""))
        for e in counts.get("errors", [])[:5]:
            print(f"  control error: {e}")
        bad = {r["name"] for r in rows if r["violations"]}
        if first_seen is not None:
            when, hit = first_seen
            happened = min(r["first_at"] for r in hit)
            print(f"first violation at +{happened - t0:.2f} s (daemon clock), shown by "
                  f"rv status at +{when - t0:.2f} s: {when - happened:.2f} s later")
        ok = (not bad) if expected is None else (expected in bad)
        print("verdict:", "as expected" if ok else "NOT as expected",
              f"(violations in: {', '.join(sorted(bad)) or 'none'})")
        return 0 if ok else 1
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
