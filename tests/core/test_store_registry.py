"""The store plugin registry and pool alone: which plugin takes which
argument, what a bad argument says, and how open stores are shared."""

import errno
import os

import pytest

from pydm.control import Control
from pydm.errors import DMError, PydmError
from pydm.store import MemStore
from pydm.store_registry import StorePool, StoreRegistry, StoreSpec

from helpers import make_image


class Toy:
    """A plugin of this test: toy://NAME, one 1 MiB memory disk per name."""
    name = "toy"
    schemes = ("toy",)

    def __init__(self):
        self.opened = []
        self.disks = {}

    def parse(self, arg, cwd=None):
        name = arg[len("toy://"):]
        if not name or "/" in name:
            raise PydmError(f"{arg}: bad toy name")
        return StoreSpec("toy", ("toy", name), f"toy://{name}", name)

    def open(self, spec, readonly):
        if spec.params == "down":
            raise PydmError(f"cannot reach {spec.ref}: Connection refused", errno.ECONNREFUSED)
        s = MemStore(1 << 20, spec.ref, readonly)
        s.key = spec.key
        s.refresh_size = lambda: s.size
        self.opened.append(s)
        return s


def test_the_form_of_an_argument_picks_the_plugin(tmp_path):
    r = StoreRegistry()
    r.register(Toy())
    assert r.parse("disk.img", str(tmp_path)).ref == str(tmp_path / "disk.img")
    assert r.parse("file:disk.img", str(tmp_path)).ref == str(tmp_path / "disk.img")
    assert r.parse("file:///abs/x.img").ref == "/abs/x.img"
    assert r.parse("TOY://a").plugin == "toy"
    # a colon in a plain file name is still a file
    assert r.parse("a:b.img", str(tmp_path)).ref == str(tmp_path / "a:b.img")
    assert r.parse("nbd://localhost/x").plugin == "nbd"


def test_an_unknown_scheme_says_which_ones_exist():
    r = StoreRegistry()
    with pytest.raises(PydmError) as e:
        r.parse("s3://bucket/disk")
    assert "unknown store scheme 's3'" in str(e.value)
    assert "dm" in str(e.value) and "file" in str(e.value) and "nbd" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_scheme_cannot_be_taken_twice():
    r = StoreRegistry()
    r.register(Toy())
    with pytest.raises(PydmError, match="already taken"):
        r.register(Toy())


def test_the_installed_plugins_are_listed():
    plugins, broken = StoreRegistry().plugins()
    names = dict(plugins)
    assert names["file"] == ["file"]
    assert set(names["nbd"]) >= {"nbd", "nbds", "nbd+unix", "nbds+unix"}
    assert broken == {}


def test_the_pool_shares_a_store_per_identity_and_mode(tmp_path):
    toy = Toy()
    reg = StoreRegistry()
    reg.register(toy)
    pool = StorePool(registry=reg)
    a = pool.acquire("toy://a")
    assert pool.acquire("toy://a") is a
    ro = pool.acquire("toy://a", readonly=True)
    assert ro is not a and len(toy.opened) == 2
    img = make_image(tmp_path / "x.img", 1 << 20)
    os.link(img, tmp_path / "y.img")
    f = pool.acquire("x.img", cwd=str(tmp_path))
    assert pool.acquire(f"file:{tmp_path}/y.img") is f      # one file, two names
    for s in (a, a, ro, f, f):
        pool.release(s)
    assert pool.open_count() == 0


def test_a_store_that_is_read_only_when_asked_read_write_is_released():
    class RoToy(Toy):
        def open(self, spec, readonly):
            s = super().open(spec, True)        # the server said read-only
            return s
    reg = StoreRegistry()
    reg.register(RoToy())
    pool = StorePool(registry=reg)
    s = pool.acquire("toy://a", readonly=False)
    assert s.readonly
    pool.release(s)
    assert pool.open_count() == 0


def test_a_store_that_cannot_open_leaves_the_device_unchanged(tmp_path):
    toy = Toy()
    reg = StoreRegistry()
    reg.register(toy)
    c = Control(stores=StorePool(registry=reg))
    c.create("d", "0 2048 linear toy://a 0")
    before = c.table("d")
    for bad, why in (("toy://down", "Connection refused"),
                     ("toy://", "bad toy name"),
                     ("zz://x", "unknown store scheme 'zz'")):
        with pytest.raises(DMError) as e:
            c.load("d", f"0 2048 linear {bad} 0")
        assert why in str(e.value) and "\n" not in str(e.value)
        assert c.table("d") == before and c.table("d", inactive=True) == []
    assert c.table("d") == [(0, 2048, "linear", "toy://a 0")]
    c.shutdown()
    assert c.stores.open_count() == 0
