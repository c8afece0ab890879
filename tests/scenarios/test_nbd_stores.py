"""pydm in front of real NBD servers: linear, flakey, era and writeboost
over ``nbd://`` stores served by nbdkit (memory and file plugins) and
qemu-nbd, each verified end to end by fio through pydm's own NBD server;
era's changed blocks and ``tools/era-backup`` on a remote origin; and
writeboost with a local cache in front of a slow (nbdkit delay filter)
remote backing."""

import json
import os
import subprocess

import pytest

from helpers import make_image
from nbd_support import fio, need, run, start_server
from pydm.control import Control
from wb_support import status as wb_status

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SIZE = 16 << 20
SECTORS = SIZE >> 9
ERA_BLOCK = 64 << 10


def tables(tmp, store):
    make_image(os.path.join(tmp, "meta.img"), 4 << 20)
    make_image(os.path.join(tmp, "cache.img"), (1 << 20) + 16 * (512 << 10))
    return {
        "linear": f"0 {SECTORS} linear {store} 0",
        "flakey": f"0 {SECTORS} flakey {store} 0 60 0",
        "era": f"0 {SECTORS} era meta.img {store} {ERA_BLOCK >> 9}",
        "writeboost": f"0 {SECTORS} writeboost {store} cache.img",
    }


@pytest.mark.parametrize("kind", ["memory", "file", "qemu"])
def test_every_target_over_a_remote_store_passes_fio_verify(tmp_path, remote, kind):
    need("fio")
    r = remote(kind, size=SIZE)
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        for i, (target, table) in enumerate(tables(str(tmp_path), r.uri).items()):
            c.create(target, table, cwd=str(tmp_path))
            line = c.table(target)[0][3]
            assert f"nbd://127.0.0.1:{r.port}/" in line.split(), line    # canonical
            job = fio(served.unix_uri(target), "--rw=randwrite", "--bs=4k", f"--size={SIZE}",
                      "--number_ios=1500", "--iodepth=8", "--verify=crc32c",
                      f"--randseed={10 + i}", "--do_verify=1")
            assert job["write"]["io_bytes"] == 1500 * 4096, target
            assert job["read"]["io_bytes"] > 0, target
            c.remove(target)
            print(f"{kind} {target}: {job['write']['iops']:.0f} write IOPS, fio took "
                  f"{job['job_runtime'] / 1000:.1f} s")
    finally:
        served.server.stop()
        c.shutdown()
    assert c.stores.open_count() == 0


def test_era_tracks_and_backs_up_a_remote_origin(tmp_path, remote):
    """era over an nbd:// origin (nbdkit's file plugin): fio's writes are
    exactly era's changed blocks, and era-backup's full then incremental
    copy equals the remote disk."""
    need("fio", "qemu-img", "/usr/bin/python3")
    from test_era_e2e import SIZE as ERA_SIZE, EraStack, backup, fio_random_writes
    r = remote("file", size=ERA_SIZE)
    stack = EraStack(tmp_path, origin=r.uri).start()
    try:
        target = tmp_path / "backup.img"
        full = backup(stack, target)
        assert full["mode"] == "full" and full["bytes"] == ERA_SIZE
        since = full["next_since"]
        written = set()
        for i in range(2):
            written |= fio_random_writes(stack.uri, 200 + i, 50, tmp_path / f"io{i}.log", i)
            stack.pydm("era", "checkpoint", "vol")
        assert stack.changed(since) == written and len(written) > 50
        inc = backup(stack, target)
        assert inc["mode"] == "incremental" and inc["blocks"] == len(written)
        # the backup equals the remote disk itself, read straight from nbdkit
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(target),
                              r.image], capture_output=True, text=True, timeout=120)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        assert stack.daemon.stop() == 0


def test_writeboost_with_a_local_cache_hides_a_slow_remote_backing(tmp_path, remote):
    """A 5 ms-per-write remote backing (nbdkit's delay filter) behind a local
    writeboost cache: fio's writes are verified, and after drop_caches every
    block is on the remote disk."""
    need("fio", "qemu-img")
    r = remote("file", size=SIZE, filters=["delay"], params=["wdelay=5ms", "rdelay=1ms"])
    make_image(tmp_path / "cache.img", (1 << 20) + 16 * (512 << 10))
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        c.create("wb", f"0 {SECTORS} writeboost {r.uri} cache.img", cwd=str(tmp_path))
        job = fio(served.unix_uri("wb"), "--rw=randwrite", "--bs=4k", f"--size={SIZE}",
                  "--number_ios=2000", "--iodepth=8", "--verify=crc32c", "--randseed=5",
                  "--do_verify=1")
        # (the speed is the benchmark's business; shown here for the log)
        print(f"writeboost over a 5 ms remote: {job['write']['iops']:.0f} write IOPS")
        c.message("wb", 0, "drop_caches")
        assert wb_status(c)["nr_dirty"] == 0            # all of it went home
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", r.image,
                              served.unix_uri("wb")], capture_output=True, text=True,
                             timeout=120)
        assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    finally:
        served.server.stop()
        c.shutdown()


def test_allocation_of_a_remote_disk_shows_through_pydm(tmp_path, remote):
    """base:allocation passes up: nbdinfo --map through pydm's export of a
    linear device over a remote sparse file shows the file's data and holes."""
    need("nbdinfo")
    r = remote("file", size=SIZE)
    with open(r.image, "r+b") as f:
        for off in (1 << 20, 9 << 20):
            f.seek(off)
            f.write(b"\xaa" * (1 << 20))
    c = Control()
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    try:
        c.create("lin", f"0 {SECTORS} linear {r.uri} 0")
        out = run(["nbdinfo", "--json", "--map", served.unix_uri("lin")]).stdout
        data = [(e["offset"], e["length"]) for e in json.loads(out)
                if not e["type"] & 1]
        assert data == [(1 << 20, 1 << 20), (9 << 20, 1 << 20)], data
    finally:
        served.server.stop()
        c.shutdown()
