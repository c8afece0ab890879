"""era_invalidate's <blocks> XML, from runs of blocks (no numpy: the live CLI
formats answers from the daemon with it too)."""


def blocks_xml(begins, ends) -> str:
    """``<blocks>`` with one line per run ``[b, e)``: ``<block block="b"/>`` for
    a single block, else ``<range begin="b" end = "e"/>`` (0.9.0's spacing)."""
    lines = [f'  <block block="{b}"/>\n' if e - b == 1 else
             f'  <range begin="{b}" end = "{e}"/>\n' for b, e in zip(begins, ends)]
    return "<blocks>\n" + "".join(lines) + "</blocks>\n"
