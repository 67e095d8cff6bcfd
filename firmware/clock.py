"""Is the wall clock trustworthy? A Pi has no RTC and steps its clock when NTP syncs."""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

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


class KernelClock:
    """Asks the kernel whether NTP has synchronised the clock (adjtimex(2), a read-only call
    of about a microsecond). libc is located once here: ``ctypes.util.find_library`` runs
    a subprocess, which must never happen on the scan path."""

    def __init__(self) -> None:
        try:
            self._libc: ctypes.CDLL | None = ctypes.CDLL(
                ctypes.util.find_library("c") or "libc.so.6", use_errno=True
            )
        except OSError:
            self._libc = None

    def __call__(self) -> bool:
        """True when synchronised; False when not, or when it cannot be asked."""
        if self._libc is None:
            return False
        tx = _Timex()
        try:
            state = self._libc.adjtimex(ctypes.byref(tx))
        except AttributeError:
            return False
        return bool(state not in (-1, _TIME_ERROR) and not (tx.status & _STA_UNSYNC))


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
