"""Fixtures for the tests that talk to a real mosquitto or start threads and processes."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from firmware.demo.broker import find_mosquitto
from firmware.exceptions import BrokerError

LEAK_WAIT_S = 30.0
"""How long threads and children a test started may take to end after it, seconds."""


@pytest.fixture
def need_mosquitto() -> None:
    """Skip without a mosquitto binary, except in CI, where it must be there (``make test``
    installs it)."""
    try:
        find_mosquitto()
    except BrokerError as e:
        if os.environ.get("CI"):
            pytest.fail(f"mosquitto is missing in CI: {e}")
        pytest.skip(str(e))


def child_pids() -> set[int]:
    """This process's children, from /proc."""
    pids: set[int] = set()
    for f in Path("/proc/self/task").glob("*/children"):
        pids.update(int(x) for x in f.read_text().split())
    return pids


@pytest.fixture
def no_leaks() -> Iterator[None]:
    """Every thread and child process the test starts is gone when it ends (request it first,
    or through ``pytestmark``, so it is torn down after the test's own fixtures)."""
    threads, children = set(threading.enumerate()), child_pids()
    yield
    deadline = time.monotonic() + LEAK_WAIT_S
    for t in set(threading.enumerate()) - threads:
        t.join(max(0.0, deadline - time.monotonic()))
    left = [t.name for t in set(threading.enumerate()) - threads if t.is_alive()]
    assert not left, f"threads left running: {left}"
    assert child_pids() <= children, f"child processes left: {child_pids() - children}"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    """Cleanups in reverse order, also when a test fails: readers, back offices, brokers."""
    with ExitStack() as s:
        yield s
