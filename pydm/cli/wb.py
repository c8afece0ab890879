"""``pydm wb ...``: writeboost caches, live and offline.

Live, on writeboost devices of a running daemon (``pydm.cli.wb_live``):
``status`` (the status line explained, field by field) and ``drop-caches``
(write every dirty block back, with a progress bar).  Offline, on cache
image files, with no daemon (here):
``check``, ``dump`` and ``drain`` (the cache's dirty blocks written home to a
backing image, what drop_caches does online).

Rules of this module:

* It reads the format only through ``pydm.targets.writeboost.layout`` and
  decides what a log holds only through ``replay`` (``scan``'s per-segment
  verdict, ``log_run``, ``replay``), so the tools see a cache exactly as the
  target's next start would.
* Files are opened with ``FileStore``, read-only unless written.  ``check``
  and ``dump`` write nothing; ``drain`` writes the backing image, and of the
  cache only the superblock record, last, after the backing is fdatasync'ed.
* Every user error (bad arguments, a missing or foreign file, a damaged
  cache, a daemon refusal) is one line on stderr and exit status 1.

What ``check`` calls damaged (exit 1; the first bad segment is named):

* a first sector that is blank ("not formatted") or holds another magic;
* a segment whose checksum matches but which breaks a rule: its id is not in
  its own slot, its length is over 127, or a metablock sector is not a
  4 KiB block of the backing device (only alignment is checked without
  ``--backing-size``), or bytes the format keeps zero are not; a header in
  the wrong slot or with a length over 127 is damage even with a bad
  checksum (a torn write keeps its 512-byte header whole);
* an unsound segment followed by sound later segments, which replay would
  therefore drop: data lost in the middle of the log.

Not damaged (notes, exit 0): an unsound segment at the tail of the log (a
torn last write, what a crash or kill -9 leaves), stale segments of older
laps, and a record above the log's end (replay clamps it).
"""

import argparse
import sys

from pydm.cli.common import Progress, add_client_options, fail, print_json
from pydm.cli.wb_live import cmd_drop_caches, cmd_status
from pydm.errors import strerror

NO_LIMIT = 1 << 62          # backing sectors when the size is not known
SHOWN = 20                  # damage lines check prints at most

DAMAGED_HELP = (
    "Damaged (exit 1, the first bad segment is named): a blank first sector (not "
    "formatted) or a wrong magic; a segment whose checksum matches but which breaks a "
    "rule (id not in its own slot, length over 127, a metablock sector that is not a "
    "4 KiB block of the backing device - only its alignment without --backing-size - "
    "or non-zero bytes the format keeps zero; a header in the wrong slot or with a "
    "length over 127 is damage whatever its checksum); an unsound segment followed by "
    "sound later segments, which replay would drop (data lost in the middle of the "
    "log). Not damaged (notes, "
    "exit 0): an unsound segment at the tail of the log (a torn last write: what a "
    "crash or kill -9 leaves), stale segments of older laps, a record above the log's "
    "end (replay clamps it).")


# ---------------------------------------------------------- offline
def _layout():
    from pydm.targets.writeboost import layout
    return layout


def open_cache(path):
    """(read-only FileStore, Geometry) of a writeboost cache image; one line
    and exit 1 for anything that is not one."""
    from pydm.store import FileStore
    L = _layout()
    store = FileStore(path, readonly=True)
    if store.size < L.MIN_CACHE_BYTES:
        fail(f"{path}: too small for a writeboost cache ({store.size} bytes; a cache has "
             f"at least {L.MIN_CACHE_BYTES}: 1 MiB of superblock and one 512 KiB segment)")
    sector0 = store.read_at(0, L.SECTOR)
    if L.is_blank(sector0):
        fail(f"{path}: not formatted (its first sector is zeroes; a writeboost target "
             f"formats it at its first start)")
    magic = L.superblock_magic(sector0)
    if magic != L.MAGIC:
        fail(f"{path}: not a writeboost cache (magic {magic:#010x}, expected {L.MAGIC:#x})")
    return store, L.Geometry(store.size)


class SlotView:
    """One slot holding a segment (its id is not 0), as check and dump see it."""

    __slots__ = ("slot", "hdr", "crc_ok", "why", "rule")

    def __init__(self, slot, hdr, crc_ok, why, rule):
        self.slot = slot
        self.hdr = hdr
        self.crc_ok = crc_ok      # the checksum matches
        self.why = why            # why replay would not apply it (None: sound)
        self.rule = rule          # a rule it breaks that a torn write cannot explain


def _zero_rules(L, block0, length):
    if any(block0[L.HEADER.size:L.HEADER_BYTES]):
        return "header bytes 13..511 are not zero"
    n = min(length, L.BLOCKS_PER_SEGMENT)
    for i in range(n):
        at = L.HEADER_BYTES + L.METABLOCK.size * i
        if any(block0[at + 9:at + L.METABLOCK.size]):
            return f"metablock {i}: bytes 9..15 are not zero"
    if any(block0[L.HEADER_BYTES + L.METABLOCK.size * n:L.BLOCK]):
        return f"block 0 past metablock {n - 1} (unused metablocks) is not zero"
    return None


def view_slot(store, geo, slot, backing_sectors):
    """The SlotView of ``slot``, or None when its header id is 0."""
    L = _layout()
    off = geo.slot_offset(slot)
    block0 = store.read_at(off, L.BLOCK)
    hdr = L.parse_header(block0)
    if hdr.id == 0:
        return None
    fits = (geo.cache_bytes - off) // L.BLOCK - 1 >= hdr.length
    data = store.read_at(off + L.BLOCK, hdr.length * L.BLOCK) if fits else b""
    crc_ok = fits and L.checksum(block0, data) == hdr.checksum
    why = L.segment_problem(hdr, block0, data, geo, slot, backing_sectors)
    rule = None
    if crc_ok:
        rule = why or _zero_rules(L, block0, hdr.length)
    else:
        why = "checksum mismatch" if fits else f"length {hdr.length} runs past the cache"
        if geo.slot_of(hdr.id) != slot:
            rule = f"id {hdr.id} belongs in slot {geo.slot_of(hdr.id)}"
        elif hdr.length > L.BLOCKS_PER_SEGMENT:
            rule = f"length {hdr.length} is over {L.BLOCKS_PER_SEGMENT}"
        if rule:
            rule += " (and its checksum does not match either)"
    return SlotView(slot, hdr, crc_ok, why, rule)


def _count(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"


def _span(ids):
    return f"{ids[0]}" if len(ids) == 1 else f"{ids[0]}..{ids[-1]}"


class Examination:
    """Everything ``check`` says about a cache image."""

    def __init__(self, path, backing_bytes=None):
        from pydm.targets.writeboost.replay import log_run, replay
        L = _layout()
        self.path = path
        self.store, self.geo = store, geo = open_cache(path)
        self.backing_sectors = NO_LIMIT if backing_bytes is None else backing_bytes // L.SECTOR
        views = (view_slot(store, geo, s, self.backing_sectors)
                 for s in range(geo.nr_segments))
        self.slots = {v.slot: v for v in views if v is not None}
        self.sound = {v.hdr.id: v for v in self.slots.values() if v.why is None}
        self.start, self.end = log_run(self.sound, geo.nr_segments)
        self.found = replay(store.read_at, geo, self.backing_sectors)
        self.record = self.found.record
        self.damage, self.notes = [], []     # damage: [(id, text)]
        self._judge(L)

    def _judge(self, L):
        end = self.end
        for v in self.slots.values():
            if v.rule:
                self.damage.append((v.hdr.id, f"segment {v.hdr.id} (slot {v.slot}): {v.rule}"))
        dropped = sorted(i for i in self.sound if i > end)
        if dropped:
            self.damage.append((end + 1, self._gap(end + 1, dropped)))
        for v in sorted(self.slots.values(), key=lambda v: v.hdr.id):
            if v.why is None or v.rule or (dropped and v.hdr.id == end + 1):
                continue            # sound, or already told as damage
            if v.hdr.id > end and not dropped:
                self.notes.append(f"segment {v.hdr.id} (slot {v.slot}) is a torn write at the "
                                  f"tail of the log ({v.why}): replay ends the log at {end}")
            else:
                self.notes.append(f"slot {v.slot} holds an unsound segment {v.hdr.id} "
                                  f"({v.why}), outside the log: replay ignores it")
        stale = sorted(i for i in self.sound if i < self.start)
        if stale:
            self.notes.append(f"{_count(len(stale), 'stale segment')} of older laps "
                              f"({_span(stale)}): not part of the log")
        if self.record > end:
            self.notes.append(f"the record (last written-back segment {self.record}) is above "
                              f"the log's end {end}: replay clamps it to "
                              f"{self.found.index.last_writeback}")
        head = self.store.read_at(0, L.BLOCK)
        rec = self.store.read_at(L.RECORD_SECTOR * L.SECTOR, L.SECTOR)
        if any(head[4:]) or any(rec[8:]):
            self.notes.append("bytes of the superblock the format keeps zero are not zero")
        self.damage.sort()

    def _gap(self, missing, dropped):
        s = self.geo.slot_of(missing)
        v = self.slots.get(s)
        if v is None:
            what = "never written (its slot's header is blank)"
        elif v.hdr.id == missing:
            what = v.why
        else:
            what = f"not on the cache: its slot holds segment {v.hdr.id} " + \
                   ("of an older lap" if v.why is None else f"({v.why})")
        return (f"segment {missing} (slot {s}): {what}: replay ends the log at "
                f"{missing - 1} and drops {_count(len(dropped), 'later sound segment')} "
                f"{_span(dropped)} (data lost in the middle of the log)")

    def summary(self) -> str:
        ix = self.found.index
        log = (f"{_count(self.end - self.start + 1, 'segment')} in the log "
               f"({self.start}..{self.end})"
               if self.start else "the log is empty")
        notes = f"; {_count(len(self.notes), 'note')}" if self.notes else ""
        merges = f", {_count(len(self.found.merges), 'older sector')} replay writes home" \
            if self.found.merges else ""
        verdict = "damaged" if self.damage else "clean"
        return f"{verdict}: {log}, {ix.nr_dirty} dirty blocks{merges}{notes}"


def cmd_check(args):
    ex = Examination(args.cache, args.backing_size)
    geo = ex.geo
    print(f"{args.cache}: writeboost cache of {geo.cache_bytes} bytes: {geo.nr_segments} "
          f"segment slots, {geo.nr_caches} cache blocks, {geo.unused_bytes()} bytes unused "
          f"at the end")
    print(f"record: last written-back segment {ex.record}; replay: last written back "
          f"{ex.found.index.last_writeback}, last flushed {ex.found.index.last_flushed}")
    for _id, text in ex.damage[:SHOWN]:
        print(f"damage: {text}")
    if len(ex.damage) > SHOWN:
        print(f"damage: ... and {len(ex.damage) - SHOWN} more")
    for text in ex.notes:
        print(f"note: {text}")
    print(ex.summary())
    sys.stdout.flush()
    if ex.damage:
        more = f" (and {len(ex.damage) - 1} more)" if len(ex.damage) > 1 else ""
        fail(f"{args.cache}: damaged: {ex.damage[0][1]}{more}")
    return 0


# ------------------------------------------------------------- dump
def _dump_one(v):
    return {"id": v.hdr.id, "slot": v.slot, "length": v.hdr.length,
            "checksum": v.hdr.checksum, "checksum_ok": v.crc_ok,
            "problem": v.rule or v.why,
            "metablocks": [{"sector": s, "dirty_bits": b}
                           for s, b in zip(v.hdr.sectors, v.hdr.dirty_bits)]}


def cmd_dump(args):
    L = _layout()
    store, geo = open_cache(args.cache)
    record = L.parse_record(store.read_at(L.RECORD_SECTOR * L.SECTOR, L.SECTOR))
    if args.segment is not None:
        slot = geo.slot_of(args.segment)
        v = view_slot(store, geo, slot, NO_LIMIT)
        if v is None or v.hdr.id != args.segment:
            held = "is blank" if v is None else f"holds segment {v.hdr.id}"
            fail(f"{args.cache}: segment {args.segment} is not in the cache "
                 f"(its slot {slot} {held})")
        views = [v]
    else:
        views = [v for v in (view_slot(store, geo, s, NO_LIMIT)
                             for s in range(geo.nr_segments)) if v is not None]
    segs = [_dump_one(v) for v in views]
    if args.json:
        print_json({"magic": L.MAGIC, "record": record, "cache_bytes": geo.cache_bytes,
                    "nr_segments": geo.nr_segments, "nr_caches": geo.nr_caches,
                    "segments": segs})
        return 0
    out = [f"superblock: magic {L.MAGIC:#x} (writeboost), record: last written-back "
           f"segment {record}",
           f"geometry: {geo.cache_bytes} bytes, {geo.nr_segments} segment slots, "
           f"{geo.nr_caches} cache blocks, {geo.unused_bytes()} bytes unused"]
    for s in segs:
        ok = "ok" if s["checksum_ok"] else "bad"
        problem = f" ({s['problem']})" if s["problem"] else ""
        out.append(f"segment {s['id']}: slot {s['slot']}, length {s['length']}, "
                   f"checksum {s['checksum']:#010x} {ok}{problem}")
        out += [f"  block {i}: sector {m['sector']} dirty {m['dirty_bits']:#04x}"
                for i, m in enumerate(s["metablocks"])]
    print("\n".join(out))
    return 0


# ------------------------------------------------------------ drain
def _runs(bits):
    """[(first sector, count)] of the runs of set bits of a dirty mask."""
    out, j = [], 0
    while j < 8:
        if bits >> j & 1:
            k = j
            while k < 8 and bits >> k & 1:
                k += 1
            out.append((j, k - j))
            j = k
        else:
            j += 1
    return out


def _write(store, path, offset, data):
    try:
        store.write_at(offset, data)
    except OSError as e:
        fail(f"cannot write {path} at byte {offset}: {strerror(e.errno)}")


def _sync(store, path):
    try:
        store.flush()
    except OSError as e:
        fail(f"cannot fdatasync {path}: {strerror(e.errno)}")


def cmd_drain(args):
    import numpy as np
    from pydm.cli.common import open_file
    L = _layout()
    ex = Examination(args.cache)
    if ex.damage and not args.force:
        fail(f"{args.cache}: damaged: {ex.damage[0][1]} (see pydm wb check; --force drains "
             f"what replay keeps)")
    ix, merges, geo = ex.found.index, ex.found.merges, ex.geo
    dirty = np.flatnonzero(np.asarray(ix.dirty))
    sectors = np.asarray(ix.sector)[dirty]
    order = np.argsort(sectors, kind="stable")
    dirty, sectors = dirty[order].tolist(), sectors[order].tolist()
    backing = open_file(args.backing, readonly=False)   # (held: see open_file)
    top = max([s + L.BLOCK_SECTORS for s in sectors] + [s + 1 for s, _d in merges] + [0])
    if top * L.SECTOR > backing.size:
        fail(f"{args.backing}: {backing.size} bytes is smaller than the cache's highest "
             f"dirty block, which ends at byte {top * L.SECTOR}: is it the right backing?")
    if not dirty and not merges:
        print(f"{args.cache}: nothing to drain: no dirty blocks")
        return 0
    cache = open_file(args.cache, readonly=False)     # only for the record, at the end
    bar = Progress("draining", len(dirty) + len(merges))
    for n, (sector, data) in enumerate(merges):
        _write(backing, args.backing, sector * L.SECTOR, data)
        bar.update(n + 1)
    partial = 0
    for n, (idx, sector) in enumerate(zip(dirty, sectors)):
        block = ex.store.read_at(geo.block_offset(idx), L.BLOCK)
        bits = int(ix.bits[idx])
        if bits == L.FULL:
            _write(backing, args.backing, sector * L.SECTOR, block)
        else:
            partial += 1
            for j, k in _runs(bits):
                _write(backing, args.backing, (sector + j) * L.SECTOR,
                       block[j * L.SECTOR:(j + k) * L.SECTOR])
        bar.update(len(merges) + n + 1)
    _sync(backing, args.backing)
    bar.finish()
    _write(cache, args.cache, L.RECORD_BLOCK_OFFSET, L.record_block(ix.last_flushed))
    _sync(cache, args.cache)
    print(f"drained {len(dirty)} dirty blocks ({partial} partial) of segments "
          f"{ex.start}..{ex.end}{f' and {len(merges)} older sectors' if merges else ''} "
          f"into {args.backing}; the record now says segment {ix.last_flushed} is written "
          f"back, so the cache starts clean")
    return 0


# --------------------------------------------------------- commands
def _positive(what):
    def parse(text):
        if not text.isascii() or not text.isdigit() or int(text) <= 0:
            raise argparse.ArgumentTypeError(f"{what} must be a positive integer, not {text!r}")
        return int(text)
    return parse


def _add(cmds, name, func, help_, description, *options, live=False):
    p = cmds.add_parser(name, help=help_, description=description or help_)
    if live:
        add_client_options(p)
        p.add_argument("device", metavar="DEV", help="a writeboost device of the running daemon")
    else:
        p.add_argument("cache", metavar="CACHE", help="cache image file")
    for flags, kw in options:
        p.add_argument(*flags, **kw)
    p.set_defaults(func=func)


def register(sub):
    wb = sub.add_parser(
        "wb", help="writeboost write-back caches: live commands and offline tools",
        description="Live commands for writeboost devices of a running daemon, and "
                    "offline tools for writeboost cache image files (the Linux "
                    "dm-writeboost on-disk layout).")
    cmds = wb.add_subparsers(dest="wb_cmd", metavar="COMMAND", required=True)
    _add(cmds, "status", cmd_status, "the status line of a writeboost device, explained: one "
         "labelled line per field (--json: an object)", None, live=True)
    _add(cmds, "drop-caches", cmd_drop_caches, "write every dirty block back to the backing "
         "device (the drop_caches message), with a progress bar on a terminal", None, live=True)
    _add(cmds, "check", cmd_check, "check a cache image: format and replay",
         "Check a cache image file against every rule of the format and of replay, and say "
         "what replay would do. Exit 0 if clean, 1 if damaged. " + DAMAGED_HELP,
         (("--backing-size",), dict(type=_positive("BYTES"), metavar="BYTES", help=(
             "size of the backing device: metablock sectors must lie inside it"))))
    _add(cmds, "dump", cmd_dump, "print the superblock and every segment's metadata",
         "Print a cache image's superblock (magic, record) and, per slot holding a segment, "
         "its id, slot, length, checksum (ok/bad) and metablocks (backing sector, dirty bits).",
         (("--segment",), dict(type=_positive("ID"), metavar="ID", help="only segment ID")),
         (("--json",), dict(action="store_true", help="print machine-readable JSON")))
    _add(cmds, "drain", cmd_drain, "write a cache image's dirty blocks into a backing image",
         "Replay a cache image and write every dirty block home to the backing image (sorted "
         "by sector), fdatasync it, then set the cache's superblock record so it starts "
         "clean; nothing else of the cache is written. Refused when the backing is too "
         "small, the cache is not a writeboost cache, or it is damaged (see check) unless "
         "--force. Only for a cache no daemon is using.",
         (("backing",), dict(metavar="BACKING", help="backing image file (written)")),
         (("--force",), dict(action="store_true",
                             help="drain a damaged cache too (what replay keeps of it)")))
    return wb
