"""Capabilities: what a store, a target, a table or a device can honestly offer.

Rules of this module (nbdkit's rule, and the kernel's limit stacking):

* A capability is asked down the stack, never assumed: a store says what it
  can do, a target derives its own from the devices it maps onto (and may
  narrow it, or declare it outright when it has no device), a table combines
  its targets, a device is its live table, and a device stacked on another
  sees that one's.  Each layer may narrow what it got, never widen it.
* ``combine`` is the one rule for putting capabilities side by side (the
  devices of a target, the targets of a table):

  - ``flush`` / ``fua``: any part has state a flush makes durable (parts with
    nothing volatile, like ``zero``, are satisfied by every flush);
  - ``unflushable``: any part may hold writes in a cache no flush reaches (an
    NBD server that offers no flush); then nothing above claims ``flush`` or
    ``fua`` (``settle`` turns them off), whatever the other parts offer;
  - ``discard``, ``write_zeroes``, ``fast_zero``, ``multi_conn``, ``cache``,
    ``extents``: every part must offer it;
  - ``readonly``: any part is read-only;
  - block sizes: the largest minimum and preferred size, the smallest
    maximum; ``max_discard`` (bytes, 0 = no limit): the smallest limit.

* Nothing here does I/O or takes a lock; ``Caps`` objects are values, built
  fresh each time they are asked for, so a table reload shows up at the
  next question (the next NBD handshake).

Meanings: ``flush`` - writes completed before a flush are durable once it
completes; ``fua`` - a write with FUA is durable when it completes;
``discard`` - the range may be deallocated (it reads back as zeroes on pydm's
stores); ``write_zeroes`` - zeroing a range is supported; ``fast_zero`` - it
is faster than writing zeroes (never falls back to writing them);
``multi_conn`` - every connection sees one consistent device, and a flush on
one covers writes completed on all; ``cache`` - prefetch hints are taken;
``extents`` - allocation status (``base:allocation``) can be answered;
``unflushable`` - writes may be volatile and no flush makes them durable.
"""

SECTOR = 512
MAX_PAYLOAD = 32 << 20          # the largest request the NBD server takes


class Caps:
    __slots__ = ("readonly", "flush", "fua", "discard", "write_zeroes", "fast_zero",
                 "multi_conn", "cache", "extents", "min_block", "preferred_block",
                 "max_block", "max_discard", "unflushable")

    def __init__(self, readonly=False, flush=False, fua=False, discard=False,
                 write_zeroes=False, fast_zero=False, multi_conn=True, cache=True,
                 extents=True, min_block=SECTOR, preferred_block=4096,
                 max_block=MAX_PAYLOAD, max_discard=0, unflushable=False):
        self.readonly = readonly
        self.flush = flush
        self.fua = fua
        self.discard = discard
        self.write_zeroes = write_zeroes
        self.fast_zero = fast_zero
        self.multi_conn = multi_conn
        self.cache = cache
        self.extents = extents
        self.min_block = min_block
        self.preferred_block = preferred_block
        self.max_block = max_block
        self.max_discard = max_discard
        self.unflushable = unflushable

    def narrowed(self, **fields) -> "Caps":
        """A copy with ``fields`` narrowed: a flag given False turns off, a
        flag given True stays what it was (``readonly`` and ``unflushable``
        the other way round: True turns them on); a size is taken as given."""
        out = Caps(**{k: getattr(self, k) for k in self.__slots__})
        for k, v in fields.items():
            if isinstance(v, bool) and k not in _STICKY:
                v = v and getattr(self, k)
            elif k in _STICKY:
                v = v or getattr(self, k)
            setattr(out, k, v)
        out.settle()
        return out

    def settle(self):
        if self.unflushable:
            self.flush = self.fua = False
        if self.fast_zero and not self.write_zeroes:
            self.fast_zero = False
        if self.fua and not self.flush:
            self.fua = False
        self.preferred_block = min(max(self.preferred_block, self.min_block), self.max_block)

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__slots__}

    def __eq__(self, other):
        return isinstance(other, Caps) and self.as_dict() == other.as_dict()

    def __repr__(self):
        on = [k for k in self.__slots__ if getattr(self, k) is True]
        return (f"<Caps {' '.join(on) or '-'} blocks {self.min_block}/"
                f"{self.preferred_block}/{self.max_block}>")


# How each field combines side by side (the module rules, as data).
_ANY = ("readonly", "flush", "fua", "unflushable")
_STICKY = ("readonly", "unflushable")      # narrowing can only turn these on
_ALL = ("discard", "write_zeroes", "fast_zero", "multi_conn", "cache", "extents")
_LARGEST = ("min_block", "preferred_block")
_SMALLEST = ("max_block",)


def combine(parts) -> Caps:
    """The capabilities of ``parts`` side by side (see the module rules)."""
    parts = list(parts)
    if not parts:
        return Caps()
    out = Caps()
    for rule, fields in ((any, _ANY), (all, _ALL), (max, _LARGEST), (min, _SMALLEST)):
        for f in fields:
            setattr(out, f, rule(getattr(p, f) for p in parts))
    out.max_discard = min((p.max_discard for p in parts if p.max_discard), default=0)
    out.settle()
    return out
