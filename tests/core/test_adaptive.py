"""pydm.adaptive alone: the spin-before-sleep window."""

from pydm.adaptive import next_window

START, CAP = 25e-6, 200e-6


def test_short_waits_double_the_window_from_start_up_to_the_cap():
    w, seen = 0.0, []
    for _ in range(6):
        w = next_window(w, 10e-6, START, CAP)
        seen.append(w)
    assert seen == [START, 2 * START, 4 * START, CAP, CAP, CAP]


def test_a_wait_longer_than_the_cap_turns_it_off_and_a_short_one_restarts_it():
    assert next_window(CAP, CAP + 1e-6, START, CAP) == 0.0
    assert next_window(0.0, CAP, START, CAP) == START
