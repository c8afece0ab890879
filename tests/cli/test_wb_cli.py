"""`pydm wb ...`: the offline tools' contract (help, bad options, missing,
foreign, tiny and damaged files: one line and exit 1, never a traceback),
check and drain on cache images a real daemon wrote, and the live status and
drop-caches against a daemon serving a writeboost device over NBD."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from helpers import Daemon, do_io
from nbdclient import Client
from pydm.bio import FLUSH, READ, REQ_PREFLUSH, WRITE
from pydm.control import Control

SECTOR = 512
BLOCK = 4096
SB = 1 << 20
SEGMENT = 512 << 10
BACKING = 8 << 20
NR_SEGMENTS = 32          # the daemon runs below never wrap the log
CACHE = SB + NR_SEGMENTS * SEGMENT


def pydm(*args, sock=None):
    extra = ["--socket", str(sock)] if sock else []
    return subprocess.run([sys.executable, "-m", "pydm", *map(str, args), *extra],
                          capture_output=True, text=True, timeout=120)


def one_line_error(r, *words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def usage_error(r, words):
    """argparse's way, as everywhere in pydm: the usage line, then the error."""
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("usage: pydm") and words in r.stderr, r.stderr


def images(tmp, fill=None):
    back, cache = tmp / "back.img", tmp / "cache.img"
    back.write_bytes(fill if fill is not None else os.urandom(BACKING))
    with open(cache, "wb") as f:
        f.truncate(CACHE)
    return back, cache


def table(back, cache):
    return f"0 {BACKING // SECTOR} writeboost {back} {cache}"


def offline_cache(tmp):
    """A cache image with three segments of dirty data, made in-process."""
    back, cache = images(tmp)
    c = Control()
    dev = c.create("wb", table(back, cache))
    for i in range(3):
        assert do_io(dev, WRITE, i * 64, data=bytes([i + 1]) * 8 * BLOCK)[0] == 0
        assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    c.shutdown()
    return back, cache


# --------------------------------------------------------- the contract
@pytest.mark.parametrize("tool,after", [("check", []), ("dump", []), ("drain", ["BACKING"])])
def test_cli_contract(tmp_path, tool, after):
    back, cache = offline_cache(tmp_path)
    tail = [back if a == "BACKING" else a for a in after]
    r = pydm("wb", tool, "--help")
    assert r.returncode == 0 and "usage: pydm wb" in r.stdout
    usage_error(pydm("wb", tool, "--no-such-option", cache, *tail), "unrecognized arguments")
    one_line_error(pydm("wb", tool, tmp_path / "missing.img", *tail), "No such file")
    junk = tmp_path / "junk.img"
    junk.write_bytes(os.urandom(CACHE))
    one_line_error(pydm("wb", tool, junk, *tail), "not a writeboost cache", "magic")
    blank = tmp_path / "blank.img"
    blank.write_bytes(bytes(CACHE))
    one_line_error(pydm("wb", tool, blank, *tail), "not formatted")
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    one_line_error(pydm("wb", tool, tiny, *tail), "too small")
    small = tmp_path / "small.img"
    small.write_bytes(open(cache, "rb").read(SB + 1000))      # magic, no whole segment
    one_line_error(pydm("wb", tool, small, *tail), "too small")
    r = pydm("wb", tool, cache, *tail)
    assert r.returncode == 0, r.stderr


def test_group_and_argument_errors(tmp_path):
    _back, cache = offline_cache(tmp_path)
    usage_error(pydm("wb"), "required")
    usage_error(pydm("wb", "check", cache, "--backing-size", "lots"), "BYTES must be")
    usage_error(pydm("wb", "dump", cache, "--segment", "0"), "ID must be")
    one_line_error(pydm("wb", "dump", cache, "--segment", NR_SEGMENTS + 1),
                   f"segment {NR_SEGMENTS + 1} is not in the cache", "slot 0 holds segment 1")
    usage_error(pydm("wb", "drain", cache), "required")
    one_line_error(pydm("wb", "drain", cache, tmp_path / "none.img"), "No such file")


def test_dump_text_and_json(tmp_path):
    _back, cache = offline_cache(tmp_path)
    out = pydm("wb", "dump", cache).stdout.splitlines()
    assert out[0] == "superblock: magic 0x57427374 (writeboost), record: last written-back " \
                     "segment 0"
    assert out[2].startswith("segment 1: slot 0, length 8, checksum 0x") and \
        out[2].endswith(" ok")
    assert out[3] == "  block 0: sector 0 dirty 0xff"
    d = json.loads(pydm("wb", "dump", cache, "--json", "--segment", 2).stdout)
    assert [s["id"] for s in d["segments"]] == [2]
    s = d["segments"][0]
    assert s["slot"] == 1 and s["length"] == 8 and s["checksum_ok"] and s["problem"] is None
    assert s["metablocks"][0] == {"sector": 64, "dirty_bits": 255}
    assert d["nr_segments"] == NR_SEGMENTS and d["magic"] == 0x57427374 and d["record"] == 0


# ------------------------------------------------ a daemon over NBD
def config(tmp, back, cache, extra=""):
    p = tmp / "pydm.toml"
    p.write_text(f'[[device]]\nname = "z"\ntable = "0 8 zero"\n{extra}'
                 f'[[device]]\nname = "wb"\ntable = "{table(back, cache)}"\n')
    return p


def qemu_io(nbd, *cmds, dev="wb"):
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    r = subprocess.run(args + [f"nbd+unix:///{dev}?socket={nbd}"],
                       capture_output=True, text=True, timeout=60)
    return r


def serve(start_daemon, tmp, back, cache, extra=""):
    nbd = tmp / "nbd.sock"
    d = start_daemon(config(tmp, back, cache, extra), ["--unix", str(nbd)])
    return d, nbd


WRITES = [(0x5a, 0, 256 << 10), (0x11, 4096 + 512, 512), (0x22, 1 << 20, 64 << 10),
          (0x33, 3 * BLOCK - 1024, 3072), (0x44, 7 << 20, 8192)]
TAIL = (0x66, (5 << 20) + 1536, 8192)     # written last, with one flush after it


def apply_writes(data, writes=WRITES + [TAIL]):
    out = bytearray(data)
    for value, off, n in writes:
        out[off:off + n] = bytes([value]) * n
    return bytes(out)


def nbd_writes(nbd):
    """WRITES with qemu-io (which flushes twice as it closes: an empty
    segment), then TAIL and one flush with a plain client, so the log ends
    with a segment that carries data."""
    cmds = []
    for value, off, n in WRITES:
        cmds += [f"write -P {value:#x} {off} {n}", "flush"]
    r = qemu_io(nbd, *cmds)
    assert r.returncode == 0 and "error" not in r.stdout.lower(), r.stdout + r.stderr
    value, off, n = TAIL
    with Client(str(nbd), "wb") as c:
        c.pwrite(off, bytes([value]) * n)
        c.flush()


def test_status_and_drop_caches(tmp_path, start_daemon):
    back, cache = images(tmp_path, bytes(BACKING))
    d, nbd = serve(start_daemon, tmp_path, back, cache)
    r = qemu_io(nbd, "write -P 0x5a 0 256k")
    assert r.returncode == 0, r.stderr
    r = pydm("wb", "status", "wb", sock=d.sock)
    assert r.returncode == 0, r.stderr
    lines = dict(ln.split(":", 1) for ln in r.stdout.splitlines())
    assert lines["dirty cache blocks"].strip() == "64"
    assert lines["write miss, full block"].strip() == "64"
    assert lines["state"].strip().startswith("active")
    assert lines["cache blocks (cursor/total)"].strip().endswith(f"/{NR_SEGMENTS * 127}")
    st = json.loads(pydm("wb", "status", "wb", "--json", sock=d.sock).stdout)
    assert st["nr_dirty_caches"] == 64 and st["nr_segments"] == NR_SEGMENTS
    assert st["error"] is None
    assert st["stats"]["write miss, full block"] == 64 and len(st["stats"]) == 16
    assert st["writeback_threshold"] == 0 and st["state"] == "active"
    r = pydm("wb", "drop-caches", "wb", sock=d.sock)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("wb: drop_caches done: 64 dirty blocks written back, 0 dirty")
    assert "64/64 blocks" in r.stderr          # not a tty: the final state only
    st = json.loads(pydm("wb", "status", "wb", "--json", sock=d.sock).stdout)
    assert st["nr_dirty_caches"] == 0 and st["last_writeback_id"] == st["last_flushed_id"]
    with open(back, "rb") as f:
        assert f.read(256 << 10) == b"\x5a" * (256 << 10)
    one_line_error(pydm("wb", "status", "z", sock=d.sock), "not a writeboost device")
    one_line_error(pydm("wb", "drop-caches", "z", sock=d.sock), "not a writeboost device")
    one_line_error(pydm("wb", "status", "ghost", sock=d.sock), "ghost: no such device")


def test_drop_caches_on_a_failed_target_is_one_line(tmp_path, start_daemon):
    back, cache = offline_cache(tmp_path)         # formatted: the start writes nothing
    shutil.move(cache, tmp_path / "c.img")
    dead = '[[device]]\nname = "c"\ntable = "0 %d flakey c.img 0 0 3600 1 error_writes"\n' \
           % (CACHE // SECTOR)
    d, nbd = serve(start_daemon, tmp_path, back, "dm:c", dead)
    r = qemu_io(nbd, "write -P 0x77 0 4k", "flush")
    assert "error" in (r.stdout + r.stderr).lower()
    st = json.loads(pydm("wb", "status", "wb", "--json", sock=d.sock).stdout)
    assert st["state"] == "failed"
    assert st["error"]["errno_name"] == "EIO" and st["error"]["store"] == "cache"
    text = pydm("wb", "status", "wb", sock=d.sock).stdout
    assert "state:" in text and "FAILED: write of the cache at sector" in text
    one_line_error(pydm("wb", "drop-caches", "wb", sock=d.sock),
                   "wb: drop_caches failed", "FAILED", "EIO")


def daemon_image(tmp, start_daemon):
    back, cache = images(tmp)
    original = back.read_bytes()
    d, nbd = serve(start_daemon, tmp, back, cache)
    nbd_writes(nbd)
    assert d.stop() == 0
    return original, back, cache


def test_drain_is_refused_while_a_daemon_uses_the_cache(tmp_path, start_daemon):
    """pydm wb drain writes the backing and the cache's record: while a
    daemon has them open for writing it is refused (one line), the backing
    untouched; once the daemon is gone it drains."""
    back, cache = images(tmp_path)
    original = back.read_bytes()
    d, nbd = serve(start_daemon, tmp_path, back, cache)
    nbd_writes(nbd)
    one_line_error(pydm("wb", "drain", cache, back), "is in use")
    assert back.read_bytes() == original
    assert d.stop() == 0
    r = pydm("wb", "drain", cache, back)
    assert r.returncode == 0, r.stderr


def segments(cache):
    """{id: segment} from ``pydm wb dump --json``."""
    r = pydm("wb", "dump", cache, "--json")
    assert r.returncode == 0, r.stderr
    return {s["id"]: s for s in json.loads(r.stdout)["segments"]}


def test_check_is_clean_after_a_daemon_run(tmp_path, start_daemon):
    _original, _back, cache = daemon_image(tmp_path, start_daemon)
    n = max(segments(cache))
    assert 5 < n < NR_SEGMENTS
    r = pydm("wb", "check", cache, "--backing-size", BACKING)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    last = r.stdout.splitlines()[-1]
    assert last.startswith(f"clean: {n} segments in the log (1..{n}), ") and "note" not in last
    one_line_error(pydm("wb", "check", cache, "--backing-size", 1 << 20),
                   "damaged", "is not a 4 KiB block of the backing device")


def segment_offset(seg_id):
    return SB + (seg_id - 1) % NR_SEGMENTS * SEGMENT


def test_check_names_a_flipped_byte_in_the_middle_of_the_log(tmp_path, start_daemon):
    _original, _back, cache = daemon_image(tmp_path, start_daemon)
    segs = segments(cache)
    n = max(segs)
    bad = min(i for i, s in segs.items() if s["length"] and i > 1)   # sound ones follow it
    off = segment_offset(bad) + BLOCK + 100          # a byte of its first data block
    with open(cache, "r+b") as f:
        f.seek(off)
        b = f.read(1)[0]
        f.seek(off)
        f.write(bytes([b ^ 0x40]))
    r = pydm("wb", "check", cache)
    one_line_error(r, f"damaged: segment {bad} (slot {bad - 1}): checksum mismatch",
                   f"drops {n - bad} later")
    assert r.stdout.splitlines()[-1].startswith(
        f"damaged: {bad - 1} segments in the log (1..{bad - 1})")
    one_line_error(pydm("wb", "drain", cache, tmp_path / "back.img"), f"segment {bad}",
                   "--force")


def test_check_calls_a_torn_tail_clean(tmp_path, start_daemon):
    _original, _back, cache = daemon_image(tmp_path, start_daemon)
    segs = segments(cache)
    n = max(segs)
    last = segs[n]
    assert last["length"] == 3                   # TAIL: three blocks
    with open(cache, "r+b") as f:
        f.seek(segment_offset(last["id"]) + BLOCK)
        f.write(bytes(last["length"] * BLOCK))
    r = pydm("wb", "check", cache)
    assert r.returncode == 0, r.stderr
    assert f"note: segment {last['id']} (slot {last['slot']}) is a torn write at the tail" \
        in r.stdout
    assert r.stdout.splitlines()[-1].endswith("; 1 note")


def test_drain_writes_what_the_device_showed_after_a_kill(tmp_path):
    back, cache = images(tmp_path)
    original = back.read_bytes()
    nbd = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, config(tmp_path, back, cache), ["--unix", str(nbd)])
    try:
        nbd_writes(nbd)
        r = qemu_io(nbd, "read -P 0x11 4608 512", "read -P 0x22 1M 64k")
        assert r.returncode == 0 and "failed" not in r.stdout, r.stdout
    finally:
        d.proc.send_signal(signal.SIGKILL)            # nothing is written back
        d.proc.wait()
    assert back.read_bytes() == original
    copy = tmp_path / "copy.img"
    shutil.copy(back, copy)
    small = tmp_path / "small.img"
    small.write_bytes(original[:4 << 20])
    one_line_error(pydm("wb", "drain", cache, small), "smaller than the cache's highest dirty")
    assert small.read_bytes() == original[:4 << 20]
    before = cache.read_bytes()
    r = pydm("wb", "drain", cache, copy)
    assert r.returncode == 0, r.stderr
    n = max(segments(cache))
    assert r.stdout.startswith("drained ") and f"of segments 1..{n} " in r.stdout
    assert copy.read_bytes() == apply_writes(original)
    after = cache.read_bytes()
    # only the record changed: the 4 KiB that ends at sector 2047
    assert after[:SB - BLOCK] == before[:SB - BLOCK] and after[SB:] == before[SB:]
    assert int.from_bytes(after[SB - SECTOR:SB - SECTOR + 8], "little") == n
    r = pydm("wb", "check", cache)
    assert r.returncode == 0 and ", 0 dirty blocks" in r.stdout.splitlines()[-1]
    # the cache starts clean over the drained copy, and shows the same data
    c = Control()
    dev = c.create("wb", table(copy, cache))
    assert c.status("wb")[0][3].split()[6] == "0"
    st, data = do_io(dev, READ, 0, BACKING // SECTOR)
    assert st == 0 and bytes(data) == apply_writes(original)
    c.shutdown()
    r = pydm("wb", "drain", cache, copy)
    assert r.returncode == 0 and "nothing to drain" in r.stdout
