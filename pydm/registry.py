"""Target type registry: name -> Target class, loaded on first use.

Rules of this module: target classes are found through the ``pydm.targets``
entry-point group (so other packages can add targets), falling back to the
module ``pydm.targets.<name>`` when pydm runs from a source tree that was not
installed.  A type in use by any table is refcounted and cannot be
unregistered (as ocfs2's stackglue refuses to switch the cluster stack plugin
while a filesystem uses it: code in use must not vanish under its users).
"""

import errno
import importlib
import importlib.metadata

from pydm import trace
from pydm.errors import DMError
from pydm.lockdep import make_lock
from pydm.target import Target

GROUP = "pydm.targets"


class TargetRegistry:
    def __init__(self):
        self._lock = make_lock("registry.targets")
        self._types = {}        # name -> class (loaded)
        self._refs = {}         # name -> tables using it
        self._eps = None        # name -> EntryPoint (lazily discovered)

    def _entry_points(self):
        if self._eps is None:
            eps = {}
            for ep in importlib.metadata.entry_points(group=GROUP):
                eps.setdefault(ep.name, ep)
            self._eps = eps
        return self._eps

    def _load(self, name: str):
        ep = self._entry_points().get(name)
        try:
            if ep is not None:
                cls = ep.load()
            elif name.isidentifier():
                cls = getattr(importlib.import_module(f"pydm.targets.{name}"), "TARGET")
            else:
                return None
        except ModuleNotFoundError:
            return None
        except (ImportError, AttributeError) as e:
            raise DMError(f"{name}: cannot load target module: {e}", errno.ENOENT)
        if not (isinstance(cls, type) and issubclass(cls, Target)) or cls.name != name:
            raise DMError(f"{name}: entry point is not a target named {name!r}")
        return cls

    def register(self, cls) -> None:
        """Add a target class directly (tests and embedded users)."""
        if not (isinstance(cls, type) and issubclass(cls, Target) and cls.name):
            raise DMError(f"{cls!r} is not a named Target subclass")
        with self._lock:
            if cls.name in self._types and self._types[cls.name] is not cls:
                raise DMError(f"target type {cls.name} already registered", errno.EEXIST)
            self._types[cls.name] = cls

    def unregister(self, name: str) -> None:
        with self._lock:
            if self._refs.get(name):
                raise DMError(f"target type {name} is in use by {self._refs[name]} "
                              f"table(s)", errno.EBUSY)
            if self._types.pop(name, None) is None:
                raise DMError(f"target type {name} not registered", errno.ENOENT)
            if trace.on.target_unload:
                trace.emit("target_unload", type=name)

    def get(self, name: str):
        with self._lock:
            cls = self._types.get(name)
        if cls is not None:
            return cls
        cls = self._load(name)       # import outside the lock: may be slow
        if cls is None:
            raise DMError(f"unknown target type \"{name}\"", errno.EINVAL)
        with self._lock:
            return self._types.setdefault(name, cls)

    def acquire(self, name: str):
        cls = self.get(name)
        with self._lock:
            self._refs[name] = self._refs.get(name, 0) + 1
            if trace.on.target_get:
                trace.emit("target_get", type=name)
        return cls

    def release(self, name: str) -> None:
        with self._lock:
            n = self._refs.get(name, 0) - 1
            if trace.on.target_put:
                trace.emit("target_put", type=name)
            if n > 0:
                self._refs[name] = n
            else:
                self._refs.pop(name, None)

    def in_use(self, name: str) -> int:
        with self._lock:
            return self._refs.get(name, 0)

    def available(self):
        """[(name, version, loaded)] for every known target type."""
        names = set(self._entry_points())
        with self._lock:
            names |= set(self._types)
        out = []
        for name in sorted(names):
            try:
                cls = self.get(name)
            except DMError:
                continue
            out.append((name, cls.version, cls.description))
        return out
