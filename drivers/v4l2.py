"""USB and other V4L2 cameras through OpenCV's V4L2 backend, delivering gray frames."""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Frame, FrameSource, GrayImage

log = logging.getLogger(__name__)

_NS_PER_S = 1_000_000_000
# A driver timestamp older than this is taken for a different clock, not for a queued frame.
_MAX_FRAME_AGE_NS = 2 * _NS_PER_S

# Formats whose luma OpenCV can hand over untouched (CAP_PROP_CONVERT_RGB = 0): the frame is
# then the camera's own Y plane (or a JPEG decoded straight to gray), with no BGR round trip.
_PACKED_Y_FIRST = frozenset({"YUYV", "YUY2", "YVYU"})
_PACKED_Y_SECOND = frozenset({"UYVY", "VYUY"})
_PLANAR_420 = frozenset({"YU12", "YV12", "NV12", "NV21", "I420"})
_GREY = frozenset({"GREY", "Y800", "Y8  "})
_JPEG = frozenset({"MJPG", "JPEG"})
_RAW_FORMATS = _PACKED_Y_FIRST | _PACKED_Y_SECOND | _PLANAR_420 | _GREY | _JPEG


def fourcc_code(name: str) -> int:
    """The V4L2 integer code of a four-character pixel format name ("YUYV", "MJPG", "GREY")."""
    if len(name) != 4 or not name.isascii():
        raise ValueError(f"a pixel format is 4 ASCII characters, got {name!r}")
    return sum(ord(c) << (8 * i) for i, c in enumerate(name))


def fourcc_name(code: float) -> str:
    """The four-character name of a V4L2 pixel format code ("" when the code is 0 or invalid)."""
    value = int(code) if math.isfinite(code) and code > 0 else 0
    chars = [chr((value >> (8 * i)) & 0xFF) for i in range(4)]
    return "".join(chars) if value and all(" " <= c <= "~" for c in chars) else ""


def _default_capture_factory(device: str | int, api: int) -> Any:
    import cv2

    return cv2.VideoCapture(device, api)


class V4L2Source(FrameSource):
    """A V4L2 camera (``/dev/videoN`` or its index) read through ``cv2.VideoCapture``.

    ``width``/``height`` (pixels) and ``fps`` are requested; the camera may pick the nearest mode
    it has, and the mode it gave is logged at open. ``pixel_format``: a V4L2 four-character code
    to ask for ("YUYV", "MJPG", "GREY"), or None for OpenCV's choice. For YUYV/UYVY, GREY, planar
    4:2:0 and MJPG the luma is taken without colour conversion; other formats go through BGR.
    ``buffers``: driver buffers (1-10); few buffers keep queued frames from getting old.
    ``driver_timestamps``: take ``Frame.t_ns`` from the kernel's buffer timestamp (the monotonic
    clock on Linux, the time the frame was captured) when it is plausible, else the time ``read``
    returned. ``capture_factory(device, cv2.CAP_V4L2)`` makes the capture object; tests inject a
    fake. OpenCV is imported only when the default factory is used.
    """

    def __init__(
        self,
        device: str | int = "/dev/video0",
        *,
        width: int = 640,
        height: int = 480,
        fps: float = 30.0,
        pixel_format: str | None = None,
        buffers: int = 2,
        driver_timestamps: bool = True,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        capture_factory: Callable[[str | int, int], Any] = _default_capture_factory,
    ) -> None:
        if width <= 0 or height <= 0 or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"bad camera mode {width}x{height} at {fps} fps")
        if not 1 <= buffers <= 10:
            raise ValueError(f"buffers must be 1..10, got {buffers}")
        self._fourcc = fourcc_code(pixel_format) if pixel_format is not None else None
        self.device = device
        self.name = f"v4l2:{device}"
        self._want = (width, height, fps)
        self._buffers = buffers
        self._driver_timestamps = driver_timestamps
        self._monotonic_ns = monotonic_ns
        self._factory = capture_factory
        self._capture: Any = None
        self._cv2: Any = None
        self._format = ""
        self._size = (width, height)
        self._fps_given = 0.0
        self._raw = False
        self._seq = 0

    @property
    def mode(self) -> tuple[int, int, float, str]:
        """What the camera gave at open: (width, height, fps, pixel format name)."""
        return (*self._size, self._fps_given, self._format)

    def open(self) -> None:
        """Open and configure the camera.

        Raises :class:`drivers.exceptions.CameraUnavailableError` naming the device and the
        likely cause (missing device, no permission: the ``video`` group, busy) when it cannot
        be opened.
        """
        self.close()
        import cv2  # the constants only; the capture itself comes from the factory

        self._cv2 = cv2
        try:
            capture = self._factory(self.device, cv2.CAP_V4L2)
        except Exception as e:  # OpenCV raises cv2.error for some bad arguments
            raise CameraUnavailableError(
                f"{self.name}: cannot open: {e}; {_hint(self.device)}"
            ) from e
        try:
            if not capture.isOpened():
                raise CameraUnavailableError(f"{self.name}: cannot open; {_hint(self.device)}")
            self._configure(capture)
        except BaseException:
            capture.release()
            raise
        self._capture = capture
        self._seq = 0

    def _configure(self, capture: Any) -> None:
        cv2 = self._cv2
        width, height, fps = self._want
        if self._fourcc is not None:
            capture.set(cv2.CAP_PROP_FOURCC, self._fourcc)
        capture.set(cv2.CAP_PROP_FRAME_WIDTH, width)
        capture.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
        capture.set(cv2.CAP_PROP_FPS, fps)
        capture.set(cv2.CAP_PROP_BUFFERSIZE, self._buffers)
        self._size = (
            int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)),
            int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
        self._fps_given = float(capture.get(cv2.CAP_PROP_FPS))
        self._format = fourcc_name(capture.get(cv2.CAP_PROP_FOURCC))
        self._raw = (
            self._format in _RAW_FORMATS
            and bool(capture.set(cv2.CAP_PROP_CONVERT_RGB, 0))
            and capture.get(cv2.CAP_PROP_CONVERT_RGB) == 0
        )
        if not self._raw:
            capture.set(cv2.CAP_PROP_CONVERT_RGB, 1)
        log.info(
            "%s: %dx%d %s at %.1f fps (asked %dx%d at %.1f fps), %s",
            self.name,
            *self._size,
            self._format or "?",
            self._fps_given,
            width,
            height,
            fps,
            "luma taken directly" if self._raw else "converted from BGR",
        )

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """The next frame from the camera (never ``None``).

        Raises :class:`drivers.exceptions.CameraTimeoutError` when the driver gives no frame
        (OpenCV's V4L2 backend waits up to $OPENCV_VIDEOIO_V4L_SELECT_TIMEOUT, default 10 s,
        and cannot be interrupted sooner) or the frame came later than ``timeout_s``;
        :class:`drivers.exceptions.FrameSourceError` when not open or the frame is garbled.
        """
        capture = self._capture
        if capture is None:
            raise FrameSourceError(f"{self.name}: read() before open() or after close()")
        start = self._monotonic_ns()
        try:
            ok, data = capture.read()
        except Exception as e:  # cv2.error: the device went away under the driver
            raise CameraTimeoutError(f"{self.name}: read failed: {e}") from e
        now = self._monotonic_ns()
        if not ok or data is None:
            raise CameraTimeoutError(
                f"{self.name}: no frame (camera unplugged, stalled, or busy): re-open it"
            )
        if now - start > timeout_s * _NS_PER_S:
            raise CameraTimeoutError(
                f"{self.name}: frame took {(now - start) / _NS_PER_S:.1f} s,"
                f" beyond the {timeout_s} s read timeout"
            )
        image = self._to_gray(np.asarray(data))
        frame = Frame(image=image, t_ns=self._capture_time(capture, now), seq=self._seq)
        self._seq += 1
        return frame

    def _capture_time(self, capture: Any, now: int) -> int:
        if not self._driver_timestamps:
            return now
        ms = float(capture.get(self._cv2.CAP_PROP_POS_MSEC))
        if not math.isfinite(ms) or ms <= 0:
            return now
        t_ns = round(ms * 1_000_000)
        # Equal clocks make the stamp a little older than now; anything else is another clock.
        return t_ns if now - _MAX_FRAME_AGE_NS <= t_ns <= now else now

    def _to_gray(self, data: np.ndarray[Any, Any]) -> GrayImage:
        width, height = self._size
        fmt = self._format
        if data.dtype == np.uint16:  # Y10/Y12/Y16 deliver 16-bit words: keep the top 8 bits
            shift = {"Y10 ": 2, "Y12 ": 4}.get(fmt, 8)
            data = (data >> shift).astype(np.uint8)
        if data.ndim == 3 and data.shape[2] == 3:
            return np.asarray(self._cv2.cvtColor(data, self._cv2.COLOR_BGR2GRAY), dtype=np.uint8)
        if data.ndim == 3 and data.shape[2] == 2:  # packed 4:2:2 as HxWx2
            return np.ascontiguousarray(data[:, :, 1 if fmt in _PACKED_Y_SECOND else 0])
        if data.ndim == 3 and data.shape[2] == 1:
            data = data[:, :, 0]
        if data.ndim == 2 and data.shape == (height, width):
            return np.ascontiguousarray(data, dtype=np.uint8)
        if data.ndim == 2 and data.shape == (height * 3 // 2, width):  # planar 4:2:0: Y first
            return np.ascontiguousarray(data[:height])
        raw = data.reshape(-1)
        if fmt in _JPEG:
            gray = self._cv2.imdecode(raw, self._cv2.IMREAD_GRAYSCALE)
            if gray is None:
                raise FrameSourceError(f"{self.name}: the camera sent a corrupt JPEG frame")
            return np.asarray(gray, dtype=np.uint8)
        if raw.size == width * height * 2 and fmt in _PACKED_Y_FIRST | _PACKED_Y_SECOND:
            offset = 1 if fmt in _PACKED_Y_SECOND else 0
            return np.ascontiguousarray(raw.reshape(height, width * 2)[:, offset::2])
        if raw.size >= width * height and fmt in _GREY | _PLANAR_420:
            return np.ascontiguousarray(raw[: width * height].reshape(height, width))
        raise FrameSourceError(
            f"{self.name}: unexpected {fmt or '?'} frame of shape {data.shape} for {width}x{height}"
        )

    def close(self) -> None:
        """Release the camera. Safe to call twice."""
        if self._capture is not None:
            capture, self._capture = self._capture, None
            capture.release()


def _hint(device: str | int) -> str:
    path = device if isinstance(device, str) else f"/dev/video{device}"
    if not os.path.exists(path):
        return (
            f"{path} does not exist: is the camera plugged in? (list them: v4l2-ctl --list-devices)"
        )
    if not os.access(path, os.R_OK | os.W_OK):
        return (
            f"no permission on {path}: add the service user to the 'video' group"
            " (sudo usermod -aG video USER, then log in again)"
        )
    return (
        f"{path} may be busy (another process holds it: fuser -v {path}) or is not a capture"
        " node (a camera often has two /dev/video* nodes: try the other one)"
    )
