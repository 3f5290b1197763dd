"""The share of time a controller's own NATS outages leave it blind (controller.engine._blind_within)."""

from __future__ import annotations

from controller.engine import FLAP_SHARE, FLAP_WINDOW_FACTOR, _blind_within

HB = 3.0  # the default heartbeatTimeout
WINDOW = FLAP_WINDOW_FACTOR * HB
GRACE = min(1.0, HB / 2)


def blind_share(outages: list[tuple[float, float]], now: float, ongoing: float | None = None) -> float:
    return _blind_within(outages, ongoing, now, WINDOW, GRACE)[0] / WINDOW


def test_a_nats_restart_and_a_blip_after_it_leave_a_run_alone() -> None:
    # 2.4 s down (a restart, under the timeout), then 0.7 s down 8 s later (a review's case)
    outages = [(100.0, 102.4), (110.4, 111.1)]
    assert blind_share(outages, now=112.0) < FLAP_SHARE


def test_a_link_reset_every_second_is_nearly_all_blind() -> None:
    # reset every 1.04 s, 0.12 s to reconnect: 11 % down, but the grace after each covers the rest
    outages = [(t, t + 0.12) for t in (100 + 1.04 * i for i in range(20))]
    assert blind_share(outages, now=100 + 1.04 * 20) > FLAP_SHARE


def test_overlapping_graces_and_the_ongoing_outage_are_counted_once() -> None:
    total, n = _blind_within([(0.0, 1.0), (1.5, 2.0)], ongoing_since=2.5, now=4.0, window_s=10.0, grace_s=1.0)
    assert n == 3 and abs(total - 4.0) < 1e-9  # [0, 4): the graces bridge every gap
