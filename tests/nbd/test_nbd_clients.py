"""Real NBD clients against pydm: nbdinfo, nbdsh, nbdcopy, qemu-img, qemu-io, fio.

Each test drives one installed client through a live in-process server (see
conftest.served) and checks what the client reports against what the images
really hold.
"""

import json
import os
import random
import subprocess
import textwrap


from nbd_support import DISK_SIZE, MiB, make_disk, need, run, start_server
from pydm.control import Control
from pydm.targets.linear import LinearTarget

# nbdsh runs "python3 -mnbd" from PATH: it must find Debian's python3, which
# has the libnbd bindings (neither the venv nor a pyenv python has them).
NBDSH = ["/usr/bin/nbdsh"]
NBDSH_ENV = dict(os.environ, PATH="/usr/bin:/bin:" + os.environ.get("PATH", ""))


def nbdsh(uri, script, check=True):
    """Run an nbdsh script, connected to ``uri`` as ``h`` unless uri is None."""
    need("nbdsh")
    args = [*NBDSH] + (["-u", uri] if uri else []) + ["-c", textwrap.dedent(script)]
    return run(args, check=check, env=NBDSH_ENV)


# ----------------------------------------------------------------- nbdinfo
def test_nbdinfo_export(served):
    need("nbdinfo")
    out = json.loads(run(["nbdinfo", "--json", served.uri("disk")]).stdout)
    assert out["protocol"] == "newstyle-fixed" and out["TLS"] is False
    assert out["structured"] is True
    [e] = out["exports"]
    assert e["export-name"] == "disk" and e["export-size"] == DISK_SIZE
    assert e["contexts"] == ["base:allocation"]
    assert e["is_read_only"] is False and e["can_multi_conn"] is True
    assert (e["block_size_minimum"], e["block_size_preferred"],
            e["block_size_maximum"]) == (512, 4096, 32 * MiB)
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_cache", "can_df"):
        assert e[flag] is True, flag


def test_nbdinfo_list(served):
    need("nbdinfo")
    out = json.loads(run(["nbdinfo", "--json", "--list", served.uri()]).stdout)
    got = {e["export-name"]: e for e in out["exports"]}
    assert set(got) == {"disk", "ro"}
    assert got["ro"]["is_read_only"] is True and got["ro"]["export-size"] == 4 * MiB
    assert "pydm device disk" in got["disk"]["description"]


def test_nbdinfo_map_follows_holes(served):
    need("nbdinfo")
    lines = run(["nbdinfo", "--map", served.uri("disk")]).stdout.split("\n")
    rows = [ln.split() for ln in lines if ln.strip()]
    got = [(int(r[0]), int(r[1]), int(r[2])) for r in rows]
    assert got == [(0, MiB, 0), (MiB, 7 * MiB, 3), (8 * MiB, MiB, 0),
                   (9 * MiB, DISK_SIZE - 9 * MiB, 3)]
    totals = run(["nbdinfo", "--map", "--totals", served.uri("disk")]).stdout
    assert "3.1" in totals and "96.9" in totals       # 2 of 64 MiB are data


def _can(served, what, export="disk"):
    r = run(["nbdinfo", "--can", what, served.uri(export)], check=False)
    assert r.returncode in (0, 2), r.stderr
    return r.returncode == 0


def test_nbdinfo_can_and_has(served):
    need("nbdinfo")
    for what in ("connect", "flush", "fua", "trim", "zero", "fast-zero", "multi-conn",
                 "cache", "df", "read"):
        assert _can(served, what), what
    assert _can(served, "write")
    assert not _can(served, "write", "ro") and not _can(served, "trim", "ro")
    ro = run(["nbdinfo", "--is", "read-only", served.uri("ro")], check=False)
    assert ro.returncode == 0
    assert run(["nbdinfo", "--is", "read-only", served.uri("disk")],
               check=False).returncode == 2
    help_text = run(["nbdinfo", "--help"], check=False).stdout
    if "--has" in help_text:         # nbdinfo >= 1.16
        assert run(["nbdinfo", "--has", "base:allocation", served.uri("disk")],
                   check=False).returncode == 0
        assert run(["nbdinfo", "--has", "qemu:nope", served.uri("disk")],
                   check=False).returncode == 2
    else:                            # 1.14 (Debian bookworm): the same fact via --json
        e = json.loads(run(["nbdinfo", "--json", served.uri("disk")]).stdout)["exports"][0]
        assert "base:allocation" in e["contexts"]


class NoDiscardTarget(LinearTarget):
    """linear whose table cannot discard: TRIM must not be advertised."""
    name = "nodiscard"

    def ctr(self, args):
        super().ctr(args)
        self.num_discard_bios = 0


def test_flags_follow_the_table(served):
    need("nbdinfo", "nbdsh")
    c = served.control
    c.targets.register(NoDiscardTarget)
    img = make_disk(served.image("nd.img"), 8192 << 9)     # its own: "disk" writes disk.img
    c.create("nd", f"0 8192 nodiscard {img} 0")
    assert not _can(served, "trim", "nd")
    assert _can(served, "zero", "nd") and _can(served, "flush", "nd")
    # A reload to a table that can discard shows up for the next client,
    # and the connection made before the reload keeps working.
    script = f"""
        import nbd, subprocess
        assert not h.can_trim()
        h.pwrite(b"q" * 4096, 0)
        print(subprocess.run(["nbdinfo", "--can", "trim", "{served.uri('nd')}"]).returncode)
        input()
        assert h.pread(4096, 0) == b"q" * 4096
        h.flush()
        print("still here")
    """
    p = subprocess.Popen([*NBDSH, "-u", served.uri("nd"), "-c", textwrap.dedent(script)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         env=NBDSH_ENV)
    assert p.stdout.readline().strip() == "2"       # nbdinfo: cannot trim
    c.load("nd", f"0 8192 linear {img} 0")
    c.resume("nd")
    assert _can(served, "trim", "nd")
    out, _ = p.communicate("\n", timeout=60)
    assert p.returncode == 0 and out.strip() == "still here"


def test_unix_socket(served):
    need("nbdinfo")
    out = json.loads(run(["nbdinfo", "--json", served.unix_uri("disk")]).stdout)
    assert out["exports"][0]["export-size"] == DISK_SIZE


# ------------------------------------------------------------------- nbdsh
def test_nbdsh_script(served):
    nbdsh(None, f"""
        import errno
        h = nbd.NBD()
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
        h.connect_uri("{served.uri('disk')}")
        first = open("{served.image('disk.img')}", "rb").read(4096)
        assert h.get_size() == {DISK_SIZE}
        assert h.get_structured_replies_negotiated()
        assert h.can_multi_conn() and h.can_flush() and h.can_fua() and h.can_trim()
        assert h.can_zero() and h.can_fast_zero() and h.can_cache() and h.can_df()
        assert h.pread(4096, 0) == first
        h.pwrite(b"\\xa5" * 65536, 2 << 20, nbd.CMD_FLAG_FUA)
        assert h.pread(65536, 2 << 20) == b"\\xa5" * 65536
        h.zero(4096, (2 << 20) + 4096, nbd.CMD_FLAG_NO_HOLE)
        assert h.pread(8192, 2 << 20) == b"\\xa5" * 4096 + bytes(4096)
        # a file zeroes with fallocate: fast, so FAST_ZERO runs
        h.pwrite(b"\x5a" * 4096, 0)
        h.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO)
        assert h.pread(4096, 0) == bytes(4096)
        h.pwrite(first, 0)
        h.trim(1 << 20, 4 << 20)
        h.flush()
        h.cache(65536, 0)
        # out of range and misaligned requests: errors, never a hang-up
        # (libnbd checks these itself unless strict mode is off)
        h.set_strict_mode(0)
        for fn in (lambda: h.pread(1024, {DISK_SIZE} - 512),
                   lambda: h.pread(100, 0),
                   lambda: h.trim(512, {DISK_SIZE})):
            try:
                fn()
                raise SystemExit("expected EINVAL")
            except nbd.Error as e:
                assert e.errnum == errno.EINVAL, e
        try:
            h.pwrite(b"x" * 1024, {DISK_SIZE} - 512)
            raise SystemExit("expected ENOSPC")
        except nbd.Error as e:
            assert e.errnum == errno.ENOSPC, e
        seen = []
        def cb(metacontext, offset, entries, err):
            seen.append((metacontext, offset, list(entries)))
        h.block_status(16 << 20, 0, cb)
        ctx, off, ent = seen[0]
        assert ctx == "base:allocation" and off == 0
        assert ent[0:2] == [1 << 20, 0], ent
        seen.clear()
        h.block_status(16 << 20, 0, cb, nbd.CMD_FLAG_REQ_ONE)
        assert seen[0][2] == [1 << 20, 0], seen
        # many requests in flight, answered in whatever order
        bufs = [nbd.Buffer(4096) for _ in range(64)]
        cookies = [h.aio_pread(b, 4096 * i) for i, b in enumerate(bufs)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        for c in cookies:
            assert h.aio_command_completed(c)
        assert bufs[0].to_bytearray() == first
        h.shutdown()
        # block status without a negotiated context is refused by the server
        h2 = nbd.NBD()
        h2.connect_uri("{served.uri('disk')}")
        h2.set_strict_mode(0)
        try:
            h2.block_status(4096, 0, cb)
            raise SystemExit("block status without a context succeeded")
        except nbd.Error as e:
            assert e.errnum == errno.EINVAL, e
        print("nbdsh ok")
    """)


def test_nbdsh_readonly_export(served):
    nbdsh(served.uri("ro"), """
        import errno
        assert h.is_read_only() and not h.can_trim() and not h.can_zero()
        assert len(h.pread(65536, 0)) == 65536
        for fn in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(512, 0)):
            try:
                fn()
                raise SystemExit("write to a read-only export succeeded")
            except nbd.Error as e:
                assert e.errnum in (errno.EPERM, errno.EINVAL), e
    """)


def test_nbdsh_simple_replies(served):
    out = nbdsh(None, f"""
        import nbd
        h = nbd.NBD()
        h.set_request_structured_replies(False)
        h.connect_uri("{served.uri('disk')}")
        assert not h.get_structured_replies_negotiated()
        assert not h.can_df()
        h.pwrite(b"s" * 8192, 3 << 20)
        assert h.pread(8192, 3 << 20) == b"s" * 8192
        print("ok")
    """)
    assert out.stdout.strip() == "ok"


# ----------------------------------------------------------------- nbdcopy
def test_nbdcopy_in_and_out(served, tmp_path):
    need("nbdcopy")
    src = tmp_path / "src.img"
    rnd = random.Random(5)
    with open(src, "wb") as f:
        f.truncate(DISK_SIZE)
        for off in range(0, DISK_SIZE, 4 * MiB):      # half data, half holes
            f.seek(off)
            f.write(rnd.randbytes(2 * MiB))
    run(["nbdcopy", "--connections=4", str(src), served.uri("disk")])
    out = tmp_path / "out.img"
    run(["nbdcopy", served.uri("disk"), str(out)])
    assert open(src, "rb").read() == open(out, "rb").read()
    assert open(served.image("disk.img"), "rb").read() == open(src, "rb").read()


# -------------------------------------------------------------------- qemu
def test_qemu_img(served, tmp_path):
    need("qemu-img")
    uri = served.uri("disk")
    info = json.loads(run(["qemu-img", "info", "--output=json", uri]).stdout)
    assert info["virtual-size"] == DISK_SIZE and info["format"] == "raw"
    m = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    data = [(e["start"], e["length"]) for e in m if e["data"]]
    assert data == [(0, MiB), (8 * MiB, MiB)], m
    assert all(e["zero"] for e in m if not e["data"])
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(DISK_SIZE)
        f.seek(5 * MiB)
        f.write(random.Random(7).randbytes(3 * MiB))
    run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri])
    cmp = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri])
    assert "Images are identical" in cmp.stdout
    back = tmp_path / "back.img"
    run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(back)])
    assert open(back, "rb").read() == open(src, "rb").read()
    # convert zeroed the old data areas: the map now shows the copied range only
    m = json.loads(run(["qemu-img", "map", "--output=json", "-f", "raw", uri]).stdout)
    assert [(e["start"], e["length"]) for e in m if e["data"]] == [(5 * MiB, 3 * MiB)], m
    diff = run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                served.image("ro.img"), served.uri("ro")])
    assert "Images are identical" in diff.stdout


def test_qemu_io_patterns(served):
    need("qemu-io")
    cmds = ["write -P 0xab 0 64k", "read -P 0xab 0 64k",
            "write -P 0xcd -f 64k 64k", "read -P 0xcd 64k 64k",
            "write -z 128k 64k", "read -P 0 128k 64k",
            "aio_write -P 0x11 1M 128k", "aio_write -P 0x22 2M 128k", "aio_flush",
            "read -P 0x11 1M 128k", "read -P 0x22 2M 128k",
            "discard 4M 1M", "read -P 0 4M 1M",
            "writev -P 0x33 8M 4k 8k 4k", "readv -P 0x33 8M 16k",
            "flush"]
    args = ["qemu-io", "-f", "raw", served.uri("disk")]
    for c in cmds:
        args += ["-c", c]
    out = run(args)
    text = out.stdout + out.stderr
    assert "fail" not in text.lower() and "error" not in text.lower(), text
    assert text.count("read ") >= 6
    ro = run(["qemu-io", "-f", "raw", "-r", served.uri("ro"), "-c", "read 0 64k",
              "-c", "write -P 1 0 4k"], check=False)
    assert "read 65536/65536" in ro.stdout and "read-only" in ro.stderr


def test_qemu_io_full_disk_gets_enospc_and_device_stays_usable(small_fs, tmp_path):
    """A store on a full filesystem: the client sees ENOSPC for the write
    that does not fit, earlier data stays, and the device keeps serving."""
    need("qemu-io")
    control = Control()
    img = small_fs / "sparse.img"
    with open(img, "wb") as f:
        f.truncate(4 * MiB)                     # 4 MiB sparse on a 1 MiB tmpfs
    control.create("full", f"0 {(4 * MiB) >> 9} linear {img} 0")
    s = start_server(control, str(tmp_path))
    try:
        uri = s.uri("full")
        r = run(["qemu-io", "-f", "raw", uri, "-c", "write -P 0x61 0 64k",
                 "-c", "write -P 0x62 1M 2M"], check=False)
        text = r.stdout + r.stderr
        assert "wrote 65536/65536" in text, text
        assert "write failed: No space left on device" in text, text
        assert r.returncode != 0 and "Traceback" not in text
        r = run(["qemu-io", "-f", "raw", "-r", uri, "-c", "read -P 0x61 0 64k"])
        assert "read 65536/65536" in r.stdout, r.stdout + r.stderr
        assert control.get("full").state == "ACTIVE"
    finally:
        s.server.stop()
        control.shutdown()


# --------------------------------------------------------------------- fio
def test_fio_verify_multi_conn(served):
    need("fio")
    r = run(["fio", "--name=v", "--ioengine=nbd", f"--uri={served.uri('disk')}",
             "--rw=randwrite", "--bs=4k", "--iodepth=16", "--numjobs=4", "--size=8m",
             "--offset_increment=12m", "--verify=crc32c", "--do_verify=1",
             "--verify_state_save=0",
             "--group_reporting", "--output-format=json"])
    out = r.stdout
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] == 4 * 8 * MiB
    assert job["read"]["io_bytes"] == 4 * 8 * MiB       # everything read back
    assert "verify" not in r.stderr.lower(), r.stderr
