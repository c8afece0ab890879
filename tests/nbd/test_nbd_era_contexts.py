"""Era block-status contexts chosen by name over NBD: bad names are not
chosen, the connection goes on, and a good one answers."""

from helpers import make_image
from nbd_support import MiB, start_server
from nbdclient import Client
from pydm.control import Control

PREFIX = "qemu:dirty-bitmap:era-since-"


def test_bad_era_context_names_are_refused_and_serving_goes_on(tmp_path):
    make_image(tmp_path / "meta.img", 4 * MiB)
    make_image(tmp_path / "origin.img", 4 * MiB)
    c = Control()
    c.create("e", f"0 8192 era {tmp_path}/meta.img {tmp_path}/origin.img 8\n")
    s = start_server(c, str(tmp_path))
    try:
        bad = [PREFIX + "x", PREFIX + str(1 << 32), PREFIX + "-1", PREFIX, "qemu:dirty-bitmap:era"]
        with Client(s.addr, "e", contexts=bad) as cl:
            assert cl.contexts == {}                    # none chosen
            cl.pwrite(0, b"w" * 4096)
            assert cl.pread(0, 4096) == b"w" * 4096     # still serving
        with Client(s.addr, "e", contexts=bad + [PREFIX + "1"]) as cl:
            assert list(cl.contexts.values()) == [PREFIX + "1"]
            cl.pwrite(4096, b"v" * 4096)
            [(ctx_id, extents)] = cl.block_status(0, 16384)
            assert cl.contexts[ctx_id] == PREFIX + "1"
            # blocks 0 and 1 were written in era 1; the rest is clean
            assert extents[0] == (8192, 1) and all(f == 0 for _n, f in extents[1:])
    finally:
        s.server.stop()
        c.shutdown()
