"""Mutants of the core: the router, the device, the control plane, locks."""


from mutant_support import Mutant
from pydm import router
from pydm.control import Control
from pydm.device import MappedDevice

T = "tests/mutation/test_mutants_core.py::"


def _split_completed_twice(mp):
    # a fragment's completion forgets to wait for its siblings
    orig = router._clone_done

    def clone_done(clone):
        io = clone.io
        if io.lock is not None and io.remaining > 1:
            with io.lock:
                io.remaining -= 1
            io.dev.io_done(io.orig, io.status)
            return
        orig(clone)
    mp.setattr(router, "_clone_done", clone_done)


def _keeps_table_after_remove(mp):
    # remove tears the tables down but the device still routes to the old one
    orig = MappedDevice.destroy

    def destroy(self):
        live = self.live
        orig(self)
        self.live = live
    mp.setattr(MappedDevice, "destroy", destroy)


def _double_remove(mp):
    # the registry entry goes only after the teardown, and the teardown is
    # no longer idempotent: two removes racing both tear the device down
    orig_destroy = MappedDevice.destroy

    def destroy(self):
        with self.control_lock:
            self.dead = False
            orig_destroy(self)

    def remove(self, name, force=False, deferred=False):
        dev = self.get(name)
        dev.destroy()
        with self._lock:
            if self._devices.get(name) is dev:
                del self._devices[name]
    mp.setattr(MappedDevice, "destroy", destroy)
    mp.setattr(Control, "remove", remove)


def _abba_on_message(mp):
    # a message takes the registry lock inside the device's control lock
    orig = Control.message

    def message(self, name, sector, text):
        dev = self.get(name)
        with dev.control_lock:
            with self._lock:
                pass
        return orig(self, name, sector, text)
    mp.setattr(Control, "message", message)


MUTANTS = (
    Mutant("split-bio-completed-twice",
           "a bio split over two targets is completed once per fragment",
           _split_completed_twice, [T + "test_a_bio_split_over_two_targets"], "bio_once"),
    Mutant("bio-to-removed-device",
           "a removed device still routes bios to its old table",
           _keeps_table_after_remove, [T + "test_a_bio_sent_to_a_removed_device_fails"],
           "control_plane"),
    Mutant("double-remove-race",
           "two removes racing both tear the device down",
           _double_remove, [T + "test_two_removes_racing"], "control_plane"),
    Mutant("abba-control-path",
           "a message takes the registry lock inside a device's control lock",
           _abba_on_message, [T + "test_a_message_after_create_and_remove"], "lockdep"),
)

