"""Checked-lock factory and a lockdep-style lock-order checker.

Rules of this module:

* Every lock in pydm is created here (``make_lock``, ``make_rlock``,
  ``make_condition``, ``make_event``); tests/core/test_lock_factory.py scans
  the tree for any other use of a threading primitive.
* The checker is decided once, at import, from ``PYDM_LOCKDEP=1``.  When off
  the factory returns plain ``threading`` objects: zero overhead.
* When on, a lock belongs to a *class* (the name given to the factory).  Each
  thread keeps a stack of held locks; taking B while holding A records the
  edge A -> B.  A new edge that closes a cycle is an ABBA inversion and is
  reported *before* blocking, with the stacks saved when each edge was first
  seen, so the report appears even when the timing would not deadlock.
* Reports go to ``reports`` (a list the tests inspect) and are logged; with
  ``set_reactor("raise")`` the offending acquire raises ``LockOrderError``.

The documented order for pydm (outermost first) is declared at the bottom:
registry -> device control -> table/target state -> metadata -> leaf locks.
"""

import os
import threading
import traceback

ENABLED = os.environ.get("PYDM_LOCKDEP", "") not in ("", "0")



class LockOrderError(RuntimeError):
    pass


class _State:
    def __init__(self):
        self.lock = threading.Lock()     # raw: guards the graph itself
        self.edges = {}                  # cls -> {succ_cls: stack_text}
        self.chains = set()              # validated (held classes..., new)
        self.order = {}                  # cls -> rank from declare_order
        self.reactor = "record"


_state = _State()
_tls = threading.local()
reports = []


def _held():
    h = getattr(_tls, "held", None)
    if h is None:
        h = _tls.held = []
    return h


def set_reactor(name: str) -> None:
    if name not in ("record", "raise"):
        raise ValueError(name)
    _state.reactor = name


def _report(kind: str, text: str) -> None:
    msg = f"lockdep: {kind}\n{text}"
    reports.append(msg)
    import logging          # only when reporting: offline tools import this module
    logging.getLogger("pydm.lockdep").error(msg)
    if _state.reactor == "raise":
        raise LockOrderError(msg)


def _stack() -> str:
    return "".join(traceback.format_stack(limit=12)[:-3])


def _path(src, dst):
    """BFS over recorded edges: a list of classes from src to dst, or None."""
    prev = {src: None}
    todo = [src]
    while todo:
        nxt = []
        for c in todo:
            for s in _state.edges.get(c, ()):
                if s in prev:
                    continue
                prev[s] = c
                if s == dst:
                    path = [s]
                    while prev[path[-1]] is not None:
                        path.append(prev[path[-1]])
                    return path[::-1]
                nxt.append(s)
        todo = nxt
    return None


def _before_acquire(lock) -> None:
    held = _held()
    if not held:
        return
    cls = lock.cls
    chain = tuple(h.cls for h in held) + (cls,)
    if chain in _state.chains:
        return
    problems = []
    with _state.lock:
        for h in held:
            if h is lock:
                if not lock.reentrant:
                    problems.append(("recursive locking (self-deadlock)",
                                     f"{cls} taken again by the thread holding it\n{_stack()}"))
                continue
            if h.cls == cls:
                if lock.subclass == h.subclass:
                    problems.append(("recursive locking of one class",
                                     f"two locks of class {cls} held together without a "
                                     f"nesting annotation\n{_stack()}"))
                continue
            a, b = h.cls, cls
            ra, rb = _state.order.get(a), _state.order.get(b)
            if ra is not None and rb is not None and ra > rb:
                problems.append(("lock order violation",
                                 f"{a} -> {b} is against the declared order\n{_stack()}"))
            succ = _state.edges.setdefault(a, {})
            if b in succ:
                continue
            back = _path(b, a)
            if back is not None:
                first = _state.edges[back[0]][back[1]] if len(back) > 1 else ""
                problems.append((
                    "possible ABBA deadlock",
                    f"new order {a} -> {b} (this stack):\n{_stack()}\n"
                    f"existing order {' -> '.join(back)} first seen at:\n{first}"))
            else:
                succ[b] = _stack()
        if not problems:
            _state.chains.add(chain)
    for kind, text in problems:
        _report(kind, text)


class _Held:
    __slots__ = ("lock", "cls", "subclass")

    def __init__(self, lock):
        self.lock = lock
        self.cls = lock.cls
        self.subclass = lock.subclass


class CheckedLock:
    """A Lock/RLock wrapper that feeds the order checker."""

    reentrant = False

    def __init__(self, name, inner, subclass=0):
        self.cls = name
        self.subclass = subclass
        self._inner = inner
        self._owner = None
        self._count = 0

    def nested(self, subclass: int) -> "CheckedLock":
        """Annotate a legal same-class nesting (outer device before inner)."""
        self.subclass = subclass
        return self

    def acquire(self, blocking=True, timeout=-1):
        me = threading.get_ident()
        if not (self.reentrant and self._owner == me):
            _before_acquire(self)
        ok = self._inner.acquire(blocking, timeout)
        if ok:
            if self._owner != me:
                self._owner = me
                self._count = 0
                _held().append(self)
            self._count += 1
        return ok

    __enter__ = acquire

    def release(self):
        me = threading.get_ident()
        if self._owner != me:
            _report("release of a lock not held", f"{self.cls}\n{_stack()}")
        else:
            self._count -= 1
            if self._count == 0:
                self._owner = None
                held = _held()
                for i in range(len(held) - 1, -1, -1):
                    if held[i] is self:
                        del held[i]
                        break
        self._inner.release()

    def __exit__(self, *exc):
        self.release()

    def locked(self):
        return self._inner.locked() if hasattr(self._inner, "locked") else self._owner is not None

    # threading.Condition protocol: wait() drops and retakes the lock.
    def _is_owned(self):
        return self._owner == threading.get_ident()

    def _release_save(self):
        count = self._count
        self._count = 1
        while self._count:
            self.release()
        return count

    def _acquire_restore(self, count):
        self.acquire()
        self._count = count

    def __repr__(self):
        return f"<CheckedLock {self.cls} owner={self._owner}>"


class CheckedRLock(CheckedLock):
    reentrant = True

    def _release_save(self):
        count = self._count
        self._count = 1
        self.release()
        for _ in range(count - 1):
            self._inner.release()
        return count

    def _acquire_restore(self, count):
        self.acquire()
        for _ in range(count - 1):
            self._inner.acquire()
        self._count = count


def _site() -> str:
    f = traceback.extract_stack(limit=3)[0]
    return f"{os.path.basename(f.filename)}:{f.lineno}"


def make_lock(name: str = None):
    if not ENABLED:
        return threading.Lock()
    return CheckedLock(name or _site(), threading.Lock())


def make_rlock(name: str = None):
    if not ENABLED:
        return threading.RLock()
    return CheckedRLock(name or _site(), threading.RLock())


def make_condition(lock=None, name: str = None):
    if lock is None:
        lock = make_lock(name or _site())
    return threading.Condition(lock)


def make_raw_lock():
    """A lock the checker never sees: only for the tracing and verification
    machinery, which runs inside every other lock and must not feed the graph."""
    return threading.Lock()


def make_event():
    # Event's internal lock is never held across user code, so it cannot take
    # part in an inversion; it is still created here so the grep stays simple.
    return threading.Event()


def assert_held(lock) -> None:
    if ENABLED and isinstance(lock, CheckedLock) and not lock._is_owned():
        _report("lock not held", f"{lock.cls} must be held here\n{_stack()}")


def declare_order(*names: str) -> None:
    with _state.lock:
        for i, n in enumerate(names):
            _state.order[n] = i


def reset() -> None:
    """Forget the graph and reports (tests that build deliberate inversions)."""
    with _state.lock:
        _state.edges.clear()
        _state.chains.clear()
    reports.clear()


# The documented lock order of pydm, outermost first.  Leaf locks (io, open
# counts, events, store pool) are never held while taking another lock.
declare_order(
    "control.registry",
    "dev.control",
    "target",
    "metadata",
    "dev.io",
    "dev.open",
    "dev.event",
    "store.pool",
    "store.claims",
    "nbd.conn.mem",
    "nbd.budget",
)
