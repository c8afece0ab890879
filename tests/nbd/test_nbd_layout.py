"""The shape of pydm.nbd, checked by reading its source: modules and classes
stay small, each module states its rules, the codec stays sans-IO, and the
socket side never packs a reply itself."""

import ast
import pathlib

import pytest

NBD = pathlib.Path(__file__).resolve().parents[2] / "pydm" / "nbd"
MODULES = sorted(NBD.glob("*.py"))
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 250
CODEC = ("wire.py", "handshake.py", "transmission.py", "protocol.py")
# What a sans-IO module may not import: it must run without any of these.
IO_MODULES = {"socket", "ssl", "threading", "queue", "select", "selectors", "os",
              "pydm.lockdep", "pydm.device", "pydm.control", "pydm.store"}
SOCKET_SIDE = ("connection.py", "dispatch.py", "outbox.py", "reader.py", "workers.py",
               "server.py")


def _tree(path):
    return ast.parse(path.read_text(), str(path))


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_and_classes_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_MODULE_LINES
    for node in ast.walk(_tree(path)):
        if isinstance(node, ast.ClassDef):
            assert node.end_lineno - node.lineno + 1 <= MAX_CLASS_LINES, node.name


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_every_module_states_its_rules(path):
    doc = ast.get_docstring(_tree(path)) or ""
    assert "Rules of this module:" in doc, f"{path.name}: no 'Rules of this module:' in it"


@pytest.mark.parametrize("name", CODEC)
def test_the_codec_imports_no_io(name):
    bad = sorted(m for m in _imports(_tree(NBD / name)) if m in IO_MODULES)
    assert not bad, f"{name} imports {bad}"


@pytest.mark.parametrize("name", SOCKET_SIDE)
def test_the_socket_side_packs_no_reply(name):
    """Replies are encoded by the codec; the socket side only sends them."""
    packs = [node.lineno for node in ast.walk(_tree(NBD / name))
             if isinstance(node, ast.Attribute) and node.attr in ("pack", "pack_into")]
    assert not packs, f"{name} packs bytes itself at lines {packs}"
