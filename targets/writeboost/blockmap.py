"""A compact map from backing block number to cache index.

Rules of this module: keys are non-negative ints (4 KiB block numbers of
the backing device), values ints >= 0 (cache indexes).  The table is open
addressing with linear probing over two flat arrays (8 + 4 bytes a slot),
at most half full of live keys, so a 16 GiB cache (4.2 M blocks) costs about
100 MiB instead of the ~400 MiB a dict of Python ints would.  Deleted keys
leave tombstones that lookups probe past; the table is rebuilt (vectorised)
when live keys and tombstones fill 3/4 of it.  Single-threaded: the caller
holds the target's lock.
"""

from array import array

import numpy as np

EMPTY = -1
TOMB = -2
_MULT = 0x9E3779B97F4A7C15
_MASK64 = (1 << 64) - 1


class BlockMap:
    def __init__(self, max_live: int):
        bits = max(4, (2 * max(1, max_live) - 1).bit_length())
        self._alloc(bits)

    def _alloc(self, bits):
        self.bits = bits
        self.cap = 1 << bits
        self.mask = self.cap - 1
        self.shift = 64 - bits
        self.keys = array("q", [EMPTY]) * self.cap
        self.vals = array("i", [0]) * self.cap
        self.live = 0
        self.used = 0            # live + tombstones

    def _home(self, key):
        return ((key * _MULT) & _MASK64) >> self.shift

    def get(self, key: int) -> int:
        """The value for ``key``, or -1."""
        pos = self.find(key)
        return self.vals[pos] if pos >= 0 else -1

    def find(self, key: int) -> int:
        """The table position of ``key`` (its value is ``vals[pos]``), or -1."""
        keys = self.keys
        mask = self.mask
        i = ((key * _MULT) & _MASK64) >> self.shift
        while True:
            k = keys[i]
            if k == key:
                return i
            if k == EMPTY:
                return -1
            i = (i + 1) & mask

    def put(self, key: int, value: int) -> None:
        keys = self.keys
        mask = self.mask
        i = self._home(key)
        tomb = -1
        while True:
            k = keys[i]
            if k == key:
                self.vals[i] = value
                return
            if k == EMPTY:
                break
            if k == TOMB and tomb < 0:
                tomb = i
            i = (i + 1) & mask
        if tomb >= 0:
            i = tomb
        else:
            self.used += 1
        keys[i] = key
        self.vals[i] = value
        self.live += 1
        if self.used * 4 > self.cap * 3:
            self._rebuild()

    def delete(self, key: int, value: int = None) -> bool:
        """Remove ``key`` (only if it maps to ``value``, when given)."""
        keys = self.keys
        mask = self.mask
        i = self._home(key)
        while True:
            k = keys[i]
            if k == key:
                if value is not None and self.vals[i] != value:
                    return False
                keys[i] = TOMB
                self.live -= 1
                return True
            if k == EMPTY:
                return False
            i = (i + 1) & mask

    def __len__(self):
        return self.live

    def items(self):
        """(keys, values) of every live entry, as numpy arrays."""
        k = np.frombuffer(self.keys, dtype=np.int64)
        v = np.frombuffer(self.vals, dtype=np.int32)
        live = k >= 0
        return k[live].copy(), v[live].copy()

    def find_many(self, keys) -> np.ndarray:
        """Table positions of an array of keys (-1 where absent), vectorised."""
        keys = np.asarray(keys, dtype=np.int64)
        table = np.frombuffer(self.keys, dtype=np.int64)
        out = np.full(len(keys), -1, dtype=np.int64)
        pos = self._homes(keys)
        todo = np.arange(len(keys))
        while len(todo):
            k = table[pos]
            hit = k == keys[todo]
            out[todo[hit]] = pos[hit]
            more = ~hit & (k != EMPTY)
            todo, pos = todo[more], (pos[more] + 1) & self.mask
        return out

    def values_at(self, positions) -> np.ndarray:
        """The values at ``find_many``'s positions (-1 where absent)."""
        vals = np.frombuffer(self.vals, dtype=np.int32)
        return np.where(positions >= 0, vals[np.maximum(positions, 0)], -1)

    def set_at(self, positions, values) -> None:
        """New values for keys found at ``positions`` (all >= 0)."""
        np.frombuffer(self.vals, dtype=np.int32)[positions] = values

    def get_many(self, keys) -> np.ndarray:
        """Values for an array of keys (-1 where absent), vectorised."""
        return self.values_at(self.find_many(keys))

    def _homes(self, keys):
        prod = keys.astype(np.uint64) * np.uint64(_MULT)      # wraps mod 2^64
        return (prod >> np.uint64(self.shift)).astype(np.int64)

    def _rebuild(self):
        k, v = self.items()
        # never smaller: a rebuild mostly clears tombstones
        self._alloc(max(self.bits, (2 * max(1, len(k)) - 1).bit_length()))
        table = np.frombuffer(self.keys, dtype=np.int64)
        vals = np.frombuffer(self.vals, dtype=np.int32)
        pos = self._homes(k)
        todo = np.arange(len(k))
        while len(todo):
            free = table[pos] == EMPTY
            # among keys aiming at the same free slot, the first one gets it
            cand = todo[free]
            cpos = pos[free]
            _u, first = np.unique(cpos, return_index=True)
            won = cand[first]
            table[cpos[first]] = k[won]
            vals[cpos[first]] = v[won]
            placed = np.zeros(len(k), dtype=bool)
            placed[won] = True
            left = ~placed[todo]
            todo, pos = todo[left], pos[left]
            pos = np.where(table[pos] == EMPTY, pos, (pos + 1) & self.mask)
        self.live = self.used = len(k)
