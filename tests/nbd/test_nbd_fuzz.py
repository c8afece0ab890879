"""Fuzz a live server with mutated recordings of real sessions, while a second
client does verified I/O on another export.

A seeded mutator (bit flips, interesting integers at field offsets, cuts,
splices, insertions) turns a handful of well-formed sessions into thousands
of malformed handshakes and requests.  Each case is one connection: send
everything, half-close, read until the server closes.  The run is bounded in
time (PYDM_FUZZ_SECONDS, default 20) and in cases (PYDM_FUZZ_CASES).

Passing means: the server never dies and logs no internal error (the
conftest fails any test that logs an ERROR), every case ends with the
server closing the connection, the verified client never sees an error or a
wrong byte, and its export holds exactly what it wrote.
"""

import os
import random
import socket
import struct
import threading
import time

from nbd_support import MiB, make_disk
import nbdclient
from nbdclient import Client
from pydm.nbd import protocol as P

SECONDS = float(os.environ.get("PYDM_FUZZ_SECONDS", "20"))
MAX_CASES = int(os.environ.get("PYDM_FUZZ_CASES", "100000"))
SEED = int(os.environ.get("PYDM_FUZZ_SEED", "20261124"))
FUZZ_SIZE = 16 * MiB
VERIFIED = "verified-region"
VERIFIED_SIZE = 8 * MiB


def _opt(opt, data=b""):
    return P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data


def _req(cmd, off, n, flags=0, data=b"", cookie=1):
    return P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, off, n) + data


def _go(name, infos=(P.INFO_NAME, P.INFO_DESCRIPTION, P.INFO_BLOCK_SIZE)):
    return nbdclient.go_data(name, infos)


_meta = nbdclient.meta_data


def _requests(rnd_payload):
    return (_req(P.CMD_READ, 0, 4096, cookie=1) +
            _req(P.CMD_WRITE, 8192, 4096, P.CMD_FLAG_FUA, rnd_payload, cookie=2) +
            _req(P.CMD_WRITE_ZEROES, 65536, 65536, P.CMD_FLAG_NO_HOLE, cookie=3) +
            _req(P.CMD_TRIM, MiB, MiB, cookie=4) +
            _req(P.CMD_FLUSH, 0, 0, cookie=5) +
            _req(P.CMD_BLOCK_STATUS, 0, 4 * MiB, P.CMD_FLAG_REQ_ONE, cookie=6) +
            _req(P.CMD_CACHE, 0, 65536, cookie=7) +
            _req(P.CMD_READ, MiB, 131072, P.CMD_FLAG_DF, cookie=8) +
            _req(P.CMD_BLOCK_STATUS, 0, FUZZ_SIZE, cookie=9) +
            _req(P.CMD_DISC, 0, 0, cookie=10))


def recorded_sessions():
    """Well-formed client byte streams, as real clients send them."""
    payload = bytes(range(256)) * 16
    flags3 = struct.pack(">I", 3)
    return [
        # libnbd style: structured replies, a meta context, GO, then I/O
        flags3 + _opt(P.OPT_STRUCTURED_REPLY) +
        _opt(P.OPT_SET_META_CONTEXT, _meta("fuzz", ["base:allocation"])) +
        _opt(P.OPT_GO, _go("fuzz")) + _requests(payload),
        # old clients: EXPORT_NAME, simple replies
        struct.pack(">I", 1) + _opt(P.OPT_EXPORT_NAME, b"fuzz") + _requests(payload),
        # nbdinfo --list style haggling that ends with ABORT
        flags3 + _opt(P.OPT_EXTENDED_HEADERS) + _opt(P.OPT_STRUCTURED_REPLY) +
        _opt(P.OPT_LIST) + _opt(P.OPT_INFO, _go("fuzz")) +
        _opt(P.OPT_LIST_META_CONTEXT, _meta("fuzz", [])) +
        _opt(P.OPT_LIST_META_CONTEXT, _meta("fuzz", ["base:", "qemu:"])) +
        _opt(P.OPT_STARTTLS) + _opt(77, b"junk") + _opt(P.OPT_ABORT),
        # GO without structured replies
        flags3 + _opt(P.OPT_GO, _go("fuzz", ())) + _requests(payload),
    ]


INTERESTING = [0, 1, 2, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x7FFFFFFF, 0x80000000,
               0xFFFFFFFF, 512, 4096, FUZZ_SIZE, FUZZ_SIZE - 512, FUZZ_SIZE + 512,
               32 * MiB, 32 * MiB + 1, 1 << 63, (1 << 64) - 1, P.REQUEST_MAGIC, P.IHAVEOPT]


def mutate(rnd, sessions):
    data = bytearray(rnd.choice(sessions))
    for _ in range(rnd.randint(1, 4)):
        kind = rnd.randrange(8)
        if not data:
            break
        pos = rnd.randrange(len(data))
        if kind == 0:                                   # bit flips
            data[pos] ^= 1 << rnd.randrange(8)
        elif kind == 1:                                 # an interesting byte
            data[pos] = rnd.choice((0, 0xFF, 0x7F, 0x80, 0x01))
        elif kind in (2, 3):                            # an interesting u32/u64
            width = 4 if kind == 2 else 8
            v = rnd.choice(INTERESTING) & ((1 << (8 * width)) - 1)
            pos = min(pos, max(0, len(data) - width))
            data[pos:pos + width] = v.to_bytes(width, "big")
        elif kind == 4:                                 # cut the stream short
            del data[pos:]
        elif kind == 5:                                 # random bytes inserted
            data[pos:pos] = rnd.randbytes(rnd.randint(1, 64))
        elif kind == 6:                                 # a slice repeated
            end = min(len(data), pos + rnd.randint(1, 256))
            data[pos:pos] = data[pos:end] * rnd.randint(1, 8)
        else:                                           # spliced with another session
            other = rnd.choice(sessions)
            data[pos:] = other[rnd.randrange(len(other)):]
    return bytes(data)


def run_case(addr, blob, timeout=10.0):
    """Send one case; True once the server has closed the connection."""
    s = socket.create_connection(addr, timeout)
    try:
        try:
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass            # the server may hang up before it has read it all
        got = 0
        while True:
            try:
                chunk = s.recv(1 << 16)
            except ConnectionResetError:
                return True, got
            if not chunk:
                return True, got
            got += len(chunk)
    except socket.timeout:
        return False, 0
    finally:
        s.close()


class Verifier(threading.Thread):
    """Random writes, zeroes and reads on its own export, checked against a model."""

    def __init__(self, addr, stop):
        super().__init__(daemon=True)
        self.addr = addr
        self.stop = stop
        self.model = bytearray(VERIFIED_SIZE)
        self.ops = 0
        self.failure = None

    def run(self):
        rnd = random.Random(SEED + 1)
        try:
            with Client(self.addr, VERIFIED) as c:
                c.pwrite(0, bytes(VERIFIED_SIZE))
                while not self.stop.is_set():
                    off = rnd.randrange(0, VERIFIED_SIZE // 512) * 512
                    n = min(rnd.choice((512, 4096, 65536, 262144)), VERIFIED_SIZE - off)
                    op = rnd.randrange(10)
                    if op < 4:
                        data = rnd.randbytes(n)
                        c.pwrite(off, data, P.CMD_FLAG_FUA if op == 0 else 0)
                        self.model[off:off + n] = data
                    elif op == 4:
                        c.zero(off, n)
                        self.model[off:off + n] = bytes(n)
                    elif op == 5:
                        c.flush()
                    else:
                        got = c.pread(off, n)
                        if got != self.model[off:off + n]:
                            raise AssertionError(f"verified read at {off}+{n} differs")
                    self.ops += 1
        except Exception as e:           # reported by the test, not lost in a thread
            self.failure = e


def test_fuzz_live_server(tmp_path, capsys):
    from nbd_support import start_server
    from pydm.control import Control
    control = Control()
    fuzz_img = make_disk(tmp_path / "fuzz.img", FUZZ_SIZE)
    ver_img = make_disk(tmp_path / "verified.img", VERIFIED_SIZE, ())
    control.create("fuzz", f"0 {FUZZ_SIZE >> 9} linear {fuzz_img} 0")
    control.create(VERIFIED, f"0 {VERIFIED_SIZE >> 9} linear {ver_img} 0")
    served = start_server(control, str(tmp_path))
    stop = threading.Event()
    verifier = Verifier(served.addr, stop)
    verifier.start()
    sessions = recorded_sessions()
    counts = {"cases": 0, "closed": 0, "reply_bytes": 0, "hung": 0}
    lock = threading.Lock()
    deadline = time.monotonic() + SECONDS

    def fuzzer(n):
        rnd = random.Random(SEED * 31 + n)
        while time.monotonic() < deadline:
            with lock:
                if counts["cases"] >= MAX_CASES:
                    return
                counts["cases"] += 1
            closed, got = run_case(served.addr, mutate(rnd, sessions))
            with lock:
                counts["closed" if closed else "hung"] += 1
                counts["reply_bytes"] += got

    try:
        # the recordings themselves are valid sessions the server completes
        for blob in sessions:
            closed, got = run_case(served.addr, blob)
            assert closed and got > 0
        fuzzers = [threading.Thread(target=fuzzer, args=(i,)) for i in range(3)]
        for t in fuzzers:
            t.start()
        for t in fuzzers:
            t.join()
    finally:
        stop.set()
        verifier.join(30)
    try:
        assert verifier.failure is None, f"verified client failed: {verifier.failure!r}"
        assert verifier.ops > 100
        assert counts["hung"] == 0 and counts["closed"] == counts["cases"]
        assert counts["cases"] >= 1000, counts
        with Client(served.addr, VERIFIED) as c:          # still serving, data intact
            assert c.pread(0, VERIFIED_SIZE) == verifier.model
        with open(ver_img, "rb") as f:
            assert f.read() == verifier.model
    finally:
        served.server.stop()
        control.shutdown()
    with capsys.disabled():
        print(f"\nfuzz: {counts['cases']} malformed sessions in {SECONDS:.0f} s "
              f"(seed {SEED}), {counts['reply_bytes']} reply bytes, all closed cleanly; "
              f"verified client: {verifier.ops} checked operations, no error")
