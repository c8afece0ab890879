"""linear: map a range of the device onto a store or a lower device.

``linear <dev> <offset>`` - sector S of the target is sector
``offset + (S - start)`` of ``<dev>``.  Flushes, discards and write-zeroes
pass through (one clone each) when ``<dev>`` supports them.
"""

from pydm import store as _store
from pydm.errors import TargetError
from pydm.table import quote_arg
from pydm.target import NOWAIT, REMAPPED, STATUS_TABLE, Target, parse_uint


def open_area(target, dev_arg: str, offset_arg: str):
    """Open ``<dev> <offset>`` for a target and check the area fits."""
    offset = parse_uint(offset_arg, "device sector")
    dev = target.ctx.get_device(dev_arg, area=(offset, target.len))
    dev_sectors = dev.size >> 9
    if offset + target.len > dev_sectors:
        raise TargetError(f"device {dev_arg} is too small: area {offset}+{target.len} "
                          f"runs past its end ({dev_sectors} sectors)")
    return dev, offset


def area_block_status(dev, context, sector, nr_sectors):
    """Block status of ``nr_sectors`` at ``sector`` of a store or lower device."""
    if isinstance(dev, _store.Store):
        if context != "base:allocation":
            return [(nr_sectors, 0)]
        out = []
        for length, flags in dev.extents(sector << 9, nr_sectors << 9):
            n = length >> 9
            if n:
                out.append((n, flags))
            else:
                break
        return out or [(nr_sectors, 0)]
    return dev.block_status(context, sector, nr_sectors)


class LinearTarget(Target):
    name = "linear"
    version = (1, 4, 0)
    description = "map onto a range of a store or device"
    features = NOWAIT     # reads are remapped as they are

    def ctr(self, args):
        if len(args) != 2:
            raise TargetError("Invalid argument count")
        self.dev, self.start = open_area(self, args[0], args[1])
        self.delta = self.start - self.begin
        # one clone each; whether the device below takes them is its
        # capabilities' business (asked, not assumed)
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1

    def map(self, bio):
        bio.dev = self.dev
        if bio.nr_sectors:
            bio.sector += self.delta
        return REMAPPED

    def status(self, type_):
        if type_ == STATUS_TABLE:
            return f"{quote_arg(self.dev.ref)} {self.start}"
        return ""

    def iterate_devices(self):
        return [(self.dev, self.start, self.len)]

    def block_status(self, context, sector, nr_sectors):
        return area_block_status(self.dev, context, sector + self.delta, nr_sectors)


TARGET = LinearTarget
