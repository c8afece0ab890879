"""Input the daemon and the CLI must take apart correctly: table text with
any path bytes, control-socket requests of any shape, configs of any type."""

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import make_image, pydm_env

CONFIG = '[[device]]\nname = "z"\ntable = "0 2048 zero"\n'


@pytest.fixture
def daemon(tmp_path, start_daemon):
    (tmp_path / "pydm.toml").write_text(CONFIG)
    return start_daemon(tmp_path / "pydm.toml")


def pydm_bytes(tmp_path, *args, input=None):
    """Run ``pydm`` with bytes in and out (paths need not be UTF-8)."""
    return subprocess.run([sys.executable, "-m", "pydm", *args], input=input,
                          capture_output=True, env=pydm_env(tmp_path / "ctl.sock"),
                          cwd=tmp_path, timeout=60)


# ------------------------------------------------- 8. every byte of a path
NASTY = b"we ird#name\\with\nnewline\ttab \xff\xfe #.img"


def escaped(raw: bytes) -> bytes:
    """The path as a table writes it, escaped by hand (not by pydm)."""
    out = b""
    for i in range(len(raw)):
        c = raw[i:i + 1]
        out += b"\\" + c if c in b" \t\n#\\" else c
    return out


def test_table_output_loads_back_whatever_bytes_a_path_holds(daemon, tmp_path):
    path = os.path.join(os.fsencode(tmp_path), NASTY)
    with open(path, "wb") as f:
        f.write(b"N" * 4096 + bytes(1 << 20))
    line = b"0 8 linear " + escaped(path) + b" 0 # a comment\n"
    r = pydm_bytes(tmp_path, "dm", "create", "one", input=line)
    assert r.returncode == 0, r.stderr
    out = pydm_bytes(tmp_path, "dm", "table", "one")
    assert out.returncode == 0 and out.stdout == b"0 8 linear " + escaped(path) + b" 0\n"
    (tmp_path / "t.table").write_bytes(out.stdout)
    r = pydm_bytes(tmp_path, "dm", "create", "two", "t.table", "-r")
    assert r.returncode == 0, r.stderr
    assert pydm_bytes(tmp_path, "dm", "table", "two").stdout == out.stdout
    # the same file, not another one of a similar name
    deps = json.loads(pydm_bytes(tmp_path, "dm", "deps", "two", "--json").stdout)
    assert [os.fsencode(d) for d in deps] == [path]


# ---------------------------------------------- 10. control-socket framing
def raw_session(sock_path, *lines, timeout=10):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(str(sock_path))
    s.settimeout(timeout)
    f = s.makefile("rb")
    replies = []
    for line in lines:
        s.sendall(line)
        replies.append(json.loads(f.readline()))
    f.close()
    s.close()
    return replies


def test_an_oversized_line_is_refused_whole(daemon):
    from pydm.ctlsock import MAX_LINE
    # past the limit, and what follows it would be a valid command if cut
    tail = b'{"op": "remove", "args": {"name": "z"}}'
    big = b" " * (MAX_LINE + 10) + tail + b"\n"
    r = raw_session(daemon.sock, big, b'{"op": "ls"}\n')
    assert r[0]["ok"] is False and "longer than" in r[0]["error"]
    assert r[1]["ok"] is True and [d["name"] for d in r[1]["result"]] == ["z"]


@pytest.mark.parametrize("line,words", [
    (b'{"op": []}', "'op' must be a string"),
    (b'{"op": {"a": 1}}', "'op' must be a string"),
    (b'[1, 2]', "not a JSON object"),
    (b'"ls"', "not a JSON object"),
    (b'{"op": "ls", "args": []}', "'args' must be an object"),
    (b'{"op": "info", "args": {"name": 5}}', "'name' must be a string"),
    (b'{"op": "create", "args": {"name": "r", "readonly": "no"}}',
     "'readonly' must be true or false"),
    (b'{"op": "message", "args": {"name": "z", "sector": -1, "text": "x"}}',
     "'sector' must be a non-negative integer"),
    (b'{"op": "suspend", "args": {"name": "z", "timeout": "soon"}}', "'timeout'"),
    (b'{"op": "ls", "args": {"bogus": 1}}', "unknown argument 'bogus'"),
    (b'{"op": "nosuch"}', "unknown command 'nosuch'"),
    (b'[' * 100000 + b']' * 100000, "nested too deeply"),
    (b'\xff\xfe{"op": "ls"}', "malformed request"),
    (b'{"op": "ls"', "malformed request"),
])
def test_every_bad_request_gets_an_error_reply(daemon, line, words):
    r = raw_session(daemon.sock, line + b"\n", b'{"op": "ls"}\n')
    assert r[0]["ok"] is False and words in r[0]["error"], r[0]
    assert r[0]["errno"] == 22
    assert r[1]["ok"] is True                    # the connection lives on
    assert "r" not in [d["name"] for d in r[1]["result"]]
    assert "Traceback" not in daemon.output()


# -------------------------------------------------------- 10. configs
@pytest.mark.parametrize("body,words", [
    (b'[[device]]\nname = "a\xff"\n', "not UTF-8"),
    (b'device = [1, 2]\n', "'device' must be an array of tables"),
    (b'[[device]]\nname = 5\ntable = "0 8 zero"\n', "'name' must be a string"),
    (b'[[device]]\nname = "a"\ntable = "0 8 zero"\nreadonly = "no"\n',
     "'readonly' must be true or false"),
    (b'[[device]]\nname = "a"\ntable_file = 7\n', "'table_file' must be a string"),
    (b'[[device]]\nname = "a"\ntable = ["0 8 zero"]\n', "'table' must be a string"),
    (b'[[device]]\nname = "a"\ntable = "0 8 zero"\nuuid = 1\n', "'uuid' must be a string"),
])
def test_a_bad_config_is_one_line(tmp_path, body, words):
    cfg = tmp_path / "bad.toml"
    cfg.write_bytes(body)
    r = subprocess.run([sys.executable, "-m", "pydm", "serve", str(cfg), "--no-nbd",
                        "--socket", str(tmp_path / "c.sock")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_a_non_utf8_table_file_is_read_as_path_bytes(daemon, tmp_path):
    path = os.path.join(os.fsencode(tmp_path), b"caf\xe9.img")
    make_image(path, 1 << 20)
    (tmp_path / "t.table").write_bytes(b"0 8 linear " + path + b" 0\n")
    r = pydm_bytes(tmp_path, "dm", "create", "latin", "t.table")
    assert r.returncode == 0, r.stderr
    assert pydm_bytes(tmp_path, "dm", "table", "latin").stdout == b"0 8 linear " + path + b" 0\n"
