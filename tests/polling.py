"""Waiting in tests for state that no event announces (a writer thread's counters, mock pin
levels driven by gpiozero's blink threads, state spread over several workers)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` every 5 ms until it holds (True) or ``timeout_s`` passes (False,
    after one last look)."""
    end = time.monotonic() + timeout_s
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > end:
            return bool(predicate())
        pause.wait(0.005)
    return True
