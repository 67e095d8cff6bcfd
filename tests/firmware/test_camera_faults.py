"""A camera that hangs or is busy, with the real supervisor, a real notification socket and a
real mosquitto: field cases C08 (camera stall) and C09 (camera busy).

Scaled for CI, structure kept: the feed camera runs at 20 frames/s, so C08's "500th frame"
is the 100th (5 s in), and C09's reopen backoff starts at 10 ms instead of 0.5 s.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Frame, GrayImage
from drivers.systemd import ServiceNotifier
from firmware.daemon import Reader, describe
from firmware.decoding.corpus import load_gray
from firmware.demo.broker import LocalBroker
from firmware.journal.reader import JournalReader
from firmware.supervisor import CameraState, Supervisor
from tests.firmware.notify import NotifySocket
from tests.firmware.test_uplink import (
    WAIT_S,
    FeedSource,
    Running,
    back_office,
    reader_config,
)
from tests.polling import wait_until
from tests.shared import case_file

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")

WATCHDOG_S = 2.0


@pytest.fixture(scope="module")
def held() -> GrayImage:
    """The allowed badge on a card (B06)."""
    return load_gray(case_file("B06.png"))


class HangingFeed(FeedSource):
    """The feed camera, except that read number ``hang_at`` blocks, ignoring its timeout
    (libcamera hangs inside a capture), until ``release`` is set; with ``raise_after_s`` it
    raises CameraTimeoutError after that long instead."""

    def __init__(self, hang_at: int, raise_after_s: float | None = None) -> None:
        super().__init__()
        self.hang_at, self.raise_after_s = hang_at, raise_after_s
        self.reads = 0
        self.hanging, self.release = threading.Event(), threading.Event()
        self.hung_at = 0.0

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        self.reads += 1
        if self.reads == self.hang_at:
            self.hung_at = time.monotonic()
            self.hanging.set()
            if self.raise_after_s is not None:
                self.release.wait(self.raise_after_s)
                raise CameraTimeoutError(f"no frame within {self.raise_after_s} s")
            self.release.wait()
        return super().read(timeout_s)


class Supervised:
    """A reader (in this process, with its uplink) under the real Supervisor, which talks to
    a real notification socket through drivers.systemd."""

    def __init__(
        self,
        stack: ExitStack,
        tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch,
        running: Running,
    ) -> None:
        self.running = running
        self.reader: Reader = running.reader
        self.sock = NotifySocket(tmp_path / "notify")
        stack.callback(self.sock.close)
        monkeypatch.setenv("NOTIFY_SOCKET", str(self.sock.path))
        monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
        self.supervisor = Supervisor(
            stop=self.reader.stop_event,
            health=self.reader.health,
            scan=self.reader.scan,
            notifier=ServiceNotifier.from_env(),
            describe=lambda: describe(self.reader),
        )
        self.thread = threading.Thread(target=self.supervisor.run, name="test-supervisor")
        self.thread.start()
        stack.callback(self.thread.join, 10)
        stack.callback(self.reader.stop_event.set)

    def incidents(self) -> list[str]:
        rows = JournalReader(self.reader.config.journal_path).tail(100_000)
        return [s.event.reason for s in rows if s.event.kind == "incident"]

    def pings_between(self, t0: float, t1: float) -> list[float]:
        return [t for t in self.sock.times("WATCHDOG", "1") if t0 <= t <= t1]


def start_reader(
    stack: ExitStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: FeedSource
) -> tuple[Supervised, object]:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port)
    running = Running(cfg, source=source)
    stack.callback(running.stop)
    return Supervised(stack, tmp_path, monkeypatch, running), bo


def test_c08_capture_that_never_returns(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch, held: GrayImage
) -> None:
    src = HangingFeed(hang_at=100)
    s, bo = start_reader(stack, tmp_path, monkeypatch, src)
    try:
        s.running.ready()
        assert s.sock.wait_for("READY", "1")
        assert s.running.scan(held).decision.granted
        assert src.hanging.wait(WAIT_S)
        # noticed: the incident, the status over MQTT, a STATUS= line a person can read
        assert wait_until(lambda: "camera_stalled" in s.incidents(), WAIT_S)
        stalled_at = time.monotonic()
        assert stalled_at - src.hung_at <= s.reader.config.camera.read_timeout_s + 2.0
        assert s.reader.health.state is CameraState.STALLED
        assert bo.wait(lambda: bo.statuses and bo.statuses[-1]["camera"] == "stalled")  # type: ignore[attr-defined]
        assert wait_until(lambda: any("camera stalled" in x for x in s.sock.statuses()), 5)
        assert not s.reader.feedback.relay.is_energised
        # pings stopped: the capture thread is stuck, so systemd must restart us
        # watch 1.5 intervals (the supervisor looks every interval / 8) for pings that must
        # not come
        looked = s.supervisor.ticks
        assert wait_until(lambda: s.supervisor.ticks >= looked + 12, WAIT_S)
        assert s.pings_between(src.hung_at + WATCHDOG_S, time.monotonic()) == []
    finally:
        src.release.set()  # frames return
    assert wait_until(lambda: "camera_recovered" in s.incidents(), WAIT_S)
    assert s.incidents().count("camera_stalled") == 1
    assert bo.wait(lambda: bo.statuses[-1]["camera"] == "ok")  # type: ignore[attr-defined]
    resumed = time.monotonic()
    assert wait_until(lambda: bool(s.pings_between(resumed, time.monotonic())), WAIT_S)
    assert s.running.scan(held).decision.granted


def test_c08_read_that_raises_a_timeout_after_10_s(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch, held: GrayImage
) -> None:
    src = HangingFeed(hang_at=40, raise_after_s=10.0)
    s, _ = start_reader(stack, tmp_path, monkeypatch, src)
    s.running.ready()
    assert src.hanging.wait(WAIT_S)
    assert wait_until(lambda: "camera_stalled" in s.incidents(), WAIT_S)
    assert time.monotonic() - src.hung_at < 10.0  # the supervisor, not the late timeout
    assert wait_until(lambda: "camera_recovered" in s.incidents(), WAIT_S)
    # one outage, one incident: the late timeout does not report it a second time
    assert s.incidents() == ["camera_stalled", "camera_recovered"]
    assert s.running.scan(held).decision.granted


class BusyFeed(FeedSource):
    """The feed camera; ``open()`` fails while ``busy_opens`` > 0 ("Device or resource
    busy", as after a crash), and ``fail_every`` > 0 makes every n-th read fail with a
    device error followed by one busy open (a forced fail/recover cycle)."""

    def __init__(self, busy_opens: int, fail_every: int = 0) -> None:
        super().__init__()
        self.busy_opens, self.fail_every = busy_opens, fail_every
        self.opens = self.refused = self.reads = self.cycles = 0
        self.is_open = False

    def open(self) -> None:
        if self.is_open:
            raise AssertionError("opened twice without a close")  # the old instance first
        if self.busy_opens > 0:
            self.busy_opens -= 1
            self.refused += 1
            raise CameraUnavailableError("camera 0: Device or resource busy")
        self.opens += 1
        self.is_open = True
        super().open()

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        self.reads += 1
        if self.fail_every and self.reads % self.fail_every == 0:
            self.cycles += 1
            self.busy_opens = 1
            raise FrameSourceError("VIDIOC_DQBUF: No such device")
        return super().read(timeout_s)

    def close(self) -> None:
        self.is_open = False
        super().close()


def test_c09_busy_at_start_retries_while_mqtt_and_journal_work(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch, held: GrayImage
) -> None:
    src = BusyFeed(busy_opens=3)
    s, bo = start_reader(stack, tmp_path, monkeypatch, src)
    s.reader.capture.min_backoff_s = 0.3
    # while the camera is missing: MQTT works and says so, the journal has the incident,
    # systemd is told why we are not ready (and to wait), and READY=1 is not sent
    s.running.ready()
    assert bo.wait(lambda: any(st["camera"] == "unavailable" for st in bo.statuses))  # type: ignore[attr-defined]
    assert s.incidents()[:1] == ["camera_unavailable"]
    assert s.sock.wait_for("READY", "1")
    ready_at = s.sock.times("READY", "1")[0]
    waiting = [t for t in s.sock.times("STATUS") if t < ready_at]
    assert waiting and any("busy" in x for x in s.sock.statuses())
    assert [t for t in s.sock.times("EXTEND_TIMEOUT_USEC") if t < ready_at]
    assert src.refused == 3 and src.opens == 1
    assert s.running.scan(held).decision.granted
    assert s.incidents() == ["camera_unavailable", "camera_recovered"]
    assert len(s.sock.times("READY")) == 1


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_c09_100_forced_fail_recover_cycles_keep_fds_rss_and_threads_flat(
    tmp_path: Path, stack: ExitStack, monkeypatch: pytest.MonkeyPatch, held: GrayImage
) -> None:
    src = BusyFeed(busy_opens=0, fail_every=3)
    s, bo = start_reader(stack, tmp_path, monkeypatch, src)
    s.reader.capture.min_backoff_s = 0.01
    s.running.ready()
    assert wait_until(lambda: src.cycles >= 10, WAIT_S)
    fds, rss, threads = open_fds(), rss_kb(), threading.active_count()
    assert wait_until(lambda: src.cycles >= 110, 120)
    assert s.thread.is_alive() and not s.reader.stop_event.is_set()  # no crash loop
    assert open_fds() <= fds + 2
    assert rss_kb() - rss < 5_000
    # a pattern player or a publish may be running at either moment: a leak never settles
    assert wait_until(lambda: threading.active_count() <= threads, WAIT_S), threading.enumerate()
    # every outage is one incident pair, and the reader still decides
    inc = s.incidents()
    assert inc.count("camera_error") >= 100
    assert abs(inc.count("camera_error") - inc.count("camera_recovered")) <= 1
    assert s.reader.capture.failed_opens >= 100
    assert bo.wait(lambda: bo.statuses[-1]["online"])  # type: ignore[attr-defined]
