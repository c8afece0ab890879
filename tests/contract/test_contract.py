"""The target contract, run on every target (see conftest.CASES).

Each test states one promise a target makes to the core and to clients:
construction is all or nothing, table output loads back, status has its
shape, suspend holds I/O, remove never hangs, messages are checked, flush and
FUA reach durable storage when advertised, discard and zeroing are refused
when not, and the NBD export says exactly what the capabilities say.
"""

import errno
import json
import threading

import pytest

from contract_cases import CASES, SECTORS, new_control
from helpers import Waiter, do_io
from nbd_support import need, run, start_server
from pydm.bio import Bio, DISCARD, FLUSH, READ, REQ_FUA, REQ_PREFLUSH, WRITE, WRITE_ZEROES
from pydm.errors import DMError
from pydm.registry import TargetRegistry
from volatile_store import VolatilePool

PATTERN = bytes(range(256)) * 16          # 4 KiB


def expect_read(case, status, data, want):
    if case.data == "error":
        assert status == errno.EIO
    elif case.data == "zero":
        assert status == 0 and data == bytes(len(want))
    else:
        assert status == 0 and data == want


def test_every_installed_target_has_a_case():
    installed = {name for name, _v, _d in TargetRegistry().available()}
    assert installed <= {c.name for c in CASES}, "add a Case to tests/contract/conftest.py"


# --------------------------------------------------------- construction
def test_constructor_errors_are_one_line_and_release_everything(case, control, tmp_path):
    d = str(tmp_path)
    control.create("keep", case.table(d))            # holds its files and type
    before = (control.stores.open_count(), control.claims.count(),
              control.targets.in_use(case.name))
    variants = [case.args(d) + " junk"] + [b(d) for b in case.bad]
    for args in variants:
        with pytest.raises(DMError) as e:
            control.create("bad", f"0 {SECTORS} {case.name} {args}\n", cwd=d)
        assert "\n" not in str(e.value) and f"{case.name}:" in str(e.value), args
        assert "bad" not in control.names()
        assert (control.stores.open_count(), control.claims.count(),
                control.targets.in_use(case.name)) == before, args


def test_table_output_loads_back_unchanged(case, control, tmp_path):
    control.create("a", case.table(str(tmp_path)))
    (start, n, ttype, params), = control.table("a")
    text = f"{start} {n} {ttype} {params}".rstrip() + "\n"
    control.load("a", text)                          # absolute paths: no cwd
    control.resume("a")
    assert control.table("a") == [(start, n, ttype, params)]
    assert control.get("a").size_sectors == SECTORS


def test_status_lines_have_their_shape(case, control, tmp_path):
    control.create("a", case.table(str(tmp_path)))
    for kind in ("info", "table"):
        lines = control.status("a") if kind == "info" else control.table("a")
        (start, n, ttype, text), = lines
        assert (start, n, ttype) == (0, SECTORS, case.name)
        assert isinstance(text, str) and "\n" not in text and len(text) < 4096


# ------------------------------------------------------- I/O and control
def test_suspend_holds_io_and_resume_releases_it(case, control, tmp_path):
    dev = control.create("a", case.table(str(tmp_path)))
    control.suspend("a")
    w = Waiter()
    dev.submit(Bio(WRITE, 0, 8, memoryview(bytearray(PATTERN)), 0, w))
    assert not w.event.is_set() and dev.info()["deferred"] == 1
    control.resume("a")
    assert w.wait() == (errno.EIO if case.data == "error" else 0)
    status, data = do_io(dev, READ, 0, 8)
    expect_read(case, status, bytes(data), PATTERN)


def test_remove_under_io_completes_every_bio_once(case, control, tmp_path):
    dev = control.create("a", case.table(str(tmp_path)))
    waiters = [Waiter() for _ in range(64)]
    for i, w in enumerate(waiters):
        op = WRITE if i % 2 else READ
        dev.submit(Bio(op, (i * 8) % SECTORS, 8, memoryview(bytearray(PATTERN)), 0, w))
    t = threading.Thread(target=control.remove, args=("a",))
    t.start()
    t.join(30)
    assert not t.is_alive(), "remove hung"
    for w in waiters:
        w.wait(10)
        assert w.calls == 1
    assert "a" not in control.names()


def test_bad_messages_are_refused(case, control, tmp_path):
    control.create("a", case.table(str(tmp_path)))
    with pytest.raises(DMError) as e:
        control.message("a", 0, "no_such_message 1 2")
    assert e.value.errno == errno.EINVAL and "\n" not in str(e.value)
    for m in case.messages:
        control.message("a", 0, m)


def test_discard_and_zeroes_are_refused_unless_advertised(case, control, tmp_path):
    dev = control.create("a", case.table(str(tmp_path)))
    caps = dev.capabilities()
    for op, offered in ((DISCARD, caps.discard), (WRITE_ZEROES, caps.write_zeroes)):
        status, _ = do_io(dev, op, 8, 8)
        if not offered:
            assert status == errno.EOPNOTSUPP
        else:
            assert status == (errno.EIO if case.data == "error" else 0)
            if case.data != "error":
                s, data = do_io(dev, READ, 8, 8)
                assert s == 0 and data == bytes(4096)


@pytest.mark.parametrize("how", ["flush", "fua"])
def test_flush_and_fua_reach_durable_storage_when_advertised(case, tmp_path, how):
    """Behind every store a volatile cache: after a power cut only what a
    flush (or a FUA write) made durable is left, and a new stack over the
    same files must read it back."""
    d = str(tmp_path)
    pool = VolatilePool()
    c = new_control(pool)
    dev = c.create("a", case.table(d))
    caps = dev.capabilities()
    if not (caps.flush if how == "flush" else caps.fua):
        # nothing it keeps is volatile (zero, error): nothing to check but that
        c.shutdown()
        assert case.data != "store", "a target that keeps data must offer flush and FUA"
        return
    flags = REQ_FUA if how == "fua" else 0
    assert do_io(dev, WRITE, 16, data=PATTERN, flags=flags)[0] == 0
    if how == "flush":
        assert do_io(dev, FLUSH, 0, flags=REQ_PREFLUSH)[0] == 0
    pool.power_cut()
    c.shutdown()
    again = new_control()
    try:
        dev = again.create("a", case.table(d))
        status, data = do_io(dev, READ, 16, 8)
        expect_read(case, status, bytes(data), PATTERN)
    finally:
        again.shutdown()


# ------------------------------------------------------------------ NBD
def nbdinfo(served, export):
    need("nbdinfo")
    r = run(["nbdinfo", "--json", served.uri(export)])
    return json.loads(r.stdout)["exports"][0]


def expected_flags(caps, readonly):
    return {
        "is_read_only": readonly,
        "can_flush": caps.flush, "can_fua": caps.fua,
        "can_trim": caps.discard and not readonly,
        "can_zero": caps.write_zeroes and not readonly,
        "can_fast_zero": caps.write_zeroes and not readonly,
        "can_multi_conn": caps.multi_conn, "can_cache": caps.cache,
        "block_size_minimum": caps.min_block,
        "block_size_preferred": caps.preferred_block,
        "block_size_maximum": caps.max_block,
    }


def test_nbd_export_says_what_the_capabilities_say(case, control, tmp_path):
    d = str(tmp_path)
    dev = control.create("a", case.table(d))
    # and a second device stacked on it, which must inherit them
    control.create("top", f"0 {SECTORS} linear dm:a 0\n")
    control.create("ro", f"0 {SECTORS} linear dm:top 0\n", readonly=True)
    served = start_server(control, d)
    try:
        caps = dev.capabilities()
        if case.data == "store":
            assert caps.flush and caps.fua
        else:
            assert not caps.flush and not caps.fua     # nothing volatile to flush
        for name, readonly in (("a", False), ("top", False), ("ro", True)):
            info = nbdinfo(served, name)
            want = expected_flags(control.get(name).capabilities(), readonly)
            assert {k: info.get(k) for k in want} == want, name
        assert expected_flags(control.get("top").capabilities(), False) == \
            expected_flags(caps, False)
        contexts = nbdinfo(served, "a")["contexts"]
        assert ("base:allocation" in contexts) == caps.extents
    finally:
        served.server.stop()
