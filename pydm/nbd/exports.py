"""Exports: how a pydm device looks to an NBD client.

Rules of this module: it reads devices through ``MappedDevice``'s public
face (size, readonly, capabilities, contexts, block_status) and the
``Control`` registry, and never through tables or targets.  Everything a
client is told is computed at the moment it asks (INFO, GO, BLOCK_STATUS), so
a table reload shows up in the next handshake.  Transmission flags and block
sizes are the device's capabilities (``pydm.caps``), asked down the whole
stack, never constants: a table whose targets cannot discard does not offer
TRIM, one with nothing volatile (``zero``, ``error``) no FLUSH or FUA.
"""

from pydm.bio import SECTOR_SHIFT
from pydm.errors import DMError
from pydm.nbd import protocol as P


def export_flags(caps, force_readonly=False) -> int:
    """Transmission flags (without DF) for a device's capabilities."""
    flags = P.TF_HAS_FLAGS
    if caps.cache:
        flags |= P.TF_SEND_CACHE
    if caps.flush:
        flags |= P.TF_SEND_FLUSH
    if caps.fua:
        flags |= P.TF_SEND_FUA
    if force_readonly or caps.readonly:
        flags |= P.TF_READ_ONLY
    else:
        if caps.discard:
            flags |= P.TF_SEND_TRIM
        if caps.write_zeroes:
            # FAST_ZERO is understood whenever zeroing is: it runs when the
            # stack zeroes without writing (caps.fast_zero), and is answered
            # ENOTSUP at once otherwise, which is what the flag asks for.
            flags |= P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO
    # Every connection reaches the same in-process device: one consistent
    # view, and a FLUSH on any connection reaches every store below.
    if caps.multi_conn:
        flags |= P.TF_CAN_MULTI_CONN
    return flags


def describe(dev) -> str:
    ro = ", read-only" if dev.readonly else ""
    return f"pydm device {dev.name} ({dev.size} bytes{ro})"


class Catalog:
    """The export list of a server: one export per pydm device.

    ``default`` names the export a client gets for the empty name; without
    it the empty name means the only device when there is exactly one.
    """

    def __init__(self, control, default=None, readonly=False):
        self.control = control
        self.default = default
        self.readonly = readonly

    def resolve(self, name: str):
        """The device an export name selects, or None."""
        if name == "":
            if self.default:
                name = self.default
            else:
                names = self.control.names()
                if len(names) != 1:
                    return None
                name = names[0]
        try:
            dev = self.control.get(name)
        except DMError:
            return None
        return None if dev.dead else dev

    def names(self):
        return [(d.name, describe(d)) for d in self.control.devices() if not d.dead]

    def lookup(self, name: str):
        dev = self.resolve(name)
        if dev is None:
            return None
        caps = dev.capabilities()
        return P.ExportInfo(dev.name, dev.size, export_flags(caps, self.readonly),
                            describe(dev), dev.contexts(caps), dev.accepts_context,
                            (caps.min_block, caps.preferred_block, caps.max_block),
                            caps.fast_zero)


def block_status(dev, context: str, offset: int, length: int, req_one: bool):
    """[(bytes, flags)] extents for a BLOCK_STATUS request (proto.md, NBD_CMD_BLOCK_STATUS).

    Asks the device repeatedly (it may answer less than asked, e.g. at a
    target boundary) until the request is covered or enough extents are in.
    """
    sector = offset >> SECTOR_SHIFT
    end = (offset + length) >> SECTOR_SHIFT
    runs = []
    calls = 0
    while sector < end and calls < 64 and len(runs) < P.MAX_EXTENTS:
        got = dev.block_status(context, sector, end - sector)
        calls += 1
        moved = 0
        for n, flags in got:
            n = min(n, end - sector - moved)
            if n <= 0:
                break
            runs.append((n << SECTOR_SHIFT, flags))
            moved += n
        if not moved:
            break
        sector += moved
        if req_one:
            break
    return P.clip_extents(runs, length, req_one)
