"""Tables: parse dmsetup table text, build the targets, find the owner of a sector.

Rules of this module: a table is built completely or not at all.  Every
problem (syntax, gap, overlap, zero length, unknown type, constructor error)
fails the whole load with a message naming the line, and everything already
built is torn down before the error leaves.  Once built, a table is
immutable; the device swaps whole tables.

Syntax, as dmsetup: one target per line, ``<start> <length> <type> <args...>``
in 512-byte sectors; blank lines and ``#`` comments are ignored; a backslash
escapes the next character (so an argument may contain a space, a ``#``, a
backslash or a newline), and ``quote_arg`` escapes exactly those, so every
table printed back loads to the same device.  A device ends before 2^63
bytes (``MAX_SECTORS``).
"""

import bisect
import errno

from pydm import target as _t
from pydm.caps import Caps, combine
from pydm.errors import DMError, PydmError


class TableLine:
    __slots__ = ("lineno", "start", "length", "ttype", "args")

    def __init__(self, lineno, start, length, ttype, args):
        self.lineno = lineno
        self.start = start
        self.length = length
        self.ttype = ttype
        self.args = args


# The largest device, in sectors: every byte offset of it must fit in a
# signed 64-bit file offset (pread/pwrite/lseek), which also keeps every
# NBD offset and size (unsigned 64-bit) in range.
MAX_SECTORS = ((1 << 63) - 1) >> 9


def _words(text: str):
    """[(lineno, [word, ...])] for every line of ``text`` that has words.

    One pass over the characters, so escapes are seen before comments and
    line ends: a backslash makes the next character (a space, ``#``, a
    backslash, even a newline) part of the word, and only an unescaped
    ``#`` starts a comment, running to the end of its line.
    """
    out = []
    words, cur, have = [], [], False
    lineno = start = 1
    esc = comment = False
    for ch in text:
        if comment:
            if ch != "\n":
                continue
            comment = False
        if esc:
            cur.append(ch)
            have = True
            esc = False
            if ch == "\n":
                lineno += 1
            continue
        if ch == "\\":
            esc = True
            continue
        if ch == "#" or ch == "\n" or ch.isspace():
            if have:
                words.append("".join(cur))
                cur, have = [], False
            if ch == "#":
                comment = True
            elif ch == "\n":
                if words:
                    out.append((start, words))
                    words = []
                lineno += 1
                start = lineno
            continue
        cur.append(ch)
        have = True
    if esc:
        raise DMError(f"line {lineno}: trailing backslash")
    if have:
        words.append("".join(cur))
    if words:
        out.append((start, words))
    return out


def split_args(text: str) -> list:
    """The words of one table line (escapes processed, comment dropped)."""
    return [w for _n, ws in _words(text) for w in ws]


def quote_arg(arg: str) -> str:
    """``arg`` escaped so that ``split_args`` gives it back unchanged,
    whatever characters it holds (every byte a path may contain)."""
    return "".join("\\" + c if c.isspace() or c in "\\#" else c for c in arg)


def _sector(text, what, lineno):
    if not text.isascii() or not text.isdigit():
        raise DMError(f"line {lineno}: invalid {what} {text!r}")
    value = int(text)
    if value > MAX_SECTORS:
        raise DMError(f"line {lineno}: {what} {text} is too large: a device may have at "
                      f"most {MAX_SECTORS} sectors (2^63 bytes)", errno.EFBIG)
    return value


def parse_table(text: str) -> list:
    """Parse and check the layout of table text (types are checked at build)."""
    lines = []
    expect = 0
    for lineno, words in _words(text):
        if len(words) < 3:
            body = " ".join(quote_arg(w) for w in words)
            raise DMError(f"line {lineno}: expected '<start> <length> <target> [args]', "
                          f"got {body!r}")
        start = _sector(words[0], "start sector", lineno)
        length = _sector(words[1], "length", lineno)
        if length == 0:
            raise DMError(f"line {lineno}: zero-length target")
        if start != expect:
            what = "gap" if start > expect else "overlap"
            raise DMError(f"line {lineno}: {what} in table: target starts at sector "
                          f"{start}, expected {expect}")
        if start + length > MAX_SECTORS:
            raise DMError(f"line {lineno}: the table would end at sector {start + length}, "
                          f"past the largest device ({MAX_SECTORS} sectors, 2^63 bytes)",
                          errno.EFBIG)
        lines.append(TableLine(lineno, start, length, words[2], words[3:]))
        expect = start + length
    if not lines:
        raise DMError("empty table")
    return lines


class TableContext:
    """What a target may ask of the core (the kernel's dm_table/dm_target helpers)."""

    def __init__(self, table, resolver, device):
        self.table = table
        self._resolver = resolver
        self.device = device           # the MappedDevice this table belongs to
        self._held = []
        self._opened = []

    @property
    def readonly(self) -> bool:
        return self.table.readonly

    def get_device(self, arg: str, readonly: bool = None, role: str = "data",
                   area=None, exclusive: bool = False):
        """Open a store or lower pydm device named in a table argument.

        ``role`` says what the target uses it for, over ``area`` (start,
        sectors) or all of it, with ``exclusive`` when nothing else may use
        the same file at all (metadata): the core refuses a file claimed
        twice in ways that would destroy it (see ``pydm.claims``).
        """
        ro = self.table.readonly if readonly is None else readonly
        if area is not None:
            area = (area[0] << 9, (area[0] + area[1]) << 9)
        dev, release = self._resolver(arg, ro, self.device, table=self, role=role,
                                      area=area, exclusive=exclusive)
        self._held.append(release)
        self._opened.append(dev)
        return dev

    def release_all(self) -> None:
        held, self._held = self._held, []
        self._opened = []
        for release in reversed(held):
            release()

    def refresh_sizes(self) -> None:
        """Read again the size of every file this table opened (it may have
        grown since)."""
        for dev in self._opened:
            refresh = getattr(dev, "refresh_size", None)
            if refresh is not None:
                refresh()

    def event(self) -> None:
        """Raise a device event (wakes ``dmsetup wait``)."""
        if self.device is not None:
            self.device.raise_event()

    def quiesce(self):
        """Context manager: no bio in flight, new bios held, until exit."""
        return self.device.quiesce()

    def noflush_suspending(self) -> bool:
        return self.device is not None and self.device.noflush_suspending

    def suspended(self) -> bool:
        return self.device is not None and self.device.suspended


class Table:
    def __init__(self, text: str, registry, resolver, device=None, readonly=False):
        self.readonly = readonly
        self.targets = []
        self.ends = []
        self.size = 0           # sectors
        self._types = []
        self.destroyed = False
        lines = parse_table(text)
        self.ctx = TableContext(self, resolver, device)
        try:
            for ln in lines:
                self._add(registry, ln)
            self._check_features()
        except BaseException:
            self._teardown(registry)
            raise
        self._registry = registry
        self._summarise()

    def _add(self, registry, ln):
        try:
            cls = registry.acquire(ln.ttype)
        except DMError as e:
            raise DMError(f"line {ln.lineno}: {e}", e.errno) from None
        self._types.append(ln.ttype)
        try:
            tgt = cls(self.ctx, ln.start, ln.length, ln.args)
        except PydmError as e:
            raise DMError(f"line {ln.lineno}: {ln.ttype}: {e}", e.errno) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise DMError(f"line {ln.lineno}: {ln.ttype}: bad arguments: {e}") from None
        self.targets.append(tgt)
        self.ends.append(ln.start + ln.length)
        self.size = ln.start + ln.length

    def _check_features(self):
        for t in self.targets:
            if t.features & _t.SINGLETON and len(self.targets) > 1:
                raise DMError(f"{t.name}: target type must be the only one in its table")
            if t.features & _t.ALWAYS_WRITEABLE and self.readonly:
                raise DMError(f"{t.name}: target type may not be used in a read-only table",
                              errno.EROFS)

    def _summarise(self):
        ts = self.targets
        self.single = ts[0] if len(ts) == 1 else None
        self.immutable_type = next((t.name for t in ts if t.features & _t.IMMUTABLE), None)

    def capabilities(self) -> Caps:
        """The targets' capabilities side by side (``pydm.caps.combine``),
        read-only if the table is; asked again each time, so the devices
        below are asked too."""
        caps = combine(t.capabilities() for t in self.targets)
        return caps.narrowed(readonly=self.readonly) if self.readonly else caps

    def _teardown(self, registry):
        for t in reversed(self.targets):
            try:
                t.dtr()
            except Exception:      # a destructor must not stop the others
                pass
        self.ctx.release_all()
        for name in self._types:
            registry.release(name)
        self.targets = []
        self._types = []

    def destroy(self) -> None:
        """Run every destructor once, release devices and type references."""
        if self.destroyed:
            return
        self.destroyed = True
        self._teardown(self._registry)

    def refresh_sizes(self) -> None:
        """Sizes of the files under this table, read again (at resume)."""
        self.ctx.refresh_sizes()

    def find(self, sector: int):
        """Index of the target owning ``sector`` (must be < size)."""
        return bisect.bisect_right(self.ends, sector)

    def text(self) -> str:
        out = []
        for t in self.targets:
            st = t.status(_t.STATUS_TABLE)
            out.append(f"{t.begin} {t.len} {t.name}" + (f" {st}" if st else ""))
        return "\n".join(out) + "\n"

    def lines_status(self, type_: str):
        return [(t.begin, t.len, t.name, t.status(type_)) for t in self.targets]

    def contexts(self):
        names = []
        for t in self.targets:
            for c in t.contexts():
                if c not in names:
                    names.append(c)
        return names
