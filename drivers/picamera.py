"""Raspberry Pi camera modules through picamera2: the Y plane of a YUV420 "lores" stream.

Minimal path only (configure, start, one request per frame, stop): autofocus, snapshots from the
main stream and recovery from libcamera hangs come with the Raspberry Pi work.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Frame, FrameSource

log = logging.getLogger(__name__)

_NS_PER_S = 1_000_000_000
_MAX_FRAME_AGE_NS = 2 * _NS_PER_S  # an older SensorTimestamp is taken for another clock

INSTALL_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS install python3-picamera2 and create the"
    " venv with --system-site-packages"
)


def _import_picamera2() -> Any:
    import picamera2

    return picamera2


class Picamera2Source(FrameSource):
    """A Raspberry Pi camera (libcamera) read with picamera2.

    ``size``: (width, height) in pixels of the gray frames (picamera2 may align it; the size it
    gave is used); ``fps``: frame rate asked with ``FrameDurationLimits``. ``camera_num``: which
    camera. ``module_loader`` returns the ``picamera2`` module (tests inject a fake); it runs in
    ``open()``, so importing this module never needs picamera2.
    ``Frame.t_ns`` is the request's ``SensorTimestamp`` (the monotonic clock, the time the frame
    was exposed: a request may have waited in a queue) when plausible, else the time ``read``
    returned.
    """

    name = "picamera2"

    def __init__(
        self,
        *,
        size: tuple[int, int] = (640, 480),
        fps: float = 30.0,
        camera_num: int = 0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        module_loader: Callable[[], Any] = _import_picamera2,
    ) -> None:
        if size[0] <= 0 or size[1] <= 0 or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"bad camera mode {size[0]}x{size[1]} at {fps} fps")
        self._size_asked = (int(size[0]), int(size[1]))
        self._fps = fps
        self._camera_num = camera_num
        self._monotonic_ns = monotonic_ns
        self._loader = module_loader
        self._camera: Any = None
        self._pending: Any = None  # a capture job that timed out: its request is still ours
        self._size = self._size_asked
        self._seq = 0

    def open(self) -> None:
        """Import picamera2, open the camera, configure the lores YUV420 stream and start it.

        Raises :class:`drivers.exceptions.CameraUnavailableError` when picamera2 cannot be
        imported (with :data:`INSTALL_HINT`), no camera is found, or it is busy.
        """
        self.close()
        try:
            picamera2 = self._loader()
        except ImportError as e:
            raise CameraUnavailableError(f"{INSTALL_HINT} (import failed: {e})") from e
        try:
            camera = picamera2.Picamera2(self._camera_num)
        except Exception as e:  # RuntimeError "Camera(s) not found", "Device or resource busy"
            raise CameraUnavailableError(
                f"picamera2: cannot open camera {self._camera_num}: {e} (is the ribbon cable"
                " seated, the camera enabled, and no other process using it?)"
            ) from e
        try:
            frame_us = round(1_000_000 / self._fps)
            config = camera.create_video_configuration(
                main={"size": self._size_asked},
                lores={"size": self._size_asked, "format": "YUV420"},
                controls={"FrameDurationLimits": (frame_us, frame_us)},
            )
            camera.configure(config)
            width, height = camera.camera_configuration()["lores"]["size"]
            camera.start()
        except Exception as e:
            camera.close()
            raise CameraUnavailableError(f"picamera2: cannot start camera: {e}") from e
        self._size = (int(width), int(height))
        self._camera = camera
        self._seq = 0
        log.info("picamera2: lores %dx%d YUV420 at %.1f fps", *self._size, self._fps)

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """The next frame's Y plane (never ``None``).

        Raises :class:`drivers.exceptions.CameraTimeoutError` when no frame completes within
        ``timeout_s`` (the next call waits for that same request, so none leaks), and
        :class:`drivers.exceptions.FrameSourceError` when not open.
        """
        camera = self._camera
        if camera is None:
            raise FrameSourceError("picamera2: read() before open() or after close()")
        job = self._pending if self._pending is not None else camera.capture_request(wait=False)
        try:
            request = job.get_result(timeout=timeout_s)
        except TimeoutError as e:
            self._pending = job
            raise CameraTimeoutError(f"picamera2: no frame within {timeout_s} s") from e
        self._pending = None
        now = self._monotonic_ns()
        try:
            width, height = self._size
            yuv = request.make_array("lores")
            image = np.ascontiguousarray(yuv[:height, :width], dtype=np.uint8)
            stamp = request.get_metadata().get("SensorTimestamp")
        finally:
            request.release()  # back to libcamera at once: it has only a few buffers
        t_ns = now
        if isinstance(stamp, int) and now - _MAX_FRAME_AGE_NS <= stamp <= now:
            t_ns = stamp
        frame = Frame(image=image, t_ns=t_ns, seq=self._seq)
        self._seq += 1
        return frame

    def close(self) -> None:
        """Stop and close the camera. Safe to call twice."""
        camera, self._camera, self._pending = self._camera, None, None
        if camera is None:
            return
        try:
            camera.stop()
        finally:
            camera.close()
