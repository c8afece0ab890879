"""``pydm era checkpoint|take-snap|drop-snap|status|changed``: era devices, live.

Rules of this module: these commands talk to a running daemon through the
control socket, using the era target's messages; they print for people (or
JSON/XML for backup scripts) and never touch metadata files themselves (the
offline tools ``dump``/``restore``/``check``/``invalidate`` do that).
"""

import json

from pydm.cli.common import add_client_options, client, fail, print_json


def _why(dev, e):
    """The daemon's error without the device name it starts with (we print
    that once ourselves)."""
    text = str(e)
    for prefix in (f"{dev}: message failed: ", f"{dev}: "):
        if text.startswith(prefix):
            return text[len(prefix):]
    return text


def _era_target(c, dev):
    """(start sector, status words) of the first era target of ``dev``."""
    from pydm.ctlsock import ControlError
    try:
        lines = c.call("status", name=dev)
    except ControlError as e:
        fail(f"{dev}: {_why(dev, e)}")
    for ln in lines:
        if ln["target"] == "era":
            return ln["start"], ln["params"].split()
    fail(f"{dev}: not an era device (no era target in its table)")


def _message(args, text, verb):
    from pydm.ctlsock import ControlError
    with client(args) as c:
        start, _ = _era_target(c, args.device)
        try:
            result = c.call("message", name=args.device, sector=start, text=text)
        except ControlError as e:
            fail(f"{args.device}: {verb} failed: {_why(args.device, e)}")
        status = _era_target(c, args.device)[1]
    return result, parse_status(status)


def parse_status(words):
    if len(words) < 4 or words[0] == "Error":
        return {"error": " ".join(words) or "Error"}
    used, total = words[1].split("/")
    return {"metadata_block_sectors": int(words[0]), "metadata_used": int(used),
            "metadata_total": int(total), "current_era": int(words[2]),
            "snapshot_block": None if words[3] == "-" else int(words[3])}


def _report(args, st, what):
    if args.json:
        print_json(st)
    elif "error" in st:
        fail(f"{args.device}: era target reports {st['error']}")
    else:
        print(what.format(**st))


def cmd_checkpoint(args):
    _, st = _message(args, "checkpoint", "checkpoint")
    _report(args, st, "checkpoint done: current era is now {current_era}")


def cmd_take_snap(args):
    _, st = _message(args, "take_metadata_snap", "take-snap")
    _report(args, st, "metadata snapshot at block {snapshot_block}; "
                      "current era is now {current_era}")


def cmd_drop_snap(args):
    _, st = _message(args, "drop_metadata_snap", "drop-snap")
    _report(args, st, "metadata snapshot dropped; current era is {current_era}")


def cmd_status(args):
    with client(args) as c:
        st = parse_status(_era_target(c, args.device)[1])
    if args.json:
        print_json(st)
        return
    if "error" in st:
        fail(f"{args.device}: era target reports {st['error']}")
    snap = st["snapshot_block"]
    print(f"current era:       {st['current_era']}\n"
          f"metadata blocks:   {st['metadata_used']}/{st['metadata_total']} used\n"
          f"metadata snapshot: {'none' if snap is None else f'at block {snap}'}")


def format_ranges(device, r) -> str:
    bs = r["block_size_sectors"] << 9
    head = (f"# pydm era changed: device {device}, metadata uuid {r['uuid'] or '-'}, "
            f"blocks written in eras {r['since']}..{r['current_era']}"
            f"{' (metadata snapshot)' if r['snapshot'] else ''}; "
            f"{r['blocks_changed']} of {r['nr_blocks']} blocks of {bs} bytes\n"
            f"# offset length (bytes)\n")
    return head + "".join(f"{b * bs} {(e - b) * bs}\n" for b, e in r["ranges"])


def cmd_changed(args):
    text = f"changed_since {args.since}" + (" snapshot" if args.snapshot else "")
    result, _ = _message(args, text, "changed")
    r = json.loads(result)
    if args.format == "json" or args.json:
        bs = r["block_size_sectors"] << 9
        r["block_size_bytes"] = bs
        r["byte_ranges"] = [{"offset": b * bs, "length": (e - b) * bs} for b, e in r["ranges"]]
        print_json(r)
    elif args.format == "xml":
        from pydm.metadata.blocks_xml import blocks_xml
        print(blocks_xml([b for b, _e in r["ranges"]], [e for _b, e in r["ranges"]]), end="")
    else:
        print(format_ranges(args.device, r), end="")


def add_live_commands(cmds):
    def add(name, func, help_):
        p = cmds.add_parser(name, help=help_, description=help_)
        add_client_options(p)
        p.add_argument("device", metavar="DEV", help="an era device of the running daemon")
        p.set_defaults(func=func)
        return p

    add("checkpoint", cmd_checkpoint,
        "start a new era (drains in-flight writes first); prints the new era")
    add("take-snap", cmd_take_snap,
        "checkpoint, then take a metadata snapshot for a consistent backup")
    add("drop-snap", cmd_drop_snap, "drop the metadata snapshot")
    add("status", cmd_status, "current era, metadata use and snapshot of an era device")
    p = add("changed", cmd_changed,
            "list the blocks written since an era: byte ranges, JSON or era_invalidate XML")
    p.add_argument("--since", type=int, required=True, metavar="ERA",
                   help="report blocks written in this era or later")
    p.add_argument("--format", choices=("ranges", "json", "xml"), default="ranges",
                   help="ranges: 'OFFSET LENGTH' in bytes, one run a line (default); "
                        "json: the runs with the metadata uuid and eras covered; "
                        "xml: era_invalidate's <blocks> document")
    p.add_argument("--snapshot", action="store_true",
                   help="answer from the metadata snapshot (after take-snap), "
                        "not the live metadata")
