"""pydm.caps: the one rule for putting capabilities side by side, and
narrowing that never widens."""

from pydm.caps import Caps, combine


def test_combine_follows_the_stacking_rules():
    file_like = Caps(flush=True, fua=True, discard=True, write_zeroes=True, fast_zero=True,
                     min_block=512, preferred_block=4096, max_block=32 << 20)
    zero_like = Caps(discard=True, write_zeroes=True, fast_zero=True)
    strict = Caps(readonly=True, discard=False, write_zeroes=True, min_block=4096,
                  preferred_block=65536, max_block=1 << 20, max_discard=1 << 20,
                  cache=False)
    c = combine([file_like, zero_like])
    assert c.flush and c.fua                     # any part with something volatile
    assert c.discard and c.write_zeroes and c.fast_zero
    c = combine([file_like, zero_like, strict])
    assert c.readonly and not c.discard and not c.fast_zero and not c.cache
    assert (c.min_block, c.preferred_block, c.max_block) == (4096, 65536, 1 << 20)
    assert c.max_discard == 1 << 20
    assert combine([]) == Caps()


def test_narrowing_never_widens():
    base = Caps(flush=True, fua=True, discard=False)
    assert not base.narrowed(discard=True).discard
    assert not base.narrowed(flush=False).fua       # no FUA without flush
    assert base.narrowed(readonly=True).readonly
    assert Caps(readonly=True).narrowed(readonly=False).readonly   # stays read-only
    c = Caps(min_block=4096, preferred_block=512, max_block=1 << 20)
    c.settle()
    assert c.preferred_block == 4096                 # never below the minimum


def test_a_part_no_flush_reaches_takes_flush_and_fua_from_the_whole():
    """A store whose writes may be volatile with no flush to make them
    durable (an NBD server without flush) must not hide behind a part that
    can flush: side by side, nothing claims flush or FUA, and narrowing can
    never clear it."""
    from pydm.caps import Caps, combine
    disk = Caps(flush=True, fua=True)
    remote = Caps(unflushable=True)
    both = combine([disk, remote])
    assert both.unflushable and not both.flush and not both.fua
    assert combine([disk, Caps()]).flush            # a part with nothing volatile: fine
    again = both.narrowed(unflushable=False, flush=True)
    assert again.unflushable and not again.flush
    settled = Caps(flush=True, fua=True, unflushable=True)
    settled.settle()
    assert not settled.flush and not settled.fua
