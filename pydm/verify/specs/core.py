"""Monitors of the core: bios, device lifecycle, the control plane, deadlines."""

import itertools

from pydm.bio import FLUSH, REQ_FUA, REQ_PREFLUSH
from pydm.verify.monitor import Spec


def _one(key, ev):
    return ((key, ev),)


def _by_minor(f):
    return f["minor"]


def _dev_of(f):
    minor = f["minor"]
    return lambda key: key[0] == minor


# -------------------------------------------------------------- bio_once
bio_once = Spec(
    "bio_once", "bio_once", "per_object",
    "every bio a device takes completes exactly once",
    handlers={
        "bio_submit": lambda f, s: _one((f["minor"], f["bio"]), "bio_submit"),
        "bio_defer": lambda f, s: _one((f["minor"], f["bio"]), "bio_defer"),
        "bio_requeue": lambda f, s: _one((f["minor"], f["bio"]), "bio_requeue"),
        "bio_complete": lambda f, s: _one((f["minor"], f["bio"]), "bio_complete"),
    },
    start=("bio_submit", "bio_defer", "bio_complete"),
    end_on={"dev_gone": _dev_of},
)

# --------------------------------------------------------- dev_lifecycle
_lifecycle_events = ("dev_create", "dev_resumed", "dev_suspended", "dev_remove")
dev_lifecycle = Spec(
    "dev_lifecycle", "dev_lifecycle", "per_device",
    "a device goes new -> active <-> suspended -> removed, nothing else",
    handlers={ev: (lambda ev: lambda f, s: _one(f["minor"], ev))(ev) for ev in _lifecycle_events},
    reset=("dev_create",),
)

# --------------------------------------------------------- inactive_slot
_slot_events = ("dev_load", "dev_clear", "dev_resume_begin", "dev_swap", "dev_resumed",
                "dev_remove")
inactive_slot = Spec(
    "inactive_slot", "inactive_slot", "per_device",
    "a resume swaps in the loaded inactive table, and only a loaded one",
    handlers={ev: (lambda ev: lambda f, s: _one(f["minor"], ev))(ev)
              for ev in ("dev_create",) + _slot_events},
    reset=("dev_create",),
)

# --------------------------------------------------------- control_plane
control_plane = Spec(
    "control_plane", "control_plane", "per_object",
    "a device is removed once, and no bio is submitted to a removed device",
    handlers={
        "dev_create": lambda f, s: _one(f["minor"], "dev_create"),
        "bio_submit": lambda f, s: _one(f["minor"], "bio_submit"),
        "dev_remove": lambda f, s: _one(f["minor"], "dev_remove"),
    },
    reset=("dev_create",),      # minors start again at 0 in each Control
)


# ---------------------------------------------------------- target_types
def _get(f, users):
    n = users.get(f["type"], 0)
    users[f["type"]] = n + 1
    return _one(f["type"], "get")


def _put(f, users):
    n = users.get(f["type"], 0) - 1
    users[f["type"]] = n
    return _one(f["type"], "put" if n > 0 else "put_last" if n == 0 else "put_unbalanced")


target_types = Spec(
    "target_types", "target_types", "per_device",
    "a target type in use by any table is never unloaded",
    handlers={
        "target_get": _get,
        "target_put": _put,
        "target_unload": lambda f, s: _one(f["type"], "unload"),
    },
)


# -------------------------------------------------------------- deadline
def _is_flush(f):
    return f.get("op") == FLUSH or f.get("flags", 0) & (REQ_FUA | REQ_PREFLUSH)


class _Pending:
    def __init__(self):
        self.flushes = set()        # (minor, bio) of flush/FUA bios in flight
        self.removes = {}           # minor -> key of the remove under way
        self.count = itertools.count(1)


def _flush_submit(f, p):
    if _is_flush(f):
        p.flushes.add((f["minor"], f["bio"]))
        return _one((f["minor"], f["bio"]), "flush_submit")
    return None


def _flush_event(name):
    def handler(f, p):
        key = (f["minor"], f["bio"])
        if key in p.flushes:
            if name == "flush_complete":
                p.flushes.discard(key)
            return _one(key, name)
        return None
    return handler


def _remove_begin(f, p):
    # minors are reused (each Control starts at 0): one key per remove
    key = p.removes[f["minor"]] = ("remove", f["minor"], next(p.count))
    return _one(key, "remove_begin")


def _remove_done(f, p):
    key = p.removes.pop(f["minor"], None)
    return _one(key, "remove_done") if key is not None else None


deadline = Spec(
    "deadline", "deadline", "per_object",
    "a flush or FUA bio leaves the in-flight state within flush_timeout, and a remove "
    "finishes within remove_timeout, even with a dead store",
    handlers={
        "bio_submit": _flush_submit,
        "bio_complete": _flush_event("flush_complete"),
        "bio_requeue": _flush_event("flush_requeue"),
        "dev_remove_begin": _remove_begin,
        "dev_gone": _remove_done,
    },
    start=("flush_submit", "remove_begin"),
    params={"flush_timeout": 30.0, "remove_timeout": 30.0},
    shadow=_Pending,
)

SPECS = (bio_once, dev_lifecycle, inactive_slot, control_plane, target_types, deadline)
