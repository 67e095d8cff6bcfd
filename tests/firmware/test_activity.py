"""The daemon's door-activity file (firmware/activity.py): written on every decided scan and
relay pulse, after the feedback, atomically; its failures never reach the door."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from drivers.replay import ReplaySource
from firmware.activity import ActivityDoor, ActivityWriter
from firmware.config import load_config
from tests.firmware.readers import make_reader, write_reader_config
from tests.shared import case_file

HELD = b"DOOR1:7f3a9c21e4b8"  # the code in B06.png


def read(path: Path) -> dict[str, int | None]:
    data: dict[str, int | None] = json.loads(path.read_bytes())
    return data


def test_a_granted_scan_records_the_scan_and_the_pulse_end(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    activity_file = run / "activity.json"
    cfg = load_config(
        write_reader_config(
            tmp_path, allow=[HELD], extra=f'[ota]\nactivity_file = "{activity_file}"\n'
        )
    )
    seen: list[tuple[int, int]] = []
    reader = make_reader(
        cfg,
        ReplaySource([case_file("B06.png")] * 3, fps=30),
        # a listener after the activity writer: the file is already there when it runs
        listeners=[lambda r: seen.append((r.frame.t_ns, time.monotonic_ns()))],
    )
    before = time.monotonic_ns()
    reader.start()
    try:
        assert reader.wait(60)
        content = read(activity_file)
    finally:
        reader.stop()
    assert reader.feedback.relay.pulse_count == 1
    frame_ns, listener_ns = seen[0]
    last_scan, until = content["last_scan_mono_ns"], content["relay_until_mono_ns"]
    assert last_scan is not None and until is not None
    # the scan was recorded after its frame and before the next listener ran
    assert frame_ns <= last_scan <= listener_ns
    # the pulse (pulse_s 0.2 in this config) ends 0.2 s after the relay switched, which
    # happened between the frame and the scan's record
    assert frame_ns + 200_000_000 <= until <= last_scan + 200_000_000
    assert before < frame_ns
    assert sorted(p.name for p in run.iterdir()) == ["activity.json"]  # no temp file left


def test_a_denied_scan_records_the_scan_only(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    activity_file = run / "activity.json"
    cfg = load_config(
        write_reader_config(tmp_path, extra=f'[ota]\nactivity_file = "{activity_file}"\n')
    )
    reader = make_reader(cfg, ReplaySource([case_file("B06.png")], fps=30))
    reader.start()
    try:
        assert reader.wait(60)
    finally:
        reader.stop()
    content = read(activity_file)
    assert content["last_scan_mono_ns"] is not None
    assert content["relay_until_mono_ns"] is None


def test_no_folder_means_no_file_and_the_reader_runs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware.daemon")
    missing = tmp_path / "not-there" / "activity.json"
    cfg = load_config(
        write_reader_config(tmp_path, allow=[HELD], extra=f'[ota]\nactivity_file = "{missing}"\n')
    )
    reader = make_reader(cfg, ReplaySource([case_file("B06.png")], fps=30))
    reader.start()
    try:
        assert reader.wait(60)
    finally:
        reader.stop()
    assert reader.feedback.relay.pulse_count == 1
    assert not missing.parent.exists()
    assert any("door activity file off" in r.getMessage() for r in caplog.records)


def test_pulses_only_extend_and_failures_are_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="firmware.activity")
    run = tmp_path / "run"
    run.mkdir()
    path = run / "activity.json"
    w = ActivityWriter(path, pulse_s=lambda: 3.0)
    w.on_pulse(1_000_000_000, 5.0)
    assert read(path) == {"last_scan_mono_ns": None, "relay_until_mono_ns": 6_000_000_000}
    w.on_pulse(2_000_000_000, None)  # the relay's default, 3 s: ends at 5 s, earlier
    assert read(path)["relay_until_mono_ns"] == 6_000_000_000
    w.on_pulse(4_000_000_000, None)  # ends at 7 s: extends
    assert read(path)["relay_until_mono_ns"] == 7_000_000_000
    w.on_pulse(-1, 60.0)  # the relay could not be driven: nothing recorded
    assert read(path)["relay_until_mono_ns"] == 7_000_000_000

    path.unlink()
    run.rmdir()  # the runtime folder went away (the unit stopped): writes fail
    for n in range(3):
        w.on_pulse(10_000_000_000 + n, 1.0)
    assert w.failures == 3
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage()
    run.mkdir()
    w.on_pulse(20_000_000_000, 1.0)
    assert read(path)["relay_until_mono_ns"] == 21_000_000_000
    assert any("written again" in r.getMessage() for r in caplog.records)


class Door:
    """A door whose relay switched at a known time (or could not be driven)."""

    def __init__(self, t_ns: int) -> None:
        self.t_ns = t_ns
        self.calls: list[float | None] = []

    def granted(self, pulse_s: float | None = None) -> int:
        self.calls.append(pulse_s)
        return self.t_ns


def test_remote_unlocks_are_recorded_through_the_door(tmp_path: Path) -> None:
    path = tmp_path / "activity.json"
    w = ActivityWriter(path, pulse_s=lambda: 3.0)
    door = Door(5_000_000_000)
    assert ActivityDoor(door, w).granted(10.0) == 5_000_000_000
    assert door.calls == [10.0]
    assert read(path)["relay_until_mono_ns"] == 15_000_000_000
    failed = Door(-1)
    assert ActivityDoor(failed, w).granted(None) == -1
    assert read(path)["relay_until_mono_ns"] == 15_000_000_000
