"""What the reader tells the back office about itself: the retained status (birth and last
will), the last verdict, periodic telemetry, and Home Assistant discovery.

Payload shapes follow :mod:`firmware.uplink.topics`. Everything here is built on the uplink
worker thread, except :meth:`ReaderState.scan` and :meth:`ReaderState.camera_event`, which the
scan and capture threads call: they only store a few values under a lock.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.metrics import PipelineMetrics
from firmware.pipeline import ScanReport
from firmware.uplink.topics import Topics, dumps, ha_discovery_topic, ha_node

THERMAL_ZONE = Path("/sys/class/thermal/thermal_zone0/temp")

CAMERA_STATES = {
    "camera_stalled": "stalled",
    "camera_error": "error",
    "camera_unavailable": "unavailable",
    "camera_recovered": "ok",
}
"""Camera incident code -> the ``camera`` field of the status."""


class ReaderState:
    """The parts of the reader's state the status reports, updated by the reader's threads.

    ``door``: the door name. ``clock_synced``: the cached, non-blocking clock check.
    ``camera``: "starting" until :meth:`camera_ok`, then "ok", "stalled" or "error".
    Thread-safe; every method returns at once.
    """

    def __init__(self, *, door: str, clock_synced: Callable[[], bool]) -> None:
        self.door = door
        self.clock_synced = clock_synced
        self._lock = threading.Lock()
        self._camera = "starting"
        self._camera_gen = 0
        self._last_scan_wall_ns: int | None = None
        self._verdict: dict[str, Any] | None = None
        self._verdict_gen = 0
        self._config: dict[str, Any] | None = None
        self._credentials: dict[str, Any] | None = None

    def scan(self, report: ScanReport) -> None:
        """A decided scan (the scan thread, after feedback)."""
        wall = time.time_ns()
        verdict = {
            "seq": report.receipt.seq,
            "event_id": report.receipt.event_id,
            "decision": "granted" if report.decision.granted else "denied",
            "reason": str(report.decision.reason),
            "credential_kind": report.decision.kind,
            "door": self.door,
            "wall_ns": wall,
            "clock_synced": bool(self.clock_synced()),
        }
        with self._lock:
            self._last_scan_wall_ns = wall
            self._verdict = verdict
            self._verdict_gen += 1

    def camera_ok(self) -> None:
        """The camera opened (the reader's start)."""
        self._set_camera("ok")

    def camera_event(self, code: str) -> None:
        """A camera incident code ("camera_stalled", "camera_error", "camera_unavailable",
        "camera_recovered"); other codes are ignored."""
        state = CAMERA_STATES.get(code)
        if state is not None:
            self._set_camera(state)

    def _set_camera(self, state: str) -> None:
        with self._lock:
            if state != self._camera:
                self._camera = state
                self._camera_gen += 1

    @property
    def camera(self) -> str:
        """ "starting", "ok", "stalled", "error" or "unavailable"."""
        with self._lock:
            return self._camera

    @property
    def camera_generation(self) -> int:
        """Grows with every camera state change (the uplink republishes the status then)."""
        with self._lock:
            return self._camera_gen

    @property
    def last_scan_wall_ns(self) -> int | None:
        """Wall-clock ns of the newest decided scan, None before the first."""
        with self._lock:
            return self._last_scan_wall_ns

    def config_outcome(self, outcome: dict[str, Any]) -> None:
        """The desired configuration's outcome (see :mod:`firmware.uplink.desired`)."""
        with self._lock:
            self._config = dict(outcome)

    @property
    def config(self) -> dict[str, Any] | None:
        """The last desired-configuration outcome, None before any."""
        with self._lock:
            return self._config

    def credentials_outcome(self, outcome: dict[str, Any]) -> None:
        """The credential snapshot's status (see :mod:`firmware.uplink.credentials`)."""
        with self._lock:
            self._credentials = dict(outcome)

    @property
    def credentials(self) -> dict[str, Any] | None:
        """The last credential snapshot status, None when the reader has no snapshot sync."""
        with self._lock:
            return self._credentials

    def verdict(self) -> tuple[int, dict[str, Any] | None]:
        """(generation, the newest verdict payload or None); the generation grows per scan."""
        with self._lock:
            return self._verdict_gen, self._verdict


@dataclass(frozen=True, slots=True)
class Identity:
    """Who is talking: ``device`` id, ``site``, ``door``, firmware ``version``, ``boot_id``."""

    device: str
    site: str
    door: str
    version: str
    boot_id: str


def offline_status(ident: Identity) -> dict[str, Any]:
    """The last will and the clean-stop status: ``{"online": false, ...}``."""
    return {
        "online": False,
        "device": ident.device,
        "site": ident.site,
        "door": ident.door,
        "boot_id": ident.boot_id,
    }


def birth_status(
    ident: Identity, state: ReaderState, *, backlog: int | None, uplink: dict[str, int]
) -> dict[str, Any]:
    """The retained status published on every connect (and on change, and on request).

    ``backlog``: unpublished journal rows (None when the journal cannot be read).
    ``uplink``: counters (see :mod:`firmware.uplink.topics`). ``credentials``: the credential
    snapshot's status (:mod:`firmware.uplink.credentials`), present when the reader takes
    snapshots.
    """
    status: dict[str, Any] = {
        "online": True,
        "device": ident.device,
        "site": ident.site,
        "door": ident.door,
        "version": ident.version,
        "boot_id": ident.boot_id,
        "backlog": backlog,
        "clock_synced": bool(state.clock_synced()),
        "camera": state.camera,
        "last_scan_wall_ns": state.last_scan_wall_ns,
        "config": state.config,
        "wall_ns": time.time_ns(),
        "uplink": uplink,
    }
    credentials = state.credentials
    if credentials is not None:
        status["credentials"] = credentials
    return status


def status_payload(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON (the contract's encoding)."""
    return dumps(obj)


class Telemetry:
    """Samples for the ``telemetry`` topic.

    ``metrics``: the scan loop's counters (None: no pipeline, fields are null).
    ``frames_dropped``: frames the queue dropped so far. ``state_dir``: its file system's free
    space is reported. ``thermal``: a sysfs temperature file in millidegrees Celsius (absent
    off a Pi: null). ``clock``: monotonic seconds; ``cpu_times``: ``os.times``-like.
    """

    def __init__(
        self,
        *,
        metrics: PipelineMetrics | None,
        frames_dropped: Callable[[], int],
        state_dir: Path,
        thermal: Path = THERMAL_ZONE,
        clock: Callable[[], float] = time.monotonic,
        cpu_times: Callable[[], os.times_result] = os.times,
    ) -> None:
        self.metrics = metrics
        self.frames_dropped = frames_dropped
        self.state_dir = state_dir
        self.thermal = thermal
        self._clock, self._cpu_times = clock, cpu_times
        self._last_t = clock()
        self._last_cpu = self._cpu()
        self._last_frames = metrics.frames if metrics else 0

    def _cpu(self) -> float:
        t = self._cpu_times()
        return float(t.user + t.system)

    def sample(self) -> dict[str, Any]:
        """One telemetry payload; rates cover the time since the previous sample.

        ``fps``: frames handled per second. ``decode_ms_p50``/``_p99``: ms over the recent
        decodes (null before any). ``frames_decoded``/``frames_dropped``: totals.
        ``cpu_percent``: this process, percent of one core. ``temperature_c``: SoC
        temperature, null when unknown. ``disk_free_bytes``: free bytes where the journal
        lives, null when unknown.
        """
        now, cpu = self._clock(), self._cpu()
        dt = max(now - self._last_t, 1e-6)
        m = self.metrics
        frames = m.frames if m else 0
        out: dict[str, Any] = {
            "wall_ns": time.time_ns(),
            "fps": round((frames - self._last_frames) / dt, 2) if m else None,
            "decode_ms_p50": _round(m.decode_ms.percentile(50)) if m else None,
            "decode_ms_p99": _round(m.decode_ms.percentile(99)) if m else None,
            "frames_decoded": m.decoded_frames if m else None,
            "frames_dropped": int(self.frames_dropped()),
            "cpu_percent": round(100.0 * (cpu - self._last_cpu) / dt, 1),
            "temperature_c": self._temperature(),
            "disk_free_bytes": self._disk_free(),
        }
        self._last_t, self._last_cpu, self._last_frames = now, cpu, frames
        return out

    def _temperature(self) -> float | None:
        try:
            return round(int(self.thermal.read_text().strip()) / 1000.0, 1)
        except (OSError, ValueError):
            return None

    def _disk_free(self) -> int | None:
        try:
            return int(shutil.disk_usage(self.state_dir).free)
        except OSError:
            return None


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


def ha_discovery(topics: Topics, ident: Identity) -> list[tuple[str, bytes]]:
    """Home Assistant MQTT discovery messages (topic, payload), to publish retained: an
    ``online`` connectivity binary sensor fed by ``status``, a ``last_verdict`` sensor fed by
    ``last_verdict``, and an ``unlock`` button that publishes to ``cmd/unlock``."""
    node = ha_node(ident.device)
    device = {
        "identifiers": [node],
        "name": f"qrgate {ident.door}",
        "manufacturer": "qrgate",
        "model": "QR door reader",
        "sw_version": ident.version,
        "serial_number": ident.device,
    }
    availability = {
        "topic": topics.status,
        "value_template": "{{ 'online' if value_json.online else 'offline' }}",
    }
    online = {
        "name": "Online",
        "unique_id": f"{node}_online",
        "object_id": f"{node}_online",
        "state_topic": topics.status,
        "value_template": "{{ 'ON' if value_json.online else 'OFF' }}",
        "payload_on": "ON",
        "payload_off": "OFF",
        "device_class": "connectivity",
        "entity_category": "diagnostic",
        "device": device,
    }
    verdict = {
        "name": "Last verdict",
        "unique_id": f"{node}_last_verdict",
        "object_id": f"{node}_last_verdict",
        "state_topic": topics.last_verdict,
        "value_template": "{{ value_json.decision }}",
        "json_attributes_topic": topics.last_verdict,
        "icon": "mdi:door",
        "availability": [availability],
        "device": device,
    }
    unlock = {
        "name": "Unlock",
        "unique_id": f"{node}_unlock",
        "object_id": f"{node}_unlock",
        "command_topic": topics.command("unlock"),
        "payload_press": dumps({"request_id": "homeassistant", "args": {}}).decode("utf-8"),
        "qos": 1,
        "icon": "mdi:door-open",
        "availability": [availability],
        "device": device,
    }
    return [
        (ha_discovery_topic("binary_sensor", node, "online"), dumps(online)),
        (ha_discovery_topic("sensor", node, "last_verdict"), dumps(verdict)),
        (ha_discovery_topic("button", node, "unlock"), dumps(unlock)),
    ]
