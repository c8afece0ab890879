"""TLS: STARTTLS with X.509 certificates, required or offered.

Certificates are made per test session with the ``openssl`` command (on every
Debian machine, so no Python dependency): a throwaway CA, a server
certificate for localhost and 127.0.0.1, and a client certificate, laid out
the way libnbd and qemu expect (ca-cert.pem, server-cert.pem,
server-key.pem / client-cert.pem, client-key.pem).
"""

import json
import os
import shutil
import ssl

import pytest

from nbd_support import DISK_SIZE, MiB, make_disk, need, run, start_server
from nbdclient import Client, NBDError
from pydm.control import Control
from pydm.errors import PydmError
from pydm.nbd import protocol as P
from pydm.nbd.server import NBDServer
from test_nbd_clients import nbdsh


def _openssl(*args, cwd):
    run(["openssl", *args], cwd=cwd)


def _make_cert(d, name, cn, ca_dir, ext):
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={cn}", cwd=d)
    with open(os.path.join(d, f"{name}.ext"), "w") as f:
        f.write(ext)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", os.path.join(ca_dir, "ca-cert.pem"),
             "-CAkey", os.path.join(ca_dir, "ca-key.pem"), "-CAcreateserial",
             "-out", f"{name}-cert.pem", "-days", "2", "-extfile", f"{name}.ext", cwd=d)


def _make_ca(d, cn):
    os.makedirs(d)
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "2",
             "-subj", f"/CN={cn}", cwd=d)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    need("openssl")
    base = tmp_path_factory.mktemp("pki")
    ca = str(base / "ca")
    _make_ca(ca, "pydm test CA")
    server, client = str(base / "server"), str(base / "client")
    os.makedirs(server)
    os.makedirs(client)
    _make_cert(server, "server", "localhost", ca,
               "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=serverAuth\n")
    _make_cert(client, "client", "pydm-test-client", ca,
               "keyUsage=critical,digitalSignature,keyEncipherment\n"
               "extendedKeyUsage=clientAuth\n")
    for d in (server, client):
        shutil.copy(os.path.join(ca, "ca-cert.pem"), d)
    # A client certificate from a CA the server does not trust.
    rogue_ca = str(base / "rogue-ca")
    _make_ca(rogue_ca, "rogue CA")
    rogue = str(base / "rogue")
    os.makedirs(rogue)
    _make_cert(rogue, "client", "rogue", rogue_ca, "extendedKeyUsage=clientAuth\n")
    shutil.copy(os.path.join(ca, "ca-cert.pem"), rogue)   # it trusts our server
    return {"server": server, "client": client, "rogue": rogue}


def _served(tmp_path, certs, mode, verify_peer=False):
    control = Control()
    disk = make_disk(tmp_path / "disk.img")
    control.create("disk", f"0 {DISK_SIZE >> 9} linear {disk} 0")
    return start_server(control, str(tmp_path), tls=mode, tls_certificates=certs["server"],
                        tls_verify_peer=verify_peer)


@pytest.fixture
def tls_required(tmp_path, certs):
    s = _served(tmp_path, certs, "require")
    yield s
    s.server.stop()
    s.control.shutdown()


def _tls_uri(s, certdir, export="disk"):
    return s.uri(export, host="localhost", scheme="nbds", query=f"?tls-certificates={certdir}")


def test_nbdinfo_with_certificates(tls_required, certs):
    need("nbdinfo")
    out = json.loads(run(["nbdinfo", "--json", _tls_uri(tls_required, certs["client"])]).stdout)
    assert out["TLS"] is True
    assert out["exports"][0]["export-size"] == DISK_SIZE
    listing = run(["nbdinfo", "--list", _tls_uri(tls_required, certs["client"], "")]).stdout
    assert 'export="disk"' in listing


def test_plain_client_refused_clearly(tls_required, certs):
    need("nbdinfo", "qemu-img")
    # libnbd 1.14 reports ERR_TLS_REQD as "Operation not supported" whatever the
    # server says (nbdkit --tls=require gets the same words); its debug log
    # shows our message, and qemu prints the reason outright.
    r = run(["nbdinfo", tls_required.uri("disk", host="localhost")], check=False,
            env=dict(os.environ, LIBNBD_DEBUG="1"))
    assert r.returncode != 0
    assert "TLS is required" in r.stderr, r.stderr
    q = run(["qemu-img", "info", tls_required.uri("disk", host="localhost")], check=False)
    assert q.returncode != 0 and "TLS negotiation required" in q.stderr, q.stderr
    # and TLS clients are served as before
    run(["nbdinfo", "--size", _tls_uri(tls_required, certs["client"])])


def test_tls_data_path(tls_required, certs):
    out = nbdsh(None, f"""
        h = nbd.NBD()
        h.set_uri_allow_local_file(True)
        h.connect_uri("{_tls_uri(tls_required, certs['client'])}")
        assert h.get_tls_negotiated()
        data = bytes(range(256)) * 4096
        h.pwrite(data, 1 << 20)
        assert h.pread(len(data), 1 << 20) == data
        bufs = [nbd.Buffer(65536) for _ in range(32)]
        cs = [h.aio_pread(b, (1 << 20) + 65536 * (i % 16)) for i, b in enumerate(bufs)]
        while h.aio_in_flight() > 0:
            h.poll(-1)
        assert all(b.to_bytearray() == data[(i % 16) * 65536:(i % 16 + 1) * 65536]
                   for i, b in enumerate(bufs))
        h.flush()
        print("tls io ok")
    """)
    assert "tls io ok" in out.stdout
    with open(tls_required.image("disk.img"), "rb") as f:
        f.seek(1 << 20)
        assert f.read(MiB) == bytes(range(256)) * 4096


def test_tls_with_python_client_and_qemu(tls_required, certs):
    ctx = ssl.create_default_context(cafile=os.path.join(certs["client"], "ca-cert.pem"))
    ctx.load_cert_chain(os.path.join(certs["client"], "client-cert.pem"),
                        os.path.join(certs["client"], "client-key.pem"))
    with Client(tls_required.addr, "disk", tls_context=ctx) as c:
        c.pwrite(0, b"t" * 4096)
        assert c.pread(0, 4096) == b"t" * 4096
    need("qemu-img")
    info = run(["qemu-img", "info", "--output=json", "--object",
                f"tls-creds-x509,id=tls0,endpoint=client,dir={certs['client']}",
                "--image-opts", "driver=nbd,server.type=inet,server.host=localhost,"
                f"server.port={tls_required.port},export=disk,tls-creds=tls0"])
    assert json.loads(info.stdout)["virtual-size"] == DISK_SIZE


def test_tls_required_refuses_export_name_and_options(tls_required):
    with pytest.raises(NBDError) as e:
        Client(tls_required.addr, "disk", structured=False)
    assert e.value.error == P.REP_ERR_TLS_REQD
    with pytest.raises((EOFError, ConnectionError)):
        Client(tls_required.addr, "disk", structured=False, export_name=True)


def test_verify_peer_rejects_untrusted_client(tmp_path, certs):
    need("nbdinfo")
    s = _served(tmp_path, certs, "require", verify_peer=True)
    try:
        assert run(["nbdinfo", "--size", _tls_uri(s, certs["client"])]).stdout.strip() == \
            str(DISK_SIZE)
        r = run(["nbdinfo", "--size", _tls_uri(s, certs["rogue"])], check=False)
        assert r.returncode != 0
    finally:
        s.server.stop()
        s.control.shutdown()


def test_tls_on_serves_both(tmp_path, certs):
    need("nbdinfo")
    s = _served(tmp_path, certs, "on")
    try:
        plain = json.loads(run(["nbdinfo", "--json", s.uri("disk")]).stdout)
        assert plain["TLS"] is False
        tls = json.loads(run(["nbdinfo", "--json", _tls_uri(s, certs["client"])]).stdout)
        assert tls["TLS"] is True
    finally:
        s.server.stop()
        s.control.shutdown()


def test_tls_needs_certificates():
    with pytest.raises(PydmError, match="tls-certificates"):
        NBDServer(Control(), [], tls="require")
    with pytest.raises(PydmError, match="cannot load TLS certificate"):
        NBDServer(Control(), [], tls="on", tls_certificates="/nonexistent")


def test_a_pydm_store_over_tls_with_certificates(tls_required, certs, tmp_path):
    """pydm stacked on another pydm over the network: a linear device over
    an nbds:// store, verified with the client certificates; the table
    prints the URI canonically, and a store without the certificates is
    refused in one line with the device unchanged."""
    pytest.importorskip("nbd")
    from pydm.errors import DMError
    uri = _tls_uri(tls_required, certs["client"])
    front = Control()
    try:
        front.create("front", f"0 {DISK_SIZE >> 9} linear {uri} 0")
        line = front.table("front")[0][3]
        assert line == (f"nbds://localhost:{tls_required.port}/disk?tls-certificates="
                        f"{certs['client']} 0"), line
        with open(tls_required.image("disk.img"), "rb") as f:
            want = f.read(1 << 20)
        from helpers import do_io
        from pydm.bio import READ, WRITE
        status, got = do_io(front.get("front"), READ, 0, (1 << 20) >> 9)
        assert status == 0 and bytes(got) == want
        assert do_io(front.get("front"), WRITE, 4096, data=b"\x77" * 4096)[0] == 0
        with open(tls_required.image("disk.img"), "rb") as f:
            f.seek(4096 * 512)
            assert f.read(4096) == b"\x77" * 4096
    finally:
        front.shutdown()
    # (in one Control the plain URI would share the open TLS store: one disk)
    other = Control()
    try:
        other.create("plain")
        plain = f"nbd://localhost:{tls_required.port}/disk"
        with pytest.raises(DMError) as e:
            other.load("plain", f"0 {DISK_SIZE >> 9} linear {plain} 0")
        assert "\n" not in str(e.value) and "cannot connect" in str(e.value)
        assert other.table("plain") == []
    finally:
        other.shutdown()
