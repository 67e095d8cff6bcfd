"""Clock-synced flag: cached, re-probed after its TTL on the monotonic clock."""

from __future__ import annotations

import ctypes
import errno
import json
from pathlib import Path

from firmware.clock import ClockState, ClockStatus, ClockTrust, KernelClock


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


class _Clocks:
    """Hand-driven wall and monotonic clocks and an NTP-synced flag."""

    def __init__(self, wall: float, mono: float = 1000.0) -> None:
        self.wall, self.mono, self.synced = wall, mono, False

    def advance(self, s: float) -> None:
        self.wall += s
        self.mono += s


def _trust(c: _Clocks, path: Path | None = None, boot: str = "boot-a") -> ClockTrust:
    return ClockTrust(
        lambda: c.synced,
        state_file=path,
        boot_id=boot,
        holdover_s=3600.0,
        ttl_s=0.0,
        monotonic=lambda: c.mono,
        wall=lambda: c.wall,
    )


def test_c21_clock_behind_then_ntp_step_then_step_back(tmp_path: Path) -> None:
    """C21: a Pi boots 2 days behind: untrusted; NTP steps +2 days: synced; sync lost and
    the clock steps -10 min: untrusted again (never holdover across a step)."""
    real = 1_790_000_000.0
    c = _Clocks(real - 2 * 86400)
    t = _trust(c, tmp_path / "clock.json")
    assert t.state() is ClockState.UNTRUSTED and t.synced() is False
    assert t.floor_s() == 0.0
    c.advance(60)
    c.wall += 2 * 86400  # NTP step
    c.synced = True
    assert t.state() is ClockState.SYNCED
    assert t.floor_s() == c.wall
    c.synced = False  # NTP server gone: holdover while the clock runs on its own
    c.advance(600)
    assert t.state() is ClockState.HOLDOVER and t.synced() is True
    c.wall -= 600  # stepped back 10 min by hand
    assert t.state() is ClockState.UNTRUSTED


def test_holdover_ends_after_its_period() -> None:
    c = _Clocks(1_790_000_000.0)
    c.synced = True
    t = _trust(c)
    assert t.state() is ClockState.SYNCED
    c.synced = False
    c.advance(3599)
    assert t.state() is ClockState.HOLDOVER
    c.advance(2)
    assert t.state() is ClockState.UNTRUSTED


def test_last_sync_persists_as_a_floor_but_not_as_holdover(tmp_path: Path) -> None:
    """After a reboot the saved sync is a lower bound for the time, never a reason to trust."""
    path = tmp_path / "clock.json"
    c = _Clocks(1_790_000_000.0)
    c.synced = True
    assert _trust(c, path).state() is ClockState.SYNCED
    synced_at = c.wall
    # reboot: same boot id would be a lie; a new one, the clock restarted from a saved time
    c2 = _Clocks(synced_at + 5, mono=3.0)
    t2 = _trust(c2, path, boot="boot-b")
    assert t2.state() is ClockState.UNTRUSTED
    assert t2.floor_s() == synced_at
    # the same boot (a daemon restart) keeps holdover
    c3 = _Clocks(synced_at + 30, mono=1030.0)
    assert _trust(c3, path, boot="boot-a").state() is ClockState.HOLDOVER


def test_clock_behind_the_floor_is_untrusted_even_in_this_boot(tmp_path: Path) -> None:
    c = _Clocks(1_790_000_000.0)
    c.synced = True
    t = _trust(c)
    t.state()
    c.synced = False
    c.wall -= 3600
    assert t.state() is ClockState.UNTRUSTED


def test_unreadable_last_sync_starts_untrusted(tmp_path: Path) -> None:
    path = tmp_path / "clock.json"
    path.write_text("{not json")
    c = _Clocks(1_790_000_000.0)
    t = _trust(c, path)
    assert t.state() is ClockState.UNTRUSTED and t.floor_s() == 0.0
    path.write_text(json.dumps({"wall_ns": 1, "mono_ns": "x", "boot_id": "boot-a"}))
    assert _trust(c, path).floor_s() == 0.0


class _RefusingLibc:
    """adjtimex(2) as a seccomp filter answers it under systemd's ProtectClock=: -1, EPERM."""

    def __init__(self) -> None:
        self.calls = 0

    def adjtimex(self, tx: object) -> int:
        self.calls += 1
        ctypes.set_errno(errno.EPERM)
        return -1


def test_kernel_clock_falls_back_to_timesyncd_flag_when_adjtimex_is_refused(
    tmp_path: Path,
) -> None:
    libc = _RefusingLibc()
    flag = tmp_path / "synchronized"
    probe = KernelClock(flag, libc=libc)  # type: ignore[arg-type]
    assert probe() is False
    flag.touch()
    assert probe() is True
    assert libc.calls == 2
