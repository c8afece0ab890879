#!/usr/bin/env python3
"""What runtime verification costs: fio randwrite over NBD through era and
through writeboost, with the monitors on, off, and with the trace calls
removed from the source.

Method: four builds of the same daemon, each started afresh for every run,
in an order that rotates every round: ``stripped`` (a copy of this
checkout's pydm with every ``if trace.on.NAME:`` and ``if trace.ENABLED:``
block deleted from the source: what "no tracing at all" costs), ``off`` (this checkout, no
monitor), ``on`` (``pydm serve --rv`` with every automaton monitor, record
reactor) and ``on+lockdep`` (``--rv all``: the lock-order checker too, which
swaps every lock for a checked one).  Each serves ``era`` (era over a 256 MiB
origin of random data, 64 KiB era blocks, checkpointed before each run so
the first writes go through the mark commit) and ``wb`` (writeboost over a
256 MiB backing with a 512 MiB cache).  fio's nbd engine runs randwrite 4k
QD16 for --runtime seconds; medians of --runs and ratios against ``off``.

    .venv/bin/python tools/bench_rv.py [--runs 5] [--runtime 4]

Then, in-process where the noise is small, tools/bench_router.py under the
stripped and the normal build, alternating: the cost of a trace point
nobody listens to, per bio.

Goals (the runtime-verification issue): on/off >= 0.9 for both devices;
off costs nothing measurable against stripped.  A benchmark: it prints,
it asserts nothing.
"""

import argparse
import ast
import os
import shutil
import statistics
import sys

from nbdbench import fmt, free_port, make_image, pydm, run_fio, run_in_workdir, start_pydm, stop

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZE = 256 << 20
VARIANTS = ("stripped", "off", "on", "on+lockdep")


def _is_trace_flag(t):
    """``trace.ENABLED``, ``trace.on.NAME``, or an ``and`` holding one."""
    if isinstance(t, ast.BoolOp) and isinstance(t.op, ast.And):
        return any(_is_trace_flag(v) for v in t.values)
    while isinstance(t, ast.Attribute):
        t = t.value
    return isinstance(t, ast.Name) and t.id == "trace"


class _StripTrace(ast.NodeTransformer):
    """Delete ``if trace.on.NAME:`` (or ``trace.ENABLED``) blocks (no else)."""

    removed = 0

    def _strip(self, body):
        out = []
        for node in body:
            if isinstance(node, ast.If) and not node.orelse and _is_trace_flag(node.test):
                _StripTrace.removed += 1
                continue
            out.append(self.visit(node))
        return out or [ast.Pass()]

    def generic_visit(self, node):
        for field in ("body", "orelse", "finalbody"):
            val = getattr(node, field, None)
            if isinstance(val, list) and val and isinstance(val[0], ast.stmt):
                setattr(node, field, self._strip(val))
        for h in getattr(node, "handlers", []) or []:
            h.body = self._strip(h.body)
        return node


def stripped_build(work):
    """A copy of pydm (targets and metadata inside it, as installed) without
    trace calls; returns the directory to put first on PYTHONPATH."""
    dest = os.path.join(work, "stripped")
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(os.path.join(ROOT, "pydm"), os.path.join(dest, "pydm"))
    shutil.copytree(os.path.join(ROOT, "targets"), os.path.join(dest, "pydm", "targets"))
    shutil.copytree(os.path.join(ROOT, "metadata"), os.path.join(dest, "pydm", "metadata"))
    for d, _dirs, files in os.walk(dest):
        for f in files:
            if f.endswith(".py"):
                p = os.path.join(d, f)
                with open(p) as fh:
                    tree = ast.parse(fh.read())
                tree = _StripTrace().visit(tree)
                with open(p, "w") as fh:
                    fh.write(ast.unparse(ast.fix_missing_locations(tree)))
    return dest


def bench(work, args):
    origin = os.path.join(work, "origin.img")
    make_image(origin, SIZE)
    strip_dir = stripped_build(work)
    print(f"stripped build: {_StripTrace.removed} trace blocks removed", file=sys.stderr)
    if not _StripTrace.removed:
        raise SystemExit("bench_rv: the stripped build removed no trace point (call sites "
                         "changed shape?)")
    sectors = SIZE >> 9
    samples = {}
    for r in range(args.runs):
        order = VARIANTS[r % 4:] + VARIANTS[:r % 4]
        for v in order:
            vdir = os.path.join(work, v.replace("+", "-"))
            os.makedirs(vdir, exist_ok=True)
            era_origin, backing = os.path.join(vdir, "era.img"), os.path.join(vdir, "back.img")
            meta, cache = os.path.join(vdir, "meta.img"), os.path.join(vdir, "cache.img")
            if not os.path.exists(era_origin):
                shutil.copyfile(origin, era_origin)
                shutil.copyfile(origin, backing)
                with open(meta, "wb") as f:
                    f.truncate(64 << 20)
            with open(cache, "wb") as f:          # a fresh cache each run
                f.truncate(512 << 20)
            devices = [("era", f"0 {sectors} era {meta} {era_origin} 128"),
                       ("wb", f"0 {sectors} writeboost {backing} {cache}")]
            extra, env_path = [], None
            if v == "on":
                extra = ["--rv", ",".join(AUTOMATA), "--rv-reactor", "record"]
            elif v == "on+lockdep":
                extra = ["--rv", "all", "--rv-reactor", "record"]
            elif v == "stripped":
                env_path = strip_dir
            old = os.environ.get("PYTHONPATH")
            if env_path:
                os.environ["PYTHONPATH"] = env_path
            try:
                port = free_port()
                proc, sock = start_pydm(vdir, devices, port, extra, label=v.replace("+", "-"))
            finally:
                if env_path:
                    if old is None:
                        os.environ.pop("PYTHONPATH")
                    else:
                        os.environ["PYTHONPATH"] = old
            try:
                pydm(sock, "dm", "message", "era", "0", "checkpoint")
                for dev in ("era", "wb"):
                    _bw, iops = run_fio(f"nbd://127.0.0.1:{port}/{dev}", "randwrite", "4k", 16,
                                        args.runtime)
                    samples.setdefault((dev, v), []).append(iops)
                    print(f"round {r + 1} {dev:<4} {v:<11} {fmt('iops', iops)}", file=sys.stderr)
                if v.startswith("on"):
                    st = pydm(sock, "rv", "status", "--json")
                    import json
                    bad = sum(row["violations"] for row in json.loads(st))
                    print(f"round {r + 1} {v}: {bad} violation(s)", file=sys.stderr)
            finally:
                stop([proc])
    print(f"randwrite 4k QD16 over NBD, medians of {args.runs} runs of {args.runtime} s "
          f"(IOPS; ratio against off)")
    print(f"{'device':<8}" + "".join(f"{v:>20}" for v in VARIANTS))
    for dev in ("era", "wb"):
        base = statistics.median(samples[(dev, "off")])
        cells = []
        for v in VARIANTS:
            m = statistics.median(samples[(dev, v)])
            cells.append(f"{m / 1e3:9.1f}k ({m / base:4.2f}x)")
        print(f"{dev:<8}" + "".join(f"{c:>20}" for c in cells))


def bench_inprocess(work, args):
    """Off against stripped where the noise is small: tools/bench_router.py
    (bios through one and two linear devices over memory, in-process) run
    under both builds, alternating, --runs times."""
    import re
    import subprocess
    strip_dir = os.path.join(work, "stripped")
    if not os.path.isdir(strip_dir):
        strip_dir = stripped_build(work)
    rows = ("linear over memory", "linear over linear over memory")
    got = {}
    for r in range(args.runs):
        for v in (("off", "stripped") if r % 2 == 0 else ("stripped", "off")):
            env = dict(os.environ, PYDM_LOCKDEP="0")
            if v == "stripped":
                env["PYTHONPATH"] = strip_dir
            out = subprocess.run([sys.executable, os.path.join(HERE, "bench_router.py"),
                                  "--rounds", "3"], capture_output=True, text=True,
                                 env=env, check=True, cwd=work).stdout
            for row in rows:
                for op in ("read", "write"):
                    m = re.search(rf"^{row}\s+{op}\s+([0-9.]+)", out, re.M)
                    got.setdefault((row, op, v), []).append(float(m.group(1)))
    print(f"in-process, tools/bench_router.py, medians of {args.runs} alternating runs "
          f"(us per 4 KiB bio, with the memory store)")
    print(f"{'path':<34}{'op':<7}{'stripped':>10}{'off':>10}{'off/stripped':>14}")
    for row in rows:
        for op in ("read", "write"):
            a = statistics.median(got[(row, op, "stripped")])
            b = statistics.median(got[(row, op, "off")])
            print(f"{row:<34}{op:<7}{a:>10.2f}{b:>10.2f}{b / a:>13.3f}x")


def _automata():
    sys.path.insert(0, ROOT)
    from pydm.verify.specs import SPECS
    return list(SPECS)


AUTOMATA = _automata()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--runtime", type=int, default=4)
    ap.add_argument("--dir", help="work directory (default: a fresh temporary one)")
    ap.add_argument("--skip-nbd", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    run_in_workdir(args, "pydm-rvbench-", [bench, bench_inprocess])


if __name__ == "__main__":
    main()
