"""Reading a dm-log-writes log and replaying it, with replay-log's semantics
(xfstests' src/log-writes/replay-log.c): the library under ``pydm lw``.

Rules of this module:

* It reads logs through a store's byte face (``read_at``) and writes the
  replay target through another (``write_at``, ``write_zeroes``,
  ``flush``); it never opens files itself and prints nothing: lines for the
  user go to ``say`` (verbose) and the result is returned or raised as
  ``ReplayError`` with replay-log's wording.
* Entries are walked from entry 0 (a log cannot be entered in the middle)
  and never past the super block's ``nr_entries``; a malformed header
  stops the walk with an error.
* A replayed write is written as logged; a discard is zeroed on the target
  (a hole punched in a file, so it reads back zeros: what xfstests needed
  dm-thin for), never skipped; flushes and marks write nothing.
* Stop rules: ``limit`` counts entries from the start position; with an
  ``end_mark`` only that mark stops (``next_flush``/``next_fua`` are then
  ignored, as in replay-log); a replay whose end mark is absent replays the
  whole log, and ``find`` then fails.
"""

from dataclasses import dataclass

from pydm.targets.logwrites import format as F


class ReplayError(Exception):
    """What replay-log would print before exiting with status 1."""


class Log:
    """A log on a store: its super block, and its entries walked in order."""

    def __init__(self, store):
        self.store = store
        try:
            self.nr_entries, self.ss = F.unpack_super(store.read_at(0, 512))
        except F.FormatError as e:
            raise ReplayError(str(e)) from None

    def walk(self, start: int = 0):
        """Entries ``start`` .. nr_entries-1 (walking the headers before
        them); ReplayError on a malformed header or one past the log's end."""
        ss, size = self.ss, self.store.size
        pos = 1
        for index in range(self.nr_entries):
            if (pos + 1) * ss > size:
                raise ReplayError(f"Malformed entry {index}@{pos}: past the end of the log")
            try:
                entry = F.unpack_header(self.store.read_at(pos * ss, ss), index, pos)
            except F.FormatError as e:
                raise ReplayError(str(e)) from None
            if entry.next_pos() * ss > size:
                raise ReplayError(f"Malformed entry {index}@{pos}: its data runs past the "
                                  f"end of the log")
            if index >= start:
                yield entry
            pos = entry.next_pos()

    def payload(self, entry) -> bytes:
        return self.store.read_at((entry.pos + 1) * self.ss, entry.nr_sectors * self.ss)


@dataclass
class Options:
    limit: int = 0
    next_flush: bool = False
    next_fua: bool = False
    end_mark: str = None
    start_entry: int = 0
    start_mark: str = None
    find: bool = False
    no_discard: bool = False
    check: object = None          # an int N, or "flush", "fua", "discard"
    fsck: object = None           # fn(entry) -> 0 on success (the CLI runs a command)
    start_sector: int = 0
    end_sector: int = None


def _start(log, opts):
    """The walk from the start position (``start_mark`` wins over
    ``start_entry``), the skipped entries not replayed."""
    if opts.start_mark is not None:
        want = opts.start_mark.encode()
        walk = log.walk()
        for e in walk:
            if e.flags & F.MARK and e.text == want:
                return walk
        raise ReplayError(f"Couldn't find starting mark {opts.start_mark!r}")
    if opts.start_entry >= log.nr_entries:
        raise ReplayError(f"Invalid entry number {opts.start_entry} (the log has "
                          f"{log.nr_entries} entries)")
    return log.walk(opts.start_entry)


def _stops(entry, opts) -> bool:
    if opts.end_mark is not None:
        return bool(entry.flags & F.MARK) and entry.text == opts.end_mark.encode()
    stop = (F.FLUSH if opts.next_flush else 0) | (F.FUA if opts.next_fua else 0)
    return bool(entry.flags & stop)


def find(log, opts) -> "F.Entry":
    """The entry ``--find`` reports (the ``limit``-th from the start, or the
    first meeting the stop rule); ReplayError("Couldn't find entry")."""
    count = 0
    for e in _start(log, opts):
        count += 1
        if (opts.limit and count == opts.limit) or _stops(e, opts):
            return e
    raise ReplayError("Couldn't find entry")


def _checked(e, replayed, opts) -> bool:
    if opts.check is None:
        return False
    if isinstance(opts.check, int):
        return replayed % opts.check == 0
    bit = {"flush": F.FLUSH, "fua": F.FUA, "discard": F.DISCARD}[opts.check]
    return bool(e.flags & bit)


def plan(log, opts) -> list:
    """The entries a replay goes through, from the start position to where
    it stops, every header checked first: a malformed log is refused before
    anything is written."""
    out = []
    for e in _start(log, opts):
        out.append(e)
        if (opts.limit and len(out) == opts.limit) or _stops(e, opts):
            break
    return out


def replay(log, target, opts, say=None) -> int:
    """Replay from the start position onto ``target``; returns the number of
    entries replayed.  ReplayError when the fsck command fails."""
    replayed = 0
    for e in plan(log, opts):
        if _apply(log, target, e, opts, say):
            replayed += 1
            if _checked(e, replayed, opts):
                target.flush()
                if opts.fsck(e) != 0:
                    raise ReplayError(f"Fsck errored out on entry {e.index}")
    target.flush()
    return replayed


def _apply(log, target, e, opts, say) -> bool:
    """Replay one entry; False when it was filtered out."""
    ss = log.ss
    if e.flags & F.DISCARD:
        if opts.no_discard:
            return False
        if say:
            say(_line("replaying", e, ss))
        target.write_zeroes(e.sector * ss, e.nr_sectors * ss, True)
        return True
    if e.nr_sectors and (e.sector + e.nr_sectors <= opts.start_sector or
                         (opts.end_sector is not None and e.sector > opts.end_sector)):
        if say:
            say(_line("skipping", e, ss))
        return False
    if say:
        say(_line("replaying", e, ss))
    if e.nr_sectors:
        target.write_at(e.sector * ss, log.payload(e))
    return True


def _line(what, e, ss):
    return (f"{what} {e.index}@{e.pos + 1}: sector {e.sector}, size "
            f"{e.nr_sectors * ss if not e.flags & F.MARK else 0}, flags {e.flags:#x}"
            f"({F.flag_names(e.flags)})")
