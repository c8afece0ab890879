"""``pydm serve``: run the daemon (devices from a config, or the demo stack)."""

import logging
import os
import sys

from pydm.errors import PydmError
from pydm.paths import default_socket_path, socket_path


def register(sub):
    p = sub.add_parser(
        "serve", help="run the pydm daemon",
        description="Run the pydm daemon: create the devices described in CONFIG (a TOML "
                    "file of [[device]] tables) or, without CONFIG, the built-in demo "
                    "stack, then serve them until SIGINT/SIGTERM.",
    )
    p.add_argument("config", nargs="?", metavar="CONFIG",
                   help="TOML config file; omit to serve the demo stack")
    p.add_argument("--socket", metavar="PATH",
                   help=f"control socket path (default: $PYDM_SOCKET or {default_socket_path()})")
    p.add_argument("--state-dir", metavar="DIR",
                   help="where the demo stack keeps its image files "
                        "(default: $XDG_DATA_HOME/pydm/demo)")
    nbd = p.add_argument_group("NBD server")
    nbd.add_argument("--listen", metavar="ADDR",
                     help="TCP address to serve NBD on (default 127.0.0.1; 0.0.0.0 or :: "
                          "for every interface, which wants --tls require)")
    nbd.add_argument("--port", type=int, metavar="N",
                     help="TCP port (default 10809; 0 picks a free one)")
    nbd.add_argument("--unix", metavar="PATH",
                     help="serve NBD on a Unix socket; alone, it replaces the TCP "
                          "listener, with --listen/--port it is added to it")
    nbd.add_argument("--no-nbd", action="store_true", help="do not serve NBD at all")
    nbd.add_argument("--tls", choices=("off", "on", "require"), default="off",
                     help="STARTTLS: off, on (offered) or require (every client must "
                          "upgrade first); default off")
    nbd.add_argument("--tls-certificates", metavar="DIR",
                     help="directory with server-cert.pem, server-key.pem and "
                          "optionally ca-cert.pem (client certificates are checked "
                          "against it)")
    nbd.add_argument("--tls-verify-peer", action="store_true",
                     help="require a client certificate signed by ca-cert.pem")
    nbd.add_argument("--export-default", metavar="NAME",
                     help="device served to clients asking for the empty export name "
                          "(default: the only device, when there is one)")
    nbd.add_argument("--nbd-readonly", action="store_true",
                     help="serve every export read-only")
    nbd.add_argument("--handshake-limit", type=float, default=None, metavar="SECONDS",
                     help="drop a client that has not finished the handshake within "
                          "this time (default 10, like qemu-nbd)")
    nbd.add_argument("--nbd-workers", type=int, default=None, metavar="N",
                     help="most worker threads per connection, for large requests and "
                          "replies completed elsewhere (default 4)")
    nbd.add_argument("--aio", choices=("auto", "off"), default="auto",
                     help="reads that miss the page cache: 'auto' queues them on the "
                          "connection's io_uring (many in flight, like the client's "
                          "queue depth) where the kernel allows it; 'off' reads them "
                          "one at a time on the connection's thread (default auto)")
    nbd.add_argument("--poll-max-us", type=float, default=None, metavar="US",
                     help="the longest a connection polls its socket before it sleeps, "
                          "adapting to the client (like QEMU's poll-max-ns): a client "
                          "that waits for each reply gets it without a thread wake-up; "
                          "0 never polls (default 100)")
    rv = p.add_argument_group("runtime verification")
    rv.add_argument("--rv", metavar="NAMES",
                    help="monitors to run from the start: 'all' or a comma-separated "
                         "list (pydm rv list names them; 'lockdep' switches the "
                         "lock-order checker on for this daemon)")
    rv.add_argument("--rv-reactor", choices=("record", "log", "raise", "abort"),
                    default="log",
                    help="what a violation does: record (pydm rv status shows it), log "
                         "(also an error line; the default), raise (fail the event's "
                         "caller), abort (stop the daemon with a core)")
    rv.add_argument("--rv-events", metavar="FILE",
                    help="record every trace event to FILE as JSON lines, for "
                         "pydm rv replay")
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=run)
    return p


def _rv_setup(args):
    """Turn the lock-order checker on before any lock exists, when asked."""
    if not args.rv:
        return None
    names = [n.strip() for n in args.rv.split(",") if n.strip()]
    if not names:
        raise PydmError("--rv needs 'all' or monitor names")
    if ("all" in names or "lockdep" in names) and "pydm.lockdep" not in sys.modules:
        os.environ.setdefault("PYDM_LOCKDEP", "1")
    return names


def run(args):
    rv_names = _rv_setup(args)
    from pydm import demo
    from pydm.config import load_config
    from pydm.daemon import Daemon

    logging.basicConfig(level=logging.DEBUG if args.verbose > 1 else
                        logging.INFO if args.verbose else logging.WARNING,
                        format="pydm: %(levelname)s: %(message)s")
    if args.config:
        specs = load_config(args.config)
    else:
        specs = demo.demo_specs(args.state_dir or demo.default_state_dir())
    from pydm.verify.eventlog import EventLog
    from pydm.verify.session import RVError, default as rv_session
    rv = rv_session()
    events = EventLog(args.rv_events).start() if args.rv_events else None
    if rv_names:
        try:
            rv.enable(rv_names, args.rv_reactor)
        except RVError as e:
            raise PydmError(f"--rv: {e}") from None
    daemon = Daemon(socket_path(args.socket, create=True), rv=rv)
    nbd = None if args.no_nbd else nbd_service(daemon.control, args)
    if nbd is not None:
        daemon.add_service(nbd)
    daemon.claim()
    try:
        daemon.create_devices(specs)
        daemon.start()
    except BaseException:
        daemon.abandon()
        raise
    names = ", ".join(daemon.control.names()) or "none"
    where = f"; NBD on {nbd.uri()}" if nbd is not None else ""
    print(f"pydm: serving devices: {names}; control socket {daemon.socket_path}{where} "
          f"(pid {os.getpid()})", flush=True)
    try:
        daemon.run()
    finally:
        if events is not None:
            events.close()
    return 0


def nbd_listen_spec(args):
    """The listener list from --listen/--port/--unix."""
    from pydm.nbd.server import DEFAULT_PORT
    out = []
    tcp = args.unix is None or args.listen is not None or args.port is not None
    if tcp:
        host = args.listen or "127.0.0.1"
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        out.append(("tcp", host, DEFAULT_PORT if args.port is None else args.port))
    if args.unix:
        out.append(("unix", args.unix))
    return out


def nbd_service(control, args):
    from pydm.nbd.server import DEFAULT_WORKERS, HANDSHAKE_LIMIT, POLL_MAX, NBDServer
    limit = HANDSHAKE_LIMIT if args.handshake_limit is None else args.handshake_limit
    if not limit > 0:
        raise PydmError(f"--handshake-limit must be a positive number of seconds, "
                        f"not {args.handshake_limit}")
    return NBDServer(control, nbd_listen_spec(args), tls=args.tls, handshake_limit=limit,
                     tls_certificates=args.tls_certificates,
                     tls_verify_peer=args.tls_verify_peer,
                     default_export=args.export_default, readonly=args.nbd_readonly,
                     workers=DEFAULT_WORKERS if args.nbd_workers is None else args.nbd_workers,
                     aio=args.aio,
                     poll_max=POLL_MAX if args.poll_max_us is None else args.poll_max_us / 1e6)
