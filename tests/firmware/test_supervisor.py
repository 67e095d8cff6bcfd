"""CameraHealth and Supervisor on an injected clock: one incident per outage, and the
watchdog fed only while the loops make progress."""

from __future__ import annotations

import threading

from firmware.supervisor import CameraHealth, CameraState, Supervisor
from tests.polling import wait_until

S = 1_000_000_000


class Clock:
    def __init__(self) -> None:
        self.ns = 1_000 * S

    def __call__(self) -> int:
        return self.ns

    def advance(self, seconds: float) -> None:
        self.ns += int(seconds * S)


class Beat:
    def __init__(self, ns: int) -> None:
        self.beat_ns = ns


class Recorder:
    """Records what the supervisor tells the service manager."""

    watchdog_interval_s: float | None = 2.0

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def ready(self, status: str) -> None:
        self.calls.append(("ready", status))

    def status(self, text: str) -> None:
        self.calls.append(("status", text))

    def watchdog(self) -> None:
        self.calls.append(("watchdog", None))

    def extend_timeout(self, seconds: float) -> None:
        self.calls.append(("extend", seconds))

    def stopping(self, status: str) -> None:
        self.calls.append(("stopping", status))


def health(clock: Clock) -> tuple[CameraHealth, list[tuple[str, dict[str, object]]]]:
    seen: list[tuple[str, dict[str, object]]] = []
    h = CameraHealth(lambda c, d: seen.append((c, d)), stall_s=5.0, monotonic_ns=clock)
    return h, seen


def test_first_frame_is_not_a_recovery() -> None:
    clock = Clock()
    h, seen = health(clock)
    h.camera_opened()
    h.frame()
    assert h.state is CameraState.OK and seen == []


def test_a_stall_is_reported_once_and_the_recovery_with_its_duration() -> None:
    clock = Clock()
    h, seen = health(clock)
    h.camera_opened()
    h.frame()
    clock.advance(4.9)
    h.check()
    assert seen == []
    clock.advance(0.2)
    h.check()
    h.check()
    h.failed("camera_stalled", "no frame within 5.0 s")  # the late read timeout: same outage
    clock.advance(2.0)
    h.frame()
    assert [c for c, _ in seen] == ["camera_stalled", "camera_recovered"]
    assert seen[1][1] == {"down_s": 2.0}
    assert h.state is CameraState.OK


def test_unavailable_at_start_then_open() -> None:
    clock = Clock()
    h, seen = health(clock)
    h.failed("camera_unavailable", "Device or resource busy")
    assert h.state is CameraState.MISSING and not h.opened.is_set()
    assert h.last_error == "Device or resource busy"
    h.failed("camera_unavailable", "Device or resource busy")
    h.camera_opened()
    clock.advance(1.5)
    h.frame()
    assert [c for c, _ in seen] == ["camera_unavailable", "camera_recovered"]
    assert h.opened.is_set() and h.last_error == ""


def test_recovery_promise_counts_until_it_is_overdue() -> None:
    clock = Clock()
    h, _ = health(clock)
    assert not h.recovering_on_time()
    h.recovering(3.0)
    clock.advance(2.9)
    assert h.recovering_on_time()
    clock.advance(0.2)
    assert not h.recovering_on_time()


def test_alive_needs_scan_progress_and_frames_or_a_recovery_on_time() -> None:
    clock = Clock()
    h, _ = health(clock)
    h.camera_opened()
    h.frame()
    beat = Beat(clock.ns)
    sup = Supervisor(
        stop=threading.Event(),
        health=h,
        scan=beat,
        notifier=Recorder(),
        describe=lambda: "x",
        monotonic_ns=clock,
    )
    assert sup.alive()
    clock.advance(1.1)  # frames stopped (gap 1 s at a 2 s watchdog), scan loop idles on
    beat.beat_ns = clock.ns
    assert not sup.alive()
    h.recovering(10.0)  # ...unless the capture thread is re-opening the camera on time
    assert sup.alive()
    clock.advance(1.1)  # and the scan loop must keep going round
    assert not sup.alive()
    beat.beat_ns = clock.ns
    assert sup.alive()
    clock.advance(9.0)
    beat.beat_ns = clock.ns
    assert not sup.alive()  # the recovery step is overdue: hung in open()


def test_waiting_for_the_camera_extends_the_start_and_says_why() -> None:
    clock = Clock()
    h, _ = health(clock)
    h.failed("camera_unavailable", "camera 0: Device or resource busy")
    rec = Recorder()
    stop = threading.Event()
    sup = Supervisor(
        stop=stop, health=h, scan=Beat(clock.ns), notifier=rec, describe=lambda: "running"
    )
    t = threading.Thread(target=sup.run)
    t.start()
    try:
        h.opened.wait(0.3)  # let it go round once or twice while the camera is missing
        assert ("status", "waiting for the camera: camera 0: Device or resource busy") in rec.calls
        assert any(c == "extend" for c, _ in rec.calls)
        assert not any(c == "ready" for c, _ in rec.calls)
        h.camera_opened()
        h.frame()
        assert wait_until(lambda: any(c == "ready" for c, _ in rec.calls), 10)
    finally:
        stop.set()
        t.join(5)
    kinds = [c for c, _ in rec.calls]
    assert kinds.count("ready") == 1 and kinds[-1] == "stopping"
    assert kinds.index("ready") > kinds.index("extend")


def test_stop_before_the_camera_came_sends_stopping_and_no_ready() -> None:
    clock = Clock()
    h, _ = health(clock)
    rec = Recorder()
    stop = threading.Event()
    stop.set()
    Supervisor(stop=stop, health=h, scan=Beat(clock.ns), notifier=rec, describe=str).run()
    assert [c for c, _ in rec.calls if c not in {"status", "extend"}] == ["stopping"]


def test_reopens_that_never_deliver_stop_counting_as_recovery() -> None:
    clock = Clock()
    h, seen = health(clock)
    h.camera_opened()
    h.frame()
    h.failed("camera_stalled", "no frame within 5.0 s")
    assert h.fruitless == 0  # that camera had delivered
    for i in range(3):
        h.recovering(10.0)
        assert h.recovering_on_time()
        h.camera_opened()  # opens fine, then the capture times out again: libcamera hung
        h.failed("camera_stalled", "no frame within 5.0 s")
        assert h.fruitless == i + 1
    h.recovering(10.0)
    assert not h.recovering_on_time()  # the watchdog lapses: systemd starts a new process
    assert [c for c, _ in seen] == ["camera_stalled"]
    h.camera_opened()
    h.frame()
    assert h.fruitless == 0 and h.state is CameraState.OK


def test_a_camera_that_cannot_be_opened_is_retried_without_end() -> None:
    clock = Clock()
    h, _ = health(clock)
    for _ in range(50):
        h.recovering(10.0)
        h.failed("camera_unavailable", "Device or resource busy")
    assert h.fruitless == 0 and h.recovering_on_time()
    assert not h.delivering.is_set()
