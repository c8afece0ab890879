"""Reads that miss the page cache: served through the connection's io_uring
(``--aio auto``) or inline (``--aio off``), always with the right data.

The image is evicted from the page cache (fdatasync, then
POSIX_FADV_DONTNEED) before reads, so they really go to the disk; which
path a read took is seen in ``pydm.aio.stats()``.
"""

import json
import os
import random
import threading

import pytest

from pydm import aio
from pydm.control import Control
from pydm.nbd import wire as P
from nbd_support import MiB, evict, need, run, start_server
from nbdclient import Client

SIZE = 16 * MiB
BLOCK = 4096



@pytest.fixture(params=["auto", "off"])
def cold(request, tmp_path):
    """Device ``d``: a linear device over a 16 MiB image of random data,
    served with ``--aio`` as the parameter says."""
    if request.param == "auto" and not aio.available():
        pytest.skip("io_uring is not usable here")
    path = str(tmp_path / "cold.img")
    with open(path, "wb") as f:
        f.write(random.Random(7).randbytes(SIZE))
    control = Control()
    control.create("d", f"0 {SIZE >> 9} linear {path} 0")
    s = start_server(control, str(tmp_path), aio=request.param)
    s.path = path
    s.mode = request.param
    yield s
    s.server.stop()
    control.shutdown()


def read_pipelined(c, offsets, length=BLOCK):
    """Send every READ, then take the replies (in whatever order):
    [(offset, data)]."""
    want = {c.send(P.CMD_READ, off, length): off for off in offsets}
    got = []
    while want:
        cookie, error, data = c.reply(lambda _c: length)
        assert error == 0
        got.append((want.pop(cookie), data))
    return got


def check_cold_reads(c, s, image, rnd, count):
    """Evict the image, then ``count`` pipelined 4 KiB reads at random."""
    evict(s.path)
    offsets = [rnd.randrange(SIZE // BLOCK) * BLOCK for _ in range(count)]
    for off, data in read_pipelined(c, offsets):
        assert data == image[off:off + BLOCK], off


def test_pipelined_reads_of_an_evicted_image_are_right(cold):
    with open(cold.path, "rb") as f:
        image = f.read()
    rnd = random.Random(1)
    before = aio.stats()["queued"]
    with Client(cold.addr, "d") as c:
        for _ in range(4):
            check_cold_reads(c, cold, image, rnd, 64)
            for off, data in read_pipelined(c, [0, 4 * MiB, 8 * MiB], MiB):
                assert data == image[off:off + MiB], off
    queued = aio.stats()["queued"] - before
    if cold.mode == "auto":
        assert queued > 0          # misses went to the ring...
    else:
        assert queued == 0         # ...and never with --aio off


def test_a_read_sent_after_a_write_reply_sees_the_write(cold):
    """Whichever path each took (the read cold on the ring or warm inline,
    the write alone or with reads of the same block in flight), a READ
    sent after a WRITE's reply returns the WRITE's data."""
    rnd = random.Random(2)
    with Client(cold.addr, "d") as c:
        for i in range(150):
            block = rnd.randrange(SIZE // BLOCK) * BLOCK
            new = rnd.randbytes(BLOCK)
            if i % 2:
                evict(cold.path)
            # company: reads in flight (one of them of the same block)
            company = [c.send(P.CMD_READ, rnd.randrange(SIZE // BLOCK) * BLOCK, BLOCK)
                       for _ in range(rnd.randrange(0, 8))]
            company.append(c.send(P.CMD_READ, block, BLOCK))
            w = c.send(P.CMD_WRITE, block, BLOCK, data=new)
            pending = set(company) | {w}
            while w in pending:
                cookie, error, _data = c.reply(lambda ck: 0 if ck == w else BLOCK)
                assert error == 0
                pending.discard(cookie)
            if i % 3 == 0:
                evict(cold.path)
            r = c.send(P.CMD_READ, block, BLOCK)
            pending.add(r)
            while pending:
                cookie, error, data = c.reply(lambda ck: 0 if ck == w else BLOCK)
                assert error == 0
                pending.discard(cookie)
                if cookie == r:
                    assert data == new, f"iteration {i}: block {block} read stale data"


def test_fio_verify_with_the_cache_evicted_during_the_run(cold):
    need("fio")
    stop = threading.Event()

    def evicter():
        while not stop.wait(0.005):
            evict(cold.path)

    t = threading.Thread(target=evicter)
    t.start()
    try:
        r = run(["fio", "--name=v", "--ioengine=nbd", f"--uri={cold.uri('d')}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=16", "--size=12m",
                 "--verify=crc32c", "--do_verify=1", "--verify_state_save=0",
                 "--output-format=json"])
    finally:
        stop.set()
        t.join()
    out = r.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["read"]["io_bytes"] == 12 * MiB          # everything read back
    assert "verify" not in r.stderr.lower(), r.stderr


def test_a_read_the_ring_cannot_take_is_retried_by_a_worker(tmp_path):
    """A delay target submits from its timer thread, which has no ring: the
    file answers EAGAIN and the connection reads it again, blocking."""
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.write(random.Random(3).randbytes(4 * MiB))
    with open(path, "rb") as f:
        image = f.read()
    control = Control()
    control.create("slow", f"0 {(4 * MiB) >> 9} delay {path} 0 5")
    s = start_server(control, str(tmp_path))
    try:
        with Client(s.addr, "slow") as c:
            evict(path)
            offsets = [i * 64 * 1024 for i in range(32)]
            for off, data in read_pipelined(c, offsets):
                assert data == image[off:off + BLOCK]
    finally:
        s.server.stop()
        control.shutdown()


def test_an_idle_connection_does_not_poll(cold):
    """The receive polls only while the client answers fast: a client that
    goes quiet costs the server no CPU."""
    with Client(cold.addr, "d") as c:
        for _ in range(50):
            c.pread(0, BLOCK)           # short waits: the window opens
        t0 = os.times()
        stop = threading.Event()
        stop.wait(1.0)                  # the client says nothing for a second
        t1 = os.times()
        busy = (t1.user - t0.user) + (t1.system - t0.system)
        assert busy < 0.3, f"{busy:.2f} s of CPU while the only client was idle"
        assert c.pread(0, BLOCK)


def test_suspend_and_resume_under_cold_reads(cold):
    """The control thread suspends (waiting for every read in flight, some
    of them on the reader's ring) and resumes again and again while a
    client keeps cold reads in flight: every read is answered, right."""
    with open(cold.path, "rb") as f:
        image = f.read()
    stop = threading.Event()
    errors = []

    def churn():
        try:
            while not stop.is_set():
                cold.control.suspend("d", timeout=10)
                cold.control.resume("d")
        except Exception as e:          # reported by the test, not lost in a thread
            errors.append(e)

    t = threading.Thread(target=churn)
    t.start()
    rnd = random.Random(4)
    try:
        with Client(cold.addr, "d") as c:
            for _ in range(20):
                check_cold_reads(c, cold, image, rnd, 32)
    finally:
        stop.set()
        t.join()
    assert not errors, errors
