"""Shared by every driver test: no thread outlives a test, and gpiozero's global pin
factory is never set (every device gets its factory passed in)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from gpiozero import Device


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert [t for t in threading.enumerate() if t not in before] == []
    assert Device.pin_factory is None
