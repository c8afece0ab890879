"""Shared pieces of the fio-over-NBD benchmarks in tools/ (not a test module).

fio's nbd engine prints "fio: connected to NBD server" before its JSON, so
the JSON is parsed from the first "{".
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited early: {proc.args}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not listen on {port}: {proc.args}")


def make_image(path, size):
    """A file of random data (no holes), reused when it already has the size.

    Written as the method says, ``head -c SIZE /dev/urandom``: head writes in
    small chunks, so the page cache holds the file in small folios.  Written
    in 8 MiB chunks instead, this kernel caches it in 2 MiB folios, and a
    random 4 KiB write into one costs the kernel far more (linear randwrite
    4k QD16 through pydm: ~50-65k IOPS vs ~140k), for every server alike."""
    if os.path.exists(path) and os.path.getsize(path) == size:
        return
    with open(path, "wb") as f:
        subprocess.run(["head", "-c", str(size), "/dev/urandom"], stdout=f, check=True)


def start_pydm(work, devices, port, extra=(), python=None, label="pydm"):
    """`pydm serve` on 127.0.0.1:port with ``devices`` = [(name, table line)].

    ``python`` runs another checkout's pydm (its venv's interpreter) for a
    same-run A/B; ``label`` keeps its config and socket apart."""
    conf = os.path.join(work, f"{label}.toml")
    with open(conf, "w") as f:
        for name, table in devices:
            f.write(f'[[device]]\nname = "{name}"\ntable = "{table}"\n')
    sock = os.path.join(work, f"{label}.sock")
    cmd = [python or sys.executable, "-m", "pydm", "serve", conf, "--port", str(port),
           "--socket", sock, *extra]
    # cwd: `python -m` puts it first on sys.path, and a checkout there
    # would shadow the pydm that ``python`` has installed.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, cwd=work)
    wait_port(port, proc)
    return proc, sock


def stop(procs):
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


def run_fio(uri, rw, bs, qd, runtime=None, size="256m"):
    """One fio nbd-engine job; returns (bytes/s, IOPS) of its read or write side.
    ``runtime`` None: one pass over ``size`` (each block once for random jobs)."""
    cmd = ["fio", "--name=b", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}",
           f"--bs={bs}", f"--iodepth={qd}", f"--size={size}", "--output-format=json"]
    if runtime:
        cmd += ["--time_based", f"--runtime={runtime}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job.get("error"):
        raise SystemExit(f"fio error {job['error']} on {uri}")
    side = job["write"] if "write" in rw else job["read"]
    return side["bw_bytes"], side["iops"]


def fio_version():
    return subprocess.run(["fio", "--version"], capture_output=True, text=True).stdout.strip()


def fmt(metric, v):
    return f"{v / 1e6:8.0f} MB/s" if metric == "bw" else f"{v / 1e3:8.1f}k IOPS"


def pydm(sock, *args):
    """Run the ``pydm`` command of this interpreter against the daemon at ``sock``."""
    return subprocess.run([sys.executable, "-m", "pydm", *args, "--socket", sock],
                          capture_output=True, text=True, check=True).stdout


def preallocated(path, mib):
    """A file of ``mib`` MiB of zeros, written (not sparse): log writes into
    it never allocate; and synced, so that writing it back does not go on
    in the background of the runs that follow."""
    with open(path, "wb") as f:
        chunk = bytes(1 << 20)
        for _ in range(mib):
            f.write(chunk)
        os.fsync(f.fileno())
    return path


def run_in_workdir(args, prefix, steps):
    """Run each ``step(work, args)`` in ``args.dir``, or in a fresh temporary
    directory that is removed afterwards; the NBD steps (all but the last,
    which runs in-process) are skipped with ``args.skip_nbd``."""
    import shutil
    import tempfile
    if shutil.which("fio") is None and not args.skip_nbd:
        raise SystemExit("fio is not installed (apt-get install fio)")
    work = args.dir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    try:
        for step in steps[:-1]:
            if not args.skip_nbd:
                step(work, args)
        steps[-1](work, args)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)

