"""An independent reader of dm-log-writes logs, written from the format's
description alone (struct only; nothing of pydm's writer or replayer):
the super block at byte 0 (magic 0x6a736677736872, version 1, nr_entries,
sectorsize), then entries back to back from byte ``sectorsize``: a
one-sector header (sector, nr_sectors, flags, data_len, then a mark's text
at byte 32) and, except for discards, ``nr_sectors`` sectors of payload."""

import struct

MAGIC = 0x6A736677736872
FLUSH, FUA, DISCARD, MARK, METADATA = 1, 2, 4, 8, 16


def read_log(path):
    """(sectorsize, [entry dicts]) of the ``nr_entries`` entries the super
    vouches for; each dict has sector, nr, flags, mark (str or None), data
    (bytes or None) and index/pos."""
    with open(path, "rb") as f:
        raw = f.read()
    magic, version, nr_entries, ss = struct.unpack_from("<QQQI", raw, 0)
    assert magic == MAGIC and version == 1, (hex(magic), version)
    assert ss in (512, 1024, 2048, 4096)
    assert raw[32:ss] == bytes(ss - 32), "the super block's tail is not zero"
    out, pos = [], 1
    for i in range(nr_entries):
        head = raw[pos * ss:(pos + 1) * ss]
        sector, nr, flags, data_len = struct.unpack_from("<QQQQ", head, 0)
        assert not (flags == 0 and nr == 0), f"entry {i}: all-zero header"
        mark = None
        if flags == MARK:
            mark = head[32:32 + data_len].decode()
            assert head[32 + data_len:] == bytes(ss - 32 - data_len)
            assert nr == 0 and sector == 0
        else:
            assert head[32:] == bytes(ss - 32), f"entry {i}: unpadded header"
        payload = 0 if flags & DISCARD else nr
        data = raw[(pos + 1) * ss:(pos + 1 + payload) * ss] if payload else None
        if payload:
            assert len(data) == payload * ss, f"entry {i}: payload past the end"
        out.append({"index": i, "pos": pos, "sector": sector, "nr": nr, "flags": flags,
                    "mark": mark, "data": data})
        pos += 1 + payload
    return ss, out


def apply(entries, ss, image: bytearray, upto=None):
    """Replay ``entries`` (up to index ``upto`` inclusive) onto ``image``."""
    for e in entries:
        if upto is not None and e["index"] > upto:
            break
        at = e["sector"] * ss
        if e["flags"] & DISCARD:
            image[at:at + e["nr"] * ss] = bytes(e["nr"] * ss)
        elif e["data"] is not None:
            image[at:at + len(e["data"])] = e["data"]
    return image
