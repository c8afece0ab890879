"""log-writes under real NBD clients: fio writes with fsyncs and verifies,
qemu-io discards and FUA writes, nbdinfo sees what the target offers; the
log, replayed with ``pydm lw replay`` onto a blank file, equals the data
device byte for byte."""

import json
import os

from nbd_support import need, run, start_server
from pydm.cli import main as pydm_main
from pydm.control import Control

SIZE = 16 << 20


def test_real_clients_over_log_writes_and_the_log_replays_to_the_device(tmp_path, capsys):
    need("fio", "qemu-io", "nbdinfo")
    data, log = tmp_path / "data.img", tmp_path / "log.img"
    with open(data, "wb") as f:
        f.truncate(SIZE)
    with open(log, "wb") as f:
        f.truncate(256 << 20)
    c = Control()
    c.create("lw", f"0 {SIZE // 512} log-writes {data} {log}")
    served = start_server(c, str(tmp_path), listen=[("unix", str(tmp_path / "nbd.sock"))])
    uri = served.unix_uri("lw")
    try:
        info = json.loads(run(["nbdinfo", "--json", uri]).stdout)["exports"][0]
        assert info["can_flush"] and info["can_fua"] and info["can_trim"]
        assert not info["can_zero"] and info["block_size_minimum"] == 512
        r = run(["fio", "--name=lw", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                 "--bs=4k", "--iodepth=8", "--size=8m", "--fsync=16", "--verify=crc32c",
                 "--do_verify=1", "--randseed=9"], check=False, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        for cmd in ("write -f -P 0x5a 9M 64k", "discard 10M 1M", "write -P 0x33 12M 256k",
                    "flush"):
            run(["qemu-io", "-f", "raw", "-c", cmd, uri])
    finally:
        served.server.stop()
        c.shutdown()
    replayed = tmp_path / "replayed.img"
    with open(replayed, "wb") as f:
        f.truncate(SIZE)
    assert pydm_main(["lw", "replay", "--log", str(log), "--replay", str(replayed)]) == 0
    assert open(replayed, "rb").read() == open(data, "rb").read()
    assert pydm_main(["lw", "dump", str(log), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)["entries"]
    names = {e["flag_names"] for e in entries}
    assert {"FUA", "DISCARD", "FLUSH", "MARK"} <= names
