"""``pydm rv``: runtime verification monitors of a running daemon, and the
offline replay of a recorded event log (the kernel's tracefs rv files)."""

import sys

from pydm.cli.common import add_client_options, client, fail, print_json

REACTORS = ("record", "log", "raise", "abort")


def register(sub):
    p = sub.add_parser(
        "rv", help="runtime verification monitors (list, enable, status, replay)",
        description="Runtime verification: automata (.dot models) watch pydm's trace "
                    "events and report any step a model does not allow.  The live "
                    "commands talk to the daemon; 'replay' checks a recorded event "
                    "log (pydm serve --rv-events FILE) offline.")
    rs = p.add_subparsers(dest="rv_cmd", metavar="CMD", required=True)

    c = rs.add_parser("list", help="the monitors the daemon has, and which are on",
                      description="List every monitor with its scope, state and what it "
                                  "guards.")
    add_client_options(c)
    c.set_defaults(func=cmd_list)

    for name, what in (("enable", "switch monitors on (fresh, in their initial state)"),
                       ("disable", "switch monitors off (their violations are kept)")):
        c = rs.add_parser(name, help=what, description=what[0].upper() + what[1:] + ".")
        c.add_argument("names", metavar="NAME|all",
                       help="a monitor, a comma-separated list, or all")
        if name == "enable":
            c.add_argument("--reactor", choices=REACTORS, default="record",
                           help="what a violation does (default record)")
        add_client_options(c)
        c.set_defaults(func=cmd_switch, op=f"rv_{name}")

    c = rs.add_parser("reactor", help="choose what a monitor does on a violation",
                      description="Set the reactor of enabled monitors: record (kept for "
                                  "status), log (an error line), raise (the event's caller "
                                  "fails), abort (the daemon stops with a core).")
    c.add_argument("names", metavar="NAME|all")
    c.add_argument("reactor", metavar="REACTOR", help=", ".join(REACTORS))
    add_client_options(c)
    c.set_defaults(func=cmd_reactor)

    c = rs.add_parser("status", help="violations per monitor, with the last report",
                      description="Per monitor: on/off, reactor, events seen, instances "
                                  "live, violations and the last report.  Exit 1 when "
                                  "any monitor reported a violation.")
    c.add_argument("names", nargs="?", metavar="NAME|all", help="only these monitors")
    c.add_argument("--check", action="store_true",
                   help="first run the end check: instances left half-way are "
                        "violations (use once the daemon is idle)")
    add_client_options(c)
    c.set_defaults(func=cmd_status)

    c = rs.add_parser("replay", help="check a recorded event log offline",
                      description="Feed EVENTS.jsonl (pydm serve --rv-events) through "
                                  "fresh monitors, in order, clocks on the recorded "
                                  "times, then run the end check.  Exit 1 on any "
                                  "violation.")
    c.add_argument("log", metavar="EVENTS.jsonl")
    c.add_argument("--monitor", default="all", metavar="NAMES",
                   help="comma-separated monitors (default all)")
    c.add_argument("--json", action="store_true", help="print machine-readable JSON")
    c.set_defaults(func=cmd_replay)


def cmd_list(args):
    with client(args) as c:
        rows = c.call("rv_list")
    if args.json:
        print_json(rows)
        return 0
    for r in rows:
        print(f"{r['name']:<15} {'on ' if r['enabled'] else 'off'} {r['scope']:<11} "
              f"{r['description']}")
    return 0


def cmd_switch(args):
    extra = {"reactor": args.reactor} if args.op == "rv_enable" else {}
    with client(args) as c:
        done = c.call(args.op, monitor=args.names, **extra)
    if args.json:
        print_json(done)
    return 0


def cmd_reactor(args):
    if args.reactor not in REACTORS:
        fail(f"unknown reactor {args.reactor!r} (one of {', '.join(REACTORS)})")
    with client(args) as c:
        c.call("rv_reactor", monitor=args.names, reactor=args.reactor)
    return 0


def _print_status(rows):
    for r in rows:
        state = f"on, {r['reactor']}" if r["enabled"] else "off"
        seen = f", {r['events']} events" if r.get("events") is not None else ""
        print(f"{r['name']:<15} {state}{seen}, {r['violations']} violation(s)")
        if r["last"]:
            print(f"    last: {r['last']}")


def cmd_status(args):
    with client(args) as c:
        if args.check:
            c.call("rv_check")
        rows = c.call("rv_status", monitor=args.names)
    if args.json:
        print_json(rows)
    else:
        _print_status(rows)
    return 1 if any(r["violations"] for r in rows) else 0


def cmd_replay(args):
    from pydm.verify.eventlog import replay
    from pydm.verify.session import RVError
    names = [n.strip() for n in args.monitor.split(",") if n.strip()]
    try:
        session, count = replay(args.log, names or ["all"])
    except RVError as e:
        fail(str(e))
    rows = [r for r in session.status() if r["name"] in set(session.names(names or ["all"]))]
    bad = session.violations()
    if args.json:
        print_json({"events": count, "monitors": rows,
                    "violations": [v.as_dict() for v in bad]})
    else:
        print(f"{count} events replayed through {len(rows)} monitor(s): "
              f"{len(bad)} violation(s)")
        for v in bad:
            print(f"  {v}")
    sys.stdout.flush()
    return 1 if bad else 0
