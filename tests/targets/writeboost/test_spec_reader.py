"""What pydm's writeboost writes, read back by an independent reader of the
format (``spec_reader``, from spec §3 alone): the spec's checksum vectors,
then a long random workload (thousands of writes of random sizes and
offsets, FUA, flushes, drop_caches, re-creations; the log wraps many times)
after whose every flush the cache image is well formed, its log is a run of
consecutive ids ending at the last flushed segment, backing plus log hold
exactly what was written, and ``pydm wb check`` calls it clean."""

import random
import struct
import subprocess
import sys

import google_crc32c

from helpers import do_io
from pydm.bio import FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE
from pydm.cli.wb import Examination
from pydm.control import Control
from spec_reader import BLOCK, MAGIC, SECTOR, SLOT, SUPERBLOCK, Image

SECTORS = 8192                        # a 4 MiB device
NR_SEGMENTS = 5
CACHE = SUPERBLOCK + NR_SEGMENTS * SLOT


# ------------------------------------------------------------ vectors
def slot_image(seg_id, entries):
    """A slot built by hand from the spec: entries are (sector, bits, data)."""
    block0 = bytearray(BLOCK)
    for i, (sector, bits, _data) in enumerate(entries):
        struct.pack_into("<QB", block0, 512 + 16 * i, sector, bits)
    data = b"".join(d for _s, _b, d in entries)
    crc = google_crc32c.value(bytes(block0[512:]) + data)
    struct.pack_into("<QIB", block0, 0, seg_id, crc, len(entries))
    return bytes(block0) + data + bytes(SLOT - BLOCK - len(data)), crc


def test_the_spec_checksum_vectors():
    assert google_crc32c.value(bytes(3584)) == 0x0890BE15
    one, crc1 = slot_image(1, [(8, 0xFF, b"A" * BLOCK), (16, 0x0F, b"B" * BLOCK)])
    two, crc2 = slot_image(2, [(8, 0xFF, b"C" * BLOCK)])
    assert (crc1, crc2) == (0xAB111A82, 0x78E4BB10)
    sb = struct.pack("<I", MAGIC) + bytes(SUPERBLOCK - 4)
    img = Image(sb + one + two)
    assert img.magic == MAGIC and img.record == 0 and img.nr_segments == 2
    assert [(s.id, s.length, s.crc_ok) for s in img.segments] == [(1, 2, True), (2, 1, True)]
    assert img.log() == [1, 2] and img.problems(64) == []
    view = img.device_view(bytes(64 * SECTOR))
    assert view[8 * SECTOR:16 * SECTOR] == b"C" * BLOCK             # segment 2 wins
    assert view[16 * SECTOR:20 * SECTOR] == b"B" * (4 * SECTOR)      # bits 0x0F only
    assert not any(view[20 * SECTOR:])
    torn = bytearray(one)
    torn[BLOCK + 7] ^= 1
    img = Image(sb + bytes(torn) + two)
    assert [s.crc_ok for s in img.segments] == [False, True] and img.log() == [2]


# ----------------------------------------------------------- workload
class Workload:
    def __init__(self, tmp, seed):
        self.rnd = random.Random(seed)
        self.backing = str(tmp / "backing.img")
        self.cache = str(tmp / "cache.img")
        initial = self.rnd.randbytes(SECTORS * SECTOR)
        with open(self.backing, "wb") as f:
            f.write(initial)
        with open(self.cache, "wb") as f:
            f.truncate(CACHE)
        self.model = bytearray(initial)
        self.checks = 0
        self.highest_id = 0
        self._create()

    def _create(self):
        self.control = Control()
        self.dev = self.control.create(
            "wb", f"0 {SECTORS} writeboost {self.backing} {self.cache}")

    def status(self):
        return [int(w) for w in self.control.status("wb")[0][3].split()[:7]]

    def write(self):
        r = self.rnd
        n = r.choice([1, 1, 2, 3, 7, 8, 8, 9, 15, 16, 24, 64, 200])
        sector = r.randrange(0, SECTORS - n + 1)
        if r.random() < 0.5:
            sector = sector // 8 * 8 if sector // 8 * 8 + n <= SECTORS else sector
        data = r.randbytes(n * SECTOR)
        flags = REQ_FUA if r.random() < 0.04 else 0
        assert do_io(self.dev, WRITE, sector, data=data, flags=flags)[0] == 0
        self.model[sector * SECTOR:(sector + n) * SECTOR] = data

    def read(self):
        n = self.rnd.randint(1, 64)
        sector = self.rnd.randrange(0, SECTORS - n + 1)
        st, buf = do_io(self.dev, READ, sector, n)
        assert st == 0
        assert bytes(buf) == bytes(self.model[sector * SECTOR:(sector + n) * SECTOR])

    def flush(self):
        assert do_io(self.dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
        self.check()

    def check(self):
        """The image after a flush: nothing is in flight to the cache."""
        last_flushed = self.status()[4]
        img = Image.open(self.cache)
        assert img.magic == MAGIC and img.nr_segments == NR_SEGMENTS
        assert img.problems(SECTORS) == []
        log = img.log()
        assert log == list(range(max(1, last_flushed - NR_SEGMENTS + 1), last_flushed + 1))
        assert img.record <= last_flushed
        with open(self.backing, "rb") as f:
            assert img.device_view(f.read()) == self.model
        ex = Examination(self.cache, SECTORS * SECTOR)
        assert ex.damage == [] and ex.notes == [], (ex.damage, ex.notes)
        assert (ex.start, ex.end) == ((log[0], log[-1]) if log else (0, 0))
        self.checks += 1
        self.highest_id = max(self.highest_id, last_flushed)

    def recreate(self):
        self.control.shutdown()          # a clean remove: suspend flushes
        self._create()                   # and the replay finds it all
        self.check()

    def drop_caches(self):
        self.control.message("wb", 0, "drop_caches")
        assert self.status()[6] == 0
        self.check()


def test_a_long_random_workload_keeps_the_image_well_formed(tmp_path):
    w = Workload(tmp_path, seed=20240611)
    for step in range(5000):
        x = w.rnd.random()
        if x < 0.03:
            w.flush()
        elif x < 0.08:
            w.read()
        elif x < 0.082:
            w.drop_caches()
        elif x < 0.084:
            w.recreate()
        else:
            w.write()
    w.flush()
    w.control.shutdown()
    assert w.checks > 50
    assert w.highest_id > 10 * NR_SEGMENTS, "the log should wrap many times"
    r = subprocess.run([sys.executable, "-m", "pydm", "wb", "check", w.cache,
                        "--backing-size", str(SECTORS * SECTOR)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stderr == "", r.stdout + r.stderr
    assert r.stdout.splitlines()[-1].startswith("clean: 5 segments in the log")
