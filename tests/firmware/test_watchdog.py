"""The systemd protocol, spoken to a real AF_UNIX datagram socket as NOTIFY_SOCKET: field case
C22 (READY once after camera, GPIO and journal; WATCHDOG=1 at least every half interval while
the scan loop makes progress, never when it is stuck; STOPPING=1 on SIGTERM)."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path

import pytest

from drivers.exceptions import CameraTimeoutError
from drivers.frames import Frame, FrameSource, GrayImage
from drivers.replay import ReplaySource
from drivers.systemd import ServiceNotifier
from firmware.config import load_config
from firmware.daemon import describe
from firmware.decoding.codes import DecodedCode, Decoder
from firmware.decoding.registry import make_decoder
from firmware.supervisor import Supervisor
from tests.firmware.daemons import QRGATE
from tests.firmware.notify import NotifySocket
from tests.firmware.readers import make_reader, write_reader_config
from tests.firmware.test_daemon_process import looping_config
from tests.polling import wait_until
from tests.shared import case_file

WATCHDOG_S = 2.0
HELD = b"DOOR1:7f3a9c21e4b8"


def test_c22a_daemon_ready_once_pings_every_half_interval_stopping_on_sigterm(
    tmp_path: Path,
) -> None:
    sock = NotifySocket(tmp_path / "notify")
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(sock.path),
        "WATCHDOG_USEC": str(int(WATCHDOG_S * 1e6)),
    }
    env.pop("WATCHDOG_PID", None)  # systemd sets it to the main pid; absent means "you"
    proc = subprocess.Popen(
        [*QRGATE, "run", "--config", str(looping_config(tmp_path))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert sock.wait_for("READY", "1", 60), proc.stderr.read() if proc.poll() else ""
        watch_from = time.monotonic()
        # a run to watch, four intervals long: the pings' rhythm is what is tested
        assert wait_until(lambda: len(sock.times("WATCHDOG", "1")) >= 9, 60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert sock.wait_for("STOPPING", "1", 5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
        sock.close()
    assert len(sock.times("READY")) == 1
    ready = sock.times("READY")[0]
    pings = [t for t in sock.times("WATCHDOG", "1") if ready <= t <= sock.times("STOPPING")[0]]
    assert pings and pings[0] - ready <= WATCHDOG_S / 2
    gaps = [b - a for a, b in itertools.pairwise(pings)]
    assert len(pings) >= 4 * WATCHDOG_S / (WATCHDOG_S / 2)
    assert max(gaps) <= WATCHDOG_S / 2, gaps
    assert min(t for t in pings if t >= watch_from) > ready
    # STATUS= lines a person can read: which door, how many scans, the camera
    assert any("door test-door" in s and "scans" in s for s in sock.statuses())


class BlockingDecoder:
    """The real decoder, except that from frame ``block_at`` on it blocks until released: a
    scan thread stuck while the camera (and every other thread) lives."""

    def __init__(self, inner: Decoder, block_at: int) -> None:
        self.inner, self.block_at = inner, block_at
        self.calls = 0
        self.blocked, self.release = threading.Event(), threading.Event()
        self.blocked_at = 0.0
        self.name = getattr(inner, "name", "blocking")

    def decode(self, image: GrayImage) -> Iterable[DecodedCode]:
        self.calls += 1
        if self.calls == self.block_at:
            self.blocked_at = time.monotonic()
            self.blocked.set()
            self.release.wait()
        return self.inner.decode(image)


def test_c22b_pings_stop_within_one_interval_when_the_scan_loop_is_stuck(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD]))
    reel = [case_file("B06.png"), case_file("B07.png")] * 600
    decoder = BlockingDecoder(make_decoder("zxing-cpp"), block_at=45)
    reader = make_reader(cfg, ReplaySource(reel, fps=30))
    reader.scan.decoder = decoder  # the scan loop's own seam: its decoder
    sock = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with ExitStack() as stack:
        stack.callback(sock.close)
        stack.callback(reader.stop)
        reader.start()
        sup = Supervisor(
            stop=reader.stop_event,
            health=reader.health,
            scan=reader.scan,
            notifier=ServiceNotifier.from_env(),
            describe=lambda: describe(reader),
        )
        t = threading.Thread(target=sup.run, name="test-supervisor")
        t.start()
        stack.callback(t.join, 10)
        stack.callback(reader.stop_event.set)
        stack.callback(decoder.release.set)
        assert sock.wait_for("READY", "1", 30)
        assert decoder.blocked.wait(30)
        # watch two intervals (the supervisor looks every interval / 8) for pings that must
        # not come
        looked = sup.ticks
        assert wait_until(lambda: sup.ticks >= looked + 16, 30)
        assert reader.capture.source is not None and reader.health.state.value == "ok"
        pings = sock.times("WATCHDOG", "1")
        assert any(p < decoder.blocked_at for p in pings)  # it was pinging before
        after = [p for p in pings if p > decoder.blocked_at]
        assert not after or max(after) - decoder.blocked_at <= WATCHDOG_S
        decoder.release.set()
        released = time.monotonic()
        assert wait_until(lambda: any(p > released for p in sock.times("WATCHDOG", "1")), 10)


def test_without_notify_socket_the_daemon_runs_and_says_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = ServiceNotifier.from_env()
    assert not notifier.enabled and notifier.watchdog_interval_s is None
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD]))
    reader = make_reader(cfg, ReplaySource([case_file("B06.png")] * 5, fps=30))
    reader.start()
    try:
        Supervisor(
            stop=reader.stop_event,
            health=reader.health,
            scan=reader.scan,
            notifier=notifier,
            describe=lambda: describe(reader),
        ).run()  # returns when the finite reel ends
    finally:
        reader.stop()
    assert reader.metrics.granted == 1


class NeverDelivers(FrameSource):
    """Opens fine, then every read times out (how drivers.picamera reports a libcamera hang:
    the capture job never completes)."""

    name = "never-delivers"

    def __init__(self) -> None:
        self.opens = 0
        self._closed = threading.Event()

    def open(self) -> None:
        self.opens += 1
        self._closed.clear()

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        self._closed.wait(timeout_s)
        raise CameraTimeoutError(f"no frame within {timeout_s} s")

    def close(self) -> None:
        self._closed.set()


def test_c22_a_camera_that_reopens_but_never_delivers_stops_the_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD]))
    src = NeverDelivers()
    reader = make_reader(cfg, src)
    reader.capture.read_timeout_s = 0.5
    reader.capture.min_backoff_s = 0.05
    sock = NotifySocket(tmp_path / "notify")
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", str(int(WATCHDOG_S * 1e6)))
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with ExitStack() as stack:
        stack.callback(sock.close)
        stack.callback(reader.stop)
        reader.start()
        sup = Supervisor(
            stop=reader.stop_event,
            health=reader.health,
            scan=reader.scan,
            notifier=ServiceNotifier.from_env(),
            describe=lambda: describe(reader),
        )
        t = threading.Thread(target=sup.run, name="test-supervisor")
        t.start()
        stack.callback(t.join, 10)
        stack.callback(reader.stop_event.set)
        # never READY (no frame ever came); pinged while the first re-opens were worth trying
        assert wait_until(lambda: reader.health.fruitless >= 3, 30)
        given_up = time.monotonic()
        # watch for pings that must not come: it looks about once a second while it waits
        # for the camera
        looked = sup.ticks
        assert wait_until(lambda: sup.ticks >= looked + 4, 30)
        assert src.opens >= 4  # it still tries: a frame would bring it back
        assert sock.times("WATCHDOG", "1"), "no ping while recovery was worth trying"
        late = [p for p in sock.times("WATCHDOG", "1") if p > given_up + 1.0]
        assert late == []
        assert sock.times("READY") == []
        assert any("waiting for the camera" in x for x in sock.statuses())
