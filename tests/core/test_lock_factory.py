"""Every lock, condition and event of pydm comes from pydm.lockdep's factory
(lockdep.py's first rule), so the lock-order checker sees all of them."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]
PRIMITIVES = {"Lock", "RLock", "Condition", "Event", "Semaphore", "BoundedSemaphore",
              "Barrier"}
FACTORY = "pydm/lockdep.py"


def stray_primitives(source: str, name: str = "<text>"):
    """[(line, what)] for each use of a threading primitive in ``source``:
    ``threading.Lock`` called or passed around, or imported by name."""
    out = []
    for node in ast.walk(ast.parse(source, name)):
        if (isinstance(node, ast.Attribute) and node.attr in PRIMITIVES
                and isinstance(node.value, ast.Name) and node.value.id == "threading"):
            out.append((node.lineno, f"threading.{node.attr}"))
        elif isinstance(node, ast.ImportFrom) and node.module == "threading":
            out += [(node.lineno, f"from threading import {a.name}")
                    for a in node.names if a.name in PRIMITIVES or a.name == "*"]
    return sorted(out)


def test_every_lock_is_made_by_the_factory():
    offenders = []
    for top in ("pydm", "targets", "metadata", "stores"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel == FACTORY:
                continue
            offenders += [f"{rel}:{n}: {what}"
                          for n, what in stray_primitives(path.read_text(), rel)]
    assert not offenders, "locks made outside pydm.lockdep:\n" + "\n".join(offenders)


def test_the_scan_finds_each_way_of_making_one():
    planted = (
        "import threading\n"
        "a = threading.Lock()\n"
        "def f(factory=threading.RLock):\n"
        "    return threading.Event()\n"
        "from threading import Condition\n"
        "from threading import Thread, current_thread\n"     # not locks: fine
        "t = threading.Thread(target=f)\n"
    )
    assert [n for n, _w in stray_primitives(planted)] == [2, 3, 4, 5]
