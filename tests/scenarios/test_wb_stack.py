"""writeboost with real clients: fio writes three times the cache's size
through a log that only urged writeback can free (and verifies it, also
after the device is re-created); drop_caches on an idle device with dirty
data in the RAM buffer writes all of it home (qemu-img compare); and era
over writeboost over files, end to end with a daemon: fio, checkpoint,
snapshot, two era-backup runs, qemu-img compare of the backup against the
device."""

import json
import os
import random
import sys
import threading

import pytest

from helpers import Cli, Daemon
import nbd_support
from nbd_support import need, run
from nbdclient import Client
from pydm.control import Control
from wb_support import (BLOCK, Acked, cache_size, make_images, serve, status, wb_table)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fio(uri, *options, timeout=300):
    return nbd_support.fio(uri, "--bs=4k", *options, timeout=timeout)


def unix_uri(sock, export):
    return f"nbd+unix:///{export}?socket={sock}"


# ------------------------------------------------------------ log wrap
WRAP_BACKING = 16 << 20
WRAP_SEGMENTS = 8                 # a 5 MiB cache: fio writes 16 MiB through it


def test_fio_writes_three_times_the_cache_through_urged_writeback(tmp_path):
    need("fio")
    back, cache, _ = make_images(tmp_path, WRAP_BACKING, WRAP_SEGMENTS, fill=bytes(WRAP_BACKING))
    table = wb_table(back, cache, WRAP_BACKING, "2 writeback_threshold 0")
    job_args = ["--rw=randwrite", f"--size={WRAP_BACKING}", "--iodepth=4", "--fsync=64",
                "--verify=crc32c", "--randseed=77"]
    c = Control()
    served = None
    try:
        c.create("wb", table)
        served = serve(c, tmp_path)
        job = fio(unix_uri(served.unix, "wb"), *job_args, "--do_verify=1")
        assert job["write"]["io_bytes"] >= 3 * cache_size(WRAP_SEGMENTS)
        assert job["read"]["io_bytes"] == WRAP_BACKING           # all of it verified
        st = status(c)
        assert st["state"] == ["active"] and st["writeback_threshold"] == 0
        assert st["current_id"] > 3 * WRAP_SEGMENTS                # the log wrapped, often
        assert st["last_writeback"] >= st["current_id"] - WRAP_SEGMENTS
        assert st["last_writeback"] <= st["last_flushed"] < st["current_id"]
        print("log wrap:", {k: st[k] for k in ("current_id", "last_flushed", "last_writeback",
                                               "nr_dirty", "nr_cur_batched_writeback")})
    finally:
        if served is not None:
            served.server.stop()
        c.shutdown()
    # re-created over the same files (replay): fio finds every block it wrote
    c = Control()
    try:
        c.create("wb", table)
        served = serve(c, tmp_path)
        job = fio(unix_uri(served.unix, "wb"), *job_args, "--verify_only")
        assert job["read"]["io_bytes"] == WRAP_BACKING
        served.server.stop()
    finally:
        c.shutdown()


# ------------------------------------------------------------ drop_caches
def test_drop_caches_on_an_idle_device_writes_the_ram_buffer_home(tmp_path):
    need("qemu-img")
    size = 8 << 20
    back, cache, image = make_images(tmp_path, size, 16)
    model = Acked(image)
    c = Control()
    served = None
    try:
        c.create("wb", wb_table(back, cache, size))
        served = serve(c, tmp_path)
        rnd = random.Random(4)
        with Client(served.unix, "wb") as client:
            for i in range(65):
                block = rnd.randrange(size // BLOCK)
                data = rnd.randbytes(BLOCK)
                model.ack(model.write(block * BLOCK, data))
                client.pwrite(block * BLOCK, data)
                if i % 20 == 19:
                    client.flush()          # three segments; five writes stay in RAM
        st = status(c)
        assert st["nr_dirty"] > 0 and st["cursor"] % 127 == 5, st      # in the RAM buffer
        assert st["last_flushed"] == 3 and st["last_writeback"] == 0
        done = []
        t = threading.Thread(target=lambda: done.append(c.message("wb", 0, "drop_caches")),
                             daemon=True)
        t.start()
        t.join(30)
        assert done == [None], "drop_caches did not return on an idle device"
        st = status(c)
        assert st["nr_dirty"] == 0 and st["last_writeback"] == st["last_flushed"] == 4, st
        shadow = tmp_path / "shadow.img"
        shadow.write_bytes(model.latest_image())
        r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", back, str(shadow)],
                check=False)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "Images are identical" in r.stdout
    finally:
        if served is not None:
            served.server.stop()
        c.shutdown()


# ------------------------------------------------------- era over writeboost
ERA_SIZE = 32 << 20
ERA_SEGMENTS = 8


def era_backup(tmp_path, daemon, uri, target):
    r = run(["/usr/bin/python3", os.path.join(ROOT, "tools", "era-backup"), "vol", str(target),
             "--uri", uri, "--socket", str(daemon.sock), "--pydm", f"{sys.executable} -m pydm"],
            timeout=300)
    return json.loads(r.stdout.splitlines()[-1])


def test_era_over_writeboost_over_files_backs_up_incrementally(tmp_path):
    need("fio", "qemu-img", "/usr/bin/python3")
    r = run(["/usr/bin/python3", "-c", "import nbd"], check=False)
    if r.returncode != 0:
        why = "/usr/bin/python3 has no nbd module (Debian: python3-libnbd)"
        pytest.fail(why) if os.environ.get("CI") else pytest.skip(why)
    back, cache, _ = make_images(tmp_path, ERA_SIZE, ERA_SEGMENTS)
    with open(tmp_path / "meta.img", "wb") as f:
        f.truncate(16 << 20)
    sectors = ERA_SIZE >> 9
    (tmp_path / "pydm.toml").write_text(
        f'[[device]]\nname = "wb"\ntable = "{wb_table(back, cache, ERA_SIZE)}"\n\n'
        f'[[device]]\nname = "vol"\ntable = "0 {sectors} era meta.img dm:wb 128"\n')
    nbd = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, tmp_path / "pydm.toml", extra=["--unix", str(nbd)])
    try:
        cli = Cli(d.sock, tmp_path)
        uri = unix_uri(nbd, "vol")
        fio(uri, "--rw=randwrite", "--size=16m", "--io_size=8m", "--iodepth=4", "--fsync=32",
            "--randseed=1", "--verify=crc32c", "--do_verify=1")
        cli("era", "checkpoint", "vol")
        cli("era", "take-snap", "vol")
        changed = json.loads(cli("era", "changed", "vol", "--since", "0", "--format", "json",
                                 "--snapshot").stdout)
        assert changed["blocks_changed"] > 0
        cli("era", "drop-snap", "vol")
        target = tmp_path / "backup.img"
        full = era_backup(tmp_path, d, uri, target)
        assert full["mode"] == "full" and full["bytes"] == ERA_SIZE
        fio(uri, "--rw=randwrite", "--offset=8m", "--size=8m", "--io_size=4m", "--iodepth=4",
            "--fsync=32", "--randseed=2")
        inc = era_backup(tmp_path, d, uri, target)
        assert inc["mode"] == "incremental" and inc["since"] == full["next_since"]
        assert 0 < inc["bytes"] < ERA_SIZE and inc["blocks"] > 0
        r = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(target), uri],
                check=False)
        assert r.returncode == 0 and "Images are identical" in r.stdout, r.stdout + r.stderr
        wb = json.loads(cli("wb", "status", "wb", "--json").stdout)
        assert wb["state"] == "active"
        assert wb["current_id"] > ERA_SEGMENTS                # through a wrapped log
        print("era over writeboost:", {"full": full, "incremental": inc,
                                       "wb current_id": wb["current_id"],
                                       "wb nr_dirty": wb["nr_dirty_caches"]})
    finally:
        assert d.stop() == 0
