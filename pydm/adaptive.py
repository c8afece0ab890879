"""The adaptive busy-wait window shared by every place that spins before it
sleeps (the NBD reader's socket, a ring's lone read): QEMU's poll-max-ns
rule, in one place.

Rules of this module: pure (numbers in, a number out).  The window doubles
from ``start`` up to ``cap`` while what was waited for came within ``cap``,
and drops to nothing after a longer wait, so a source that has gone slow or
quiet costs no CPU; it grows again from ``start`` at the next short wait.
"""


def next_window(current: float, waited: float, start: float, cap: float) -> float:
    """The window to spin next time, in seconds, after a wait of ``waited``."""
    if waited <= cap:
        return min(cap, max(current * 2, start))
    return 0.0
