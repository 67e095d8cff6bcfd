"""FocusAssist and code_like_blob on the field images (C10): a focus cycle after a run of
unreadable frames showing a code, not one per frame, none for readable or empty scenes."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from drivers.frames import Focusable, GrayImage
from drivers.picamera import Picamera2Source
from firmware.decoding.registry import make_decoder
from firmware.focus import FocusAssist, code_like_blob
from tests.drivers.fake_picamera2 import AfModeEnum, AfTriggerEnum, FakeCameraSystem
from tests.shared import case_file

FRAME_S = 1 / 30  # the scan loop's pace at 30 fps


def gray(name: str) -> GrayImage:
    with Image.open(case_file(name)) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8).copy()


@pytest.fixture(scope="module")
def images() -> dict[str, GrayImage]:
    return {n: gray(f"{n}.png") for n in ("B06", "B07", "B13", "B13-severe")}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class CountingCamera:
    """A Focusable that records when it was asked."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.cycles: list[float] = []

    def focus_cycle(self) -> None:
        self.cycles.append(self.clock.now)


def play(assist: FocusAssist, clock: Clock, frames: list[tuple[GrayImage, bool]]) -> list[int]:
    """Feeds frames at 30 fps; the indexes of the frames that triggered a cycle."""
    triggered = []
    for i, (image, readable) in enumerate(frames):
        if assist.observe(image, readable):
            triggered.append(i)
        clock.now += FRAME_S
    return triggered


# -- code_like_blob -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["B06", "B13", "B13-severe"])
def test_a_code_sharp_or_defocused_is_a_code_like_blob(
    images: dict[str, GrayImage], name: str
) -> None:
    assert code_like_blob(images[name]) is True


def test_the_scene_without_a_code_is_not(images: dict[str, GrayImage]) -> None:
    assert code_like_blob(images["B07"]) is False


def test_flat_frames_and_sensor_noise_are_not() -> None:
    rng = np.random.default_rng(5)
    assert code_like_blob(np.full((480, 640), 128, np.uint8)) is False
    assert code_like_blob(np.zeros((480, 640), np.uint8)) is False
    assert code_like_blob(rng.integers(0, 256, (480, 640), dtype=np.uint8)) is False
    noisy = np.clip(rng.normal(128, 40, (480, 640)), 0, 255).astype(np.uint8)
    assert code_like_blob(noisy) is False


def test_a_blank_card_an_outline_and_an_edge_are_not(images: dict[str, GrayImage]) -> None:
    card = images["B07"].copy()
    card[100:300, 200:400] = 235  # a white card without a code
    outline = images["B07"].copy()
    cv2.rectangle(outline, (200, 100), (400, 300), 20, 6)
    edge = images["B07"].copy()
    edge[:, 320:] = 25  # a dark door frame
    assert [code_like_blob(x) for x in (card, outline, edge)] == [False, False, False]


def test_other_frame_sizes_work(images: dict[str, GrayImage]) -> None:
    big = np.asarray(
        cv2.resize(images["B13-severe"], (1280, 960), interpolation=cv2.INTER_LINEAR), np.uint8
    )
    assert code_like_blob(big) is True
    assert code_like_blob(images["B07"][::2, ::2]) is False
    assert code_like_blob(np.zeros((16, 16), np.uint8)) is False  # too small to judge


# -- FocusAssist ----------------------------------------------------------------------------


def test_c10_one_cycle_in_the_unreadable_run_and_none_while_readable(
    images: dict[str, GrayImage],
) -> None:
    decoder = make_decoder("zxing-cpp")
    readable = {n: bool(decoder.decode(images[n])) for n in ("B06", "B13", "B13-severe")}
    assert readable == {"B06": True, "B13": True, "B13-severe": False}
    sequence = (
        [(images["B06"], readable["B06"])] * 30
        + [(images["B13-severe"], readable["B13-severe"])] * 90
        + [(images["B13"], readable["B13"])] * 30
    )
    clock = Clock()
    camera = CountingCamera(clock)
    assist = FocusAssist(camera, after_frames=15, cooldown_s=3.0, monotonic=clock)
    triggered = play(assist, clock, sequence)
    # the 15th unreadable frame of the severe run; then the 3 s cooldown outlasts the run
    assert triggered == [30 + 14]
    assert len(camera.cycles) == 1 and assist.cycles == 1


def test_a_long_unreadable_run_cycles_after_each_cooldown_doubling_it(
    images: dict[str, GrayImage],
) -> None:
    clock = Clock()
    camera = CountingCamera(clock)
    # (just under 3 s and 6 s: no frame lands on the boundary)
    assist = FocusAssist(
        camera, after_frames=15, cooldown_s=2.99, max_cooldown_s=5.99, monotonic=clock
    )
    triggered = play(assist, clock, [(images["B13-severe"], False)] * 900)  # 30 s
    # at 0.5 s, then 3 s later, then every 6 s (the cap): never one per frame
    assert triggered == [14, 104, 284, 464, 644, 824]
    assert len(camera.cycles) == 6
    # a read resets the cooldown: 3 s after the last cycle the next may start
    assist.observe(images["B06"], True)
    assert play(assist, clock, [(images["B13-severe"], False)] * 15) == [14]


def test_a_scene_without_a_code_never_cycles(images: dict[str, GrayImage]) -> None:
    clock = Clock()
    camera = CountingCamera(clock)
    assist = FocusAssist(camera, after_frames=15, monotonic=clock)
    assert play(assist, clock, [(images["B07"], False)] * 300) == []
    assert camera.cycles == []


def test_readable_frames_never_cycle(images: dict[str, GrayImage]) -> None:
    clock = Clock()
    assist = FocusAssist(CountingCamera(clock), after_frames=1, monotonic=clock)
    assert play(assist, clock, [(images["B06"], True)] * 100) == []


def test_a_read_or_a_blob_free_frame_breaks_the_run(images: dict[str, GrayImage]) -> None:
    clock = Clock()
    assist = FocusAssist(CountingCamera(clock), after_frames=15, monotonic=clock)
    severe = (images["B13-severe"], False)
    frames = ([severe] * 14 + [(images["B06"], True)]) * 5
    frames += ([severe] * 14 + [(images["B07"], False)]) * 5
    assert play(assist, clock, frames) == []


def test_no_camera_or_zero_frames_means_never(images: dict[str, GrayImage]) -> None:
    clock = Clock()
    off = FocusAssist(CountingCamera(clock), after_frames=0, monotonic=clock)
    none = FocusAssist(None, after_frames=15, monotonic=clock)
    frames = [(images["B13-severe"], False)] * 100
    assert play(off, clock, frames) == [] and play(none, clock, frames) == []
    assert not off.enabled and not none.enabled


def test_a_failing_camera_is_logged_not_raised(
    images: dict[str, GrayImage], caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def focus_cycle(self) -> None:
            raise RuntimeError("lens driver gone")

    clock = Clock()
    assist = FocusAssist(Broken(), after_frames=2, monotonic=clock)
    assert play(assist, clock, [(images["B13-severe"], False)] * 2) == []
    assert "lens driver gone" in caplog.text


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        FocusAssist(None, after_frames=-1)
    with pytest.raises(ValueError, match="cooldown cap"):
        FocusAssist(None, after_frames=5, cooldown_s=10, max_cooldown_s=5)


def test_it_drives_the_picamera2_source(images: dict[str, GrayImage]) -> None:
    system = FakeCameraSystem(images["B13-severe"], autofocus=True)
    with (source := Picamera2Source(module_loader=system.load)):
        assert isinstance(source, Focusable)
        assist = FocusAssist(source, after_frames=15)
        results = []
        for _ in range(20):
            frame = source.read(timeout_s=1.0)
            assert frame is not None
            results.append(assist.observe(frame.image, readable=False))
        cam = system.last()
        assert results.index(True) == 14 and results.count(True) == 1
        assert {"AfMode": AfModeEnum.Auto, "AfTrigger": AfTriggerEnum.Start} in cam.controls_set
        assert cam.controls_set[-1]["AfMode"] == AfModeEnum.Continuous  # scan over: back
