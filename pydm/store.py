"""Block stores: the only place where data meets file descriptors.

Rules of this module: a store is a flat array of bytes with a size.  It offers
two faces over the same calls:

* a byte face for metadata code and tools: ``read_at``, ``readinto_at``,
  ``write_at``, ``write_gather_at``, ``flush``, ``discard``, ``write_zeroes``,
  ``extents``; these raise ``OSError`` on failure;
* a bio face for the router: ``submit(bio)`` runs the bio synchronously and
  completes it with 0 or the errno of the failure (never raises).  The one
  exception is a ``REQ_NOWAIT`` read: what the page cache cannot answer at
  once is queued on the calling thread's ring (``pydm.aio``) and completes
  later on that thread, or, on a thread without a ring, fails with EAGAIN.

Stores never take locks on the I/O path: pread/pwrite at explicit offsets are
safe to run from many threads, and they release the GIL while they block.
Which plugin opens a table's store argument, and the pool that shares open
stores among tables, are ``pydm.store_registry``'s.
"""

import errno
import fcntl
import logging
import os
import stat

from pydm import aio as _aio
from pydm import bio as _bio
from pydm.caps import Caps
from pydm.errors import PydmError, strerror

# Extent flags, shared with NBD base:allocation (same bit values).
EXTENT_HOLE = 1
EXTENT_ZERO = 2

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_FALLOC_FL_ZERO_RANGE = 0x10

_fallocate = None
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)
_IOV_MAX = 1024                 # buffers per pwritev (Linux's UIO_MAXIOV)
QUEUED = -1            # read_nowait: the read completes later, on the thread's ring

log = logging.getLogger("pydm.store")


def _libc_fallocate():
    # ctypes loads on first use: the offline metadata tools never punch holes
    import ctypes
    import ctypes.util
    global _fallocate
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    fn = libc.fallocate
    fn.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    fn.restype = ctypes.c_int
    _fallocate = (fn, ctypes.get_errno)
    return _fallocate


_ZERO_CHUNK = bytes(1 << 20)


def _fallocate_or_raise(fd, mode, offset, length):
    fn, get_errno = _fallocate or _libc_fallocate()
    if fn(fd, mode, offset, length) != 0:
        err = get_errno()
        raise OSError(err, strerror(err))


class Store:
    """Interface shared by file and memory stores."""

    name = "?"            # canonical name printed back in tables
    size = 0              # bytes
    readonly = False

    @property
    def ref(self) -> str:
        """How a table names this store (printed back by ``table``)."""
        return self.name

    # -- byte face -----------------------------------------------------
    def readinto_at(self, buf, offset: int) -> None:
        raise NotImplementedError

    def read_nowait(self, bio):
        """Serve a ``REQ_NOWAIT`` read without waiting for a disk (never
        raises): its status (0 or an errno, EAGAIN for "it would wait"),
        ``QUEUED`` (it completes later on the calling thread's ring), or None
        to read it the plain way (a store that never waits, like this one)."""
        return None

    def read_at(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.readinto_at(buf, offset)
        return bytes(buf)

    def write_at(self, offset: int, data) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def discard(self, offset: int, length: int) -> None:
        self.write_zeroes(offset, length)

    gathers = False     # write_gather_at is one call below (else a loop of write_at)

    def write_gather_at(self, offset: int, bufs) -> None:
        """Write the buffers ``bufs`` back to back from ``offset`` (many
        small pieces in one call: a log's entries)."""
        for b in bufs:
            self.write_at(offset, b)
            offset += len(b)

    def write_zeroes(self, offset: int, length: int, may_unmap: bool = True,
                     fallback: bool = True) -> None:
        """Zero a range; without ``fallback``, only if that is faster than
        writing zeroes (else OSError EOPNOTSUPP)."""
        if not fallback:
            raise OSError(errno.EOPNOTSUPP, "zeroing would mean writing zeroes")
        pos, end = offset, offset + length
        while pos < end:
            n = min(end - pos, len(_ZERO_CHUNK))
            self.write_at(pos, memoryview(_ZERO_CHUNK)[:n])
            pos += n

    def extents(self, offset: int, length: int):
        """[(length, flags)] covering at least the first byte of the range."""
        return [(length, 0)]

    def close(self) -> None:
        pass

    def hold_for_writing(self) -> None:
        """Keep other processes from writing this store through pydm while
        it is open here (a file's lock); nothing to do for most stores."""

    def capabilities(self) -> Caps:
        """What this store can do (see ``pydm.caps``): here, a store with no
        volatile state of its own (memory), that discards and zeroes."""
        return Caps(readonly=self.readonly, discard=True, write_zeroes=True)

    # -- bio face ------------------------------------------------------
    def submit(self, bio) -> None:
        if bio.flags & _bio.REQ_NOWAIT and bio.op == _bio.READ:
            status = self.read_nowait(bio)
            if status is not None:
                if status != QUEUED:
                    bio.complete(status)
                return
        try:
            op = bio.op
            if op == _bio.READ:
                self.readinto_at(bio.data, bio.sector << 9)
            elif op == _bio.WRITE:
                self._check_writable()
                self.write_at(bio.sector << 9, bio.data)
                if bio.flags & _bio.REQ_FUA:
                    self.flush()
            elif op == _bio.FLUSH:
                if not self.readonly:
                    self.flush()
            elif op == _bio.DISCARD:
                self._check_writable()
                self.discard(bio.sector << 9, bio.nr_sectors << 9)
            elif op == _bio.WRITE_ZEROES:
                self._check_writable()
                self.write_zeroes(bio.sector << 9, bio.nr_sectors << 9,
                                  not bio.flags & _bio.REQ_NOUNMAP,
                                  not bio.flags & _bio.REQ_NOFALLBACK)
                if bio.flags & _bio.REQ_FUA:
                    self.flush()
            else:
                raise OSError(errno.EOPNOTSUPP, "unknown operation")
        except OSError as e:
            bio.complete(e.errno or errno.EIO)
            return
        except Exception:               # a malformed bio: fail it, never leave it hanging
            log.exception("%s: %r failed", self.name, bio)
            bio.complete(errno.EIO)
            return
        bio.complete(0)

    def _check_writable(self):
        if self.readonly:
            raise OSError(errno.EROFS, strerror(errno.EROFS))

    def __repr__(self):
        return f"<{type(self).__name__} {self.name} {self.size} bytes>"


def file_identity(st):
    """What a file *is*, whatever it was called: a block device by its
    device number, anything else by device and inode."""
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return ("file", st.st_dev, st.st_ino)


class FileStore(Store):
    """A plain or sparse image file (or a block device node)."""

    def __init__(self, path: str, readonly: bool = False):
        self.path = os.path.abspath(path)
        self.name = self.path
        self.readonly = readonly
        flags = (os.O_RDONLY if readonly else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            mode = "read-only" if readonly else "read-write"
            raise PydmError(f"cannot open {path} {mode}: {strerror(e.errno)}",
                            e.errno) from None
        st = os.fstat(self.fd)
        self.is_file = stat.S_ISREG(st.st_mode)
        if not (self.is_file or stat.S_ISBLK(st.st_mode)):
            os.close(self.fd)
            raise PydmError(f"{path}: not a regular file or block device", errno.EINVAL)
        self.key = file_identity(st)
        self.nowait = _RWF_NOWAIT is not None     # False once the kernel refused it
        self.refresh_size()

    def refresh_size(self) -> int:
        self.size = os.lseek(self.fd, 0, os.SEEK_END)
        return self.size

    def capabilities(self) -> Caps:
        # The page cache is volatile: fdatasync makes it durable (FUA is a
        # write and an fdatasync).  A regular file zeroes and deallocates
        # with fallocate, without writing; a block device node is zeroed by
        # writing, and its discard is only a hint.
        return Caps(readonly=self.readonly, flush=True, fua=True, discard=True,
                    write_zeroes=True, fast_zero=self.is_file, extents=True)

    def readinto_at(self, buf, offset):
        fd = self.fd
        want = len(buf)
        got = os.preadv(fd, [buf], offset)
        while got < want:
            mv = memoryview(buf)[got:]
            n = os.preadv(fd, [mv], offset + got)
            if n == 0:
                # Past the end of a file that shrank under us: reads as zeroes,
                # like a hole, rather than returning stale buffer contents.
                mv[:] = bytes(len(mv))
                return
            got += n

    def read_nowait(self, bio):
        # One preadv2(RWF_NOWAIT) answers from the page cache.  What it
        # could not read goes to the calling thread's ring (the NBD reader's
        # io_uring) and completes there later; without a ring the bio fails
        # with EAGAIN, for its submitter to retry where blocking is fine.
        if not self.nowait:
            return None
        buf = bio.data
        offset = bio.sector << 9
        ring = _aio.current()
        got = 0
        if ring is None or ring.probe():
            try:
                got = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            except BlockingIOError:
                pass
            except OSError as e:
                if e.errno == errno.EOPNOTSUPP:
                    self.nowait = False             # this file system cannot say
                    return None
                return e.errno or errno.EIO
            if got == len(buf):
                if ring is not None:
                    ring.probed(True)
                return 0
            if ring is None:
                return errno.EAGAIN
            ring.probed(False)
        rest = memoryview(buf)[got:] if got else buf
        ring.read(self.fd, rest, offset + got, self._ring_done, (bio, rest, offset + got))
        return QUEUED

    def _ring_done(self, arg, res):
        bio, rest, offset = arg
        if res < 0:
            bio.complete(-res)
            return
        if res < len(rest):
            # Short: past the end of a file that shrank (zeroes), or a
            # partial read; the plain path finishes it.
            try:
                self.readinto_at(memoryview(rest)[res:], offset + res)
            except OSError as e:
                bio.complete(e.errno or errno.EIO)
                return
        bio.complete(0)

    def read_at(self, offset, length):
        # one pread, no bytearray round trip: metadata reads are many and small
        data = os.pread(self.fd, length, offset)
        if len(data) == length:
            return data
        return Store.read_at(self, offset, length)

    def write_at(self, offset, data):
        fd = self.fd
        n = os.pwrite(fd, data, offset)
        want = len(data)
        while n < want:
            n += os.pwrite(fd, memoryview(data)[n:], offset + n)

    gathers = True

    def write_gather_at(self, offset, bufs):
        # one pwritev per IOV_MAX buffers, the copies in the kernel, the GIL
        # released; a subclass that wraps write_at still sees every write
        if type(self).write_at is not FileStore.write_at:
            return Store.write_gather_at(self, offset, bufs)
        fd = self.fd
        for i in range(0, len(bufs), _IOV_MAX):
            part = bufs[i:i + _IOV_MAX]
            want = sum(map(len, part))
            n = os.pwritev(fd, part, offset)
            if n < want:                # short: the rest piece by piece
                pos = offset
                for b in part:
                    end = pos + len(b)
                    if end > offset + n:
                        skip = max(0, offset + n - pos)
                        self.write_at(pos + skip, memoryview(b)[skip:])
                    pos = end
            offset += want

    def flush(self):
        os.fdatasync(self.fd)

    def discard(self, offset, length):
        if not self.is_file:
            return  # a hint only: contents after discard are undefined
        try:
            _fallocate_or_raise(self.fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                                offset, length)
        except OSError as e:
            if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def write_zeroes(self, offset, length, may_unmap=True, fallback=True):
        if self.is_file:
            modes = []
            if may_unmap:
                modes.append(_FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE)
            modes.append(_FALLOC_FL_ZERO_RANGE | _FALLOC_FL_KEEP_SIZE)
            for mode in modes:
                try:
                    _fallocate_or_raise(self.fd, mode, offset, length)
                    return
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                        raise
        Store.write_zeroes(self, offset, length, may_unmap, fallback)

    def extents(self, offset, length):
        """Data/hole runs from SEEK_DATA/SEEK_HOLE (a hole reads as zeroes)."""
        end = min(offset + length, self.size)
        if offset >= end:
            return [(length, 0)]
        if not self.is_file:
            return [(end - offset, 0)]
        out = []
        pos = offset
        fd = self.fd
        while pos < end:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:      # no data after pos: all hole
                    data = end
                else:
                    return out or [(end - offset, 0)]
            if data > pos:
                out.append((min(data, end) - pos, EXTENT_HOLE | EXTENT_ZERO))
                pos = min(data, end)
                continue
            try:
                hole = os.lseek(fd, pos, os.SEEK_HOLE)
            except OSError:
                hole = end
            hole = min(max(hole, pos + 1), end)
            out.append((hole - pos, 0))
            pos = hole
        return out

    def close(self):
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def hold_for_writing(self) -> None:
        """The file's exclusive advisory lock (flock), held until it is
        closed (or the process dies, even by kill -9): a second daemon or
        offline tool that would write it through pydm is refused, instead
        of both writing metadata each believes its own.  Readers take no
        lock: a backup may read a live device's files."""
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PydmError(f"{self.path} is in use: another process writes it through "
                            f"pydm (a daemon or a tool), and two writers would damage it",
                            errno.EBUSY) from None
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise       # (a filesystem without flock: go on unlocked)


class MemStore(Store):
    """An in-memory store: for tests and for measuring the router alone."""

    def __init__(self, size: int, name: str = "mem", readonly: bool = False):
        self.buf = bytearray(size)
        self.size = size
        self.name = name
        self.readonly = readonly

    def readinto_at(self, buf, offset):
        n = len(buf)
        buf[:] = self.buf[offset:offset + n]

    def write_at(self, offset, data):
        n = len(data)
        if offset + n > self.size:
            raise OSError(errno.ENOSPC, strerror(errno.ENOSPC))
        self.buf[offset:offset + n] = data

    def discard(self, offset, length):
        self.buf[offset:offset + length] = bytes(length)

    def write_zeroes(self, offset, length, may_unmap=True, fallback=True):
        self.buf[offset:offset + length] = bytes(length)


class CountingStore:
    """Wraps a store's byte face, counting writes and flushes; with ``budget``
    it silently drops every write after the first ``budget`` (the disk as a
    power cut leaves it).  For crash tests and I/O accounting.

    A write is counted (and cut) per 4 KiB block, so a multi-block write can
    be torn between blocks, as a power cut may tear it."""

    UNIT = 4096

    def __init__(self, inner, budget=None):
        self.inner = inner
        self.size = inner.size
        self.budget = budget
        self.writes = 0
        self.flushes = 0

    def read_at(self, offset, length):
        return self.inner.read_at(offset, length)

    def write_at(self, offset, data):
        unit = self.UNIT
        mv = memoryview(data)
        for pos in range(0, max(len(mv), 1), unit):
            self.writes += 1
            if self.budget is None or self.writes <= self.budget:
                self.inner.write_at(offset + pos, mv[pos:pos + unit])

    def flush(self):
        self.flushes += 1
        self.inner.flush()
