"""era's worker side: the metadata, its committed marks, recovery, the
digest, era changes and the queries.

Rules of this module:

* Every method of ``EraTracker`` runs on the era worker thread
  (``pydm.worker``), the only code that touches the metadata object: as the
  worker's batch ``process`` (``process_writes``) and background ``step``
  (``digest_step``), or handed over by the target with ``worker.call``.
  Other threads only read ``committed`` (the target's fast path) and
  ``failed``.
* ``committed`` is the in-memory copy of the current writeset *as
  committed*: a bit is set only after the commit that wrote it, so the fast
  path never lets a write through on an uncommitted mark.  It is one
  bitarray for the tracker's life, changed in place.
* ``generation`` bumps on every mark or era change (the dirty-map cache key).
* Trace events (the era_commit monitor, docs/rv/era_commit.md), keyed by
  ``id(tracker)``: ``era_marks_committed`` (dev, key, ranges) right after a
  successful commit of marks and before ``committed`` shows them;
  ``era_rollover`` (dev, key, nr_blocks) once ``committed`` is cleared for a
  new era; ``era_marks_loaded`` (dev, key, nr_blocks, ranges) with what
  ``back_to_last_commit`` read, before ``committed`` is refilled from it.
  Ranges are (first, end) era-block runs, computed only when tracing.

A metadata change that fails part-way (out of space, an I/O error) goes
back to the last commit (``back_to_last_commit``): a message fails with the
reason (and, when the metadata is full, what frees it), a batch of marks
fails its writes with EIO, and the device goes on; only metadata that
cannot be read back sets ``failed``, which stops writes to unmarked blocks
until the table is reloaded.

Archived writesets are folded into the era array one step per worker
round, each committed; not while a metadata snapshot is held (it would
keep a second copy of every era array block rewritten).
"""

import errno
import logging
import time

from bitarray import bitarray

from pydm import trace
from pydm.errors import PydmError, TargetError
from pydm.worker import Worker

log = logging.getLogger("pydm.era")

METADATA_BLOCK_SECTORS = 8


def _runs(bits):
    """(first, end) runs of set bits (for trace events only)."""
    out = []
    pos = bits.find(1)
    while pos >= 0:
        end = bits.find(0, pos)
        if end < 0:
            end = len(bits)
        out.append((pos, end))
        pos = bits.find(1, end)
    return out


def open_metadata(store, block_size, nr_blocks):
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


class EraTracker:
    """The metadata of one era target and the worker that owns it.
    ``send(bios)`` passes committed writes on to the origin."""

    def __init__(self, ctx, meta, block_size, nr_blocks, send):
        self.ctx = ctx
        self.meta = meta
        self.block_size = block_size
        self.nr_blocks = nr_blocks
        self.md = None
        self.committed = bitarray(nr_blocks)
        self.committed.setall(0)
        self.failed = None
        self.generation = 0
        self._dirty_cache = None
        self.worker = Worker("pydm-era", self.process_writes, step=self.digest_step,
                             send=send, lock_class="target")

    def _dev_name(self):
        dev = self.ctx.device
        return dev.name if dev is not None else None

    def close(self):
        md, self.md = self.md, None
        if md is not None:
            md.close()

    # ----------------------------------------------------------- batches
    def process_writes(self, bios):
        """Mark and commit the era blocks of a batch of writes; the batch to
        send on, or None when the commit failed (the writes fail with EIO)."""
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
                self.back_to_last_commit(f"metadata commit failed: {e}")
                for b in bios:
                    b.complete(errno.EIO)
                return None
            if trace.on.era_marks_committed:
                # before the fast path can see the marks (the monitor's order)
                trace.emit("era_marks_committed", dev=self._dev_name(), key=id(self),
                           ranges=new)
            for first, end in new:
                committed[first:end] = 1
            self.generation += 1
            # what waits now, and these writes' successors, share the next one
            self.worker.note_commit(time.monotonic() - t0, len(bios))
        return bios

    def digest_step(self):
        """Fold one step of archived writesets into the era array; whether
        more is left."""
        if self.md.snapshot_block is not None:
            # A held snapshot shares the era array, so every block a digest
            # rewrote would be kept twice: as much again as the era array
            # (the writeset taken with the snapshot often touches most of
            # it).  The writesets wait in the tree, answering queries as
            # well, and the digest goes on after drop_metadata_snap.
            return False
        try:
            more = self.md.digest_step(1)
            self.md.commit()
        except Exception as e:
            # the writesets stay in the tree, answering as well; the next
            # rollover tries again
            self.back_to_last_commit(f"digest failed: {e}")
            more = False
        return bool(more) and not self.failed

    # ---------------------------------------------------------- recovery
    def back_to_last_commit(self, why):
        """After a metadata change failed part-way (out of space, an I/O
        error): drop what it left in memory and read the metadata back as
        last committed, so the device carries on as before it.  ``committed``
        is taken from what was read, which is right whichever side of its
        superblock write the failure fell."""
        log.error("era: %s; back to the last commit", why)
        from pydm.metadata.era_md import EraMetadata
        try:
            md = EraMetadata.open(self.meta)
        except Exception as e:
            # the old object stays (other threads may look at it); writes
            # see ``failed`` before they would touch it
            self.fail(f"{why}; the metadata cannot be read back: {e}")
            return
        old, self.md = self.md, md
        if old is not None:
            old.close()
        bits = md.current_bits
        if trace.on.era_marks_loaded:
            # before the fast path can see them (the monitor's order)
            n = min(md.sb.ws_nr_bits, self.nr_blocks) if bits is not None else 0
            trace.emit("era_marks_loaded", dev=self._dev_name(), key=id(self),
                       nr_blocks=self.nr_blocks, ranges=_runs(bits[:n]) if n else [])
        self.committed.setall(0)
        if bits is not None:
            n = min(md.sb.ws_nr_bits, self.nr_blocks)
            self.committed[:n] = bits[:n]
        self.generation += 1

    def change(self, fn):
        """Run the metadata change ``fn`` (a message, a resume step); if it
        fails part-way, go back to the last commit and say why, with what
        to do when the metadata is full."""
        try:
            return fn()
        except TargetError:
            raise
        except Exception as e:
            self.back_to_last_commit(f"{fn.__name__.strip('_')} failed: {e}")
            why = str(e) if isinstance(e, PydmError) else (e.strerror or str(e))
            code = getattr(e, "errno", None) or errno.EIO
            if code == errno.ENOSPC:
                snap = self.md is not None and self.md.snapshot_block is not None
                why += ("; drop the metadata snapshot to free space, or" if snap else ";") + \
                    " make the metadata file bigger (taken in at the next resume)"
            raise TargetError(why, code) from None

    def fail(self, why):
        if not self.failed:
            self.failed = why
            log.error("era: %s; the target fails writes to unmarked blocks until reloaded", why)
            self.ctx.event()

    # ------------------------------------------------------ era changes
    def preresume(self):
        """Open (once), take in a grown file, resize, start the next era;
        the status line after."""
        if self.md is None:
            self.md = open_metadata(self.meta, self.block_size, self.nr_blocks)
        if not self.md.readonly and self.md.grow_to_store():
            log.info("era: metadata %s grew to %d blocks", self.meta.ref,
                     self.md.metadata_usage()[1])
        if self.md.nr_blocks != self.nr_blocks:
            self.md.resize(self.nr_blocks)
        self.rollover()
        return self.status_line()

    def rollover(self):
        self.md.checkpoint()
        self.md.commit()
        self.committed.setall(0)
        if trace.on.era_rollover:
            trace.emit("era_rollover", dev=self._dev_name(), key=id(self),
                       nr_blocks=self.nr_blocks)
        self.generation += 1
        self.worker.kick()               # digest the writeset just archived

    def archive(self):
        self.md.archive()
        self.md.commit()

    def take_snap(self):
        if self.md.snapshot_block is not None:
            raise TargetError("a metadata snapshot already exists", errno.EINVAL)
        self.rollover()
        self.md.take_snapshot()
        self.md.commit()
        return self.md.snapshot_block

    def drop_snap(self):
        if self.md.snapshot_block is None:
            raise TargetError("no metadata snapshot to drop", errno.EINVAL)
        self.md.drop_snapshot()
        self.md.commit()
        if self.md.has_archived():
            self.worker.kick()

    # ----------------------------------------------------------- queries
    def status_line(self):
        md = self.md
        used, total = md.metadata_usage()
        snap = md.snapshot_block
        return (f"{METADATA_BLOCK_SECTORS} {used}/{total} {md.current_era} "
                f"{snap if snap is not None else '-'}")

    def changed(self, since, snapshot):
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

    def listed_eras(self):
        cur = self.md.current_era
        return sorted({e for e in set(self.md.archived) | {1, cur - 1, cur} if 1 <= e <= cur})

    def dirty_map(self, since):
        """Bit per era block: written in era ``since`` or later (cached
        until the next mark or era change)."""
        key = (since, self.generation, self.md.current_era)
        cached = self._dirty_cache
        if cached is not None and cached[0] == key:
            return cached[1]
        bits = bitarray(endian="little")
        bits.pack(self.md.changed_since(since, include_current=True).tobytes())
        self._dirty_cache = (key, bits)
        return bits
