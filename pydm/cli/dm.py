"""``pydm dm ...``: dmsetup's commands, arguments and output, over the control socket.

Rules of this module: it only parses arguments, sends one request per
device to the daemon and prints the reply in dmsetup's shape (or as JSON with
``--json``).  Every error is one line on stderr and exit status 1, worded as
dmsetup's ``device-mapper: <op> ioctl on <name> failed: <reason>``.
"""

import os
import sys

from pydm.cli.common import add_client_options, client, fail, print_json
from pydm.ctlsock import ControlError
from pydm.errors import strerror


def _fmt_error(op, name, e):
    detail = str(e)
    if name and detail.startswith(f"{name}: "):
        detail = detail[len(name) + 2:]
    reason = strerror(getattr(e, "errno", 0) or 22)
    where = f" on {name}" if name else ""
    return f"device-mapper: {op} ioctl{where} failed: {reason}: {detail}"


def _call(args, op, name=None, **kw):
    try:
        with client(args) as c:
            return c.call(op, **({"name": name} if name is not None else {}), **kw)
    except ControlError as e:
        fail(_fmt_error(op, name, e))


def _read_table(args):
    if args.table_line is not None:
        return args.table_line
    # Paths are bytes to the kernel: bytes that are not UTF-8 travel as
    # surrogate escapes (as in argv), and come back out of ``table`` as the
    # same bytes.
    if args.table_file:
        try:
            with open(args.table_file, encoding="utf-8", errors="surrogateescape") as f:
                return f.read()
        except OSError as e:
            fail(f"cannot read table file {args.table_file}: {e.strerror}")
    if sys.stdin.isatty():
        print("Reading table from stdin (end with Ctrl-D)...", file=sys.stderr)
    return sys.stdin.buffer.read().decode("utf-8", "surrogateescape")


# ------------------------------------------------------------- formatting
def format_info(info: dict) -> str:
    state = "SUSPENDED" if info["suspended"] else "ACTIVE"
    if info["readonly"]:
        state += " (READ-ONLY)"
    tables = " & ".join(x for x, on in (("LIVE", info["live"]), ("INACTIVE", info["inactive"]))
                        if on) or "None"
    rows = [("Name", info["name"]), ("State", state), ("Read Ahead", "256"),
            ("Tables present", tables), ("Open count", str(info["open_count"])),
            ("Event number", str(info["event_nr"])),
            ("Major, minor", f"{info['major']}, {info['minor']}"),
            ("Number of targets", str(info["targets"]))]
    if info.get("uuid"):
        rows.append(("UUID", info["uuid"]))
    return "\n".join(f"{k + ':':<19}{v}" for k, v in rows)


def format_info_columns(infos, headings=True, sep=":") -> str:
    out = []
    if headings:
        out.append(sep.join(["Name", "Maj", "Min", "Stat", "Open", "Targ", "Event", "UUID"]))
    for i in infos:
        attr = ("L" if i["live"] else "-") + ("I" if i["inactive"] else "-") + \
               ("s" if i["suspended"] else "-") + ("r" if i["readonly"] else "w")
        out.append(sep.join([i["name"], str(i["major"]), str(i["minor"]), attr,
                             str(i["open_count"]), str(i["targets"]), str(i["event_nr"]),
                             i.get("uuid") or ""]))
    return "\n".join(out)


def format_lines(lines, prefix: bool) -> str:
    out = []
    for ln in lines:
        body = f"{ln['start']} {ln['length']} {ln['target']}"
        if ln["params"]:
            body += f" {ln['params']}"
        out.append(f"{ln['name']}: {body}" if prefix else body)
    return "\n".join(out)


def format_ls(devs) -> str:
    if not devs:
        return "No devices found"
    out = []
    for d in devs:
        line = f"{d['name']}\t({d['major']}:{d['minor']})"
        if d.get("clients"):
            line += f"\tclients: {', '.join(d['clients'])}"
        out.append(line)
    return "\n".join(out)


# -------------------------------------------------------------- commands
def cmd_create(args):
    table = None if args.notable else _read_table(args)
    _call(args, "create", args.name, table=table, uuid=args.uuid, readonly=args.readonly,
          cwd=os.getcwd())
    if args.json:
        print_json({"created": args.name})


def cmd_load(args):
    _call(args, "load", args.name, table=_read_table(args), cwd=os.getcwd())


def _each(op, **kw):
    def run(args):
        for n in args.names:
            _call(args, op, n, **{k: getattr(args, v) for k, v in kw.items()})
    return run


def cmd_message(args):
    result = _call(args, "message", args.name, sector=args.sector, text=" ".join(args.text))
    if args.json:
        print_json({"result": result})
    elif result:
        print(result)


def _cmd_lines(op):
    def run(args):
        lines = _call(args, op, args.name, target=args.target)
        if args.json:
            print_json(lines)
        elif lines:
            print(format_lines(lines, prefix=args.name is None))
        elif args.name is None:
            print("No devices found")
    return run


def cmd_info(args):
    infos = _call(args, "info", args.name)
    if args.json:
        print_json(infos)
    elif not infos:
        print("No devices found")
    elif args.columns:
        print(format_info_columns(infos, not args.noheadings, args.separator))
    else:
        print("\n\n".join(format_info(i) for i in infos))


def cmd_ls(args):
    devs = _call(args, "ls", target=args.target)
    print_json(devs) if args.json else print(format_ls(devs))


def cmd_wait(args):
    nr = _call(args, "wait", args.name, event_nr=args.event_nr)
    print_json({"event_nr": nr}) if args.json else print(nr)


def cmd_targets(args):
    types = _call(args, "targets")
    if args.json:
        print_json(types)
        return
    for t in types:
        print(f"{t['name']:<16} v{'.'.join(map(str, t['version']))}")


def cmd_stores(args):
    plugins = _call(args, "stores")
    if args.json:
        print_json(plugins)
        return
    for p in plugins:
        forms = ", ".join(f"{s}:" for s in p["schemes"])
        if p["name"] == "file":
            forms = "PATH, " + forms
        print(f"{p['name']:<16} {forms if p['loaded'] else 'not loaded: ' + p['error']}")


def cmd_deps(args):
    deps = _call(args, "deps", args.name)
    if args.json:
        print_json(deps)
    else:
        print(f" {len(deps)} dependencies\t: " + " ".join(f"({d})" for d in deps))


def cmd_version(args):
    v = _call(args, "version")
    print_json(v) if args.json else print(f"pydm daemon version: {v['version']} (pid {v['pid']})")


def _simple(op, *fields):
    def run(args):
        _call(args, op, args.name, **{f: getattr(args, f) for f in fields})
    return run


# ------------------------------------------------------------------ parser
def register(sub):
    dm = sub.add_parser(
        "dm", help="dmsetup-style device control (talks to the daemon)",
        description="Control devices of a running `pydm serve` daemon with dmsetup's "
                    "commands and output. Tables use dmsetup syntax: "
                    "'<start> <length> <target> <args...>' in 512-byte sectors; a "
                    "store is an image file path or dm:NAME for another pydm device.",
    )
    cmds = dm.add_subparsers(dest="dm_cmd", metavar="COMMAND", required=True)

    def add(name, func, help_, aliases=()):
        p = cmds.add_parser(name, help=help_, description=help_, aliases=list(aliases))
        add_client_options(p)
        p.set_defaults(func=func)
        return p

    def table_source(p):
        p.add_argument("table_file", nargs="?", metavar="TABLE_FILE",
                       help="file holding the table (default: read stdin)")
        p.add_argument("--table", dest="table_line", metavar="LINE",
                       help="a one-line table given on the command line")

    p = add("create", cmd_create, "create a device, load its table and resume it")
    p.add_argument("name")
    table_source(p)
    p.add_argument("-u", "--uuid")
    p.add_argument("-r", "--readonly", action="store_true", help="create a read-only device")
    p.add_argument("-n", "--notable", action="store_true", help="create with no table")

    p = add("load", cmd_load, "load a table into the inactive slot", aliases=["reload"])
    p.add_argument("name")
    table_source(p)

    p = add("suspend", _each("suspend", noflush="noflush"),
            "suspend devices: drain in-flight I/O, hold new I/O until resume")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--noflush", action="store_true",
                   help="let targets hand back I/O instead of completing it")
    p.add_argument("--nolockfs", action="store_true", help="accepted for dmsetup "
                   "compatibility (there is no filesystem to freeze)")

    p = add("resume", _each("resume", noflush="noflush"),
            "make the inactive table live (if any) and resume I/O")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("--noflush", action="store_true")

    p = add("remove", _each("remove", force="force", deferred="deferred"), "remove devices")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.add_argument("-f", "--force", action="store_true", help="remove even while open")
    p.add_argument("--deferred", action="store_true", help="remove on last close")

    p = add("clear", _simple("clear"), "destroy the inactive table")
    p.add_argument("name")

    p = add("rename", _simple("rename", "new_name"), "rename a device")
    p.add_argument("name")
    p.add_argument("new_name")

    p = add("wipe_table", _simple("wipe_table"),
            "replace the live table with one that fails all I/O")
    p.add_argument("name")

    p = add("message", cmd_message, "send a message to the target at SECTOR")
    p.add_argument("name")
    p.add_argument("sector", type=int)
    p.add_argument("text", nargs="+")

    for op, help_ in (("status", "print each target's status"),
                      ("table", "print the live table (reloadable)")):
        p = add(op, _cmd_lines(op), help_)
        p.add_argument("name", nargs="?")
        p.add_argument("--target", metavar="TYPE", help="only targets of this type")

    p = add("info", cmd_info, "print device state")
    p.add_argument("name", nargs="?")
    p.add_argument("-c", "--columns", action="store_true", help="one line per device")
    p.add_argument("--noheadings", action="store_true")
    p.add_argument("--separator", default=":")

    p = add("ls", cmd_ls, "list devices (and their NBD clients)")
    p.add_argument("--target", metavar="TYPE")

    p = add("wait", cmd_wait, "wait for the event counter to move past EVENT_NR")
    p.add_argument("name")
    p.add_argument("event_nr", nargs="?", type=int)

    p = add("deps", cmd_deps, "list the stores and devices a device maps onto")
    p.add_argument("name")

    add("targets", cmd_targets, "list the available target types")
    add("stores", cmd_stores, "list the store plugins and the argument forms they take")
    add("version", cmd_version, "print the daemon version")
    return dm

