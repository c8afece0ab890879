"""The era target live: constructor checks, write tracking, messages, the review race."""

import errno
import json
import random
import threading
import time

import pytest

from era_patches import count_mark_commits, fail_next_commit, without_quiesce
from helpers import era_control, Waiter, do_io, make_image, trace_seen
from pydm.bio import Bio, FLUSH, READ, REQ_PREFLUSH, WRITE
from pydm.errors import DMError

BS = 8                      # era block: 8 sectors = 4 KiB
NR = 256                    # era blocks in the test device


@pytest.fixture
def env(tmp_path):
    with era_control(tmp_path, NR, BS) as c:
        yield c, tmp_path


def era_table(tmp_path, origin=None, bs=BS, nr=NR):
    origin = origin or f"{tmp_path}/origin.img"
    return f"0 {nr * bs} era {tmp_path}/meta.img {origin} {bs}\n"


def changed(c, name, since, snapshot=False):
    text = f"changed_since {since}" + (" snapshot" if snapshot else "")
    r = json.loads(c.message(name, 0, text))
    return {b for lo, hi in r["ranges"] for b in range(lo, hi)}, r


def status(c, name):
    (_s, _n, _t, line), = c.status(name)
    return line.split()


def current_era(c, name):
    return int(status(c, name)[2])


def healthy(c, name):
    """The target has not failed (its status is not ``Error``)."""
    return status(c, name) != ["Error"]


def write_block(dev, blk, byte=b"w", flags=0):
    return do_io(dev, WRITE, blk * BS, data=byte * (BS * 512), flags=flags)[0]


@pytest.fixture
def mark_commits(monkeypatch):
    return count_mark_commits(monkeypatch)


@pytest.mark.parametrize("bs,words", [
    ("0", "Invalid block size 0"), ("7", "Invalid block size 7"),
    ("12", "Invalid block size 12"), ("8x", "Invalid block size: '8x'"),
    ("-8", "Invalid block size"), ("4294967296", "Invalid block size"),
])
def test_block_size_validated_before_use(env, bs, words):
    c, tmp = env
    with pytest.raises(DMError) as e:
        c.create("e", f"0 2048 era {tmp}/meta.img {tmp}/origin.img {bs}\n")
    assert words in str(e.value) and e.value.errno == errno.EINVAL
    assert c.stores.open_count() == 0


def test_constructor_failures_release_everything(env):
    c, tmp = env
    make_image(tmp / "tiny.img", 4096)
    for table, words in [
        (f"0 2048 era {tmp}/meta.img {tmp}/origin.img\n", "Invalid argument count"),
        (f"0 {NR * BS * 2} era {tmp}/meta.img {tmp}/origin.img 8\n", "too small"),
        (f"0 2048 era {tmp}/nometa.img {tmp}/origin.img 8\n", "cannot open"),
        (f"0 2048 era {tmp}/meta.img {tmp}/none.img 8\n", "cannot open"),
        (f"0 2048 era {tmp}/tiny.img {tmp}/origin.img 8\n", "metadata"),
    ]:
        with pytest.raises(DMError) as e:
            c.create("e", table)
        assert words in str(e.value), str(e.value)
        assert c.stores.open_count() == 0 and c.names() == []


def test_existing_metadata_with_other_block_size_refused(env):
    c, tmp = env
    c.create("e", era_table(tmp))
    c.remove("e")
    with pytest.raises(DMError, match="block size"):
        c.create("e", era_table(tmp, bs=16, nr=NR // 2))


def test_fresh_device_runs_at_era_1_and_tracks_writes(env, mark_commits):
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    st = status(c, "e")
    assert st[0] == "8" and st[2] == "1" and st[3] == "-"
    used, total = map(int, st[1].split("/"))
    assert 0 < used < total == 1024
    assert c.table("e") == [(0, NR * BS, "era", f"{tmp}/meta.img {tmp}/origin.img 8")]
    for b in (3, 4, 100):
        assert write_block(dev, b) == 0
    assert do_io(dev, READ, 0, 64)[0] == 0
    assert changed(c, "e", 1)[0] == {3, 4, 100}
    c.message("e", 0, "checkpoint")
    assert current_era(c, "e") == 2
    assert write_block(dev, 7) == 0
    assert write_block(dev, 3) == 0
    assert changed(c, "e", 2)[0] == {3, 7}
    assert changed(c, "e", 1)[0] == {3, 4, 7, 100}
    # a write spanning two era blocks marks both
    assert do_io(dev, WRITE, 20 * BS + 4, data=b"s" * 4096)[0] == 0
    assert changed(c, "e", 2)[0] == {3, 7, 20, 21}
    # one bio over ten blocks, two of them already marked, stays one bio
    # and marks all ten in one commit
    n = mark_commits()
    assert do_io(dev, WRITE, 19 * BS, data=b"m" * (10 * BS * 512))[0] == 0
    assert mark_commits() == n + 1
    assert changed(c, "e", 2)[0] == {3, 7} | set(range(19, 29))
    assert do_io(dev, WRITE, 19 * BS, data=b"n" * (10 * BS * 512))[0] == 0
    assert mark_commits() == n + 1          # all marked: no commit
    with open(tmp / "origin.img", "rb") as f:
        f.seek(100 * BS * 512)
        assert f.read(4096) == b"w" * 4096


def test_flush_and_reads_do_not_mark_or_commit(env, mark_commits):
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    assert do_io(dev, READ, 0, 16)[0] == 0
    assert mark_commits() == 0
    assert changed(c, "e", 1)[0] == set()


def test_messages_and_snapshot(env):
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    write_block(dev, 5)
    with pytest.raises(DMError, match="unrecognised message"):
        c.message("e", 0, "bogus")
    with pytest.raises(DMError, match="takes no arguments"):
        c.message("e", 0, "checkpoint now")
    with pytest.raises(DMError, match="no metadata snapshot"):
        c.message("e", 0, "drop_metadata_snap")
    c.message("e", 0, "TAKE_METADATA_SNAP")          # case-insensitive, as the kernel
    st = status(c, "e")
    assert st[2] == "2" and st[3] != "-"
    with pytest.raises(DMError, match="already exists"):
        c.message("e", 0, "take_metadata_snap")
    write_block(dev, 9)
    # the snapshot answers as of take-snap time; the live view sees the new write
    assert changed(c, "e", 1, snapshot=True)[0] == {5}
    assert changed(c, "e", 1)[0] == {5, 9}
    c.message("e", 0, "drop_metadata_snap")
    assert status(c, "e")[3] == "-"
    with pytest.raises(DMError, match="no metadata snapshot"):
        changed(c, "e", 1, snapshot=True)


def test_suspend_resume_rolls_over_and_survives_reload(env):
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    write_block(dev, 1)
    c.suspend("e")
    c.resume("e")
    assert current_era(c, "e") == 2
    write_block(dev, 2)
    # reload the same table: the new target reopens the metadata after the old one
    c.load("e", era_table(tmp))
    c.resume("e")
    assert current_era(c, "e") == 3
    assert changed(c, "e", 1)[0] == {1, 2}
    c.remove("e")
    dev = c.create("e", era_table(tmp))
    assert current_era(c, "e") == 4
    assert changed(c, "e", 2)[0] == {2}


def test_closed_loop_first_writes_share_commits(env, mark_commits):
    """Like fio at iodepth 16: each completion sends a write to a new block.
    Every write lands and is marked; commits carry several writes each."""
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    blocks = list(range(NR))
    random.Random(5).shuffle(blocks)
    todo = iter(blocks)
    lock = threading.Lock()
    statuses = []
    all_done = threading.Event()

    def send():
        with lock:
            blk = next(todo, None)
        if blk is not None:
            data = memoryview(bytearray(blk.to_bytes(2, "little") * (BS * 256)))
            dev.submit(Bio(WRITE, blk * BS, BS, data, 0, done))

    def done(b):
        with lock:
            statuses.append(b.status)
            if len(statuses) == NR:
                all_done.set()
        send()
    for _ in range(16):
        send()
    assert all_done.wait(30)
    assert statuses == [0] * NR
    assert changed(c, "e", 1)[0] == set(range(NR))
    assert mark_commits() < NR // 2
    with open(tmp / "origin.img", "rb") as f:
        for blk in (blocks[0], blocks[-1]):
            f.seek(blk * BS * 512)
            assert f.read(2) == blk.to_bytes(2, "little")


@pytest.mark.parametrize("interrupt", [False, True])
def test_group_commit_wait_is_bounded_and_yields_to_messages(env, interrupt):
    """The worker waits for the writes the last commit released, but a write
    whose successors never come still completes (after at most the last
    commit's duration), and a call into the worker (here: status) ends the
    wait at once."""
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    worker = dev.live.targets[0].worker
    assert write_block(dev, 1) == 0
    # as if a commit that took this long had just released 100 writes
    worker.call(worker.note_commit, 60.0 if interrupt else 0.2, 100)
    w = Waiter()
    with trace_seen("worker_gather", lambda f: f["worker"] == worker.name) as gathering:
        dev.submit(Bio(WRITE, 9 * BS, BS, memoryview(bytearray(BS * 512)), 0, w))
        assert gathering.wait(10)
    if interrupt:
        answer = []
        asker = threading.Thread(target=lambda: answer.append(status(c, "e")))
        asker.start()
        asker.join(10)
        assert answer and answer[0][2] == "1", "status waited for the gathering"
    assert w.wait(10) == 0
    assert 9 in changed(c, "e", 1)[0]
    assert write_block(dev, 10) == 0     # a lone write wakes the worker again


def _slow_origin(c, tmp, ms):
    c.create("slow", f"0 {NR * BS} delay {tmp}/origin.img 0 0 {tmp}/origin.img 0 {ms}\n")
    return "dm:slow"


@pytest.mark.parametrize("quiesce", [True, False])
def test_review_race_write_in_flight_at_checkpoint(env, monkeypatch, quiesce, rv_session):
    """A write already past map (block marked in era N) is in flight when
    checkpoint and take_metadata_snap arrive.  With the quiesce it lands before
    the new era starts, so the backup taken at the snapshot has it; without it,
    it lands afterwards and no era from the new one on records it (and the
    era_drain monitor says so)."""
    if quiesce:
        _race_at_checkpoint(env, quiesce)
        return
    without_quiesce(monkeypatch)
    with rv_session.expect("era_drain", "era_commit") as seen:
        _race_at_checkpoint(env, quiesce)
    assert any("checkpoint_busy" in str(v) for v in seen), [str(v) for v in seen]


def _race_at_checkpoint(env, quiesce):
    c, tmp = env
    dev = c.create("e", era_table(tmp, _slow_origin(c, tmp, 300)))
    assert write_block(dev, 42, b"1") == 0         # marks block 42 in era 1
    w = Waiter()
    done_at = []
    with trace_seen("bio_submit", lambda f: f["dev"] == "slow" and f["op"] == WRITE) as issued:
        dev.submit(Bio(WRITE, 42 * BS, BS, memoryview(bytearray(b"2" * BS * 512)), 0,
                       lambda b: (done_at.append(time.monotonic()), w(b))))
        assert issued.wait(10)                      # past era: in flight to the origin
    c.message("e", 0, "checkpoint")
    c.message("e", 0, "take_metadata_snap")
    snap_at = time.monotonic()
    new_era = current_era(c, "e")
    assert w.wait() == 0
    landed_after_snapshot = done_at[0] > snap_at
    reported = 42 in changed(c, "e", new_era)[0]
    # what a backup needs: landed before the snapshot, or recorded from the new era on
    ok = not landed_after_snapshot or reported
    assert ok == quiesce, (landed_after_snapshot, reported)


def _random_writers_with_checkpoints(c, dev, rounds, seed):
    """Writers hammer random blocks while checkpoints run; returns the writes
    (completion time, block) and the checkpoints (return time, new era)."""
    stop = threading.Event()
    lock = threading.Condition()
    writes = []
    errors = []
    submitted = [0]

    def writer(n):
        rnd = random.Random(seed * 100 + n)
        while not stop.is_set():
            blk = rnd.randrange(NR)

            def done(b, blk=blk):
                if b.status:
                    errors.append(b.status)
                with lock:
                    writes.append((time.monotonic(), blk))
                    lock.notify_all()
            with lock:
                submitted[0] += 1
            dev.submit(Bio(WRITE, blk * BS, BS, memoryview(bytearray(BS * 512)), 0, done))
            time.sleep(rnd.uniform(0, 0.0005))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    checkpoints = []
    try:
        for _ in range(rounds):
            c.message("e", 0, "checkpoint")
            checkpoints.append((time.monotonic(), current_era(c, "e")))
    finally:
        stop.set()
        for t in threads:
            t.join()
    with lock:                                      # every write submitted has ended
        assert lock.wait_for(lambda: len(writes) == submitted[0], 30), \
            (len(writes), submitted[0])
    assert not errors
    return writes, checkpoints


def _missed(c, writes, checkpoints):
    """Writes that completed after a checkpoint but are not in its era onwards."""
    cache = {}
    missed = []
    for t_done, blk in writes:
        era = None
        for t_cp, e in checkpoints:
            if t_cp < t_done:
                era = e
            else:
                break
        if era is None:
            continue
        if era not in cache:
            cache[era] = changed(c, "e", era)[0]
        if blk not in cache[era]:
            missed.append((t_done, blk, era))
    return missed


def test_randomised_checkpoints_never_miss_a_write(env):
    c, tmp = env
    dev = c.create("e", era_table(tmp, _slow_origin(c, tmp, 1)))
    writes, checkpoints = _random_writers_with_checkpoints(c, dev, 1000, seed=1)
    assert len(checkpoints) == 1000 and len(writes) > 1000
    assert _missed(c, writes, checkpoints) == []


def test_without_quiesce_the_random_run_misses_writes(env, monkeypatch, rv_session):
    without_quiesce(monkeypatch)
    c, tmp = env
    with rv_session.expect("era_drain", "era_commit") as seen:
        dev = c.create("e", era_table(tmp, _slow_origin(c, tmp, 20)))
        writes, checkpoints = _random_writers_with_checkpoints(c, dev, 50, seed=2)
        assert _missed(c, writes, checkpoints)
        c.remove("e")
    assert seen              # the monitor saw it too, without any data check


def _tight_era(c, tmp, monkeypatch):
    """An era device over 64 era array blocks on the least metadata the
    target takes, digesting 8 array blocks a step: (device, target, nr)."""
    from pydm.metadata import era_md
    monkeypatch.setattr(era_md, "DIGEST_BLOCKS", 8)
    nr = 64 * era_md.ERAS_PER_BLOCK
    make_image(tmp / "meta.img", era_md.metadata_blocks_wanted(nr) * 4096)
    make_image(tmp / "origin.img", nr * BS * 512)
    dev = c.create("e", era_table(tmp, nr=nr))
    return dev, dev.live.targets[0], nr


def _wait_digest(t, timeout=30):
    deadline = time.monotonic() + timeout
    while t.digesting and time.monotonic() < deadline:
        time.sleep(0.01)


def _archived_left(t):
    return t.worker.call(lambda: t.tracker.md.has_archived())


def test_background_digest_fits_in_tight_metadata(env, monkeypatch):
    """The least metadata the target takes has no room for a second era array:
    after a checkpoint, the archived writeset touches every era array block,
    and the worker's digest, committed step by step, must fit (folded in one
    go it ran out of space, and the target failed writes to unmarked blocks)."""
    from pydm.metadata import era_md
    c, tmp = env
    dev, t, nr = _tight_era(c, tmp, monkeypatch)
    written = list(range(5, nr, era_md.ERAS_PER_BLOCK))
    for b in written:
        assert write_block(dev, b) == 0
    c.message("e", 0, "checkpoint")
    _wait_digest(t)
    assert not t.digesting and healthy(c, "e")
    used, total = map(int, status(c, "e")[1].split("/"))
    assert total - used < 64 // 2, "the metadata must not hold a second era array"
    assert write_block(dev, 0) == 0
    assert changed(c, "e", 1)[0] == set(written) | {0}
    assert changed(c, "e", 2)[0] == {0}


def test_no_digest_while_a_metadata_snapshot_is_held(env, monkeypatch):
    """The writeset take-snap archives waits in the tree while the snapshot
    is held (digesting it would keep a second copy of each era array block
    it rewrites, which tight metadata has no room for) and is digested
    after drop-snap; queries answer the same throughout."""
    from pydm.metadata import era_md
    c, tmp = env
    dev, t, nr = _tight_era(c, tmp, monkeypatch)
    written = set(range(5, nr, era_md.ERAS_PER_BLOCK))
    for b in written:
        assert write_block(dev, b) == 0
    c.message("e", 0, "take_metadata_snap")

    def settle():
        _wait_digest(t)
        assert not t.digesting and healthy(c, "e")
    settle()
    assert _archived_left(t)                   # held back, not failed
    assert write_block(dev, 1) == 0
    assert changed(c, "e", 1, snapshot=True)[0] == written
    assert changed(c, "e", 1)[0] == written | {1}
    c.message("e", 0, "drop_metadata_snap")
    settle()
    assert not _archived_left(t)
    assert changed(c, "e", 1)[0] == written | {1}
    assert changed(c, "e", 2)[0] == {1}


def test_blank_metadata_too_small_to_keep_working_is_refused(env):
    """Blank metadata that could hold the era array but not the writesets
    and a digest window is refused at load, with how much to give, and is
    left blank."""
    c, tmp = env
    nr = 4 << 20                                 # 16 GiB at 4 KiB blocks
    make_image(tmp / "meta.img", 17 << 20)       # the era array alone is 16.1 MiB
    make_image(tmp / "origin.img", nr * BS * 512)
    with pytest.raises(DMError) as e:
        c.create("e", era_table(tmp, nr=nr))
    assert e.value.errno == errno.ENOSPC
    assert "too small for 4194304 era blocks" in str(e.value)
    assert "give it at least 21 MiB" in str(e.value)
    with open(tmp / "meta.img", "rb") as f:
        assert f.read(4096) == bytes(4096)
    assert c.stores.open_count() == 0
    make_image(tmp / "meta.img", 21 << 20)
    c.create("e", era_table(tmp, nr=nr))
    assert status(c, "e")[2] == "1"


def test_metadata_file_made_bigger_lets_the_device_grow(env):
    """Growing the device past what the metadata holds is refused at load
    with the size to give it; once the file is that big, the load is taken,
    the space map takes in the new blocks at resume, and tracking goes on
    (the real era_check agrees)."""
    import shutil
    import subprocess
    c, tmp = env
    make_image(tmp / "meta.img", 1 << 20)
    big = 1 << 20                                   # era blocks after growing (4 GiB)
    make_image(tmp / "origin.img", big * BS * 512)
    dev = c.create("e", era_table(tmp))
    assert write_block(dev, 3) == 0
    with pytest.raises(DMError) as e:
        c.load("e", era_table(tmp, nr=big))
    assert e.value.errno == errno.ENOSPC and "give it at least 6 MiB" in str(e.value)
    with open(tmp / "meta.img", "r+b") as f:
        f.truncate(6 << 20)
    c.load("e", era_table(tmp, nr=big))
    c.suspend("e")
    c.resume("e")
    used, total = map(int, status(c, "e")[1].split("/"))
    assert total == 6 << 8 and used < total
    assert write_block(dev, big - 1) == 0
    assert changed(c, "e", 1)[0] == {3, big - 1}
    c.remove("e")
    if shutil.which("era_check"):
        r = subprocess.run(["era_check", str(tmp / "meta.img")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_checkpoint_out_of_metadata_space_fails_cleanly_and_the_device_goes_on(env, monkeypatch):
    """A held snapshot stops digests, so each checkpoint keeps a writeset:
    tight metadata fills up.  The checkpoint that finds no room fails with
    ENOSPC and what to do; the metadata goes back to its last commit, so
    writes go on being tracked; dropping the snapshot lets the digest fold
    the writesets (in smaller steps while room is short) and checkpoints
    work again."""
    from pydm.metadata import era_md
    c, tmp = env
    dev, t, nr = _tight_era(c, tmp, monkeypatch)
    c.message("e", 0, "take_metadata_snap")
    written = set()
    for i in range(40):
        for b in range(i, nr, era_md.ERAS_PER_BLOCK):
            assert write_block(dev, b) == 0
            written.add(b)
        try:
            c.message("e", 0, "checkpoint")
        except DMError as e:
            full = e
            break
    else:
        pytest.fail("the metadata never filled up")
    assert full.errno == errno.ENOSPC and "drop the metadata snapshot" in str(full)
    era = current_era(c, "e")
    assert healthy(c, "e")
    for b in (nr - 1, nr - 2):
        assert write_block(dev, b) == 0
    # the era the failed checkpoint would have ended goes on
    assert changed(c, "e", era)[0] == set(range(i, nr, era_md.ERAS_PER_BLOCK)) | {nr - 1, nr - 2}
    assert changed(c, "e", 1)[0] == written | {nr - 1, nr - 2}
    c.message("e", 0, "drop_metadata_snap")
    _wait_digest(t)
    assert not _archived_left(t) and healthy(c, "e")
    c.message("e", 0, "checkpoint")
    assert changed(c, "e", 1)[0] == written | {nr - 1, nr - 2}
    c.remove("e")
    import subprocess
    r = subprocess.run(["era_check", str(tmp / "meta.img")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_a_failed_mark_commit_fails_its_writes_only(env, monkeypatch):
    """As the kernel: when the commit of a batch's marks fails, those writes
    fail with EIO and never reach the origin; the metadata goes back to its
    last commit and the next writes are tracked as before."""
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    assert write_block(dev, 1) == 0
    fail_next_commit(monkeypatch)
    assert write_block(dev, 2, b"z") == errno.EIO
    assert healthy(c, "e")
    with open(tmp / "origin.img", "rb") as f:
        f.seek(2 * BS * 512)
        assert f.read(4096) == bytes(4096)         # the failed write went nowhere
    assert write_block(dev, 3) == 0
    assert write_block(dev, 2) == 0
    assert changed(c, "e", 1)[0] == {1, 2, 3}


def test_a_failed_archive_on_suspend_leaves_the_device_usable(env, monkeypatch):
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    assert write_block(dev, 4) == 0
    fails = fail_next_commit(monkeypatch)
    c.suspend("e")
    assert not fails and healthy(c, "e")
    c.resume("e")
    assert current_era(c, "e") == 2
    assert write_block(dev, 5) == 0
    assert changed(c, "e", 1)[0] == {4, 5} and changed(c, "e", 2)[0] == {5}


def test_a_failed_resume_leaves_nothing_half_done(env, monkeypatch):
    """A rollover that fails part-way at resume (here: after allocating a
    new writeset) fails the resume, and the next resume starts from the
    last commit: no block is left allocated and unreferenced."""
    from pydm.metadata import bitset, era_md
    from pydm.metadata.era_check import check
    from pydm.store import FileStore
    c, tmp = env
    dev = c.create("e", era_table(tmp))
    assert write_block(dev, 7) == 0
    c.suspend("e")
    real = era_md.EraMetadata.checkpoint

    def checkpoint_failing_late(self):
        bitset.create(self.bs_info, self.sb.nr_blocks)
        raise era_md.NoSpace(self.sm.nr_blocks)
    monkeypatch.setattr(era_md.EraMetadata, "checkpoint", checkpoint_failing_late)
    with pytest.raises(DMError) as e:
        c.resume("e")
    assert e.value.errno == errno.ENOSPC
    monkeypatch.setattr(era_md.EraMetadata, "checkpoint", real)
    c.resume("e")
    assert current_era(c, "e") == 2 and write_block(dev, 8) == 0
    assert changed(c, "e", 1)[0] == {7, 8}
    c.remove("e")
    assert check(FileStore(str(tmp / "meta.img"), readonly=True)) == (True, [])
