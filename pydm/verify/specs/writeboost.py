"""Monitors of the writeboost target: what a flush or FUA promises, the
sticky FAILED state, and when writeback may move ``last_writeback``.

Rules of this module:

* Like every spec module it only reads trace events (it imports no target
  module).  An engine is named by ``eng``, the ``id()`` of the target's
  engine object, never by the device name (a name, and a minor, come back
  after a remove; an engine's id may too, which is why ``wb_start`` resets
  whatever was known under it).
* ``wb_durable`` (per object, key ``(eng, bar)``): a barrier (a flush or FUA
  bio, or a suspend's internal sync) is bound to segment S when its segment
  is sealed; it may be acknowledged with success only once a ``wb_durable``
  event said segments up to D >= S are written and the cache store flushed.
  Shadow: the highest durable id per engine and the barriers still waiting
  for it, so the model sees ``durable`` once per barrier.  After ``wb_fail``
  a durable point of that engine no longer counts (nothing may reach a
  store then; a real one is always seen before the failure, which waits for
  every admitted store write), so a barrier pending at the failure can only
  fail.  A flush or FUA
  bio the target completes itself with success (never bound) is the event
  ``ack_ok`` in the initial state: a violation.  Barriers still pending when
  the target is destroyed (``wb_stop``) are reported.
* ``wb_failed`` (per device, key ``eng``): after ``wb_fail`` no store write
  or flush (``wb_store_io``) happens, and a write or flush that reached the
  target after FAILED (``wb_late``, emitted when the map sees FAILED, so
  before the write path decides) is never acknowledged with success.  A
  write already taken before the failure may still succeed (it is in RAM,
  as a disk's volatile cache).  ``stopped`` (``wb_stop``) is the final state;
  an engine left FAILED at the end was never removed.
* ``wb_writeback`` (per device, key ``eng``): a writeback write sent to the
  backing store puts the engine in ``written``; only a successful backing
  FLUSH (``wb_backing_flushed``) leaves it, and ``wb_advance`` (a new
  ``last_writeback``) has no edge from ``written``.

Trace events (emitted by ``targets/writeboost``, fields in parentheses):

* ``wb_start`` (eng), ``wb_stop`` (eng): the engine went ACTIVE; the target
  was destroyed (its threads stopped);
* ``wb_fail`` (eng, errno, store, op, sector): the engine entered FAILED;
* ``wb_store_io`` (eng, store, op[, seg]): a write or flush admitted to the
  cache or backing store, about to be sent;
* ``wb_bind`` (eng, bar, seg): barrier ``bar`` (a bio id, or minus the id()
  of an internal sync) is attached to segment ``seg``;
* ``wb_durable`` (eng, seg): segments up to ``seg`` are written and the
  cache store flushed;
* ``wb_ack`` (bar, status): the flusher acknowledges a barrier;
* ``wb_late`` (eng, bio): a write or flush bio reached the target in FAILED;
* ``wb_done`` (eng, bio, op, flags, status): the target completes a write or
  flush bio itself (not as a barrier);
* ``wb_backing_flushed`` (eng): a writeback batch's backing FLUSH succeeded;
* ``wb_advance`` (eng, upto): ``last_writeback`` moved to ``upto``.
"""

from pydm.bio import FLUSH, REQ_FUA, REQ_PREFLUSH
from pydm.verify.monitor import Spec


def _one(key, ev):
    return ((key, ev),)


def _of_engine(f):
    eng = f["eng"]
    return lambda key: key[0] == eng


# ------------------------------------------------------------ wb_durable
class _Barriers:
    def __init__(self):
        self.durable = {}       # eng -> highest segment id known durable
        self.pending = {}       # eng -> {bar: seg}: bound, not yet durable
        self.owner = {}         # bar -> eng: bound, not yet acknowledged
        self.failed = set()     # engines in FAILED: durable points ignored


def _d_start(f, s):
    eng = f["eng"]
    s.durable[eng] = 0
    s.pending[eng] = {}
    s.failed.discard(eng)
    return None


def _d_fail(f, s):
    s.failed.add(f["eng"])
    return None


def _d_bind(f, s):
    eng, bar, seg = f["eng"], f["bar"], f["seg"]
    key = (eng, bar)
    s.owner[bar] = eng
    if s.durable.get(eng, 0) >= seg:
        return ((key, "bind"), (key, "durable"))
    s.pending.setdefault(eng, {})[bar] = seg
    return _one(key, "bind")


def _d_durable(f, s):
    eng, upto = f["eng"], f["seg"]
    if eng in s.failed:
        return None
    if upto > s.durable.get(eng, 0):
        s.durable[eng] = upto
    waiting = s.pending.get(eng)
    if not waiting:
        return None
    done = [bar for bar, seg in waiting.items() if seg <= upto]
    for bar in done:
        del waiting[bar]
    return [((eng, bar), "durable") for bar in done]


def _d_ack(f, s):
    bar = f["bar"]
    eng = s.owner.pop(bar, None)
    if eng is None:
        return None             # bound before this monitor was enabled
    waiting = s.pending.get(eng)
    if waiting:
        waiting.pop(bar, None)
    return _one((eng, bar), "ack_ok" if f["status"] == 0 else "ack_error")


def _d_done(f, s):
    # completed by the target itself: a flush or FUA never bound to a
    # segment may only fail
    if f["status"] == 0 and (f["op"] == FLUSH or f["flags"] & (REQ_FUA | REQ_PREFLUSH)):
        return _one((f["eng"], f["bio"]), "ack_ok")
    return None


def _d_stop(f, s):
    eng = f["eng"]
    s.durable.pop(eng, None)
    s.pending.pop(eng, None)
    s.failed.discard(eng)
    for bar in [b for b, e in s.owner.items() if e == eng]:
        del s.owner[bar]
    return None


wb_durable = Spec(
    "wb_durable", "wb_durable", "per_object",
    "writeboost acknowledges a flush or FUA with success only once its segment and every "
    "earlier one are written and the cache store flushed",
    handlers={
        "wb_start": _d_start,
        "wb_fail": _d_fail,
        "wb_bind": _d_bind,
        "wb_durable": _d_durable,
        "wb_ack": _d_ack,
        "wb_done": _d_done,
        "wb_stop": _d_stop,
    },
    start=("bind", "ack_ok"),
    reset=("bind",),            # a sync's Waiter id() may come back
    end_on={"wb_stop": _of_engine},
    shadow=_Barriers,
)


# ------------------------------------------------------------- wb_failed
class _Late:
    def __init__(self):
        self.late = {}          # bio -> eng: reached the target in FAILED


def _f_late(f, s):
    s.late[f["bio"]] = f["eng"]
    return None


def _f_completed(field):
    def handler(f, s):
        eng = s.late.pop(f[field], None)
        if eng is None:
            return None
        return _one(eng, "late_ok" if f["status"] == 0 else "late_error")
    return handler


def _f_stop(f, s):
    eng = f["eng"]
    for bio in [b for b, e in s.late.items() if e == eng]:
        del s.late[bio]
    return _one(eng, "stop")


wb_failed = Spec(
    "wb_failed", "wb_failed", "per_device",
    "after writeboost enters FAILED no write or flush reaches either store, every new write "
    "and flush fails, and the target is still destroyed",
    handlers={
        "wb_start": lambda f, s: _one(f["eng"], "start"),
        "wb_fail": lambda f, s: _one(f["eng"], "fail"),
        "wb_store_io": lambda f, s: _one(f["eng"], "store_io"),
        "wb_late": _f_late,
        "wb_done": _f_completed("bio"),
        "wb_ack": _f_completed("bar"),
        "wb_stop": _f_stop,
    },
    reset=("start",),
    shadow=_Late,
)


# ---------------------------------------------------------- wb_writeback
def _w_store(f, s):
    if f["store"] == "backing" and f["op"] == "write":
        return _one(f["eng"], "backing_write")
    return None


wb_writeback = Spec(
    "wb_writeback", "wb_writeback", "per_device",
    "writeboost moves last_writeback only after a backing FLUSH covered every writeback "
    "write sent before it",
    handlers={
        "wb_start": lambda f, s: _one(f["eng"], "start"),
        "wb_store_io": _w_store,
        "wb_backing_flushed": lambda f, s: _one(f["eng"], "backing_flush"),
        "wb_advance": lambda f, s: _one(f["eng"], "advance"),
        "wb_stop": lambda f, s: _one(f["eng"], "stop"),
    },
    reset=("start",),
)

SPECS = (wb_durable, wb_failed, wb_writeback)
