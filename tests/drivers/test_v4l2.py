"""V4L2Source against a fake of the cv2.VideoCapture calls it makes (no webcam here)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.v4l2 import V4L2Source, fourcc_code, fourcc_name
from tests.shared import REPO

W, H = 64, 48
NOW_NS = 50_000_000_000


def scene(value: int) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """A gray test picture with structure (so a wrong plane or stride shows)."""
    y, x = np.mgrid[0:H, 0:W]
    picture: np.ndarray[Any, np.dtype[np.uint8]] = ((x * 3 + y * 2 + value) % 256).astype(np.uint8)
    return picture


def to_yuyv(gray: np.ndarray[Any, np.dtype[np.uint8]]) -> np.ndarray[Any, np.dtype[np.uint8]]:
    """Packed YUYV as OpenCV's V4L2 backend returns it with CONVERT_RGB off: HxWx2."""
    out = np.empty((H, W, 2), np.uint8)
    out[:, :, 0] = gray
    out[:, :, 1] = np.where(np.arange(W) % 2 == 0, 100, 160)  # U, V alternate
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW_NS

    def monotonic_ns(self) -> int:
        return self.now


class FakeCapture:
    """The subset of cv2.VideoCapture used, behaving like OpenCV's V4L2 backend.

    The camera has one mode (W x H at 30 fps) in ``fmt``: set() of a size or rate it lacks
    is accepted and ignored, as V4L2 drivers clamp. read() returns what OpenCV would for the
    format and CONVERT_RGB setting; POS_MSEC is the buffer's monotonic timestamp.
    """

    def __init__(
        self,
        device: str | int,
        api: int,
        *,
        fmt: str = "YUYV",
        opened: bool = True,
        clock: FakeClock | None = None,
    ) -> None:
        self.device, self.api, self.fmt, self.opened = device, api, fmt, opened
        self.clock = clock or FakeClock()
        self.convert_rgb = 1
        self.calls: list[tuple[str, int, float]] = []
        self.released = 0
        self.frames = 0
        self.stamp_ms: float | None = None  # None: 1 ms before the read returns
        self.fail_next_read = False
        self.read_takes_s = 0.0

    def isOpened(self) -> bool:  # noqa: N802 - OpenCV's name
        return self.opened

    def set(self, prop: int, value: float) -> bool:
        self.calls.append(("set", prop, value))
        if prop == cv2.CAP_PROP_CONVERT_RGB:
            self.convert_rgb = int(value)
            return True
        if prop == cv2.CAP_PROP_FOURCC:
            return int(value) == fourcc_code(self.fmt)  # only the camera's own format
        return True

    def get(self, prop: int) -> float:
        values = {
            cv2.CAP_PROP_FRAME_WIDTH: float(W),
            cv2.CAP_PROP_FRAME_HEIGHT: float(H),
            cv2.CAP_PROP_FPS: 30.0,
            cv2.CAP_PROP_FOURCC: float(fourcc_code(self.fmt)),
            cv2.CAP_PROP_CONVERT_RGB: float(self.convert_rgb),
            cv2.CAP_PROP_POS_MSEC: self._stamp(),
        }
        return values.get(prop, -1.0)

    def _stamp(self) -> float:
        if self.frames == 0:
            return 0.0  # OpenCV: 0 before the first grab
        return self.stamp_ms if self.stamp_ms is not None else self.clock.now / 1e6 - 1.0

    def read(self) -> tuple[bool, Any]:
        self.clock.now += round(self.read_takes_s * 1e9)
        if self.fail_next_read:
            return False, None
        gray = scene(self.frames)
        self.frames += 1
        if self.fmt == "YUYV":
            raw = to_yuyv(gray)
            if self.convert_rgb:
                return True, cv2.cvtColor(raw, cv2.COLOR_YUV2BGR_YUYV)
            return True, raw
        if self.fmt == "GREY":
            return True, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR) if self.convert_rgb else gray
        if self.fmt == "MJPG":
            ok, jpeg = cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_QUALITY, 95])
            assert ok
            if self.convert_rgb:
                return True, cv2.imdecode(jpeg, cv2.IMREAD_COLOR)
            return True, jpeg.reshape(1, -1)  # the compressed bytes, one row
        if self.fmt == "NV12":
            planar = np.vstack([gray, np.full((H // 2, W), 128, np.uint8)])
            if self.convert_rgb:
                return True, cv2.cvtColor(planar, cv2.COLOR_YUV2BGR_NV12)
            return True, planar
        # BGR3 and any format OpenCV only hands over converted
        return True, cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)

    def release(self) -> None:
        self.released += 1


class Factory:
    def __init__(self, **kw: Any) -> None:
        self.kw = kw
        self.made: list[FakeCapture] = []

    def __call__(self, device: str | int, api: int) -> FakeCapture:
        self.made.append(FakeCapture(device, api, **self.kw))
        return self.made[-1]


def make(fmt: str = "YUYV", **kw: Any) -> tuple[V4L2Source, Factory, FakeClock]:
    clock = FakeClock()
    factory = Factory(fmt=fmt, clock=clock)
    src = V4L2Source(
        "/dev/video0",
        width=W,
        height=H,
        fps=30,
        monotonic_ns=clock.monotonic_ns,
        capture_factory=factory,
        **kw,
    )
    return src, factory, clock


@pytest.mark.parametrize("fmt", ["YUYV", "GREY", "NV12"])
def test_luma_is_taken_without_colour_conversion(fmt: str) -> None:
    src, factory, _ = make(fmt)
    with src:
        frames = [src.read() for _ in range(3)]
        assert src.mode == (W, H, 30.0, fmt)
    cap = factory.made[0]
    assert cap.device == "/dev/video0" and cap.api == cv2.CAP_V4L2
    assert ("set", cv2.CAP_PROP_CONVERT_RGB, 0) in cap.calls
    for i, f in enumerate(frames):
        assert f is not None and f.seq == i
        assert f.image.dtype == np.uint8 and f.image.shape == (H, W) and f.image.flags.c_contiguous
        assert np.array_equal(f.image, scene(i))  # exactly the camera's Y plane


def test_mjpeg_is_decoded_straight_to_gray() -> None:
    src, _, _ = make("MJPG")
    with src:
        frame = src.read()
    assert frame is not None and frame.image.shape == (H, W)
    assert np.abs(frame.image.astype(int) - scene(0)).mean() < 3


def test_other_formats_are_converted_from_bgr() -> None:
    src, factory, _ = make("BGR3")
    with src:
        frame = src.read()
    assert ("set", cv2.CAP_PROP_CONVERT_RGB, 0) not in factory.made[0].calls
    assert frame is not None and np.array_equal(frame.image, scene(0))


def test_requested_mode_is_set_before_reading_back() -> None:
    src, factory, _ = make("YUYV", pixel_format="YUYV", buffers=3)
    src.open()
    src.close()
    sets = [(prop, value) for kind, prop, value in factory.made[0].calls if kind == "set"]
    assert sets[:5] == [
        (cv2.CAP_PROP_FOURCC, fourcc_code("YUYV")),
        (cv2.CAP_PROP_FRAME_WIDTH, W),
        (cv2.CAP_PROP_FRAME_HEIGHT, H),
        (cv2.CAP_PROP_FPS, 30),
        (cv2.CAP_PROP_BUFFERSIZE, 3),
    ]


def test_frame_time_is_the_driver_timestamp_when_plausible() -> None:
    src, factory, clock = make()
    with src:
        first = src.read()
        assert first is not None and first.t_ns == NOW_NS - 1_000_000  # 1 ms before return
        factory.made[0].stamp_ms = 1.7e12  # wall-clock milliseconds: another clock
        second = src.read()
        assert second is not None and second.t_ns == clock.now
        factory.made[0].stamp_ms = (NOW_NS - 30_000_000) / 1e6  # queued 30 ms
        third = src.read()
        assert third is not None and third.t_ns == NOW_NS - 30_000_000


def test_driver_timestamps_can_be_turned_off() -> None:
    src, _, clock = make(driver_timestamps=False)
    with src:
        frame = src.read()
    assert frame is not None and frame.t_ns == clock.now


def test_failed_read_is_a_camera_timeout() -> None:
    src, factory, _ = make()
    with src:
        factory.made[0].fail_next_read = True
        with pytest.raises(CameraTimeoutError, match="no frame"):
            src.read()


def test_a_frame_later_than_the_timeout_is_a_camera_timeout() -> None:
    src, factory, _ = make()
    with src:
        factory.made[0].read_takes_s = 6.0
        with pytest.raises(CameraTimeoutError, match=r"took 6\.0 s"):
            src.read(timeout_s=5.0)


def test_missing_device_names_it_and_says_how_to_list_cameras(tmp_path: Path) -> None:
    device = str(tmp_path / "video9")
    factory = Factory(opened=False)
    src = V4L2Source(device, capture_factory=factory)
    with pytest.raises(CameraUnavailableError, match=r"video9 does not exist.*list-devices"):
        src.open()
    assert factory.made[0].released == 1


def test_unreadable_device_hints_at_the_video_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    device = tmp_path / "video0"
    device.touch()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as for a non-root user
    src = V4L2Source(str(device), capture_factory=Factory(opened=False))
    with pytest.raises(CameraUnavailableError, match="'video' group"):
        src.open()


def test_existing_device_that_does_not_open_is_probably_busy(tmp_path: Path) -> None:
    device = tmp_path / "video0"
    device.touch()
    src = V4L2Source(str(device), capture_factory=Factory(opened=False))
    with pytest.raises(CameraUnavailableError, match=f"{device} may be busy"):
        src.open()


def test_an_index_is_named_as_its_device_node() -> None:
    src = V4L2Source(77, capture_factory=Factory(opened=False))
    with pytest.raises(CameraUnavailableError, match=r"v4l2:77.*/dev/video77"):
        src.open()


def test_close_releases_once_and_read_after_close_fails() -> None:
    src, factory, _ = make()
    src.open()
    src.close()
    src.close()
    assert factory.made[0].released == 1
    with pytest.raises(FrameSourceError, match="before open"):
        src.read()


def test_fourcc_helpers() -> None:
    assert fourcc_code("YUYV") == 0x56595559
    assert fourcc_name(float(0x56595559)) == "YUYV"
    assert fourcc_name(0.0) == "" and fourcc_name(-1.0) == ""
    with pytest.raises(ValueError):
        fourcc_code("YUY")


def test_importing_v4l2_does_not_import_opencv() -> None:
    code = "import sys, drivers.v4l2; print('cv2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
