"""Picamera2Source against a fake of the picamera2 calls it makes (tests/drivers/fake_picamera2):
configuration, controls, frames from the lores Y plane, snapshots, focus, stalls, busy cameras."""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
from typing import Any

import numpy as np
import pytest
from PIL import Image

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Focusable, FrameSource, Snapshotting
from drivers.picamera import INSTALL_HINT, Picamera2Source
from tests.drivers.fake_picamera2 import (
    AeExposureModeEnum,
    AeMeteringModeEnum,
    AfModeEnum,
    AfRangeEnum,
    AfTriggerEnum,
    FakeCameraSystem,
    Gray,
    scene_rgb,
)
from tests.shared import REPO, case_file

NOW_NS = 80_000_000_000


def gray(name: str) -> Gray:
    with Image.open(case_file(name)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


@pytest.fixture
def b06() -> Gray:
    return gray("B06.png")


def source(system: FakeCameraSystem, **kw: Any) -> Picamera2Source:
    kw.setdefault("size", (640, 480))
    kw.setdefault("fps", 25.0)
    return Picamera2Source(module_loader=system.load, **kw)


# -- import ---------------------------------------------------------------------------------


def test_without_picamera2_open_says_how_to_install_it() -> None:
    def missing() -> Any:
        raise ModuleNotFoundError("No module named 'libcamera'")

    src = Picamera2Source(module_loader=missing)
    with pytest.raises(CameraUnavailableError) as err:
        src.open()
    assert INSTALL_HINT in str(err.value) and "libcamera" in str(err.value)
    assert INSTALL_HINT == (
        "picamera2 is not installed: on Raspberry Pi OS install python3-picamera2 and create"
        " the venv with --system-site-packages"
    )


def test_the_default_loader_turns_a_failed_import_into_the_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import picamera2 -> ImportError
    with pytest.raises(CameraUnavailableError, match="python3-picamera2"):
        Picamera2Source().open()


def test_importing_the_module_does_not_import_picamera2() -> None:
    code = "import sys, drivers.picamera; print('picamera2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_it_is_a_focusable_snapshotting_frame_source(b06: Gray) -> None:
    src = source(FakeCameraSystem(b06))
    assert isinstance(src, FrameSource)
    assert isinstance(src, Focusable) and isinstance(src, Snapshotting)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"size": (0, 480)}, "bad camera mode"),
        ({"fps": float("nan")}, "bad camera mode"),
        ({"size": (1920, 1080)}, "smaller than the frame size"),
        ({"autofocus": "auto"}, "continuous, off"),
        ({"focus_range": "near"}, "macro, normal, full"),
        ({"exposure_value": float("inf")}, "not a number"),
    ],
)
def test_bad_settings_are_refused(b06: Gray, kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        source(FakeCameraSystem(b06), **kw)


# -- configuration and frames ---------------------------------------------------------------


def test_it_asks_a_lores_yuv420_stream_and_an_rgb_main_stream(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    with source(system, size=(640, 480), snapshot_size=(1280, 960), fps=25.0, camera_num=0):
        cam = system.last()
        assert cam.calls == ["create_video_configuration", "configure", "start"]
        config = cam.camera_configuration()
        assert config["lores"] == {"size": (640, 480), "format": "YUV420", "stride": 640}
        assert config["main"] == {"size": (1280, 960), "format": "RGB888", "stride": 3840}
        assert config["controls"] == {"FrameDurationLimits": (40_000, 40_000)}
        assert config["buffer_count"] == 4
    assert cam.calls[-2:] == ["stop", "close"]


def test_streams_of_different_aspect_ratios_are_warned_about(
    b06: Gray, caplog: pytest.LogCaptureFixture
) -> None:
    system = FakeCameraSystem(b06)
    with source(system, size=(640, 480), snapshot_size=(1280, 960)):
        pass
    assert "aspect ratio" not in caplog.text
    with source(system, size=(640, 480), snapshot_size=(1280, 720)):
        pass
    assert "640x480 and snapshot size 1280x720 differ in aspect ratio" in caplog.text


def test_a_frame_is_the_y_plane_of_the_lores_buffer_without_the_stride_padding(
    b06: Gray,
) -> None:
    system = FakeCameraSystem(b06, stride_align=256)  # 640 wide, rows of 768 bytes
    with (src := source(system)):
        assert system.last().camera_configuration()["lores"]["stride"] == 768
        frames = [src.read(timeout_s=1.0) for _ in range(3)]
    for i, f in enumerate(frames):
        assert f is not None and f.seq == i
        assert f.image.shape == (480, 640) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
        assert np.array_equal(f.image, b06)  # the gray image exactly: no conversion
    assert system.buffers_made == ["lores"] * 3
    assert system.outstanding == set()  # every request released


def test_a_size_libcamera_did_not_pad_is_read_as_is(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    with (src := source(system, size=(320, 240))):
        frame = src.read()
    assert frame is not None and frame.image.shape == (240, 320)
    assert np.array_equal(frame.image, b06[::2, ::2])


def test_frame_times_are_the_sensor_timestamp(b06: Gray) -> None:
    clock = iter(range(NOW_NS, NOW_NS + 10_000_000, 1_000_000))
    system = FakeCameraSystem(b06, clock_ns=lambda: next(clock), exposure_lag_ns=20_000_000)
    with (src := source(system, monotonic_ns=lambda: NOW_NS + 50_000_000)):
        frames = [src.read() for _ in range(3)]
    # exposed 20 ms before the camera completed each request, not when read() returned
    assert [f.t_ns for f in frames if f] == [NOW_NS - 20_000_000 + i * 1_000_000 for i in range(3)]


def test_an_implausible_sensor_timestamp_falls_back_to_the_read_time(b06: Gray) -> None:
    system = FakeCameraSystem(b06, clock_ns=lambda: 5, exposure_lag_ns=0)
    with (src := source(system, monotonic_ns=lambda: NOW_NS)):
        frame = src.read()
    assert frame is not None and frame.t_ns == NOW_NS


def test_a_snapshot_is_the_main_stream_in_rgb_order(b06: Gray) -> None:
    system = FakeCameraSystem(b06, stride_align=256)
    with (src := source(system, snapshot_size=(640, 480))):
        first = src.read()
        snap = src.snapshot()
        after = src.read()
    assert snap.shape == (480, 640, 3) and snap.dtype == np.uint8 and snap.flags.c_contiguous
    expected = scene_rgb(b06)
    assert np.array_equal(snap, expected)
    assert np.array_equal(snap[:, :, 0], b06)  # red channel first, not picamera2's blue
    assert first is not None and after is not None and (first.seq, after.seq) == (0, 1)
    assert system.outstanding == set()


def test_reading_before_open_or_after_close_fails(b06: Gray) -> None:
    src = source(FakeCameraSystem(b06))
    with pytest.raises(FrameSourceError, match="before open"):
        src.read()
    with pytest.raises(FrameSourceError, match="before open"):
        src.snapshot()


# -- focus and exposure ---------------------------------------------------------------------


def test_autofocus_is_continuous_over_the_macro_range_with_phone_screen_exposure(
    b06: Gray,
) -> None:
    system = FakeCameraSystem(b06, autofocus=True)
    with source(system, exposure_value=-0.5):
        cam = system.last()
        assert cam.controls_set == [
            {
                "AfMode": AfModeEnum.Continuous,
                "AfRange": AfRangeEnum.Macro,
                "AeEnable": True,
                "ExposureValue": -0.5,
                "AeMeteringMode": AeMeteringModeEnum.CentreWeighted,
                "AeExposureMode": AeExposureModeEnum.Short,
            }
        ]
        assert cam.calls.index("start") > cam.calls.index("configure")


def test_focus_range_and_exposure_follow_the_settings_and_the_camera_limits(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    with source(system, focus_range="full", exposure_value=-12.0):
        sent = system.last().controls_set[0]
    assert sent["AfRange"] == AfRangeEnum.Full
    assert sent["ExposureValue"] == -8.0  # clamped to the camera's (-8, 8)


def test_a_fixed_focus_camera_gets_no_autofocus_controls_and_focus_cycle_is_a_no_op(
    b06: Gray,
) -> None:
    system = FakeCameraSystem(b06, autofocus=False)
    with (src := source(system)):
        cam = system.last()
        assert len(cam.controls_set) == 1
        assert not any(k.startswith("Af") for k in cam.controls_set[0])
        assert cam.controls_set[0]["ExposureValue"] == -0.5
        src.focus_cycle()
        assert src.read() is not None
        assert len(cam.controls_set) == 1


def test_autofocus_off_leaves_the_lens_alone(b06: Gray) -> None:
    system = FakeCameraSystem(b06, autofocus=True)
    with (src := source(system, autofocus="off")):
        cam = system.last()
        src.focus_cycle()
        assert all(not k.startswith("Af") for sent in cam.controls_set for k in sent)


def test_focus_cycle_triggers_a_scan_then_returns_to_continuous(b06: Gray) -> None:
    system = FakeCameraSystem(b06, autofocus=True)
    system.af_scan_frames = 3
    with (src := source(system)):
        cam = system.last()
        src.focus_cycle()
        src.focus_cycle()  # a cycle is running: not triggered twice
        assert cam.controls_set[1:] == [
            {"AfMode": AfModeEnum.Auto, "AfTrigger": AfTriggerEnum.Start}
        ]
        for _ in range(3):  # the scan shows in the frames' AfState
            src.read()
        assert len(cam.controls_set) == 2
        src.read()  # AfState Focused: the scan is over
        assert cam.controls_set[2:] == [
            {"AfMode": AfModeEnum.Continuous, "AfRange": AfRangeEnum.Macro}
        ]
        src.focus_cycle()  # a later cycle may start again
        assert cam.controls_set[3]["AfTrigger"] == AfTriggerEnum.Start


def test_a_focus_cycle_whose_end_never_shows_gives_way_after_three_seconds(b06: Gray) -> None:
    now = [NOW_NS]
    system = FakeCameraSystem(b06, autofocus=True, clock_ns=lambda: now[0])
    system.af_scan_frames = 10_000  # AfState stays Scanning
    with (src := source(system, monotonic_ns=lambda: now[0])):
        cam = system.last()
        src.focus_cycle()
        src.read()
        now[0] += 2_900_000_000
        src.read()
        assert len(cam.controls_set) == 2
        now[0] += 200_000_000
        src.read()
        assert cam.controls_set[-1]["AfMode"] == AfModeEnum.Continuous


def test_focus_cycle_on_a_closed_source_does_nothing(b06: Gray) -> None:
    src = source(FakeCameraSystem(b06))
    src.focus_cycle()  # never raises
    src.open()
    src.close()
    src.focus_cycle()


# -- stalls ---------------------------------------------------------------------------------


def test_a_capture_that_never_completes_raises_after_the_timeout(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    with (src := source(system)):
        system.stalled = True
        with pytest.raises(CameraTimeoutError, match=r"no frame within 0\.2 s"):
            src.read(timeout_s=0.2)
        with pytest.raises(CameraTimeoutError):
            src.snapshot(timeout_s=0.05)
        cam = system.last()
        assert len(cam.jobs) == 1  # the second wait was on the same job
        system.stalled = False
        cam.resume()
        frame = src.read(timeout_s=1.0)
        assert frame is not None and frame.seq == 0 and np.array_equal(frame.image, b06)
    assert system.outstanding == set()


def test_closing_a_stalled_source_cancels_the_capture_and_leaks_nothing(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    src = source(system)
    src.open()
    cam = system.last()
    system.stalled = True
    with pytest.raises(CameraTimeoutError):
        src.read(timeout_s=0.05)
    src.close()
    assert cam.calls[-3:] == ["cancel_all_and_flush", "stop", "close"]
    assert system.live == set() and system.fds == 0 and system.outstanding == set()


def test_a_request_that_completed_after_the_timeout_is_released_on_close(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    src = source(system)
    src.open()
    system.stalled = True
    with pytest.raises(CameraTimeoutError):
        src.read(timeout_s=0.05)
    system.last().resume()  # the frame arrives after read() gave up
    assert len(system.outstanding) == 1
    src.close()
    assert system.outstanding == set()


# -- opening and closing --------------------------------------------------------------------


def test_a_busy_camera_is_unavailable_with_the_cause(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    system.busy_opens = 1
    with pytest.raises(CameraUnavailableError) as err:
        source(system).open()
    message = str(err.value)
    assert "Device or resource busy" in message and "no other process" in message
    assert system.live == set()


def test_a_camera_that_fails_to_start_is_closed(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    system.start_error = RuntimeError("start failed")
    with pytest.raises(CameraUnavailableError, match="start failed"):
        source(system).open()
    assert system.last().calls[-1] == "close"
    assert system.live == set() and system.fds == 0


def test_opening_again_closes_the_old_instance_first(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    src = source(system)
    src.open()
    old = system.last()
    src.open()  # without close(): a second Picamera2 on a held camera would be busy
    assert old.calls[-1] == "close" and not old.is_open
    assert len(system.live) == 1
    src.close()


def test_a_hundred_fail_and_recover_cycles_leak_nothing(b06: Gray) -> None:
    system = FakeCameraSystem(b06, keep_instances=False)
    src = source(system)
    threads = threading.active_count()
    for _ in range(100):
        system.busy_opens = 1
        with pytest.raises(CameraUnavailableError):
            src.open()
        src.open()
        assert src.read(timeout_s=1.0) is not None
        assert len(system.live) == 1 and system.fds == 2
    src.close()
    gc.collect()
    assert system.live == set() and system.fds == 0 and system.outstanding == set()
    assert system.alive() == 0  # no old instance kept alive by the source
    assert threading.active_count() == threads


def test_close_is_idempotent(b06: Gray) -> None:
    system = FakeCameraSystem(b06)
    src = source(system)
    src.open()
    src.close()
    src.close()
    assert system.last().calls.count("close") == 1
    assert system.live == set()
