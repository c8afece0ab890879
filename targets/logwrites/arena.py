"""Memory for small records: carved one after another out of reused chunks.

A small write's record (its header sector and payload, a few KiB) lives
from the write's submit until the log has it, which is the next flush:
up to the target's bound (hundreds of MiB) of them at a time.  Each as a bytes of its own, that memory is
given back to the system when a flush logs them and taken again, a page
fault at a time, for the next ones (measured: 0.6 us a record when they are
freed at once, 3.4 us when 64 MiB of them are held, nearly all of it in the
page faults).  Here they are carved out of chunks that are kept and reused.

Rules of this module:

* ``take(n)`` returns (chunk, view): ``n`` bytes of a chunk, the next ones
  after the last record taken from it.  ``put(chunk)`` gives one record's
  bytes back; a chunk is reused once every record taken from it is back
  and a newer chunk has taken over.  Every take is put back exactly once,
  once nothing reads its view any more.
* One lock ("lw.arena"), a leaf: nothing else is taken while it is held.
* At most ``keep_bytes`` of free chunks are kept; a record longer than a
  chunk is refused (ValueError): callers keep big payloads elsewhere.
"""

from pydm.buffers import PoolBuffer
from pydm.lockdep import make_lock

CHUNK = 1 << 20


class _Chunk:
    __slots__ = ("mem", "pos", "live", "retired")

    def __init__(self, size):
        self.mem = PoolBuffer(size).write_view(size)
        self.pos = 0          # the next free byte
        self.live = 0         # records taken and not yet put back
        self.retired = False  # a newer chunk is being carved


class Arena:
    def __init__(self, keep_bytes, chunk=CHUNK):
        self.chunk = chunk
        self._keep = max(1, keep_bytes // chunk)
        self._free = []
        self._cur = None
        self._lock = make_lock("lw.arena")

    def take(self, n):
        if n > self.chunk:
            raise ValueError(f"{n} bytes do not fit a {self.chunk}-byte chunk")
        with self._lock:
            c = self._cur
            if c is None or c.pos + n > self.chunk:
                if c is not None:
                    c.retired = True
                    if not c.live:
                        self._recycle(c)
                c = self._cur = self._free.pop() if self._free else _Chunk(self.chunk)
            p = c.pos
            c.pos = p + n
            c.live += 1
        return c, c.mem[p:p + n]

    def put(self, c) -> None:
        with self._lock:
            c.live -= 1
            if not c.live and c.retired:
                self._recycle(c)

    def _recycle(self, c) -> None:
        if len(self._free) < self._keep:
            c.pos, c.retired = 0, False
            self._free.append(c)

    @property
    def chunks_free(self) -> int:
        return len(self._free)
