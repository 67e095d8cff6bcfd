"""The daemon's door-activity file, read by the updater to restart the reader only at a
door-idle moment (``ota.health.ActivityFile``).

Contents (UTF-8 JSON, one object)::

    {"last_scan_mono_ns": int | null, "relay_until_mono_ns": int | null}

``last_scan_mono_ns``: ``CLOCK_MONOTONIC`` (system-wide, so another process can compare it
with its own ``time.monotonic_ns()``) of the last decided scan, granted or denied;
``relay_until_mono_ns``: when the longest relay pulse started so far ends (scan grants, the
exit button, remote unlocks). null: none since the daemon started.

The file lives on tmpfs (``/run/qrgate``, the unit's RuntimeDirectory), so it is written
with a temp file and ``os.replace`` but without fsync: after a power cut there is no door
activity to protect. Writes happen after the verdict and the feedback, on the thread that
made them, and take tens of microseconds; a failure (folder missing, disk full) is logged once
per failure streak and otherwise ignored: the door never waits for, or fails because of, this
file.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class ActivityWriter:
    """Keeps ``path`` up to date. ``pulse_s()``: the relay's default unlock time in seconds
    (read at each grant: the back office can change it). ``clock``: monotonic ns (tests).
    Thread-safe: the scan thread, the door monitor and the uplink worker all call it."""

    def __init__(
        self,
        path: Path,
        *,
        pulse_s: Callable[[], float],
        clock: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.path = path
        self._pulse_s = pulse_s
        self._clock = clock
        self._tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        self._lock = threading.Lock()
        self._last_scan: int | None = None
        self._relay_until: int | None = None
        self._failing = False
        self.failures = 0
        """Writes that failed since start."""

    def on_scan(self, report: Any) -> None:
        """A scan listener (``firmware.pipeline.ScanReport``): the scan was decided and its
        feedback given; a grant's relay pulse started ``frame_to_relay_ms`` after the frame."""
        now = self._clock()
        until = None
        if report.decision.granted and report.frame_to_relay_ms is not None:
            started = report.frame.t_ns + round(report.frame_to_relay_ms * 1e6)
            until = started + round(self._pulse_s() * 1e9)
        self._update(scan=now, relay_until=until)

    def on_pulse(self, started_ns: int, seconds: float | None) -> None:
        """A relay pulse not caused by a scan (exit button, remote unlock) started at
        ``started_ns`` (monotonic) for ``seconds`` (None: the relay's default). A failed
        pulse (``started_ns`` < 0) is not recorded."""
        if started_ns < 0:
            return
        duration = self._pulse_s() if seconds is None else seconds
        self._update(scan=None, relay_until=started_ns + round(duration * 1e9))

    def _update(self, *, scan: int | None, relay_until: int | None) -> None:
        with self._lock:
            if scan is not None:
                self._last_scan = scan
            if relay_until is not None and (
                self._relay_until is None or relay_until > self._relay_until
            ):
                self._relay_until = relay_until
            data = json.dumps(
                {"last_scan_mono_ns": self._last_scan, "relay_until_mono_ns": self._relay_until}
            ).encode()
            try:
                with open(self._tmp, "wb") as f:
                    f.write(data)
                os.replace(self._tmp, self.path)
            except OSError as e:
                self.failures += 1
                if not self._failing:
                    self._failing = True
                    log.warning(
                        "door activity file %s not written (%s): the updater may restart the"
                        " reader while the door is in use; further failures are not logged",
                        self.path,
                        e,
                    )
            else:
                if self._failing:
                    self._failing = False
                    log.info("door activity file %s written again", self.path)


class ActivityDoor:
    """A ``firmware.uplink.commands.Door`` (the feedback's ``granted``) that also records
    the pulse in the activity file: remote unlocks go through it."""

    def __init__(self, door: Any, activity: ActivityWriter) -> None:
        self._door = door
        self._activity = activity

    def granted(self, pulse_s: float | None = None) -> int:
        """Unlock through the wrapped door, then record the pulse; its return value."""
        t_ns: int = self._door.granted(pulse_s)
        self._activity.on_pulse(t_ns, pulse_s)
        return t_ns
