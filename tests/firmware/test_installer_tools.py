"""The installer tools: ``qrgate camera check`` over replayed field-case frames and
``qrgate selftest`` on gpiozero mock pins, both refusing while the daemon holds the lock
(C12)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import pytest
from click.testing import CliRunner
from gpiozero import Device
from gpiozero.pins.mock import MockFactory
from PIL import Image

from drivers.door import DoorInputs
from drivers.frames import Snapshotting
from drivers.pins import LevelKeepingMockPWMPin, make_pin_factory
from drivers.replay import ReplaySource, load_gray
from firmware.config import Config, load_config
from firmware.decoding.registry import make_decoder
from firmware.lock import InstanceLock
from firmware.tools import SERVICE_RUNNING
from firmware.tools.camera_check import (
    BLURRED_BELOW,
    DARK_BELOW,
    OUTLINE_RGB,
    camera,
    run_camera_check,
    sharpness,
)
from firmware.tools.selftest import Inputs, SelftestReport, door_inputs, run_selftest, selftest
from tests.polling import wait_until
from tests.shared import case_file

pytestmark = pytest.mark.usefixtures("no_leaks")

RELAY, BUZZER, RED, GREEN, BLUE = 17, 12, 5, 6, 13
CONTACT, EXIT = 20, 21


def write_config(tmp_path: Path, image: Path, *, doors: str = "") -> Path:
    """A config replaying ``image`` as fast as read, looped, on mock pins; state in tmp."""
    f = tmp_path / "qrgate.toml"
    f.write_text(f"""
[reader]
state_dir = "state"

[camera]
source = "replay"
path = "{image}"
fps = 0
loop = true

[gpio]
pin_factory = "mock"
relay_pin = {RELAY}
buzzer_pin = {BUZZER}
led = {{ red = {RED}, green = {GREEN}, blue = {BLUE} }}
pulse_s = 0.2

[doors]
{doors}
""")
    return f


def check(cfg: Path, *args: str) -> tuple[int, str, dict[str, Any] | None]:
    r = CliRunner().invoke(camera, ["check", "--config", str(cfg), *args])
    data = json.loads(r.stdout) if "--json" in args and r.stdout.strip() else None
    return r.exit_code, r.output, data


# ---------------------------------------------------------------- camera check


def test_camera_check_sharp_card_reads_every_frame_and_outlines_the_code(tmp_path: Path) -> None:
    b06 = case_file("B06.png")
    png = tmp_path / "snap.png"
    code, _, data = check(
        write_config(tmp_path, b06), "--frames", "20", "--snapshot", str(png), "--json"
    )
    assert code == 0
    assert data is not None
    assert (data["frames"], data["readable"], data["read_rate"], data["ok"]) == (20, 20, 1.0, True)
    source = load_gray(b06)
    assert data["sharpness"] == pytest.approx(sharpness(source), abs=0.01)
    assert data["sharpness"] > 10 * BLURRED_BELOW  # 279 measured: far from blurred
    assert 100 < data["brightness"] < 180
    assert 5.0 < data["module_px"] < 7.0  # a version-2 code (25 modules) about 152 px wide
    assert data["advice"] == []
    assert data["snapshot"] == str(png)

    with Image.open(png) as im:
        assert im.format == "PNG"
        assert im.size == (640, 480)
        out = np.asarray(im.convert("RGB"))
    corners = make_decoder("zxing-cpp").decode(source)[0].corners
    for i in range(4):
        (x0, y0), (x1, y1) = corners[i], corners[(i + 1) % 4]
        x, y = round((x0 + x1) / 2), round((y0 + y1) / 2)  # middle of each side
        r, g, b = (int(v) for v in out[y, x])
        assert (r, g, b) != (source[y, x],) * 3
        assert g > r + 100 and g > b + 100, f"side {i} at {(x, y)} is not the outline: {r, g, b}"
    assert tuple(out[470, 630]) == (source[470, 630],) * 3  # away from outline and text
    assert OUTLINE_RGB == (0, 255, 0)


class MainStreamReplay(ReplaySource):
    """A replay camera that also has a main stream (Snapshotting, like Picamera2Source): the
    snapshot is the frame at twice the size, in colour."""

    def __init__(self, image: Path) -> None:
        super().__init__(image, fps=0, loop=True)
        self.big = cv2.cvtColor(cv2.resize(load_gray(image), None, fx=2, fy=2), cv2.COLOR_GRAY2RGB)
        self.snapshots = 0

    def snapshot(self) -> npt.NDArray[np.uint8]:
        self.snapshots += 1
        return np.asarray(self.big, dtype=np.uint8)


def test_camera_check_snapshot_comes_from_the_main_stream(tmp_path: Path) -> None:
    b06 = case_file("B06.png")
    cam = MainStreamReplay(b06)
    assert isinstance(cam, Snapshotting)
    png = tmp_path / "main.png"
    report = run_camera_check(
        load_config(write_config(tmp_path, b06)), frames=5, snapshot=png, source=cam
    )
    assert report.ok and report.snapshot_source == "main stream" and cam.snapshots == 1
    assert report.size == (640, 480)  # the figures are the gray stream's
    with Image.open(png) as im:
        assert im.size == (1280, 960)
        out = np.asarray(im.convert("RGB"))
    (x0, y0), (x1, y1) = make_decoder("zxing-cpp").decode(load_gray(b06))[0].corners[2:4]
    x, y = round(x0 + x1), round(y0 + y1)  # middle of the bottom side, at twice the size
    r, g, b = (int(v) for v in out[y, x])
    assert g > r + 100 and g > b + 100, (r, g, b)


def test_camera_check_unreadable_blur_fails_and_advises_focus(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, case_file("B13-severe.png"))
    png = tmp_path / "snap.png"
    code, _, data = check(cfg, "--frames", "10", "--snapshot", str(png), "--json")
    assert code == 1
    assert data is not None
    assert (data["readable"], data["read_rate"], data["ok"]) == (0, 0.0, False)
    assert data["sharpness"] < BLURRED_BELOW
    assert data["module_px"] is None
    assert any("out of focus" in a and "10-30 cm" in a for a in data["advice"])
    assert any("read rate 0%" in a for a in data["advice"])
    with Image.open(png) as im:
        assert im.size == (640, 480)

    # the plain report says the same for a person
    code, text, _ = check(cfg, "--frames", "5", "--snapshot", str(png))
    assert code == 1
    assert "read rate: 0/5 frames = 0%" in text
    assert "advice: out of focus" in text
    assert text.rstrip().endswith("FAIL")


def test_camera_check_marginal_focus_passes_with_a_focus_warning(tmp_path: Path) -> None:
    code, _, data = check(
        write_config(tmp_path, case_file("B13.png")),
        "--frames",
        "5",
        "--snapshot",
        str(tmp_path / "s.png"),
        "--json",
    )
    assert code == 0
    assert data is not None and data["read_rate"] == 1.0
    assert [a.split(" (")[0] for a in data["advice"]] == ["out of focus"]


def test_camera_check_blank_card_says_no_code_seen(tmp_path: Path) -> None:
    code, _, data = check(
        write_config(tmp_path, case_file("B07.png")),
        "--frames",
        "5",
        "--snapshot",
        str(tmp_path / "s.png"),
        "--json",
    )
    assert code == 1
    assert data is not None and data["sharpness"] > BLURRED_BELOW
    assert any(a.startswith("no code seen") for a in data["advice"])
    assert not any("focus" in a for a in data["advice"])


def test_camera_check_dark_frame_advises_light(tmp_path: Path) -> None:
    dark = tmp_path / "dark.png"
    # the sharp card scene at a tenth of its light: mean about 14 of 255
    Image.fromarray((load_gray(case_file("B06.png")) // 10).astype(np.uint8)).save(dark)
    code, _, data = check(
        write_config(tmp_path, dark),
        "--frames",
        "5",
        "--snapshot",
        str(tmp_path / "s.png"),
        "--json",
    )
    assert data is not None
    assert data["brightness"] < DARK_BELOW
    assert any(a.startswith("too dark") and "light" in a for a in data["advice"])
    # focus is not judged in the dark: weak edges there say nothing about the lens
    assert not any("focus" in a for a in data["advice"])
    assert code == (0 if data["read_rate"] >= 0.9 else 1)


def test_camera_check_refuses_while_the_daemon_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, case_file("B06.png"))
    opened: list[object] = []
    monkeypatch.setattr("firmware.daemon.make_source", opened.append)
    png = tmp_path / "snap.png"
    with InstanceLock(tmp_path / "state" / "qrgate.lock"):
        r = CliRunner().invoke(camera, ["check", "--config", str(cfg), "--snapshot", str(png)])
    assert r.exit_code == 1
    assert SERVICE_RUNNING in r.stderr
    assert "sudo systemctl stop qrgate" in r.stderr
    assert opened == []
    assert not png.exists()


def test_camera_check_camera_that_cannot_open_exits_1_and_frees_the_lock(tmp_path: Path) -> None:
    empty = tmp_path / "no-frames"
    empty.mkdir()
    cfg = write_config(tmp_path, empty)
    r = CliRunner().invoke(camera, ["check", "--config", str(cfg)])
    assert r.exit_code == 1
    assert "no image files" in r.stderr
    with InstanceLock(tmp_path / "state" / "qrgate.lock") as lock:
        assert lock.held  # the tool let go of it


def test_camera_check_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[camera]\nsource = 'nope'\n")
    r = CliRunner().invoke(camera, ["check", "--config", str(bad)])
    assert r.exit_code == 2
    assert "camera.source" in r.stderr


# ---------------------------------------------------------------- selftest


@pytest.fixture
def factory() -> Iterator[Any]:
    f = make_pin_factory("mock")
    yield f
    f.close()
    assert Device.pin_factory is None


def config_for(tmp_path: Path, doors: str = "") -> Config:
    return load_config(write_config(tmp_path, case_file("B06.png"), doors=doors))


def levels(factory: Any, pin: int) -> list[float]:
    return [float(s.state) for s in factory.pin(pin).states]


def test_selftest_cycles_every_output_and_leaves_them_off(tmp_path: Path, factory: Any) -> None:
    report = run_selftest(config_for(tmp_path), factory, led_step_s=0.01, pulse_s=0.05)
    assert [(s.name, s.status) for s in report.steps] == [
        ("status light", "ok"),
        ("buzzer", "ok"),
        ("relay", "ok"),
        ("inputs", "skipped"),
    ]
    assert report.ok
    for pin in (RED, GREEN, BLUE):
        assert max(levels(factory, pin)) == 1.0, f"LED pin {pin} never lit"
        assert factory.pin(pin).state == 0
    # grant (one tone) and deny (three): four times on, each followed by silence
    buzz = levels(factory, BUZZER)
    assert sum(1 for a, b in itertools.pairwise(buzz) if a == 0 and b > 0) == 4
    assert factory.pin(BUZZER).state == 0
    assert levels(factory, RELAY) == [0.0, 1.0, 0.0]  # one pulse, locked at the end
    assert factory.pin(RELAY).state == 0


def test_selftest_no_relay_never_unlocks(tmp_path: Path, factory: Any) -> None:
    report = run_selftest(config_for(tmp_path), factory, relay=False, led_step_s=0.01)
    assert report.step("relay").status == "skipped"
    assert report.ok
    assert max(levels(factory, RELAY)) == 0.0


class FailingPin(LevelKeepingMockPWMPin):
    """A mock pin that cannot be driven high on the green LED's line (a shorted driver)."""

    def _set_state(self, value: float) -> None:
        if self.info.name == f"GPIO{GREEN}" and value > 0:
            raise OSError("LED driver gone")
        super()._set_state(value)


def test_selftest_failing_led_is_reported_and_the_relay_still_ends_locked(
    tmp_path: Path,
) -> None:
    f = MockFactory(pin_class=FailingPin)
    try:
        report = run_selftest(config_for(tmp_path), f, led_step_s=0.01, pulse_s=0.05)
        light = report.step("status light")
        assert light.status == "FAILED"
        assert "LED driver gone" in light.detail and "red" in light.detail
        assert report.step("buzzer").ok and report.step("relay").ok
        assert not report.ok
        assert f.pin(RELAY).state == 0 and f.pin(RED).state == 0
    finally:
        f.close()


class UnclaimablePin(LevelKeepingMockPWMPin):
    """A mock pin whose blue LED line cannot be set up (claimed by another process)."""

    def __init__(self, factory: Any, info: Any) -> None:
        if info.name == f"GPIO{BLUE}":
            raise OSError("GPIO busy")
        super().__init__(factory, info)


def test_selftest_outputs_that_cannot_be_set_up_fail_with_the_relay_locked(
    tmp_path: Path,
) -> None:
    f = MockFactory(pin_class=UnclaimablePin)
    try:
        report = run_selftest(config_for(tmp_path), f, led_step_s=0.01, pulse_s=0.05)
        assert report.steps[0].name == "outputs"
        assert report.steps[0].status == "FAILED" and "GPIO busy" in report.steps[0].detail
        assert not report.ok
        assert max(levels(f, RELAY)) == 0.0 and f.pin(RELAY).state == 0
    finally:
        f.close()


class FakeInputs:
    def __init__(self, states: dict[str, bool | None], fail: bool = False) -> None:
        self.states, self.fail, self.closed = states, fail, False

    def read(self) -> dict[str, bool | None]:
        if self.fail:
            raise OSError("input line unreadable")
        return dict(self.states)

    def close(self) -> None:
        self.closed = True


def test_selftest_reports_inputs_through_the_seam(tmp_path: Path, factory: Any) -> None:
    cfg = config_for(tmp_path, doors=f"contact_pin = {CONTACT}\nexit_pin = {EXIT}")
    made: list[FakeInputs] = []

    def make(config: Config, f: Any) -> FakeInputs:
        assert f is factory
        made.append(FakeInputs({"door_open": True, "exit_pressed": False, "tampered": None}))
        return made[-1]

    report = run_selftest(cfg, factory, relay=False, led_step_s=0.01, make_inputs=make)
    assert report.inputs == {"door_open": True, "exit_pressed": False, "tampered": None}
    assert report.step("inputs").detail == (
        "door contact: door open; exit button: released; tamper switch: not wired"
    )
    assert made[0].closed

    def broken(config: Config, f: Any) -> FakeInputs:
        made.append(FakeInputs({}, fail=True))
        return made[-1]

    report = run_selftest(cfg, factory, relay=False, led_step_s=0.01, make_inputs=broken)
    assert report.step("inputs").status == "FAILED"
    assert "input line unreadable" in report.step("inputs").detail
    assert made[-1].closed and not report.ok


def test_selftest_reads_the_real_door_inputs_wired_and_not_wired(
    tmp_path: Path, factory: Any
) -> None:
    cfg = config_for(tmp_path, doors=f"contact_pin = {CONTACT}\nexit_pin = {EXIT}")
    report = run_selftest(cfg, factory, relay=False, led_step_s=0.01)
    assert report.step("inputs").ok, report.step("inputs").detail
    # nothing on the lines: the pull-ups read an open contact loop, a released button
    assert report.inputs == {"door_open": True, "exit_pressed": False, "tampered": None}

    def wired(config: Config, f: Any) -> Inputs:
        inputs = door_inputs(config, f)
        f.pin(CONTACT).drive_low()  # the reed switch closes: door shut
        f.pin(EXIT).drive_low()  # someone holds the exit button
        assert wait_until(lambda: inputs.read()["exit_pressed"] is True)
        assert wait_until(lambda: inputs.read()["door_open"] is False)
        return inputs

    report = run_selftest(cfg, factory, relay=False, led_step_s=0.01, make_inputs=wired)
    assert report.inputs == {"door_open": False, "exit_pressed": True, "tampered": None}
    assert report.step("inputs").detail == (
        "door contact: door shut; exit button: pressed; tamper switch: not wired"
    )
    # the inputs were closed: their pins are free for the next user
    with DoorInputs(CONTACT, EXIT, None, pin_factory=factory) as again:
        assert again.read()["tampered"] is None


def run_cli(cfg: Path, *args: str, input: str | None = None) -> tuple[int, str, str]:
    r = CliRunner().invoke(selftest, ["--config", str(cfg), *args], input=input)
    return r.exit_code, r.stdout, r.stderr


def test_selftest_command_asks_before_pulsing_the_relay(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, case_file("B06.png"))
    code, out, err = run_cli(cfg, "--json", input="n\n")
    data = json.loads(out)  # the question went to stderr: stdout is one JSON object
    assert code == 0 and data["ok"]
    assert "unlocks the door" in err
    assert {s["name"]: s["status"] for s in data["steps"]}["relay"] == "skipped"

    code, out, err = run_cli(cfg, "--json", input="")  # no answer (stdin closed) is a no
    assert code == 0 and json.loads(out)["ok"]
    assert {s["name"]: s["status"] for s in json.loads(out)["steps"]}["relay"] == "skipped"

    code, out, _ = run_cli(cfg, "--yes")
    assert code == 0
    assert "ok       relay: pulsed" in out and "unlocks the door" not in out
    assert out.rstrip().endswith("PASS")

    code, out, _ = run_cli(cfg, "--no-relay")
    assert code == 0 and "skipped  relay" in out


def test_selftest_refuses_while_the_daemon_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path, case_file("B06.png"))
    made: list[object] = []
    monkeypatch.setattr("drivers.pins.make_pin_factory", lambda *a, **k: made.append(a))
    with InstanceLock(tmp_path / "state" / "qrgate.lock"):
        code, _, err = run_cli(cfg, "--yes")
    assert code == 1
    assert SERVICE_RUNNING in err
    assert made == []


def test_selftest_report_json_shape() -> None:
    r = SelftestReport()
    assert r.ok and r.to_json() == {"ok": True, "steps": [], "inputs": {}}


def test_camera_check_keeps_its_figures_when_the_snapshot_cannot_be_written(
    tmp_path: Path,
) -> None:
    cfg = write_config(tmp_path, case_file("B06.png"))
    ro = tmp_path / "ro"
    ro.mkdir()
    blocked = ro / "file"
    blocked.write_text("")
    r = CliRunner().invoke(
        camera, ["check", "--config", str(cfg), "--snapshot", str(blocked / "x.png")]
    )
    assert r.exit_code == 0, r.output
    assert "read rate" in r.stdout and "PASS" in r.stdout
    assert "snapshot not written to" in r.stdout and "--snapshot" in r.stdout
