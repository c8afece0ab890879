"""`pydm serve` + `pydm dm ...` end to end: dmsetup-shaped output and clean errors."""

import json
import os
import re

import pytest

from helpers import make_image

CONFIG = '''
[[device]]
name = "data"
table = """
# two pieces over two files
0 2048 linear a.img 0
2048 4096 linear b.img 0
"""
'''


@pytest.fixture
def data_daemon(tmp_path, start_daemon):
    make_image(tmp_path / "a.img", 1 << 20)
    make_image(tmp_path / "b.img", 2 << 20)
    (tmp_path / "pydm.toml").write_text(CONFIG)
    return start_daemon(tmp_path / "pydm.toml")


def test_dmsetup_shaped_output_and_table_round_trip(data_daemon, cli, tmp_path):
    assert cli("dm", "ls").stdout == "data\t(253:0)\n"
    info = cli("dm", "info", "data").stdout
    assert info.splitlines() == [
        "Name:              data",
        "State:             ACTIVE",
        "Read Ahead:        256",
        "Tables present:    LIVE",
        "Open count:        0",
        "Event number:      1",
        "Major, minor:      253, 0",
        "Number of targets: 2",
    ]
    table = cli("dm", "table", "data").stdout
    assert table == (f"0 2048 linear {tmp_path}/a.img 0\n"
                     f"2048 4096 linear {tmp_path}/b.img 0\n")
    assert cli("dm", "status", "data").stdout == "0 2048 linear\n2048 4096 linear\n"
    assert cli("dm", "table").stdout == "".join(f"data: {l}\n" for l in table.splitlines())
    (tmp_path / "t.table").write_text(table)
    # read-only: two devices may not both write the same blocks of a file
    cli("dm", "create", "copy", "t.table", "-r")
    assert cli("dm", "table", "copy").stdout == table
    cli("dm", "create", "piped", "-r", input=table)
    assert cli("dm", "table", "piped").stdout == table
    cli("dm", "load", "copy", "--table", "0 6144 zero")
    assert "LIVE & INACTIVE" in cli("dm", "info", "copy").stdout
    cli("dm", "resume", "copy")
    assert cli("dm", "table", "copy").stdout == "0 6144 zero\n"
    assert cli("dm", "info", "-c", "--noheadings", "data").stdout == "data:253:0:L--w:0:2:1:\n"
    assert json.loads(cli("dm", "info", "--json", "data").stdout)[0]["targets"] == 2
    assert cli("dm", "ls", "--target", "zero").stdout == "copy\t(253:1)\n"
    assert cli("dm", "deps", "data").stdout.startswith(" 2 dependencies")
    names = [t.split()[0] for t in cli("dm", "targets").stdout.splitlines()]
    assert {"linear", "flakey", "delay", "error", "zero"} <= set(names)
    cli("dm", "suspend", "data")
    assert "State:             SUSPENDED" in cli("dm", "info", "data").stdout
    cli("dm", "resume", "data")
    cli("dm", "remove", "copy", "piped")
    assert cli("dm", "ls").stdout == "data\t(253:0)\n"


BAD_LOADS = [
    ("0 2048 linear a.img 0\n4096 10 linear a.img 0\n", r"line 2: gap in table"),
    ("0 2048 linear a.img 0\n1000 10 linear a.img 0\n", r"line 2: overlap in table"),
    ("0 0 linear a.img 0\n", r"line 1: zero-length target"),
    ("0 2048 lineer a.img 0\n", r'line 1: unknown target type "lineer"'),
    ("0 2048 linear a.img\n", r"line 1: linear: Invalid argument count"),
    ("0 2048 linear a.img 9999999\n", r"line 1: linear: device a.img is too small"),
    ("0 4096 linear a.img 0\n", r"runs past its end"),
    ("0 2048 linear missing.img 0\n", r"cannot open .*missing.img read-write: No such file"),
    ("0 2048 flakey a.img 0 0 0\n", r"Total \(up \+ down\) interval is zero"),
    ("0 2048 delay a.img 0\n", r"Invalid argument count"),
    ("this is not a table\n", r"line 1: invalid start sector"),
]


@pytest.mark.parametrize("table,pattern", BAD_LOADS)
def test_bad_input_one_line_nonzero_unchanged(data_daemon, cli, table, pattern):
    before = cli("dm", "table", "data").stdout
    r = cli("dm", "load", "data", input=table, check=False)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("pydm: device-mapper: load ioctl on data failed: ")
    assert re.search(pattern, lines[0]), lines[0]
    assert r.stdout == ""
    assert cli("dm", "table", "data").stdout == before
    assert "Tables present:    LIVE\n" in cli("dm", "info", "data").stdout


@pytest.mark.parametrize("args,pattern", [
    (("remove", "ghost"), r"remove ioctl on ghost failed: No such device"),
    (("create", "data", "--table", "0 8 zero"), r"create ioctl on data failed: .*busy.*exists"),
    (("create", "bad/name", "--table", "0 8 zero"), r"invalid device name"),
    (("message", "data", "0", "hello"), r"message ioctl on data failed: .*unrecognised message"),
    (("message", "data", "999999", "hi"), r"message sector 999999 is past the end"),
    (("suspend", "ghost"), r"suspend ioctl on ghost failed: No such device"),
    (("create", "x", "nofile.table"), r"cannot read table file nofile.table"),
])
def test_bad_commands(data_daemon, cli, args, pattern):
    r = cli("dm", *args, check=False)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert cli("dm", "ls").stdout == "data\t(253:0)\n"


def test_remove_refused_while_stacked(data_daemon, cli):
    cli("dm", "create", "upper", "--table", "0 100 linear dm:data 0")
    r = cli("dm", "remove", "data", check=False)
    assert r.returncode == 1 and "in use (dm:upper)" in r.stderr
    assert cli("dm", "table", "upper").stdout == "0 100 linear dm:data 0\n"
    cli("dm", "remove", "upper")
    cli("dm", "remove", "data")
    assert cli("dm", "ls").stdout == "No devices found\n"


def test_no_daemon_is_a_clear_error(cli):
    r = cli("dm", "ls", check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("pydm: cannot reach the pydm daemon at ")
    assert len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("config,pattern", [
    (None, r"cannot read config .*: No such file"),
    ("[[device]\n", r"invalid TOML"),
    ('[[device]]\nname = "a"\n', r"give exactly one of 'table' or 'table_file'"),
    ('[[device]]\nname = "a"\ntable = "0 8 nosuch"\n', r'device a: .*unknown target type'),
    ('[[device]]\nname = "a"\ntable = "0 8 zero"\nsize = 3\n', r"unknown key\(s\): size"),
    ('[[device]]\nname = "a"\ntable_file = "none.table"\n', r"cannot read table file"),
])
def test_serve_bad_config(tmp_path, config, pattern):
    import subprocess
    import sys
    path = tmp_path / "bad.toml"
    if config is not None:
        path.write_text(config)
    r = subprocess.run([sys.executable, "-m", "pydm", "serve", str(path),
                        "--socket", str(tmp_path / "s.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1, r.stderr
    assert re.search(pattern, r.stderr), r.stderr
    assert not os.path.exists(tmp_path / "s.sock")


def test_second_daemon_on_same_socket_refused(data_daemon, tmp_path):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pydm", "serve", str(tmp_path / "pydm.toml"),
                        "--socket", str(data_daemon.sock)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert "already listening" in r.stderr


def test_socket_is_private(data_daemon):
    assert os.stat(data_daemon.sock).st_mode & 0o777 == 0o600


@pytest.mark.parametrize("cmd", [[], ["dm"], ["dm", "create"], ["dm", "message"],
                                 ["serve"], ["era"]])
def test_help(cmd):
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pydm", *cmd, "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    assert "usage: pydm" in r.stdout


def test_unknown_command_group_is_one_line_and_exit_1():
    # the parser is built for the named group only: an unknown one still
    # gets argparse's list of every group, not a traceback
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "pydm", "bogus"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "invalid choice: 'bogus'" in r.stderr and "'era'" in r.stderr
