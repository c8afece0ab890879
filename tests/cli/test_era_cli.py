"""`pydm era ...` live commands against a daemon, and agreement with era_invalidate."""

import json
import subprocess
import sys
import time

import pytest

from helpers import do_io, make_image
from pydm.bio import WRITE
from pydm.daemon import Daemon

BS = 128          # era block: 64 KiB
NR = 512


@pytest.fixture
def live(tmp_path):
    make_image(tmp_path / "meta.img", 4 << 20)
    make_image(tmp_path / "origin.img", NR * BS * 512)
    d = Daemon(str(tmp_path / "ctl.sock"))
    d.control.create("vol", f"0 {NR * BS} era {tmp_path}/meta.img {tmp_path}/origin.img {BS}\n")
    d.start()
    yield d, tmp_path
    d.stop()


def cli(d, *args, check=True):
    r = subprocess.run([sys.executable, "-m", "pydm", *map(str, args), "--socket", d.socket_path],
                       capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


def write(d, blocks):
    dev = d.control.get("vol")
    for b in blocks:
        assert do_io(dev, WRITE, b * BS, data=b"x" * 4096)[0] == 0


def settle(d):
    """Wait until the background digest has nothing left to do."""
    t = d.control.get("vol").live.targets[0]
    deadline = time.monotonic() + 10
    while t.digesting and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.05)


def test_status_checkpoint_snap(live):
    d, _ = live
    assert cli(d, "era", "status", "vol").stdout.splitlines()[0] == "current era:       1"
    st = json.loads(cli(d, "era", "status", "vol", "--json").stdout)
    assert st["current_era"] == 1 and st["snapshot_block"] is None
    assert cli(d, "era", "checkpoint", "vol").stdout == "checkpoint done: current era is now 2\n"
    out = cli(d, "era", "take-snap", "vol").stdout
    assert out.startswith("metadata snapshot at block ") and out.endswith("now 3\n")
    r = cli(d, "era", "take-snap", "vol", check=False)
    assert r.returncode == 1
    assert r.stderr == "pydm: vol: take-snap failed: a metadata snapshot already exists\n"
    assert "snapshot dropped" in cli(d, "era", "drop-snap", "vol").stdout
    r = cli(d, "era", "drop-snap", "vol", check=False)
    assert r.returncode == 1 and "no metadata snapshot" in r.stderr


def test_changed_formats(live):
    d, _ = live
    write(d, [0, 1, 2, 10, 300])
    cli(d, "era", "checkpoint", "vol")
    write(d, [10, 11])
    r = json.loads(cli(d, "era", "changed", "vol", "--since", 2, "--format", "json").stdout)
    assert r["ranges"] == [[10, 12]] and r["blocks_changed"] == 2
    assert r["byte_ranges"] == [{"offset": 10 * BS * 512, "length": 2 * BS * 512}]
    assert r["current_era"] == 2 and r["since"] == 2 and len(r["uuid"]) == 15
    text = cli(d, "era", "changed", "vol", "--since", 1).stdout.splitlines()
    assert text[0].startswith("# pydm era changed: device vol, metadata uuid ")
    assert "eras 1..2" in text[0] and "6 of 512 blocks" in text[0]
    assert text[2:] == [f"0 {3 * BS * 512}", f"{10 * BS * 512} {2 * BS * 512}",
                        f"{300 * BS * 512} {BS * 512}"]
    xml = cli(d, "era", "changed", "vol", "--since", 1, "--format", "xml").stdout
    assert xml == ('<blocks>\n  <range begin="0" end = "3"/>\n  <range begin="10" end = "12"/>\n'
                   '  <block block="300"/>\n</blocks>\n')


def test_not_an_era_device_and_bad_input(live):
    d, tmp = live
    d.control.create("plain", "0 8 zero\n")
    r = cli(d, "era", "status", "plain", check=False)
    assert r.returncode == 1 and "not an era device" in r.stderr
    r = cli(d, "era", "checkpoint", "ghost", check=False)
    assert r.returncode == 1 and r.stderr == "pydm: ghost: no such device\n"
    r = cli(d, "era", "changed", "vol", "--since", "x", check=False)
    assert r.returncode == 1 and "invalid int" in r.stderr
    r = cli(d, "era", "changed", "vol", "--since", 1, "--snapshot", check=False)
    assert r.returncode == 1
    assert r.stderr == "pydm: vol: changed failed: no metadata snapshot taken\n"


def test_xml_equals_real_era_invalidate_after_take_snap(live):
    d, tmp = live
    import random
    rnd = random.Random(4)
    for _ in range(6):
        write(d, rnd.sample(range(NR), 40))
        cli(d, "era", "checkpoint", "vol")
    write(d, rnd.sample(range(NR), 40))
    cli(d, "era", "take-snap", "vol")
    settle(d)
    era = json.loads(cli(d, "era", "status", "vol", "--json").stdout)["current_era"]
    tried = 0
    for since in range(0, era + 2):
        ours = cli(d, "era", "changed", "vol", "--since", since, "--format", "xml",
                   "--snapshot").stdout
        theirs = subprocess.run(["era_invalidate", "--written-since", str(since),
                                 "--metadata-snapshot", str(tmp / "meta.img")],
                                capture_output=True, text=True)
        assert theirs.returncode == 0, theirs.stderr
        assert ours == theirs.stdout, since
        tried += 1
    assert tried == era + 2
    r = subprocess.run(["era_check", str(tmp / "meta.img")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
