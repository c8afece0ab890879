"""Bringing a cache device up: the checks at construction, and the format or
replay at the first resume.

Rules of this module:

* ``inspect`` reads the cache's first sector only and decides: a blank
  (all-zero) first sector means "format", the writeboost magic means
  "replay", anything else is refused with one line (it is not a writeboost
  cache, and formatting it could destroy a filesystem given by mistake).
* ``format_cache`` writes the layout's format sequence: superblock region
  and every slot's header block zeroed, a FLUSH, then the magic with FUA.
* ``bring_up`` replays (writing nothing to the cache), then writes the
  replay's merges home to the backing device and flushes it, before the
  target serves a single bio.  Sound segments replay left past the log's
  end (after a gap: never covered by an acknowledged flush) get their
  header block zeroed and the cache is flushed, so that when the log grows
  back to their ids no later replay takes them for part of it.  In
  write-around mode the cache is formatted
  at every start; a log that still holds dirty blocks is refused then,
  since formatting would lose them.
* The memory estimate is checked against the machine's available memory.
"""

import errno

from pydm.errors import TargetError
from pydm.targets.writeboost import layout as L
from pydm.targets.writeboost.cache import estimate_memory
from pydm.targets.writeboost.replay import replay

FORMAT, REPLAY = "format", "replay"


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 1 << 62


def inspect(cache_io, geo: L.Geometry) -> str:
    """FORMAT or REPLAY for this cache device, or TargetError."""
    sector0 = cache_io.read(0, L.SECTOR)
    if L.is_blank(sector0):
        action = FORMAT
    elif L.superblock_magic(sector0) == L.MAGIC:
        action = REPLAY
    else:
        raise TargetError(f"{cache_io.dev.ref} is not a writeboost cache (its first sector is "
                          f"neither zeroes nor the magic {L.MAGIC:#x}); zero its first "
                          f"sector to have it formatted", errno.EINVAL)
    need = estimate_memory(geo)
    have = available_memory()
    if need > have:
        raise TargetError(f"a {geo.cache_bytes >> 20} MiB cache needs about {need >> 20} MiB "
                          f"of memory for its index, and only {have >> 20} MiB is "
                          f"available; use a smaller cache", errno.ENOMEM)
    return action


def format_cache(cache_io, geo: L.Geometry) -> None:
    for offset, data, barrier in L.format_writes(geo):
        if barrier:
            cache_io.flush()
        cache_io.write(offset, data, fua=barrier)


def bring_up(cache_io, backing_io, geo, backing_sectors, action, write_around):
    """The replayed log, on a cache that is formatted if it must be."""
    if action == REPLAY and write_around:
        found = replay(cache_io.read, geo, backing_sectors)
        if found.index.nr_dirty:
            raise TargetError(f"write_around_mode formats the cache at every start, and "
                              f"its log still holds {found.index.nr_dirty} dirty blocks: "
                              f"write them back first (pydm wb drain, or drop_caches "
                              f"without write_around_mode)", errno.EBUSY)
    if action == FORMAT or write_around:
        format_cache(cache_io, geo)
    found = replay(cache_io.read, geo, backing_sectors)
    if found.beyond:
        for slot, _seg_id in found.beyond:
            cache_io.write(geo.slot_offset(slot), bytes(L.BLOCK))
        cache_io.flush()
    if found.merges:
        for sector, data in found.merges:
            backing_io.write(sector * L.SECTOR, data)
        backing_io.flush()
    return found
