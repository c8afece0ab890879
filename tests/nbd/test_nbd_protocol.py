"""Sans-IO tests of pydm.nbd.protocol: handshake state machine, checks, encoders."""

import struct

import pytest

import nbdclient
from nbdclient import meta_data
from pydm.nbd import protocol as P

MiB = 1 << 20


class Catalog:
    def __init__(self, exports=None):
        self.exports = exports or {
            "a": P.ExportInfo("a", 8 * MiB, P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM,
                              "export a"),
            "b": P.ExportInfo("b", 4 * MiB, P.TF_READ_ONLY, "", ["base:allocation",
                                                                 "qemu:dirty-bitmap:e"]),
        }

    def names(self):
        return [(n, e.description) for n, e in self.exports.items()]

    def lookup(self, name):
        return self.exports.get(name or "a")


def replies(raw):
    """Split option replies: [(opt, type, data)]."""
    out = []
    pos = 0
    while pos < len(raw):
        magic, opt, rtype, n = struct.unpack_from(">QIII", raw, pos)
        assert magic == P.OPT_REPLY_MAGIC
        out.append((opt, rtype, raw[pos + 20:pos + 20 + n]))
        pos += 20 + n
    assert pos == len(raw)
    return out


def go_data(name, infos=()):
    return nbdclient.go_data(name, infos)


def haggling(tls="off", tls_available=False, flags=3):
    hs = P.ServerHandshake(Catalog(), tls, tls_available)
    hs.client_flags(struct.pack(">I", flags))
    return hs


def test_greeting_and_flags():
    hs = P.ServerHandshake(Catalog())
    assert hs.greeting() == struct.pack(">QQH", P.NBDMAGIC, P.IHAVEOPT, 3)
    assert hs.state == P.AWAIT_FLAGS
    hs.client_flags(struct.pack(">I", 3))
    assert hs.state == P.OPTIONS and hs.no_zeroes and hs.fixed_newstyle


def test_unknown_client_flags_disconnect():
    hs = P.ServerHandshake(Catalog())
    with pytest.raises(P.ProtocolError):
        hs.client_flags(struct.pack(">I", 4))


def test_illegal_move_raises_and_keeps_state():
    hs = P.ServerHandshake(Catalog())
    with pytest.raises(P.ProtocolError):
        hs.option(P.OPT_LIST, b"")
    assert hs.state == P.AWAIT_FLAGS
    with pytest.raises(P.ProtocolError):
        hs.tls_established()
    assert hs.state == P.AWAIT_FLAGS


def test_transition_table_is_closed():
    # Every target state is itself a state, and CLOSED goes nowhere.
    for state, moves in P.TRANSITIONS.items():
        for nxt in moves.values():
            assert nxt in P.TRANSITIONS
    assert P.TRANSITIONS[P.CLOSED] == {}


def test_bad_option_magic():
    hs = haggling()
    with pytest.raises(P.ProtocolError):
        hs.option_header(struct.pack(">QII", 0x1234, P.OPT_LIST, 0))


def test_unknown_and_extended_headers_get_unsup():
    hs = haggling()
    for opt in (99, P.OPT_PEEK_EXPORT, P.OPT_EXTENDED_HEADERS):
        out = hs.option(opt, b"junk" if opt == 99 else b"")
        [(o, rtype, _msg)] = replies(out.reply)
        assert (o, rtype, out.action) == (opt, P.REP_ERR_UNSUP, P.CONTINUE)
    assert hs.state == P.OPTIONS


def test_list():
    hs = haggling()
    r = replies(hs.option(P.OPT_LIST, b"").reply)
    assert [x[1] for x in r] == [P.REP_SERVER, P.REP_SERVER, P.REP_ACK]
    n = struct.unpack(">I", r[0][2][:4])[0]
    assert r[0][2][4:4 + n] == b"a" and r[0][2][4 + n:] == b"export a"
    assert replies(hs.option(P.OPT_LIST, b"x").reply)[0][1] == P.REP_ERR_INVALID


def test_info_then_go():
    hs = haggling()
    out = hs.option(P.OPT_INFO, go_data("a", [P.INFO_NAME, P.INFO_DESCRIPTION]))
    r = replies(out.reply)
    assert out.action == P.CONTINUE and r[-1][1] == P.REP_ACK
    infos = {struct.unpack(">H", d[:2])[0]: d for _o, t, d in r if t == P.REP_INFO}
    assert len(infos[P.INFO_EXPORT]) == 12
    _t, size, flags = struct.unpack(">HQH", infos[P.INFO_EXPORT])
    assert size == 8 * MiB and flags & P.TF_HAS_FLAGS and flags & P.TF_SEND_TRIM
    assert not flags & P.TF_SEND_DF            # no structured replies yet
    assert len(infos[P.INFO_BLOCK_SIZE]) == 14
    assert struct.unpack(">HIII", infos[P.INFO_BLOCK_SIZE])[1:] == (512, 4096, 32 * MiB)
    assert infos[P.INFO_NAME][2:] == b"a" and infos[P.INFO_DESCRIPTION][2:] == b"export a"
    go = hs.option(P.OPT_GO, go_data("a", [P.INFO_NAME, P.INFO_DESCRIPTION]))
    assert go.action == P.TRANSMIT and hs.state == P.TRANSMISSION
    # INFO then GO with the same parameters: the same information
    assert [x[1:] for x in replies(go.reply)] == [x[1:] for x in r]
    assert go.session.export.name == "a" and not go.session.structured


def test_go_default_export_and_canonical_name():
    hs = haggling()
    out = hs.option(P.OPT_GO, go_data("", [P.INFO_NAME]))
    infos = [d for _o, t, d in replies(out.reply) if t == P.REP_INFO]
    assert struct.pack(">H", P.INFO_NAME) + b"a" in infos


@pytest.mark.parametrize("data", [
    b"",                                            # too short
    struct.pack(">I", 100) + b"ab",                  # name runs past the option
    go_data("a", [1])[:-1],                          # info list truncated
    go_data("a") + b"x",                             # trailing byte
    struct.pack(">I", 2) + b"\xff\xfe" + struct.pack(">H", 0),   # not UTF-8
])
def test_info_malformed(data):
    hs = haggling()
    out = hs.option(P.OPT_INFO, data)
    assert replies(out.reply)[0][1] == P.REP_ERR_INVALID and hs.state == P.OPTIONS


def test_go_unknown_export():
    hs = haggling()
    out = hs.option(P.OPT_GO, go_data("nope"))
    [(_o, rtype, msg)] = replies(out.reply)
    assert rtype == P.REP_ERR_UNKNOWN and b"nope" in msg and hs.state == P.OPTIONS


def test_export_name():
    hs = haggling()
    out = hs.option(P.OPT_EXPORT_NAME, b"b")
    assert out.action == P.TRANSMIT and len(out.reply) == 10
    size, flags = struct.unpack(">QH", out.reply)
    assert size == 4 * MiB and flags & P.TF_READ_ONLY
    hs = haggling(flags=1)          # no NO_ZEROES: 124 zero bytes follow
    assert len(hs.option(P.OPT_EXPORT_NAME, b"a").reply) == 134
    hs = haggling()
    out = hs.option(P.OPT_EXPORT_NAME, b"nope")
    assert out.action == P.CLOSE and out.reply == b"" and hs.state == P.CLOSED


def test_abort():
    hs = haggling()
    out = hs.option(P.OPT_ABORT, b"")
    assert replies(out.reply)[0][1] == P.REP_ACK and out.action == P.CLOSE


def test_structured_twice():
    hs = haggling()
    assert replies(hs.option(P.OPT_STRUCTURED_REPLY, b"").reply)[0][1] == P.REP_ACK
    assert replies(hs.option(P.OPT_STRUCTURED_REPLY, b"").reply)[0][1] == P.REP_ERR_INVALID
    assert replies(haggling().option(P.OPT_STRUCTURED_REPLY, b"x").reply)[0][1] == \
        P.REP_ERR_INVALID
    go = hs.option(P.OPT_GO, go_data("a"))
    assert go.session.structured and go.session.flags & P.TF_SEND_DF


def test_meta_context_needs_structured():
    hs = haggling()
    out = hs.option(P.OPT_SET_META_CONTEXT, meta_data("a", ["base:allocation"]))
    assert replies(out.reply)[0][1] == P.REP_ERR_INVALID


def test_set_meta_context_selects_for_that_export():
    hs = haggling()
    hs.option(P.OPT_STRUCTURED_REPLY, b"")
    out = hs.option(P.OPT_SET_META_CONTEXT, meta_data(
        "b", ["base:allocation", "base:", "x-unknown:thing", "qemu:dirty-bitmap:e"]))
    r = replies(out.reply)
    assert [t for _o, t, _d in r] == [P.REP_META_CONTEXT, P.REP_META_CONTEXT, P.REP_ACK]
    assert r[0][2] == struct.pack(">I", 1) + b"base:allocation"
    assert r[1][2] == struct.pack(">I", 2) + b"qemu:dirty-bitmap:e"
    go = hs.option(P.OPT_GO, go_data("b"))
    assert go.session.contexts == {1: "base:allocation", 2: "qemu:dirty-bitmap:e"}


def test_set_meta_context_other_export_selects_nothing():
    hs = haggling()
    hs.option(P.OPT_STRUCTURED_REPLY, b"")
    hs.option(P.OPT_SET_META_CONTEXT, meta_data("b", ["base:allocation"]))
    assert hs.option(P.OPT_GO, go_data("a")).session.contexts == {}


def test_failed_set_clears_selection():
    hs = haggling()
    hs.option(P.OPT_STRUCTURED_REPLY, b"")
    hs.option(P.OPT_SET_META_CONTEXT, meta_data("a", ["base:allocation"]))
    bad = hs.option(P.OPT_SET_META_CONTEXT, meta_data("a", ["base:allocation"])[:-3])
    assert replies(bad.reply)[0][1] == P.REP_ERR_INVALID
    assert hs.option(P.OPT_GO, go_data("a")).session.contexts == {}


def test_list_meta_context():
    hs = haggling()
    hs.option(P.OPT_STRUCTURED_REPLY, b"")
    for queries, want in (([], [b"base:allocation", b"qemu:dirty-bitmap:e"]),
                          (["base:"], [b"base:allocation"]),
                          (["qemu:"], [b"qemu:dirty-bitmap:e"]),
                          (["nope:x"], [])):
        r = replies(hs.option(P.OPT_LIST_META_CONTEXT, meta_data("b", queries)).reply)
        assert [d[4:] for _o, t, d in r if t == P.REP_META_CONTEXT] == want
        assert all(d[:4] == b"\0\0\0\0" for _o, t, d in r if t == P.REP_META_CONTEXT)
        assert r[-1][1] == P.REP_ACK


def test_tls_required_gates_everything_but_starttls():
    hs = haggling("require", True)
    for opt, data in ((P.OPT_LIST, b""), (P.OPT_INFO, go_data("a")), (99, b""),
                      (P.OPT_STRUCTURED_REPLY, b"")):
        assert replies(hs.option(opt, data).reply)[0][1] == P.REP_ERR_TLS_REQD
    out = hs.option(P.OPT_EXPORT_NAME, b"a")
    assert out.action == P.CLOSE


def test_starttls_flow_resets_negotiation():
    hs = haggling("require", True)
    assert replies(hs.option(P.OPT_ABORT, b"").reply)[0][1] == P.REP_ACK
    hs = haggling("on", True)
    hs.option(P.OPT_STRUCTURED_REPLY, b"")
    out = hs.option(P.OPT_STARTTLS, b"")
    assert out.action == P.STARTTLS and hs.state == P.TLS_HANDSHAKE
    with pytest.raises(P.ProtocolError):
        hs.option(P.OPT_LIST, b"")
    hs.tls_established()
    assert hs.state == P.OPTIONS and not hs.structured
    assert replies(hs.option(P.OPT_STARTTLS, b"").reply)[0][1] == P.REP_ERR_INVALID


def test_starttls_refused_when_off():
    hs = haggling("off")
    assert replies(hs.option(P.OPT_STARTTLS, b"").reply)[0][1] == P.REP_ERR_POLICY
    hs = haggling("on", True)
    assert replies(hs.option(P.OPT_STARTTLS, b"x").reply)[0][1] == P.REP_ERR_INVALID


def test_shutting_down():
    hs = haggling()
    hs.shutting_down = True
    assert replies(hs.option(P.OPT_LIST, b"").reply)[0][1] == P.REP_ERR_SHUTDOWN
    assert hs.option(P.OPT_ABORT, b"").action == P.CLOSE


def test_option_too_big():
    hs = haggling()
    opt, n = hs.option_header(struct.pack(">QII", P.IHAVEOPT, P.OPT_INFO, 1 << 30))
    assert n > P.MAX_OPTION_DATA
    assert replies(hs.option_too_big(opt).reply)[0][1] == P.REP_ERR_TOO_BIG


# ----------------------------------------------------------- transmission
RW = P.ExportInfo("rw", 8 * MiB, P.TF_SEND_FLUSH | P.TF_SEND_FUA | P.TF_SEND_TRIM |
                  P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO | P.TF_SEND_CACHE)
RO = P.ExportInfo("ro", 8 * MiB, P.TF_READ_ONLY | P.TF_SEND_FLUSH)
FZ = P.ExportInfo("fz", 8 * MiB, P.TF_SEND_WRITE_ZEROES | P.TF_SEND_FAST_ZERO,
                  fast_zero=True)
BIG = P.ExportInfo("4k", 8 * MiB, 0, block_sizes=(4096, 65536, 1 * MiB))


@pytest.mark.parametrize("export,structured,contexts,req,want", [
    (RW, True, {}, (0, P.CMD_READ, 0, 4096), 0),
    (RW, True, {}, (P.CMD_FLAG_DF, P.CMD_READ, 0, 4096), 0),
    (RW, False, {}, (P.CMD_FLAG_DF, P.CMD_READ, 0, 4096), P.EINVAL),
    (RW, True, {}, (0, P.CMD_READ, 8 * MiB - 512, 1024), P.EINVAL),
    (RW, True, {}, (0, P.CMD_WRITE, 8 * MiB - 512, 1024), P.ENOSPC),
    (RW, True, {}, (0, P.CMD_WRITE_ZEROES, 8 * MiB, 512), P.ENOSPC),
    (RW, True, {}, (0, P.CMD_TRIM, 8 * MiB, 512), P.EINVAL),
    (RW, True, {}, (0, P.CMD_READ, 100, 512), P.EINVAL),
    (RW, True, {}, (0, P.CMD_WRITE, 0, 100), P.EINVAL),
    (RW, True, {}, (0, 42, 0, 0), P.EINVAL),
    (RW, True, {}, (0x80, P.CMD_READ, 0, 512), P.EINVAL),
    (RW, True, {}, (P.CMD_FLAG_NO_HOLE, P.CMD_WRITE, 0, 512), P.EINVAL),
    (RW, True, {}, (P.CMD_FLAG_NO_HOLE | P.CMD_FLAG_FAST_ZERO, P.CMD_WRITE_ZEROES, 0, 512),
     P.ENOTSUP),                 # the stack cannot zero fast: say so at once
    (FZ, True, {}, (P.CMD_FLAG_FAST_ZERO, P.CMD_WRITE_ZEROES, 0, 512), 0),
    (BIG, True, {}, (0, P.CMD_READ, 512, 4096), P.EINVAL),        # below its minimum
    (BIG, True, {}, (0, P.CMD_READ, 4096, 8192), 0),
    (BIG, True, {}, (0, P.CMD_READ, 0, 2 * MiB), P.EINVAL),       # past its maximum
    (RW, True, {}, (0, P.CMD_READ, 0, 0), P.NO_IO),
    (RW, True, {}, (0, P.CMD_TRIM, 0, 0), P.NO_IO),
    (RW, True, {}, (P.CMD_FLAG_FUA, P.CMD_WRITE, 0, 512), 0),
    (RW, True, {}, (0, P.CMD_FLUSH, 0, 0), 0),
    (RW, True, {}, (0, P.CMD_BLOCK_STATUS, 0, 512), P.EINVAL),
    (RW, True, {1: "base:allocation"}, (P.CMD_FLAG_REQ_ONE, P.CMD_BLOCK_STATUS, 0, 512), 0),
    (RW, True, {1: "base:allocation"}, (0, P.CMD_BLOCK_STATUS, 0, 0), P.EINVAL),
    (RW, True, {}, (0, P.CMD_READ, 0, 64 * MiB), P.EINVAL),
    (RO, True, {}, (0, P.CMD_WRITE, 0, 512), P.EPERM),
    (RO, True, {}, (0, P.CMD_TRIM, 0, 512), P.EPERM),
    (RO, True, {}, (0, P.CMD_READ, 0, 512), 0),
    (RO, True, {}, (P.CMD_FLAG_FUA, P.CMD_READ, 0, 512), P.EINVAL),   # no SEND_FUA
    (RO, True, {}, (0, P.CMD_CACHE, 0, 512), P.NO_IO),
])
def test_check_request(export, structured, contexts, req, want):
    s = P.Session(export, structured, contexts)
    flags, cmd, off, n = req
    assert P.check_request(s, export.size, flags, cmd, off, n) == want


def test_check_request_trim_not_advertised():
    e = P.ExportInfo("x", MiB, P.TF_SEND_FLUSH)
    s = P.Session(e, True, {})
    assert P.check_request(s, MiB, 0, P.CMD_TRIM, 0, 512) == P.EINVAL
    assert P.check_request(s, MiB, 0, P.CMD_WRITE_ZEROES, 0, 512) == P.EINVAL


def test_error_reply_forms():
    s = P.Session(RW, True, {})
    simple = P.error_reply(P.Session(RW, False, {}), P.CMD_READ, 7, P.EINVAL)
    assert simple == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, P.EINVAL, 7)
    chunk = P.error_reply(s, P.CMD_READ, 7, P.EIO, "boom")
    magic, flags, ctype, cookie, n = struct.unpack_from(">IHHQI", chunk)
    assert (magic, flags, ctype, cookie) == (P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                             P.REPLY_TYPE_ERROR, 7)
    err, mlen = struct.unpack_from(">IH", chunk, 20)
    assert (err, chunk[26:26 + mlen], n) == (P.EIO, b"boom", 6 + mlen)
    # non-READ commands keep the simple form even with structured replies
    assert P.error_reply(s, P.CMD_WRITE, 7, P.ENOSPC)[:4] == struct.pack(">I",
                                                                        P.SIMPLE_REPLY_MAGIC)


def _chunks(raw):
    out, pos = [], 0
    while pos < len(raw):
        magic, flags, ctype, cookie, n = struct.unpack_from(">IHHQI", raw, pos)
        assert magic == P.STRUCTURED_REPLY_MAGIC
        out.append((flags, ctype, raw[pos + 20:pos + 20 + n]))
        pos += 20 + n
    return out


def test_read_reply_with_holes_covers_request():
    data = bytearray(b"x" * 16384)
    data[4096:12288] = bytes(8192)
    raw = b"".join(bytes(p) for p in P.read_reply_parts(9, 1 << 20, data, [(4096, 8192)]))
    chunks = _chunks(raw)
    kinds = [c[1] for c in chunks]
    assert kinds == [P.REPLY_TYPE_OFFSET_DATA, P.REPLY_TYPE_OFFSET_HOLE,
                     P.REPLY_TYPE_OFFSET_DATA, P.REPLY_TYPE_NONE]
    assert [c[0] & P.REPLY_FLAG_DONE for c in chunks] == [0, 0, 0, 1]
    rebuilt = bytearray(16384)
    for _f, ctype, body in chunks:
        if ctype == P.REPLY_TYPE_OFFSET_DATA:
            off = struct.unpack(">Q", body[:8])[0] - (1 << 20)
            rebuilt[off:off + len(body) - 8] = body[8:]
        elif ctype == P.REPLY_TYPE_OFFSET_HOLE:
            off, n = struct.unpack(">QI", body)
            assert n and len(body) == 12
    assert rebuilt == data


def test_read_reply_without_holes_is_one_done_chunk():
    parts = P.read_reply_parts(3, 0, b"y" * 512)
    [(flags, ctype, body)] = _chunks(b"".join(bytes(p) for p in parts))
    assert flags == P.REPLY_FLAG_DONE and ctype == P.REPLY_TYPE_OFFSET_DATA
    assert body == struct.pack(">Q", 0) + b"y" * 512


@pytest.mark.parametrize("runs,length,req_one,want", [
    ([(512, 0), (512, 0), (1024, 3)], 4096, False, [(1024, 0), (1024, 3)]),
    ([(8192, 3)], 4096, False, [(4096, 3)]),
    ([(512, 0), (4096, 3)], 4096, True, [(512, 0)]),
    ([(8192, 2)], 1024, True, [(1024, 2)]),
    ([], 2048, False, [(2048, 0)]),
    ([(0, 1), (512, 1)], 512, False, [(512, 1)]),
])
def test_clip_extents(runs, length, req_one, want):
    assert P.clip_extents(runs, length, req_one) == want


def test_block_status_chunk_encoding():
    raw = P.block_status_chunk(5, 2, [(4096, 3), (512, 0)], True)
    [(flags, ctype, body)] = _chunks(raw)
    assert flags == P.REPLY_FLAG_DONE and ctype == P.REPLY_TYPE_BLOCK_STATUS
    assert body == struct.pack(">IIIII", 2, 4096, 3, 512, 0)


K = 1024


@pytest.mark.parametrize("layout,want", [
    ([("d", 256)], []),
    ([("z", 256)], [(0, 256 * K)]),
    ([("d", 64), ("z", 128), ("d", 64)], [(64 * K, 128 * K)]),
    ([("d", 62), ("z", 200), ("d", 58)], [(64 * K, 196 * K)]),    # unaligned zeros
    ([("d", 10), ("z", 40), ("d", 14)], []),       # no 64 KiB probe point is zero
])
def test_find_holes(layout, want):
    # layout in KiB: d = random nonzero data, z = zeros
    import random
    rnd = random.Random(3)
    buf = bytearray()
    for kind, kib in layout:
        buf += bytes(kib * K) if kind == "z" else bytes(rnd.randrange(1, 256)
                                                        for _ in range(kib * K))
    holes = P.find_holes(buf, len(buf))
    assert holes == want
    for s, n in holes:
        assert buf[s:s + n] == bytes(n) and s % 4096 == 0 and n % 4096 == 0
    # inside a bigger buffer (the pool aligns payloads): zeros around it
    # must not extend or shift the runs
    for base in (16, 3000, 4096):
        padded = bytearray(base) + buf + bytearray(8192)
        assert P.find_holes(padded, len(buf), base) == want


def test_find_holes_limit():
    many = bytearray()
    for _ in range(100):
        many += bytes(64 * K) + b"y" * (64 * K)
    holes = P.find_holes(many, len(many))
    assert len(holes) == P.MAX_HOLES and holes[1] == (128 * K, 64 * K)


# ------------------------------------------- header verdicts and encoders
def test_check_request_judges_the_header():
    s = P.Session(RW, True, {})
    with pytest.raises(P.ProtocolError, match="bad request magic"):
        P.check_request(s, RW.size, 0, P.CMD_READ, 0, 512, 0x12345678)
    with pytest.raises(P.ProtocolError, match="over the"):
        P.check_request(s, RW.size, 0, P.CMD_WRITE, 0, P.MAX_PAYLOAD + 512, P.REQUEST_MAGIC)
    # READ past the payload limit is an error reply, not a disconnect
    assert P.check_request(s, RW.size, 0, P.CMD_READ, 0, P.MAX_PAYLOAD + 512) == P.EINVAL
    # DISC ends the session whatever its fields say
    assert P.check_request(s, RW.size, 0xFF, P.CMD_DISC, 3, 5) == P.SOFT_DISCONNECT


def test_simple_and_no_io_replies():
    assert P.simple_reply(P.EIO, 9) == struct.pack(">IIQ", P.SIMPLE_REPLY_MAGIC, P.EIO, 9)
    structured, simple = P.Session(RW, True, {}), P.Session(RW, False, {})
    [(flags, ctype, body)] = _chunks(P.no_io_reply(structured, P.CMD_READ, 4))
    assert (flags, ctype, body) == (P.REPLY_FLAG_DONE, P.REPLY_TYPE_NONE, b"")
    for session, cmd in ((simple, P.CMD_READ), (structured, P.CMD_CACHE),
                         (structured, P.CMD_WRITE)):
        assert P.no_io_reply(session, cmd, 4) == P.simple_reply(0, 4)


def test_read_reply_forms():
    n = P.HOLE_READ_MIN * 2
    raw = bytearray(64) + bytearray(b"r" * P.HOLE_READ_MIN) + bytearray(P.HOLE_READ_MIN)
    data = memoryview(raw)[64:64 + n]
    simple = P.read_reply(False, 5, 0, 0, data, raw, 64)
    assert simple == [P.simple_reply(0, 5), data]
    assert P.read_header_len(False) == len(simple[0])
    whole = P.read_reply(True, 5, 1 << 20, P.CMD_FLAG_DF, data, raw, 64)   # DF: one chunk
    assert whole[1] is data and len(whole) == 2
    assert whole == P.read_reply_parts(5, 1 << 20, data)
    assert P.read_header_len(True) == len(whole[0])
    holes = P.read_reply(True, 5, 1 << 20, 0, data, raw, 64)
    assert holes == P.read_reply_parts(5, 1 << 20, data, [(P.HOLE_READ_MIN, P.HOLE_READ_MIN)])
    small = memoryview(raw)[64 + P.HOLE_READ_MIN:64 + P.HOLE_READ_MIN + 4096]   # zeros
    assert P.read_reply(True, 5, 0, 0, small, raw, 64 + P.HOLE_READ_MIN) == \
        P.read_reply_parts(5, 0, small)         # too small to look for holes


def test_block_status_reply_marks_the_last_chunk_done():
    chunks = _chunks(b"".join(P.block_status_reply(8, [(1, [(512, 0)]), (2, [(512, 3)])])))
    assert [(f, t, body[:4]) for f, t, body in chunks] == [
        (0, P.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 1)),
        (P.REPLY_FLAG_DONE, P.REPLY_TYPE_BLOCK_STATUS, struct.pack(">I", 2))]


def test_protocol_is_the_codec_name_space():
    import types
    from pydm.nbd import handshake, transmission, wire
    for part in (wire, handshake, transmission):
        for name, value in vars(part).items():
            if not name.startswith("_") and not isinstance(value, types.ModuleType):
                assert getattr(P, name) is value, (part.__name__, name)
                assert name in P.__all__
