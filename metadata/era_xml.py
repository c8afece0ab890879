"""era metadata as XML: dump, restore and era_invalidate's block list.

Rules of this module: the text formats are thin-provisioning-tools 0.9.0's,
byte for byte (two-space indents, ``end = "E"`` with spaces in invalidate
ranges), except where 0.9.0 is wrong:

* ``--logical`` folds every archived writeset into the era array the way the
  kernel's digest does, so a block written in several eras gets the *highest*
  (0.9.0 keeps the lowest);
* ``--metadata-snapshot`` answers from the snapshot's own roots (0.9.0 only
  checks that a snapshot exists, then reads the live ones).

Everything reads through ``EraMetadata`` opened read-only; restore formats a
fresh image through the same library the target uses.
"""

import errno
import xml.etree.ElementTree as ET

import numpy as np

from pydm.metadata import bitset
from pydm.metadata.block_manager import MetadataError
from pydm.metadata.era_md import EraMetadata, bits_to_bool

_CHUNK = 1 << 16


def _write_lines(out, lines):
    buf = []
    for line in lines:
        buf.append(line)
        if len(buf) >= _CHUNK:
            out.write("".join(buf))
            buf = []
    if buf:
        out.write("".join(buf))


def dump(md: EraMetadata, out, logical: bool = False) -> None:
    sb = md.sb
    out.write(f'<superblock uuid="{sb.uuid_text}" block_size="{sb.data_block_size}" '
              f'nr_blocks="{sb.nr_blocks}" current_era="{sb.current_era}">\n')
    eras = md.era_array
    if logical:
        eras = eras.copy()
        for era in sorted(md.archived):
            nr_bits, root = md.archived[era]
            n = min(nr_bits, sb.nr_blocks)
            eras[:n][bits_to_bool(bitset.read(md.tm, root, nr_bits), n)] = era
    else:
        for era in sorted(md.archived):
            nr_bits, root = md.archived[era]
            bits = bits_to_bool(bitset.read(md.tm, root, nr_bits), nr_bits)
            out.write(f'  <writeset era="{era}" nr_bits="{nr_bits}">\n')
            _write_lines(out, (f'    <bit block="{i}" value="{"true" if v else "false"}"/>\n'
                               for i, v in enumerate(bits.tolist())))
            out.write("  </writeset>\n")
    out.write("  <era_array>\n")
    _write_lines(out, (f'    <era block="{i}" era="{e}"/>\n'
                       for i, e in enumerate(eras.tolist())))
    out.write("  </era_array>\n</superblock>\n")


def invalidate_blocks(md: EraMetadata, since: int, snapshot: bool = False) -> np.ndarray:
    """era_invalidate's answer: era array >= T, or set in an archived
    writeset of era >= T (the current writeset is left out, as 0.9.0 does)."""
    return md.changed_since(since, include_current=False, snapshot=snapshot)


def run_edges(mask: np.ndarray):
    """(begins, ends) lists of the runs of True in a bool array."""
    edges = _edges(mask)
    return edges[0::2].tolist(), edges[1::2].tolist()


def _edges(mask: np.ndarray) -> np.ndarray:
    """begin0, end0, begin1, end1, ... of the runs of True in a bool array."""
    m = np.zeros(len(mask) + 2, dtype=np.int8)
    m[1:-1] = mask
    return np.flatnonzero(np.diff(m))


def runs(mask: np.ndarray):
    """[(begin, end)] runs of True in a bool array."""
    return list(zip(*run_edges(mask)))


_BLOCK_LINE = '  <block block="%d"/>\n'
_RANGE_LINE = '  <range begin="%d" end = "%d"/>\n'


def write_blocks_xml(out, mask: np.ndarray) -> None:
    """era_invalidate's <blocks> list for a bool array over blocks.

    The same text as ``blocks_xml`` (which the live CLI uses without numpy),
    built a chunk of runs at a time as one format string and one ``%`` over
    its numbers: faster than formatting line by line, and small chunks
    reuse memory where whole-answer strings fault in tens of MB of pages."""
    out.write("<blocks>\n")
    edges = _edges(mask)
    for lo in range(0, len(edges), 2 * _CHUNK_RUNS):
        part = edges[lo:lo + 2 * _CHUNK_RUNS]
        begins, ends = part[0::2], part[1::2]
        single = (ends - begins) == 1
        keep = np.ones(len(part), dtype=bool)
        keep[1::2] = ~single
        fmt = "".join([_BLOCK_LINE if s else _RANGE_LINE for s in single.tolist()])
        out.write(fmt % tuple(part[keep].tolist()))
    out.write("</blocks>\n")


_CHUNK_RUNS = 4096


# ------------------------------------------------------------------ restore
def _int(el, name):
    v = el.get(name)
    if v is None:
        raise MetadataError(f"XML: <{el.tag}> lacks attribute {name}", errno.EINVAL)
    try:
        n = int(v)
    except ValueError:
        raise MetadataError(f"XML: <{el.tag} {name}=\"{v}\">: not a number", errno.EINVAL)
    if n < 0:
        raise MetadataError(f"XML: <{el.tag} {name}=\"{v}\">: negative", errno.EINVAL)
    return n


def parse_xml(path):
    """(superblock attrs, {era: (nr_bits, set of bits)}, {block: era})."""
    try:
        tree = ET.parse(path)
    except ET.ParseError as e:
        raise MetadataError(f"{path}: not valid XML: {e}", errno.EINVAL) from None
    except OSError as e:
        raise MetadataError(f"{path}: {e.strerror}", e.errno) from None
    root = tree.getroot()
    if root.tag != "superblock":
        raise MetadataError(f"{path}: expected <superblock>, found <{root.tag}>", errno.EINVAL)
    sb = {"uuid": root.get("uuid", ""), "block_size": _int(root, "block_size"),
          "nr_blocks": _int(root, "nr_blocks"), "current_era": _int(root, "current_era")}
    writesets, eras = {}, {}
    for el in root:
        if el.tag == "writeset":
            era, nr_bits = _int(el, "era"), _int(el, "nr_bits")
            bits = set()
            for bit in el:
                b = _int(bit, "block")
                if b >= nr_bits:
                    raise MetadataError(f"XML: writeset {era}: bit {b} >= nr_bits {nr_bits}",
                                        errno.EINVAL)
                if bit.get("value") == "true":
                    bits.add(b)
            writesets[era] = (nr_bits, bits)
        elif el.tag == "era_array":
            for e in el:
                b = _int(e, "block")
                if b >= sb["nr_blocks"]:
                    raise MetadataError(f"XML: era entry for block {b} >= nr_blocks",
                                        errno.EINVAL)
                eras[b] = _int(e, "era")
        else:
            raise MetadataError(f"XML: unexpected <{el.tag}>", errno.EINVAL)
    return sb, writesets, eras


def restore(xml_path, store) -> EraMetadata:
    sbx, writesets, eras = parse_xml(xml_path)
    if sbx["block_size"] == 0 or sbx["nr_blocks"] == 0:
        raise MetadataError("XML: block_size and nr_blocks must be non-zero", errno.EINVAL)
    md = EraMetadata.format(store, sbx["block_size"], sbx["nr_blocks"],
                            uuid=sbx["uuid"].encode()[:15])
    md.sb.current_era = sbx["current_era"]
    for era in sorted(writesets):
        nr_bits, bits = writesets[era]
        md.add_archived(era, nr_bits, bits)
    if eras:
        md.set_eras(list(eras.keys()), list(eras.values()))
    md.commit()
    return md

