"""Byte compatibility with thin-provisioning-tools 0.9.0, both directions."""

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from era_fixtures import NAMES, SINCE, era_check_real, fixture_path, real_tool
from pydm.metadata import era_xml
from pydm.metadata.blocks_xml import blocks_xml
from pydm.metadata.era_check import check
from pydm.metadata.era_md import EraMetadata
from pydm.store import FileStore


def pydm(*args):
    return subprocess.run([sys.executable, "-m", "pydm", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def open_fixture(name):
    return EraMetadata.open(FileStore(fixture_path(name, f"{name}.bin"), readonly=True),
                            readonly=True, load_space_map=False)


@pytest.mark.parametrize("name", NAMES)
def test_dump_is_byte_identical(fixtures_dir, name):
    out = io.StringIO()
    era_xml.dump(open_fixture(name), out)
    with open(fixture_path(name, "era_dump.xml")) as f:
        assert out.getvalue() == f.read()


@pytest.mark.parametrize("name", NAMES)
def test_invalidate_is_byte_identical_for_every_saved_T(fixtures_dir, name):
    md = open_fixture(name)
    for t in SINCE:
        out = io.StringIO()
        era_xml.write_blocks_xml(out, era_xml.invalidate_blocks(md, t))
        with open(fixture_path(name, f"invalidate_since_{t}.xml")) as f:
            assert out.getvalue() == f.read(), f"{name} --written-since {t}"


def test_cli_dump_and_invalidate_match_the_files(fixtures_dir):
    for name in ("small64", "wstree210"):
        r = pydm("era", "dump", fixture_path(name, f"{name}.bin"))
        assert r.returncode == 0 and r.stdout == open(fixture_path(name, "era_dump.xml")).read()
        r = pydm("era", "invalidate", "--written-since", 3, fixture_path(name, f"{name}.bin"))
        assert r.stdout == open(fixture_path(name, "invalidate_since_3.xml")).read()


def test_metadata_snapshot_reads_the_snapshot(fixtures_dir):
    r = pydm("era", "invalidate", "--written-since", 3, "--metadata-snapshot",
             fixture_path("snap64", "snap64.bin"))
    assert r.stdout == open(fixture_path("snap64", "invalidate_snap_since_3.xml")).read()
    r = pydm("era", "invalidate", "--written-since", 3, "--metadata-snapshot",
             fixture_path("small64", "small64.bin"))
    assert r.returncode == 1
    assert r.stderr.strip().endswith(open(fixture_path("small64",
                                                       "invalidate_snap_error.txt")).read().strip())


def test_logical_dump_keeps_the_kernels_highest_era(fixtures_dir):
    out = io.StringIO()
    era_xml.dump(open_fixture("small64"), out, logical=True)
    ours = out.getvalue().splitlines()
    theirs = open(fixture_path("small64", "era_dump_logical.xml")).read().splitlines()
    diff = [(a, b) for a, b in zip(ours, theirs) if a != b]
    # block 2 is in the writesets of eras 3 and 4: 0.9.0 says 3, the kernel 4
    assert diff == [('    <era block="2" era="4"/>', '    <era block="2" era="3"/>')]


@pytest.mark.parametrize("name", NAMES)
def test_restore_then_real_tools_accept_it(fixtures_dir, tmp_path, name):
    out = tmp_path / "r.bin"
    out.write_bytes(bytes(os.path.getsize(fixture_path(name, f"{name}.bin")) * 2))
    r = pydm("era", "restore", "-i", fixture_path(name, f"{name}.xml"), "-o", out)
    assert r.returncode == 0, r.stderr
    rc, text = era_check_real(str(out))
    assert rc == 0, text
    dump = subprocess.run([real_tool("era_dump"), str(out)], capture_output=True, text=True)
    assert dump.stdout == open(fixture_path(name, "era_dump.xml")).read()
    assert check(FileStore(str(out), readonly=True)) == (True, [])


def test_restore_creates_a_sized_file_and_fails_cleanly(fixtures_dir, tmp_path):
    out = tmp_path / "new.bin"
    r = pydm("era", "restore", "-i", fixture_path("multi1000", "multi1000.xml"), "-o", out)
    assert r.returncode == 0 and era_check_real(str(out))[0] == 0
    small = tmp_path / "small.bin"
    small.write_bytes(bytes(32 << 10))
    r = pydm("era", "restore", "-i", fixture_path("wstree210", "wstree210.xml"), "-o", small)
    assert r.returncode == 1 and "out of metadata space" in r.stderr
    assert small.read_bytes()[:4096] == bytes(4096)     # superblock zeroed


@pytest.mark.parametrize("name", NAMES)
def test_our_checker_accepts_every_fixture(fixtures_dir, name):
    assert check(FileStore(fixture_path(name, f"{name}.bin"), readonly=True)) == (True, [])


@pytest.mark.parametrize("tool,args", [
    ("dump", []), ("check", []), ("invalidate", ["--written-since", "1"]),
])
def test_cli_contract(fixtures_dir, tmp_path, tool, args):
    r = pydm("era", tool, "--help")
    assert r.returncode == 0 and "usage: pydm era" in r.stdout
    r = pydm("era", tool, "--no-such-option", *args, fixture_path("small64", "small64.bin"))
    assert r.returncode == 1 and "unrecognized arguments" in r.stderr
    r = pydm("era", tool, *args, tmp_path / "missing.bin")
    assert r.returncode == 1 and "No such file" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1
    junk = tmp_path / "junk.bin"
    junk.write_bytes(os.urandom(16384))
    r = pydm("era", tool, *args, junk)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "bad checksum" in r.stderr
    tiny = tmp_path / "tiny.bin"
    tiny.write_bytes(b"x" * 100)
    r = pydm("era", tool, *args, tiny)
    assert r.returncode == 1 and "too small" in r.stderr


def test_restore_contract(tmp_path):
    r = pydm("era", "restore", "--help")
    assert r.returncode == 0
    r = pydm("era", "restore", "-o", tmp_path / "x.bin")
    assert r.returncode == 1 and "required" in r.stderr
    r = pydm("era", "restore", "-i", tmp_path / "none.xml", "-o", tmp_path / "x.bin")
    assert r.returncode == 1 and "No such file" in r.stderr
    bad = tmp_path / "bad.xml"
    bad.write_text("<superblock uuid='' block_size='8'")
    r = pydm("era", "restore", "-i", bad, "-o", tmp_path / "x.bin")
    assert r.returncode == 1 and "not valid XML" in r.stderr and "Traceback" not in r.stderr


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_offline_and_live_blocks_xml_are_the_same_text(bits):
    """The offline writer (numpy, one format string) and the live CLI's
    (no numpy, line by line) must print identical <blocks> lists."""
    mask = np.array(bits, dtype=bool)
    out = io.StringIO()
    era_xml.write_blocks_xml(out, mask)
    assert out.getvalue() == blocks_xml(*era_xml.run_edges(mask))
