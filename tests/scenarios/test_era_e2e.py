"""Era through real clients: fio writes, nbdinfo/qemu-img see exactly those
blocks, the incremental backup tool copies only them; and kill -9 of the daemon
in the middle of a random-write workload never loses a recorded write."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import Daemon, make_image

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BLOCK = 64 << 10                 # era block: 128 sectors
SIZE = 64 << 20
NR = SIZE // BLOCK


def need(*tools):
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.fail(f"not installed (tools/install-deps.sh installs them): {missing}")


class EraStack:
    """A daemon serving ``vol``: era over ``origin`` (a local image by
    default; any store argument, e.g. ``nbd://...``)."""

    def __init__(self, tmp_path, origin=None):
        self.tmp = tmp_path
        if origin is None:
            make_image(tmp_path / "origin.img", SIZE)
            origin = "origin.img"
        make_image(tmp_path / "meta.img", 16 << 20)
        (tmp_path / "pydm.toml").write_text(
            '[[device]]\nname = "vol"\n'
            f'table = "0 {SIZE >> 9} era meta.img {origin} {BLOCK >> 9}"\n')
        self.nbd = str(tmp_path / "nbd.sock")
        self.uri = f"nbd+unix:///vol?socket={self.nbd}"
        self.daemon = None

    def start(self):
        if os.path.exists(self.nbd):
            os.unlink(self.nbd)
        self.daemon = Daemon(self.tmp, self.tmp / "pydm.toml", extra=["--unix", self.nbd])
        deadline = time.monotonic() + 20
        while not os.path.exists(self.nbd) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self

    def pydm(self, *args, check=True):
        r = subprocess.run([sys.executable, "-m", "pydm", *map(str, args),
                            "--socket", str(self.daemon.sock)],
                           capture_output=True, text=True, timeout=120)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def era(self):
        return json.loads(self.pydm("era", "status", "vol", "--json").stdout)["current_era"]

    def changed(self, since):
        r = json.loads(self.pydm("era", "changed", "vol", "--since", since,
                                 "--format", "json").stdout)
        return {b for lo, hi in r["ranges"] for b in range(lo, hi)}


def fio_random_writes(uri, seed, n, log, region):
    """n random 4 KiB writes in a 16 MiB region; the blocks fio's log says it wrote."""
    r = subprocess.run(["fio", "--name=w", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                        "--bs=4k", f"--offset={region * (16 << 20)}", "--size=16m",
                        f"--number_ios={n}", f"--randseed={seed}",
                        "--iodepth=8", f"--write_iolog={log}", "--output-format=json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    blocks = set()
    with open(log) as f:
        for line in f:
            parts = line.split()          # [time] file action offset length
            if len(parts) >= 4 and parts[-3] == "write":
                off, n = int(parts[-2]), int(parts[-1])
                blocks.update(range(off // BLOCK, (off + n - 1) // BLOCK + 1))
    return blocks


def dirty_map(uri, since):
    r = subprocess.run(["nbdinfo", "--json", f"--map=qemu:dirty-bitmap:era-since-{since}", uri],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = set()
    for ext in json.loads(r.stdout):
        if ext["type"] == 1:
            assert ext["offset"] % BLOCK == 0 and ext["length"] % BLOCK == 0
            out |= set(range(ext["offset"] // BLOCK, (ext["offset"] + ext["length"]) // BLOCK))
    return out


def backup(stack, target):
    r = subprocess.run(["/usr/bin/python3", os.path.join(ROOT, "tools", "era-backup"), "vol",
                        str(target), "--uri", stack.uri, "--socket", str(stack.daemon.sock),
                        "--pydm", f"{sys.executable} -m pydm"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_fio_writes_map_and_incremental_backup(tmp_path):
    need("fio", "nbdinfo", "qemu-img", "/usr/bin/python3")
    stack = EraStack(tmp_path).start()
    try:
        target = tmp_path / "backup.img"
        full = backup(stack, target)
        assert full["mode"] == "full" and full["bytes"] == SIZE
        since = full["next_since"]
        written = set()
        for i in range(3):
            written |= fio_random_writes(stack.uri, 100 + i, 60, tmp_path / f"io{i}.log", i)
            stack.pydm("era", "checkpoint", "vol")
        assert len(written) > 100
        # the NBD view and the CLI agree with exactly what fio wrote
        assert dirty_map(stack.uri, since) == written
        assert stack.changed(since) == written
        qmap = subprocess.run(
            ["qemu-img", "map", "--output=json", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={stack.nbd},export=vol,"
             f"x-dirty-bitmap=qemu:dirty-bitmap:era-since-{since}"],
            capture_output=True, text=True, timeout=60)
        assert qmap.returncode == 0, qmap.stderr
        from_qemu = set()
        for ext in json.loads(qmap.stdout):
            if not ext["data"]:            # qemu reads "dirty" as the hole bit
                from_qemu |= set(range(ext["start"] // BLOCK,
                                       (ext["start"] + ext["length"]) // BLOCK))
        assert from_qemu == written
        inc = backup(stack, target)
        assert inc["mode"] == "incremental" and inc["since"] == since
        assert inc["blocks"] == len(written) and inc["bytes"] == len(written) * BLOCK
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(target),
                              stack.uri], capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
        again = backup(stack, target)          # nothing written since: nothing copied
        assert again["blocks"] == 0 and again["bytes"] == 0
    finally:
        assert stack.daemon.stop() == 0


def test_kill_9_during_random_writes_loses_no_recorded_write(tmp_path):
    need("era_check")
    import nbdclient as nbd
    stack = EraStack(tmp_path)
    acked = []                          # (block, era in force before the write was sent)
    rnd = random.Random(99)
    for round_ in range(5):
        stack.start()
        era_now = [stack.era()]
        stop = threading.Event()
        lock = threading.Lock()

        def writer(seed):
            r = random.Random(seed)
            try:
                with nbd.Client(stack.nbd, "vol") as c:
                    while not stop.is_set():
                        b = r.randrange(NR)
                        era = era_now[0]
                        c.pwrite(b * BLOCK + r.randrange(16) * 4096, bytes([b % 251]) * 4096)
                        with lock:
                            acked.append((b, era))
            except (EOFError, OSError, nbd.NBDError):
                pass                    # the daemon died under us: expected

        threads = [threading.Thread(target=writer, args=(round_ * 10 + i,)) for i in range(3)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + rnd.uniform(0.5, 2.0)
        while time.monotonic() < deadline:
            time.sleep(rnd.uniform(0.05, 0.3))
            stack.pydm("era", "checkpoint", "vol")
            era_now[0] = stack.era()
        stack.daemon.proc.send_signal(signal.SIGKILL)
        stack.daemon.proc.wait()
        stop.set()
        for t in threads:
            t.join(30)
        r = subprocess.run(["era_check", str(tmp_path / "meta.img")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        stack.start()                   # restart: recovers the committed writeset
        r = subprocess.run(["era_check", str(tmp_path / "meta.img")], capture_output=True,
                           text=True)
        assert r.returncode == 0, r.stderr
        cache = {}
        for b, era in acked:
            if era not in cache:
                cache[era] = stack.changed(era)
            assert b in cache[era], f"block {b}, acknowledged in era {era}, not recorded"
        assert stack.daemon.stop() == 0
    assert len(acked) > 300


def test_backup_tool_finds_pydm_without_an_activated_venv(tmp_path):
    # The README runs tools/era-backup right after making .venv, without
    # activating it: the tool must find the checkout's pydm, and a pydm it
    # cannot run is one clear line, not a traceback.
    need("/usr/bin/python3")
    tool = ["/usr/bin/python3", os.path.join(ROOT, "tools", "era-backup")]
    env = dict(os.environ, PATH="/usr/bin:/bin")
    r = subprocess.run(tool + ["vol", str(tmp_path / "b.img"), "--pydm", str(tmp_path / "nope")],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith("era-backup: cannot run the pydm command")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    venv_pydm = os.path.join(ROOT, ".venv", "bin", "pydm")
    if os.access(venv_pydm, os.X_OK):
        r = subprocess.run(tool + ["--help"], capture_output=True, text=True, env=env,
                           timeout=60)
        assert f"(default: {venv_pydm})" in " ".join(r.stdout.split())
