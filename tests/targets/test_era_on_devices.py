"""era with its metadata on another pydm device (not only an image file):
the metadata layers see the device through its byte face (pydm.devio), so
the log-writes crash harness can record era's metadata writes too."""

import subprocess

import pytest

from helpers import do_io, make_image
from nbd_support import need
from pydm.bio import READ, WRITE
from pydm.control import Control


@pytest.fixture
def files(tmp_path):
    return make_image(tmp_path / "meta.img", 8 << 20), make_image(tmp_path / "origin.img",
                                                                  32 << 20)


def test_metadata_on_a_linear_device_is_real_dm_era_metadata(files):
    meta, origin = files
    c = Control()
    c.create("m", f"0 16384 linear {meta} 0")
    dev = c.create("e", f"0 65536 era dm:m {origin} 8")
    for i in range(20):
        assert do_io(dev, WRITE, i * 64, data=bytes([i]) * 4096)[0] == 0
    c.message("e", 0, "checkpoint")
    assert c.table("e")[0][3].startswith("dm:m ")
    assert do_io(dev, READ, 64, 8)[1] == bytes([1]) * 4096
    c.shutdown()
    need("era_check")
    assert subprocess.run(["era_check", meta], capture_output=True).returncode == 0


def test_a_metadata_device_that_fails_writes_fails_the_first_writes(files):
    meta, origin = files
    c = Control()
    c.create("m", f"0 16384 flakey {meta} 0 3600 0")
    dev = c.create("e", f"0 65536 era dm:m {origin} 8")
    assert do_io(dev, WRITE, 0, data=b"a" * 4096)[0] == 0
    c.load("m", f"0 16384 flakey {meta} 0 0 3600 1 error_writes")
    c.suspend("m")
    c.resume("m")
    assert do_io(dev, WRITE, 640, data=b"b" * 4096)[0] != 0     # its mark cannot commit
    assert do_io(dev, WRITE, 0, data=b"c" * 4096)[0] == 0       # marked already: goes on
    c.shutdown()
