"""``pydm lw mark`` against a running daemon: a mark lands in the log (and
``pydm lw dump`` shows it once the device is removed); a device that is not
log-writes, a missing device, a name with a space: one line, exit 1."""

import json


def test_mark_against_a_daemon(tmp_path, start_daemon, cli):
    data, log = tmp_path / "data.img", tmp_path / "log.img"
    for path, size in ((data, 16 << 20), (log, 32 << 20)):
        with open(path, "wb") as f:
            f.truncate(size)
    config = tmp_path / "pydm.toml"
    config.write_text(f'[[device]]\nname = "lw"\ntable = "0 32768 log-writes {data} {log}"\n'
                      f'[[device]]\nname = "z"\ntable = "0 100 zero"\n')
    start_daemon(config)
    cli("lw", "mark", "lw", "before-upgrade")
    for args, words in ((("z", "x"), "z: mark failed: zero: unrecognised message"),
                        (("nosuch", "x"), "nosuch: mark failed: no such device"),
                        (("lw", "two words"), "expect 2 arguments")):
        r = cli("lw", "mark", *args, check=False)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr
    cli("dm", "remove", "lw")
    entries = json.loads(cli("lw", "dump", log, "--json").stdout)["entries"]
    assert [e["mark"] for e in entries] == ["before-upgrade", "dm-log-writes-end"]
