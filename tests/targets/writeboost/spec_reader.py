"""An independent reader of a dm-writeboost cache image, written from the
format's description (spec §3) alone, to check what pydm writes.

Rules of this module: it never imports pydm (least of all
``pydm.targets.writeboost.layout``): only ``struct`` and ``google_crc32c``,
and the numbers of the spec, so a mistake shared with the target's own
layout code cannot hide here.  It reads a whole image into memory (tests
use small ones) and answers questions about it; it never writes.

The format, in the spec's words: 1 MiB of superblock (sector 0: u32 magic
0x57427374; sector 2047: u64 last written-back segment id), then segment
slots of 512 KiB, as many as fit.  A slot's first 512 bytes are ``u64 id,
u32 checksum, u8 length`` and zeroes; 16-byte metablocks from byte 512
(``u64 backing sector, u8 dirty bits``, seven zero bytes), ``length`` of them
used and the rest of the 4 KiB block zero; then 127 data blocks of 4 KiB.
The checksum is CRC-32C over bytes [512, 4096 * (length + 1)) of the slot;
segment id n lives in slot (n - 1) mod nr_segments.
"""

import struct

import google_crc32c

SECTOR = 512
BLOCK = 4096
SUPERBLOCK = 1 << 20
SLOT = 512 << 10
DATA_BLOCKS = 127
MAGIC = 0x57427374


class Segment:
    """What one slot holds: its header, metablocks and checksum verdict."""

    def __init__(self, image: bytes, slot: int):
        base = SUPERBLOCK + slot * SLOT
        self.slot = slot
        self.base = base
        self.id, self.checksum, self.length = struct.unpack_from("<QIB", image, base)
        self.header_pad = image[base + 13:base + 512]
        self.entries = []                 # (backing sector, dirty bits, pad bytes)
        for i in range(min(self.length, DATA_BLOCKS)):
            at = base + 512 + 16 * i
            sector, bits = struct.unpack_from("<QB", image, at)
            self.entries.append((sector, bits, image[at + 9:at + 16]))
        used = 512 + 16 * min(self.length, DATA_BLOCKS)
        self.unused_tail = image[base + used:base + BLOCK]
        end = BLOCK * (self.length + 1)
        self.crc_ok = (self.length <= DATA_BLOCKS
                       and google_crc32c.value(image[base + 512:base + end]) == self.checksum)

    def data_block(self, image: bytes, i: int) -> bytes:
        at = self.base + BLOCK * (i + 1)
        return image[at:at + BLOCK]


class Image:
    def __init__(self, image: bytes):
        self.image = image
        self.magic = struct.unpack_from("<I", image, 0)[0]
        self.record = struct.unpack_from("<Q", image, SUPERBLOCK - SECTOR)[0]
        self.nr_segments = (len(image) - SUPERBLOCK) // SLOT
        self.segments = [Segment(image, s) for s in range(self.nr_segments)]

    @classmethod
    def open(cls, path):
        with open(path, "rb") as f:
            return cls(f.read())

    def slot_of(self, seg_id: int) -> int:
        return (seg_id - 1) % self.nr_segments

    def valid(self):
        """{id: Segment} of every slot whose checksum matches (id not 0)."""
        return {s.id: s for s in self.segments if s.id and s.crc_ok}

    def problems(self, backing_sectors: int):
        """Every way a slot with a matching checksum breaks the format."""
        out = []
        if self.magic != MAGIC:
            out.append(f"magic {self.magic:#x}")
        for s in self.segments:
            if not (s.id and s.crc_ok):
                continue
            where = f"slot {s.slot} (segment {s.id})"
            if self.slot_of(s.id) != s.slot:
                out.append(f"{where}: belongs in slot {self.slot_of(s.id)}")
            if s.length > DATA_BLOCKS:
                out.append(f"{where}: length {s.length}")
            if any(s.header_pad):
                out.append(f"{where}: header padding not zero")
            if any(s.unused_tail):
                out.append(f"{where}: unused metablocks not zero")
            for i, (sector, _bits, pad) in enumerate(s.entries):
                if sector % 8 or sector + 8 > backing_sectors:
                    out.append(f"{where}: metablock {i} sector {sector}")
                if any(pad):
                    out.append(f"{where}: metablock {i} padding not zero")
        return out

    def log(self):
        """The ids of the current log, oldest first: from the oldest valid
        segment that may still be in it (ids above top - nr_segments), each
        next id valid and in its own slot (spec §7, pydm's rule)."""
        valid = {i: s for i, s in self.valid().items() if self.slot_of(i) == s.slot}
        if not valid:
            return []
        top = max(valid)
        first = min(i for i in valid if i > top - self.nr_segments)
        ids = [first]
        while ids[-1] + 1 in valid:
            ids.append(ids[-1] + 1)
        return ids

    def device_view(self, backing: bytes) -> bytearray:
        """The backing image with every dirty sector of the log laid over it
        in id order: what the device holds once the log is written back."""
        out = bytearray(backing)
        for seg_id in self.log():
            s = self.segments[self.slot_of(seg_id)]
            for i, (sector, bits, _pad) in enumerate(s.entries):
                block = s.data_block(self.image, i)
                for j in range(8):
                    if bits >> j & 1:
                        at = (sector + j) * SECTOR
                        out[at:at + SECTOR] = block[j * SECTOR:(j + 1) * SECTOR]
        return out
