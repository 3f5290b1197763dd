"""BlindSpans: the times the controller could not judge heartbeats are not counted against an agent."""

from __future__ import annotations

import pytest

from controller.engine import BlindSpans


def test_no_spans_counts_all_the_time() -> None:
    assert BlindSpans().judged_s(10.0, 13.5) == pytest.approx(3.5)


def test_a_span_inside_the_silence_is_not_counted() -> None:
    blind = BlindSpans()
    blind.add(11.0, 12.0)
    assert blind.judged_s(10.0, 13.5) == pytest.approx(2.5)


def test_a_span_before_the_last_heartbeat_credits_nothing_and_one_still_open_credits_up_to_now() -> None:
    blind = BlindSpans()
    blind.add(1.0, 2.0)
    blind.add(13.0, 20.0)  # the grace after a stall reaches past now
    assert blind.judged_s(10.0, 14.0) == pytest.approx(3.0)


def test_overlapping_spans_are_counted_once() -> None:
    blind = BlindSpans()
    blind.add(11.0, 12.5)
    blind.add(12.0, 13.0)
    assert blind.judged_s(10.0, 14.0) == pytest.approx(2.0)


def test_repeated_stalls_only_postpone_by_their_length() -> None:
    """A stall of 1.2 s (and 0.5 s of grace) after every 0.8 s awake: of each 2 s cycle 0.3 s
    counts, so the silence grows without bound. The old clock restarted at every return and
    never passed 0.8 s."""
    blind = BlindSpans()
    judged = []
    for cycle in range(4):
        stall_at = 0.8 + 2.0 * cycle
        blind.add(stall_at, stall_at + 1.2 + 0.5)
        judged.append(blind.judged_s(0.0, stall_at + 2.0))  # as the next stall begins
    assert judged == pytest.approx([1.1, 1.4, 1.7, 2.0])


def test_the_oldest_spans_are_forgotten_past_the_bound() -> None:
    blind = BlindSpans()
    for i in range(BlindSpans.MAX_SPANS + 10):
        blind.add(float(2 * i), float(2 * i + 1))
    # the first ten spans are gone: their time counts again, which only ever credits an agent less
    assert blind.judged_s(0.0, 20.0) == pytest.approx(20.0)
    assert blind.judged_s(20.0, 30.0) == pytest.approx(5.0)


def test_spans_that_come_out_of_order_are_coalesced() -> None:
    """From a review: a span merged only with the last one, so one that began earlier and
    covered it was counted twice."""
    blind = BlindSpans()
    blind.add(1.0, 4.0)
    blind.add(0.0, 12.0)
    blind.add(13.0, 14.0)
    blind.add(12.5, 13.5)
    assert blind.judged_s(-1.0, 20.0) == pytest.approx(1.0 + 0.5 + 6.0)
