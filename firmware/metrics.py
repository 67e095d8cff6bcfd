"""Counters and latency percentiles with bounded memory (a ring of recent samples)."""

from __future__ import annotations

import threading

import numpy as np


class Latency:
    """The last ``capacity`` samples of a duration, milliseconds. Thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        self._buf = np.zeros(capacity, dtype=np.float64)
        self._n = 0
        self._lock = threading.Lock()

    def add(self, ms: float) -> None:
        """Record one duration in milliseconds."""
        with self._lock:
            self._buf[self._n % len(self._buf)] = ms
            self._n += 1

    @property
    def count(self) -> int:
        """Samples recorded in all (not only those kept)."""
        return self._n

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the kept samples, ms; None when empty."""
        with self._lock:
            n = min(self._n, len(self._buf))
            if n == 0:
                return None
            return float(np.percentile(self._buf[:n], q))


class PipelineMetrics:
    """What the scan loop counts; read by the demo view, telemetry and the benchmark."""

    def __init__(self) -> None:
        self.frames = 0
        self.decoded_frames = 0
        self.skipped_idle = 0
        self.codes = 0
        self.decisions = 0
        self.granted = 0
        self.denied = 0
        self.suppressed = 0
        self.errors = 0
        self.relay_failures = 0
        self.decode_ms = Latency()
        self.frame_to_relay_ms = Latency()
        self.frame_to_decision_ms = Latency()
