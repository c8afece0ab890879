"""`pydm rv ...` against a real daemon: list, status, enable/disable/reactor,
one clear line for a bad name, the end check, replay of a recorded event log,
and a daemon running a mutant whose violation shows in `rv status`."""

import json
import os
import subprocess
import sys
import time

import pytest

from helpers import pydm_env
from nbdclient import Client

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECTORS = 16384


def write_config(tmp):
    for n, size in (("back", 8 << 20), ("cache", 4 << 20), ("meta", 4 << 20),
                    ("origin", 8 << 20)):
        with open(tmp / f"{n}.img", "wb") as f:
            f.truncate(size)
    conf = tmp / "rv.toml"
    conf.write_text(
        f'[[device]]\nname = "wb"\ntable = "0 {SECTORS} writeboost {tmp}/back.img '
        f'{tmp}/cache.img"\n'
        f'[[device]]\nname = "era"\ntable = "0 {SECTORS} era {tmp}/meta.img '
        f'{tmp}/origin.img 128"\n')
    return conf


def one_line_error(r, words):
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) == 1, r.stderr
    assert words in r.stderr, r.stderr


def some_io(sock_path, export):
    c = Client(str(sock_path), export)
    try:
        c.pwrite(0, b"r" * 65536)
        c.flush()
        assert c.pread(0, 4096) == b"r" * 4096
    finally:
        c.close()


@pytest.fixture
def served(start_daemon, tmp_path):
    conf = write_config(tmp_path)
    d = start_daemon(conf, ["--unix", str(tmp_path / "nbd.sock"),
                            "--rv-events", str(tmp_path / "events.jsonl")])
    return d, tmp_path


def test_status_list_and_switches(served, cli):
    _d, tmp = served
    for exp in ("wb", "era"):
        some_io(tmp / "nbd.sock", exp)
    rows = json.loads(cli("rv", "list", "--json").stdout)
    names = [r["name"] for r in rows]
    assert {"bio_once", "deadline", "era_drain", "wb_durable", "lockdep"} <= set(names)
    assert all(r["enabled"] for r in rows)
    r = cli("rv", "status", "--check")
    assert r.returncode == 0 and "violation" in r.stdout, r.stdout
    status = {r["name"]: r for r in json.loads(cli("rv", "status", "--json").stdout)}
    assert status["bio_once"]["events"] > 0 and status["wb_durable"]["events"] > 0
    assert all(r["violations"] == 0 for r in status.values())
    cli("rv", "disable", "era_drain,era_commit")
    cli("rv", "reactor", "all", "record")
    status = {r["name"]: r for r in json.loads(cli("rv", "status", "--json").stdout)}
    assert not status["era_drain"]["enabled"] and status["bio_once"]["reactor"] == "record"
    cli("rv", "enable", "all", "--reactor", "log")
    status = {r["name"]: r for r in json.loads(cli("rv", "status", "--json").stdout)}
    assert status["era_drain"]["enabled"] and status["era_drain"]["reactor"] == "log"


def test_bad_names_are_one_line(served, cli):
    one_line_error(cli("rv", "enable", "nope", check=False), "unknown monitor 'nope'")
    one_line_error(cli("rv", "reactor", "bio_once", "panic", check=False),
                   "unknown reactor 'panic'")
    one_line_error(cli("rv", "status", "bio_once,nope", check=False), "unknown monitor 'nope'")
    r = cli("rv", "--help")
    assert r.returncode == 0 and "replay" in r.stdout


def test_replay_of_the_recorded_events(served, cli):
    d, tmp = served
    some_io(tmp / "nbd.sock", "wb")
    cli("dm", "message", "era", "0", "checkpoint")
    assert d.stop() == 0
    r = cli("rv", "replay", str(tmp / "events.jsonl"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 violation(s)" in r.stdout
    out = json.loads(cli("rv", "replay", str(tmp / "events.jsonl"), "--monitor", "bio_once",
                         "--json").stdout)
    assert out["events"] > 50 and out["violations"] == []
    # a log that breaks a rule: the same bio completed twice
    bad = tmp / "bad.jsonl"
    bad.write_text("".join(json.dumps(e) + "\n" for e in (
        {"event": "bio_submit", "minor": 0, "bio": 1, "op": 1, "flags": 0, "t": 1.0},
        {"event": "bio_complete", "minor": 0, "bio": 1, "status": 0, "t": 1.1},
        {"event": "bio_complete", "minor": 0, "bio": 1, "status": 0, "t": 1.2})))
    r = cli("rv", "replay", str(bad), check=False)
    assert r.returncode == 1 and "1 violation(s)" in r.stdout, r.stdout
    assert "bio_once[(0, 1)]" in r.stdout
    (tmp / "junk.jsonl").write_text("{not json\n")
    one_line_error(cli("rv", "replay", str(tmp / "junk.jsonl"), check=False), "not a JSON event")
    one_line_error(cli("rv", "replay", str(tmp / "missing.jsonl"), check=False),
                   "cannot read")


SERVE_WITH_MUTANT = """
import sys
sys.path[:0] = [sys.argv[1] + "/tests/mutation", sys.argv[1] + "/tests"]
import pytest
from mutants import MUTANTS
MUTANTS[sys.argv[2]].apply(pytest.MonkeyPatch())
from pydm.cli import main
sys.exit(main(sys.argv[3:]))
"""


def test_a_live_mutant_shows_in_status_within_a_second(tmp_path, cli):
    conf = write_config(tmp_path)
    sock = tmp_path / "ctl.sock"
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_MUTANT, ROOT, "wb-ack-before-cache-flush",
         "serve", str(conf), "--socket", str(sock), "--unix", str(tmp_path / "nbd.sock"),
         "--rv", "all", "--rv-reactor", "record"],
        stdout=log, stderr=subprocess.STDOUT, env=pydm_env(sock), cwd=tmp_path)
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "nbd.sock").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "daemon.log").read_text()
            time.sleep(0.05)
        t0 = time.time()
        some_io(tmp_path / "nbd.sock", "wb")          # its flush is acked early
        rows = {r["name"]: r for r in json.loads(cli("rv", "status", "--json",
                                                     check=False).stdout)}
        seen = time.time()
        v = rows["wb_durable"]
        assert v["violations"] >= 1 and "ack_ok not allowed in state pending" in v["last"]
        assert seen - v["first_at"] < 1.0 and v["first_at"] >= t0
        assert sum(r["violations"] for r in rows.values()) == v["violations"]
        r = cli("rv", "status", check=False)
        assert r.returncode == 1 and "wb_durable" in r.stdout
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
