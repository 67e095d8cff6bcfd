"""Identities for journal events: UUIDv7 event ids and the boot id.

``uuid7()`` orders ids by creation time within one process (RFC 9562 §6.2, method 1: a
counter in the bits after the millisecond timestamp). Across restarts ids are only as ordered
as the wall clock, which on a Pi without RTC can step: order events by ``seq``, never by id.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

_BOOT_ID_PATH = Path("/proc/sys/kernel/random/boot_id")

# 42 counter bits: the 12 of rand_a plus the top 30 of rand_b. Each new millisecond seeds
# the counter at random with its top bit clear, so a burst of 2**41 ids in one millisecond
# still fits before the counter has to borrow the next millisecond.
_COUNTER_BITS = 42
_COUNTER_MAX = (1 << _COUNTER_BITS) - 1
_SEED_BITS = _COUNTER_BITS - 1
_TAIL_BITS = 32


class Uuid7Generator:
    """UUIDv7 text ids, strictly increasing for this generator (thread-safe).

    ``clock_ns``: wall clock in ns since the epoch. If it steps back, the generator keeps the
    last timestamp and counts on, so ids never go backwards.
    """

    def __init__(self, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._ms = -1
        self._counter = 0

    def __call__(self) -> str:
        """A new id, e.g. ``"0190a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b"``."""
        rnd = int.from_bytes(os.urandom(10), "big")  # 80 bits: 41 seed bits, 32 tail bits
        seed, tail = rnd >> (80 - _SEED_BITS), rnd & ((1 << _TAIL_BITS) - 1)
        with self._lock:
            now_ms = self._clock_ns() // 1_000_000
            if now_ms > self._ms:
                self._ms = now_ms
                self._counter = seed
            elif self._counter < _COUNTER_MAX:
                self._counter += 1
            else:
                self._ms += 1
                self._counter = seed
            ms, counter = self._ms, self._counter
        ms &= (1 << 48) - 1
        rand_a = counter >> 30
        rand_b = ((counter & ((1 << 30) - 1)) << _TAIL_BITS) | tail
        value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
        return str(uuid.UUID(int=value))


# One generator per process: monotonicity is promised across every caller in the process.
_default_generator = Uuid7Generator()


def uuid7() -> str:
    """A UUIDv7 (RFC 9562) as 36-character lowercase text, strictly increasing in this process."""
    return _default_generator()


_fallback_boot_id: str | None = None
_fallback_lock = threading.Lock()


def boot_id(path: Path = _BOOT_ID_PATH) -> str:
    """This boot's id: the kernel's ``boot_id`` (36-character UUID text).

    Where the kernel has none (not Linux, a sandbox), a random uuid4 made once per process:
    events then still tell restarts apart, though not reboots.
    """
    global _fallback_boot_id  # noqa: PLW0603 - one fallback per process is the contract
    try:
        text = path.read_text(encoding="ascii").strip()
        return str(uuid.UUID(text))
    except (OSError, ValueError):
        pass
    with _fallback_lock:
        if _fallback_boot_id is None:
            _fallback_boot_id = str(uuid.uuid4())
        return _fallback_boot_id
