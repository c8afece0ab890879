"""NBD server: listeners and connections turning NBD requests into bios.

Rules of this module:

* All protocol decisions are ``protocol.py``'s; this module moves bytes,
  owns threads and buffers, and builds bios.  It knows devices (through
  ``Control`` and ``MappedDevice``) and nothing below them.
* One reader thread per connection reads every request (a buffered reader:
  one ``recv_into`` usually brings several requests), checks it, and submits
  its bio.  A bio that completes inline (a synchronous store) has its reply
  queued and sent with the next batch, one ``sendmsg`` for many replies,
  just before the reader would block.  Large writes go to the
  connection's worker threads, so a 1 MiB pwrite overlaps the next recv;
  large reads are read by the reader and their replies sent by a worker,
  so the next pread overlaps this send (the send is the dearer half).
* Replies from workers and other threads go through one outbox that one
  thread at a time drains (see ``_reply``), so the socket is not handed
  from thread to thread per reply.
  ``device.submit`` never blocks, so a suspended device holds bios, not the
  reader.
* A completion arriving on a thread that is not the connection's own (a
  delay timer, a resume) never writes to the socket: it hands the reply to
  a worker, so a client that stops reading cannot stall anybody else.
* Every request is admitted against a per-connection bound on bytes and
  requests in flight, and released when its reply has been sent; a reader
  over the bound flushes its batch and waits.
* Locks (all leaves, made by ``pydm.lockdep``): ``nbd.conn.write``
  serialises messages on one socket (then ``nbd.conn.tls`` inside it);
  ``nbd.conn.mem`` guards the in-flight counters; ``nbd.conn.outbox`` the
  replies waiting for the connection's one sender; ``nbd.server`` the
  connection set.  None is held while calling into a device.
* Malformed input: the spec's error reply, or for MUST violations a
  disconnect, logged once per event with the peer's address.
"""

import errno
import logging
import queue
import socket
import threading
import time

from pydm.bio import (Bio, DISCARD, FLUSH, READ, REQ_FUA, REQ_NOFALLBACK, REQ_NOUNMAP,
                      REQ_PREFLUSH, WRITE, WRITE_ZEROES)
from pydm.errors import DMError, PydmError, nbd_error
from pydm.lockdep import make_event, make_lock
from pydm.nbd import protocol as P
from pydm.nbd.admission import (CONNECTION_RESERVE, MAX_INFLIGHT_BYTES, SERVER_BUDGET,
                                Admission, Leaving, ServerBudget)
from pydm.nbd.buffers import BufferPool
from pydm.nbd.exports import Catalog, block_status
from pydm.nbd.transport import PlainTransport, TLSTransport, make_tls_context, set_nodelay
from pydm.sockets import Refusals, accept_loop, bind_unix, unlink_if_ours

log = logging.getLogger("pydm.nbd")

DEFAULT_PORT = 10809
HANDSHAKE_LIMIT = 10.0         # s for the whole handshake (qemu-nbd's default)
DRAIN_TIMEOUT = 30.0           # wait for in-flight bios when a client leaves
STOP_DRAIN_TIMEOUT = 5.0
RBUF_SIZE = 256 << 10
MAX_CONNECTIONS = 256
BATCH_PARTS = 128              # iovec entries per batched sendmsg (IOV_MAX 1024)
BATCH_BYTES = 2 << 20
REQUEST_LEN = P.REQUEST.size   # 28
# Where read data starts past the aligned base: behind the data chunk's
# header (20 + 8 bytes structured, 16 simple) it is 64-byte aligned again.
READ_PAD_STRUCTURED = -28 % 64
READ_PAD_SIMPLE = -16 % 64
INLINE_MAX = 128 << 10         # larger READ/WRITE run on a worker thread
DEFAULT_WORKERS = 4            # at most, per connection; started as needed
ERRORS_LOGGED = 5              # per connection; the rest are counted

NO_IO = P.NO_IO
_get_ident = threading.get_ident
_unpack_request = P.REQUEST.unpack_from
_simple = P.SIMPLE_REPLY.pack
_data_header = P.DATA_CHUNK.pack


class Disconnect(Exception):
    """The peer went away; nothing more to say to it."""


class Connection:
    def __init__(self, server, sock, peer: str):
        self.server = server
        self.sock = sock
        self.peer = peer
        self.wlock = make_lock("nbd.conn.write")
        self.transport = PlainTransport(sock)
        self.adm = Admission(server.budget, server.reserve, server.max_inflight_bytes)
        self.closed = False
        self.leaving = False        # server stop: stop waiting for memory
        self.deadline = None        # monotonic time the handshake must end by
        self.handshake = None
        self.session = None
        self.structured = False
        self.dev = None
        self.key = object()
        self.rbuf = bytearray(RBUF_SIZE)
        self.rmv = memoryview(self.rbuf)
        self.rpos = self.rend = 0
        # After a large WRITE, read just the next header: a big read-ahead
        # would pull the next payload's head into rbuf, to be copied out
        # again with the GIL held; recv_all_into takes it straight.
        self.fill_cap = RBUF_SIZE
        self.pending = []
        self.pending_rel = []
        self.pending_bytes = 0
        self.flock = make_lock("nbd.conn.outbox")
        self.outbox = []            # replies waiting for the connection's sender
        self.outbox_rel = []
        self.sending = False        # a thread drains the outbox, or a job to do so is queued
        self.batching = False
        self.reader_ident = None
        self.worker_idents = set()
        self.work = None
        self.nworkers = 0
        self.errors = 0
        self.thread = threading.Thread(target=self.run, name=f"pydm-nbd {peer}", daemon=True)

    # ------------------------------------------------------------ life
    def run(self):
        self.reader_ident = _get_ident()
        try:
            self.deadline = time.monotonic() + self.server.handshake_limit
            session = self._handshake()
            if session is not None:
                self.deadline = None
                self.sock.settimeout(None)
                self._transmission(session)
        except (Disconnect, Leaving):
            log.debug("%s: disconnected", self.peer)
        except P.ProtocolError as e:
            log.warning("nbd %s: protocol violation: %s; disconnecting", self.peer, e)
        except socket.timeout:
            log.warning("nbd %s: handshake timed out; disconnecting", self.peer)
        except OSError as e:
            if not self.closed:
                log.info("nbd %s: connection lost: %s", self.peer, e)
        except Exception:
            log.exception("nbd %s: internal error; disconnecting", self.peer)
        finally:
            self._finish()

    def shutdown(self):
        """Ask the reader to stop (server stop): it sees end of stream."""
        self.leaving = True
        self.adm.wake()
        if self.handshake is not None:
            self.handshake.shutting_down = True
        try:
            self.sock.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    def _finish(self):
        self.batching = False
        if self.dev is not None:
            try:
                self._flush_pending()
            except OSError:
                pass
            self._wait_drained(STOP_DRAIN_TIMEOUT if self.server.stopping else DRAIN_TIMEOUT)
        self.closed = True
        if self.transport.tls:
            self.transport.close_notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self.work is not None:
            for _ in range(self.nworkers):
                self.work.put(None)
        if self.dev is not None:
            self.server.control.close(self.dev, self.key)
        if self.errors > ERRORS_LOGGED:
            log.info("nbd %s: %d failed requests in all", self.peer, self.errors)
        self.server._forget(self)

    def _wait_drained(self, timeout):
        if not self.adm.wait_drained(timeout):
            log.warning("nbd %s: closing with %d requests still in flight",
                        self.peer, self.adm.inflight)

    def _arm_deadline(self):
        """During the handshake every receive and send gets only what is
        left of the whole handshake's time, so a client trickling bytes
        cannot hold a connection slot for longer than that."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise socket.timeout("handshake time limit")
        self.sock.settimeout(left)

    # --------------------------------------------------------- reading
    def _fill(self, need):
        """Make ``need`` bytes (<= RBUF_SIZE) available at ``rpos``."""
        rpos, rend = self.rpos, self.rend
        have = rend - rpos
        if not have:
            self.rpos = self.rend = rend = 0
        elif rpos and (RBUF_SIZE - rpos < need or RBUF_SIZE - rend < 65536):
            self.rmv[:have] = bytes(self.rmv[rpos:rend])
            self.rpos, self.rend = 0, have
            rend = have
        if self.pending:
            self._flush_pending()
        if self.deadline is not None:
            self._arm_deadline()
        recv = self.transport.recv_into
        cap = self.fill_cap
        while have < need:
            n = recv(self.rmv[rend:], min(RBUF_SIZE - rend, max(cap, need - have)))
            if not n:
                raise Disconnect()
            rend += n
            have += n
            if have < need and self.deadline is not None:
                self._arm_deadline()
        self.rend = rend

    def _read_exact(self, n) -> bytes:
        if self.rend - self.rpos < n:
            self._fill(n)
        pos = self.rpos
        self.rpos = pos + n
        return bytes(self.rmv[pos:pos + n])

    def _read_into(self, view, n):
        """Fill ``view[:n]`` from the stream (a WRITE payload)."""
        if n <= RBUF_SIZE // 2:
            if self.rend - self.rpos < n:
                self._fill(n)
            pos = self.rpos
            view[:n] = self.rmv[pos:pos + n]
            self.rpos = pos + n
            return
        k = min(self.rend - self.rpos, n)
        if k:
            pos = self.rpos
            view[:k] = self.rmv[pos:pos + k]
            self.rpos = pos + k
        if k < n and self.pending:
            self._flush_pending()
        recv = self.transport.recv_all_into
        while k < n:
            got = recv(view[k:n], n - k)
            if not got:
                raise Disconnect()
            k += got

    def _skip(self, n):
        while n:
            k = min(n, RBUF_SIZE // 2)
            if self.rend - self.rpos < k:
                self._fill(k)
            self.rpos += k
            n -= k

    # -------------------------------------------------------- handshake
    def _send_now(self, parts):
        with self.wlock:
            self.transport.send(parts)

    def _send_handshake(self, parts):
        self._arm_deadline()
        self._send_now(parts)

    def _handshake(self):
        srv = self.server
        hs = P.ServerHandshake(srv.catalog, srv.tls_mode, srv.ssl_context is not None)
        self.handshake = hs
        if srv.stopping:
            hs.shutting_down = True
        self._send_handshake([hs.greeting()])
        hs.client_flags(self._read_exact(4))
        while True:
            opt, length = hs.option_header(self._read_exact(16))
            if length > P.MAX_OPTION_DATA:
                self._skip(length)
                out = hs.option_too_big(opt)
            else:
                out = hs.option(opt, self._read_exact(length))
            if out.message:
                log.info("nbd %s: %s", self.peer, out.message)
            if out.reply:
                self._send_handshake([out.reply])
            if out.action == P.CONTINUE:
                continue
            if out.action == P.STARTTLS:
                self._start_tls()
                hs.tls_established()
                continue
            if out.action == P.TRANSMIT:
                return out.session
            return None

    def _start_tls(self):
        if self.rend != self.rpos:
            raise P.ProtocolError("data sent after STARTTLS before the TLS handshake")
        t = TLSTransport(self.sock, self.server.ssl_context, self.wlock)
        self._arm_deadline()
        t.handshake()
        self.transport = t
        who = t.peer_subject()
        log.info("nbd %s: TLS established (%s)%s", self.peer, t.obj.version(),
                 f", client {who}" if who else "")

    # ----------------------------------------------------- transmission
    def _transmission(self, session):
        name = session.export.name
        desc = f"nbd {self.peer}" + (" tls" if self.transport.tls else "")
        try:
            self.dev = self.server.control.open(name, self.key, desc)
        except DMError as e:
            log.warning("nbd %s: export %s vanished during the handshake: %s",
                        self.peer, name, e)
            return
        self.session = session
        self.structured = session.structured
        log.info("nbd %s: serving %s (%s replies)", self.peer, name,
                 "structured" if session.structured else "simple")
        self.work = queue.SimpleQueue()
        self._add_worker()
        self.batching = True
        self._serve()

    def _add_worker(self):
        with self.adm.mem:          # completions on foreign threads may race here
            i = self.nworkers
            if i and i >= self.server.workers:
                return
            self.nworkers = i + 1
        threading.Thread(target=self._worker, name=f"pydm-nbd-w{i} {self.peer}",
                         daemon=True).start()

    def _hand_off(self, job):
        """Queue a job for the workers, adding one while all seem busy."""
        work = self.work
        work.put(job)
        if work.qsize() > 1 and self.nworkers < self.server.workers and not self.closed:
            self._add_worker()

    def _worker(self):
        self.worker_idents.add(_get_ident())
        get = self.work.get
        while True:
            job = get()
            if job is None:
                return
            fn, arg = job
            try:
                fn(arg)
            except Exception:
                log.exception("nbd %s: worker job failed", self.peer)

    def _serve(self):
        dev = self.dev
        submit = dev.submit
        session = self.session
        structured = self.structured
        pool = self.server.pool
        read_pad = READ_PAD_STRUCTURED if structured else READ_PAD_SIMPLE
        check = P.check_request
        rbuf = self.rbuf
        read_done = self._read_done
        write_done = self._simple_done
        hand_off = self._hand_off
        while True:
            if self.rend - self.rpos < REQUEST_LEN:
                self._fill(REQUEST_LEN)
            magic, flags, cmd, cookie, offset, length = _unpack_request(rbuf, self.rpos)
            self.rpos += REQUEST_LEN
            if magic != P.REQUEST_MAGIC:
                raise P.ProtocolError(f"bad request magic {magic:#x}")
            if cmd == P.CMD_WRITE and length > P.MAX_PAYLOAD:
                raise P.ProtocolError(f"WRITE of {length} bytes is over the "
                                      f"{P.MAX_PAYLOAD}-byte limit")
            if cmd == P.CMD_DISC:
                log.debug("nbd %s: soft disconnect", self.peer)
                return
            err = check(session, dev.size, flags, cmd, offset, length)
            if cmd == P.CMD_READ or cmd == P.CMD_WRITE:
                if err:
                    if err == NO_IO:                # zero length
                        self._admit(0)
                        self._reply_ok_empty(cmd, cookie)
                        continue
                    if cmd == P.CMD_WRITE:
                        self._skip(length)
                    self._refuse(cmd, cookie, err, offset, length)
                    continue
                self._admit(length)
                buf = pool.get(length)
                if cmd == P.CMD_READ:
                    view = buf.read_view(length, read_pad)
                    bio = Bio(READ, offset >> 9, length >> 9, view, 0, read_done,
                              (cookie, offset, buf, length, flags))
                else:
                    view = buf.write_view(length)
                    self.fill_cap = REQUEST_LEN if length > INLINE_MAX else RBUF_SIZE
                    try:
                        self._read_into(view, length)
                    except BaseException:
                        self._release(buf, length)      # the client left mid-payload
                        raise
                    bio = Bio(WRITE, offset >> 9, length >> 9, view,
                              REQ_FUA if flags & P.CMD_FLAG_FUA else 0, write_done,
                              (cookie, buf, length))
                if length > INLINE_MAX and cmd == P.CMD_WRITE:
                    hand_off((submit, bio))
                else:
                    submit(bio)
                continue
            if err:
                if err == NO_IO:
                    self._admit(0)
                    self._reply([_simple(P.SIMPLE_REPLY_MAGIC, 0, cookie)], None, 0)
                else:
                    self._refuse(cmd, cookie, err, offset, length)
                continue
            self._admit(0)
            self._other(cmd, flags, cookie, offset, length, structured)

    def _other(self, cmd, flags, cookie, offset, length, structured):
        dev = self.dev
        if cmd == P.CMD_FLUSH:
            dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, self._simple_done,
                           (cookie, None, 0)))
        elif cmd == P.CMD_TRIM:
            done = self._trim_fua_done if flags & P.CMD_FLAG_FUA else self._simple_done
            dev.submit(Bio(DISCARD, offset >> 9, length >> 9, None, 0, done,
                           (cookie, None, 0)))
        elif cmd == P.CMD_WRITE_ZEROES:
            # (a FAST_ZERO that the stack cannot honour was refused already)
            bflags = (REQ_FUA if flags & P.CMD_FLAG_FUA else 0) | \
                     (REQ_NOUNMAP if flags & P.CMD_FLAG_NO_HOLE else 0) | \
                     (REQ_NOFALLBACK if flags & P.CMD_FLAG_FAST_ZERO else 0)
            dev.submit(Bio(WRITE_ZEROES, offset >> 9, length >> 9, None, bflags,
                           self._simple_done, (cookie, None, 0)))
        elif cmd == P.CMD_BLOCK_STATUS:
            self._block_status(flags, cookie, offset, length)
        else:       # check_request refuses unknown commands; keep it that way
            self._reply([_simple(P.SIMPLE_REPLY_MAGIC, P.EINVAL, cookie)], None, 0)

    def _block_status(self, flags, cookie, offset, length):
        req_one = bool(flags & P.CMD_FLAG_REQ_ONE)
        contexts = self.session.contexts
        parts = []
        last = len(contexts)
        try:
            for i, (cid, name) in enumerate(sorted(contexts.items()), 1):
                extents = block_status(self.dev, name, offset, length, req_one)
                parts.append(P.block_status_chunk(cookie, cid, extents, i == last))
        except Exception as e:
            log.exception("nbd %s: block status failed", self.peer)
            self._reply([P.error_chunk(cookie, P.EIO, f"block status failed: {e}")], None, 0)
            return
        self._reply(parts, None, 0)

    def _refuse(self, cmd, cookie, err, offset, length):
        self.errors += 1
        if self.errors <= ERRORS_LOGGED:
            log.info("nbd %s: %s %d+%d refused with error %d", self.peer,
                     P.CMD_NAMES.get(cmd, cmd), offset, length, err)
        self._admit(0)
        self._reply([P.error_reply(self.session, cmd, cookie, err)], None, 0)

    def _reply_ok_empty(self, cmd, cookie):
        if cmd == P.CMD_READ and self.structured:
            self._reply([P.none_chunk(cookie)], None, 0)
        else:
            self._reply([_simple(P.SIMPLE_REPLY_MAGIC, 0, cookie)], None, 0)

    # ------------------------------------------------------ completions
    def _read_done(self, bio):
        cookie, offset, buf, n, flags = bio.private
        status = bio.status
        if status:
            self._count_error(bio)
            if self.structured:
                parts = [P.error_chunk(cookie, nbd_error(status), "read failed")]
            else:
                parts = [_simple(P.SIMPLE_REPLY_MAGIC, nbd_error(status), cookie)]
        elif self.structured:
            holes = None
            if n >= P.HOLE_READ_MIN and not flags & P.CMD_FLAG_DF:
                holes = P.find_holes(buf.raw, n, buf.base + READ_PAD_STRUCTURED)
            if holes:
                parts = P.read_reply_parts(cookie, offset, bio.data, holes)
            else:
                parts = [_data_header(P.STRUCTURED_REPLY_MAGIC, P.REPLY_FLAG_DONE,
                                      P.REPLY_TYPE_OFFSET_DATA, cookie, n + 8, offset),
                         bio.data]
        else:
            parts = [_simple(P.SIMPLE_REPLY_MAGIC, 0, cookie), bio.data]
        self._reply(parts, buf, n)

    def _simple_done(self, bio):
        cookie, buf, n = bio.private
        status = bio.status
        if status:
            self._count_error(bio)
            status = nbd_error(status)
        self._reply([_simple(P.SIMPLE_REPLY_MAGIC, status, cookie)], buf, n)

    def _trim_fua_done(self, bio):
        if bio.status or self.closed:
            self._simple_done(bio)
            return
        # The store does not tie durability to a discard: FUA means a flush.
        self.dev.submit(Bio(FLUSH, 0, 0, None, REQ_PREFLUSH, self._simple_done, bio.private))

    def _count_error(self, bio):
        self.errors += 1
        if self.errors <= ERRORS_LOGGED:
            log.info("nbd %s: %r failed: %s", self.peer, bio,
                     errno.errorcode.get(bio.status, bio.status))

    # ---------------------------------------------------------- sending
    def _reply(self, parts, buf, n):
        if self.closed:
            self._release(buf, n)
            return
        ident = _get_ident()
        if ident == self.reader_ident and n <= INLINE_MAX:
            if self.batching:
                self.pending += parts
                self.pending_rel.append((buf, n))
                self.pending_bytes += n
                if len(self.pending) >= BATCH_PARTS or self.pending_bytes >= BATCH_BYTES:
                    self._flush_pending()
                return
        # Big replies and those from workers and foreign threads meet in
        # the outbox, and one thread at a time drains it: a worker finding
        # nobody sending becomes the sender; others just leave their reply.
        # The reader and foreign threads (a delay timer, an era commit
        # releasing a burst) never send here: they queue a drain job for a
        # worker.  1 MiB reads, QD4: reading and sending all on the reader
        # was CPU-bound on one thread, and every worker doing its own read
        # and send paid ~4 context switches a request (both ~0.75x nbdkit);
        # the reader reading and one worker sending made it ~0.9x.
        with self.flock:
            self.outbox += parts
            self.outbox_rel.append((buf, n))
            if self.sending:
                return
            self.sending = True
        if ident in self.worker_idents:
            self._drain_outbox(None)
        else:
            self._hand_off((self._drain_outbox, None))

    def _drain_outbox(self, _arg):
        flock = self.flock
        try:
            while True:
                with flock:
                    parts, rel = self.outbox, self.outbox_rel
                    if not rel:
                        self.sending = False
                        return
                    self.outbox, self.outbox_rel = [], []
                self._send_batch(parts, rel)
        except BaseException:
            with flock:
                self.sending = False
            raise

    def _flush_pending(self):
        parts = self.pending
        if not parts:
            return
        rel = self.pending_rel
        self.pending = []
        self.pending_rel = []
        self.pending_bytes = 0
        self._send_batch(parts, rel)

    def _send_batch(self, parts, rel):
        try:
            for i in range(0, len(parts), BATCH_PARTS):     # sendmsg takes <= IOV_MAX
                if not self.closed:
                    self._send_now(parts[i:i + BATCH_PARTS])
        except OSError as e:
            self._send_failed(e)
        finally:
            put = self.server.pool.put
            nbytes = 0
            for buf, n in rel:
                if buf is not None:
                    put(buf)
                nbytes += n
            self.adm.release(len(rel), nbytes)

    def _send_failed(self, e):
        if not self.closed:
            self.closed = True
            log.info("nbd %s: cannot send reply: %s", self.peer, e)
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------- accounting
    def _admit(self, nbytes):
        adm = self.adm
        if not adm.try_admit(nbytes):
            # Over a bound: our own batch holds replies that free memory.
            adm.admit(nbytes, self._flush_pending, self._is_leaving)

    def _is_leaving(self):
        return self.leaving or self.closed

    def _release(self, buf, n):
        if buf is not None:
            self.server.pool.put(buf)
        self.adm.release(1, n)


class NBDServer:
    """The NBD listener service of a pydm daemon (``start()`` / ``stop()``).

    ``listen`` is a list of ("tcp", host, port) and ("unix", path) entries.
    ``handshake_limit`` bounds the whole handshake in seconds; the memory
    bounds are admission.py's (per connection, its reserve, and the budget
    every connection draws from beyond its reserve).
    """

    def __init__(self, control, listen=(("tcp", "127.0.0.1", DEFAULT_PORT),),
                 tls="off", tls_certificates=None, tls_verify_peer=False,
                 default_export=None, readonly=False, workers=DEFAULT_WORKERS,
                 handshake_limit=HANDSHAKE_LIMIT, max_connections=MAX_CONNECTIONS,
                 max_inflight_bytes=MAX_INFLIGHT_BYTES, reserve=CONNECTION_RESERVE,
                 budget=SERVER_BUDGET):
        if tls not in P.TLS_MODES:
            raise PydmError(f"--tls must be one of {', '.join(P.TLS_MODES)}")
        self.control = control
        self.listen = list(listen)
        self.tls_mode = tls
        self.ssl_context = None
        if tls != "off":
            self.ssl_context = make_tls_context(tls_certificates, tls_verify_peer)
        self.catalog = Catalog(control, default_export, readonly)
        self.workers = workers
        self.handshake_limit = handshake_limit
        self.max_connections = max_connections
        self.max_inflight_bytes = max_inflight_bytes
        self.reserve = reserve
        self.budget = ServerBudget(budget)
        self.pool = BufferPool()
        self._closing = make_event()
        self._refusals = Refusals("NBD server")
        self._lock = make_lock("nbd.server")
        self._conns = set()
        self._listeners = []
        self._threads = []
        self.addresses = []        # what we really bound (port 0 resolved)

    @property
    def stopping(self) -> bool:
        return self._closing.is_set()

    # -------------------------------------------------------- lifecycle
    def start(self):
        try:
            for entry in self.listen:
                self._listeners.append(self._bind(entry))
        except BaseException:
            self._close_listeners()
            raise
        for sock, label, _ident in self._listeners:
            t = threading.Thread(target=accept_loop, daemon=True,
                                 name=f"pydm-nbd-accept {label}",
                                 args=(sock, self._closing,
                                       lambda c, a, ls=sock: self._accepted(ls, c, a),
                                       f"NBD {label}"))
            t.start()
            self._threads.append(t)
            log.info("NBD listening on %s%s", label,
                     f" (TLS {self.tls_mode})" if self.tls_mode != "off" else "")

    def _bind(self, entry):
        if entry[0] == "unix":
            path = entry[1]
            sock, ident = bind_unix(path, "NBD socket", backlog=128)
            self.addresses.append(("unix", path))
            return sock, f"unix:{path}", (path, ident)
        _kind, host, port = entry
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, stype, proto, _c, addr = infos[0]
            sock = socket.socket(family, stype, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
        except OSError as e:
            raise PydmError(f"cannot listen on {host}:{port}: "
                            f"{e.strerror or e}", e.errno or errno.EINVAL) from None
        sock.listen(128)
        bound = sock.getsockname()
        self.addresses.append(("tcp", bound[0], bound[1]))
        where = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
        return sock, f"{where}:{bound[1]}", None

    def stop(self):
        self._closing.set()
        self._close_listeners()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.shutdown()
        self.budget.wake()
        for c in conns:
            c.thread.join(STOP_DRAIN_TIMEOUT + 5)
        for t in self._threads:
            t.join(5)

    def _close_listeners(self):
        for sock, _label, owned in self._listeners:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
            if owned is not None:
                unlink_if_ours(*owned)
        self._listeners = []

    def _accepted(self, lsock, sock, addr):
        if lsock.family == socket.AF_UNIX:
            peer = f"unix:{sock.fileno()}"
        elif lsock.family == socket.AF_INET6:
            peer = f"[{addr[0]}]:{addr[1]}"
        else:
            peer = f"{addr[0]}:{addr[1]}"
        with self._lock:
            full = len(self._conns) >= self.max_connections or self.stopping
            if not full:
                set_nodelay(sock)
                conn = Connection(self, sock, peer)
                self._conns.add(conn)
        refusals = self._refusals
        if full:
            refusals.refused(f"{self.max_connections} connections already (first: {peer})")
            sock.close()
            return
        try:
            conn.thread.start()
        except RuntimeError:         # no thread to be had now: as if full
            refusals.refused(f"cannot start a thread (first: {peer})")
            self._forget(conn)
            sock.close()
            return
        refusals.accepted()

    def _forget(self, conn):
        with self._lock:
            self._conns.discard(conn)

    def connections(self):
        with self._lock:
            return [c.peer for c in self._conns]

    def memory(self) -> dict:
        """In-flight payload: the shared budget's use, and each connection's
        requests and bytes (for ``pydm`` status and the tests)."""
        with self._lock:
            conns = list(self._conns)
        return {"budget": self.budget.limit, "budget_used": self.budget.used,
                "connections": [{"peer": c.peer, "requests": c.adm.inflight,
                                 "bytes": c.adm.inflight_bytes} for c in conns]}

    def uri(self, export="") -> str:
        """An nbd:// URI for the first listener (for messages and tests)."""
        if not self.addresses:
            return ""
        scheme = "nbds" if self.tls_mode == "require" else "nbd"
        a = self.addresses[0]
        if a[0] == "unix":
            return f"{scheme}+unix:///{export}?socket={a[1]}"
        host = f"[{a[1]}]" if ":" in a[1] else a[1]
        return f"{scheme}://{host}:{a[2]}/{export}"
