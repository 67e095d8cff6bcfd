"""Is the reader alive? Camera health and the service manager's watchdog.

Two questions, answered from the loops' own progress rather than from a timer thread:

- :class:`CameraHealth`: is the camera delivering? A read that fails, a camera that cannot
  be opened, or no frame for ``stall_s`` (a read that never returns: libcamera can hang
  inside a capture) is one incident, reported once per outage; the first frame after it is
  one ``camera_recovered``.
- :class:`Supervisor`: the daemon's main-thread loop. It tells the service manager READY=1
  once the camera, GPIO and journal are up, keeps STATUS= readable, and sends WATCHDOG=1
  only while the scan loop makes progress: frames flow, or the capture loop is inside a
  recovery step it promised to finish in time. A hung capture or scan thread stops the
  pings, and systemd restarts the reader (a libcamera hang is only cured by a new process).
"""

from __future__ import annotations

import enum
import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

_NS = 1_000_000_000


class CameraState(enum.Enum):
    """``starting``: not opened yet; ``ok``: frames flow; ``stalled``: no frame for too long or
    a read failed; ``missing``: the camera cannot be opened (busy, unplugged)."""

    STARTING = "starting"
    OK = "ok"
    STALLED = "stalled"
    MISSING = "missing"


IncidentSink = Callable[[str, dict[str, object]], None]


class CameraHealth:
    """The camera's state, fed by the capture thread and checked by the supervisor.

    ``on_incident(code, detail)`` is called once per transition: ``camera_stalled``,
    ``camera_error`` or ``camera_unavailable`` when an outage starts, ``camera_recovered``
    (detail ``down_s``) on the first frame after it. ``stall_s``: seconds without a frame
    that count as a stall. ``max_fruitless``: re-opens that succeeded but delivered no frame
    before the next failure, after which recovery no longer counts as progress (a camera that
    opens and then never delivers is libcamera hung in a way only a new process cures; a
    camera that cannot be opened at all, busy or unplugged, is retried for as long as it
    takes). Times are ``monotonic_ns``. Thread-safe; :meth:`frame` costs one clock read and
    one comparison on the capture thread.
    """

    def __init__(
        self,
        on_incident: IncidentSink,
        *,
        stall_s: float,
        max_fruitless: int = 3,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.on_incident = on_incident
        self.stall_ns = int(stall_s * _NS)
        self.max_fruitless = max_fruitless
        self.fruitless = 0  # re-opens since the last frame that were followed by a failure
        self._reopened = False
        self.delivering = threading.Event()
        """Set on the first frame: what READY=1 waits for."""
        self._now = monotonic_ns
        self._lock = threading.Lock()
        self.state = CameraState.STARTING
        self.last_frame_ns = monotonic_ns()  # real frames only: what "frames flow" means
        self._stall_from_ns = self.last_frame_ns  # a new camera restarts the stall clock
        self.down_since_ns: int | None = None
        self.last_error = ""
        self.opened = threading.Event()
        self._promise_ns: int | None = None

    def frame(self) -> None:
        """The capture thread delivered a frame."""
        now = self._now()
        self.last_frame_ns = self._stall_from_ns = now
        self._reopened = False
        if self.state is not CameraState.OK:
            self._to_ok(now)

    def camera_opened(self) -> None:
        """The camera was opened (at start or by a recovery)."""
        self._promise_ns = None
        self._reopened = True
        self._stall_from_ns = self._now()
        self.opened.set()

    def failed(self, code: str, error: str) -> None:
        """A read or an open failed: ``code`` is ``camera_stalled``, ``camera_error`` or
        ``camera_unavailable``; ``error`` the driver's message."""
        state = CameraState.MISSING if code == "camera_unavailable" else CameraState.STALLED
        if state is CameraState.STALLED and self._reopened:
            self.fruitless += 1
        self._reopened = False
        self._to_down(state, code, {"error": error[:200]})

    def recovering(self, within_s: float) -> None:
        """The capture thread promises its next recovery step (a backoff wait and one open
        attempt) within ``within_s`` seconds; until then it counts as alive."""
        self._promise_ns = self._now() + int(within_s * _NS)

    def check(self) -> None:
        """Supervisor: report a stall when no frame came for ``stall_s`` (a read that hangs
        past its own timeout never reports itself)."""
        now = self._now()
        if self.state is CameraState.OK and now - self._stall_from_ns > self.stall_ns:
            self._to_down(
                CameraState.STALLED,
                "camera_stalled",
                {"error": f"no frame for {(now - self._stall_from_ns) / _NS:.1f} s"},
            )

    def recovering_on_time(self) -> bool:
        """True while the capture thread is inside a recovery step it promised to finish, and
        re-opening has not proved fruitless ``max_fruitless`` times in a row."""
        p = self._promise_ns
        if self.fruitless >= self.max_fruitless:
            return False
        return p is not None and self._now() <= p

    def _to_down(self, state: CameraState, code: str, detail: dict[str, object]) -> None:
        with self._lock:
            if self.state in (CameraState.STALLED, CameraState.MISSING):
                self.state = state if state is CameraState.MISSING else self.state
                self.last_error = str(detail.get("error", ""))
                return
            self.state = state
            self.down_since_ns = self._now()
            self.last_error = str(detail.get("error", ""))
        self.on_incident(code, detail)

    def _to_ok(self, now: int) -> None:
        with self._lock:
            if self.state is CameraState.OK:
                return
            was, since = self.state, self.down_since_ns
            self.state, self.down_since_ns, self._promise_ns = CameraState.OK, None, None
            self.last_error = ""
            self.fruitless = 0
        self.delivering.set()
        if was is not CameraState.STARTING and since is not None:
            self.on_incident("camera_recovered", {"down_s": round((now - since) / _NS, 1)})


class Notifier(Protocol):
    """What the supervisor needs of the service manager (``drivers.systemd``)."""

    @property
    def watchdog_interval_s(self) -> float | None:
        """WatchdogSec as the service manager set it, None when off."""
        ...

    def ready(self, status: str) -> None:
        """READY=1 with a STATUS= line."""
        ...

    def status(self, text: str) -> None:
        """A STATUS= line."""
        ...

    def watchdog(self) -> None:
        """WATCHDOG=1."""
        ...

    def extend_timeout(self, seconds: float) -> None:
        """EXTEND_TIMEOUT_USEC=: still starting, give me this much longer."""
        ...

    def stopping(self, status: str) -> None:
        """STOPPING=1 with a STATUS= line."""
        ...


class Progress(Protocol):
    """A loop that stamps ``beat_ns`` (monotonic) each time round, busy or idle."""

    beat_ns: int


class Supervisor:
    """The daemon's main loop once the reader is started: READY, STATUS, WATCHDOG, STOPPING.

    ``stop``: set by a signal or a failed thread; ``health``: the camera; ``scan``: the scan
    loop (its ``beat_ns``); ``describe()``: the STATUS= line while running. ``frame_gap_s``:
    the longest gap between frames that still counts as "frames flow" (default: half the
    watchdog interval, at least 0.5 s). ``tick_s``: how often it looks.
    """

    def __init__(
        self,
        *,
        stop: threading.Event,
        health: CameraHealth,
        scan: Progress,
        notifier: Notifier,
        describe: Callable[[], str],
        frame_gap_s: float | None = None,
        tick_s: float = 0.25,
        status_every_s: float = 5.0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self.stop, self.health, self.scan, self.notifier = stop, health, scan, notifier
        self.describe = describe
        interval = notifier.watchdog_interval_s
        # systemd asks for a ping at least every half interval: every quarter leaves room
        # for a late tick on a loaded CPU
        self.ping_every_ns = int(interval / 4 * _NS) if interval else None
        gap = frame_gap_s if frame_gap_s is not None else max(0.5, (interval or 4.0) / 2)
        self.frame_gap_ns = int(gap * _NS)
        # the scan thread wakes every 0.2 s even with no frames; a decode takes milliseconds
        self.scan_gap_ns = max(self.frame_gap_ns, _NS)
        self.tick_s = min(tick_s, interval / 8) if interval else tick_s
        self.status_every_ns = int(status_every_s * _NS)
        self._now = monotonic_ns
        self.pings = 0
        self.ticks = 0  # times it looked (tests wait on it, not on the wall clock)
        self.ready_sent = False

    def alive(self) -> bool:
        """True when the watchdog may be fed: the scan loop went round recently, and frames
        flow or the capture thread is within a recovery step it promised."""
        now = self._now()
        if now - self.scan.beat_ns > self.scan_gap_ns:
            return False
        if now - self.health.last_frame_ns <= self.frame_gap_ns:
            return True
        return self.health.recovering_on_time()

    def wait_ready(self, extend_s: float = 30.0) -> bool:
        """Block until the camera delivers its first frame; meanwhile keep the service
        manager's start timeout extended and STATUS= saying why we wait. False if a stop came
        first."""
        last_status = ""
        while not self.health.delivering.is_set():
            if self.stop.is_set():
                return False
            text = "waiting for the camera"
            if self.health.last_error:
                text += f": {self.health.last_error}"
            if text != last_status:
                self.notifier.status(text)
                last_status = text
            self.notifier.extend_timeout(extend_s)
            if self.ping_every_ns is not None and self.alive():
                self.notifier.watchdog()
            self.health.delivering.wait(min(1.0, extend_s / 3))
            self.ticks += 1
        return not self.stop.is_set()

    def run(self) -> None:
        """Wait for the camera, send READY=1, then supervise until ``stop`` is set; sends
        STOPPING=1 on the way out."""
        try:
            if not self.wait_ready():
                return
            self.notifier.ready(self.describe())
            self.ready_sent = True
            last_ping = last_status = self._now()
            status, state = "", self.health.state
            while not self.stop.wait(self.tick_s):
                self.ticks += 1
                self.health.check()
                now = self._now()
                if (
                    self.ping_every_ns is not None
                    and now - last_ping >= self.ping_every_ns
                    and self.alive()
                ):
                    self.notifier.watchdog()
                    self.pings += 1
                    last_ping = now
                # a camera outage shows at once; the counts every few seconds
                if now - last_status >= self.status_every_ns or self.health.state is not state:
                    state, last_status = self.health.state, now
                    text = self.describe()
                    if text != status:
                        self.notifier.status(text)
                        status = text
        finally:
            self.notifier.stopping("stopping: door locked")
