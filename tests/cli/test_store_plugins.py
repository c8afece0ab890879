"""A third-party store plugin, installed with pip from a test package, is
found by its entry point and used by a real daemon without any change to
pydm; bad store arguments are one clear line and leave the device as it was."""

import shutil
import subprocess
import sys

import pytest

from helpers import Daemon

FIXTURE = __import__("pathlib").Path(__file__).resolve().parents[1] / "fixtures" / "store_plugin"


@pytest.fixture
def plugin_site(tmp_path):
    """The fixture package installed (built by pip, offline) into a directory
    of its own, as ``pip install --target`` would for a user."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    site = tmp_path / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--no-index", "--no-build-isolation", "--target", str(site), str(src)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert (site / "pydm_ramstore.py").exists()
    return site


def _client(uri):
    nbd = pytest.importorskip("nbd")
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_an_installed_plugin_serves_a_device(plugin_site, tmp_path, cli):
    nbd_sock = tmp_path / "nbd.sock"
    d = Daemon(tmp_path, extra=["--unix", str(nbd_sock)], env={"PYTHONPATH": str(plugin_site)})
    try:
        listed = {line.split()[0]: line for line in cli("dm", "stores").stdout.splitlines()}
        assert listed["ram"].split()[1:] == ["ram:"]
        assert set(listed) >= {"dm", "file", "nbd", "ram"}
        cli("dm", "create", "ram0", "--table", "0 1024 linear ram://d1?size=1048576 0")
        assert cli("dm", "table", "ram0").stdout.split() == \
            ["0", "1024", "linear", "ram://d1?size=1048576", "0"]
        h = _client(f"nbd+unix:///ram0?socket={nbd_sock}")
        assert h.get_size() == 512 << 10
        h.pwrite(b"\xab" * 4096, 8192)
        assert h.pread(4096, 8192) == b"\xab" * 4096
        h.shutdown()
        # the plugin's store is shared: a device over another area of it, and
        # a third over both areas, read what the first one wrote
        cli("dm", "create", "ram1", "--table", "0 1024 linear ram://d1?size=1048576 1024")
        cli("dm", "create", "both", "--table", "0 1024 linear dm:ram0 0\n1024 1024 linear dm:ram1 0")
        h = _client(f"nbd+unix:///both?socket={nbd_sock}")
        assert h.pread(4096, 8192) == b"\xab" * 4096
        assert h.pread(4096, (512 << 10) + 8192) == bytes(4096)
        h.shutdown()
    finally:
        assert d.stop() == 0


@pytest.mark.parametrize("arg, why", [
    ("ram://", "a ram disk needs a name"),
    ("ram://x?size=7", "size must be a positive multiple of 512"),
    ("zz://host/x", "unknown store scheme 'zz'"),
    ("nbd://127.0.0.1:1/x", "127.0.0.1:1"),
    ("nbd://host:99999/x", "port"),
])
def test_a_bad_store_argument_is_one_line_and_changes_nothing(plugin_site, tmp_path, cli, arg, why):
    d = Daemon(tmp_path, env={"PYTHONPATH": str(plugin_site)})
    try:
        cli("dm", "create", "dev", "--table", "0 16 linear ram://ok?size=8192 0")
        before = cli("dm", "table", "dev").stdout
        r = cli("dm", "load", "dev", "--table", f"0 16 linear {arg} 0", check=False)
        assert r.returncode != 0
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and why in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert cli("dm", "table", "dev").stdout == before
    finally:
        assert d.stop() == 0
