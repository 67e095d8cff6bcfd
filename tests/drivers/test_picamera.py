"""Picamera2Source: the install hint off the Pi, and the lores path against a fake picamera2."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import TimeoutError as FutureTimeoutError
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.picamera import INSTALL_HINT, Picamera2Source
from tests.shared import REPO

NOW_NS = 80_000_000_000
STRIDE = 704  # picamera2 pads YUV420 rows; the Y plane is the first `width` bytes of each row


def y_plane(width: int, height: int, n: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    y, x = np.mgrid[0:height, 0:width]
    plane: np.ndarray[Any, np.dtype[np.uint8]] = ((x + 2 * y + n) % 251).astype(np.uint8)
    return plane


class FakeRequest:
    """picamera2's CompletedRequest: make_array("lores") gives YUV420 as (h*3/2, stride)."""

    def __init__(self, camera: FakePicamera2, n: int, stamp: int) -> None:
        self.camera, self.n, self.stamp = camera, n, stamp
        self.released = False

    def make_array(self, name: str) -> np.ndarray[Any, np.dtype[np.uint8]]:
        assert name == "lores" and not self.released
        w, h = self.camera.config["lores"]["size"]
        yuv = np.full((h * 3 // 2, STRIDE), 128, np.uint8)
        yuv[:h, :w] = y_plane(w, h, self.n)
        yuv[:h, w:] = 7  # padding bytes: must not reach the frame
        return yuv

    def get_metadata(self) -> dict[str, Any]:
        return {"SensorTimestamp": self.stamp, "ExposureTime": 10_000, "FrameDuration": 33_333}

    def release(self) -> None:
        self.released = True


class FakeJob:
    """picamera2's Job: get_result(timeout) raises concurrent.futures.TimeoutError."""

    def __init__(self, camera: FakePicamera2) -> None:
        self.camera = camera

    def get_result(self, timeout: float | None = None) -> FakeRequest:
        if self.camera.stalls:
            self.camera.stalls -= 1
            raise FutureTimeoutError()
        n = len(self.camera.requests)
        request = FakeRequest(self.camera, n, self.camera.stamp(n))
        self.camera.requests.append(request)
        return request


class FakePicamera2:
    def __init__(self, camera_num: int = 0) -> None:
        self.camera_num = camera_num
        self.config: dict[str, Any] = {}
        self.calls: list[str] = []
        self.requests: list[FakeRequest] = []
        self.jobs: list[FakeJob] = []
        self.stalls = 0
        self.start_error: Exception | None = None

    def stamp(self, n: int) -> int:
        return NOW_NS - 20_000_000 + n  # exposed 20 ms before the read returns

    def create_video_configuration(
        self, main: dict[str, Any], lores: dict[str, Any], controls: dict[str, Any]
    ) -> dict[str, Any]:
        self.calls.append("create_video_configuration")
        # picamera2 aligns YUV420 widths: 630 -> 640 here
        w, h = lores["size"]
        aligned = {"size": (-(-w // 64) * 64, h), "format": lores["format"]}
        return {"main": dict(main), "lores": aligned, "controls": dict(controls)}

    def configure(self, config: dict[str, Any]) -> None:
        self.calls.append("configure")
        self.config = config

    def camera_configuration(self) -> dict[str, Any]:
        return self.config

    def start(self) -> None:
        self.calls.append("start")
        if self.start_error:
            raise self.start_error

    def capture_request(self, wait: bool | float | None = None) -> FakeJob:
        assert wait is False, "read() must not block inside picamera2 without a timeout"
        self.jobs.append(FakeJob(self))
        return self.jobs[-1]

    def stop(self) -> None:
        self.calls.append("stop")

    def close(self) -> None:
        self.calls.append("close")


class FakeModule:
    def __init__(self, error: Exception | None = None) -> None:
        self.cameras: list[FakePicamera2] = []
        self.error = error

    def load(self) -> Any:
        return SimpleNamespace(Picamera2=self.make)

    def make(self, camera_num: int = 0) -> FakePicamera2:
        if self.error:
            raise self.error
        self.cameras.append(FakePicamera2(camera_num))
        return self.cameras[-1]


def source(module: FakeModule, **kw: Any) -> Picamera2Source:
    return Picamera2Source(
        size=(630, 480), fps=25.0, module_loader=module.load, monotonic_ns=lambda: NOW_NS, **kw
    )


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


def test_frames_are_the_lores_y_plane_with_the_sensor_timestamp() -> None:
    module = FakeModule()
    with (src := source(module)):
        frames = [src.read() for _ in range(3)]
    cam = module.cameras[0]
    assert cam.calls == ["create_video_configuration", "configure", "start", "stop", "close"]
    assert cam.config["lores"] == {"size": (640, 480), "format": "YUV420"}
    assert cam.config["controls"] == {"FrameDurationLimits": (40_000, 40_000)}
    for i, f in enumerate(frames):
        assert f is not None and f.seq == i
        assert f.image.shape == (480, 640) and f.image.dtype == np.uint8
        assert f.image.flags.c_contiguous
        assert np.array_equal(f.image, y_plane(640, 480, i))
        assert f.t_ns == cam.stamp(i)
    assert all(r.released for r in cam.requests)


def test_an_implausible_sensor_timestamp_falls_back_to_the_read_time() -> None:
    module = FakeModule()
    with (src := source(module)):
        module.cameras[0].stamp = lambda n: 5  # type: ignore[method-assign]
        frame = src.read()
    assert frame is not None and frame.t_ns == NOW_NS


def test_a_timeout_keeps_the_pending_request_for_the_next_read() -> None:
    module = FakeModule()
    with (src := source(module)):
        cam = module.cameras[0]
        cam.stalls = 1
        with pytest.raises(CameraTimeoutError, match=r"no frame within 0\.5 s"):
            src.read(timeout_s=0.5)
        frame = src.read()
        assert frame is not None and frame.seq == 0
        assert len(cam.jobs) == 1  # waited on the same job: no request left behind
        assert cam.requests[0].released


def test_a_busy_camera_is_unavailable() -> None:
    module = FakeModule(RuntimeError("Failed to acquire camera: Device or resource busy"))
    with pytest.raises(CameraUnavailableError, match="Device or resource busy"):
        source(module).open()


def test_a_camera_that_fails_to_start_is_closed() -> None:
    module = FakeModule()
    src = source(module)
    original = module.make

    def make_failing(camera_num: int = 0) -> FakePicamera2:
        cam = original(camera_num)
        cam.start_error = RuntimeError("start failed")
        return cam

    module.make = make_failing  # type: ignore[method-assign]
    with pytest.raises(CameraUnavailableError, match="start failed"):
        src.open()
    assert module.cameras[0].calls[-1] == "close"


def test_close_is_idempotent_and_read_after_close_fails() -> None:
    module = FakeModule()
    src = source(module)
    src.open()
    src.close()
    src.close()
    assert module.cameras[0].calls.count("close") == 1
    with pytest.raises(FrameSourceError, match="before open"):
        src.read()


def test_importing_the_module_does_not_import_picamera2() -> None:
    code = "import sys, drivers.picamera; print('picamera2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
