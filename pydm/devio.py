"""Synchronous and batched I/O from a target to a device below it, as bios,
with a busy-time meter (writeboost's cache and backing, log-writes' log).

Rules of this module:

* All I/O goes through ``DeviceIO``: bios submitted to a store or a lower
  pydm device, never a file descriptor, so the device may be a file, a
  flakey or delay device, or anything else pydm maps.
* ``read``/``write``/``flush`` wait for their bio (an Event: a file store
  completes inline, a lower device on its own thread) and raise ``IOFailed``
  with the errno, the device's role, the operation and the sector;
  ``submit`` is the asynchronous form.  Completions of these bios take no
  lock of the caller's, so waiting with one held cannot deadlock.
* One exception to "as bios": ``write_gather`` hands many small buffers to
  a store that takes them in one call (``Store.write_gather_at``: a file's
  pwritev); ``gathers`` says whether the device below is such a store.
* ``DeviceBytes`` gives a device the byte face of a store (what the
  metadata layers use), through the same bios.
* ``busy`` measures the time the device had I/O in flight (the kernel's
  io_ticks), which writeboost's writeback modulator reads as utilisation.
* Locks (leaves, from ``pydm.lockdep``): "devio.busy" and "devio.writes".
"""

import errno
import time

from pydm.bio import Bio, FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE
from pydm.lockdep import make_condition, make_event, make_lock

SECTOR = 512


class IOFailed(Exception):
    def __init__(self, err, role, op, sector):
        super().__init__(f"{op} of the {role} at sector {sector} failed: "
                         f"{errno.errorcode.get(err, err)}")
        self.errno = err or errno.EIO
        self.role = role
        self.op = op
        self.sector = sector


class _Busy:
    """Time with at least one bio in flight, as io_ticks counts it."""

    def __init__(self):
        self.lock = make_lock("devio.busy")
        self.inflight = 0
        self.since = 0.0
        self.total = 0.0

    def begin(self):
        with self.lock:
            if not self.inflight:
                self.since = time.monotonic()
            self.inflight += 1

    def end(self):
        with self.lock:
            self.inflight -= 1
            if not self.inflight:
                self.total += time.monotonic() - self.since

    def seconds(self) -> float:
        with self.lock:
            extra = time.monotonic() - self.since if self.inflight else 0.0
            return self.total + extra


class _Wait:
    __slots__ = ("event", "status")

    def __init__(self):
        self.event = make_event()
        self.status = None

    def __call__(self, bio):
        self.status = bio.status
        self.event.set()


class DeviceIO:
    """I/O to one device (``role``: "cache" or "backing")."""

    def __init__(self, dev, role: str):
        self.dev = dev
        self.role = role
        self.busy = _Busy()

    @property
    def size(self) -> int:
        return self.dev.size

    def _run(self, op, sector, data, flags, name):
        w = _Wait()
        self.busy.begin()
        try:
            self.dev.submit(Bio(op, sector, len(data) // SECTOR if data is not None else 0,
                                data, flags, w))
            w.event.wait()
        finally:
            self.busy.end()
        if w.status:
            raise IOFailed(w.status, self.role, name, sector)

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self._run(READ, offset // SECTOR, memoryview(buf), 0, "read")
        return bytes(buf)

    def readinto(self, offset: int, view) -> None:
        self._run(READ, offset // SECTOR, view, 0, "read")

    def write(self, offset: int, data, fua: bool = False) -> None:
        self._run(WRITE, offset // SECTOR, memoryview(data), REQ_FUA if fua else 0, "write")

    def flush(self) -> None:
        self._run(FLUSH, 0, None, REQ_PREFLUSH, "flush")

    def write_many(self, writes, window: int = 64) -> None:
        """Write ``[(byte offset, data)]`` with up to ``window`` bios in
        flight at once (a slow device serves them side by side); waits for
        all, then raises ``IOFailed`` for the first that failed."""
        cond = make_condition(name="devio.writes")
        state = {"inflight": 0, "error": None}

        def done(bio):
            self.busy.end()
            with cond:
                state["inflight"] -= 1
                if bio.status and state["error"] is None:
                    state["error"] = (bio.status, bio.sector)
                cond.notify()
        for offset, data in writes:
            with cond:
                while state["inflight"] >= window:
                    cond.wait()
                state["inflight"] += 1
            self.busy.begin()
            view = memoryview(data)
            self.dev.submit(Bio(WRITE, offset // SECTOR, len(view) // SECTOR, view, 0, done))
        with cond:
            while state["inflight"]:
                cond.wait()
        if state["error"] is not None:
            err, sector = state["error"]
            raise IOFailed(err, self.role, "write", sector)

    @property
    def gathers(self) -> bool:
        """Whether ``write_gather`` is worth it here: the device below is a
        store that takes many buffers in one call (a file: pwritev)."""
        return getattr(self.dev, "gathers", False)

    def write_gather(self, offset: int, bufs) -> None:
        """Write ``bufs`` back to back from byte ``offset`` in one call (only
        where ``gathers``; no copy in Python).  Raises ``IOFailed``."""
        self.busy.begin()
        try:
            self.dev.write_gather_at(offset, bufs)
        except OSError as e:
            raise IOFailed(e.errno or errno.EIO, self.role, "write", offset // SECTOR) from None
        finally:
            self.busy.end()

    def submit(self, op, sector, view, done) -> None:
        """An asynchronous bio; ``done(status)`` runs on completion."""
        self.busy.begin()

        def end(bio):
            self.busy.end()
            done(bio.status)
        self.dev.submit(Bio(op, sector, len(view) // SECTOR, view, 0, end))


class DeviceBytes:
    """A device below seen as a byte store (``read_at``, ``write_at``,
    ``flush``, ``size``: what ``pydm.metadata`` needs), through bios, so a
    target's metadata may live on another pydm device as well as on a file.
    Errors are ``OSError`` with the errno, as a file store's are."""

    def __init__(self, dev, role: str):
        self.dev = dev
        self.io = DeviceIO(dev, role)

    @property
    def ref(self) -> str:
        return self.dev.ref

    @property
    def size(self) -> int:
        return self.dev.size

    def refresh_size(self) -> int:
        """A device's size is its table's: nothing to read again."""
        return self.dev.size

    def read_at(self, offset: int, length: int) -> bytes:
        return self._do(self.io.read, offset, length)

    def write_at(self, offset: int, data) -> None:
        self._do(self.io.write, offset, data)

    def flush(self) -> None:
        self._do(self.io.flush)

    @staticmethod
    def _do(fn, *args):
        try:
            return fn(*args)
        except IOFailed as e:
            raise OSError(e.errno, str(e)) from None

