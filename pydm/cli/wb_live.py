"""``pydm wb status|drop-caches``: writeboost devices of a running daemon.

Rules of this module: these commands talk to the daemon through the control
socket only (the target's status line and its ``drop_caches`` message); they
print for people (or JSON) and never open a cache image (the offline tools in
``pydm.cli.wb`` do that).  Every error is one line on stderr, exit status 1.
"""

import errno
import threading

from pydm.cli.common import Progress, client, fail, print_json
from pydm.cli.era_live import _why
from pydm.errors import PydmError, strerror


FIELDS = ("cursor", "nr_caches", "nr_segments", "current_id", "last_flushed_id",
          "last_writeback_id", "nr_dirty_caches")
TUNABLES = ("writeback_threshold", "nr_cur_batched_writeback", "sync_data_interval",
            "update_sb_record_interval", "read_cache_threshold")


def stat_name(i: int) -> str:
    """The counter at index ``write<<3 | hit<<2 | on_buffer<<1 | fullsize``."""
    return (f"{'write' if i & 8 else 'read'} {'hit' if i & 4 else 'miss'}"
            f"{' in RAM buffer' if i & 2 else ''}, {'full' if i & 1 else 'partial'} block")


STAT_NAMES = tuple(stat_name(i) for i in range(16))


def parse_status(words):
    """The writeboost status words as a dict (KeyError-free: a line that is
    not one is a CommandFailed)."""
    if len(words) < 35 or words[24] != "10" or not all(w.isdigit() for w in words[:24]):
        fail(f"unexpected writeboost status line: {' '.join(words)!r}")
    ints = [int(w) for w in words[:24]]
    st = dict(zip(FIELDS, ints))
    st["stats"] = dict(zip(STAT_NAMES, ints[7:23]))
    st["count_non_full_flushed"] = ints[23]
    pairs = words[25:35]
    for key, value in zip(pairs[::2], pairs[1::2]):
        st[key] = int(value)
    tail = words[35:] or ["unknown"]
    st["state"] = tail[0]
    st["error"] = None
    if tail[0] == "failed" and len(tail) >= 5:
        err = int(tail[1])
        st["error"] = {"errno": err, "errno_name": errno.errorcode.get(err, str(err)),
                       "store": tail[2], "op": tail[3], "sector": int(tail[4])}
    return st


def explain_error(e) -> str:
    return (f"{e['op']} of the {e['store']} at sector {e['sector']} failed "
            f"({e['errno_name']}: {strerror(e['errno'])})")


def explain_state(st) -> str:
    if st["state"] == "active":
        return "active (serving; writes are cached)"
    if st["state"] == "new":
        return "new (not resumed yet: the cache is not read)"
    if st["error"]:
        return (f"FAILED: {explain_error(st['error'])}; no write is accepted: remove "
                f"the device, fix the store and create it again (its log replays)")
    return st["state"]


def _seconds(n):
    return f"{n} s" if n else "0 (off)"


def format_status(dev, start, st) -> str:
    rows = [("device", f"{dev} (writeboost target at sector {start})"),
            ("state", explain_state(st)),
            ("cache blocks (cursor/total)", f"{st['cursor']}/{st['nr_caches']}"),
            ("segment slots (512 KiB each)", st["nr_segments"]),
            ("current segment id", st["current_id"]),
            ("last flushed segment id", st["last_flushed_id"]),
            ("last written-back segment id", st["last_writeback_id"]),
            ("dirty cache blocks", st["nr_dirty_caches"])]
    rows += list(st["stats"].items())
    rows += [("non-full flushes (barrier seals)", st["count_non_full_flushed"]),
             ("writeback_threshold",
              f"{st['writeback_threshold']} %" if st["writeback_threshold"]
              else "0 (background writeback off)"),
             ("nr_cur_batched_writeback", f"{st['nr_cur_batched_writeback']} segments "
                                          f"(last writeback batch)"),
             ("sync_data_interval", _seconds(st["sync_data_interval"])),
             ("update_sb_record_interval", _seconds(st["update_sb_record_interval"])),
             ("read_cache_threshold", st["read_cache_threshold"] or "0 (read cache off)")]
    width = max(len(k) for k, _v in rows) + 2
    return "".join(f"{k + ':':<{width}}{v}\n" for k, v in rows)


def _wb_target(c, dev):
    """(start sector, parsed status) of the first writeboost target of ``dev``."""
    from pydm.ctlsock import ControlError
    try:
        lines = c.call("status", name=dev, target="writeboost")
    except ControlError as e:
        fail(f"{dev}: {_why(dev, e)}")
    if not lines:
        fail(f"{dev}: not a writeboost device (no writeboost target in its table)")
    return lines[0]["start"], parse_status(lines[0]["params"].split())


def cmd_status(args):
    with client(args) as c:
        start, st = _wb_target(c, args.device)
    if args.json:
        print_json({"device": args.device, "start": start, **st})
    else:
        print(format_status(args.device, start, st), end="")


def cmd_drop_caches(args):
    dev = args.device
    outcome = {}

    def send(start):
        try:
            with client(args) as c2:
                c2.call("message", name=dev, sector=start, text="drop_caches")
        except PydmError as e:
            outcome["error"] = e

    with client(args) as c:
        start, st = _wb_target(c, dev)
        first = st["nr_dirty_caches"]
        bar = Progress(f"{dev}: writing back", first)
        sender = threading.Thread(target=send, args=(start,), daemon=True,
                                  name="pydm-wb-drop-caches")
        sender.start()
        most = first
        while sender.is_alive():
            sender.join(0.2)
            st = _wb_target(c, dev)[1]
            most = max(most, st["nr_dirty_caches"])
            bar.update(most - st["nr_dirty_caches"], most)
        st = _wb_target(c, dev)[1]
    if "error" in outcome:
        bar.finish(ok=False)
        why = _why(dev, outcome["error"])
        if st["error"]:
            why += f" ({explain_error(st['error'])})"
        fail(f"{dev}: {why}")
    bar.update(most - st["nr_dirty_caches"], most)
    bar.finish()
    if args.json:
        print_json({"device": dev, "start": start, "written_back": most, **st})
    else:
        print(f"{dev}: drop_caches done: {most} dirty blocks written back, "
              f"{st['nr_dirty_caches']} dirty now; segments up to "
              f"{st['last_writeback_id']} written back")
