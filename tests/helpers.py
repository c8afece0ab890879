"""Small helpers shared by the tests: synchronous bio submission and stores."""

import os
import threading

from pydm.bio import Bio, READ, WRITE

SECTOR = 512


class Waiter:
    """Collects a bio's completion; ``wait`` returns its status."""

    def __init__(self):
        self.event = threading.Event()
        self.calls = 0
        self.status = None

    def __call__(self, bio):
        self.calls += 1
        self.status = bio.status
        self.event.set()

    def wait(self, timeout=10):
        assert self.event.wait(timeout), "bio did not complete"
        return self.status


def do_io(dev, op, sector, nr=0, data=None, flags=0, timeout=10):
    """Submit one bio and wait; returns (status, buffer)."""
    if op == READ:
        buf = bytearray(nr * SECTOR)
    elif op == WRITE:
        buf = bytearray(data)
        nr = len(buf) // SECTOR
    else:
        buf = None
    w = Waiter()
    dev.submit(Bio(op, sector, nr, memoryview(buf) if buf is not None else None, flags, w))
    status = w.wait(timeout)
    assert w.calls == 1
    return status, buf


def make_image(path, size, fill=None):
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill * (size // len(fill)))
    return os.fspath(path)
