import pytest

from helpers import make_image
from pydm.control import Control
from pydm.errors import DMError
from pydm.table import parse_table, quote_arg, split_args


def test_parse_lines_comments_and_escapes():
    lines = parse_table("# header\n0 8 linear a\\ b.img 0   # trailing\n\n8 8 zero\n")
    assert [(l.start, l.length, l.ttype, l.args) for l in lines] == [
        (0, 8, "linear", ["a b.img", "0"]), (8, 8, "zero", [])]
    assert [l.lineno for l in lines] == [2, 4]


def test_split_and_quote_round_trip():
    for arg in ["plain", "with space", "back\\slash", "tab\there"]:
        assert split_args(quote_arg(arg)) == [arg]


@pytest.mark.parametrize("text,words", [
    ("0 8 zero\n16 8 zero\n", "line 2: gap"),
    ("0 8 zero\n4 8 zero\n", "line 2: overlap"),
    ("8 8 zero\n", "line 1: gap"),
    ("0 0 zero\n", "line 1: zero-length"),
    ("0 x zero\n", "line 1: invalid length"),
    ("-1 8 zero\n", "line 1: invalid start"),
    ("0 8\n", "line 1: expected"),
    ("# nothing\n\n", "empty table"),
    ("0 8 zero\\", "trailing backslash"),
])
def test_layout_errors_name_the_line(text, words):
    with pytest.raises(DMError) as e:
        parse_table(text)
    assert words in str(e.value)


@pytest.fixture
def control(tmp_path):
    c = Control()
    make_image(tmp_path / "a.img", 1 << 20)
    make_image(tmp_path / "b.img", 1 << 20)
    yield c
    c.shutdown()
    assert c.stores.open_count() == 0


@pytest.mark.parametrize("table,words", [
    ("0 8 nosuch\n", "line 1: unknown target type \"nosuch\""),
    ("0 8 zero\n8 8 linear a.img\n", "line 2: linear: Invalid argument count"),
    ("0 8 linear a.img 12x\n", "line 1: linear: Invalid device sector"),
    ("0 8 linear missing.img 0\n", "line 1: linear: cannot open"),
    ("0 4096 linear a.img 0\n", "runs past its end"),
    ("0 8 linear dm:ghost 0\n", "Device lookup failed"),
    ("0 8 error extra\n", "Invalid argument count"),
])
def test_bad_tables_fail_whole_load_and_release_everything(control, tmp_path, table, words):
    dev = control.create("d", "0 16 linear a.img 0\n", cwd=str(tmp_path))
    before = control.table("d")
    opened = control.stores.open_count()
    with pytest.raises(DMError) as e:
        control.load("d", table, cwd=str(tmp_path))
    assert words in str(e.value)
    assert control.table("d") == before
    assert dev.inactive is None
    assert control.stores.open_count() == opened
    assert control.targets.in_use("linear") == 1


def test_table_output_loads_back_unchanged(control, tmp_path):
    text = ("0 100 linear a.img 7\n100 50 flakey b.img 3 5 6 1 drop_writes\n"
            "150 10 zero\n160 10 error\n170 30 delay a.img 0 0 b.img 0 0\n")
    control.create("d", text, cwd=str(tmp_path))
    out = "\n".join(f"{s} {n} {t} {p}".rstrip() for s, n, t, p in control.table("d"))
    # absolute paths: no cwd needed; read-only, as two devices may not
    # both write the same blocks
    control.create("e", out, readonly=True)
    assert control.table("e") == control.table("d")
    assert str(tmp_path / "a.img") in out


def test_singleton_and_readonly_features(control):
    from pydm.target import ALWAYS_WRITEABLE, SINGLETON, Target

    class Only(Target):
        name = "only_one"
        features = SINGLETON

    class Rw(Target):
        name = "needs_rw"
        features = ALWAYS_WRITEABLE

    control.targets.register(Only)
    control.targets.register(Rw)
    with pytest.raises(DMError, match="only one"):
        control.create("s", "0 8 only_one\n8 8 zero\n")
    control.create("s", "0 8 only_one\n")
    with pytest.raises(DMError, match="read-only"):
        control.create("r", "0 8 needs_rw\n", readonly=True)
    assert "r" not in control.names()
