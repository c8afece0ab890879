"""era: changed-block tracking with Linux dm-era metadata.

``era <metadata store> <origin store> <block size in sectors>``

Maps 1:1 onto the origin.  Every write-direction bio to an era block not yet
marked in the current era is held until the mark is committed to the
metadata; only then does it go to the origin, so after a crash every
acknowledged write is recorded.  Marks are batched by one worker thread: all
writes that arrive while a commit runs share the next one, and after a commit
the worker waits (at most as long as that commit took) for the writes it
released to come back, so one commit carries a client's whole queue; while
it runs, an issuer thread sends the last batch on.  Reads, flushes and writes
to marked blocks pass straight through.

Rules of this module:

* The worker thread is the only code that touches the metadata object; every
  other thread (messages, status, NBD block status) hands it a call and waits
  for the result, which is stored before the waiter is woken.  The issuer
  thread only sends committed bios on to the origin.
* ``committed`` is the in-memory copy of the current writeset *as committed*:
  a bit is set only after the commit that wrote it, so the fast path never
  lets a write through on an uncommitted mark.
* ``checkpoint`` and ``take_metadata_snap`` first quiesce the device (no
  write in flight, new ones held), so a write that passed the fast path
  before the switch has landed before the new era starts (the dm-era review
  race).  ``QUIESCE = False`` exists for the test that shows the race.
* Metadata is opened at construction (to validate it) and again at the first
  preresume, after any previous table over the same metadata has committed
  and gone.

A metadata change that fails part-way (out of space, an I/O error) goes
back to the last commit: a message fails with the reason (and, when the
metadata is full, what frees it), a batch of marks fails its writes with
EIO, and the device goes on; only metadata that cannot be read back stops
writes to unmarked blocks until the table is reloaded.

Archived writesets are folded into the era array by the worker, one step
per round, each committed; not while a metadata snapshot is held (it would
keep a second copy of every era array block rewritten).

Messages: ``checkpoint``, ``take_metadata_snap``, ``drop_metadata_snap`` (as
the kernel), plus pydm's ``changed_since <era> [snapshot]`` (JSON) for the CLI.
Status: ``<metadata block size> <used>/<total> <current era> <snapshot|->``.
NBD: one ``qemu:dirty-bitmap:era-since-<N>`` context per era N, dirty = the
block was written in era N or later.
"""

import errno
import json
import logging
import queue
import re
import threading
import time

from bitarray import bitarray

from pydm import trace
from pydm.bio import FLUSH, READ
from pydm.errors import PydmError, TargetError
from pydm.lockdep import make_condition
from pydm.table import quote_arg
from pydm.target import REMAPPED, STATUS_TABLE, SUBMITTED, Target, parse_uint
from pydm.targets.linear import area_block_status

log = logging.getLogger("pydm.era")

METADATA_BLOCK_SECTORS = 8
MAX_BLOCKS = 1 << 31
CONTEXT_PREFIX = "qemu:dirty-bitmap:era-since-"
_CONTEXT_RE = re.compile(r"^qemu:dirty-bitmap:era-since-(\d{1,10})$")


def _open_metadata(store, block_size, nr_blocks):
    # Imported here: the metadata library (numpy) is only needed by tables
    # that use era.
    from pydm.metadata import era_md
    store.refresh_size()             # the file may have grown since it was opened
    if (era_md.is_blank(store)
            and era_md.usable_blocks(store) < era_md.metadata_blocks_wanted(nr_blocks)):
        # It might format, but run out of space at a checkpoint or a digest,
        # and the target would then fail writes.  (Metadata made elsewhere
        # is taken as it is, as the kernel does.)
        raise era_md.MetadataError(f"too small for {nr_blocks} era blocks ({store.size} "
                                   f"bytes): {era_md.space_advice(nr_blocks)}", errno.ENOSPC)
    md = era_md.EraMetadata.open_or_format(store, block_size, nr_blocks)
    # preresume takes in blocks the file has gained (grow_to_store)
    total = max(md.metadata_usage()[1], era_md.usable_blocks(store))
    if md.nr_blocks < nr_blocks and total < era_md.metadata_blocks_wanted(nr_blocks):
        # growing would run out of space at the resume that resizes it
        md.close()
        raise era_md.MetadataError(f"too small to grow from {md.nr_blocks} to {nr_blocks} "
                                   f"era blocks ({total} metadata blocks): "
                                   f"{era_md.space_advice(nr_blocks)}", errno.ENOSPC)
    return md


class _Call:
    __slots__ = ("fn", "args", "result", "error", "done")

    def __init__(self, fn, args):
        self.fn = fn
        self.args = args
        self.result = None
        self.error = None
        self.done = threading.Event()


class EraTarget(Target):
    name = "era"
    version = (1, 0, 0)
    description = "changed-block tracking (dm-era metadata)"

    # Test switch: without the quiesce, checkpoint shows the 2014 review race.
    QUIESCE = True

    def ctr(self, args):
        self.md = None
        self._thread = None
        self._issuer = None
        if len(args) != 3:
            raise TargetError("Invalid argument count")
        bs = args[2]
        if not bs.isascii() or not bs.isdigit() or int(bs) >= 1 << 32:
            raise TargetError(f"Invalid block size: {bs!r}")
        self.block_size = int(bs)
        if self.block_size == 0 or self.block_size % METADATA_BLOCK_SECTORS:
            raise TargetError(f"Invalid block size {self.block_size}: it must be a non-zero "
                              f"multiple of {METADATA_BLOCK_SECTORS} sectors")
        self.nr_blocks = -(-self.len // self.block_size)
        if self.nr_blocks >= MAX_BLOCKS:
            raise TargetError(f"too many era blocks ({self.nr_blocks}); use a larger block size")
        self.meta_arg, self.origin_arg = args[0], args[1]
        self.meta = self.ctx.get_device(args[0], role="metadata", exclusive=True)
        if not hasattr(self.meta, "read_at"):
            raise TargetError("the metadata store must be an image file")
        self.origin = self.ctx.get_device(args[1], role="origin", area=(0, self.len))
        if self.origin.size < self.len << 9:
            raise TargetError(f"origin {args[1]} is too small: {self.origin.size >> 9} "
                              f"sectors for a {self.len}-sector target")
        try:
            md = _open_metadata(self.meta, self.block_size, self.nr_blocks)
            md.close()
        except PydmError as e:
            raise TargetError(f"metadata {args[0]}: {e}", e.errno) from None
        except OSError as e:
            raise TargetError(f"metadata {args[0]}: {e.strerror}", e.errno) from None
        # Unlike the kernel, no split at era block boundaries: map() marks
        # every block a bio covers, so a 1 MiB write stays one bio.
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1
        self.committed = bitarray(self.nr_blocks)
        self.committed.setall(0)
        self.failed = None
        self._cond = make_condition(name="target")
        self._deferred = []
        self._wake_at = 1            # deferred writes that wake the worker
        self._expect = 0             # deferred writes that make a full batch
        self._commit_time = 0.0      # how long that commit took (s)
        self._calls = []
        self._stop = False
        self._digest_pending = False
        self.generation = 0          # bumps on every mark/era change (cache key)
        self._status_cache = "Error"
        self._dirty_cache = None

    # ------------------------------------------------------------- worker
    def _start_worker(self):
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._run, name="pydm-era", daemon=True)
            self._thread.start()

    def _stop_worker(self):
        t = self._thread
        if t is None:
            return
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        t.join()
        self._thread = None
        if self._issuer is not None:       # after the worker: it feeds the issuer
            self._issue_q.put(None)
            self._issuer.join()
            self._issuer = None

    def _issue(self, bios):
        """Send committed bios to the origin.  With more bios already
        waiting, a second thread does it, so their commit overlaps these
        writes and their replies (4 KiB first writes at QD16: the worker
        spent ~1/5 of each round on origin writes; 18k -> 22k IOPS)."""
        if not self._deferred:
            self._submit_all(bios)
            return
        if self._issuer is None:
            self._issue_q = queue.SimpleQueue()
            self._issuer = threading.Thread(target=self._run_issuer, name="pydm-era-issue",
                                            daemon=True)
            self._issuer.start()
        self._issue_q.put(bios)

    def _submit_all(self, bios):
        submit = self.origin.submit
        for b in bios:
            submit(b)

    def _run_issuer(self):
        get = self._issue_q.get
        while True:
            bios = get()
            if bios is None:
                return
            self._submit_all(bios)

    def _run(self):
        cond = self._cond
        while True:
            with cond:
                while not (self._deferred or self._calls or self._stop
                           or self._digest_pending):
                    cond.wait()
                if self._deferred and self._expect:
                    self._gather()
                bios, self._deferred = self._deferred, []
                calls, self._calls = self._calls, []
                stop = self._stop
            if bios:
                self._process_writes(bios)
            for call in calls:
                try:
                    call.result = call.fn(*call.args)
                except BaseException as e:       # handed to the caller, never lost
                    call.error = e
                call.done.set()
            if stop:
                return
            # one digest step per round, even under load (as the
            # kernel's worker), so old eras never pile up in the metadata
            if self._digest_pending:
                self._digest_some()

    def _gather(self):
        """Group commit.  The writes the last commit released come back as
        their clients' next requests; wait for as many as it released, but
        never longer than that commit took, so one commit carries the whole
        queue.  Committing at once instead splits the queue into two halves
        that take turns (each waits for the other's commit), and a bounded
        wait costs no more than that.  4 KiB first writes at QD16: 25.4k vs
        21.7k IOPS (medians of 4 interleaved runs).  A suspend or checkpoint
        may wait for a gathering batch as for one being committed.  Called
        with ``_cond`` held."""
        want, self._expect = self._expect, 0
        deadline = time.monotonic() + self._commit_time
        self._wake_at = want         # map() wakes us only when all are here
        try:
            while len(self._deferred) < want and not (self._calls or self._stop):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        finally:
            self._wake_at = 1

    def _call(self, fn, *args):
        """Run fn in the worker and return its result (or raise its error)."""
        if self._thread is None or self._thread is threading.current_thread():
            return fn(*args)
        call = _Call(fn, args)
        with self._cond:
            self._calls.append(call)
            self._cond.notify()
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.result

    def _process_writes(self, bios):
        md = self.md
        committed = self.committed
        new = [b.private for b in bios if committed.find(0, *b.private) >= 0]
        if new:
            t0 = time.monotonic()
            try:
                if self.failed:
                    raise OSError(errno.EIO, self.failed)
                for first, end in new:
                    md.mark_range(first, end)
                md.commit()
            except Exception as e:
                # as the kernel: these writes fail; the metadata goes back to
                # its last commit and the next batch tries again
                self._back_to_last_commit(f"metadata commit failed: {e}")
                for b in bios:
                    b.complete(errno.EIO)
                return
            for first, end in new:
                committed[first:end] = 1
            self.generation += 1
            self._commit_time = time.monotonic() - t0
            # what waits now, and these writes' successors
            self._expect = len(self._deferred) + len(bios)
        self._issue(bios)

    def _back_to_last_commit(self, why):
        """After a metadata change failed part-way (out of space, an I/O
        error): drop what it left in memory and read the metadata back as
        last committed, so the device carries on as before it.  ``committed``
        is taken from what was read, which is right whichever side of its
        superblock write the failure fell.  Runs in the worker."""
        log.error("era: %s; back to the last commit", why)
        from pydm.metadata.era_md import EraMetadata
        try:
            md = EraMetadata.open(self.meta)
        except Exception as e:
            # the old object stays (other threads may look at it); writes
            # see ``failed`` before they would touch it
            self._fail(f"{why}; the metadata cannot be read back: {e}")
            return
        old, self.md = self.md, md
        if old is not None:
            old.close()
        bits = md.current_bits
        self.committed.setall(0)
        if bits is not None:
            n = min(md.sb.ws_nr_bits, self.nr_blocks)
            self.committed[:n] = bits[:n]
        self.generation += 1

    def _change(self, fn):
        """Run the metadata change ``fn`` (a message) in the worker; if it
        fails part-way, go back to the last commit and say why, with what
        to do when the metadata is full."""
        try:
            return fn()
        except TargetError:
            raise
        except Exception as e:
            self._back_to_last_commit(f"{fn.__name__.strip('_')} failed: {e}")
            why = str(e) if isinstance(e, PydmError) else (e.strerror or str(e))
            code = getattr(e, "errno", None) or errno.EIO
            if code == errno.ENOSPC:
                snap = self.md is not None and self.md.snapshot_block is not None
                why += ("; drop the metadata snapshot to free space, or" if snap else ";") + \
                    " make the metadata file bigger (taken in at the next resume)"
            raise TargetError(why, code) from None

    def _fail(self, why):
        if not self.failed:
            self.failed = why
            log.error("era: %s; the target fails writes to unmarked blocks until reloaded", why)
            self.ctx.event()

    def _digest_some(self):
        if self.md.snapshot_block is not None:
            # A held snapshot shares the era array, so every block a digest
            # rewrote would be kept twice: as much again as the era array
            # (the writeset taken with the snapshot often touches most of
            # it).  The writesets wait in the tree, answering queries as
            # well, and the digest goes on after drop_metadata_snap.
            with self._cond:
                self._digest_pending = False
            return
        try:
            more = self.md.digest_step(1)
            self.md.commit()
        except Exception as e:
            # the writesets stay in the tree, answering as well; the next
            # rollover tries again
            self._back_to_last_commit(f"digest failed: {e}")
            more = False
        with self._cond:
            self._digest_pending = bool(more) and not self.failed

    def _kick_digest(self):
        with self._cond:
            self._digest_pending = True
            self._cond.notify()

    # ---------------------------------------------------------------- I/O
    def map(self, bio):
        bio.dev = self.origin
        if bio.nr_sectors == 0 or bio.op == FLUSH:
            return REMAPPED         # never compute a block from a flush (review lesson)
        rel = bio.sector - self.begin
        bio.sector = rel
        if bio.op == READ:
            return REMAPPED
        first = rel // self.block_size
        end = (rel + bio.nr_sectors - 1) // self.block_size + 1
        if self.committed.find(0, first, end) < 0:
            return REMAPPED
        bio.private = (first, end)
        with self._cond:
            self._deferred.append(bio)
            if len(self._deferred) >= self._wake_at:
                self._cond.notify()
        if trace.ENABLED:
            trace.emit("era_defer", dev=self.ctx.device.name, block=first, blocks=end - first)
        return SUBMITTED

    # ----------------------------------------------------- metadata steps
    def _open_md(self):
        if self.md is None:
            self.md = _open_metadata(self.meta, self.block_size, self.nr_blocks)

    def _rollover(self):
        self.md.checkpoint()
        self.md.commit()
        self.committed.setall(0)
        self.generation += 1
        self._kick_digest()

    def _archive(self):
        self.md.archive()
        self.md.commit()

    def _take_snap(self):
        if self.md.snapshot_block is not None:
            raise TargetError("a metadata snapshot already exists", errno.EINVAL)
        self._rollover()
        self.md.take_snapshot()
        self.md.commit()
        return self.md.snapshot_block

    def _drop_snap(self):
        if self.md.snapshot_block is None:
            raise TargetError("no metadata snapshot to drop", errno.EINVAL)
        self.md.drop_snapshot()
        self.md.commit()
        if self.md.has_archived():
            self._kick_digest()

    def _status_line(self):
        md = self.md
        used, total = md.metadata_usage()
        snap = md.snapshot_block
        return (f"{METADATA_BLOCK_SECTORS} {used}/{total} {md.current_era} "
                f"{snap if snap is not None else '-'}")

    # ----------------------------------------------------- suspend/resume
    def preresume(self):
        self._start_worker()
        # a failed resize or rollover leaves nothing half-done for the next try
        self._call(self._change, self._preresume_steps)

    def _preresume_steps(self):
        self._open_md()
        if not self.md.readonly and self.md.grow_to_store():
            log.info("era: metadata %s grew to %d blocks", self.meta.ref,
                     self.md.metadata_usage()[1])
        if self.md.nr_blocks != self.nr_blocks:
            self.md.resize(self.nr_blocks)
        self._rollover()
        self._status_cache = self._status_line()

    def postsuspend(self):
        if self.md is not None and not self.failed:
            try:
                self._call(self._change, self._archive)
            except Exception as e:
                # back at the last commit: the writeset stays current, and
                # the resume's rollover archives it (or says why it cannot)
                log.error("era: archive on suspend failed: %s", e)

    def dtr(self):
        if getattr(self, "_cond", None) is not None:
            self._stop_worker()
        md, self.md = getattr(self, "md", None), None
        if md is not None:
            md.close()

    # ------------------------------------------------------------ control
    def message(self, argv):
        cmd = argv[0].lower()
        if cmd in ("checkpoint", "take_metadata_snap", "drop_metadata_snap") and len(argv) != 1:
            raise TargetError(f"{cmd} takes no arguments")
        if self.md is None:
            raise TargetError("era target is not active", errno.EINVAL)
        if cmd == "checkpoint":
            with self._quiesce():
                self._call(self._change, self._rollover)
            self.ctx.event()
            return None
        if cmd == "take_metadata_snap":
            with self._quiesce():
                self._call(self._change, self._take_snap)
            self.ctx.event()
            return None
        if cmd == "drop_metadata_snap":
            self._call(self._change, self._drop_snap)
            self.ctx.event()
            return None
        if cmd == "changed_since":
            if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "snapshot"):
                raise TargetError("usage: changed_since <era> [snapshot]")
            since = parse_uint(argv[1], "era", 1 << 32)
            return json.dumps(self._call(self._changed, since, len(argv) == 3))
        raise TargetError(f"unrecognised message {argv[0]!r}", errno.EINVAL)

    def _quiesce(self):
        if self.QUIESCE:
            return self.ctx.quiesce()
        import contextlib
        return contextlib.nullcontext()

    def _changed(self, since, snapshot):
        md = self.md
        if snapshot and md.snapshot_block is None:
            raise TargetError("no metadata snapshot taken", errno.EINVAL)
        from pydm.metadata.era_xml import run_edges
        begins, ends = run_edges(md.changed_since(since, include_current=not snapshot,
                                                  snapshot=snapshot))
        runs = [[b, e] for b, e in zip(begins, ends)]
        return {
            "uuid": md.uuid_text,
            "since": since,
            "current_era": md.current_era,
            "snapshot": snapshot,
            "snapshot_block": md.snapshot_block,
            "block_size_sectors": self.block_size,
            "nr_blocks": self.nr_blocks,
            "blocks_changed": sum(e - b for b, e in runs),
            "ranges": runs,
        }

    def status(self, type_):
        if type_ == STATUS_TABLE:
            return f"{quote_arg(self.meta.ref)} {quote_arg(self.origin.ref)} {self.block_size}"
        if self.failed or self.md is None:
            return "Error" if self.failed else self._status_cache
        try:
            self._status_cache = self._call(self._status_line)
        except Exception:
            return "Error"
        return self._status_cache

    def iterate_devices(self):
        return [(self.origin, 0, self.len)]

    def io_hints(self, caps):
        # a write that covers whole era blocks waits for at most one commit
        caps.preferred_block = max(caps.preferred_block, self.block_size << 9)

    # ------------------------------------------------ NBD changed extents
    def contexts(self):
        if self.md is None:
            return []
        eras = self._call(self._listed_eras)
        return [f"{CONTEXT_PREFIX}{e}" for e in eras]

    def _listed_eras(self):
        cur = self.md.current_era
        return sorted({e for e in set(self.md.archived) | {1, cur - 1, cur} if 1 <= e <= cur})

    def accepts_context(self, name):
        m = _CONTEXT_RE.match(name)
        return m is not None and int(m.group(1)) < 1 << 32

    def block_status(self, context, sector, nr_sectors):
        """Runs of dirty (1) / clean (0) from ``sector``: dirty = the era block
        was written in era N or later, N from ``...era-since-N``."""
        if context == "base:allocation":
            return area_block_status(self.origin, context, sector - self.begin, nr_sectors)
        m = _CONTEXT_RE.match(context)
        if m is None or self.md is None:
            return [(nr_sectors, 0)]
        dirty = self._call(self._dirty_map, int(m.group(1)))
        bs = self.block_size
        pos = sector - self.begin
        end = pos + nr_sectors
        out = []
        while pos < end:
            blk = pos // bs
            state = dirty[blk]
            nxt = dirty.find(1 - state, blk)
            run_end = end if nxt < 0 else min(end, nxt * bs)
            out.append((run_end - pos, state))
            pos = run_end
        return out

    def _dirty_map(self, since):
        key = (since, self.generation, self.md.current_era)
        cached = self._dirty_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        bits = bitarray(endian="little")
        bits.pack(self.md.changed_since(since, include_current=True).tobytes())
        self._dirty_cache = (key, bits)
        return bits


TARGET = EraTarget
