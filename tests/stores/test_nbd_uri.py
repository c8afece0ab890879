"""The NBD store's argument parser (stores/nbd/uri.py): the four URI forms,
canonical refs, identities, and one-line errors for everything else.
Pure: no server, no libnbd."""

import os

import pytest

from pydm.errors import PydmError
from pydm.stores.nbd import uri as U
from pydm.stores.nbd.plugin import PLUGIN


def ref(arg, cwd="/srv"):
    return PLUGIN.parse(arg, cwd).ref


def params(arg, cwd="/srv"):
    return PLUGIN.parse(arg, cwd).params


def error(arg, cwd="/srv"):
    with pytest.raises(PydmError) as ei:
        PLUGIN.parse(arg, cwd)
    text = str(ei.value)
    assert "\n" not in text and "Traceback" not in text
    return text


@pytest.mark.parametrize("arg, canonical", [
    ("nbd://example.com/disk", "nbd://example.com:10809/disk"),
    ("NBD://Example.COM:10809/disk", "nbd://example.com:10809/disk"),
    ("nbd://127.0.0.1", "nbd://127.0.0.1:10809/"),
    ("nbd://127.0.0.1/", "nbd://127.0.0.1:10809/"),
    ("nbd://127.0.0.1:/", "nbd://127.0.0.1:10809/"),
    ("nbd://[::1]:1234/x", "nbd://[::1]:1234/x"),
    ("nbd://[0:0:0:0:0:0:0:1]/x", "nbd://[::1]:10809/x"),
    ("nbd://h:1/a%20b%3Fc%23d", "nbd://h:1/a%20b%3Fc%23d"),
    ("nbd://h:1/a b", "nbd://h:1/a%20b"),
    ("nbd://h:1/%61", "nbd://h:1/a"),                   # needless escapes undone
    ("nbd://h:1//abs/name", "nbd://h:1//abs/name"),     # export "/abs/name"
    ("nbd://h:1/caf%C3%A9", "nbd://h:1/caf%C3%A9"),
    ("nbd+unix:///?socket=/run/nbd.sock", "nbd+unix:///?socket=/run/nbd.sock"),
    ("nbd+unix:///ex?socket=rel/s.sock", "nbd+unix:///ex?socket=/srv/rel/s.sock"),
    ("nbd+unix:///ex?socket=../s.sock", "nbd+unix:///ex?socket=/s.sock"),
    ("nbd+unix:///?socket=/a%20b/s", "nbd+unix:///?socket=/a%20b/s"),
    # pydm keys: in a fixed order, defaults left out
    ("nbd://h/x?conns=2&timeout=5", "nbd://h:10809/x?timeout=5&conns=2"),
    ("nbd://h/x?timeout=30&conns=4", "nbd://h:10809/x"),
    ("nbd://h/x?timeout=30.0", "nbd://h:10809/x"),
    ("nbd://h/x?timeout=0.5", "nbd://h:10809/x?timeout=0.5"),
    ("nbd://h/x?timeout=2.50", "nbd://h:10809/x?timeout=2.5"),
    ("nbd://h/x?connect-timeout=3", "nbd://h:10809/x?connect-timeout=3"),
    ("nbd://h/x?timeout=3&connect-timeout=3", "nbd://h:10809/x?timeout=3"),
    # TLS keys
    ("nbds://h/x?tls-psk-file=keys.psk&tls-username=alice",
     "nbds://h:10809/x?tls-psk-file=/srv/keys.psk&tls-username=alice"),
    ("nbds://alice@h/x?tls-psk-file=/k", "nbds://h:10809/x?tls-psk-file=/k&tls-username=alice"),
    ("nbds://h/x?tls-verify-peer=false&tls-certificates=/pki",
     "nbds://h:10809/x?tls-certificates=/pki&tls-verify-peer=false"),
    ("nbds://h/x?tls-verify-peer=true", "nbds://h:10809/x"),
    ("nbds+unix:///x?socket=/s&tls-psk-file=/k", "nbds+unix:///x?socket=/s&tls-psk-file=/k"),
    ("nbds+unix://alice@/x?socket=/s&tls-psk-file=/k",
     "nbds+unix:///x?socket=/s&tls-psk-file=/k&tls-username=alice"),
])
def test_canonical_refs(arg, canonical):
    assert ref(arg) == canonical
    # canonical is a fixed point, with the same identity
    assert ref(canonical) == canonical
    assert PLUGIN.parse(canonical, "/elsewhere").key == PLUGIN.parse(arg, "/srv").key


def test_parsed_parameters():
    p = params("nbds://bob:secret@Host:999/ex%2Fport?tls-psk-file=k&timeout=1.5&conns=16"
               "&connect-timeout=4")
    assert (p.scheme, p.transport, p.tls, p.host, p.port, p.socket) == \
        ("nbds", "tcp", True, "host", 999, None)
    assert p.export == "ex/port"
    assert (p.tls_psk_file, p.tls_username, p.tls_verify_peer) == ("/srv/k", "bob", True)
    assert (p.timeout, p.conns, p.connect_timeout, p.handshake_timeout) == (1.5, 16, 4.0, 4.0)
    d = params("nbd+unix:///?socket=s")
    assert (d.transport, d.tls, d.socket, d.export, d.timeout, d.conns, d.connect_timeout,
            d.handshake_timeout) == ("unix", False, "/srv/s", "", 30.0, 4, None, 30.0)


def test_a_password_is_never_shown():
    spec = PLUGIN.parse("nbds://alice:hunter2@h/x?tls-psk-file=/k", None)
    assert "hunter2" not in spec.ref and "hunter2" not in repr(spec.key)
    assert "hunter2" not in error("nbds://alice:hunter2@h/x?bogus=1")
    assert "hunter2" not in error("nbds://alice:hunter2@h:0/x")
    assert U.redact("nbds://alice:hunter2@h/x") == "nbds://alice@h/x"


def test_identity_is_the_server_and_the_export(tmp_path):
    key = PLUGIN.parse("nbd://H:10809/x?timeout=3&conns=1", None).key
    assert key == PLUGIN.parse("nbd://h/x", None).key
    assert key == PLUGIN.parse("nbds://h/x?tls-psk-file=/k", None).key   # TLS or not
    assert key != PLUGIN.parse("nbd://h/y", None).key
    assert key != PLUGIN.parse("nbd://h:10810/x", None).key
    assert hash(key) == hash(PLUGIN.parse("nbd://h/x", None).key)
    # a socket is known by its real path, whatever names it
    real = tmp_path / "real.sock"
    real.touch()
    (tmp_path / "link.sock").symlink_to(real)
    a = PLUGIN.parse("nbd+unix:///e?socket=link.sock", str(tmp_path))
    b = PLUGIN.parse(f"nbd+unix:///e?socket={real}", None)
    assert a.key == b.key == ("nbd-unix", os.path.realpath(real), "e")
    assert a.ref != b.ref                                 # each says what it was given
    assert PLUGIN.parse("nbd+unix:///f?socket=link.sock", str(tmp_path)).key != a.key


def test_the_spec_is_what_the_registry_expects():
    spec = PLUGIN.parse("nbd://h/x", None)
    assert spec.plugin == "nbd" == PLUGIN.name
    assert set(PLUGIN.schemes) == {"nbd", "nbds", "nbd+unix", "nbds+unix"}
    with pytest.raises(Exception):
        spec.ref = "other"                                # frozen


def test_a_relative_socket_without_cwd_is_taken_from_the_process_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert params("nbd+unix:///?socket=s.sock", None).socket == str(tmp_path / "s.sock")


@pytest.mark.parametrize("arg, words", [
    ("http://h/x", "not an NBD URI"),
    ("nbd:/h/x", "not an NBD URI"),
    ("nbd-unix:///x?socket=/s", "not an NBD URI"),
    ("/dev/sda", "not an NBD URI"),
    ("nbd:///x", "needs a host"),
    ("nbd://:10809/x", "needs a host"),
    ("nbd://h:0/x", "port '0'"),
    ("nbd://h:65536/x", "port '65536'"),
    ("nbd://h:-1/x", "port"),
    ("nbd://h:http/x", "port 'http'"),
    ("nbd://[::1/x", "unterminated"),
    ("nbd://[nothex]/x", "not an IPv6 address"),
    ("nbd://h h/x", "not a host name"),
    ("nbd://h/a%00b", "NUL"),
    ("nbd://h/\x00", "control character"),
    ("nbd://h/a\tb", "control character"),
    ("nbd://h/%ff", "not UTF-8"),
    ("nbd://h/" + "x" * 4097, "longer than 4096"),
    ("nbd://h/x#frag", "fragment"),
    ("nbd+unix:///x", "needs ?socket=PATH"),
    ("nbd+unix:///x?socket=", "needs ?socket=PATH"),
    ("nbd+unix://h/x?socket=/s", "takes no host"),
    ("nbd+unix://:99/x?socket=/s", "takes no host"),
    ("nbd://h/x?socket=/s", "socket= is for nbd+unix"),
    ("nbd://h/x?timeout=0", "timeout=0 is out of range"),
    ("nbd://h/x?timeout=-1", "not a positive number"),
    ("nbd://h/x?timeout=abc", "not a positive number"),
    ("nbd://h/x?timeout=inf", "not a positive number"),
    ("nbd://h/x?timeout=1e400", "not a positive number"),
    ("nbd://h/x?timeout=100000", "out of range"),
    ("nbd://h/x?connect-timeout=0", "connect-timeout=0 is out of range"),
    ("nbd://h/x?conns=0", "conns='0' is not a number from 1 to 16"),
    ("nbd://h/x?conns=17", "from 1 to 16"),
    ("nbd://h/x?conns=two", "from 1 to 16"),
    ("nbd://h/x?timeout=1&timeout=2", "'timeout' is given twice"),
    ("nbd://h/x?timeout", "'timeout' has no value"),
    ("nbd://h/x?tls-psk-file=/k", "tls-psk-file needs TLS"),
    ("nbd://alice@h/x", "a user name needs TLS"),
    ("nbd+unix://alice@/x?socket=/s", "a user name needs TLS"),
    ("nbd+unix:///x?socket=/s&tls-username=a", "tls-username needs TLS"),
    ("nbds://a@h/x?tls-username=b", "two user names"),
    ("nbds://h/x?tls-username=", "tls-username is empty"),
    ("nbds://h/x?tls-psk-file=", "tls-psk-file is empty"),
    ("nbds://h/x?tls-psk-file=/k&tls-certificates=/d", "not both"),
    ("nbds://h/x?tls-verify-peer=maybe", "not true or false"),
])
def test_bad_arguments_fail_with_one_clear_line(arg, words):
    text = error(arg)
    assert words in text, text


def test_an_unknown_key_is_named():
    text = error("nbd://h/x?timeout=3&cache=on")
    assert "unknown query key 'cache'" in text
    assert "timeout" in text and "conns" in text          # and the known ones listed
    assert text.startswith("nbd://h/x?timeout=3&cache=on: ")


def test_format_seconds():
    assert [U.format_seconds(v) for v in (2.0, 0.5, 30, 1.25)] == ["2", "0.5", "30", "1.25"]
