"""NBD store arguments: parse and canonicalise an NBD URI (no I/O but one
``realpath`` of a socket, for its identity).

Rules of this module:

* Four forms, and only these: ``nbd://HOST[:PORT]/EXPORT``, ``nbds://...``
  (TLS required), ``nbd+unix:///EXPORT?socket=PATH`` and
  ``nbds+unix:///EXPORT?socket=PATH``.  Anything else (another scheme, no
  host for TCP, a host or port for a socket, no socket, a port outside
  1..65535, an export name with a NUL or over 4096 bytes, a fragment, a
  control character, an unknown or repeated query key) is a ``PydmError``
  with one line.
* pydm's own query keys (``timeout``, ``conns``, ``connect-timeout``) are
  taken out here and never reach libnbd; the TLS keys (``tls-certificates``,
  ``tls-psk-file``, ``tls-username``, ``tls-verify-peer``) become handle
  settings and are only accepted with an ``nbds`` scheme.  A user name may
  also be given as ``USER@HOST`` (it is the TLS user name).
* A secret never shows: a password in the userinfo is dropped (NBD has no
  use for one) and is left out of every message and of the canonical ref.
* The canonical ref is stable: scheme in lower case, an explicit port
  (10809 by default), the export percent-encoded one way, absolute paths,
  query keys in ``QUERY_ORDER``, pydm keys at their default value omitted.
  Parsing a canonical ref gives back the same ref and the same key.
* The identity key (what sharing and claims compare) is the server and the
  export, whatever the transport security or tuning: ``("nbd-tcp", host,
  port, export)`` or ``("nbd-unix", realpath(socket), export)``.
* Relative paths (socket, PSK file, certificates directory) are taken
  relative to ``cwd`` (the caller's directory when None).
"""

import errno
import ipaddress
import math
import os
import re
from dataclasses import dataclass
from typing import Hashable, Optional
from urllib.parse import quote, unquote

from pydm.errors import PydmError
from pydm.store_registry import StoreSpec

DEFAULT_PORT = 10809
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNS = 4
MAX_CONNS = 16
MAX_TIMEOUT = 86400.0
MAX_EXPORT = 4096                # bytes of UTF-8, the NBD limit on a string

SCHEMES = {                      # scheme -> (transport, tls)
    "nbd": ("tcp", False),
    "nbds": ("tcp", True),
    "nbd+unix": ("unix", False),
    "nbds+unix": ("unix", True),
}
QUERY_ORDER = ("socket", "tls-certificates", "tls-psk-file", "tls-username",
               "tls-verify-peer", "timeout", "conns", "connect-timeout")
_TLS_KEYS = frozenset(("tls-certificates", "tls-psk-file", "tls-username",
                       "tls-verify-peer"))

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_PASSWORD_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/?#@]*?):[^/?#@]*@")
_HOST_RE = re.compile(r"^[A-Za-z0-9_~-]+(\.[A-Za-z0-9_~-]+)*\.?$")
_NUMBER_RE = re.compile(r"^([0-9]+\.?[0-9]*|\.[0-9]+)$")
_EXPORT_SAFE = "/:@!$&'()*+,;=-._~"
_VALUE_SAFE = "/:@!$'()*,-._~"


@dataclass(frozen=True)
class NbdParams:
    """What a connection needs, all parsed and checked."""
    scheme: str
    transport: str                   # "tcp" or "unix"
    tls: bool
    host: Optional[str]              # tcp: a name, an IPv4 or a bare IPv6 address
    port: Optional[int]
    socket: Optional[str]            # unix: an absolute path
    export: str
    tls_certificates: Optional[str] = None
    tls_psk_file: Optional[str] = None
    tls_username: Optional[str] = None
    tls_verify_peer: bool = True
    timeout: float = DEFAULT_TIMEOUT
    conns: int = DEFAULT_CONNS
    connect_timeout: Optional[float] = None

    @property
    def handshake_timeout(self) -> float:
        """Seconds one connection attempt (connect and handshake) may take."""
        return self.connect_timeout if self.connect_timeout is not None else self.timeout


def redact(arg: str) -> str:
    """``arg`` with any userinfo password taken out (for messages)."""
    return _PASSWORD_RE.sub(r"\1@", arg)


def _bad(shown: str, why: str) -> PydmError:
    return PydmError(f"{shown}: {why}", errno.EINVAL)


def _number(shown, key, text, upper):
    if not _NUMBER_RE.match(text):
        raise _bad(shown, f"{key}={text!r} is not a positive number of seconds")
    value = float(text)
    if not (math.isfinite(value) and 0 < value <= upper):
        raise _bad(shown, f"{key}={text} is out of range (more than 0, at most {upper:g})")
    return value


def format_seconds(value: float) -> str:
    """``2`` for 2.0, ``0.5`` for 0.5: how a number of seconds is printed."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _path(value, cwd):
    value = os.path.join(cwd, value) if cwd else os.path.abspath(value)
    return os.path.normpath(value)


def _split_netloc(shown, netloc):
    """(user, host, port) of a netloc; a password is dropped unseen."""
    user = None
    if "@" in netloc:
        userinfo, _, netloc = netloc.rpartition("@")
        name = userinfo.partition(":")[0]
        user = unquote(name, errors="strict") if name else None
    port = None
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise _bad(shown, "unterminated [ in the host")
        literal, rest = netloc[1:end], netloc[end + 1:]
        try:
            host = ipaddress.IPv6Address(unquote(literal)).compressed
        except ValueError:
            raise _bad(shown, f"[{literal}] is not an IPv6 address") from None
        if rest:
            if not rest.startswith(":"):
                raise _bad(shown, f"unexpected {rest!r} after the host")
            port = rest[1:]
    else:
        host, sep, port_text = netloc.rpartition(":")
        if not sep:
            host, port_text = netloc, None
        port = port_text
        host = host.lower()
        if host and not _HOST_RE.match(host):
            raise _bad(shown, f"{host!r} is not a host name or address")
    if port is not None and port != "":
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            raise _bad(shown, f"port {port!r} is not a number from 1 to 65535")
        port = int(port)
    else:
        port = None
    return user, host or None, port


def _query(shown, text):
    """{key: value} of a query string; a key given twice is an error."""
    out = {}
    for piece in text.split("&") if text else ():
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        key = unquote(key)
        if key not in QUERY_ORDER:
            raise _bad(shown, f"unknown query key {key!r} (known: {', '.join(QUERY_ORDER)})")
        if not sep:
            raise _bad(shown, f"query key {key!r} has no value")
        if key in out:
            raise _bad(shown, f"query key {key!r} is given twice")
        try:
            out[key] = unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise _bad(shown, f"the value of {key!r} is not UTF-8") from None
    return out


def parse(arg: str, cwd: Optional[str] = None) -> NbdParams:
    """The parameters of an NBD URI (``PydmError`` with one line if bad)."""
    shown = redact(arg)
    m = _SCHEME_RE.match(arg)
    scheme = m.group(1).lower() if m else None
    if scheme not in SCHEMES:
        raise _bad(shown, f"not an NBD URI (schemes: {', '.join(SCHEMES)})")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in arg):
        raise _bad(shown, "control character in the URI")
    transport, tls = SCHEMES[scheme]
    rest = arg[m.end():]
    if "#" in rest:
        raise _bad(shown, "an NBD URI has no fragment (#)")
    rest, _, query_text = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    user, host, port = _split_netloc(shown, netloc)
    try:
        export = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise _bad(shown, "the export name is not UTF-8") from None
    if "\0" in export:
        raise _bad(shown, "the export name contains a NUL")
    if len(export.encode()) > MAX_EXPORT:
        raise _bad(shown, f"the export name is longer than {MAX_EXPORT} bytes")
    q = _query(shown, query_text)

    socket = None
    if transport == "tcp":
        if host is None:
            raise _bad(shown, f"{scheme}:// needs a host")
        if "socket" in q:
            raise _bad(shown, f"socket= is for {scheme}+unix://, not {scheme}://")
        port = port or DEFAULT_PORT
    else:
        if host is not None or port is not None:
            raise _bad(shown, f"{scheme}:// takes no host or port (the socket is "
                              f"given as ?socket=PATH)")
        if not q.get("socket"):
            raise _bad(shown, f"{scheme}:// needs ?socket=PATH")
        socket = _path(q["socket"], cwd)

    if not tls:
        given = sorted(k for k in q if k in _TLS_KEYS) + (["a user name"] if user else [])
        if given:
            raise _bad(shown, f"{given[0]} needs TLS (an nbds scheme)")
    name = q.get("tls-username")
    if user is not None and name is not None and user != name:
        raise _bad(shown, f"two user names: {user!r} and tls-username={name!r}")
    user = user if user is not None else name
    if user == "":
        raise _bad(shown, "tls-username is empty")
    if "tls-certificates" in q and "tls-psk-file" in q:
        raise _bad(shown, "give tls-certificates or tls-psk-file, not both")
    verify = q.get("tls-verify-peer", "true").lower()
    if verify not in ("true", "false"):
        raise _bad(shown, f"tls-verify-peer={q['tls-verify-peer']!r} is not true or false")
    for key in ("tls-certificates", "tls-psk-file"):
        if key in q and not q[key]:
            raise _bad(shown, f"{key} is empty")

    timeout = _number(shown, "timeout", q["timeout"], MAX_TIMEOUT) \
        if "timeout" in q else DEFAULT_TIMEOUT
    conns = DEFAULT_CONNS
    if "conns" in q:
        text = q["conns"]
        if not text.isdigit() or not 1 <= int(text) <= MAX_CONNS:
            raise _bad(shown, f"conns={text!r} is not a number from 1 to {MAX_CONNS}")
        conns = int(text)
    connect_timeout = None
    if "connect-timeout" in q:
        connect_timeout = _number(shown, "connect-timeout", q["connect-timeout"], MAX_TIMEOUT)
        if connect_timeout == timeout:
            connect_timeout = None          # the default: the same as timeout
    return NbdParams(
        scheme=scheme, transport=transport, tls=tls, host=host,
        port=port if transport == "tcp" else None, socket=socket, export=export,
        tls_certificates=_path(q["tls-certificates"], cwd) if "tls-certificates" in q else None,
        tls_psk_file=_path(q["tls-psk-file"], cwd) if "tls-psk-file" in q else None,
        tls_username=user, tls_verify_peer=verify == "true", timeout=timeout,
        conns=conns, connect_timeout=connect_timeout)


def canonical(p: NbdParams) -> str:
    """The canonical ref of ``p`` (no secrets; see the module rules)."""
    q = []
    if p.socket is not None:
        q.append(("socket", p.socket))
    if p.tls_certificates is not None:
        q.append(("tls-certificates", p.tls_certificates))
    if p.tls_psk_file is not None:
        q.append(("tls-psk-file", p.tls_psk_file))
    if p.tls_username is not None:
        q.append(("tls-username", p.tls_username))
    if not p.tls_verify_peer:
        q.append(("tls-verify-peer", "false"))
    if p.timeout != DEFAULT_TIMEOUT:
        q.append(("timeout", format_seconds(p.timeout)))
    if p.conns != DEFAULT_CONNS:
        q.append(("conns", str(p.conns)))
    if p.connect_timeout is not None:
        q.append(("connect-timeout", format_seconds(p.connect_timeout)))
    if p.transport == "tcp":
        host = f"[{p.host}]" if ":" in p.host else p.host
        where = f"{host}:{p.port}"
    else:
        where = ""
    text = f"{p.scheme}://{where}/{quote(p.export, safe=_EXPORT_SAFE)}"
    if q:
        text += "?" + "&".join(f"{k}={quote(v, safe=_VALUE_SAFE)}" for k, v in q)
    return text


def identity(p: NbdParams) -> Hashable:
    """What the store *is*: the server and the export (see the module rules)."""
    if p.transport == "tcp":
        return ("nbd-tcp", p.host, p.port, p.export)
    return ("nbd-unix", os.path.realpath(p.socket), p.export)


def describe(p: NbdParams) -> str:
    """The server and export alone, for messages: ``nbd://127.0.0.1:10809/x``."""
    if p.transport == "tcp":
        host = f"[{p.host}]" if ":" in p.host else p.host
        return f"{p.scheme}://{host}:{p.port}/{quote(p.export, safe=_EXPORT_SAFE)}"
    return (f"{p.scheme}:///{quote(p.export, safe=_EXPORT_SAFE)}"
            f"?socket={quote(p.socket, safe=_VALUE_SAFE)}")


def parse_spec(arg: str, cwd: Optional[str] = None, plugin: str = "nbd") -> StoreSpec:
    """The store spec of an NBD URI: identity, canonical ref, parameters."""
    p = parse(arg, cwd)
    return StoreSpec(plugin, identity(p), canonical(p), p)
