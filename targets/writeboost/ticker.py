"""The once-a-second tasks: the writeback modulator, the superblock record
updater and the data synchroniser.

Rules of this module: one thread, woken every second (or at once to stop);
each task is a function of the engine that does its own error handling: the
record updater and the synchroniser write through ``begin_write`` like every
other writer, so they stop when the target is FAILED, and a failed record
write FAILs the target.  Intervals of 0 turn a task off.
"""

import logging
import threading
import time

from pydm import trace
from pydm.lockdep import make_event
from pydm.targets.writeboost import layout as L
from pydm.devio import IOFailed

log = logging.getLogger("pydm.writeboost")


class Ticker:
    def __init__(self, engine, modulator, name):
        self.engine = engine
        self.modulator = modulator
        self.name = name
        self._stop = make_event()
        self._thread = None
        self._last_record = self._last_sync = time.monotonic()
        self._recorded = None            # the value last written to the record

    def start(self):
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name=f"pydm-wb-tick {self.name}")
            self._thread.start()

    def stop(self):
        t, self._thread = self._thread, None
        if t is not None:
            self._stop.set()
            t.join()

    def _run(self):
        while not self._stop.wait(1.0):
            try:
                self.tick(time.monotonic())
            except Exception:
                log.exception("writeboost %s: periodic task failed", self.name)

    def tick(self, now):
        eng = self.engine
        if not eng.life.active:
            return
        self.modulator.tick()
        t = eng.tunables
        if t["update_sb_record_interval"] and \
                now - self._last_record >= t["update_sb_record_interval"]:
            self._last_record = now
            self.write_record()
        if t["sync_data_interval"] and now - self._last_sync >= t["sync_data_interval"]:
            self._last_sync = now
            eng.sync()

    def write_record(self):
        """Write last_writeback to the superblock record (FUA), if it moved."""
        eng = self.engine
        with eng.cond:
            value = eng.index.last_writeback
        if value == self._recorded or not eng.begin_write():
            return
        try:
            if trace.on.wb_store_io:
                trace.emit("wb_store_io", eng=id(eng), store="cache", op="write")
            eng.cache.write(L.RECORD_BLOCK_OFFSET, L.record_block(value), fua=True)
        except IOFailed as e:
            eng.end_write()
            eng.fail_io(e)
            return
        eng.end_write()
        self._recorded = value
