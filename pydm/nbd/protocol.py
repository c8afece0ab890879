"""Sans-IO NBD codec: fixed-newstyle handshake, request checks, reply encoding.

Rules of this module:

* No sockets, threads, locks or devices.  Bytes come in, bytes (and small
  result objects) go out; the socket layer (``server.py``) decides when to
  read and where to write.  Everything here can be driven by a unit test.
* The handshake is a state machine whose legal moves are the data in
  ``TRANSITIONS``: an event with no entry raises ``ProtocolError`` and
  leaves the state unchanged.  What each option means lives in the
  ``_opt_*`` handlers; which options TLS gates lives in ``TLS_FREE_OPTIONS``.
* Exports are seen through a catalogue object (``names()``,
  ``lookup(name)``); this module never asks a device anything itself.
* ``ProtocolError`` means "hard disconnect" (the spec's MUST violations).
  Anything the client can recover from is an error *reply*, never an
  exception.

The wire format is the NBD protocol document (doc/proto.md of the
NetworkBlockDevice/nbd project); references below name its sections.
"""

import struct

from pydm import errors as _errors

# --------------------------------------------------------------- constants
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# handshake flags (server) and client flags
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
FLAG_C_FIXED_NEWSTYLE = 0x1
FLAG_C_NO_ZEROES = 0x2

# options
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_PEEK_EXPORT = 4
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

# option reply types
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# info types
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# transmission flags
TF_HAS_FLAGS = 0x0001
TF_READ_ONLY = 0x0002
TF_SEND_FLUSH = 0x0004
TF_SEND_FUA = 0x0008
TF_ROTATIONAL = 0x0010
TF_SEND_TRIM = 0x0020
TF_SEND_WRITE_ZEROES = 0x0040
TF_SEND_DF = 0x0080
TF_CAN_MULTI_CONN = 0x0100
TF_SEND_CACHE = 0x0400
TF_SEND_FAST_ZERO = 0x0800

# commands
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

# command flags
CMD_FLAG_FUA = 0x01
CMD_FLAG_NO_HOLE = 0x02
CMD_FLAG_DF = 0x04
CMD_FLAG_REQ_ONE = 0x08
CMD_FLAG_FAST_ZERO = 0x10

# structured reply chunk types and flags
REPLY_FLAG_DONE = 0x1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# NBD error values, from their one home (pydm.errors.nbd_error produces them)
EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = (
    _errors.NBD_EPERM, _errors.NBD_EIO, _errors.NBD_ENOMEM, _errors.NBD_EINVAL,
    _errors.NBD_ENOSPC, _errors.NBD_EOVERFLOW, _errors.NBD_ENOTSUP, _errors.NBD_ESHUTDOWN)

# check_request: answer success at once, with no I/O (a zero-length request;
# CACHE, a hint the page cache already acts on)
NO_IO = -1

# Limits.  Strings are capped by the spec; an option body is capped so a
# hostile client cannot make us buffer much before we have said a word.
MAX_STRING = 4096
MAX_OPTION_DATA = 64 << 10
MAX_META_QUERIES = 128
MAX_PAYLOAD = 32 << 20          # the largest READ/WRITE taken at all
MIN_BLOCK = 512                 # bios are sector-granular: no export goes below
MAX_EXTENTS = 1 << 16           # per block-status chunk (spec allows 2^20)
HOLE_BLOCK = 4096               # OFFSET_HOLE chunks cover whole aligned blocks
HOLE_READ_MIN = 64 << 10        # smaller reads are always one data chunk
MAX_HOLES = 64                  # hole chunks per reply (each costs two iovecs)

GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
OPTION_HEADER = struct.Struct(">QII")
OPTION_REPLY = struct.Struct(">QIII")
REQUEST = struct.Struct(">IHHQQI")
SIMPLE_REPLY = struct.Struct(">IIQ")
CHUNK = struct.Struct(">IHHQI")
DATA_CHUNK = struct.Struct(">IHHQIQ")      # chunk header + offset (OFFSET_DATA)
HOLE_CHUNK = struct.Struct(">IHHQIQI")
ERROR_CHUNK = struct.Struct(">IHHQIIH")    # + message
_U16, _U32, _U64 = struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")
_EXPORT_INFO = struct.Struct(">HQH")
_BLOCK_INFO = struct.Struct(">HIII")
_EXTENT = struct.Struct(">II")

OPTION_NAMES = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_PEEK_EXPORT: "PEEK_EXPORT", OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO",
    OPT_GO: "GO", OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
    OPT_LIST_META_CONTEXT: "LIST_META_CONTEXT", OPT_SET_META_CONTEXT: "SET_META_CONTEXT",
    OPT_EXTENDED_HEADERS: "EXTENDED_HEADERS",
}
CMD_NAMES = {CMD_READ: "READ", CMD_WRITE: "WRITE", CMD_DISC: "DISC", CMD_FLUSH: "FLUSH",
             CMD_TRIM: "TRIM", CMD_CACHE: "CACHE", CMD_WRITE_ZEROES: "WRITE_ZEROES",
             CMD_BLOCK_STATUS: "BLOCK_STATUS"}


class ProtocolError(Exception):
    """The client broke a MUST of the protocol: drop the connection."""


# -------------------------------------------------------------- exports
class ExportInfo:
    """What the handshake needs to know about one export, at one moment.

    ``flags`` are the transmission flags apart from SEND_DF, which depends on
    the negotiation and is added by ``Session``.
    """

    __slots__ = ("name", "size", "flags", "description", "contexts", "accepts",
                 "block_sizes", "fast_zero")

    def __init__(self, name, size, flags, description="", contexts=("base:allocation",),
                 accepts=None, block_sizes=(MIN_BLOCK, 4096, MAX_PAYLOAD), fast_zero=False):
        self.name = name
        self.size = size
        self.flags = flags | TF_HAS_FLAGS
        self.description = description
        self.contexts = list(contexts)
        # Optional fn(name) -> bool for contexts chosen by name but too many
        # to list (era's "changed since era N" for every N).
        self.accepts = accepts
        # (minimum, preferred, maximum) for NBD_INFO_BLOCK_SIZE and the
        # request checks; the minimum is never below a sector
        lo, pref, hi = block_sizes
        lo = max(lo, MIN_BLOCK)
        hi = max(min(hi, MAX_PAYLOAD), lo)
        self.block_sizes = (lo, min(max(pref, lo), hi), hi)
        # whether a FAST_ZERO write-zeroes may run (else: ENOTSUP at once)
        self.fast_zero = fast_zero

    def has_context(self, name: str) -> bool:
        return name in self.contexts or (self.accepts is not None and self.accepts(name))


class Session:
    """The outcome of a handshake: what transmission may use.

    ``contexts`` maps the ids handed out by SET_META_CONTEXT to names;
    BLOCK_STATUS answers one chunk per entry.
    """

    __slots__ = ("export", "structured", "contexts", "flags", "min_block", "max_block")

    def __init__(self, export: ExportInfo, structured: bool, contexts: dict):
        self.export = export
        self.structured = structured
        self.contexts = contexts
        flags = export.flags
        if structured:
            flags |= TF_SEND_DF
        self.flags = flags
        self.min_block, _pref, self.max_block = export.block_sizes


# ------------------------------------------------------ handshake states
AWAIT_FLAGS = "AWAIT_FLAGS"          # greeting sent, client flags due
OPTIONS = "OPTIONS"                  # option haggling
TLS_HANDSHAKE = "TLS_HANDSHAKE"      # STARTTLS acked: the socket layer upgrades
TRANSMISSION = "TRANSMISSION"        # GO acked or EXPORT_NAME answered
CLOSED = "CLOSED"

# events
EV_FLAGS = "flags"
EV_OPTION = "option"                 # an option answered, still haggling
EV_STARTTLS = "starttls"
EV_TLS_UP = "tls_up"
EV_EXPORT = "export"                 # GO / EXPORT_NAME succeeded
EV_CLOSE = "close"                   # ABORT, failed EXPORT_NAME, violation

TRANSITIONS = {
    AWAIT_FLAGS: {EV_FLAGS: OPTIONS, EV_CLOSE: CLOSED},
    OPTIONS: {EV_OPTION: OPTIONS, EV_STARTTLS: TLS_HANDSHAKE, EV_EXPORT: TRANSMISSION,
              EV_CLOSE: CLOSED},
    TLS_HANDSHAKE: {EV_TLS_UP: OPTIONS, EV_CLOSE: CLOSED},
    TRANSMISSION: {EV_CLOSE: CLOSED},
    CLOSED: {},
}

# Options a FORCEDTLS server answers before the upgrade (everything else gets
# ERR_TLS_REQD, and EXPORT_NAME a closed connection).
TLS_FREE_OPTIONS = frozenset((OPT_STARTTLS, OPT_ABORT))

# Modes of ``tls``: "off" (STARTTLS -> ERR_UNSUP... or ERR_POLICY when
# certificates are absent by choice), "on" (STARTTLS accepted, not required),
# "require" (FORCEDTLS).
TLS_MODES = ("off", "on", "require")

# Outcome actions for the socket layer.
CONTINUE = "continue"
STARTTLS = "starttls"
TRANSMIT = "transmit"
CLOSE = "close"


class Outcome:
    """What to send for one option, and what to do next."""

    __slots__ = ("reply", "action", "session", "message")

    def __init__(self, reply=b"", action=CONTINUE, session=None, message=None):
        self.reply = reply
        self.action = action
        self.session = session
        self.message = message      # a line for the log, if worth one


def option_reply(opt: int, rtype: int, data=b"") -> bytes:
    return OPTION_REPLY.pack(OPT_REPLY_MAGIC, opt, rtype, len(data)) + data


def _error(opt, rtype, message, log=None):
    return Outcome(option_reply(opt, rtype, message.encode()), message=log)


def _string(data, pos, n):
    """Decode a UTF-8 string of ``n`` bytes at ``pos``; None if invalid."""
    if n > MAX_STRING or pos + n > len(data):
        return None
    raw = bytes(data[pos:pos + n])
    if b"\0" in raw:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


class ServerHandshake:
    """Fixed-newstyle handshake for one connection (server side).

    ``catalog`` answers ``names()`` -> [(name, description)] and
    ``lookup(name)`` -> ExportInfo or None (``""`` is the default export).
    ``tls`` is one of TLS_MODES; ``tls_available`` says whether the socket
    layer can actually upgrade.
    """

    def __init__(self, catalog, tls="off", tls_available=False):
        if tls not in TLS_MODES:
            raise ValueError(f"tls mode {tls!r}")
        self.catalog = catalog
        self.tls_mode = tls
        self.tls_available = tls_available
        self.state = AWAIT_FLAGS
        self.shutting_down = False
        self.tls_active = False
        self.fixed_newstyle = False
        self.no_zeroes = False
        self._reset_negotiation()

    def _reset_negotiation(self):
        self.structured = False
        self.meta_export = None          # export name of the last SET_META_CONTEXT
        self.meta_contexts = {}          # id -> name

    def _move(self, event):
        nxt = TRANSITIONS[self.state].get(event)
        if nxt is None:
            raise ProtocolError(f"{event} not allowed in state {self.state}")
        self.state = nxt

    # -- greeting and flags --------------------------------------------
    def greeting(self) -> bytes:
        return GREETING.pack(NBDMAGIC, IHAVEOPT, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)

    def client_flags(self, data) -> None:
        if self.state != AWAIT_FLAGS:
            raise ProtocolError("client flags outside the greeting")
        (flags,) = CLIENT_FLAGS.unpack(data)
        if flags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES):
            self.state = CLOSED
            raise ProtocolError(f"unknown client flags {flags:#x}")
        self.fixed_newstyle = bool(flags & FLAG_C_FIXED_NEWSTYLE)
        self.no_zeroes = bool(flags & FLAG_C_NO_ZEROES)
        self._move(EV_FLAGS)

    # -- options ----------------------------------------------------------
    def option_header(self, data):
        """(option, length) from a 16-byte header; the body must follow.

        A length over MAX_OPTION_DATA is returned as is: the socket layer
        discards the body in small pieces and calls ``option_too_big``.
        """
        if self.state != OPTIONS:
            raise ProtocolError(f"option in state {self.state}")
        magic, opt, length = OPTION_HEADER.unpack(data)
        if magic != IHAVEOPT:
            self.state = CLOSED
            raise ProtocolError(f"bad option magic {magic:#x}")
        return opt, length

    def option_too_big(self, opt) -> Outcome:
        if opt == OPT_EXPORT_NAME:
            self._move(EV_CLOSE)
            return Outcome(action=CLOSE, message="EXPORT_NAME with an oversized name")
        self._move(EV_OPTION)
        return _error(opt, REP_ERR_TOO_BIG, "option data too large",
                      log=f"option {opt} data over {MAX_OPTION_DATA} bytes")

    def option(self, opt: int, data) -> Outcome:
        """Answer one option whose whole body is ``data``."""
        if self.state != OPTIONS:
            raise ProtocolError(f"option in state {self.state}")
        if self.shutting_down and opt != OPT_ABORT:
            if opt == OPT_EXPORT_NAME:
                self._move(EV_CLOSE)
                return Outcome(action=CLOSE, message="EXPORT_NAME while shutting down")
            self._move(EV_OPTION)
            return _error(opt, REP_ERR_SHUTDOWN, "server is shutting down")
        if (self.tls_mode == "require" and not self.tls_active
                and opt not in TLS_FREE_OPTIONS):
            if opt == OPT_EXPORT_NAME:
                self._move(EV_CLOSE)
                return Outcome(action=CLOSE,
                               message="EXPORT_NAME before STARTTLS on a TLS-only server")
            self._move(EV_OPTION)
            return _error(opt, REP_ERR_TLS_REQD, "TLS is required: send STARTTLS first",
                          log=f"option {OPTION_NAMES.get(opt, opt)} refused: TLS required")
        handler = _HANDLERS.get(opt)
        if handler is None:
            self._move(EV_OPTION)
            return _error(opt, REP_ERR_UNSUP, f"option {opt} not supported")
        out = handler(self, opt, data)
        if out.action == CONTINUE:
            self._move(EV_OPTION)
        elif out.action == STARTTLS:
            self._move(EV_STARTTLS)
        elif out.action == TRANSMIT:
            self._move(EV_EXPORT)
        else:
            self._move(EV_CLOSE)
        return out

    def tls_established(self) -> None:
        self._move(EV_TLS_UP)
        self.tls_active = True
        # Everything negotiated in the clear is forgotten (proto.md, "TLS support": the server MUST forget it).
        self._reset_negotiation()

    def close(self) -> None:
        self.state = CLOSED

    # -- handlers -------------------------------------------------------
    def _opt_abort(self, opt, data):
        return Outcome(option_reply(opt, REP_ACK), CLOSE)

    def _opt_list(self, opt, data):
        if data:
            return _error(opt, REP_ERR_INVALID, "LIST takes no data")
        parts = []
        for name, desc in self.catalog.names():
            raw = name.encode()
            parts.append(option_reply(opt, REP_SERVER, _U32.pack(len(raw)) + raw +
                                      desc.encode()[:MAX_STRING]))
        parts.append(option_reply(opt, REP_ACK))
        return Outcome(b"".join(parts))

    def _opt_starttls(self, opt, data):
        if data:
            return _error(opt, REP_ERR_INVALID, "STARTTLS takes no data")
        if self.tls_active:
            return _error(opt, REP_ERR_INVALID, "TLS is already active")
        if self.tls_mode == "off":
            return _error(opt, REP_ERR_POLICY, "TLS is not enabled on this server")
        if not self.tls_available:
            return _error(opt, REP_ERR_PLATFORM, "TLS is not available")
        if not self.fixed_newstyle:
            return _error(opt, REP_ERR_INVALID, "TLS needs fixed newstyle")
        return Outcome(option_reply(opt, REP_ACK), STARTTLS)

    def _opt_structured(self, opt, data):
        if data:
            return _error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
        if self.structured:
            return _error(opt, REP_ERR_INVALID, "structured replies already negotiated")
        self.structured = True
        return Outcome(option_reply(opt, REP_ACK))

    def _opt_export_name(self, opt, data):
        name = _string(data, 0, len(data))
        info = None if name is None else self.catalog.lookup(name)
        if info is None:
            return Outcome(action=CLOSE, message=f"EXPORT_NAME of unknown export {name!r}")
        session = self._session(info)
        reply = _U64.pack(info.size) + _U16.pack(session.flags)
        if not self.no_zeroes:
            reply += bytes(124)
        return Outcome(reply, TRANSMIT, session)

    def _opt_info_go(self, opt, data):
        if len(data) < 6:
            return _error(opt, REP_ERR_INVALID, "INFO/GO data too short")
        (n,) = _U32.unpack_from(data, 0)
        if n > len(data) - 6:
            return _error(opt, REP_ERR_INVALID, "export name runs past the option")
        name = _string(data, 4, n)
        if name is None:
            return _error(opt, REP_ERR_INVALID, "export name is not valid UTF-8")
        (k,) = _U16.unpack_from(data, 4 + n)
        if len(data) != 4 + n + 2 + 2 * k:
            return _error(opt, REP_ERR_INVALID, "INFO/GO length does not match its requests")
        wanted = set(struct.unpack_from(f">{k}H", data, 6 + n))
        info = self.catalog.lookup(name)
        if info is None:
            return _error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}",
                          log=f"{OPTION_NAMES[opt]} of unknown export {name!r}")
        session = self._session(info)
        parts = [option_reply(opt, REP_INFO,
                              _EXPORT_INFO.pack(INFO_EXPORT, info.size, session.flags))]
        # Block sizes are sent whether asked or not: clients that did not ask
        # may ignore them, and we cope with any alignment by answering EINVAL.
        parts.append(option_reply(opt, REP_INFO, _BLOCK_INFO.pack(
            INFO_BLOCK_SIZE, *info.block_sizes)))
        if INFO_NAME in wanted:
            parts.append(option_reply(opt, REP_INFO,
                                      _U16.pack(INFO_NAME) + info.name.encode()))
        if INFO_DESCRIPTION in wanted and info.description:
            parts.append(option_reply(opt, REP_INFO, _U16.pack(INFO_DESCRIPTION) +
                                      info.description.encode()[:MAX_STRING]))
        parts.append(option_reply(opt, REP_ACK))
        if opt == OPT_INFO:
            return Outcome(b"".join(parts))
        return Outcome(b"".join(parts), TRANSMIT, session)

    def _session(self, info):
        contexts = {}
        if self.meta_export is not None and self.meta_export == info.name:
            contexts = dict(self.meta_contexts)
        return Session(info, self.structured, contexts)

    def _opt_meta_context(self, opt, data):
        setting = opt == OPT_SET_META_CONTEXT
        if setting:
            # A SET replaces the selection even when it fails.
            self.meta_export, self.meta_contexts = None, {}
        if not self.structured:
            return _error(opt, REP_ERR_INVALID, "negotiate structured replies first")
        parsed = _parse_meta_request(data)
        if parsed is None:
            return _error(opt, REP_ERR_INVALID, "malformed meta context request")
        name, queries = parsed
        if len(queries) > MAX_META_QUERIES:
            return _error(opt, REP_ERR_TOO_BIG, "too many meta context queries")
        info = self.catalog.lookup(name)
        if info is None:
            return _error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}")
        available = info.contexts
        parts = []
        if setting:
            chosen = []
            for q in queries:
                if q not in chosen and info.has_context(q):
                    chosen.append(q)
            for i, ctx in enumerate(chosen, 1):
                parts.append(option_reply(opt, REP_META_CONTEXT,
                                          _U32.pack(i) + ctx.encode()))
            self.meta_export = info.name
            self.meta_contexts = {i: ctx for i, ctx in enumerate(chosen, 1)}
        else:
            if queries:
                listed = [c for c in available if any(_matches(q, c) for q in queries)]
            else:
                listed = list(available)
            for ctx in listed:
                parts.append(option_reply(opt, REP_META_CONTEXT, _U32.pack(0) + ctx.encode()))
        parts.append(option_reply(opt, REP_ACK))
        return Outcome(b"".join(parts))

    def _opt_extended_headers(self, opt, data):
        # libnbd >= 1.18 and qemu >= 8.2 ask first and fall back on ERR_UNSUP.
        return _error(opt, REP_ERR_UNSUP, "extended headers are not supported")


_HANDLERS = {
    OPT_EXPORT_NAME: ServerHandshake._opt_export_name,
    OPT_ABORT: ServerHandshake._opt_abort,
    OPT_LIST: ServerHandshake._opt_list,
    OPT_STARTTLS: ServerHandshake._opt_starttls,
    OPT_INFO: ServerHandshake._opt_info_go,
    OPT_GO: ServerHandshake._opt_info_go,
    OPT_STRUCTURED_REPLY: ServerHandshake._opt_structured,
    OPT_LIST_META_CONTEXT: ServerHandshake._opt_meta_context,
    OPT_SET_META_CONTEXT: ServerHandshake._opt_meta_context,
    OPT_EXTENDED_HEADERS: ServerHandshake._opt_extended_headers,
}


def _parse_meta_request(data):
    """(export name, [query]) or None when a length overruns (proto.md, NBD_OPT_LIST_META_CONTEXT)."""
    if len(data) < 8:
        return None
    (n,) = _U32.unpack_from(data, 0)
    if n > len(data) - 8:
        return None
    name = _string(data, 4, n)
    if name is None:
        return None
    pos = 4 + n
    (q,) = _U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(q):
        if pos + 4 > len(data):
            return None
        (ln,) = _U32.unpack_from(data, pos)
        pos += 4
        s = _string(data, pos, ln)
        if s is None:
            return None
        pos += ln
        queries.append(s)
    if pos != len(data):
        return None
    return name, queries


def _matches(query: str, context: str) -> bool:
    """LIST matching: exact names, or a query ending in ':' as a prefix."""
    if query == context:
        return True
    return query.endswith(":") and context.startswith(query) and ":" in query


# ------------------------------------------------------------ transmission
def check_request(session: Session, size: int, flags: int, cmd: int,
                  offset: int, length: int) -> int:
    """0 if the request may run, ``NO_IO`` if it is answered with success at
    once, else the NBD error to answer (proto.md, "Request types" and "Error
    values").

    ``size`` is the export's size now (a table reload may have changed it).
    Lengths over MAX_PAYLOAD for WRITE are the socket layer's business (it
    must decide whether to drain or disconnect before calling this).
    """
    eflags = session.flags
    if cmd == CMD_READ:
        allowed = CMD_FLAG_FUA | CMD_FLAG_DF
    elif cmd == CMD_WRITE:
        allowed = CMD_FLAG_FUA
    elif cmd == CMD_WRITE_ZEROES:
        allowed = CMD_FLAG_FUA | CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO
    elif cmd == CMD_BLOCK_STATUS:
        allowed = CMD_FLAG_FUA | CMD_FLAG_REQ_ONE
    elif cmd in (CMD_FLUSH, CMD_TRIM, CMD_CACHE):
        allowed = CMD_FLAG_FUA
    else:
        return EINVAL
    if flags & ~allowed:
        return EINVAL
    if flags & CMD_FLAG_FUA and not eflags & TF_SEND_FUA:
        return EINVAL
    if flags & CMD_FLAG_DF and not eflags & TF_SEND_DF:
        return EINVAL
    if flags & CMD_FLAG_FAST_ZERO and not eflags & TF_SEND_FAST_ZERO:
        return EINVAL
    if cmd == CMD_FLUSH:
        if not eflags & TF_SEND_FLUSH:
            return EINVAL
        return 0
    if cmd in (CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES) and eflags & TF_READ_ONLY:
        return EPERM
    if cmd == CMD_TRIM and not eflags & TF_SEND_TRIM:
        return EINVAL
    if cmd == CMD_WRITE_ZEROES and not eflags & TF_SEND_WRITE_ZEROES:
        return EINVAL
    if cmd == CMD_BLOCK_STATUS and (not session.contexts or not session.structured
                                    or not length):
        return EINVAL
    if (offset | length) & (session.min_block - 1):
        return EINVAL
    if offset + length > size:
        return ENOSPC if cmd in (CMD_WRITE, CMD_WRITE_ZEROES) else EINVAL
    if cmd == CMD_READ and length > session.max_block:
        return EOVERFLOW if flags & CMD_FLAG_DF else EINVAL
    if flags & CMD_FLAG_FAST_ZERO and not session.export.fast_zero:
        return ENOTSUP          # at once, which is what FAST_ZERO asks for
    if cmd == CMD_CACHE or not length:
        return NO_IO
    return 0


def simple_reply(error: int, cookie: int) -> bytes:
    return SIMPLE_REPLY.pack(SIMPLE_REPLY_MAGIC, error, cookie)


def none_chunk(cookie: int) -> bytes:
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "", done=True) -> bytes:
    msg = message.encode()[:MAX_STRING]
    return ERROR_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                            REPLY_TYPE_ERROR, cookie, 6 + len(msg), error, len(msg)) + msg


def data_chunk_header(cookie: int, offset: int, n: int, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``n`` bytes of data follow it."""
    return DATA_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                           REPLY_TYPE_OFFSET_DATA, cookie, n + 8, offset)


def hole_chunk(cookie: int, offset: int, n: int, done: bool = False) -> bytes:
    return HOLE_CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                           REPLY_TYPE_OFFSET_HOLE, cookie, 12, offset, n)


def error_reply(session: Session, cmd: int, cookie: int, error: int, message="") -> bytes:
    """The whole reply for a failed request, in the form the session needs."""
    if session.structured and cmd in (CMD_READ, CMD_BLOCK_STATUS):
        return error_chunk(cookie, error, message)
    return simple_reply(error, cookie)


def read_reply_parts(cookie: int, offset: int, data, holes=()):
    """Buffers of a successful structured READ reply.

    ``holes`` are (start, length) byte ranges inside ``data`` that read as
    zeros; they become OFFSET_HOLE chunks.  Without holes the reply is one
    OFFSET_DATA chunk with DONE set.
    """
    n = len(data)
    if not holes:
        return [data_chunk_header(cookie, offset, n, True), data]
    parts = []
    pos = 0
    view = memoryview(data)
    for start, length in holes:
        if start > pos:
            parts.append(data_chunk_header(cookie, offset + pos, start - pos, False))
            parts.append(view[pos:start])
        parts.append(hole_chunk(cookie, offset + start, length))
        pos = start + length
    if pos < n:
        parts.append(data_chunk_header(cookie, offset + pos, n - pos, False))
        parts.append(view[pos:n])
    parts.append(none_chunk(cookie))
    return parts


_ZERO = memoryview(bytes(MAX_PAYLOAD))
_ZERO_BLOCK = bytes(HOLE_BLOCK)
_ZERO16 = bytes(16)
HOLE_PROBE = 64 << 10


def find_holes(buf, n: int, base: int = 0) -> list:
    """(start, length) runs of whole zero blocks in ``buf[:n]`` for OFFSET_HOLE.

    Decided by content, so it is exactly "reads as zeros" whatever the
    storage below says.  Data is probed first: if no 64 KiB segment starts
    with 16 zero bytes, the answer is no holes (a few microseconds for
    1 MiB, where a full search costs ~35 us with the GIL held, measurable
    on the 1 MiB read benchmark); holes that small and unaligned are not
    worth finding.  ``buf`` must be a bytearray or bytes (their
    ``startswith`` is a memcmp; a memoryview compares byte by byte); the
    data is ``buf[base:base + n]`` and the runs are relative to ``base``.
    """
    holes = []
    raw_find, raw_starts = buf.find, buf.startswith

    def find(sub, lo):
        at = raw_find(sub, base + lo, base + n)
        return at if at < 0 else at - base

    def starts(prefix, at):
        return raw_starts(prefix, base + at)

    for probe in range(0, n, HOLE_PROBE):
        if starts(_ZERO16, probe):
            break
    else:
        return holes
    pos = find(_ZERO_BLOCK, max(0, probe - HOLE_PROBE))
    while pos != -1 and len(holes) < MAX_HOLES:
        start = -(-pos // HOLE_BLOCK) * HOLE_BLOCK
        end = start
        step = HOLE_BLOCK
        while step >= HOLE_BLOCK:               # gallop over the zeros, then narrow
            if end + step <= n and starts(_ZERO[:step], end):
                end += step
                step = min(step * 2, 1 << 20)
            else:
                step //= 2
        if end > start:
            holes.append((start, end - start))
            pos = find(_ZERO_BLOCK, end)
        else:
            pos = find(_ZERO_BLOCK, start)
    return holes


def block_status_chunk(cookie: int, context_id: int, extents, done: bool) -> bytes:
    """One BLOCK_STATUS chunk: ``extents`` is [(length_bytes, flags)]."""
    body = [_U32.pack(context_id)]
    pack = _EXTENT.pack
    for length, flags in extents:
        body.append(pack(length, flags))
    payload = b"".join(body)
    return CHUNK.pack(STRUCTURED_REPLY_MAGIC, REPLY_FLAG_DONE if done else 0,
                      REPLY_TYPE_BLOCK_STATUS, cookie, len(payload)) + payload


def clip_extents(runs, length: int, req_one: bool):
    """Coalesce [(bytes, flags)] runs and fit them to a request of ``length``.

    The result covers at most ``length`` bytes, has at least one extent,
    no zero-length extent and no two adjacent extents with equal flags.
    With ``req_one`` it is exactly one extent.
    """
    out = []
    total = 0
    for n, flags in runs:
        if n <= 0:
            continue
        if total + n > length:
            n = length - total
        if out and out[-1][1] == flags:
            out[-1] = (out[-1][0] + n, flags)
        else:
            if len(out) >= MAX_EXTENTS:
                break
            out.append((n, flags))
        total += n
        if total >= length:
            break
    if not out:
        out = [(length, 0)]
    if req_one:
        out = out[:1]
    return out
