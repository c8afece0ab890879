"""``pydm lw ...``: dm-log-writes logs: ``replay`` (replay-log's options and
semantics), ``dump`` (every entry), and ``mark`` (a mark on a live device).

Rules of this module: reading and replaying are
``pydm.targets.logwrites.replay``'s; this module parses arguments, opens
files (the log read-only, the replay target read-write, never truncated),
runs the ``--fsck`` command and prints.  Every error is one line on stderr
and exit status 1, as replay-log's are; a malformed log is refused before
the target is written.
"""

import argparse
import json
import subprocess
import sys

from pydm.cli.common import add_client_options, client, fail, print_json
from pydm.errors import PydmError


def _open(path, readonly=True):
    from pydm.cli.common import open_file
    return open_file(path, readonly)


def _log(path):
    from pydm.targets.logwrites.replay import Log, ReplayError
    store = _open(path)
    if store.size < 512:
        fail(f"{path}: too small for a log ({store.size} bytes)")
    try:
        return Log(store)
    except ReplayError as e:
        fail(f"{path}: {e}")


def _check_arg(text):
    if text in ("flush", "fua", "discard"):
        return text
    if text.isascii() and text.isdigit() and int(text) > 0:
        return int(text)
    raise argparse.ArgumentTypeError(f"--check takes N (> 0), flush, fua or discard, "
                                     f"not {text!r}")


def _count(what):
    def parse(text):
        if not text.isascii() or not text.isdigit():
            raise argparse.ArgumentTypeError(f"{what} must be a number, not {text!r}")
        return int(text)
    return parse


def cmd_replay(args):
    from pydm.targets.logwrites import format as F
    from pydm.targets.logwrites.replay import Options, ReplayError, find, replay
    if (args.fsck is None) != (args.check is None):
        fail("--fsck and --check go together")
    log = _log(args.log)
    if args.num_entries:
        print(log.nr_entries)
        return 0
    opts = Options(limit=args.limit, next_flush=args.next_flush, next_fua=args.next_fua,
                   end_mark=args.end_mark, start_entry=args.start_entry,
                   start_mark=args.start_mark, find=args.find, no_discard=args.no_discard,
                   check=args.check, start_sector=args.start_sector,
                   end_sector=args.end_sector)
    try:
        if args.find:
            e = find(log, opts)
            print(f"{e.index}@{e.next_pos()}")
            return 0
        if args.replay is None:
            print(f"Log version={F.VERSION}, sectorsize={log.ss}, entries={log.nr_entries}")
            return 0
        target = _open(args.replay, readonly=False)
        if args.fsck is not None:
            opts.fsck = lambda _e: subprocess.run(args.fsck, shell=True).returncode
        say = (lambda line: print(line, file=sys.stderr)) if args.verbose else None
        try:
            n = replay(log, target, opts, say)
        finally:
            target.close()
        if args.verbose:
            print(f"replayed {n} entries", file=sys.stderr)
    except ReplayError as e:
        fail(f"{args.log}: {e}")
    except OSError as e:
        raise PydmError(f"replay onto {args.replay} failed: {e.strerror}", e.errno) from None
    return 0


def cmd_dump(args):
    from pydm.targets.logwrites import format as F
    from pydm.targets.logwrites.replay import ReplayError
    log = _log(args.log)
    rows = []
    try:
        for e in log.walk():
            rows.append({"index": e.index, "pos": e.pos, "sector": e.sector,
                         "nr_sectors": e.nr_sectors, "flags": e.flags,
                         "flag_names": F.flag_names(e.flags),
                         "mark": e.text.decode("utf-8", "replace") if e.flags & F.MARK
                         else None})
    except ReplayError as e:
        if args.json:
            print_json({"sectorsize": log.ss, "nr_entries": log.nr_entries,
                        "entries": rows, "error": str(e)})
        else:
            _print_rows(log, rows)
        fail(f"{args.log}: {e}")
    if args.json:
        print_json({"sectorsize": log.ss, "nr_entries": log.nr_entries, "entries": rows})
    else:
        _print_rows(log, rows)
    return 0


def _print_rows(log, rows):
    print(f"log: version 1, sectorsize {log.ss}, {log.nr_entries} entries")
    for r in rows:
        what = f"mark {json.dumps(r['mark'])}" if r["mark"] is not None else \
            f"sector {r['sector']} +{r['nr_sectors']}"
        print(f"{r['index']:>8}@{r['pos']:<10} {r['flag_names']:<14} {what}")


def cmd_mark(args):
    from pydm.cli.era_live import _why
    from pydm.ctlsock import ControlError
    with client(args) as c:
        try:
            c.call("message", name=args.device, sector=0, text=f"mark {args.name}")
        except ControlError as e:
            fail(f"{args.device}: mark failed: {_why(args.device, e)}")
    return 0


def register(sub):
    lw = sub.add_parser(
        "lw", help="log-writes logs: replay, dump, mark",
        description="Tools for dm-log-writes logs (the log-writes target's format, which "
                    "xfstests' replay-log also reads).")
    cmds = lw.add_subparsers(dest="lw_cmd", metavar="COMMAND", required=True)
    p = cmds.add_parser(
        "replay", help="replay a log onto a file or device (replay-log's options)",
        description="Replay the entries of a log onto a file or block device, as "
                    "xfstests' replay-log does: from entry 0 (or --start-entry/--start-mark, "
                    "skipped entries are not replayed) until --limit entries, the next "
                    "FLUSH/FUA entry, or --end-mark. Discards punch holes in a file (they "
                    "read back as zeros). Without --replay, print the log's version, sector "
                    "size and entry count. Exit 1 on a malformed log (nothing is written), a "
                    "missing start mark, an entry number past the log, a --find that finds "
                    "nothing, or a failing --fsck.")
    p.add_argument("--log", required=True, metavar="LOG", help="the log file or device")
    p.add_argument("--replay", metavar="FILE", help="file or block device to write onto")
    p.add_argument("--limit", type=_count("--limit"), default=0, metavar="N",
                   help="stop after N entries counted from the start position")
    p.add_argument("--next-flush", action="store_true", help="stop after the next FLUSH entry")
    p.add_argument("--next-fua", action="store_true", help="stop after the next FUA entry")
    p.add_argument("--end-mark", metavar="MARK", help="stop after this mark (only it stops)")
    p.add_argument("--start-entry", type=_count("--start-entry"), default=0, metavar="N",
                   help="start at entry N, without replaying 0..N-1")
    p.add_argument("--start-mark", metavar="MARK", help="start just after this mark")
    p.add_argument("--find", action="store_true",
                   help="write nothing: print INDEX@POS of the entry the stop rule picks")
    p.add_argument("--num-entries", "--number-entries", dest="num_entries",
                   action="store_true", help="print the entry count of the super block")
    p.add_argument("--no-discard", action="store_true", help="skip DISCARD entries")
    p.add_argument("--check", type=_check_arg, metavar="N|flush|fua|discard",
                   help="run --fsck after every N entries, or after each such entry")
    p.add_argument("--fsck", metavar="CMD", help="command (through the shell) run at "
                   "each --check point, after an fsync of the target; non-zero: exit 1")
    p.add_argument("--start-sector", type=_count("--start-sector"), default=0,
                   metavar="S", help="skip writes ending before log sector S")
    p.add_argument("--end-sector", type=_count("--end-sector"), metavar="E",
                   help="skip writes starting after log sector E")
    p.add_argument("-v", "--verbose", action="count", default=0,
                   help="print each entry replayed (and skipped)")
    p.set_defaults(func=cmd_replay)
    p = cmds.add_parser("dump", help="list a log's entries",
                        description="Print the super block and every entry of a log "
                                    "(index@position, flags, sector and length or mark "
                                    "text). Exit 1 at a malformed entry.")
    p.add_argument("log", metavar="LOG", help="the log file or device")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=cmd_dump)
    p = cmds.add_parser("mark", help="append a mark to a live log-writes device's log",
                        description="Send 'mark NAME' to a log-writes device of the running "
                                    "daemon (pydm dm message DEV 0 mark NAME).")
    add_client_options(p)
    p.add_argument("device", metavar="DEV", help="a log-writes device")
    p.add_argument("name", metavar="NAME", help="the mark's text (no spaces)")
    p.set_defaults(func=cmd_mark)
    return lw
