"""``pydm era ...``: era metadata tools, offline and live.

Offline, on metadata files (the thin-provisioning-tools contract): ``dump``,
``restore``, ``check``, ``invalidate``.  Live, on era devices of a running
daemon: ``checkpoint``, ``take-snap``, ``drop-snap``, ``status``, ``changed``
(see ``era_live``).  Logic lives in ``pydm.metadata``; this module parses
arguments, opens files and prints.
"""

import errno
import os
import sys

from pydm.cli.era_live import add_live_commands
from pydm.errors import PydmError


def _open_store(path, readonly=True):
    from pydm.cli.common import open_file
    return open_file(path, readonly)


def _open_md(path):
    from pydm.metadata.era_md import EraMetadata
    store = _open_store(path)
    if store.size < 4096:
        raise PydmError(f"{path}: Metadata device/file too small.  Is this binary metadata?")
    return EraMetadata.open(store, readonly=True, load_space_map=False)


class _Output:
    """stdout, or a file written beside its target and renamed into place."""

    def __init__(self, path):
        self.path = path
        self.tmp = None

    def __enter__(self):
        if not self.path:
            return sys.stdout
        self.tmp = f"{self.path}.tmp{os.getpid()}"
        try:
            self.f = open(self.tmp, "w")
        except OSError as e:
            raise PydmError(f"cannot write {self.path}: {e.strerror}", e.errno) from None
        return self.f

    def __exit__(self, exc, *_):
        if self.tmp is None:
            return
        self.f.close()
        if exc is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)


def cmd_dump(args):
    from pydm.metadata import era_xml
    md = _open_md(args.file)
    with _Output(args.output) as out:
        era_xml.dump(md, out, logical=args.logical)


def cmd_invalidate(args):
    from pydm.metadata import era_xml
    md = _open_md(args.file)
    if args.metadata_snapshot and not md.snapshot_block:
        raise PydmError("no metadata snapshot taken.")
    mask = era_xml.invalidate_blocks(md, args.written_since, snapshot=args.metadata_snapshot)
    with _Output(args.output) as out:
        era_xml.write_blocks_xml(out, mask)


def _estimate_blocks(xml_path):
    from pydm.metadata.era_md import restore_blocks_wanted
    from pydm.metadata.era_xml import parse_xml
    sbx, writesets, _eras = parse_xml(xml_path)
    return restore_blocks_wanted(sbx["nr_blocks"], [n for n, _b in writesets.values()])


def cmd_restore(args):
    from pydm.metadata import era_xml
    if not os.path.exists(args.input):
        raise PydmError(f"{args.input}: No such file or directory", errno.ENOENT)
    if not os.path.exists(args.output):
        size = max(32 << 10, _estimate_blocks(args.input) * 4096)
        with open(args.output, "wb") as f:
            f.truncate(size)
    store = _open_store(args.output, readonly=False)
    if store.size < 32 << 10:
        raise PydmError(f"{args.output}: Output file too small (at least 32 KiB).")
    try:
        era_xml.restore(args.input, store)
    except PydmError:
        # as era_restore: never leave a half-written image that looks valid
        store.write_at(0, bytes(4096))
        store.flush()
        raise
    finally:
        store.close()


def cmd_check(args):
    from pydm.metadata.era_check import check
    store = _open_store(args.file)
    ok, problems = check(store, check_space_map=not args.no_space_map)
    if not args.quiet:
        print("examining superblock", file=sys.stderr)
        for p in problems:
            print(f"  {p}", file=sys.stderr)
        if ok and not args.no_space_map:
            print("examining space map: all reference counts match", file=sys.stderr)
    return 0 if ok else 1


def register(sub):
    era = sub.add_parser(
        "era", help="era changed-block tracking: metadata tools and live commands",
        description="Offline tools for dm-era metadata files (compatible with "
                    "thin-provisioning-tools' era_dump, era_restore, era_check and "
                    "era_invalidate) and live commands for era devices of a running "
                    "daemon.")
    cmds = era.add_subparsers(dest="era_cmd", metavar="COMMAND", required=True)

    p = cmds.add_parser("dump", help="print metadata as XML (era_dump)",
                        description="Print era metadata as XML, as era_dump does. With "
                                    "--logical, fold the writesets into the era array the "
                                    "way the kernel does (the highest era wins; era_dump "
                                    "0.9.0 keeps the lowest).")
    p.add_argument("file", metavar="FILE", help="metadata image")
    p.add_argument("--logical", action="store_true", help="era array only, writesets folded in")
    p.add_argument("-o", "--output", metavar="OUT", help="write to OUT instead of stdout")
    p.set_defaults(func=cmd_dump)

    p = cmds.add_parser("restore", help="write metadata from XML (era_restore)",
                        description="Build a metadata image from era_dump XML. OUT is "
                                    "created (sized to fit) if missing; an existing OUT must "
                                    "be at least 32 KiB. On failure the superblock is zeroed.")
    p.add_argument("-i", "--input", required=True, metavar="XML")
    p.add_argument("-o", "--output", required=True, metavar="FILE")
    p.set_defaults(func=cmd_restore)

    p = cmds.add_parser("check", help="check metadata (era_check, plus reference counts)",
                        description="Check era metadata as era_check does, then verify every "
                                    "space map reference count against a walk of all trees "
                                    "(reports leaked and doubly-owned blocks). Exit 0 if clean.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-q", "--quiet", action="store_true", help="no output, exit status only")
    p.add_argument("--no-space-map", action="store_true",
                   help="skip the reference count check (era_check's coverage only)")
    p.set_defaults(func=cmd_check)

    p = cmds.add_parser("invalidate", help="blocks written since an era (era_invalidate)",
                        description="List the blocks written in era N or later, as "
                                    "era_invalidate's XML. With --metadata-snapshot, answer "
                                    "from the snapshot's own roots (era_invalidate 0.9.0 "
                                    "reads the live ones).")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--written-since", required=True, type=int, metavar="N")
    p.add_argument("--metadata-snapshot", action="store_true")
    p.add_argument("-o", "--output", metavar="OUT")
    p.set_defaults(func=cmd_invalidate)

    add_live_commands(cmds)
    return era


