"""Shared test setup: the lock-order checker is on for the whole suite.

PYDM_LOCKDEP is read once when pydm.lockdep is imported, so it is set here,
before any test module imports pydm.  After every test, no lock-order report
may be left over (tests that build a deliberate inversion clear their own).
"""

import os

os.environ.setdefault("PYDM_LOCKDEP", "1")

import pytest  # noqa: E402

from pydm import lockdep  # noqa: E402
from pydm.verify.session import Session  # noqa: E402

# the ``server`` and ``remote`` fixtures: real NBD servers (nbdkit, qemu-nbd)
pytest_plugins = ["remote_servers"]

_rv = None


def _report_line(monitor, text):
    path = os.environ.get("PYDM_RV_REPORT")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"monitor": monitor, "report": text}) + "\n")


def pytest_configure(config):
    global _rv
    _rv = Session()
    _rv.enable([n for n in _rv.available() if n != "lockdep"], reactor="raise")
    if os.environ.get("PYDM_RV_REPORT"):
        for m in _rv.monitors.values():
            m.listener = lambda v: _report_line(v.monitor, str(v))


def pytest_unconfigure(config):
    if _rv is None:
        return
    _rv.end_check()
    _rv.close()


@pytest.fixture
def rv_session():
    """The suite's monitor session (tests that check a monitor stayed quiet)."""
    return _rv


@pytest.fixture(autouse=True)
def _no_lock_order_reports():
    before = len(lockdep.reports)
    yield
    new = lockdep.reports[before:]
    for text in new:
        _report_line("lockdep", text)
    assert not new, "lock-order checker reported:\n" + "\n".join(new)


@pytest.fixture(autouse=True)
def _no_monitor_violations():
    before = len(_rv.violations())
    yield
    new = _rv.violations()[before:]
    assert not new, "runtime monitors reported:\n" + "\n".join(str(v) for v in new[:10])


def _mount(args, what):
    import subprocess
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount {what} here: {r.stderr.strip()}")


def _umount(path):
    import subprocess
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_fs(tmp_path):
    """A 1 MiB tmpfs: writes past its space fail with ENOSPC for real."""
    mnt = tmp_path / "smallfs"
    mnt.mkdir()
    _mount(["-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], "a tmpfs")
    yield mnt
    _umount(mnt)


@pytest.fixture
def readonly_dir(tmp_path):
    """A directory holding ro.img (1 MiB), bind-mounted read-only."""
    src = tmp_path / "rosrc"
    src.mkdir()
    with open(src / "ro.img", "wb") as f:
        f.write(b"r" * (1 << 20))
    mnt = tmp_path / "ro"
    mnt.mkdir()
    _mount(["--bind", str(src), str(mnt)], "a bind mount")
    _mount(["-o", "remount,bind,ro", str(mnt)], "a read-only bind mount")
    yield mnt
    _umount(mnt)
