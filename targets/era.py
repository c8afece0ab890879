"""era: changed-block tracking with Linux dm-era metadata.

``era <metadata store> <origin store> <block size in sectors>``

Maps 1:1 onto the origin.  Every write-direction bio to an era block not yet
marked in the current era is held until the mark is committed to the
metadata; only then does it go to the origin, so after a crash every
acknowledged write is recorded.  Marks are batched by one worker thread
(``pydm.worker``): all writes that arrive while a commit runs share the next
one, and after a commit the worker waits (at most as long as that commit
took) for the writes it released to come back, so one commit carries a
client's whole queue; while it runs, an issuer thread sends the last batch
on.  Reads, flushes and writes to marked blocks pass straight through.

This module is the target: arguments, the fast path, suspend/resume,
messages, status and the NBD contexts.  What runs on the worker (the
metadata, marks, recovery, the digest) is ``era_tracker``.

Rules of this module:

* The worker thread is the only code that touches the metadata object;
  every other thread (messages, status, NBD block status) hands it a call
  (``worker.call``) and waits for the result.  The issuer thread only sends
  committed bios on to the origin.
* ``map`` takes a write through only on a mark ``committed`` already holds;
  else it queues the bio with ``worker.add`` (a lock and an append, nothing
  more per bio).
* ``checkpoint`` and ``take_metadata_snap`` first quiesce the device (no
  write in flight, new ones held), so a write that passed the fast path
  before the switch has landed before the new era starts (the dm-era review
  race).
* Metadata is opened at construction (to validate it) and again at the first
  preresume, after any previous table over the same metadata has committed
  and gone.
* Trace events (for the era_drain and era_commit monitors, docs/rv/), keyed
  by ``id(tracker)`` since tables are reloaded under one device name:
  ``era_init`` (dev, key, nr_blocks) at construction, ``era_write`` (dev,
  key, bio, first, end) just before a write goes to the origin (its
  completion is the core's ``clone_complete`` of that bio),
  ``era_checkpoint_begin`` (dev, key, op) inside the quiesce before the
  change, ``era_checkpoint_done`` (dev, key, op, ok) after its commit,
  ``era_dtr`` (dev, key); the tracker adds the commits and resets of marks.

Failures: see ``era_tracker`` (a failed change goes back to the last
commit; only metadata that cannot be read back stops writes to unmarked
blocks, and status says ``Error``, until the table is reloaded).

Messages: ``checkpoint``, ``take_metadata_snap``, ``drop_metadata_snap`` (as
the kernel), plus pydm's ``changed_since <era> [snapshot]`` (JSON) for the CLI.
Status: ``<metadata block size> <used>/<total> <current era> <snapshot|->``.
NBD: one ``qemu:dirty-bitmap:era-since-<N>`` context per era N, dirty = the
block was written in era N or later.
"""

import errno
import json
import logging
import re

from pydm import trace
from pydm.bio import FLUSH, READ
from pydm.devio import DeviceBytes
from pydm.errors import PydmError, TargetError
from pydm.table import quote_arg
from pydm.target import NOWAIT, REMAPPED, STATUS_TABLE, SUBMITTED, Target, parse_uint
from pydm.targets.era_tracker import METADATA_BLOCK_SECTORS, EraTracker, open_metadata
from pydm.targets.linear import area_block_status

log = logging.getLogger("pydm.era")

MAX_BLOCKS = 1 << 31
CONTEXT_PREFIX = "qemu:dirty-bitmap:era-since-"
_CONTEXT_RE = re.compile(r"^qemu:dirty-bitmap:era-since-(\d{1,10})$")


class EraTarget(Target):
    name = "era"
    version = (1, 0, 0)
    description = "changed-block tracking (dm-era metadata)"
    features = NOWAIT     # reads are remapped as they are

    def ctr(self, args):
        self.tracker = None
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
        self.meta = self.ctx.get_device(args[0], role="metadata", exclusive=True)
        if not hasattr(self.meta, "read_at"):      # a pydm device: its byte face
            self.meta = DeviceBytes(self.meta, "metadata")
        self.origin = self.ctx.get_device(args[1], role="origin", area=(0, self.len))
        if self.origin.size < self.len << 9:
            raise TargetError(f"origin {args[1]} is too small: {self.origin.size >> 9} "
                              f"sectors for a {self.len}-sector target")
        try:
            open_metadata(self.meta, self.block_size, self.nr_blocks).close()
        except PydmError as e:
            raise TargetError(f"metadata {args[0]}: {e}", e.errno) from None
        except OSError as e:
            raise TargetError(f"metadata {args[0]}: {e.strerror}", e.errno) from None
        # Unlike the kernel, no split at era block boundaries: map() marks
        # every block a bio covers, so a 1 MiB write stays one bio.
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1
        self.tracker = EraTracker(self.ctx, self.meta, self.block_size, self.nr_blocks,
                                  send=self._submit_all)
        self.worker = self.tracker.worker
        self.committed = self.tracker.committed      # read by the fast path
        self._defer = self.worker.add
        self._status_cache = "Error"
        if trace.on.era_init:
            trace.emit("era_init", dev=self._dev_name(), key=id(self.tracker),
                       nr_blocks=self.nr_blocks)

    def _dev_name(self):
        dev = self.ctx.device
        return dev.name if dev is not None else None

    def _submit_all(self, bios):
        submit = self.origin.submit
        for b in bios:
            if trace.on.era_write:
                first, end = b.private
                trace.emit("era_write", dev=self._dev_name(), key=id(self.tracker), bio=b.id,
                           first=first, end=end)
            submit(b)

    @property
    def digesting(self) -> bool:
        """Archived writesets wait to be folded into the era array."""
        return self.worker.stepping

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
            if trace.on.era_write:
                trace.emit("era_write", dev=self.ctx.device.name, key=id(self.tracker),
                           bio=bio.id, first=first, end=end)
            return REMAPPED
        bio.private = (first, end)
        self._defer(bio)
        if trace.on.era_defer:
            trace.emit("era_defer", dev=self.ctx.device.name, block=first, blocks=end - first)
        return SUBMITTED

    # ----------------------------------------------------- suspend/resume
    def _change(self, fn):
        """Run the metadata change ``fn`` on the worker (see EraTracker.change)."""
        return self.worker.call(self.tracker.change, fn)

    def preresume(self):
        self.worker.start()
        # a failed resize or rollover leaves nothing half-done for the next try
        self._status_cache = self._change(self.tracker.preresume)

    def postsuspend(self):
        if self.tracker.md is not None and not self.tracker.failed:
            try:
                self._change(self.tracker.archive)
            except Exception as e:
                # back at the last commit: the writeset stays current, and
                # the resume's rollover archives it (or says why it cannot)
                log.error("era: archive on suspend failed: %s", e)

    def dtr(self):
        if self.tracker is not None:         # None if the constructor failed early
            self.worker.stop()
            self.tracker.close()
            if trace.on.era_dtr:
                trace.emit("era_dtr", dev=self._dev_name(), key=id(self.tracker))

    # ------------------------------------------------------------ control
    def message(self, argv):
        cmd = argv[0].lower()
        if cmd in ("checkpoint", "take_metadata_snap", "drop_metadata_snap") and len(argv) != 1:
            raise TargetError(f"{cmd} takes no arguments")
        if self.tracker.md is None:
            raise TargetError("era target is not active", errno.EINVAL)
        if cmd in ("checkpoint", "take_metadata_snap"):
            with self.ctx.quiesce():
                if trace.on.era_checkpoint_begin:
                    trace.emit("era_checkpoint_begin", dev=self._dev_name(),
                               key=id(self.tracker), op=cmd)
                ok = False
                try:
                    self._change(self.tracker.rollover if cmd == "checkpoint"
                                 else self.tracker.take_snap)
                    ok = True
                finally:
                    if trace.on.era_checkpoint_done:
                        trace.emit("era_checkpoint_done", dev=self._dev_name(),
                                   key=id(self.tracker), op=cmd, ok=ok)
            self.ctx.event()
            return None
        if cmd == "drop_metadata_snap":
            self._change(self.tracker.drop_snap)
            self.ctx.event()
            return None
        if cmd == "changed_since":
            if len(argv) not in (2, 3) or (len(argv) == 3 and argv[2] != "snapshot"):
                raise TargetError("usage: changed_since <era> [snapshot]")
            since = parse_uint(argv[1], "era", 1 << 32)
            return json.dumps(self.worker.call(self.tracker.changed, since, len(argv) == 3))
        raise TargetError(f"unrecognised message {argv[0]!r}", errno.EINVAL)

    def status(self, type_):
        if type_ == STATUS_TABLE:
            return f"{quote_arg(self.meta.ref)} {quote_arg(self.origin.ref)} {self.block_size}"
        if self.tracker.failed or self.tracker.md is None:
            return "Error" if self.tracker.failed else self._status_cache
        try:
            self._status_cache = self.worker.call(self.tracker.status_line)
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
        if self.tracker.md is None:
            return []
        eras = self.worker.call(self.tracker.listed_eras)
        return [f"{CONTEXT_PREFIX}{e}" for e in eras]

    def accepts_context(self, name):
        m = _CONTEXT_RE.match(name)
        return m is not None and int(m.group(1)) < 1 << 32

    def block_status(self, context, sector, nr_sectors):
        """Runs of dirty (1) / clean (0) from ``sector``: dirty = the era block
        was written in era N or later, N from ``...era-since-N``."""
        if context == "base:allocation":
            return area_block_status(self.origin, context, sector - self.begin, nr_sectors)
        m = _CONTEXT_RE.match(context)
        if m is None or self.tracker.md is None:
            return [(nr_sectors, 0)]
        dirty = self.worker.call(self.tracker.dirty_map, int(m.group(1)))
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


TARGET = EraTarget
