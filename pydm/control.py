"""Control operations with dmsetup semantics over a registry of devices.

Rules of this module:

* The registry lock (``control.registry``) guards only the name -> device
  map.  Nothing calls into a device or a target while holding it: look up,
  take what is needed, drop it, then act.  (libnvdimm once called into
  devices under its bus lock and deadlocked against their own locks, an ABBA
  that lockdep found only once a control-plane stress test could see it.)
* Tables are constructed outside every device lock (a constructor may open
  lower devices, which needs the registry), then installed under the device's
  control lock.
* ``remove`` is one-shot: the name is unlinked under the registry lock, so a
  racing second remove gets ENXIO; the device is then drained and destroyed.
* Every method raises ``DMError`` for a refused operation and changes nothing.
"""

import errno
import functools
import itertools
import re
import threading

from pydm import trace
from pydm.claims import Claim, ClaimRegistry
from pydm.device import MappedDevice
from pydm.errors import DMError, TargetError
from pydm.lockdep import make_lock
from pydm.registry import TargetRegistry
from pydm.store_registry import StorePool
from pydm.table import Table

# Minors are unique in the process, as the kernel's are on the machine: two
# Controls may live side by side (a pydm stacked on another over NBD, in one
# process), and the runtime monitors know a device by its minor.  next() on
# a count is atomic under the GIL.
_MINORS = itertools.count(0)

_NAME_RE = re.compile(r"^[A-Za-z0-9_.+:@-][A-Za-z0-9_.+:@-]{0,126}$")
DEVICE_PREFIXES = ("dm:", "/dev/mapper/")


# Names the kernel's dm-ioctl refuses (check_name): they would be paths in
# /dev/mapper that are not devices.
_RESERVED_NAMES = (".", "..", "control")
_UUID_MAX = 128                 # DM_UUID_LEN - 1


def check_name(name) -> None:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise DMError(f"invalid device name {name!r}: use up to 127 letters, digits "
                      f"and _.+:@-")
    if name in _RESERVED_NAMES:
        raise DMError(f"invalid device name {name!r}: a device cannot be called "
                      f"\".\", \"..\" or \"control\"")


def check_uuid(uuid) -> None:
    if uuid is None or uuid == "":
        return
    if (not isinstance(uuid, str) or len(uuid) > _UUID_MAX or not uuid.isprintable()
            or any(c.isspace() for c in uuid)):
        raise DMError(f"invalid uuid {uuid!r}: use up to {_UUID_MAX} printable "
                      f"characters, no spaces")


def _is_device_holder(description: str) -> bool:
    """Holders that are tables of other devices (see ``_resolve``), not clients."""
    return description.startswith("dm:") or description == "table"


def device_ref(arg: str):
    """The pydm device name a table argument refers to, or None for a file."""
    for p in DEVICE_PREFIXES:
        if arg.startswith(p):
            return arg[len(p):]
    return None


class Control:
    """The device registry.  ``registry`` (target types) and ``stores`` (a
    ``StorePool``, which opens the files tables name) may be given; by
    default every installed target, and plain files."""

    def __init__(self, registry: TargetRegistry = None, stores: StorePool = None):
        self.targets = registry or TargetRegistry()
        self.stores = stores or StorePool()
        self.claims = ClaimRegistry()
        self._lock = make_lock("control.registry")
        self._devices = {}
        self._workers = []
        self._workers_lock = make_lock("control.workers")

    # ----------------------------------------------------------- lookup
    def get(self, name: str) -> MappedDevice:
        with self._lock:
            dev = self._devices.get(name)
        if dev is None:
            raise DMError(f"{name}: no such device", errno.ENXIO)
        return dev

    def names(self):
        with self._lock:
            return sorted(self._devices)

    def devices(self):
        with self._lock:
            return [self._devices[n] for n in sorted(self._devices)]

    def _resolve(self, arg: str, readonly: bool, for_dev, cwd=None, table=None,
                 role="data", area=None, exclusive=False):
        """Open what a table argument names: a pydm device, or a store of
        any plugin (``pydm.store_registry``: a file, ``nbd://...``).

        A relative file path is taken relative to ``cwd``: the client's
        working directory, or the directory of the config file.  A store is
        claimed for ``role`` (see ``pydm.claims``) before it is handed out.
        """
        name = device_ref(arg)
        if name is None:
            store = self.stores.acquire(arg, readonly, cwd)
            claim = Claim(store.key, for_dev, table, role, area, exclusive,
                          not readonly, arg)
            try:
                self.claims.claim(claim)
            except BaseException:
                self.stores.release(store)
                raise

            def release_file():
                self.claims.release(claim)
                self.stores.release(store)
            return store, release_file
        key = object()
        desc = f"dm:{for_dev.name}" if for_dev is not None else "table"
        with self._lock:
            # Opened under the registry lock: a remove that found no holder
            # has unlinked the name first, so it cannot lose this race.
            dev = self._devices.get(name)
            if dev is None:
                raise TargetError(f"Device lookup failed: no pydm device {name!r}",
                                  errno.ENXIO)
            if for_dev is not None and self._depends_on(dev, for_dev):
                raise TargetError(f"device {name} would map onto itself (stacking loop)")
            dev.open(key, desc)

        def release():
            if dev.close(key):
                self._schedule_deferred_remove(dev)
        return dev, release

    def _depends_on(self, dev, target) -> bool:
        """True if ``dev`` is ``target`` or maps (transitively) onto it."""
        seen, todo = set(), [dev]
        while todo:
            d = todo.pop()
            if d is target:
                return True
            if id(d) in seen:
                continue
            seen.add(id(d))
            for table in (d.live, d.inactive):
                if table is None:
                    continue
                for t in table.targets:
                    for lower, _s, _n in t.iterate_devices():
                        if isinstance(lower, MappedDevice):
                            todo.append(lower)
        return False

    # ------------------------------------------------------- operations
    def create(self, name: str, table: str = None, uuid: str = None,
               readonly: bool = False, cwd=None) -> MappedDevice:
        check_name(name)
        check_uuid(uuid)
        with self._lock:
            if name in self._devices:
                raise DMError(f"{name}: device already exists", errno.EBUSY)
            if uuid and any(d.uuid == uuid for d in self._devices.values()):
                raise DMError(f"uuid {uuid} already in use", errno.EBUSY)
            dev = MappedDevice(name, uuid, readonly)
            dev.minor = next(_MINORS)
            # Emitted before the name is published: from then on another
            # client may load or resume it, and a monitor must see the
            # device born first (dev_load before dev_create was seen under
            # the control-plane stress, and inactive_slot lost the table).
            if trace.on.dev_create:
                trace.emit("dev_create", dev=name, minor=dev.minor)
            self._devices[name] = dev
        if table is not None:
            try:
                self.load(name, table, cwd)
                self.resume(name)
            except BaseException:
                self._unlink(dev)
                dev.destroy()
                raise
        return dev

    def build_table(self, dev: MappedDevice, text: str, cwd=None) -> Table:
        resolver = functools.partial(self._resolve, cwd=cwd)
        return Table(text, self.targets, resolver, dev, dev.readonly)

    def load(self, name: str, text: str, cwd=None) -> None:
        dev = self.get(name)
        try:
            table = self.build_table(dev, text, cwd)
        except DMError as e:
            raise DMError(f"{name}: table load failed: {e}", e.errno) from None
        dev.install_inactive(table)

    def resume(self, name: str, noflush: bool = False) -> None:
        self.get(name).resume(noflush)

    def suspend(self, name: str, noflush: bool = False, timeout=None) -> None:
        self.get(name).suspend(noflush, timeout)

    def clear(self, name: str) -> None:
        self.get(name).clear()

    def message(self, name: str, sector: int, text: str):
        argv = text.split()
        if not argv:
            raise DMError(f"{name}: empty message")
        try:
            return self.get(name).message(sector, argv)
        except TargetError as e:
            raise DMError(f"{name}: message failed: {e}", e.errno) from None

    def _unlink(self, dev) -> bool:
        with self._lock:
            if self._devices.get(dev.name) is dev:
                del self._devices[dev.name]
                return True
        return False

    def remove(self, name: str, force: bool = False, deferred: bool = False) -> None:
        with self._lock:
            dev = self._devices.get(name)
            if dev is None:
                raise DMError(f"{name}: no such device", errno.ENXIO)
            count, holders = dev.holders()
            stacked = sorted({h for h in holders.values() if _is_device_holder(h)})
            if count and (stacked or not force):
                if deferred:
                    dev.deferred_remove = True
                    return
                who = ", ".join(sorted(set(holders.values())))
                if force:
                    # As dmsetup: nothing removes a device another device is
                    # built on; -f only overrides clients (NBD connections).
                    raise DMError(f"{name}: device is in use by {', '.join(stacked)}, "
                                  f"which map onto it: remove them first", errno.EBUSY)
                raise DMError(f"{name}: device is in use ({who})", errno.EBUSY)
            del self._devices[name]
        dev.destroy()

    def _deferred_remove(self, dev) -> None:
        if dev.deferred_remove and self._unlink(dev):
            dev.destroy()

    def _schedule_deferred_remove(self, dev) -> None:
        # The last holder may let go while holding its own device's control
        # lock (an upper table being destroyed); removing from there would
        # take the registry and a second device lock out of order.  Like the
        # kernel's deferred-remove work item, do it from a worker.
        t = threading.Thread(target=self._deferred_remove, args=(dev,),
                             name="pydm-deferred-remove", daemon=True)
        with self._workers_lock:
            self._workers = [w for w in self._workers if w.is_alive()] + [t]
        t.start()

    def rename(self, name: str, new: str) -> None:
        check_name(new)
        with self._lock:
            dev = self._devices.get(name)
            if dev is None:
                raise DMError(f"{name}: no such device", errno.ENXIO)
            if new in self._devices:
                raise DMError(f"{new}: device already exists", errno.EBUSY)
            del self._devices[name]
            dev.name = new
            self._devices[new] = dev
        dev.raise_event()

    def wipe_table(self, name: str) -> None:
        dev = self.get(name)
        size = dev.size_sectors
        if not size:
            raise DMError(f"{name}: no live table to wipe")
        self.load(name, f"0 {size} error")
        self.resume(name)

    # ---------------------------------------------------------- queries
    def table(self, name: str, inactive: bool = False):
        dev = self.get(name)
        with dev.table_ref(inactive) as t:
            return [] if t is None else t.lines_status("table")

    def status(self, name: str):
        dev = self.get(name)
        with dev.table_ref() as t:
            return [] if t is None else t.lines_status("info")

    def info(self, name: str) -> dict:
        return self.get(name).info()

    def wait(self, name: str, event_nr: int = None, timeout=None) -> int:
        dev = self.get(name)
        if event_nr is None:
            event_nr = dev.event_nr
        return dev.wait_event(event_nr, timeout)

    def deps(self, name: str):
        dev = self.get(name)
        out = []
        with dev.table_ref() as t:
            for tgt in (t.targets if t is not None else []):
                for lower, _s, _n in tgt.iterate_devices():
                    if lower.ref not in out:
                        out.append(lower.ref)
        return out

    # ---------------------------------------------------------- clients
    def open(self, name: str, key, description: str) -> MappedDevice:
        with self._lock:
            dev = self._devices.get(name)
            if dev is None:
                raise DMError(f"{name}: no such device", errno.ENXIO)
            dev.open(key, description)
        return dev

    def close(self, dev: MappedDevice, key) -> None:
        if dev.close(key):
            self._deferred_remove(dev)

    def shutdown(self) -> None:
        """Remove every device, upper devices before the ones they map onto."""
        with self._workers_lock:
            workers = list(self._workers)
        for w in workers:
            w.join()
        while True:
            devs = self.devices()
            if not devs:
                return
            top = [d for d in devs
                   if not any(_is_device_holder(v) for v in d.holders()[1].values())]
            for dev in top or devs:        # a loop cannot exist, but never spin
                if self._unlink(dev):
                    dev.destroy()
