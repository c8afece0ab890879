"""Claims: which table uses which part of which file, and for what.

Rules of this module:

* A file is known by what it is, not by how it was named: its device and
  inode (a block device by its device number), so symlinks, hard links and
  ``./a.img`` vs ``/abs/a.img`` are all the same file.
* A claim is made by one table for one *role* of a target (``metadata``,
  ``origin``, ``data``...) over a byte range of the file, or over all of it
  (``exclusive``: the role owns the file's whole contents, like metadata).
* Two claims on one file conflict only if both may write.  Then:

  - in the same table, an exclusive claim conflicts with anything, and two
    ranges conflict when they overlap in different roles (one file is then
    two things at once: era's origin used as its metadata);
  - between two devices, an exclusive claim conflicts with anything, and
    two ranges conflict when they overlap (two devices writing the same
    blocks: one bypasses what the other keeps, like era's tracking);
  - the live and inactive tables of one device never conflict: one
    replaces the other.

  Read-only claims never conflict, so a read-only device can look at any
  file (a backup reading a copy of the origin, say).
* ``claim`` checks and records under one lock (a leaf), so two tables being
  loaded at once cannot both get in.  Nothing here does I/O.
"""

import errno
import itertools

from pydm.errors import TargetError
from pydm.lockdep import make_lock

WHOLE = (0, 1 << 64)


class Claim:
    __slots__ = ("key", "device", "table", "role", "area", "exclusive", "writable",
                 "where", "id")

    def __init__(self, key, device, table, role, area, exclusive, writable, where):
        self.key = key
        self.device = device          # owner name, for messages; None: no device
        self.table = table            # a token, one per table being built
        self.role = role
        self.area = WHOLE if exclusive or area is None else area
        self.exclusive = exclusive
        self.writable = writable
        self.where = where            # the file as the table named it


def _overlap(a, b) -> bool:
    return a[0] < b[1] and b[0] < a[1]


def conflict(new: Claim, old: Claim) -> bool:
    """True if ``new`` may not coexist with ``old`` (same file assumed)."""
    if not (new.writable and old.writable):
        return False
    if new.table is old.table:
        if new.exclusive or old.exclusive:
            return True
        return new.role != old.role and _overlap(new.area, old.area)
    if new.device is not None and new.device is old.device:
        return False                  # live vs inactive table of one device
    return new.exclusive or old.exclusive or _overlap(new.area, old.area)


def describe(c: Claim, same_table: bool) -> str:
    """How a message names what ``c`` is (``already ...``)."""
    if same_table:
        owner = "this table"
    elif c.device is not None:
        owner = f"device {c.device.name}"
    else:
        owner = "another table"
    return f"mapped by {owner}" if c.role == "data" else f"the {c.role} of {owner}"


class ClaimRegistry:
    def __init__(self):
        self._lock = make_lock("store.claims")
        self._claims = {}             # key -> {id: Claim}
        self._ids = itertools.count(1)

    def claim(self, c: Claim) -> int:
        """Record ``c`` or raise ``TargetError`` (EBUSY) naming the conflict."""
        with self._lock:
            held = self._claims.get(c.key, {})
            for other in held.values():
                if conflict(c, other):
                    what = "used" if c.role == "data" else f"the {c.role}"
                    noun = ("file" if isinstance(c.key, tuple) and c.key[:1] in (("file",), ("blk",))
                            else "store")
                    raise TargetError(f"{c.where} cannot be {what}: the same {noun} is already "
                                      f"{describe(other, other.table is c.table)}",
                                      errno.EBUSY)
            c.id = next(self._ids)
            self._claims.setdefault(c.key, {})[c.id] = c
            return c.id

    def release(self, c: Claim) -> None:
        with self._lock:
            held = self._claims.get(c.key)
            if held is not None:
                held.pop(c.id, None)
                if not held:
                    del self._claims[c.key]

    def count(self) -> int:
        with self._lock:
            return sum(len(v) for v in self._claims.values())
