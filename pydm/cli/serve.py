"""``pydm serve``: run the daemon (devices from a config, or the demo stack)."""

import logging
import os

from pydm.ctlsock import default_socket_path


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
    p.add_argument("-v", "--verbose", action="count", default=0)
    p.set_defaults(func=run)
    return p


def run(args):
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
    daemon = Daemon(args.socket or default_socket_path())
    daemon.create_devices(specs)
    try:
        daemon.start()
    except BaseException:
        daemon.control.shutdown()
        raise
    names = ", ".join(daemon.control.names()) or "none"
    print(f"pydm: serving devices: {names}; control socket {daemon.socket_path} "
          f"(pid {os.getpid()})", flush=True)
    daemon.run()
    return 0
