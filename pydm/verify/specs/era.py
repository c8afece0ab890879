"""Monitors of the era target: era_drain and era_commit (docs/rv/).

Rules of this module:

* Every instance is keyed by the era tracker (``key`` = ``id(tracker)`` in
  the events), never by device name: a reload puts a new tracker under the
  same name.  ``era_init`` (construction) resets an instance, so a key an
  old tracker left behind starts again clean; ``era_dtr`` takes it to the
  final ``gone``, which drops it.
* Shadow state decides what the model sees, so the check is deterministic:
  era_drain counts the origin writes in flight per tracker (``era_write``
  adds the bio, the core's ``clone_complete`` of that bio removes it);
  era_commit keeps, per tracker, a bitarray of the era blocks whose mark
  was committed in the current era (``era_marks_committed`` sets,
  ``era_rollover`` clears, ``era_marks_loaded`` replaces).
* A wrong moment is a model event with no edge anywhere
  (``checkpoint_busy``, ``write_unmarked``), so it is reported once, with
  the tracker's last events.
* Events of a tracker the monitor never saw start (enabled later) are
  ignored, except that era_commit takes a tracker up at an era change or
  a reload of marks, which tell it the whole committed set.
"""

from bitarray import bitarray

from pydm.verify.monitor import Spec


def _one(key, ev):
    return ((key, ev),)


# ------------------------------------------------------------- era_drain
class _InFlight:
    def __init__(self):
        self.count = {}             # key -> origin writes in flight
        self.bios = {}              # bio id of an origin write in flight -> key


def _drain_init(f, s):
    key = f["key"]
    s.count[key] = 0
    return _one(key, "init")


def _drain_write(f, s):
    key = f["key"]
    if key not in s.count:
        return None
    s.count[key] += 1
    s.bios[f["bio"]] = key
    return _one(key, "write_issue")


def _drain_complete(f, s):
    key = s.bios.pop(f["clone"], None)
    if key is None:
        return None
    if key in s.count:
        s.count[key] -= 1
    return _one(key, "write_done")


def _drain_begin(f, s):
    key = f["key"]
    n = s.count.get(key)
    if n is None:
        return None
    return _one(key, "checkpoint_busy" if n else "checkpoint_begin")


def _drain_done(f, s):
    key = f["key"]
    return _one(key, "checkpoint_done") if key in s.count else None


def _drain_dtr(f, s):
    key = f["key"]
    if s.count.pop(key, None) is None:
        return None
    for b in [b for b, k in s.bios.items() if k == key]:
        del s.bios[b]
    return _one(key, "dtr")


era_drain = Spec(
    "era_drain", "era_drain", "per_object",
    "no origin write of an era target is in flight between the quiesce and the commit "
    "of checkpoint / take_metadata_snap",
    handlers={
        "era_init": _drain_init,
        "era_write": _drain_write,
        "clone_complete": _drain_complete,
        "era_checkpoint_begin": _drain_begin,
        "era_checkpoint_done": _drain_done,
        "era_dtr": _drain_dtr,
    },
    start=("init",),
    reset=("init",),
    shadow=_InFlight,
)


# ------------------------------------------------------------ era_commit
class _Marks:
    def __init__(self):
        self.bits = {}              # key -> bitarray: mark committed in the current era


def _blank(n):
    b = bitarray(n)
    b.setall(0)
    return b


def _commit_init(f, s):
    key = f["key"]
    s.bits[key] = _blank(f["nr_blocks"])
    return _one(key, "init")


def _commit_rollover(f, s):
    key = f["key"]
    s.bits[key] = _blank(f["nr_blocks"])
    return _one(key, "rollover")


def _commit_loaded(f, s):
    key = f["key"]
    b = s.bits[key] = _blank(f["nr_blocks"])
    for first, end in f["ranges"]:
        b[first:end] = 1
    return _one(key, "load")


def _commit_marks(f, s):
    key = f["key"]
    b = s.bits.get(key)
    if b is None:
        return None
    for first, end in f["ranges"]:
        b[first:end] = 1
    return _one(key, "commit")


def _commit_write(f, s):
    key = f["key"]
    b = s.bits.get(key)
    if b is None:
        return None
    first, end = f["first"], f["end"]
    marked = 0 <= first < end <= len(b) and b.find(0, first, end) < 0
    return _one(key, "write_marked" if marked else "write_unmarked")


def _commit_dtr(f, s):
    key = f["key"]
    if s.bits.pop(key, None) is None:
        return None
    return _one(key, "dtr")


era_commit = Spec(
    "era_commit", "era_commit", "per_object",
    "an origin write to an era block is issued only after the commit that holds the "
    "block's mark in the current era",
    handlers={
        "era_init": _commit_init,
        "era_rollover": _commit_rollover,
        "era_marks_loaded": _commit_loaded,
        "era_marks_committed": _commit_marks,
        "era_write": _commit_write,
        "era_dtr": _commit_dtr,
    },
    start=("init", "rollover", "load"),
    reset=("init",),
    shadow=_Marks,
)

SPECS = (era_drain, era_commit)
