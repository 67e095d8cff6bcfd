"""Raspberry Pi camera modules through picamera2: the Y plane of a YUV420 "lores" stream.

Gray frames come from the lores stream with no conversion; the main stream (RGB) serves
snapshots. Autofocus (Camera Module 3) is set to continuous over the macro range when the camera
has it; exposure is biased for phone screens. picamera2 is imported in ``open()`` only.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

from drivers.exceptions import CameraTimeoutError, CameraUnavailableError, FrameSourceError
from drivers.frames import Frame, FrameSource

log = logging.getLogger(__name__)

_NS_PER_S = 1_000_000_000
_MAX_FRAME_AGE_NS = 2 * _NS_PER_S  # an older SensorTimestamp is taken for another clock
# A focus cycle whose end the metadata never shows (no AfState) gives the lens back to
# continuous AF after this long, longer than a sweep of the whole lens range should take.
_FOCUS_CYCLE_MAX_NS = 3 * _NS_PER_S
# Four buffers per stream instead of the video default of six: the reader holds one request at
# a time and releases it at once, and a 1280x720 RGB main buffer costs 2.7 MB of CMA memory.
_BUFFER_COUNT = 4

AUTOFOCUS_MODES = ("continuous", "off")
FOCUS_RANGES = ("macro", "normal", "full")
_RANGE_NAMES = {"macro": "Macro", "normal": "Normal", "full": "Full"}

INSTALL_HINT = (
    "picamera2 is not installed: on Raspberry Pi OS install python3-picamera2 and create the"
    " venv with --system-site-packages"
)


def _import_picamera2() -> Any:
    """``Picamera2`` and libcamera's ``controls`` (the enums) in one namespace."""
    import picamera2
    from libcamera import controls

    return SimpleNamespace(Picamera2=picamera2.Picamera2, controls=controls)


def _reasons(error: BaseException) -> str:
    """The message of ``error`` and of its causes: picamera2 wraps "Device or resource busy"
    in "Camera __init__ sequence did not complete"."""
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 4:
        text = str(seen) or type(seen).__name__
        if text not in parts:
            parts.append(text)
        seen = seen.__cause__ or seen.__context__
    return ": ".join(parts)


class Picamera2Source(FrameSource):
    """A Raspberry Pi camera (libcamera) read with picamera2.

    ``size``: (width, height) in pixels of the gray frames (the lores stream; libcamera may
    adjust it: the size it gave is used); ``snapshot_size``: (width, height) of the main stream
    that :meth:`snapshot` returns (not smaller than ``size``); ``fps``: frame rate asked with
    ``FrameDurationLimits``. ``autofocus``: "continuous" (continuous AF over ``focus_range``
    "macro" (about 10-30 cm) | "normal" | "full", on cameras that have AF) or "off" (the lens is
    left alone and :meth:`focus_cycle` does nothing). ``exposure_value``: AE bias in stops,
    clamped to the camera's range. ``camera_num``: which camera. ``module_loader`` returns an
    object with ``Picamera2`` and libcamera's ``controls`` (tests inject a fake); it runs in
    ``open()``, so importing this module never needs picamera2.
    ``Frame.t_ns`` is the request's ``SensorTimestamp`` (the monotonic clock, the time the frame
    was exposed: a request may have waited in a queue) when plausible, else the time ``read``
    returned.

    ``read``, ``snapshot`` and ``close`` belong to the capture thread; :meth:`focus_cycle` may
    be called from any thread.
    """

    name = "picamera2"

    def __init__(
        self,
        *,
        size: tuple[int, int] = (640, 480),
        fps: float = 30.0,
        snapshot_size: tuple[int, int] = (1280, 720),
        autofocus: str = "continuous",
        focus_range: str = "macro",
        exposure_value: float = -0.5,
        camera_num: int = 0,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        module_loader: Callable[[], Any] = _import_picamera2,
    ) -> None:
        if size[0] <= 0 or size[1] <= 0 or not (math.isfinite(fps) and fps > 0):
            raise ValueError(f"bad camera mode {size[0]}x{size[1]} at {fps} fps")
        if snapshot_size[0] < size[0] or snapshot_size[1] < size[1]:
            # picamera2 refuses a lores stream larger than the main stream
            raise ValueError(
                f"snapshot size {snapshot_size[0]}x{snapshot_size[1]} is smaller than the frame"
                f" size {size[0]}x{size[1]}"
            )
        if autofocus not in AUTOFOCUS_MODES:
            raise ValueError(f"autofocus {autofocus!r}: choose one of {', '.join(AUTOFOCUS_MODES)}")
        if focus_range not in FOCUS_RANGES:
            raise ValueError(
                f"focus range {focus_range!r}: choose one of {', '.join(FOCUS_RANGES)}"
            )
        if not math.isfinite(exposure_value):
            raise ValueError(f"exposure value {exposure_value} is not a number of stops")
        self._size_asked = (int(size[0]), int(size[1]))
        self._snapshot_asked = (int(snapshot_size[0]), int(snapshot_size[1]))
        self._fps = fps
        self._autofocus = autofocus
        self._focus_range = focus_range
        self._exposure_value = float(exposure_value)
        self._camera_num = camera_num
        self._monotonic_ns = monotonic_ns
        self._loader = module_loader
        self._camera: Any = None
        self._controls: Any = None  # libcamera's controls (enums) from the loader
        self._pending: Any = None  # a capture job that timed out: its request is still ours
        self._size = self._size_asked
        self._stride = self._size_asked[0]
        self._seq = 0
        self._has_af = False
        # focus_cycle runs on the scan thread while read() runs on the capture thread
        self._focus_lock = threading.Lock()
        self._focus_started_ns: int | None = None  # a triggered cycle not yet handed back
        self._focus_scanning = False

    # -- opening ----------------------------------------------------------------------------

    def open(self) -> None:
        """Import picamera2, open the camera, configure the lores YUV420 and main RGB streams,
        set focus and exposure controls, and start it. An instance already open is closed
        first, so repeated open() calls hold one camera at most.

        Raises :class:`drivers.exceptions.CameraUnavailableError` when picamera2 cannot be
        imported (with :data:`INSTALL_HINT`), no camera is found, it is busy, or it does not
        start; the caller retries with backoff.
        """
        self.close()
        try:
            module = self._loader()
        except ImportError as e:
            raise CameraUnavailableError(f"{INSTALL_HINT} (import failed: {e})") from e
        try:
            camera = module.Picamera2(self._camera_num)
        except Exception as e:  # RuntimeError "Camera(s) not found", "Device or resource busy"
            raise CameraUnavailableError(
                f"picamera2: cannot open camera {self._camera_num}: {_reasons(e)} (is the ribbon"
                " cable seated, the camera enabled, and no other process using it? A crashed"
                " process may hold it for a few seconds: retry with backoff)"
            ) from e
        try:
            frame_us = round(1_000_000 / self._fps)
            config = camera.create_video_configuration(
                main={"size": self._snapshot_asked, "format": "RGB888"},
                lores={"size": self._size_asked, "format": "YUV420"},
                controls={"FrameDurationLimits": (frame_us, frame_us)},
                buffer_count=_BUFFER_COUNT,
            )
            camera.configure(config)
            lores = camera.camera_configuration()["lores"]
            width, height = (int(v) for v in lores["size"])
            stride = int(lores.get("stride") or width)
            self._controls = module.controls
            controls, self._has_af = self._start_controls(camera.camera_controls)
            if controls:
                camera.set_controls(controls)  # applied from the first request on
            camera.start()
        except Exception as e:
            self._close_quietly(camera)
            raise CameraUnavailableError(
                f"picamera2: cannot start camera {self._camera_num}: {_reasons(e)}"
            ) from e
        self._size = (width, height)
        self._stride = stride
        self._seq = 0
        with self._focus_lock:
            self._focus_started_ns = None
            self._focus_scanning = False
            self._camera = camera
        main_w, main_h = self._snapshot_asked
        if abs(width * main_h - height * main_w) > 0.02 * height * main_w:
            # both streams are scaled from one sensor crop: the gray frames come out stretched
            log.warning(
                "picamera2: frame size %dx%d and snapshot size %dx%d differ in aspect ratio:"
                " gray frames are stretched; give both one aspect ratio",
                width,
                height,
                main_w,
                main_h,
            )
        log.info(
            "picamera2: lores %dx%d YUV420 at %.1f fps, autofocus %s",
            width,
            height,
            self._fps,
            f"{self._autofocus} ({self._focus_range})" if self._has_af else "none",
        )

    def _start_controls(self, available: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """The controls to set at start, each only when the camera lists it; and whether the
        camera has autofocus we drive."""
        c = self._controls
        wanted: dict[str, Any] = {}
        has_af = self._autofocus == "continuous" and "AfMode" in available
        if has_af:
            wanted.update(self._continuous_af(available))
        if "AeEnable" in available:
            wanted["AeEnable"] = True  # the bias below only works on top of auto exposure
        if "ExposureValue" in available:
            lo, hi, _ = available["ExposureValue"]
            # A phone screen is an emitter brighter than the hand and room around it: metered
            # on the whole scene it burns out to white and the modules vanish. A negative bias
            # keeps the screen's white below saturation; a printed card loses little by it.
            wanted["ExposureValue"] = min(max(self._exposure_value, float(lo)), float(hi))
        metering = getattr(getattr(c, "AeMeteringModeEnum", None), "CentreWeighted", None)
        if "AeMeteringMode" in available and metering is not None:
            # Centre-weighted: the code is held roughly mid-frame, so its light counts most,
            # while a spot meter would jump as the phone moves in and out of the small spot.
            wanted["AeMeteringMode"] = metering
        short = getattr(getattr(c, "AeExposureModeEnum", None), "Short", None)
        if "AeExposureMode" in available and short is not None:
            # Short exposures (more gain instead) keep a moving hand sharp: motion blur costs
            # more reads than sensor noise does.
            wanted["AeExposureMode"] = short
        return wanted, has_af

    def _continuous_af(self, available: dict[str, Any]) -> dict[str, Any]:
        c = self._controls
        controls: dict[str, Any] = {"AfMode": c.AfModeEnum.Continuous}
        if "AfRange" in available:
            controls["AfRange"] = getattr(c.AfRangeEnum, _RANGE_NAMES[self._focus_range])
        return controls

    # -- frames -----------------------------------------------------------------------------

    def _next_request(self, timeout_s: float) -> Any:
        """The next completed request (the caller releases it). Raises CameraTimeoutError."""
        camera = self._camera
        if camera is None:
            raise FrameSourceError("picamera2: read() before open() or after close()")
        # Never a blocking capture_request(): after a libcamera hiccup it may never return
        # (picamera2 #794, #1004). The job is waited on with a timeout and kept when it runs
        # out, so the request it eventually brings is released by the next read, not leaked.
        job = self._pending if self._pending is not None else camera.capture_request(wait=False)
        try:
            request = job.get_result(timeout=timeout_s)
        except TimeoutError as e:  # concurrent.futures.TimeoutError is this one since 3.11
            self._pending = job
            raise CameraTimeoutError(
                f"picamera2: no frame within {timeout_s} s; the camera stalled: re-open it"
            ) from e
        self._pending = None
        return request

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """The next frame: the lores Y plane, gray HxW uint8 (never ``None``).

        Raises :class:`drivers.exceptions.CameraTimeoutError` when no frame completes within
        ``timeout_s`` seconds (the next call waits for that same request, so none leaks), and
        :class:`drivers.exceptions.FrameSourceError` when not open.
        """
        request = self._next_request(timeout_s)
        now = self._monotonic_ns()
        try:
            width, height = self._size
            stride = self._stride
            buffer = request.make_buffer("lores")
            metadata = request.get_metadata()
        finally:
            request.release()  # back to libcamera at once: it has only a few buffers
        if buffer.size < height * stride:
            raise FrameSourceError(
                f"picamera2: lores buffer of {buffer.size} bytes is short of {height}x{stride}"
            )
        # YUV420: `height` rows of `stride` bytes of Y first; bytes past `width` are padding
        y = buffer[: height * stride].reshape(height, stride)[:, :width]
        image = np.ascontiguousarray(y, dtype=np.uint8)
        stamp = metadata.get("SensorTimestamp")
        t_ns = now
        if isinstance(stamp, int) and now - _MAX_FRAME_AGE_NS <= stamp <= now:
            t_ns = stamp
        self._follow_focus(metadata.get("AfState"), now)
        frame = Frame(image=image, t_ns=t_ns, seq=self._seq)
        self._seq += 1
        return frame

    def snapshot(self, timeout_s: float = 5.0) -> npt.NDArray[np.uint8]:
        """The main stream of the next request: HxWx3 uint8, RGB order (``snapshot_size``,
        as the camera gave it). The gray frame of that request is not delivered by ``read``.

        Raises :class:`drivers.exceptions.CameraTimeoutError` after ``timeout_s`` seconds
        without a frame, :class:`drivers.exceptions.FrameSourceError` when not open.
        """
        request = self._next_request(timeout_s)
        try:
            main = request.make_array("main")
        finally:
            request.release()
        if main.ndim != 3 or main.shape[2] != 3:
            raise FrameSourceError(f"picamera2: main stream array of shape {main.shape}")
        # picamera2's "RGB888" (DRM naming) lies B, G, R in memory: flip the channels
        return np.ascontiguousarray(main[:, :, ::-1], dtype=np.uint8)

    # -- focus ------------------------------------------------------------------------------

    def focus_cycle(self) -> None:
        """Start one autofocus scan and return at once; the lens goes back to continuous AF
        when the scan ends (seen in later frames' ``AfState``) or after 3 s.

        No-op on a camera without autofocus, with ``autofocus="off"``, when closed, or while a
        cycle is running. Never raises: a failure is logged.
        """
        with self._focus_lock:
            camera, c = self._camera, self._controls
            if camera is None or not self._has_af or self._focus_started_ns is not None:
                return
            # AfTrigger works in Auto mode only; continuous AF may sit on a wrong peak (the
            # background behind a blurred code), while a triggered scan sweeps the whole range.
            # picamera2's autofocus_cycle() would consume requests on its own job queue and
            # hold up read(), so the trigger is set directly and its end watched in read().
            try:
                camera.set_controls(
                    {"AfMode": c.AfModeEnum.Auto, "AfTrigger": c.AfTriggerEnum.Start}
                )
            except Exception as e:
                log.warning("picamera2: cannot start a focus cycle: %s", e)
                return
            self._focus_started_ns = self._monotonic_ns()
            self._focus_scanning = False
            log.info("picamera2: focus cycle started")

    def _follow_focus(self, af_state: Any, now_ns: int) -> None:
        """After a triggered scan ends (or runs too long), go back to continuous AF."""
        with self._focus_lock:
            started = self._focus_started_ns
            camera, c = self._camera, self._controls
            if started is None or camera is None:
                return
            scanning = af_state is not None and int(af_state) == int(c.AfStateEnum.Scanning)
            if scanning:
                self._focus_scanning = True
                if now_ns - started < _FOCUS_CYCLE_MAX_NS:
                    return
            elif not self._focus_scanning and now_ns - started < _FOCUS_CYCLE_MAX_NS:
                return  # the trigger reaches the camera a few frames later: not begun yet
            self._focus_started_ns = None
            self._focus_scanning = False
            try:
                camera.set_controls(self._continuous_af(camera.camera_controls))
            except Exception as e:
                log.warning("picamera2: cannot return to continuous autofocus: %s", e)

    # -- closing ----------------------------------------------------------------------------

    def close(self) -> None:
        """Release a request still owed, stop and close the camera. Safe to call twice; never
        raises (failures are logged: the next open() reports a camera left busy)."""
        with self._focus_lock:
            camera, self._camera = self._camera, None
            self._focus_started_ns = None
        pending, self._pending = self._pending, None
        if camera is None:
            return
        if pending is not None:
            try:
                pending.get_result(timeout=0).release()
            except Exception:
                # still waiting inside picamera2: cancel it so stop() is not held up by it
                try:
                    camera.cancel_all_and_flush()
                except Exception as e:
                    log.warning("picamera2: cannot cancel the stalled capture: %s", e)
        self._close_quietly(camera)

    @staticmethod
    def _close_quietly(camera: Any) -> None:
        try:
            camera.stop()
        except Exception as e:
            log.warning("picamera2: stop failed: %s", e)
        try:
            camera.close()
        except Exception as e:
            log.warning("picamera2: close failed: %s", e)
