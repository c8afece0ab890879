"""The dm-log-writes on-disk format: the super block, entry headers, flags.

Rules of this module:

* Pure: bytes in, values out (and back); no I/O, no threads.  Everything
  the target writes and the replay tool reads is packed and unpacked here.
* Layout (all integers little-endian): the super block fills the first
  log sector (``sectorsize`` bytes, the data device's logical block size);
  entries follow back to back from byte ``sectorsize``: a header of one log
  sector, then ``nr_sectors * sectorsize`` bytes of payload for a write (none
  for a discard, a flush or a mark).
* Super: magic, version 1, nr_entries, sectorsize; the 4 bytes after
  sectorsize are padding the kernel leaves uninitialised: written as zeros,
  never read.
* Entry header: sector and nr_sectors in log sectors, flags, data_len (the
  mark text's length); a mark's text follows at byte 32.  A header is
  malformed when it is all zero (flags 0 and nr_sectors 0), or when it is
  not a plain MARK and byte 32 is not zero (replay-log's two checks).
* A mark's text is cut to ``sectorsize - 33`` bytes.
"""

import struct

MAGIC = 0x6A736677736872
VERSION = 1

FLUSH = 1 << 0
FUA = 1 << 1
DISCARD = 1 << 2
MARK = 1 << 3
METADATA = 1 << 4
FLAG_NAMES = ((FLUSH, "FLUSH"), (FUA, "FUA"), (DISCARD, "DISCARD"), (MARK, "MARK"),
              (METADATA, "METADATA"))
KNOWN_FLAGS = FLUSH | FUA | DISCARD | MARK | METADATA

END_MARK = "dm-log-writes-end"

SUPER = struct.Struct("<QQQI4x")          # magic, version, nr_entries, sectorsize, pad
HEADER = struct.Struct("<QQQQ")           # sector, nr_sectors, flags, data_len
TEXT_AT = HEADER.size                     # 32


class FormatError(Exception):
    """The bytes are not what the format allows (the message says why)."""


def mark_limit(sectorsize: int) -> int:
    """The longest mark text a log of this sector size keeps."""
    return sectorsize - TEXT_AT - 1


def pack_super(nr_entries: int, sectorsize: int) -> bytes:
    out = bytearray(sectorsize)
    SUPER.pack_into(out, 0, MAGIC, VERSION, nr_entries, sectorsize)
    return bytes(out)


def unpack_super(block: bytes):
    """(nr_entries, sectorsize) of a super block; FormatError if it is not
    one (replay-log's wording)."""
    if len(block) < SUPER.size:
        raise FormatError("too short for a log super block")
    magic, version, nr_entries, sectorsize = SUPER.unpack_from(block, 0)
    if magic != MAGIC:
        raise FormatError("Magic doesn't match")
    if version != VERSION:
        raise FormatError(f"Version mismatch: {version}")
    if sectorsize < 512 or sectorsize & (sectorsize - 1) or sectorsize > 1 << 16:
        raise FormatError(f"bad sectorsize {sectorsize}")
    return nr_entries, sectorsize


def pack_header(sectorsize: int, sector: int, nr_sectors: int, flags: int,
                text: bytes = b"") -> bytearray:
    """One header sector (a mark's ``text`` already cut to ``mark_limit``)."""
    out = bytearray(sectorsize)
    HEADER.pack_into(out, 0, sector, nr_sectors, flags, len(text))
    out[TEXT_AT:TEXT_AT + len(text)] = text
    return out


_PADS = {}              # sectorsize -> the zeros after a header without text


def pack_entry_into(out, sectorsize: int, sector: int, nr_sectors: int, flags: int,
                    payload) -> None:
    """A header without text and its payload, into ``out`` (a writable
    buffer of exactly ``sectorsize + len(payload)`` bytes): what a small
    write's record is."""
    pad = _PADS.get(sectorsize)
    if pad is None:
        pad = _PADS[sectorsize] = bytes(sectorsize - TEXT_AT)
    HEADER.pack_into(out, 0, sector, nr_sectors, flags, 0)
    out[TEXT_AT:sectorsize] = pad
    out[sectorsize:] = payload


class Entry:
    """One entry as read from a log: where it is, what it says."""

    __slots__ = ("index", "pos", "sector", "nr_sectors", "flags", "text")

    def __init__(self, index, pos, sector, nr_sectors, flags, text):
        self.index = index           # 0-based entry number
        self.pos = pos               # log sector of its header
        self.sector = sector
        self.nr_sectors = nr_sectors
        self.flags = flags
        self.text = text             # a mark's text (bytes), else b""

    def payload_sectors(self) -> int:
        return 0 if self.flags & DISCARD else self.nr_sectors

    def next_pos(self) -> int:
        """The log sector just after this entry (header and payload)."""
        return self.pos + 1 + self.payload_sectors()

    def __repr__(self):
        return (f"<entry {self.index}@{self.pos} sector {self.sector} "
                f"+{self.nr_sectors} {flag_names(self.flags)}>")


def unpack_header(block: bytes, index: int, pos: int) -> Entry:
    """The entry whose header is ``block``; FormatError("Malformed entry")
    when replay-log would refuse it."""
    sector, nr_sectors, flags, data_len = HEADER.unpack_from(block, 0)
    if flags == 0 and nr_sectors == 0:
        raise FormatError(f"Malformed entry {index}@{pos}: an all-zero header")
    if flags != MARK and block[TEXT_AT] != 0:
        raise FormatError(f"Malformed entry {index}@{pos}: unpadded header")
    text = b""
    if flags & MARK:
        if data_len > len(block) - TEXT_AT:
            raise FormatError(f"Malformed entry {index}@{pos}: mark of {data_len} bytes")
        text = bytes(block[TEXT_AT:TEXT_AT + data_len])
    return Entry(index, pos, sector, nr_sectors, flags, text)


def flag_names(flags: int) -> str:
    """``FLUSH|FUA``, ``NONE``, with ``UNKNOWN.0x..`` for stray bits (as
    replay-log prints them)."""
    names = [n for bit, n in FLAG_NAMES if flags & bit]
    if flags & ~KNOWN_FLAGS:
        names.append(f"UNKNOWN.{flags & ~KNOWN_FLAGS:#x}")
    return "|".join(names) or "NONE"
