import pytest

from pydm.control import Control
from pydm.errors import DMError
from pydm.registry import TargetRegistry
from pydm.target import Target


def test_builtin_targets_are_found_by_entry_point():
    r = TargetRegistry()
    names = [n for n, _v, _d in r.available()]
    for n in ("linear", "flakey", "delay", "error", "zero"):
        assert n in names
    assert r.get("linear").__module__ == "pydm.targets.linear"


def test_loaded_on_first_use_and_refcounted():
    c = Control()
    assert c.targets.in_use("zero") == 0
    c.create("a", "0 8 zero\n8 8 zero\n")
    assert c.targets.in_use("zero") == 2
    with pytest.raises(DMError, match="in use"):
        c.targets.unregister("zero")
    c.remove("a")
    assert c.targets.in_use("zero") == 0
    c.targets.unregister("zero")
    c.create("b", "0 8 zero\n")          # found again through the entry point
    c.shutdown()


def test_register_rejects_bad_classes():
    r = TargetRegistry()
    with pytest.raises(DMError):
        r.register(object)

    class Nameless(Target):
        pass

    with pytest.raises(DMError):
        r.register(Nameless)
    with pytest.raises(DMError, match="unknown target type"):
        r.get("no-such-target")
