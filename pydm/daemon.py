"""The pydm daemon: devices from a config, the control socket, and listeners.

Rules of this module: it wires parts together and owns their lifetimes; it
holds no I/O logic.  Listeners (the NBD server) are *services*: objects with
``start()`` and ``stop()``, started after the devices exist and stopped before
the devices are removed, so no client sees a half-built or half-removed stack.
"""

import logging
import signal
import time

from pydm.control import Control
from pydm.ctlsock import ControlServer
from pydm.errors import DMError, PydmError
from pydm.verify.rvctl import handlers as rv_handlers
from pydm.verify.session import default as default_session

log = logging.getLogger("pydm.daemon")


class Daemon:
    def __init__(self, socket_path: str, control: Control = None, rv=None):
        self.control = control or Control()
        self.socket_path = socket_path
        self.rv = rv if rv is not None else default_session()
        self.ctl = ControlServer(self.control, socket_path, handlers=rv_handlers(self.rv))
        self.services = []
        # A plain flag: a signal handler must never take a lock (it may run
        # while the main thread already holds the one it would need).
        self._stopping = False

    def add_service(self, service) -> None:
        self.services.append(service)

    def create_devices(self, specs) -> None:
        for spec in specs:
            try:
                self.control.create(spec.name, spec.table, spec.uuid, spec.readonly, spec.cwd)
            except DMError as e:
                raise PydmError(f"device {spec.name}: {e}", e.errno) from None
            log.info("created device %s (%d sectors)", spec.name,
                     self.control.get(spec.name).size_sectors)

    def claim(self) -> None:
        """Take the control socket and every service's listening sockets
        before anything else: a second daemon on the same control socket,
        NBD port or NBD socket stops here, before it opens a single device
        file (era's and writeboost's start-up write to theirs, under the
        first daemon's feet).  SIGINT/SIGTERM from here on ask for a clean
        stop (they are seen once the daemon runs), so a signal during
        start-up is never lost."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        self.ctl.bind()
        try:
            for s in self.services:
                bind = getattr(s, "bind", None)
                if bind is not None:
                    bind()
        except BaseException:
            self.abandon()
            raise

    def abandon(self) -> None:
        """Start-up failed: give back what ``claim`` and ``create_devices``
        took (sockets, devices)."""
        self._release()

    def _release(self) -> None:
        for s in reversed(self.services):
            try:
                s.stop()
            except Exception:
                log.exception("stopping %r failed", s)
        self.ctl.stop()
        self.control.shutdown()

    def start(self) -> None:
        self.ctl.start()
        started = []
        try:
            for s in self.services:
                s.start()
                started.append(s)
        except BaseException:
            for s in reversed(started):
                s.stop()
            self.ctl.stop()
            raise
        log.info("control socket %s", self.socket_path)

    def stop(self) -> None:
        self._release()
        for v in self.rv.end_check():
            log.error("rv: at shutdown: %s", v)
        self.rv.close()

    def request_stop(self, *_):
        self._stopping = True

    def run(self) -> None:
        """After ``start``: serve until SIGINT or SIGTERM, then shut down cleanly."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self.request_stop)
        try:
            while not self._stopping:
                time.sleep(0.2)
        finally:
            log.info("shutting down")
            self.stop()
