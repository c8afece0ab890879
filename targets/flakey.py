"""flakey: a linear mapping that misbehaves on a schedule (fault injection).

``flakey <dev> <offset> <up interval> <down interval> [<num_features> [<feature args>...]]``

The clock starts at construction (table load).  A bio is mapped while
*down* iff ``whole seconds since construction mod (up + down) >= up``; the
decision is taken once, at map time.  While down:

* ``error_reads``: reads fail with EIO;
* ``drop_writes``: write-direction bios (writes, flushes, discards,
  write-zeroes) complete successfully without being issued;
* ``error_writes``: write-direction bios fail with EIO;
* ``corrupt_bio_byte <N> <r|w> <value> <flags>``: byte N (1-based) of a bio
  whose op-and-flags word has every bit of ``flags`` is set to ``value``; for
  writes in a private copy, for reads after a successful read;
* ``random_read_corrupt <p>`` / ``random_write_corrupt <p>``: with
  probability p / 1e9 one random byte of the bio gets a random value.

Without features (or when they set nothing) reads and writes fail while down.
The op-and-flags word is pydm's: the op number (read 0, write 1, flush 2,
discard 3, write-zeroes 4) in the low byte, pydm REQ_* flags shifted left 8.
"""

import random
import time

from pydm.bio import READ, WRITE, WRITE_OPS
from pydm.errors import TargetError
from pydm.table import quote_arg
from pydm.target import (DONE, KILL, NOWAIT, REMAPPED, STATUS_TABLE, SUBMITTED, Target,
                         parse_uint)
from pydm.targets.linear import area_block_status, open_area

MAX_FEATURE_ARGS = 11
PROBABILITY_MAX = 1_000_000_000
U32 = 1 << 32


class FlakeyTarget(Target):
    name = "flakey"
    version = (1, 5, 0)
    description = "fault injection: error, drop or corrupt I/O on a schedule"
    features = NOWAIT     # reads are remapped as they are

    def ctr(self, args):
        if len(args) < 4:
            raise TargetError("Invalid argument count")
        self.up = parse_uint(args[2], "up interval", U32)
        self.down = parse_uint(args[3], "down interval", U32)
        if self.up + self.down == 0:
            raise TargetError("Total (up + down) interval is zero")
        if self.up + self.down >= U32:
            raise TargetError("Interval overflow")
        self.error_reads = self.drop_writes = self.error_writes = False
        self.corrupt = None               # (nth, direction, value, flags)
        self.random_read = self.random_write = 0
        self._parse_features(args[4:])
        self.dev, self.start = open_area(self, args[0], args[1])
        self.delta = self.start - self.begin
        self.num_discard_bios = 1
        self.num_write_zeroes_bios = 1
        self._rng = random.Random()
        self.started = time.monotonic()

    def _parse_features(self, rest):
        if not rest:
            n = 0
        else:
            n = parse_uint(rest[0], "number of feature args", MAX_FEATURE_ARGS + 1)
            if n > len(rest) - 1:
                raise TargetError("Insufficient feature arguments")
            if n < len(rest) - 1:
                raise TargetError("Invalid argument count: words after the features")
        words = rest[1:1 + n]
        seen = set()
        i = 0
        while i < len(words):
            name = words[i]
            i += 1
            if name in ("error_reads", "drop_writes", "error_writes"):
                if name in seen:
                    raise TargetError(f"Feature {name} duplicated")
                if name == "drop_writes" and "error_writes" in seen or \
                        name == "error_writes" and "drop_writes" in seen:
                    raise TargetError("Feature drop_writes is mutually exclusive "
                                      "with error_writes")
                seen.add(name)
                setattr(self, name, True)
            elif name == "corrupt_bio_byte":
                if name in seen:
                    raise TargetError("Feature corrupt_bio_byte duplicated")
                if i + 4 > len(words):
                    raise TargetError("Feature corrupt_bio_byte requires 4 parameters")
                nth = parse_uint(words[i], "corrupt_bio_byte Nth byte", U32)
                if nth == 0:
                    raise TargetError("Invalid corrupt bio byte parameter: Nth byte is 1-based")
                direction = words[i + 1]
                if direction not in ("r", "w"):
                    raise TargetError("Invalid corrupt bio direction (r or w)")
                value = parse_uint(words[i + 2], "corrupt bio byte value", 256)
                flags = parse_uint(words[i + 3], "corrupt bio flags mask", U32)
                self.corrupt = (nth, direction, value, flags)
                seen.add(name)
                i += 4
            elif name in ("random_read_corrupt", "random_write_corrupt"):
                if i >= len(words):
                    raise TargetError(f"Feature {name} requires a parameter")
                p = parse_uint(words[i], f"{name} probability", PROBABILITY_MAX + 1)
                i += 1
                attr = "random_read" if name == "random_read_corrupt" else "random_write"
                if p and getattr(self, attr):
                    raise TargetError(f"Feature {name} duplicated")
                if p:
                    setattr(self, attr, p)
            else:
                raise TargetError(f"Unrecognised flakey feature requested: {name}")
        write_corrupt = self.random_write or (self.corrupt and self.corrupt[1] == "w")
        read_corrupt = self.random_read or (self.corrupt and self.corrupt[1] == "r")
        if (self.drop_writes or self.error_writes) and write_corrupt:
            raise TargetError("drop_writes/error_writes are incompatible with "
                              "write corruption")
        if self.error_reads and read_corrupt:
            raise TargetError("error_reads is incompatible with read corruption")
        if not (self.error_reads or self.drop_writes or self.error_writes
                or self.corrupt or self.random_read or self.random_write):
            # The kernel's 2025 rule: nothing chosen means fail all I/O while down.
            self.error_reads = self.error_writes = True

    def is_down(self) -> bool:
        elapsed = int(time.monotonic() - self.started)
        return elapsed % (self.up + self.down) >= self.up

    def map(self, bio):
        down = bio.private = self.is_down()
        if down:
            op = bio.op
            if op == READ:
                if self.error_reads:
                    return KILL
            elif op in WRITE_OPS:
                if self.drop_writes:
                    bio.complete(0)
                    return SUBMITTED
                if self.error_writes:
                    return KILL
                if op == WRITE:
                    self._corrupt_write(bio)
        bio.dev = self.dev
        if bio.nr_sectors:
            bio.sector += self.delta
        return REMAPPED

    def _matches(self, bio, direction):
        c = self.corrupt
        if c is None or c[1] != direction:
            return False
        word = bio.op | (bio.flags << 8)
        return word & c[3] == c[3] and len(bio.data) >= c[0]

    def _corrupt_write(self, bio):
        fixed = self._matches(bio, "w")
        rnd = self.random_write and self._rng.randrange(PROBABILITY_MAX) < self.random_write
        if not (fixed or rnd):
            return
        # Corrupt a private copy: the submitter's buffer stays intact.
        copy = bytearray(bio.data)
        if fixed:
            copy[self.corrupt[0] - 1] = self.corrupt[2]
        if rnd:
            copy[self._rng.randrange(len(copy))] = self._rng.randrange(256)
        bio.data = memoryview(copy)

    def end_io(self, bio, status):
        if status == 0 and bio.private and bio.op == READ:
            if self._matches(bio, "r"):
                bio.data[self.corrupt[0] - 1] = self.corrupt[2]
            if self.random_read and self._rng.randrange(PROBABILITY_MAX) < self.random_read:
                bio.data[self._rng.randrange(len(bio.data))] = self._rng.randrange(256)
        return DONE, status

    def status(self, type_):
        if type_ != STATUS_TABLE:
            return ""
        words = []
        if self.error_reads:
            words.append("error_reads")
        if self.drop_writes:
            words.append("drop_writes")
        elif self.error_writes:
            words.append("error_writes")
        if self.corrupt:
            nth, d, v, f = self.corrupt
            words += ["corrupt_bio_byte", str(nth), d, str(v), str(f)]
        if self.random_read:
            words += ["random_read_corrupt", str(self.random_read)]
        if self.random_write:
            words += ["random_write_corrupt", str(self.random_write)]
        return " ".join([quote_arg(self.dev.ref), str(self.start), str(self.up),
                         str(self.down), str(len(words))] + words)

    def iterate_devices(self):
        return [(self.dev, self.start, self.len)]

    def block_status(self, context, sector, nr_sectors):
        return area_block_status(self.dev, context, sector + self.delta, nr_sectors)


TARGET = FlakeyTarget
