"""Store plugins: which plugin opens a table's store argument, and the pool
that shares open stores among tables.

Rules of this module:

* A store argument is picked by its form, never by trying: ``dm:NAME`` and
  ``/dev/mapper/NAME`` are pydm devices (the control layer's, not a store);
  ``SCHEME:REST`` whose scheme a plugin declares goes to that plugin
  (``file:PATH``, ``nbd://...``); anything else with ``://`` is an unknown
  scheme (an error); every other argument is a file path.
* Plugins are found through the ``pydm.stores`` entry-point group (other
  packages add their own the same way), falling back to pydm's own modules
  when pydm runs from a source tree that was not installed.  A plugin that
  cannot load is skipped and named in the error of an argument it would
  have taken, so one broken plugin never hides the others.
* A plugin is an object with ``name``, ``schemes``, ``parse(arg, cwd)`` (no
  I/O; returns a spec with ``key`` and ``ref``, or raises ``PydmError`` with
  one line) and ``open(spec, readonly)`` (all-or-nothing: a store, or
  ``PydmError`` with one line and nothing left open).
* ``StorePool`` shares one open store per identity (``spec.key``; the file
  itself for a file, whatever its name) and access mode, refcounted.  Its
  lock ("store.pool") is a leaf: no plugin is called while it is held.
"""

import errno
import importlib
import importlib.metadata
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Hashable

from pydm.errors import PydmError
from pydm.lockdep import make_lock

GROUP = "pydm.stores"
# pydm's own plugins, for a source tree run without being installed
_BUILTIN = {"file": "pydm.stores.file", "nbd": "pydm.stores.nbd.plugin"}
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")

log = logging.getLogger("pydm.store")


@dataclass(frozen=True)
class StoreSpec:
    """A parsed store argument: which plugin, the store's identity (what
    sharing and claims key on; None when it is only known once open), how a
    table prints it (canonical, no secrets), and the plugin's own data."""
    plugin: str
    key: Hashable
    ref: str
    params: Any = None


def _check_plugin(plugin, name):
    for attr in ("schemes", "parse", "open"):
        if not hasattr(plugin, attr):
            raise TypeError(f"store plugin {name!r} has no {attr!r}")
    return plugin


class StoreRegistry:
    """Scheme -> plugin, discovered on first use."""

    def __init__(self):
        self._lock = make_lock("registry.stores")
        self._schemes = None          # scheme -> plugin
        self._names = {}              # plugin name -> plugin
        self._broken = {}             # plugin name -> why it did not load

    def _discover(self):
        schemes, names, broken = {}, {}, {}
        sources = [(ep.name, ep.load) for ep in
                   importlib.metadata.entry_points(group=GROUP)]
        sources += [(name, lambda m=mod: importlib.import_module(m).PLUGIN)
                    for name, mod in _BUILTIN.items()]
        for name, load in sources:
            if name in names or name in broken:
                continue
            try:
                plugin = _check_plugin(load(), name)
            except Exception as e:          # a broken plugin must not hide the others
                broken[name] = f"{type(e).__name__}: {e}"
                log.warning("store plugin %s did not load: %s", name, broken[name])
                continue
            names[name] = plugin
            for s in plugin.schemes:
                schemes.setdefault(s.lower(), plugin)
        return schemes, names, broken

    def _table(self):
        with self._lock:
            if self._schemes is not None:
                return self._schemes
        found = self._discover()        # imports outside the lock
        with self._lock:
            if self._schemes is None:
                self._schemes, self._names, self._broken = found
            return self._schemes

    def register(self, plugin) -> None:
        """Add a plugin directly (tests and embedded users)."""
        _check_plugin(plugin, getattr(plugin, "name", "?"))
        table = self._table()
        with self._lock:
            for s in plugin.schemes:
                if table.get(s.lower(), plugin) is not plugin:
                    raise PydmError(f"store scheme {s!r} is already taken by "
                                    f"{table[s.lower()].name}", errno.EEXIST)
            for s in plugin.schemes:
                table[s.lower()] = plugin
            self._names[plugin.name] = plugin

    def plugins(self):
        """[(name, schemes)] of every loaded plugin, and {name: why} of the broken."""
        table = self._table()
        by = {}
        for s, p in table.items():
            by.setdefault(p.name, []).append(s)
        with self._lock:
            broken = dict(self._broken)
        return sorted((n, sorted(s)) for n, s in by.items()), broken

    def plugin_for(self, arg: str):
        table = self._table()
        m = _SCHEME_RE.match(arg)
        if m:
            scheme = m.group(1).lower()
            plugin = table.get(scheme)
            if plugin is not None:
                return plugin
            if arg[m.end():].startswith("//"):
                raise PydmError(self._unknown(scheme), errno.EINVAL)
        if "file" not in table:
            raise PydmError(f"{arg}: the file store plugin did not load", errno.ENOENT)
        return table["file"]

    def _unknown(self, scheme):
        known = sorted(set(self._table()) | {"dm"})
        text = f"unknown store scheme {scheme!r} (known: {', '.join(known)})"
        with self._lock:
            broken = dict(self._broken)
        if broken:
            text += "; not loaded: " + "; ".join(f"{n} ({why})" for n, why in
                                                 sorted(broken.items()))
        return text

    def parse(self, arg: str, cwd=None):
        """The spec of ``arg`` (``PydmError`` with one line if it is bad)."""
        if not arg:
            raise PydmError("empty store argument", errno.EINVAL)
        return self.plugin_for(arg).parse(arg, cwd)

    def open(self, spec, readonly: bool):
        self._table()
        with self._lock:
            plugin = self._names[spec.plugin]
        return plugin.open(spec, readonly)


class StorePool:
    """Open stores shared by every table that names them, refcounted.

    A store is known by its identity (``spec.key``), so two names of one file
    share one store, and a path that now names a different file (the old one
    was replaced) opens the new one.  A store opened read-write is held for
    writing (``Store.hold_for_writing``: a file's lock) while the pool has
    it, so one process at a time writes a file through pydm.  Taking a
    shared store reads its size again: it may have grown since it was
    opened.  A store opened read-only
    and later wanted read-write is opened again (the read-only one stays
    valid for its current users).

    ``opener(path, readonly)``, if given, opens file stores instead of the
    file plugin (tests wrap files in fault injectors this way).
    """

    def __init__(self, lock_factory=None, opener=None, registry=None):
        self._lock = lock_factory() if lock_factory else make_lock("store.pool")
        self._open = {}   # (identity, readonly) -> [store, refcount]
        self._keys = {}   # id(store) -> its key in _open
        self._opener = opener
        self.registry = registry or StoreRegistry()

    def acquire(self, arg: str, readonly: bool = False, cwd=None):
        spec = self.registry.parse(arg, cwd)
        key = spec.key
        if key is not None:
            with self._lock:
                entry = self._open.get((key, readonly))
                if entry is not None:
                    entry[1] += 1
                    store = entry[0]
            if entry is not None:
                try:
                    store.refresh_size()
                except OSError:
                    pass
                return store
        if self._opener is not None and spec.plugin == "file":
            store = self._opener(spec.params, readonly)
        else:
            store = self.registry.open(spec, readonly)
        key = (store.key, readonly)
        with self._lock:
            entry = self._open.get(key)
            if entry is not None:      # lost a race to open the same store
                entry[1] += 1
            else:
                try:
                    if not readonly:
                        store.hold_for_writing()
                except BaseException:
                    store.close()
                    raise
                self._open[key] = [store, 1]
                self._keys[id(store)] = key
        if entry is not None:
            store.close()
            return entry[0]
        return store

    def release(self, store) -> None:
        with self._lock:
            key = self._keys.get(id(store))
            entry = self._open.get(key)
            if entry is None or entry[0] is not store:
                return
            entry[1] -= 1
            if entry[1] > 0:
                return
            del self._open[key]
            del self._keys[id(store)]
        store.close()

    def open_count(self) -> int:
        with self._lock:
            return len(self._open)


def file_path(arg: str, cwd=None) -> str:
    """The absolute path a file argument names (``file:`` stripped)."""
    if arg[:5].lower() == "file:":
        arg = arg[5:]
        if arg.startswith("//"):            # file:///abs/path
            arg = arg[2:]
    return os.path.abspath(os.path.join(cwd, arg) if cwd else arg)
