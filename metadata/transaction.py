"""Transaction manager: shadowing, allocation and the commit order.

Rules of this module: a block committed to disk is never written in place.
Changing one means *shadowing* it: a block created or shadowed in this
transaction (and referenced once) is changed in place in memory; any other is
copied to a newly allocated block, the original's count drops by one, and if
the original was shared the caller must take references on what the copy
points to (``shadow`` says so).  Dirty blocks stay in memory until
``commit``: space map first, then every dirty block, a flush, the superblock
(block 0) last, and a second flush.  A crash at any point leaves the last
committed superblock, and everything it reaches, intact.
"""

import errno

from pydm.metadata.block_manager import BLOCK_SIZE, MetadataError


class TransactionManager:
    def __init__(self, bm, sm):
        self.bm = bm
        self.sm = sm
        self.dirty = {}          # block -> (bytearray, validator)
        self.fresh = set()       # created or shadowed in this transaction

    # -- reading ---------------------------------------------------------
    def read(self, b: int, validator):
        entry = self.dirty.get(b)
        if entry is not None:
            return entry[0]
        return self.bm.read(b, validator)

    # -- allocation and shadowing ---------------------------------------------
    def new_block(self, validator):
        b = self.sm.alloc()
        buf = bytearray(BLOCK_SIZE)
        self.dirty[b] = (buf, validator)
        self.fresh.add(b)
        return b, buf

    def put_block(self, b: int, buf: bytearray, validator) -> None:
        """Hand a whole new block (already allocated) to the commit."""
        self.dirty[b] = (buf, validator)
        self.fresh.add(b)

    def shadow(self, b: int, validator):
        """(block, writable buffer, was_shared) for changing block ``b``."""
        count = self.sm.get(b)
        if count == 0:
            raise MetadataError(f"metadata block {b} is referenced but free in the "
                                f"space map", errno.EINVAL)
        if b in self.fresh and count == 1:
            return b, self.dirty[b][0], False
        src = self.read(b, validator)
        nb = self.sm.alloc()
        buf = bytearray(src)
        self.dirty[nb] = (buf, validator)
        self.fresh.add(nb)
        self.sm.dec(b)
        return nb, buf, count > 1

    def inc(self, b: int, n: int = 1) -> None:
        self.sm.inc(b, n)

    def dec(self, b: int, n: int = 1) -> None:
        self.sm.dec(b, n)

    def get_count(self, b: int) -> int:
        return self.sm.get(b)

    # -- commit ---------------------------------------------------------------
    def commit(self, superblock: bytearray, sb_validator, sm_root_setter=None) -> None:
        """Commit the transaction with ``superblock`` as the new block 0.

        ``sm_root_setter(sb, root_bytes)`` copies the space map root into the
        superblock once the space map has been written.
        """
        if hasattr(self.sm, "commit"):
            root = self.sm.commit(self)
            if sm_root_setter is not None:
                sm_root_setter(superblock, root)
        bm = self.bm
        bm.write_many([(b, buf, validator) for b, (buf, validator) in self.dirty.items()
                       # block 0 goes last; freed blocks are not written
                       if b != 0 and self.sm.get(b) != 0])
        bm.flush()
        bm.write(0, superblock, sb_validator)
        bm.flush()
        self.dirty.clear()
        self.fresh.clear()
        self.sm.mark_committed()

    def abort(self) -> None:
        """Drop everything since the last commit."""
        self.dirty.clear()
        self.fresh.clear()
        self.sm.rollback()
        self.bm.forget()
