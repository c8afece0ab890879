"""log-writes logs read back: the format's pitfalls (super padding, malformed
headers, 4 KiB sectors, long marks, a full or failing log) and ``pydm lw
replay``/``dump`` with replay-log's semantics, run as a user runs them."""

import os
import random
import shutil
import struct
import sys

import pytest

from lwtest import SECTOR, Rig, kinds
from pydm.cli import main as pydm_main
from pydm.errors import DMError
from lw_spec_reader import apply, read_log

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "contract"))
from contract_cases import PassThru  # noqa: E402


def lw(capsys, *argv):
    """``pydm lw ...`` in this process: (exit status, stdout, stderr)."""
    rc = pydm_main(["lw", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def blank_like(path, src):
    with open(path, "wb") as f:
        f.truncate(os.path.getsize(src))
    return path


@pytest.fixture
def logged(tmp_path):
    """A log of a random workload: writes (4-16 KiB, and 64-256 KiB ones), a
    FUA now and then, discards,
    flushes and marks m0..m4 (with the device's image at each mark), from a
    device over a blank data file, then removed cleanly."""
    r = Rig(tmp_path, data=bytes(8192 * SECTOR), log_bytes=32 << 20)
    rnd = random.Random(4)
    at_mark = {}
    for i in range(200):
        x = rnd.random()
        sector = rnd.randrange(1024) * 8
        if x < 0.06:
            assert r.flush() == 0
        elif x < 0.1:
            assert r.discard(sector, 8 * rnd.randint(1, 4)) == 0
        else:
            # mostly small writes (joined in the log writer's staging
            # buffers), some big ones (logged from their own pooled buffer)
            n = 8 * (rnd.randint(1, 4) if rnd.random() < 0.85 else rnd.randint(16, 64))
            sector = min(sector, 8192 - n)
            data = rnd.randbytes(n * SECTOR)
            fua = x >= 0.95
            if fua:     # a FUA is logged ahead of older unflushed writes (the
                assert r.flush() == 0   # kernel's order): none may overlap it
            assert r.write(sector, data, 1 if fua else 0) == 0
        if i % 40 == 39:
            assert r.flush() == 0          # a mark sees only what is flushed
            name = f"m{i // 40}"
            r.mark(name)
            at_mark[name] = open(r.data, "rb").read()
    r.close()
    r.at_mark = at_mark
    return r


# -------------------------------------------------------------- the format
def test_the_log_reproduces_the_device_at_the_end_and_at_every_mark(logged, tmp_path,
                                                                     capsys):
    out = blank_like(tmp_path / "replay.img", logged.data)
    assert lw(capsys, "replay", "--log", logged.log, "--replay", out)[0] == 0
    assert open(out, "rb").read() == open(logged.data, "rb").read()
    for name, image in logged.at_mark.items():
        out = blank_like(tmp_path / f"{name}.img", logged.data)
        assert lw(capsys, "replay", "--log", logged.log, "--replay", out,
                  "--end-mark", name)[0] == 0
        assert open(out, "rb").read() == image, name
    # the independent reader agrees, entry for entry
    ss, es = read_log(logged.log)
    assert ss == 512 and bytes(apply(es, ss, bytearray(len(logged.initial)))) == \
        open(logged.data, "rb").read()
    rc, text, _ = lw(capsys, "dump", logged.log)
    assert rc == 0 and len(text.splitlines()) == len(es) + 1


def test_the_super_padding_is_zero_and_ignored(logged, capsys):
    raw = open(logged.log, "rb").read(512)
    assert raw[28:32] == bytes(4) and raw[32:] == bytes(480)
    with open(logged.log, "r+b") as f:               # what the kernel may leave there
        f.seek(28)
        f.write(os.urandom(4))
    assert lw(capsys, "replay", "--log", logged.log, "--num-entries")[0] == 0
    assert read_log(logged.log)[1]


@pytest.mark.parametrize("damage", ["byte 32", "zero header", "magic"])
def test_a_malformed_log_is_refused_and_nothing_is_written(logged, tmp_path, capsys,
                                                           damage):
    es = read_log(logged.log)[1]
    plain = next(e for e in es[5:] if e["flags"] == 0)
    with open(logged.log, "r+b") as f:
        if damage == "byte 32":
            f.seek(plain["pos"] * SECTOR + 32)
            f.write(b"\x01")
        elif damage == "zero header":
            f.seek(plain["pos"] * SECTOR)
            f.write(bytes(SECTOR))
        else:
            f.write(b"XXXX")
    out = tmp_path / "replay.img"
    with open(out, "wb") as f:
        f.write(b"\xaa" * os.path.getsize(logged.data))
    before = open(out, "rb").read()
    rc, _o, err = lw(capsys, "replay", "--log", logged.log, "--replay", out)
    assert rc == 1 and err.count("\n") == 1
    assert ("Malformed entry" in err) if damage != "magic" else ("Magic doesn't match" in err)
    assert open(out, "rb").read() == before
    assert lw(capsys, "dump", logged.log)[0] == 1


@pytest.mark.parametrize("log_on", ["file", "device"])
def test_one_flush_covering_more_than_the_staging_buffers_hold(tmp_path, capsys, log_on):
    """A flush that covers more small writes than the log writer's staging
    buffers hold at once, with big writes in between (written from their
    own pooled buffers), then more after the pooled buffers came back: the
    log replays to the device.  With the log on a file the small ones go in
    gathered writes; on a pydm device (linear over the file) they are staged
    (filled, written, reused)."""
    from helpers import do_io
    from pydm.bio import FLUSH, REQ_PREFLUSH, WRITE
    from pydm.control import Control
    from pydm.targets.logwrites import logger
    data, log = str(tmp_path / "data.img"), str(tmp_path / "log.img")
    with open(data, "wb") as f:
        f.truncate(8192 * SECTOR)
    with open(log, "wb") as f:
        f.truncate(64 << 20)
    c = Control()
    if log_on == "device":
        c.create("loglin", f"0 {(64 << 20) >> 9} linear {log} 0")
    dev = c.create("lw", f"0 8192 log-writes {data} {'dm:loglin' if log_on == 'device' else log}")
    rnd = random.Random(7)

    def write(sector, payload):
        assert do_io(dev, WRITE, sector, data=payload)[0] == 0
    small = logger.STAGES * logger.CHUNK // (4096 + SECTOR) + 200
    for i in range(small):
        n = 8 if i % 500 else 8 * 64
        write(rnd.randrange((8192 - n) // 8) * 8, rnd.randbytes(n * SECTOR))
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    for i in range(50):                      # pooled buffers come back into use
        write(rnd.randrange(120) * 64, rnd.randbytes(32 << 10))
        write(rnd.randrange(60) * 128, rnd.randbytes(64 << 10))
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    c.shutdown()
    out = blank_like(tmp_path / "replay.img", data)
    assert lw(capsys, "replay", "--log", log, "--replay", out)[0] == 0
    assert open(out, "rb").read() == open(data, "rb").read()
    assert len(read_log(log)[1]) == small + 100 + 3     # two flushes and the end mark


def test_a_4k_sector_log(tmp_path, capsys):
    """Over a data device with 4 KiB blocks the log's sectors are 4 KiB:
    entries count in 4 KiB units, status' second field stays in 512-byte
    sectors, and a request that is not whole 4 KiB blocks is refused."""
    from helpers import do_io
    from pydm.bio import FLUSH, REQ_PREFLUSH, WRITE
    from pydm.control import Control
    data = tmp_path / "data.img"
    with open(data, "wb") as f:
        f.write(bytes(8192 * SECTOR))
    with open(tmp_path / "log.img", "wb") as f:
        f.truncate(8 << 20)
    c = Control()
    c.targets.register(PassThru)
    c.create("pt", f"0 8192 passthru {data}")
    dev = c.create("lw", f"0 8192 log-writes dm:pt {tmp_path / 'log.img'}")
    assert c.status("lw")[0][3] == "0 7"
    assert do_io(dev, WRITE, 16, data=b"x" * 8192)[0] == 0
    assert do_io(dev, WRITE, 17, data=b"y" * 4096)[0] != 0        # not on a 4 KiB block
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    c.shutdown()
    ss, es = read_log(tmp_path / "log.img")
    assert ss == 4096 and (es[0]["sector"], es[0]["nr"]) == (2, 2)
    assert kinds(es) == ["W2", "FLUSH", "M:dm-log-writes-end"]


def test_marks_are_cut_to_a_sector_and_take_one_word(tmp_path):
    r = Rig(tmp_path)
    r.mark("x" * 600)
    for bad in ("mark", "mark a b", "frob a"):
        with pytest.raises(DMError):
            r.control.message("lw", 0, bad)
    r.close()
    mark = read_log(r.log)[1][0]
    assert mark["mark"] == "x" * 479
    assert struct.unpack_from("<Q", open(r.log, "rb").read(), 512 + 24)[0] == 479


def test_a_full_log_stops_logging_and_io_goes_on(tmp_path, capsys):
    r = Rig(tmp_path, log_bytes=128 << 10)          # room for ~30 writes of 4 KiB
    for i in range(100):
        assert r.write(i * 8, bytes([i]) * 4096) == 0
        if i % 5 == 4:
            assert r.flush() == 0
    r.settle()
    assert r.status().endswith(" logging_disabled")
    assert r.write(0, b"z" * 4096) == 0 and r.flush() == 0       # I/O unharmed
    r.close()
    # the log replays to its last durable point: a state the device passed
    # through (the first n writes, in order, and nothing of the later ones)
    ss, es = read_log(r.log)
    assert "FLUSH" in kinds(es) and (es[-1]["pos"] + 1 + es[-1]["nr"]) * ss < 128 << 10
    image = bytes(apply(es, ss, bytearray(r.initial)))
    n = sum(1 for e in es if e["data"] is not None)
    assert 20 < n < 100
    assert image[:n * 4096] == b"".join(bytes([i]) * 4096 for i in range(n))
    assert image[n * 4096:] == r.initial[n * 4096:]


def test_a_failing_log_store_stops_logging_and_io_goes_on(tmp_path):
    from pydm.store import FileStore
    from pydm.store_registry import StorePool

    class Failing(FileStore):
        fail = False

        def write_at(self, offset, data):
            if self.fail:
                raise OSError(5, "injected")
            super().write_at(offset, data)
    stores = {}

    def opener(path, ro):
        stores[os.path.basename(path)] = s = Failing(path, ro)
        return s
    r = Rig(tmp_path, stores=StorePool(opener=opener))
    assert r.write(8, b"a" * 4096) == 0 and r.flush() == 0
    r.settle()
    stores["log.img"].fail = True
    assert r.write(16, b"b" * 4096) == 0 and r.flush() == 0
    r.settle()
    assert r.status().endswith(" logging_disabled")
    assert r.write(24, b"c" * 4096) == 0 and r.flush() == 0
    r.close()
    assert kinds(read_log(r.log)[1]) == ["W8", "FLUSH"]              # its last durable point


# ------------------------------------------------------ replay-log's rules
def test_an_empty_log_fails_in_every_mode(tmp_path, capsys):
    r = Rig(tmp_path)
    r.control.shutdown()
    with open(r.log, "r+b") as f:                  # a log with no entry at all
        f.write(struct.pack("<QQQI", 0x6A736677736872, 1, 0, 512))
    for extra in (["--find"], ["--replay", r.data], ["--find", "--next-fua"]):
        rc, _o, err = lw(capsys, "replay", "--log", r.log, *extra)
        assert rc == 1 and "Invalid entry number 0" in err


def test_a_missing_end_mark_replays_everything_but_find_fails(logged, tmp_path, capsys):
    out = blank_like(tmp_path / "r.img", logged.data)
    assert lw(capsys, "replay", "--log", logged.log, "--replay", out, "--end-mark",
              "nope")[0] == 0
    assert open(out, "rb").read() == open(logged.data, "rb").read()
    rc, _o, err = lw(capsys, "replay", "--log", logged.log, "--find", "--end-mark", "nope")
    assert rc == 1 and "Couldn't find entry" in err


def test_with_an_end_mark_only_that_mark_stops(logged, capsys):
    es = read_log(logged.log)[1]
    m2 = next(e for e in es if e["mark"] == "m2")
    assert any(e["flags"] & 2 for e in es[:m2["index"]])          # FUAs before it
    rc, out, _ = lw(capsys, "replay", "--log", logged.log, "--find", "--next-fua",
                    "--end-mark", "m2")
    assert rc == 0 and out.strip() == f"{m2['index']}@{m2['pos'] + 1}"


def test_limit_counts_from_the_start_entry_and_find_prints_the_position_after(logged,
                                                                             capsys):
    es = read_log(logged.log)[1]
    rc, out, _ = lw(capsys, "replay", "--log", logged.log, "--find", "--start-entry", 5,
                    "--limit", 2)
    e = es[6]
    after = e["pos"] + 1 + (0 if e["flags"] & 4 else e["nr"])
    assert rc == 0 and out.strip() == f"6@{after}"


def test_skipped_entries_are_not_replayed(logged, tmp_path, capsys):
    es = read_log(logged.log)[1]
    m1 = next(e for e in es if e["mark"] == "m1")
    out = blank_like(tmp_path / "r.img", logged.data)
    assert lw(capsys, "replay", "--log", logged.log, "--replay", out, "--start-mark", "m1",
              "--limit", 3)[0] == 0
    want = apply(es[m1["index"] + 1:m1["index"] + 4], 512, bytearray(len(logged.initial)))
    assert open(out, "rb").read() == bytes(want)
    rc, _o, err = lw(capsys, "replay", "--log", logged.log, "--replay", out,
                     "--start-mark", "nope")
    assert rc == 1 and "Couldn't find starting mark" in err


def test_discards_read_back_as_zeros_and_ignore_the_sector_filter(tmp_path, capsys):
    r = Rig(tmp_path)
    assert r.write(64, b"q" * 8192) == 0
    assert r.discard(64, 16) == 0
    assert r.flush() == 0
    r.close()
    out = tmp_path / "dirty.img"
    with open(out, "wb") as f:
        f.write(b"\xee" * os.path.getsize(r.data))
    # the sector filter leaves the write out, not the discard
    assert lw(capsys, "replay", "--log", r.log, "--replay", out, "--start-sector",
              1000)[0] == 0
    img = open(out, "rb").read()
    assert img[64 * SECTOR:80 * SECTOR] == bytes(16 * SECTOR)
    assert img[:64 * SECTOR] == b"\xee" * (64 * SECTOR)
    # twice from 0 over a dirtied target: the same image both times
    shutil.copyfile(out, tmp_path / "again.img")
    for target in (out, tmp_path / "again.img"):
        assert lw(capsys, "replay", "--log", r.log, "--replay", target)[0] == 0
    assert open(out, "rb").read() == open(tmp_path / "again.img", "rb").read()


def test_the_fsck_gate_runs_at_each_check_point(logged, tmp_path, capsys):
    out = blank_like(tmp_path / "r.img", logged.data)
    seen = tmp_path / "seen"
    rc, _o, _e = lw(capsys, "replay", "--log", logged.log, "--replay", out, "--check",
                    "fua", "--fsck", f"echo x >> {seen}")
    fuas = sum(1 for e in read_log(logged.log)[1] if e["flags"] & 2)
    assert rc == 0 and open(seen).read().count("x") == fuas > 0
    rc, _o, err = lw(capsys, "replay", "--log", logged.log, "--replay", out, "--check", 3,
                     "--fsck", "false")
    assert rc == 1 and "Fsck errored out on entry" in err


# -------------------------------------------------------- the CLI contract
@pytest.mark.parametrize("argv,words", [
    (["replay"], "required: --log"),
    (["replay", "--log", "LOG", "--bogus"], "unrecognized arguments"),
    (["replay", "--log", "missing.img"], "cannot open"),
    (["replay", "--log", "DATA"], "Magic doesn't match"),
    (["replay", "--log", "LOG", "--check", "sometimes", "--fsck", "true"], "--check takes"),
    (["replay", "--log", "LOG", "--fsck", "true"], "--fsck and --check go together"),
    (["dump", "missing.img"], "cannot open"),
    (["dump", "TINY"], "too small for a log"),
])
def test_bad_input_is_one_line_and_exit_1(logged, tmp_path, capsys, argv, words):
    tiny = tmp_path / "tiny.img"
    tiny.write_bytes(b"x" * 100)
    subst = {"LOG": logged.log, "DATA": logged.data, "TINY": tiny,
             "missing.img": tmp_path / "missing.img"}
    argv = [subst.get(a, a) for a in argv]
    try:
        rc, _o, err = lw(capsys, *argv)
    except SystemExit as e:                        # argparse
        rc, err = e.code, capsys.readouterr().err
    assert rc == 1 and words in err, err
    assert "Traceback" not in err


def test_help_explains(capsys):
    with pytest.raises(SystemExit) as e:
        pydm_main(["lw", "replay", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--end-mark" in out and "--start-entry" in out
