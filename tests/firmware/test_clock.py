"""Clock-synced flag: cached, re-probed after its TTL on the monotonic clock."""

from __future__ import annotations

from firmware.clock import ClockStatus


def test_clock_status_caches_and_reprobes() -> None:
    answers = iter([False, True, False])
    now = [100.0]
    calls: list[float] = []

    def probe() -> bool:
        calls.append(now[0])
        return next(answers)

    c = ClockStatus(probe, ttl_s=10.0, monotonic=lambda: now[0])
    assert c.synced() is False
    now[0] = 109.0
    assert c.synced() is False and len(calls) == 1  # inside the TTL: no new probe
    now[0] = 111.0
    assert c.synced() is True and calls == [100.0, 111.0]
