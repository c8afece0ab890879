"""The log writer: records appended to the log device, in queue order, and
the super block's entry count kept trustworthy.

Rules of this module:

* One ``pydm.worker.Worker`` thread (lock class "lw.log") writes every
  record in the order it was queued, each at the next free log sector.  On
  a log on a file, a round's records go in one gathered write (pwritev of
  their headers and payloads, from where they are: the kernel copies
  them); on any other device small records are joined into writes of up to
  ``CHUNK`` bytes in reused staging buffers (``STAGES`` of them filled,
  written, filled again) and a big payload (in a pooled buffer) is written
  from there, up to 64 writes in flight.  Every record
  handed to the worker is released once its round is over, logged or not.
* The super block's ``nr_entries`` is rewritten after each round that
  logged a FLUSH, FUA or MARK entry (and when logging stops, and at the
  end), and only after a FLUSH of the log device made every entry it counts
  durable.  So after a crash of the daemon, or a power cut, the log is
  trustworthy up to its last flush, FUA or mark (pydm; the kernel writes the
  super after FUA and MARK entries only, and without a flush).
* Logging stops for good (``disabled`` says why) when the next entry would
  reach the end of the log device (the kernel's rule: an entry ending
  exactly at the end is refused too) or a write to the log fails.  Records
  queued after that are dropped; the client's I/O is not affected.
* Counters (``logged``, ``next_pos``, ``disabled``) are written by the
  worker thread only; other threads read them as they are.
"""

import logging

from pydm.buffers import BufferPool
from pydm.devio import IOFailed
from pydm.targets.logwrites import format as F
from pydm.worker import Worker

log = logging.getLogger("pydm.logwrites")

SUPER_FLAGS = F.FLUSH | F.FUA | F.MARK
CHUNK = 4 << 20          # small entries are joined into writes of up to this size
STAGES = 4               # staging buffers of CHUNK bytes written at once, then reused


class LogWriter:
    def __init__(self, name, log_io, sectorsize):
        self.name = name
        self.log = log_io                    # pydm.devio.DeviceIO
        self.ss = sectorsize
        self.log_sectors = log_io.size // sectorsize
        self.next_pos = 1                    # in log sectors; the super is sector 0
        self.logged = 0
        self.in_super = None                 # nr_entries last written to the super
        self.dropped = 0
        self.disabled = None                 # why logging stopped, or None
        self.log_failed = False              # a write to the log failed
        self._stages = BufferPool(keep_bytes=8 * STAGES * CHUNK)   # reused: no page faults
        self._gather = log_io.gathers        # small records in one pwritev (a file)
        self.worker = Worker(f"pydm-lw {name}", self._process, lock_class="lw.log")

    # ------------------------------------------------------------ control
    def start(self) -> None:
        """A new, empty log: the super says 0 entries (an older log's super
        must not vouch for what follows), then the worker starts."""
        self._write_super()
        self.worker.start()

    def add(self, records) -> None:
        """Queue records for the log, in order."""
        self.worker.add_many(records)

    def drain(self) -> None:
        """Until everything queued so far is written (and its super)."""
        self.worker.call(self._settle)

    def stop(self) -> None:
        """Write what is queued, settle the super, end the thread."""
        self.worker.stop()
        self._settle()

    @property
    def highest_sector(self) -> int:
        """The last allocated 512-byte sector (status' second field)."""
        return self.next_pos * self.ss // 512 - 1

    # ------------------------------------------------------ worker thread
    def _process(self, batch):
        try:
            if self.disabled is not None:
                self.dropped += len(batch)
                return None
            self._log(batch)
        finally:
            for rec in batch:
                rec.release()
        return None

    def _log(self, batch):
        ss = self.ss
        gather = self._gather
        writes, stages = [], []
        run, start = [], 0                      # small records side by side in the log
        view, base, used = None, 0, 0           # staging buffer (without gather)
        pos = self.next_pos
        count, flagged = self.logged, False
        for i, rec in enumerate(batch):
            nbytes = rec.nbytes
            if pos + nbytes // ss >= self.log_sectors:
                self.dropped += len(batch) - i
                self._disable(f"the log is full ({self.log_sectors} sectors of {ss} bytes)")
                break
            if gather:                            # header and payload: two more buffers
                if not run:
                    start = pos
                run.append(rec.head)
                if rec.payload is not None:
                    run.append(rec.payload)
            elif rec.payload is not None:
                if used:                          # the staged run ends here
                    writes.append((start * ss, view[base:base + used]))
                    base, used = base + used, 0
                writes.append((pos * ss, rec.head))        # from the record's own buffer
                writes.append(((pos + 1) * ss, rec.payload))
            else:
                if view is None or base + used + nbytes > CHUNK:
                    if used:
                        writes.append((start * ss, view[base:base + used]))
                    if len(stages) == STAGES and not self._write(writes, stages):
                        return
                    stage = self._stages.get(CHUNK)
                    stages.append(stage)
                    view, base, used = stage.write_view(CHUNK), 0, 0
                if not used:
                    start = pos
                view[base + used:base + used + nbytes] = rec.head
                used += nbytes
            pos += nbytes // ss
            count += 1
            flagged = flagged or bool(rec.flags & SUPER_FLAGS)
        if run and not self._end_run(run, start):
            return
        if used:
            writes.append((start * ss, view[base:base + used]))
        if not self._write(writes, stages):
            return
        self.next_pos, self.logged = pos, count
        if flagged or self.disabled is not None:
            self._settle()

    def _end_run(self, run, start) -> bool:
        """Write a run of small records with one gathered write (emptied);
        False when the log failed."""
        try:
            self.log.write_gather(start * self.ss, run)
        except IOFailed as e:
            self._fail(e)
            return False
        run.clear()
        return True

    def _write(self, writes, stages) -> bool:
        """Write ``writes`` (emptied), then give ``stages`` back (emptied);
        False when the log failed."""
        try:
            self.log.write_many(writes)
        except IOFailed as e:
            self._fail(e)
            return False
        finally:
            writes.clear()
            for stage in stages:
                self._stages.put(stage)
            stages.clear()
        return True

    def _settle(self) -> None:
        """Make the entries logged so far durable, then count them in the
        super block (nothing when it already does, or the log failed)."""
        if self.in_super == self.logged or self.log_failed:
            return
        try:
            self.log.flush()
            self._write_super()
        except IOFailed as e:
            self._fail(e)

    def _write_super(self) -> None:
        count = self.logged
        self.log.write(0, F.pack_super(count, self.ss))
        self.in_super = count

    def _fail(self, e: IOFailed) -> None:
        """The log device failed: nothing more is written to it at all."""
        self.log_failed = True
        self._disable(f"log {e}")

    def _disable(self, why: str) -> None:
        if self.disabled is None:
            self.disabled = why
            log.warning("log-writes %s: logging disabled: %s; I/O goes on unlogged; the "
                        "log replays up to its super block's count", self.name, why)
