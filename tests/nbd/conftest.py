"""Fixtures for the NBD tests: an in-process Control + NBDServer over tmp images.

The lock checker is on (as for the whole suite), and any ERROR logged by
pydm during a test fails it: the server logs protocol violations as
warnings, so an error record means an internal bug.
"""

import logging
import os

os.environ.setdefault("PYDM_LOCKDEP", "1")

import pytest  # noqa: E402

from pydm import lockdep  # noqa: E402
from pydm.control import Control  # noqa: E402
from nbd_support import DISK_SIZE, MiB, make_disk, start_server  # noqa: E402


class _ErrorCatcher(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture(autouse=True)
def _no_errors_logged():
    before = len(lockdep.reports)
    catcher = _ErrorCatcher()
    root = logging.getLogger("pydm")
    root.addHandler(catcher)
    yield catcher
    root.removeHandler(catcher)
    assert not lockdep.reports[before:], "lock checker:\n" + "\n".join(lockdep.reports[before:])
    msgs = [catcher.format(r) for r in catcher.records]
    assert not msgs, "pydm logged errors:\n" + "\n".join(msgs)


@pytest.fixture
def served(tmp_path):
    """Devices ``disk`` (64 MiB: 1 MiB of data, then holes, a second data
    MiB at 8 MiB) and ``ro`` (read-only, 4 MiB), served on TCP and unix."""
    control = Control()
    disk = make_disk(tmp_path / "disk.img", data_at=((0, MiB), (8 * MiB, MiB)))
    ro = make_disk(tmp_path / "ro.img", 4 * MiB, ((0, 4 * MiB),), seed=2)
    control.create("disk", f"0 {DISK_SIZE >> 9} linear {disk} 0")
    control.create("ro", f"0 {(4 * MiB) >> 9} linear {ro} 0", readonly=True)
    s = start_server(control, str(tmp_path))
    yield s
    s.server.stop()
    control.shutdown()
