"""A fake of exactly the picamera2 / libcamera surface :class:`drivers.picamera.Picamera2Source`
uses, for machines without a Raspberry Pi camera.

Modelled on picamera2 0.3 (read from its source, not copied): ``Picamera2(camera_num)`` acquires
the camera (a second instance on a held camera fails "Device or resource busy", wrapped in
"Camera __init__ sequence did not complete"); ``create_video_configuration`` /
``configure`` / ``camera_configuration`` (strides filled in); ``camera_controls`` as
name -> (min, max, default); ``set_controls``; ``start``; ``capture_request(wait=False)`` gives a
job whose ``get_result(timeout)`` raises ``concurrent.futures.TimeoutError``;
``cancel_all_and_flush``; completed requests with ``make_buffer`` (1-D copy of the stream's
buffer, rows padded to the stride), ``make_array("main")`` (HxWx3, B, G, R in memory for
"RGB888"), ``get_metadata`` (``SensorTimestamp`` in monotonic ns, ``AfState`` on AF cameras) and
``release`` (reference counted: a second release raises); ``stop``; ``close`` (idempotent).

:class:`FakeCameraSystem` is the injected "module": ``.Picamera2``, ``.controls`` (libcamera's
enums) and ``.load`` for ``module_loader``. It counts live instances and their open file
descriptors (picamera2 opens a notification pipe per instance) and unreleased requests, and can
simulate a busy camera for N opens, a capture that never completes, and a fixed-focus camera.
"""

from __future__ import annotations

import enum
import time
import weakref
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt

Gray = npt.NDArray[np.uint8]


class AfModeEnum(enum.IntEnum):
    Manual = 0
    Auto = 1
    Continuous = 2


class AfRangeEnum(enum.IntEnum):
    Normal = 0
    Macro = 1
    Full = 2


class AfTriggerEnum(enum.IntEnum):
    Start = 0
    Cancel = 1


class AfStateEnum(enum.IntEnum):
    Idle = 0
    Scanning = 1
    Focused = 2
    Failed = 3


class AeMeteringModeEnum(enum.IntEnum):
    CentreWeighted = 0
    Spot = 1
    Matrix = 2
    Custom = 3


class AeExposureModeEnum(enum.IntEnum):
    Normal = 0
    Short = 1
    Long = 2
    Custom = 3


CONTROLS = SimpleNamespace(
    AfModeEnum=AfModeEnum,
    AfRangeEnum=AfRangeEnum,
    AfTriggerEnum=AfTriggerEnum,
    AfStateEnum=AfStateEnum,
    AeMeteringModeEnum=AeMeteringModeEnum,
    AeExposureModeEnum=AeExposureModeEnum,
)
"""libcamera's ``controls`` module: the enums the source uses."""

BASE_CONTROLS: dict[str, tuple[Any, Any, Any]] = {
    "AeEnable": (False, True, None),
    "AeMeteringMode": (0, 3, 0),
    "AeExposureMode": (0, 3, 0),
    "ExposureValue": (-8.0, 8.0, 0.0),
    "ExposureTime": (26, 112_015_443, None),
    "AnalogueGain": (1.0, 16.0, None),
    "FrameDurationLimits": (33_333, 120_000, None),
}
AF_CONTROLS: dict[str, tuple[Any, Any, Any]] = {
    "AfMode": (0, 2, 0),
    "AfRange": (0, 2, 0),
    "AfTrigger": (0, 1, 0),
    "AfSpeed": (0, 1, 0),
    "LensPosition": (0.0, 15.0, 1.0),
}


def align(n: int, to: int) -> int:
    return -(-n // to) * to


def resize_nearest(image: Gray, width: int, height: int) -> Gray:
    """``image`` scaled to width x height by picking pixels (the fake ISP's scaler)."""
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    rows = np.arange(height) * h // height
    cols = np.arange(width) * w // width
    out: Gray = image[rows][:, cols]
    return out


def scene_rgb(gray: Gray) -> Gray:
    """A colour scene made from a gray one, channels told apart: R = gray, G = 255 - gray,
    B = gray // 2 (HxWx3, RGB order)."""
    return np.dstack([gray, 255 - gray, gray // 2]).astype(np.uint8)


class FakeRequest:
    """picamera2's CompletedRequest (the caller owns one reference)."""

    def __init__(self, camera: FakePicamera2, index: int, metadata: dict[str, Any]) -> None:
        self.camera = camera
        self.index = index
        self.metadata = metadata
        self.refs = 1
        camera.system.outstanding.add(self)

    def _check(self) -> None:
        if self.refs <= 0:
            raise RuntimeError("CompletedRequest: buffer used after release")

    def make_buffer(self, name: str) -> npt.NDArray[np.uint8]:
        self._check()
        config = self.camera.camera_configuration().get(name)
        if config is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        self.camera.system.buffers_made.append(name)
        w, h = config["size"]
        stride = config["stride"]
        scene = self.camera.system.scene_at(self.index)
        if config["format"] == "YUV420":
            data = np.full(stride * h * 3 // 2, 128, np.uint8)
            y = data[: stride * h].reshape(h, stride)
            y[:, :] = 0xEE  # padding bytes past the width: never part of a frame
            y[:, :w] = resize_nearest(scene, w, h)
            return data
        # "RGB888": B, G, R bytes per pixel, rows padded to the stride
        rgb = scene_rgb(resize_nearest(scene, w, h))
        data = np.full(stride * h, 0xEE, np.uint8)
        rows = data.reshape(h, stride)
        rows[:, : w * 3] = rgb[:, :, ::-1].reshape(h, w * 3)
        return data

    def make_array(self, name: str) -> npt.NDArray[np.uint8]:
        config = self.camera.camera_configuration().get(name)
        if config is None:
            raise RuntimeError(f"Stream {name!r} is not defined")
        buffer = self.make_buffer(name)
        w, h = config["size"]
        if config["format"] == "YUV420":
            return buffer.reshape(h * 3 // 2, config["stride"])
        array: npt.NDArray[np.uint8] = (
            buffer.reshape(h, config["stride"])[:, : w * 3].reshape(h, w, 3).copy()
        )
        return array

    def get_metadata(self) -> dict[str, Any]:
        self._check()
        return dict(self.metadata)

    def release(self) -> None:
        self.refs -= 1
        if self.refs < 0:
            raise RuntimeError("CompletedRequest: lock now has negative ref_count")
        self.camera.system.outstanding.discard(self)


class FakeJob:
    """picamera2's Job: a future that the camera completes with a request."""

    def __init__(self) -> None:
        self.future: Future[FakeRequest] = Future()

    def get_result(self, timeout: float | None = None) -> FakeRequest:
        return self.future.result(timeout=timeout)


class FakePicamera2:
    """picamera2's Picamera2 for one camera of a :class:`FakeCameraSystem`."""

    def __init__(self, system: FakeCameraSystem, camera_num: int = 0) -> None:
        self.system = system
        self.camera_num = camera_num
        self.is_open = False
        if camera_num >= system.cameras:
            raise IndexError("list index out of range")  # picamera2: global_camera_info()[n]
        if system.busy_opens > 0 or camera_num in system.held:
            system.busy_opens = max(0, system.busy_opens - 1)
            try:
                raise RuntimeError("Failed to acquire camera: Device or resource busy")
            except RuntimeError as e:
                raise RuntimeError("Camera __init__ sequence did not complete.") from e
        system.held.add(camera_num)
        system.fds += 2  # the notification pipe
        system.live.add(self)
        system.instances.append(weakref.ref(self))
        if system.keep_instances:
            system.cameras_made.append(self)
        self.is_open = True
        self.started = False
        self.config: dict[str, Any] = {}
        self.calls: list[str] = []
        self.controls_set: list[dict[str, Any]] = []
        self.jobs: list[FakeJob] = []
        self.af_mode = AfModeEnum.Manual
        self.af_scan_left = 0
        self.frames = 0

    # configuration

    def create_video_configuration(
        self,
        main: dict[str, Any] | None = None,
        lores: dict[str, Any] | None = None,
        controls: dict[str, Any] | None = None,
        buffer_count: int = 6,
    ) -> dict[str, Any]:
        self.calls.append("create_video_configuration")
        main = {"format": "XBGR8888", "size": (1280, 720), **(main or {})}
        config: dict[str, Any] = {
            "use_case": "video",
            "main": main,
            "lores": dict(lores) if lores else None,
            "controls": dict(controls or {}),
            "buffer_count": buffer_count,
        }
        return config

    def configure(self, config: dict[str, Any]) -> None:
        self.calls.append("configure")
        if self.started:
            raise RuntimeError("Camera must be stopped before configuring")
        lores = config.get("lores")
        if lores is not None:
            if lores["format"] not in ("YUV420", "YVU420"):
                raise RuntimeError("lores stream must be YUV")
            if any(a > b for a, b in zip(lores["size"], config["main"]["size"], strict=True)):
                raise RuntimeError("lores stream dimensions may not exceed main stream")
        self.config = {k: dict(v) if isinstance(v, dict) else v for k, v in config.items()}
        main = self.config["main"]
        main["stride"] = align(main["size"][0] * 3, self.system.stride_align)
        if lores is not None:
            self.config["lores"]["stride"] = align(lores["size"][0], self.system.stride_align)

    def camera_configuration(self) -> dict[str, Any]:
        return self.config

    @property
    def camera_controls(self) -> dict[str, tuple[Any, Any, Any]]:
        controls = dict(BASE_CONTROLS)
        if self.system.autofocus:
            controls.update(AF_CONTROLS)
        return controls

    def set_controls(self, controls: dict[str, Any]) -> None:
        if not self.is_open:
            raise RuntimeError("Camera not opened")
        unknown = set(controls) - set(self.camera_controls)
        if unknown:
            raise RuntimeError(f"Control {sorted(unknown)[0]!r} is not advertised by libcamera")
        self.controls_set.append(dict(controls))
        if "AfMode" in controls:
            self.af_mode = AfModeEnum(controls["AfMode"])
        if controls.get("AfTrigger") == AfTriggerEnum.Start and self.af_mode == AfModeEnum.Auto:
            self.af_scan_left = self.system.af_scan_frames

    # running

    def start(self) -> None:
        self.calls.append("start")
        if self.system.start_error is not None:
            raise self.system.start_error
        self.started = True

    def capture_request(self, wait: bool | float | None = None) -> FakeJob:
        if wait is not False:
            raise AssertionError("the source must never block inside picamera2 without a timeout")
        if not self.started:
            raise RuntimeError("Camera has not been started")
        job = FakeJob()
        self.jobs.append(job)
        if not self.system.stalled:
            self._complete(job)
        return job

    def _complete(self, job: FakeJob) -> None:
        index = self.frames
        self.frames += 1
        now = self.system.clock_ns()
        metadata: dict[str, Any] = {
            "SensorTimestamp": now - self.system.exposure_lag_ns,
            "ExposureTime": 9_000,
            "FrameDuration": 33_333,
        }
        if self.system.autofocus:
            metadata["AfState"] = self._af_state()
            metadata["LensPosition"] = 1.0
        job.future.set_result(FakeRequest(self, index, metadata))

    def _af_state(self) -> int:
        if self.af_scan_left > 0:
            self.af_scan_left -= 1
            return int(AfStateEnum.Scanning)
        if self.af_mode == AfModeEnum.Manual:
            return int(AfStateEnum.Idle)
        return int(AfStateEnum.Focused)

    def resume(self) -> None:
        """The camera delivers again: complete the jobs left waiting."""
        for job in self.jobs:
            if not job.future.done():
                self._complete(job)

    def cancel_all_and_flush(self) -> None:
        self.calls.append("cancel_all_and_flush")
        for job in self.jobs:
            if not job.future.done():
                job.future.set_exception(CancelledError())
        self.jobs = []

    def stop(self) -> None:
        self.calls.append("stop")
        self.started = False

    def close(self) -> None:
        self.calls.append("close")
        if not self.is_open:
            return
        self.started = False  # picamera2's close() stops a running camera itself
        self.is_open = False
        self.system.held.discard(self.camera_num)
        self.system.fds -= 2
        self.system.live.discard(self)


class FakeCameraSystem:
    """The injected picamera2 "module" and the world behind it.

    ``scene``: gray HxW uint8 image(s) the sensor sees (a list is played in order, looping);
    ``autofocus``: the camera has AF (Camera Module 3) or not (fixed focus);
    ``keep_instances``: keep every instance for inspection (:meth:`last`); off when
    counting the instances still alive (:meth:`alive`); ``busy_opens``: that many next
    ``Picamera2()`` calls fail busy; ``stalled``: captures never
    complete until :meth:`FakePicamera2.resume`; ``stride_align``: row alignment in bytes.
    """

    def __init__(
        self,
        scene: Gray | list[Gray],
        *,
        autofocus: bool = True,
        cameras: int = 1,
        stride_align: int = 64,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        exposure_lag_ns: int = 20_000_000,
        keep_instances: bool = True,
    ) -> None:
        self.scenes = scene if isinstance(scene, list) else [scene]
        self.autofocus = autofocus
        self.cameras = cameras
        self.stride_align = stride_align
        self.clock_ns = clock_ns
        self.exposure_lag_ns = exposure_lag_ns
        self.keep_instances = keep_instances
        self.cameras_made: list[FakePicamera2] = []  # for inspection unless keep_instances=False
        self.busy_opens = 0
        self.stalled = False
        self.start_error: Exception | None = None
        self.af_scan_frames = 3
        self.held: set[int] = set()
        self.fds = 0
        self.live: set[FakePicamera2] = set()
        self.instances: list[weakref.ref[FakePicamera2]] = []
        self.outstanding: set[FakeRequest] = set()
        self.buffers_made: list[str] = []
        self.controls = CONTROLS

    def Picamera2(self, camera_num: int = 0) -> FakePicamera2:  # noqa: N802 (picamera2's name)
        return FakePicamera2(self, camera_num)

    def load(self) -> FakeCameraSystem:
        return self

    def scene_at(self, index: int) -> Gray:
        return self.scenes[index % len(self.scenes)]

    def last(self) -> FakePicamera2:
        """The most recent instance (needs ``keep_instances``)."""
        return self.cameras_made[-1]

    def alive(self) -> int:
        """Instances not yet garbage: held by someone, open or not."""
        return sum(1 for ref in self.instances if ref() is not None)
