"""A small blocking NBD client for tests: exact bytes, no cleverness.

It speaks through ``pydm.nbd.protocol``'s constants and structs but parses
replies itself, so a server bug and a codec bug cannot cancel out silently
(the real clients in test_clients.py are the independent check).
"""

import socket
import struct

from pydm.nbd import protocol as P


class NBDError(Exception):
    def __init__(self, error, message=""):
        super().__init__(f"NBD error {error} {message}".strip())
        self.error = error


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"server closed the connection ({len(buf)}/{n} bytes)")
        buf += chunk
    return bytes(buf)


def connect(addr, timeout=10):
    if isinstance(addr, str):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect(addr)
    else:
        s = socket.create_connection(addr, timeout)
    return s


def option(sock, opt, data=b""):
    sock.sendall(P.OPTION_HEADER.pack(P.IHAVEOPT, opt, len(data)) + data)


def read_option_reply(sock):
    magic, opt, rtype, n = struct.unpack(">QIII", recv_exact(sock, 20))
    assert magic == P.OPT_REPLY_MAGIC, hex(magic)
    return opt, rtype, recv_exact(sock, n)


def option_replies(sock, opt, data=b""):
    """Send an option and collect replies up to the final ACK or error."""
    option(sock, opt, data)
    out = []
    while True:
        o, rtype, body = read_option_reply(sock)
        assert o == opt
        out.append((rtype, body))
        if rtype == P.REP_ACK or rtype & 0x80000000:
            return out


def go_data(name, infos=(P.INFO_BLOCK_SIZE,)):
    raw = name.encode()
    return (struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) +
            b"".join(struct.pack(">H", i) for i in infos))


def meta_data(name, queries):
    raw = name.encode()
    out = struct.pack(">I", len(raw)) + raw + struct.pack(">I", len(queries))
    for q in queries:
        out += struct.pack(">I", len(q.encode())) + q.encode()
    return out


def greet(sock, client_flags=P.FLAG_C_FIXED_NEWSTYLE | P.FLAG_C_NO_ZEROES):
    magic, ihaveopt, flags = P.GREETING.unpack(recv_exact(sock, 18))
    assert magic == P.NBDMAGIC and ihaveopt == P.IHAVEOPT
    sock.sendall(struct.pack(">I", client_flags))
    return flags


class Client:
    """One transmission-phase connection to ``export``."""

    def __init__(self, addr, export, structured=True, contexts=("base:allocation",),
                 tls_context=None, server_hostname="localhost", export_name=False):
        sock = connect(addr)
        greet(sock)
        if tls_context is not None:
            rep = option_replies(sock, P.OPT_STARTTLS)
            if rep[-1][0] != P.REP_ACK:
                raise NBDError(rep[-1][0], rep[-1][1].decode(errors="replace"))
            sock = tls_context.wrap_socket(sock, server_hostname=server_hostname)
        self.sock = sock
        self.structured = False
        self.contexts = {}
        if structured:
            rep = option_replies(sock, P.OPT_STRUCTURED_REPLY)
            self.structured = rep[-1][0] == P.REP_ACK
        if self.structured and contexts:
            for rtype, body in option_replies(sock, P.OPT_SET_META_CONTEXT,
                                              meta_data(export, list(contexts))):
                if rtype == P.REP_META_CONTEXT:
                    self.contexts[struct.unpack(">I", body[:4])[0]] = body[4:].decode()
        if export_name:
            option(sock, P.OPT_EXPORT_NAME, export.encode())
            self.size, self.flags = struct.unpack(">QH", recv_exact(sock, 10))
        else:
            self.size = self.flags = None
            for rtype, body in option_replies(sock, P.OPT_GO, go_data(export)):
                if rtype == P.REP_INFO and struct.unpack(">H", body[:2])[0] == P.INFO_EXPORT:
                    _t, self.size, self.flags = struct.unpack(">HQH", body)
                elif rtype & 0x80000000:
                    raise NBDError(rtype, body.decode(errors="replace"))
        self._cookie = 0

    def close(self, disc=True):
        try:
            if disc:
                self.send(P.CMD_DISC, 0, 0)
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- raw requests -------------------------------------------------------
    def send(self, cmd, offset, length, flags=0, data=b"", cookie=None):
        if cookie is None:
            self._cookie += 1
            cookie = self._cookie
        self.sock.sendall(P.REQUEST.pack(P.REQUEST_MAGIC, flags, cmd, cookie, offset,
                                         length) + data)
        return cookie

    def reply(self, length_of=None):
        """(cookie, error, payload) for one whole reply.

        ``length_of(cookie)`` gives the READ length for simple replies (the
        simple form carries no length).  Structured payload: READ data with
        holes filled, or a list of (context id, [(len, flags)]).
        """
        (magic,) = struct.unpack(">I", recv_exact(self.sock, 4))
        if magic == P.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", recv_exact(self.sock, 12))
            data = b""
            if not error and length_of is not None:
                data = recv_exact(self.sock, length_of(cookie))
            return cookie, error, data
        assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
        data = {}
        status = []
        error = 0
        self.chunk_types = []
        first = True
        while True:
            if not first:
                (magic,) = struct.unpack(">I", recv_exact(self.sock, 4))
                assert magic == P.STRUCTURED_REPLY_MAGIC, hex(magic)
            first = False
            flags, ctype, cookie, n = struct.unpack(">HHQI", recv_exact(self.sock, 16))
            body = recv_exact(self.sock, n)
            self.chunk_types.append(ctype)
            if ctype == P.REPLY_TYPE_OFFSET_DATA:
                data[struct.unpack(">Q", body[:8])[0]] = body[8:]
            elif ctype == P.REPLY_TYPE_OFFSET_HOLE:
                off, size = struct.unpack(">QI", body)
                data[off] = bytes(size)
            elif ctype == P.REPLY_TYPE_BLOCK_STATUS:
                cid = struct.unpack(">I", body[:4])[0]
                ext = [struct.unpack(">II", body[i:i + 8]) for i in range(4, n, 8)]
                status.append((cid, ext))
            elif ctype & 0x8000:
                error = struct.unpack(">I", body[:4])[0]
            else:
                assert ctype == P.REPLY_TYPE_NONE, ctype
            if flags & P.REPLY_FLAG_DONE:
                break
        if status:
            return cookie, error, status
        if data:
            base = min(data)
            out = bytearray()
            for off in sorted(data):
                assert off == base + len(out), "chunks overlap or leave a gap"
                out += data[off]
            return cookie, error, bytes(out)
        return cookie, error, b""

    # -- synchronous helpers ----------------------------------------------
    def _one(self, cmd, offset, length, flags=0, data=b""):
        c = self.send(cmd, offset, length, flags, data)
        cookie, error, payload = self.reply(
            (lambda _c: length) if cmd == P.CMD_READ else None)
        assert cookie == c
        if error:
            raise NBDError(error)
        return payload

    def pread(self, offset, length, flags=0):
        return self._one(P.CMD_READ, offset, length, flags)

    def pwrite(self, offset, data, flags=0):
        self._one(P.CMD_WRITE, offset, len(data), flags, data)

    def flush(self):
        self._one(P.CMD_FLUSH, 0, 0)

    def trim(self, offset, length, flags=0):
        self._one(P.CMD_TRIM, offset, length, flags)

    def zero(self, offset, length, flags=0):
        self._one(P.CMD_WRITE_ZEROES, offset, length, flags)

    def block_status(self, offset, length, flags=0):
        return self._one(P.CMD_BLOCK_STATUS, offset, length, flags)
