"""Writeboost's optional arguments: the table's ``<#opt_args> <key> <value>``
pairs, and the same keys as messages.

Rules of this module: pure parsing and checking, as the Linux target does
it: keys are case-insensitive and in any order; ``#opt_args`` counts words
(0..14, even); an unknown key, a missing value or a value out of range is
refused with one line.  Two keys are static (only at construction).  The
table prints the arguments exactly as given at construction; messages
change the live values only.
"""

from pydm.errors import TargetError

# key -> (lowest, highest, default, settable by message)
KEYS = {
    "writeback_threshold": (0, 100, 0, True),
    "nr_max_batched_writeback": (1, 32, 32, True),
    "update_sb_record_interval": (0, 3600, 0, True),
    "sync_data_interval": (0, 3600, 0, True),
    "read_cache_threshold": (0, 127, 0, True),
    "write_around_mode": (0, 1, 0, False),
    "nr_read_cache_cells": (1, 2048, 2048, False),
}
MAX_OPT_ARGS = 14


def _value(key, text):
    lo, hi, _d, _m = KEYS[key]
    if not text.isascii() or not text.isdigit() or not lo <= int(text) <= hi:
        raise TargetError(f"Invalid {key} {text!r}: it must be {lo}..{hi}")
    return int(text)


def parse(args):
    """({key: value} with defaults filled in, the argument words given)."""
    values = {k: d for k, (_lo, _hi, d, _m) in KEYS.items()}
    if not args:
        return values, []
    count = args[0]
    if not count.isascii() or not count.isdigit() or int(count) > MAX_OPT_ARGS:
        raise TargetError(f"Invalid #opt_args {count!r}: it must be 0..{MAX_OPT_ARGS}")
    n = int(count)
    if n % 2 or len(args) != n + 1:
        raise TargetError(f"#opt_args is {n}, but {len(args) - 1} optional words follow "
                          f"(they come in key value pairs)")
    words = args[1:]
    for i in range(0, n, 2):
        key = words[i].lower()
        if key not in KEYS:
            raise TargetError(f"Invalid optional key {words[i]!r}")
        v = _value(key, words[i + 1])
        # as the kernel: a 0 leaves the default (only the batch size's isn't 0)
        if v:
            values[key] = v
    return values, list(args)


def set_by_message(values, key, text):
    """The new value of a message ``<key> <value>``."""
    key = key.lower()
    if key not in KEYS:
        raise TargetError(f"unrecognised message {key!r}")
    if not KEYS[key][3]:
        raise TargetError(f"{key} is static: it can only be set in the table")
    values[key] = _value(key, text)
    return key


def status_pairs(values, nr_cur_batched) -> str:
    """The five key/value pairs that end the status line, in the kernel's order."""
    return (f"10 writeback_threshold {values['writeback_threshold']} "
            f"nr_cur_batched_writeback {nr_cur_batched} "
            f"sync_data_interval {values['sync_data_interval']} "
            f"update_sb_record_interval {values['update_sb_record_interval']} "
            f"read_cache_threshold {values['read_cache_threshold']}")
