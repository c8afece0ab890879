"""Sans-IO NBD handshake: exports as the handshake sees them, the session it
ends in, and the fixed-newstyle state machine with its option handlers.

Rules of this module:

* No sockets, threads, locks or devices.  Bytes come in, bytes (and small
  result objects, ``Outcome``) go out; the socket layer (``connection.py``)
  decides when to read and where to write.  Everything here can be driven
  by a unit test.
* The handshake is a state machine whose legal moves are the data in
  ``TRANSITIONS``: an event with no entry raises ``ProtocolError`` and
  leaves the state unchanged.  What each option means lives in the
  ``_opt_*`` handlers (one function per option, looked up in
  ``_HANDLERS``); which options TLS gates lives in ``TLS_FREE_OPTIONS``.
* Exports are seen through a catalogue object (``names()``,
  ``lookup(name)``); this module never asks a device anything itself.
* ``ProtocolError`` means "hard disconnect" (the spec's MUST violations).
  Anything the client can recover from is an error *reply*, never an
  exception.
"""

import struct

from pydm.nbd.wire import (BLOCK_INFO, CLIENT_FLAGS, EXPORT_INFO, FLAG_C_FIXED_NEWSTYLE,
                           FLAG_C_NO_ZEROES, FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES,
                           GREETING, IHAVEOPT, INFO_BLOCK_SIZE, INFO_DESCRIPTION,
                           INFO_EXPORT, INFO_NAME, MAX_META_QUERIES, MAX_OPTION_DATA,
                           MAX_PAYLOAD, MAX_STRING, MIN_BLOCK, NBDMAGIC, OPTION_HEADER,
                           OPTION_NAMES, OPTION_REPLY, OPT_ABORT, OPT_EXPORT_NAME,
                           OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST,
                           OPT_LIST_META_CONTEXT, OPT_REPLY_MAGIC, OPT_SET_META_CONTEXT,
                           OPT_STARTTLS, OPT_STRUCTURED_REPLY, REP_ACK, REP_ERR_INVALID,
                           REP_ERR_PLATFORM, REP_ERR_POLICY, REP_ERR_SHUTDOWN,
                           REP_ERR_TLS_REQD, REP_ERR_TOO_BIG, REP_ERR_UNKNOWN,
                           REP_ERR_UNSUP, REP_INFO, REP_META_CONTEXT, REP_SERVER,
                           TF_HAS_FLAGS, TF_SEND_DF, U16, U32, U64, ProtocolError)


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


# ------------------------------------------------------- option handlers
def _opt_abort(hs, opt, data):
    return Outcome(option_reply(opt, REP_ACK), CLOSE)


def _opt_list(hs, opt, data):
    if data:
        return _error(opt, REP_ERR_INVALID, "LIST takes no data")
    parts = []
    for name, desc in hs.catalog.names():
        raw = name.encode()
        parts.append(option_reply(opt, REP_SERVER, U32.pack(len(raw)) + raw +
                                  desc.encode()[:MAX_STRING]))
    parts.append(option_reply(opt, REP_ACK))
    return Outcome(b"".join(parts))


def _opt_starttls(hs, opt, data):
    if data:
        return _error(opt, REP_ERR_INVALID, "STARTTLS takes no data")
    if hs.tls_active:
        return _error(opt, REP_ERR_INVALID, "TLS is already active")
    if hs.tls_mode == "off":
        return _error(opt, REP_ERR_POLICY, "TLS is not enabled on this server")
    if not hs.tls_available:
        return _error(opt, REP_ERR_PLATFORM, "TLS is not available")
    if not hs.fixed_newstyle:
        return _error(opt, REP_ERR_INVALID, "TLS needs fixed newstyle")
    return Outcome(option_reply(opt, REP_ACK), STARTTLS)


def _opt_structured(hs, opt, data):
    if data:
        return _error(opt, REP_ERR_INVALID, "STRUCTURED_REPLY takes no data")
    if hs.structured:
        return _error(opt, REP_ERR_INVALID, "structured replies already negotiated")
    hs.structured = True
    return Outcome(option_reply(opt, REP_ACK))


def _opt_export_name(hs, opt, data):
    name = _string(data, 0, len(data))
    info = None if name is None else hs.catalog.lookup(name)
    if info is None:
        return Outcome(action=CLOSE, message=f"EXPORT_NAME of unknown export {name!r}")
    session = _session(hs, info)
    reply = U64.pack(info.size) + U16.pack(session.flags)
    if not hs.no_zeroes:
        reply += bytes(124)
    return Outcome(reply, TRANSMIT, session)


def _opt_info_go(hs, opt, data):
    if len(data) < 6:
        return _error(opt, REP_ERR_INVALID, "INFO/GO data too short")
    (n,) = U32.unpack_from(data, 0)
    if n > len(data) - 6:
        return _error(opt, REP_ERR_INVALID, "export name runs past the option")
    name = _string(data, 4, n)
    if name is None:
        return _error(opt, REP_ERR_INVALID, "export name is not valid UTF-8")
    (k,) = U16.unpack_from(data, 4 + n)
    if len(data) != 4 + n + 2 + 2 * k:
        return _error(opt, REP_ERR_INVALID, "INFO/GO length does not match its requests")
    wanted = set(struct.unpack_from(f">{k}H", data, 6 + n))
    info = hs.catalog.lookup(name)
    if info is None:
        return _error(opt, REP_ERR_UNKNOWN, f"no export named {name!r}",
                      log=f"{OPTION_NAMES[opt]} of unknown export {name!r}")
    session = _session(hs, info)
    parts = [option_reply(opt, REP_INFO,
                          EXPORT_INFO.pack(INFO_EXPORT, info.size, session.flags))]
    # Block sizes are sent whether asked or not: clients that did not ask
    # may ignore them, and we cope with any alignment by answering EINVAL.
    parts.append(option_reply(opt, REP_INFO, BLOCK_INFO.pack(
        INFO_BLOCK_SIZE, *info.block_sizes)))
    if INFO_NAME in wanted:
        parts.append(option_reply(opt, REP_INFO,
                                  U16.pack(INFO_NAME) + info.name.encode()))
    if INFO_DESCRIPTION in wanted and info.description:
        parts.append(option_reply(opt, REP_INFO, U16.pack(INFO_DESCRIPTION) +
                                  info.description.encode()[:MAX_STRING]))
    parts.append(option_reply(opt, REP_ACK))
    if opt == OPT_INFO:
        return Outcome(b"".join(parts))
    return Outcome(b"".join(parts), TRANSMIT, session)


def _session(hs, info):
    contexts = {}
    if hs.meta_export is not None and hs.meta_export == info.name:
        contexts = dict(hs.meta_contexts)
    return Session(info, hs.structured, contexts)


def _opt_meta_context(hs, opt, data):
    setting = opt == OPT_SET_META_CONTEXT
    if setting:
        # A SET replaces the selection even when it fails.
        hs.meta_export, hs.meta_contexts = None, {}
    if not hs.structured:
        return _error(opt, REP_ERR_INVALID, "negotiate structured replies first")
    parsed = _parse_meta_request(data)
    if parsed is None:
        return _error(opt, REP_ERR_INVALID, "malformed meta context request")
    name, queries = parsed
    if len(queries) > MAX_META_QUERIES:
        return _error(opt, REP_ERR_TOO_BIG, "too many meta context queries")
    info = hs.catalog.lookup(name)
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
                                      U32.pack(i) + ctx.encode()))
        hs.meta_export = info.name
        hs.meta_contexts = {i: ctx for i, ctx in enumerate(chosen, 1)}
    else:
        if queries:
            listed = [c for c in available if any(_matches(q, c) for q in queries)]
        else:
            listed = list(available)
        for ctx in listed:
            parts.append(option_reply(opt, REP_META_CONTEXT, U32.pack(0) + ctx.encode()))
    parts.append(option_reply(opt, REP_ACK))
    return Outcome(b"".join(parts))


def _opt_extended_headers(hs, opt, data):
    # libnbd >= 1.18 and qemu >= 8.2 ask first and fall back on ERR_UNSUP.
    return _error(opt, REP_ERR_UNSUP, "extended headers are not supported")


_HANDLERS = {
    OPT_EXPORT_NAME: _opt_export_name,
    OPT_ABORT: _opt_abort,
    OPT_LIST: _opt_list,
    OPT_STARTTLS: _opt_starttls,
    OPT_INFO: _opt_info_go,
    OPT_GO: _opt_info_go,
    OPT_STRUCTURED_REPLY: _opt_structured,
    OPT_LIST_META_CONTEXT: _opt_meta_context,
    OPT_SET_META_CONTEXT: _opt_meta_context,
    OPT_EXTENDED_HEADERS: _opt_extended_headers,
}


def _parse_meta_request(data):
    """(export name, [query]) or None when a length overruns (proto.md, NBD_OPT_LIST_META_CONTEXT)."""
    if len(data) < 8:
        return None
    (n,) = U32.unpack_from(data, 0)
    if n > len(data) - 8:
        return None
    name = _string(data, 4, n)
    if name is None:
        return None
    pos = 4 + n
    (q,) = U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(q):
        if pos + 4 > len(data):
            return None
        (ln,) = U32.unpack_from(data, pos)
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
