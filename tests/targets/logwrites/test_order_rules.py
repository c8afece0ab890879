"""log-writes' ordering rules alone (``order.LogOrder``: pure, no I/O):
what each event hands to the log, and what the memory bound may spill."""

from pydm.targets.logwrites import format as F
from pydm.targets.logwrites.order import LogOrder, Record

SS = 512


def write(sector, flags=0):
    return Record.make(SS, sector, 1, flags, payload=bytes([sector % 256]) * SS)


def flush_entry():
    return Record.make(SS, 0, 0, F.FLUSH)


def sectors(recs):
    return ["FLUSH" if r.flags & F.FLUSH else r_sector(r) for r in recs]


def r_sector(rec):
    return int.from_bytes(bytes(rec.head[:8]), "little")


def test_with_no_flush_in_flight_a_spill_takes_every_held_write_in_completion_order():
    o = LogOrder()
    for s in (3, 1, 2):
        assert o.completed(write(s)) == []
    assert o.held_bytes == 3 * 2 * SS
    assert sectors(o.spill()) == [3, 1, 2]
    assert o.held_bytes == 0 and o.spill() == []


def test_with_a_flush_in_flight_only_what_it_covers_spills():
    o = LogOrder()
    o.completed(write(1))
    fid = o.flush_issued()
    o.completed(write(2))
    assert sectors(o.spill()) == [1]
    assert o.spill() == []                   # write 2 belongs behind the flush's entry
    assert o.held_bytes == 2 * SS
    assert sectors(o.flush_done(fid, flush_entry())) == ["FLUSH"]   # 1 is not logged twice
    assert sectors(o.spill()) == [2]
    assert o.held_bytes == 0


def test_a_failed_flush_after_a_spill_gives_back_only_what_did_not_spill():
    o = LogOrder()
    o.completed(write(1))
    fid = o.flush_issued()
    assert sectors(o.spill()) == [1]
    o.completed(write(2))
    o.flush_failed(fid)
    assert o.held_bytes == 2 * SS
    fid2 = o.flush_issued()
    assert sectors(o.flush_done(fid2, flush_entry())) == [2, "FLUSH"]
    assert o.held_bytes == 0


def test_a_later_flush_logs_the_spilled_flushs_remainder_once():
    o = LogOrder()
    o.completed(write(1))
    a = o.flush_issued()
    assert sectors(o.spill()) == [1]
    o.completed(write(2))
    b = o.flush_issued()
    assert sectors(o.flush_done(b, flush_entry())) == [2, "FLUSH"]
    assert sectors(o.flush_done(a, flush_entry())) == ["FLUSH"]
    assert o.held_bytes == 0


def test_a_fua_write_is_never_held():
    o = LogOrder()
    assert sectors(o.completed(write(5, F.FUA))) == [5]
    assert o.held_bytes == 0 and o.spill() == []
