"""What Control refuses, and what it takes in: files claimed twice, sizes
and names out of range, removal of a device others are built on, files
that grew."""

import errno
import os
import subprocess

import pytest

from helpers import do_io, make_image
from pydm.bio import READ, WRITE
from pydm.control import Control
from pydm.errors import DMError

# The largest device: every byte offset fits a signed 64-bit file offset.
MAX_SECTORS = ((1 << 63) - 1) >> 9


@pytest.fixture
def control(tmp_path):
    c = Control()
    yield c
    c.shutdown()
    assert c.stores.open_count() == 0
    assert c.claims.count() == 0


@pytest.fixture
def files(tmp_path):
    for name in ("origin.img", "meta.img", "meta2.img", "other.img"):
        make_image(tmp_path / name, 4 << 20)
    os.link(tmp_path / "meta.img", tmp_path / "meta-link.img")
    os.symlink(tmp_path / "origin.img", tmp_path / "origin-sym.img")
    return tmp_path


# ------------------------------------------------------------ 4. claims
def era(meta, origin, n=8192):
    return f"0 {n} era {meta} {origin} 128\n"


@pytest.mark.parametrize("second,words", [
    (era("meta.img", "other.img"), "meta.img cannot be the metadata: the same file is "
                                   "already the metadata of device e1"),
    (era("meta-link.img", "other.img"), "already the metadata of device e1"),
    (era("meta2.img", "origin-sym.img"), "cannot be the origin: the same file is already "
                                         "the origin of device e1"),
    (era("origin.img", "other.img"), "cannot be the metadata: the same file is already "
                                     "the origin of device e1"),
    ("0 100 linear meta.img 0\n", "meta.img cannot be used: the same file is already "
                                  "the metadata of device e1"),
    ("0 100 linear ./origin.img 8000\n", "already the origin of device e1"),
])
def test_one_file_is_never_two_devices_writable_roles(control, files, second, words):
    control.create("e1", era("meta.img", "origin.img"), cwd=str(files))
    with pytest.raises(DMError) as e:
        control.create("e2", second, cwd=str(files))
    assert words in str(e.value) and e.value.errno == errno.EBUSY
    assert "e2" not in control.names()
    control.remove("e1")
    r = subprocess.run(["era_check", str(files / "meta.img")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_one_file_is_never_two_roles_of_one_table(control, files):
    with pytest.raises(DMError, match="other.img cannot be the origin: the same file is "
                                      "already the metadata of this table"):
        control.create("e", era("other.img", "other.img"), cwd=str(files))
    with pytest.raises(DMError, match="cannot be used: the same file is already the "
                                      "metadata of this table"):
        control.create("e", era("meta.img", "origin.img", 4096) +
                       "4096 8 linear meta-link.img 0\n", cwd=str(files))
    assert control.names() == []


def test_what_may_share_a_file(control, files):
    d = str(files)
    control.create("e1", era("meta.img", "origin.img"), cwd=d)
    # read-only devices may look at anything
    control.create("ro", "0 8192 linear origin.img 0\n", readonly=True, cwd=d)
    # the parts of a file past what others use (partitions)
    control.create("p1", "0 100 linear other.img 0\n", cwd=d)
    control.create("p2", "0 100 linear other.img 100\n", cwd=d)
    # one table may map the same blocks twice (dm allows aliases)
    control.create("alias", "0 100 linear meta2.img 0\n100 100 linear meta2.img 0\n", cwd=d)
    # a reload of the same device over the same files
    control.load("e1", era("meta.img", "origin.img"), cwd=d)
    control.resume("e1")
    # a stack: era over a device over the file, nothing shared by two
    control.remove("ro")
    assert sorted(control.names()) == ["alias", "e1", "p1", "p2"]


def test_a_claim_goes_with_its_table(control, files):
    d = str(files)
    control.create("e1", era("meta.img", "origin.img"), cwd=d)
    control.remove("e1")
    control.create("e2", era("meta.img", "origin.img"), cwd=d)     # free again
    control.load("e2", "0 8192 zero\n")
    control.resume("e2")
    control.create("l", "0 8192 linear origin.img 0\n", cwd=d)      # e2 let go of it


# -------------------------------------------------- 6. sizes and names
@pytest.mark.parametrize("table,words", [
    ("0 100000000000000000000000 zero\n", "too large"),
    (f"0 {MAX_SECTORS} zero\n{MAX_SECTORS} 1 zero\n", "past the largest device"),
    (f"0 {MAX_SECTORS + 1} error\n", "too large"),
])
def test_sizes_past_what_can_be_addressed_are_refused(control, table, words):
    with pytest.raises(DMError, match=words):
        control.create("big", table)
    assert control.names() == []


def test_the_largest_device_is_served(control, tmp_path):
    from pydm import table
    from pydm.nbd.exports import Catalog
    assert table.MAX_SECTORS == MAX_SECTORS
    control.create("big", f"0 {MAX_SECTORS} zero\n")
    control.create("small", "0 8 zero\n")
    cat = Catalog(control, None, False)
    assert {n for n, _desc in cat.names()} == {"big", "small"}
    assert cat.lookup("big").size == MAX_SECTORS << 9 < 1 << 63


@pytest.mark.parametrize("name", [".", "..", "control", "a/b", "", "x" * 128, "sp ace"])
def test_names_dmsetup_refuses_are_refused(control, name):
    with pytest.raises(DMError, match="invalid device name"):
        control.create(name, "0 8 zero\n")
    control.create("ok", "0 8 zero\n")
    with pytest.raises(DMError, match="invalid device name"):
        control.rename("ok", name)
    assert control.names() == ["ok"]
    control.remove("ok")


@pytest.mark.parametrize("uuid", ["x" * 129, "with space", "tab\there", "nl\n"])
def test_bad_uuids_are_refused(control, uuid):
    with pytest.raises(DMError, match="invalid uuid"):
        control.create("u", "0 8 zero\n", uuid=uuid)


# ------------------------------------------------ 7. remove -f and holders
def test_force_never_removes_a_device_others_map_onto(control, files):
    d = str(files)
    control.create("base", "0 8192 linear origin.img 0\n", cwd=d)
    control.create("top", "0 8192 linear dm:base 0\n")
    for force in (False, True):
        with pytest.raises(DMError, match="in use") as e:
            control.remove("base", force=force)
        assert e.value.errno == errno.EBUSY
    assert "map onto it" in str(e.value) and "dm:top" in str(e.value)
    top = control.get("top")
    assert do_io(top, WRITE, 0, data=b"t" * 4096)[0] == 0
    assert do_io(top, READ, 0, 8)[1] == b"t" * 4096
    control.remove("top")
    control.remove("base")


def test_force_still_removes_a_device_with_clients(control, files):
    control.create("c", "0 8192 linear origin.img 0\n", cwd=str(files))
    key = object()
    dev = control.open("c", key, "nbd 127.0.0.1:1")
    with pytest.raises(DMError, match="in use"):
        control.remove("c")
    control.remove("c", force=True)
    assert dev.state == "REMOVED" and control.names() == []
    assert do_io(dev, READ, 0, 8)[0] == errno.EIO
    control.close(dev, key)


# ------------------------------------------------ 9. files that grew
def test_a_file_that_grew_is_seen_at_load_and_resume(control, tmp_path):
    img = make_image(tmp_path / "grow.img", 1 << 20)
    control.create("a", f"0 2048 linear {img} 0\n")        # holds the file open
    os.truncate(img, 2 << 20)
    control.create("b", f"0 2048 linear {img} 2048\n")     # the new half
    assert do_io(control.get("b"), WRITE, 0, data=b"b" * 4096)[0] == 0
    os.truncate(img, 3 << 20)
    control.load("b", f"0 4096 linear {img} 2048\n")
    control.resume("b")
    assert control.get("b").size_sectors == 4096
    assert control.stores.open_count() == 1
    # a file replaced under the same name is a different file
    os.rename(img, img + ".old")
    make_image(img, 1 << 20, b"n")
    control.create("c", f"0 8 linear {img} 0\n", readonly=True)
    assert do_io(control.get("c"), READ, 0, 8)[1] == b"n" * 4096
    assert control.stores.open_count() == 2
