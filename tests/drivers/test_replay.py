"""ReplaySource: order, pacing on an injected clock, loop/repeat, cache, bad files, conversions."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zxingcpp
from PIL import Image

from drivers.exceptions import CameraTimeoutError, FrameFileError, FrameSourceError
from drivers.frames import Frame, GrayImage
from drivers.replay import ReplaySource, load_gray, natural_key
from tests.shared import REPO, case_file

PERIOD_NS = 33_333_333  # round(1e9 / 30)
B06_PAYLOAD = b"DOOR1:7f3a9c21e4b8"
QR_ONLY = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)


class FakeClock:
    """A monotonic clock that only moves when slept on or advanced by the test."""

    def __init__(self, start_ns: int = 1_000_000_000) -> None:
        self.now = start_ns
        self.sleeps: list[float] = []

    def monotonic_ns(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += round(seconds * 1e9)

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * 1e9)


class CountingLoader:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, path: Path) -> GrayImage:
        self.calls.append(path.name)
        return load_gray(path)


def write_gray(path: Path, value: int, size: tuple[int, int] = (32, 24)) -> None:
    Image.new("L", size, value).save(path)


def make_reel(folder: Path, values: list[int], prefix: str = "f") -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, v in enumerate(values):
        name = f"{prefix}{i}.png"
        write_gray(folder / name, v)
        names.append(name)
    return names


def read_all(src: ReplaySource, limit: int = 10_000) -> list[Frame]:
    frames = []
    while (f := src.read()) is not None:
        frames.append(f)
        assert len(frames) <= limit, "reel did not end"
    return frames


def source(items: Path | list[Path], clock: FakeClock | None = None, **kw: object) -> ReplaySource:
    clock = clock or FakeClock()
    return ReplaySource(items, monotonic_ns=clock.monotonic_ns, sleep=clock.sleep, **kw)  # type: ignore[arg-type]


# --- order, frames, end -------------------------------------------------------------------


def test_folder_yields_read_only_gray_frames_in_natural_order(tmp_path: Path) -> None:
    values = [10 * i for i in range(12)]  # f0..f11: "f10" must come after "f9"
    names = make_reel(tmp_path, values)
    (tmp_path / "sub").mkdir()
    write_gray(tmp_path / "sub" / "f99.png", 250)  # subfolders are not part of the reel
    write_gray(tmp_path / ".hidden.png", 251)
    (tmp_path / "notes.txt").write_text("not a frame")
    with (src := source(tmp_path, fps=0)):
        frames = read_all(src)
        assert src.read() is None  # stays ended
    assert [f.seq for f in frames] == list(range(12))
    assert [f.origin for f in frames] == names
    assert [int(f.image[0, 0]) for f in frames] == values
    for f in frames:
        assert f.image.dtype == np.uint8 and f.image.shape == (24, 32)
        assert f.image.flags.c_contiguous and not f.image.flags.writeable


def test_natural_key_orders_numbers_by_value() -> None:
    names = ["frame10.png", "frame2.png", "Frame1.png", "frame002.png", "a.png"]
    assert sorted(names, key=natural_key) == [
        "a.png",
        "Frame1.png",
        "frame002.png",
        "frame2.png",
        "frame10.png",
    ]


def test_list_of_files_plays_in_given_order_with_repeats(tmp_path: Path) -> None:
    make_reel(tmp_path, [1, 2, 3])
    order = [tmp_path / "f2.png", tmp_path / "f0.png", tmp_path / "f2.png"]
    loader = CountingLoader()
    with (src := source(order, fps=0, loader=loader)):
        got = [int(f.image[0, 0]) for f in read_all(src)]
    assert got == [3, 1, 3]
    assert sorted(loader.calls) == ["f0.png", "f2.png"]  # a listed file is decoded once


# --- pacing --------------------------------------------------------------------------------


def test_paced_at_30_fps_on_the_injected_clock(tmp_path: Path) -> None:
    make_reel(tmp_path, [0, 1, 2, 3, 4])
    clock = FakeClock(start_ns=5_000_000_000)
    with (src := source(tmp_path, clock, fps=30)):
        frames = read_all(src)
    assert [f.t_ns for f in frames] == [5_000_000_000 + i * PERIOD_NS for i in range(5)]
    assert clock.sleeps == [pytest.approx(PERIOD_NS / 1e9, abs=1e-9)] * 4


def test_time_spent_by_the_consumer_is_taken_off_the_sleep(tmp_path: Path) -> None:
    make_reel(tmp_path, [0, 1, 2])
    clock = FakeClock(start_ns=0)
    with (src := source(tmp_path, clock, fps=30)):
        src.read()
        clock.advance(0.010)  # decoding took 10 ms
        second = src.read()
    assert clock.sleeps == [pytest.approx(0.023333333, abs=1e-9)]
    assert second is not None and second.t_ns == PERIOD_NS


def test_no_burst_after_a_stall(tmp_path: Path) -> None:
    make_reel(tmp_path, list(range(6)))
    clock = FakeClock(start_ns=0)
    with (src := source(tmp_path, clock, fps=30)):
        a, b = src.read(), src.read()
        clock.advance(0.5)  # the consumer was busy for half a second (15 slots)
        c = src.read()  # due long ago: comes at once...
        d = src.read()  # ...but the schedule restarts: a full slot later, not a burst
        e = src.read()
    assert a and b and c and d and e
    assert c.t_ns == b.t_ns + 500_000_000
    assert d.t_ns - c.t_ns == PERIOD_NS and e.t_ns - d.t_ns == PERIOD_NS
    assert clock.sleeps == [pytest.approx(PERIOD_NS / 1e9, abs=1e-9)] * 3


def test_a_slightly_late_consumer_keeps_the_cadence(tmp_path: Path) -> None:
    make_reel(tmp_path, list(range(4)))
    clock = FakeClock(start_ns=0)
    with (src := source(tmp_path, clock, fps=30)):
        src.read()
        clock.advance(0.040)  # 6.7 ms past the second slot
        late = src.read()
        on_grid = src.read()
    assert late and on_grid
    assert late.t_ns == 40_000_000
    assert on_grid.t_ns == 2 * PERIOD_NS  # back on the 30 fps grid


def test_fps_zero_never_sleeps(tmp_path: Path) -> None:
    make_reel(tmp_path, [0, 1, 2])
    clock = FakeClock()
    with (src := source(tmp_path, clock, fps=0)):
        assert len(read_all(src)) == 3
    assert clock.sleeps == []


def test_a_slot_beyond_the_read_timeout_raises_and_the_frame_comes_later(tmp_path: Path) -> None:
    make_reel(tmp_path, [0, 1])
    clock = FakeClock(start_ns=0)
    with (src := source(tmp_path, clock, fps=0.1)):  # one frame every 10 s
        assert src.read(timeout_s=1.0) is not None
        with pytest.raises(CameraTimeoutError, match="read timeout"):
            src.read(timeout_s=1.0)
        assert clock.sleeps == [1.0]
        frame = src.read(timeout_s=20.0)
    assert frame is not None and frame.seq == 1 and frame.t_ns == 10_000_000_000


# --- loop, repeat --------------------------------------------------------------------------


def test_loop_and_repeat(tmp_path: Path) -> None:
    make_reel(tmp_path, [1, 2, 3])
    with (src := source(tmp_path, fps=0, loop=True, repeat=2)):
        frames = [src.read() for _ in range(14)]
    got = [int(f.image[0, 0]) for f in frames if f is not None]
    assert got == [1, 1, 2, 2, 3, 3, 1, 1, 2, 2, 3, 3, 1, 1]
    assert [f.seq for f in frames if f is not None] == list(range(14))


def test_repeat_without_loop_ends(tmp_path: Path) -> None:
    make_reel(tmp_path, [1, 2, 3])
    with (src := source(tmp_path, fps=0, repeat=3)):
        frames = read_all(src)
    assert [int(f.image[0, 0]) for f in frames] == [1, 1, 1, 2, 2, 2, 3, 3, 3]


def test_reopen_starts_again_from_seq_zero(tmp_path: Path) -> None:
    make_reel(tmp_path, [1, 2])
    src = source(tmp_path, fps=0)
    src.open()
    assert len(read_all(src)) == 2
    src.open()
    frame = src.read()
    assert frame is not None and frame.seq == 0 and int(frame.image[0, 0]) == 1
    src.close()
    src.close()  # idempotent
    with pytest.raises(FrameSourceError, match="before open"):
        src.read()


# --- cache ---------------------------------------------------------------------------------


def test_looping_decodes_each_file_once(tmp_path: Path) -> None:
    names = make_reel(tmp_path, list(range(0, 200, 20)))
    loader = CountingLoader()
    with (src := source(tmp_path, fps=0, loop=True, loader=loader)):
        for _ in range(5 * len(names)):
            assert src.read() is not None
        assert src.cached_bytes == len(names) * 32 * 24
    assert sorted(loader.calls) == sorted(names)
    assert src.cached_bytes == 0  # close() lets the images go


def test_images_beyond_the_cache_budget_are_decoded_on_every_pass(tmp_path: Path) -> None:
    make_reel(tmp_path, [5, 6, 7])
    loader = CountingLoader()
    with (src := source(tmp_path, fps=0, loop=True, cache_bytes=2 * 32 * 24, loader=loader)):
        got = [int(f.image[0, 0]) for f in (src.read() for _ in range(9)) if f is not None]
        assert src.cached_bytes == 2 * 32 * 24
    assert got == [5, 6, 7] * 3
    assert loader.calls.count("f0.png") == 1 and loader.calls.count("f1.png") == 1
    assert loader.calls.count("f2.png") == 3


def test_hard_linked_frames_share_one_decoded_image(tmp_path: Path) -> None:
    write_gray(tmp_path / "00000.png", 42)
    for i in range(1, 5):
        os.link(tmp_path / "00000.png", tmp_path / f"{i:05d}.png")
    loader = CountingLoader()
    with (src := source(tmp_path, fps=0, loader=loader)):
        frames = read_all(src)
        assert src.cached_bytes == 32 * 24
    assert len(frames) == 5 and loader.calls == ["00000.png"]
    assert all(f.image is frames[0].image for f in frames)


# --- bad input -----------------------------------------------------------------------------


def write_bad_files(folder: Path) -> dict[str, str]:
    """Unreadable files and the reason each must be logged with."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "b-x.png").write_bytes(os.urandom(64) + b"garbage" * 20)
    (folder / "c-empty.png").write_bytes(b"")
    (folder / "d-notes.jpg").write_text("this is a text file, not a JPEG\n")
    (folder / "e-zero.pgm").write_bytes(b"P5\n0 0\n255\n")  # an image header for 0x0 pixels
    write_gray(folder / "f-cut.png", 9, size=(64, 64))
    whole = (folder / "f-cut.png").read_bytes()
    (folder / "f-cut.png").write_bytes(whole[: len(whole) // 2])
    return {
        "b-x.png": "not an image",
        "c-empty.png": "empty file (0 bytes)",
        "d-notes.jpg": "not an image",
        "e-zero.pgm": "not an image",
        "f-cut.png": "corrupt image data",
    }


def test_bad_files_are_skipped_with_one_log_line_each(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    reasons = write_bad_files(tmp_path)
    write_gray(tmp_path / "a-good.png", 10)
    write_gray(tmp_path / "g-good.png", 20)
    caplog.set_level(logging.WARNING, logger="drivers.replay")
    with (src := source(tmp_path, fps=0, loop=True)):
        got = [int(f.image[0, 0]) for f in (src.read() for _ in range(8)) if f is not None]
        assert src.skipped == len(reasons)
    assert got == [10, 20] * 4  # the reel goes on past the bad files, pass after pass
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == len(reasons)  # once each, not once per loop
    for name, reason in reasons.items():
        (line,) = [w for w in warnings if name in w]
        assert str(tmp_path / name) in line and reason in line


def test_a_loader_giving_an_empty_image_is_skipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_reel(tmp_path, [1, 2])

    def loader(path: Path) -> GrayImage:
        return np.zeros((0, 0), np.uint8) if path.name == "f0.png" else load_gray(path)

    with (src := source(tmp_path, fps=0, loader=loader)):
        frames = read_all(src)
        assert src.skipped == 1
    assert [int(f.image[0, 0]) for f in frames] == [2]
    assert "f0.png" in caplog.text and "(0, 0)" in caplog.text


def test_a_folder_of_only_bad_files_fails_at_open_naming_it(tmp_path: Path) -> None:
    reel = tmp_path / "reel"
    reasons = write_bad_files(reel)
    src = source(reel)
    with pytest.raises(FrameSourceError, match=f"folder {reel}.*all {len(reasons)} image files"):
        src.open()
    assert src.skipped == len(reasons)


def test_missing_path_fails_at_open_not_before(tmp_path: Path) -> None:
    src = source(tmp_path / "nope")
    with pytest.raises(FrameSourceError, match="nope does not exist"):
        src.open()


def test_folder_without_images_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(FrameSourceError, match="no image files"):
        source(tmp_path).open()


def test_a_file_deleted_after_open_is_skipped_later(tmp_path: Path) -> None:
    make_reel(tmp_path, [1, 2])
    with (src := source(tmp_path, fps=0, loop=True, cache_bytes=0)):
        (tmp_path / "f1.png").unlink()
        got = [int(f.image[0, 0]) for f in (src.read() for _ in range(3)) if f is not None]
        assert src.skipped == 1
    assert got == [1, 1, 1]


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        ReplaySource(Path("x"), fps=-1)
    with pytest.raises(ValueError):
        ReplaySource(Path("x"), repeat=0)
    with pytest.raises(ValueError):
        ReplaySource(Path("x"), cache_bytes=-1)


# --- conversion to gray --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda: Image.new("RGB", (4, 2), (255, 0, 0)), 76),  # ITU-R 601 luma of red
        (lambda: Image.new("RGB", (4, 2), (0, 255, 0)), 150),
        (lambda: Image.new("RGB", (4, 2), (0, 0, 255)), 29),
        (lambda: Image.new("RGBA", (4, 2), (0, 0, 0, 0)), 255),  # transparent: white paper
        (lambda: Image.new("RGBA", (4, 2), (0, 0, 0, 255)), 0),
        (lambda: Image.new("LA", (4, 2), (0, 128)), 127),
        (lambda: Image.new("1", (4, 2), 1), 255),
        (lambda: Image.new("CMYK", (4, 2), (0, 0, 0, 255)), 0),
        (lambda: Image.new("CMYK", (4, 2), (0, 0, 0, 0)), 255),
        (lambda: Image.fromarray(np.full((2, 4), 0x8000, np.uint16)), 128),  # 16-bit
        (lambda: Image.fromarray(np.full((2, 4), 0xFFFF, np.uint16)), 255),
    ],
)
def test_image_modes_become_gray(
    tmp_path: Path, make: Callable[[], Image.Image], expected: int
) -> None:
    im = make()
    path = tmp_path / ("im.tif" if im.mode == "CMYK" else "im.png")
    im.save(path)
    gray = load_gray(path)
    assert gray.dtype == np.uint8 and gray.shape == (2, 4)
    assert gray.min() == gray.max() == expected


def test_palette_images_use_their_colours_and_transparency(tmp_path: Path) -> None:
    im = Image.new("P", (3, 1))
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0] + [0] * (256 * 3 - 9))
    im.putdata([0, 1, 2])
    im.info["transparency"] = 2
    im.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    assert load_gray(tmp_path / "p.png").tolist() == [[76, 29, 255]]


def test_sixteen_bit_png_keeps_its_top_byte(tmp_path: Path) -> None:
    ramp = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(ramp).save(tmp_path / "g16.png")
    assert load_gray(tmp_path / "g16.png").reshape(-1).tolist() == list(range(256))


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    a = np.zeros((2, 3), np.uint8)
    a[0, 0] = 255  # white top-left pixel, stored landscape
    im = Image.fromarray(a)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    im.save(tmp_path / "o.jpg", exif=exif, quality=100)
    gray = load_gray(tmp_path / "o.jpg")
    assert gray.shape == (3, 2)
    assert gray[0, 1] > 200 and gray[2, 0] < 60  # top-left moved to top-right


@pytest.mark.parametrize("suffix", [".png", ".bmp", ".pgm", ".ppm", ".tif", ".webp"])
def test_lossless_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    a = np.arange(48, dtype=np.uint8).reshape(6, 8) * 5
    im = Image.fromarray(a).convert("RGB") if suffix == ".ppm" else Image.fromarray(a)
    if suffix == ".webp":
        im.save(tmp_path / f"x{suffix}", lossless=True)
    else:
        im.save(tmp_path / f"x{suffix}")
    with (src := source(tmp_path, fps=0)):
        frame = src.read()
    assert frame is not None and np.array_equal(frame.image, a)


# --- video ---------------------------------------------------------------------------------


def write_video(path: Path, levels: list[int], fourcc: str) -> None:
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*fourcc), 30.0, (64, 48))
    assert writer.isOpened(), f"OpenCV cannot write {path.suffix} with {fourcc} here"
    for level in levels:
        bgr = np.zeros((48, 64, 3), np.uint8)
        bgr[:, :] = (level // 2, level, 255 - level)
        writer.write(bgr)
    writer.release()


@pytest.mark.parametrize(("name", "fourcc"), [("clip.avi", "MJPG"), ("clip.mp4", "mp4v")])
def test_video_round_trip(tmp_path: Path, name: str, fourcc: str) -> None:
    levels = [20 * i for i in range(1, 9)]
    write_video(tmp_path / name, levels, fourcc)
    lumas = [round(0.114 * (lv // 2) + 0.587 * lv + 0.299 * (255 - lv)) for lv in levels]
    with (src := source(tmp_path / name, fps=0, loop=True)):
        frames = [src.read() for _ in range(2 * len(levels))]
        assert src.cached_bytes == len(levels) * 64 * 48  # the second pass came from memory
    got = [f for f in frames if f is not None]
    assert len(got) == 2 * len(levels)
    assert [f.seq for f in got] == list(range(2 * len(levels)))
    assert got[3].origin == f"{name}#3" and got[len(levels) + 3].origin == f"{name}#3"
    for i, f in enumerate(got):
        assert f.image.shape == (48, 64) and f.image.dtype == np.uint8
        assert abs(float(f.image.mean()) - lumas[i % len(levels)]) < 6


def test_video_larger_than_the_cache_is_streamed_every_pass(tmp_path: Path) -> None:
    levels = [40, 120, 200]
    write_video(tmp_path / "c.avi", levels, "MJPG")
    with (src := source(tmp_path / "c.avi", fps=0, loop=True, cache_bytes=64 * 48)):
        means = [float(f.image.mean()) for f in (src.read() for _ in range(7)) if f is not None]
        assert src.cached_bytes == 0
    assert len(means) == 7
    assert means[0] < means[1] < means[2] and abs(means[3] - means[0]) < 1


def test_video_that_does_not_open_fails_at_open(tmp_path: Path) -> None:
    (tmp_path / "broken.mp4").write_bytes(b"\x00" * 1000)
    with pytest.raises(FrameSourceError, match=r"broken\.mp4"):
        source(tmp_path / "broken.mp4").open()


def test_a_video_inside_a_list_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FrameSourceError, match="give a video file alone"):
        source([tmp_path / "a.png", tmp_path / "v.mp4"]).open()


# --- field cases ---------------------------------------------------------------------------


def test_b06_held_for_90_frames(tmp_path: Path) -> None:
    """C05: B06 fed 90 times at 30 fps (a badge held up for 3 s)."""
    clock = FakeClock(start_ns=0)
    loader = CountingLoader()
    with (src := source(case_file("B06.png"), clock, fps=30, repeat=90, loader=loader)):
        frames = read_all(src)
    assert len(frames) == 90 and [f.seq for f in frames] == list(range(90))
    assert [f.t_ns for f in frames] == [i * PERIOD_NS for i in range(90)]
    assert loader.calls == ["B06.png"]
    assert all(f.image is frames[0].image for f in frames)
    assert frames[0].image.shape == (480, 640) and frames[0].origin == "B06.png"
    found = zxingcpp.read_barcodes(frames[-1].image, formats=QR_ONLY)
    assert [b.bytes for b in found] == [B06_PAYLOAD]


def test_c06_presentation_sequence_as_a_list() -> None:
    b06, b07 = case_file("B06.png"), case_file("B07.png")
    loader = CountingLoader()
    with (src := source([b06] * 30 + [b07] * 90 + [b06] * 30, fps=0, loader=loader)):
        origins = [f.origin for f in read_all(src)]
    assert origins == ["B06.png"] * 30 + ["B07.png"] * 90 + ["B06.png"] * 30
    assert loader.calls == ["B06.png", "B07.png"]


def test_frame_file_error_is_a_frame_source_error() -> None:
    assert issubclass(FrameFileError, FrameSourceError)


def test_importing_replay_does_not_import_opencv() -> None:
    code = "import sys, drivers.replay; print('cv2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
