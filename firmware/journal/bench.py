"""Journal figures for the benchmark: how many scans per second one caller can journal, and
how long one append takes at a door's pace."""

from __future__ import annotations

import logging
import math
import threading
import time
from pathlib import Path

from firmware.journal.events import NewEvent
from firmware.journal.store import Journal

log = logging.getLogger(__name__)


def sample_event(i: int) -> NewEvent:
    """A realistic granted scan (one badge code in view, keyed subject, timings); ``i`` varies
    the subject so rows are not identical."""
    subject = f"{i:016x}" * 4  # 64 hex digits, like an HMAC-SHA256
    return NewEvent(
        kind="scan",
        wall_ns=time.time_ns(),
        clock_synced=True,
        mono_ns=time.monotonic_ns(),
        door="front",
        direction="in",
        decision="granted",
        reason="granted",
        credential_kind="badge",
        subject=subject,
        codes=(
            {
                "subject": subject,
                "kind": "badge",
                "reason": "granted",
                "length": 24,
                "backend": "zxing",
            },
        ),
        decode_ms=4.2,
        verdict_ms=0.05,
    )


def append_rate(path: Path, seconds: float = 2.0) -> float:
    """Appends per second (float) that one caller achieves for ``seconds`` seconds.

    Opens a journal at ``path`` (a new or existing ``.db`` file) with the default settings
    (group fsync every 100 ms, 50 ms append deadline), appends realistic scan events one after
    another, each waiting for its commit, and closes it. Appends that missed the deadline and
    spilled still count (they returned); they are logged. Raises JournalError when the journal
    cannot be opened.
    """
    with Journal(Path(path), boot_id="bench") as journal:
        n = 0
        not_committed = 0
        start = time.perf_counter()
        end = start + seconds
        while True:
            receipt = journal.append(sample_event(n))
            n += 1
            if receipt.durability != "committed":
                not_committed += 1
            now = time.perf_counter()
            if now >= end:
                break
        elapsed = now - start
    if not_committed:
        log.warning("append_rate: %d of %d appends were not committed in time", not_committed, n)
    return n / elapsed


# Appends before the measured ones: the first commits of a fresh file allocate its first
# pages and warm SQLite's caches, which a long-running reader paid once at boot.
LATENCY_WARMUP = 10


def append_latency(path: Path, n: int = 300, interval_s: float = 0.02) -> dict[str, float]:
    """How long one append takes at a door's pace: ``n`` appends ``interval_s`` apart.

    Opens a journal at ``path`` with the default settings and does what the scan thread does
    for each scan, on a fixed schedule with the caller idle in between: build the event,
    append it (timed), then ``update_timing`` for it, so the writer's work for one scan runs
    between two appends as it does in the daemon. ``LATENCY_WARMUP`` scans go first,
    unmeasured. Returns ``p50_ms``, ``p99_ms``, ``max_ms`` (nearest-rank percentiles of the
    append calls, milliseconds), ``n`` and ``not_committed`` (appends that spilled or were
    lost). Raises JournalError when the journal cannot be opened and ValueError when ``n`` < 1.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    took: list[float] = []
    not_committed = 0
    pause = threading.Event()
    with Journal(Path(path), boot_id="bench") as journal:
        for i in range(LATENCY_WARMUP):
            receipt = journal.append(sample_event(i))
            journal.update_timing(receipt.seq, 5.0)
        start = time.perf_counter()
        for i in range(n):
            pause.wait(max(0.0, start + i * interval_s - time.perf_counter()))
            event = sample_event(LATENCY_WARMUP + i)
            t0 = time.perf_counter()
            receipt = journal.append(event)
            t1 = time.perf_counter()
            journal.update_timing(receipt.seq, 5.0)
            took.append(t1 - t0)
            if receipt.durability != "committed":
                not_committed += 1
    if not_committed:
        log.warning("append_latency: %d of %d appends were not committed", not_committed, n)
    took.sort()
    return {
        "p50_ms": _rank(took, 0.50) * 1000.0,
        "p99_ms": _rank(took, 0.99) * 1000.0,
        "max_ms": took[-1] * 1000.0,
        "n": n,
        "not_committed": not_committed,
    }


def _rank(ordered: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile of the sorted, non-empty ``ordered``."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
