"""Is the wall clock trustworthy? A Pi has no RTC and steps its clock when NTP syncs."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from enum import StrEnum
from pathlib import Path

log = logging.getLogger(__name__)

_TIME_ERROR = 5  # adjtimex(2): clock not synchronised
_STA_UNSYNC = 0x0040


class _Timex(ctypes.Structure):
    # struct timex from <sys/timex.h> (Linux, 64-bit longs); only `status` is read, the rest
    # is padding big enough for the kernel to write into.
    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("_rest", ctypes.c_byte * 256),
    ]


TIMESYNC_FLAG = Path("/run/systemd/timesync/synchronized")
"""Touched by systemd-timesyncd once it synchronised the clock (systemd >= 239)."""


class KernelClock:
    """Asks the kernel whether NTP has synchronised the clock (adjtimex(2), a read-only call
    of about a microsecond); where a seccomp filter refuses adjtimex (systemd's
    ProtectClock=), systemd-timesyncd's flag file ``flag`` answers instead. libc is located
    once here: ``ctypes.util.find_library`` runs a subprocess, which must never happen on the
    scan path."""

    def __init__(self, flag: Path = TIMESYNC_FLAG, libc: ctypes.CDLL | None = None) -> None:
        self._flag = flag
        self._libc: ctypes.CDLL | None = libc
        if libc is None:
            try:
                self._libc = ctypes.CDLL(
                    ctypes.util.find_library("c") or "libc.so.6", use_errno=True
                )
            except OSError:
                self._libc = None

    def __call__(self) -> bool:
        """True when synchronised; False when not, or when neither the kernel nor the flag
        file can tell."""
        if self._libc is None:
            return self._flag.exists()
        tx = _Timex()
        try:
            state = self._libc.adjtimex(ctypes.byref(tx))
        except AttributeError:
            return self._flag.exists()
        if state == -1:
            return self._flag.exists()
        return bool(state != _TIME_ERROR and not (tx.status & _STA_UNSYNC))


class ClockStatus:
    """Caches ``probe()`` for ``ttl_s`` seconds (monotonic), so the scan path never waits."""

    def __init__(
        self,
        probe: Callable[[], bool] | None = None,
        ttl_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe or KernelClock()
        self._ttl, self._mono = ttl_s, monotonic
        self._value = self._probe()
        self._at = monotonic()

    def synced(self) -> bool:
        """The cached synced state; re-probed when older than the TTL."""
        now = self._mono()
        if now - self._at > self._ttl:
            self._value, self._at = self._probe(), now
        return self._value


class ClockState(StrEnum):
    """How far the wall clock can be trusted right now (stable strings: status and events).

    ``synced``: the kernel says NTP keeps it in step. ``holdover``: not synced now, but it was
    earlier in this boot, less than the holdover period ago, and has not stepped since (a
    quartz crystal drifts seconds a day, not hours). ``untrusted``: never synced since boot
    (a Pi without RTC restarts from its last saved time), synced too long ago, or stepped
    since its last sync.
    """

    SYNCED = "synced"
    HOLDOVER = "holdover"
    UNTRUSTED = "untrusted"


# A step larger than this between the wall and the monotonic clock since the last sync means
# someone (or a bad NTP source) set the clock: holdover ends.
_STEP_TOLERANCE_S = 5.0
_DRIFT_PPM = 200.0
# The last-sync record is rewritten at most this often while synced (SD cards wear).
_PERSIST_EVERY_S = 600.0


class ClockTrust:
    """The clock's trust state, cached for ``ttl_s`` so the scan path never waits.

    ``probe``: is the kernel clock synchronised now (default :class:`KernelClock`).
    ``state_file``: where the last sync is persisted (JSON ``{"wall_ns", "mono_ns",
    "boot_id"}``; None keeps it in memory only). ``boot_id``: this boot's id (a record from
    another boot gives no holdover, only a floor). ``holdover_s``: how long after the last sync
    the clock is still trusted. ``floor_s()`` is a lower bound for the true time: the newest
    wall time ever seen while synced (persisted), so an unsynced clock that reads earlier is
    known to be behind, and a pass that expired before the floor is known to be expired.
    ``read_only``: read the record, never write it (tools that inspect a reader's view).
    """

    def __init__(
        self,
        probe: Callable[[], bool] | None = None,
        *,
        state_file: Path | None = None,
        boot_id: str = "",
        holdover_s: float = 24 * 3600.0,
        ttl_s: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        read_only: bool = False,
    ) -> None:
        self._probe = probe or KernelClock()
        self._file, self._boot = state_file, boot_id
        self._read_only = read_only
        self._holdover, self._ttl = holdover_s, ttl_s
        self._mono, self._wall = monotonic, wall
        self._lock = threading.Lock()
        # last synced observation: (wall_s, mono_s, boot_id)
        self._last: tuple[float, float, str] | None = self._load()
        self._floor = self._last[0] if self._last else 0.0
        self._persisted_mono = -math.inf
        self._state = ClockState.UNTRUSTED
        self._at = -math.inf
        self.state()

    def _load(self) -> tuple[float, float, str] | None:
        if self._file is None:
            return None
        try:
            doc = json.loads(self._file.read_text(encoding="utf-8"))
            wall_s, mono_s = int(doc["wall_ns"]) / 1e9, int(doc["mono_ns"]) / 1e9
            boot = str(doc["boot_id"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError) as e:
            log.warning("%s: last clock sync unreadable (%s); clock untrusted", self._file, e)
            return None
        if not (math.isfinite(wall_s) and math.isfinite(mono_s)):
            return None
        return wall_s, mono_s, boot

    def _persist(self, wall_s: float, mono_s: float) -> None:
        if (
            self._file is None
            or self._read_only
            or mono_s - self._persisted_mono < _PERSIST_EVERY_S
        ):
            return
        self._persisted_mono = mono_s
        doc = {"wall_ns": int(wall_s * 1e9), "mono_ns": int(mono_s * 1e9), "boot_id": self._boot}
        tmp = self._file.with_name(self._file.name + ".tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(doc, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._file)
        except OSError as e:
            # only the floor after a reboot is lost; the clock state this boot is unaffected
            log.warning("%s: cannot persist the last clock sync: %s", self._file, e)

    def _evaluate(self, wall_s: float, mono_s: float) -> ClockState:
        if self._probe():
            self._last = (wall_s, mono_s, self._boot)
            self._floor = max(self._floor, wall_s)
            self._persist(wall_s, mono_s)
            return ClockState.SYNCED
        last = self._last
        if last is None or last[2] != self._boot or wall_s < self._floor:
            return ClockState.UNTRUSTED
        elapsed = mono_s - last[1]
        if not 0 <= elapsed <= self._holdover:
            return ClockState.UNTRUSTED
        stepped = abs((wall_s - last[0]) - elapsed)
        if stepped > _STEP_TOLERANCE_S + elapsed * _DRIFT_PPM / 1e6:
            return ClockState.UNTRUSTED
        return ClockState.HOLDOVER

    def state(self) -> ClockState:
        """The cached state; re-evaluated when older than the TTL (monotonic)."""
        now = self._mono()
        if now - self._at >= self._ttl:
            with self._lock:
                if now - self._at >= self._ttl:
                    self._state, self._at = self._evaluate(self._wall(), now), now
        return self._state

    def synced(self) -> bool:
        """True when the wall clock can be used for time checks (synced or holdover)."""
        return self.state() is not ClockState.UNTRUSTED

    def floor_s(self) -> float:
        """A lower bound for the true time, seconds since the epoch (0.0 when never synced)."""
        return self._floor
