"""Scenarios the core mutants are caught in (tests/mutation/mutants_core.py).

On the real code each passes with no monitor report; under its mutant
(PYDM_MUTANT=<name>) the named monitor reports.
"""

import errno
import threading

from helpers import do_io, make_image
from pydm import trace
from pydm.bio import READ, WRITE
from pydm.control import Control
from pydm.errors import DMError


def test_a_bio_split_over_two_targets(tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20)
    b = make_image(tmp_path / "b.img", 1 << 20)
    c = Control()
    try:
        d = c.create("split", f"0 16 linear {a} 0\n16 16 linear {b} 0\n")
        assert do_io(d, WRITE, 8, data=b"s" * 8192)[0] == 0
        assert do_io(d, READ, 8, 16)[1] == b"s" * 8192
    finally:
        # a bio counted out twice leaves the device's in-flight count wrong
        # and its drain waiting for ever: bound the wait, say so
        t = threading.Thread(target=c.shutdown, daemon=True)
        t.start()
        t.join(10)
        assert not t.is_alive(), "remove did not finish: the device never drained"


def test_a_bio_sent_to_a_removed_device_fails(tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20)
    c = Control()
    try:
        d = c.create("gone", f"0 64 linear {a} 0\n")
        c.remove("gone")
        assert do_io(d, READ, 0, 8)[0] == errno.EIO     # a stale handle
    finally:
        c.shutdown()


def test_two_removes_racing(tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20)
    c = Control()
    c.create("twice", f"0 64 linear {a} 0\n")
    second = []

    def remove_again(fields):
        # inside the first remove's teardown: a second remove of the same
        # name.  On the real code it finds no device at once; let it run
        # until it blocks (bounded) before the first teardown goes on.
        if fields.get("dev") == "twice" and not second:
            t = threading.Thread(target=_remove_quietly, args=(c, "twice", second))
            second.append(t)
            t.start()
            t.join(0.3)
    trace.attach(remove_again, ("dev_remove_begin",))
    try:
        c.remove("twice")
    finally:
        trace.detach(remove_again)
        if second:
            second[0].join(10)
        c.shutdown()
    assert second and second[1:] == [errno.ENXIO]


def _remove_quietly(c, name, out):
    try:
        c.remove(name)
        out.append(0)
    except DMError as e:
        out.append(e.errno)


def test_a_message_after_create_and_remove(tmp_path):
    a = make_image(tmp_path / "a.img", 1 << 20)
    c = Control()
    try:
        c.create("m1", f"0 64 linear {a} 0\n")
        b = make_image(tmp_path / "b.img", 1 << 20)
        c.create("m2", f"0 64 flakey {b} 0 1 0\n")
        c.remove("m1")
        try:
            c.message("m2", 0, "unknown")
        except DMError:
            pass
    finally:
        c.shutdown()
