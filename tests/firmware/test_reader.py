"""The whole reader in one process: real frames → real decoder → policy → journal on disk →
gpiozero mock pins. Field cases C04, C05, C06, C10, C13(a)(b)(c)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest

from drivers.exceptions import CameraTimeoutError
from drivers.frames import Frame, FrameSource
from drivers.replay import ReplaySource
from firmware.config import load_config
from firmware.daemon import Reader
from firmware.journal.reader import JournalReader
from firmware.pipeline import ScanReport
from tests.firmware.readers import HASHER, make_reader, write_reader_config
from tests.shared import case_file

HELD = b"DOOR1:7f3a9c21e4b8"  # B06, B13, B04
A, B, C = b"DOOR1:aaaaaaaaaaaa", b"DOOR1:bbbbbbbbbbbb", b"DOOR1:cccccccccccc"  # B05


def run_reel(reader: Reader, timeout_s: float = 60.0) -> None:
    """Run a reader until its finite reel ends, then stop it."""
    reader.start()
    try:
        assert reader.wait(timeout_s), "reel did not finish"
    finally:
        reader.stop()
    assert reader.exit_code == 0


def scans(reader: Reader) -> list[tuple[str | None, str]]:
    rows = JournalReader(reader.config.journal_path).tail(10_000)
    return [(s.event.decision, s.event.reason) for s in rows if s.event.kind == "scan"]


def frames(*parts: tuple[str, int]) -> list[Path]:
    out: list[Path] = []
    for name, n in parts:
        out += [case_file(name)] * n
    return out


def test_c05_held_badge_pulses_once(tmp_path: Path) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD], repeat_window_s=2.0))
    reports: list[ScanReport] = []
    reader = make_reader(
        cfg, ReplaySource(frames(("B06.png", 90)), fps=30), listeners=[reports.append]
    )
    run_reel(reader)
    assert scans(reader) == [("granted", "granted")]
    assert reader.feedback.relay.pulse_count == 1
    assert [r.decision.granted for r in reports] == [True]
    assert reports[0].frame.seq == 0  # granted on the first frame
    assert reader.metrics.suppressed >= 80  # the rest of the 90 frames were repeats


@pytest.mark.parametrize("window, grants", [(2.0, 2), (10.0, 1)])
def test_c06_re_presentation(tmp_path: Path, window: float, grants: int) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD], repeat_window_s=window))
    reel = frames(("B06.png", 30), ("B07.png", 90), ("B06.png", 30))
    reader = make_reader(cfg, ReplaySource(reel, fps=30))
    run_reel(reader)
    assert scans(reader) == [("granted", "granted")] * grants
    assert reader.feedback.relay.pulse_count == grants


def test_c06_different_code_not_suppressed(tmp_path: Path) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD], repeat_window_s=10.0))
    reel = frames(("B06.png", 10), ("B01.png", 10), ("B06.png", 10))
    reader = make_reader(cfg, ReplaySource(reel, fps=30))
    run_reel(reader)
    # B06 granted, B01 (unknown) answered, B06 again: held < 10 s ago, suppressed
    assert scans(reader) == [("granted", "granted"), ("denied", "unknown")]


@pytest.mark.parametrize("backend", ["zxing-cpp", "zbar", "cascade"])
def test_c04_several_codes_deny_and_log_every_code(tmp_path: Path, backend: str) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[A], deny=[B], backend=backend))
    reports: list[ScanReport] = []
    reader = make_reader(
        cfg, ReplaySource(frames(("B05.png", 3)), fps=30), listeners=[reports.append]
    )
    run_reel(reader)
    assert reader.feedback.relay.pulse_count == 0
    assert reports and not any(r.decision.granted for r in reports)
    rows = JournalReader(cfg.journal_path).tail(100)
    first = rows[0].event
    seen = {c.payload for r in reports for c in r.codes}
    # every decoded code is in the journal row, by subject
    assert {c["subject"] for c in first.codes} == {
        HASHER.subject(p) for p in {c.payload for c in reports[0].codes}
    }
    if B in seen:
        assert first.reason == "revoked"
    assert first.decision == "denied"


def test_c10_focus_granted_on_first_readable_frame_no_spam(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD], repeat_window_s=2.0))
    reel = frames(("B13-severe.png", 90), ("B13.png", 30), ("B06.png", 30))
    reports: list[ScanReport] = []
    reader = make_reader(cfg, ReplaySource(reel, fps=30), listeners=[reports.append])
    with caplog.at_level(logging.INFO):
        run_reel(reader)
    assert reports and reports[0].decision.granted
    assert reports[0].frame.seq == 90  # the first marginal frame, not later
    assert len(reports) == 1
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 0


class RecordingSource(FrameSource):
    """A camera that records the relay's state when it is opened, then yields nothing."""

    name = "recording"

    def __init__(self) -> None:
        self.relay_unlocked_at_open: bool | None = None
        self.reader: Reader | None = None

    def open(self) -> None:
        assert self.reader is not None
        self.relay_unlocked_at_open = self.reader.feedback.relay.is_unlocked

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        return None

    def close(self) -> None:
        pass


def test_c13c_relay_locked_before_camera_and_journal(tmp_path: Path) -> None:
    cfg = load_config(write_reader_config(tmp_path, extra="relay_active_high = false"))
    src = RecordingSource()
    reader = make_reader(cfg, src)
    relay = reader.feedback.relay
    # active-low board: the locked line level is high
    assert relay.is_unlocked is False
    src.reader = reader
    run_reel(reader)
    assert src.relay_unlocked_at_open is False


def test_c13a_exception_mid_pulse_locks_door(tmp_path: Path) -> None:
    cfg = load_config(
        write_reader_config(tmp_path, allow=[HELD], extra="relay_active_high = false")
    )

    def explode(report: ScanReport) -> None:
        raise KeyboardInterrupt("simulated crash in the scan thread")

    reader = make_reader(cfg, ReplaySource(frames(("B06.png", 30)), fps=30), listeners=[explode])
    reader.start()
    assert reader.wait(30)
    relay = reader.feedback.relay
    # the crash happened mid-pulse (0.2 s pulse): the guard locked the door at once
    assert relay.pulse_count == 1 and relay.is_unlocked is False
    reader.stop()
    assert reader.exit_code == 1
    assert scans(reader) == [("granted", "granted")]


def test_c13b_stop_mid_pulse(tmp_path: Path) -> None:
    cfg = load_config(
        write_reader_config(tmp_path, allow=[HELD], extra="relay_active_high = false")
    )
    granted = threading.Event()
    reader = make_reader(
        cfg, ReplaySource(frames(("B06.png", 300)), fps=30), listeners=[lambda r: granted.set()]
    )
    reader.start()
    assert granted.wait(30)
    assert reader.feedback.relay.is_unlocked
    reader.stop()
    assert reader.feedback.relay.is_unlocked is False
    assert not [t for t in threading.enumerate() if t.name.startswith("qrgate-")]


class StallingSource(FrameSource):
    """Times out once (a camera hiccup), then replays B06 frames, then ends."""

    name = "stalling"

    def __init__(self) -> None:
        self.inner = ReplaySource(frames(("B06.png", 5)), fps=30)
        self.opens = 0
        self.stalled = False

    def open(self) -> None:
        self.opens += 1
        self.inner.open()

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        if not self.stalled:
            self.stalled = True
            raise CameraTimeoutError("no frame within 5 s")
        return self.inner.read(timeout_s)

    def close(self) -> None:
        self.inner.close()


def test_camera_stall_is_journaled_and_scanning_resumes(tmp_path: Path) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD]))
    src = StallingSource()
    reader = make_reader(cfg, src)
    run_reel(reader)
    rows = [(s.event.kind, s.event.reason) for s in JournalReader(cfg.journal_path).tail(10)]
    assert rows == [
        ("incident", "camera_stalled"),
        ("incident", "camera_recovered"),
        ("scan", "granted"),
    ]
    assert src.opens == 2


def test_grant_whose_relay_cannot_be_driven_is_recorded(tmp_path: Path) -> None:
    cfg = load_config(write_reader_config(tmp_path, allow=[HELD]))
    reader = make_reader(cfg, ReplaySource(frames(("B06.png", 3)), fps=30))
    reader.feedback.relay.close()  # a dead relay driver: Feedback.granted() returns -1
    run_reel(reader)
    rows = [
        (s.event.kind, s.event.reason, s.event.detail)
        for s in JournalReader(cfg.journal_path).tail(10)
    ]
    assert rows[0][:2] == ("scan", "granted")
    assert rows[1][:2] == ("incident", "relay_not_driven") and rows[1][2]["scan_seq"] == 1
    assert reader.metrics.granted == 0 and reader.metrics.relay_failures == 1
    assert reader.metrics.frame_to_relay_ms.count == 0


def test_a_failed_build_releases_the_lock_and_closes_the_outputs(tmp_path: Path) -> None:
    from drivers.exceptions import PinFactoryError
    from firmware.daemon import build_reader
    from firmware.lock import InstanceLock

    cfg_path = write_reader_config(tmp_path, allow=[HELD])
    cfg_path.write_text(
        cfg_path.read_text().replace('pin_factory = "mock"', 'pin_factory = "auto"')
    )
    cfg = load_config(cfg_path)
    with pytest.raises(PinFactoryError, match="no GPIO pin factory could be created"):
        build_reader(cfg, source=ReplaySource(frames(("B06.png", 1)), fps=30))
    lock = InstanceLock(cfg.reader.state_dir / "qrgate.lock")
    lock.acquire()  # raises InstanceLockedError if the failed build kept it
    lock.release()
