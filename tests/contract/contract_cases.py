"""One case per target type: how to build a valid table of it, and what it
does with data.  Every test in this directory runs on every case, so a new
target gets the whole contract suite by adding one ``Case`` to ``CASES``
(and a test-only target by adding one with ``register``).
"""

import os
from dataclasses import dataclass

from pydm.control import Control
from pydm.errors import TargetError
from pydm.table import quote_arg
from pydm.target import REMAPPED, STATUS_TABLE, Target

SECTORS = 8192            # every case is a 4 MiB device
IMAGE = SECTORS << 9


class PassThru(Target):
    """A test-only target: remaps to one store, takes no discards, and wants
    4 KiB blocks.  It is here to show that a target nobody installed gets the
    whole suite from one case, and to give the suite a target that refuses
    discards and raises the minimum block size."""

    name = "passthru"

    def ctr(self, args):
        if len(args) != 1:
            raise TargetError("Invalid argument count")
        self.dev = self.ctx.get_device(args[0], area=(0, self.len))
        if self.dev.size < self.len << 9:
            raise TargetError(f"{args[0]} is too small")
        self.num_write_zeroes_bios = 1          # and no discards

    def map(self, bio):
        bio.dev = self.dev
        return REMAPPED

    def status(self, type_):
        return quote_arg(self.dev.ref) if type_ == STATUS_TABLE else ""

    def iterate_devices(self):
        return [(self.dev, 0, self.len)]

    def io_hints(self, caps):
        caps.min_block = max(caps.min_block, 4096)


def image(d, name="data.img"):
    path = os.path.join(d, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.write(os.urandom(IMAGE))
    return path


def blank(d, name, size):
    """A sparse file of zeroes, made once: a case's table may be built
    again over the same files (a power-cut test's second stack)."""
    path = os.path.join(d, name)
    if not os.path.exists(path):
        with open(path, "wb") as f:
            f.truncate(size)
    return path


@dataclass
class Case:
    name: str
    args: object            # fn(dir) -> the table line's arguments
    data: str = "store"     # what reads give back: "store", "zero" or "error"
    messages: tuple = ()    # messages it must take
    bad: tuple = ()         # fn(dir) -> arguments its constructor must refuse
    register: type = None   # a target class the suite registers itself

    def table(self, d, sectors=SECTORS):
        return f"0 {sectors} {self.name} {self.args(d)}".rstrip() + "\n"


CASES = [
    Case("linear", lambda d: f"{image(d)} 0",
         bad=(lambda d: "", lambda d: f"{image(d)} x", lambda d: f"{image(d)} 1",
              lambda d: "missing.img 0")),
    Case("flakey", lambda d: f"{image(d)} 0 1000 0",
         bad=(lambda d: f"{image(d)} 0 0 0", lambda d: f"{image(d)} 0 1 1 1 bogus",
              lambda d: f"{image(d)} 0 1 1 2 drop_writes")),
    Case("delay", lambda d: f"{image(d)} 0 1",
         bad=(lambda d: f"{image(d)} 0", lambda d: f"{image(d)} 0 x")),
    Case("zero", lambda d: "", data="zero"),
    Case("error", lambda d: "", data="error"),
    Case("era", lambda d: f"{blank(d, 'meta.img', 4 << 20)} {image(d)} 8",
         messages=("checkpoint", "take_metadata_snap", "drop_metadata_snap"),
         bad=(lambda d: f"{blank(d, 'm2.img', 4 << 20)} {image(d)} 7",
              lambda d: f"{image(d)} {image(d)} 8",
              lambda d: f"{blank(d, 'tiny.img', 4096)} {image(d)} 8")),
    Case("writeboost", lambda d: f"{image(d)} {blank(d, 'cache.img', 3 << 20)}",
         messages=("drop_caches", "clear_stat", "writeback_threshold 50",
                   "sync_data_interval 0"),
         bad=(lambda d: image(d), lambda d: f"{image(d)} {blank(d, 'small.img', 1 << 20)}",
              lambda d: f"{image(d)} {image(d, 'notcache.img')}",
              lambda d: f"{image(d)} {blank(d, 'c2.img', 3 << 20)} 2 writeback_threshold 101",
              lambda d: f"{image(d)} {blank(d, 'c3.img', 3 << 20)} 2 bogus 1",
              lambda d: f"{image(d)} {blank(d, 'c4.img', 3 << 20)} 3 writeback_threshold")),
    Case("log-writes", lambda d: f"{image(d)} {blank(d, 'log.img', 16 << 20)}",
         messages=("mark one", "MARK two"),
         bad=(lambda d: image(d), lambda d: f"{image(d)} {image(d)}",
              lambda d: f"{image(d)} {blank(d, 'l2.img', 16 << 20)} extra",
              lambda d: f"{image(d)} {blank(d, 'tinylog.img', 4096)}")),
    Case("passthru", lambda d: image(d), register=PassThru,
         bad=(lambda d: "", lambda d: blank(d, "small.img", 4096))),
]


def new_control(stores=None):
    c = Control(stores=stores)
    for k in CASES:
        if k.register is not None:
            c.targets.register(k.register)
    return c
