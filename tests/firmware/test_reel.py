"""The generated camera-like frames: deterministic, noisy, and every code frame reads exactly."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zxingcpp

from drivers.frames import GrayImage
from drivers.replay import ReplaySource, load_gray
from firmware.demo.reel import (
    ALLOWED_BADGE,
    CHECKIN_CARD,
    REVOKED_BADGE,
    UNKNOWN_BADGE,
    CodeSpec,
    append_to_reel,
    code_frame,
    idle_frames,
    make_scene,
    write_demo_reel,
)

QR_ONLY = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)
BINARY = bytes.fromhex("b255f6251cf7a0513d07")  # C02's raw bytes


def payloads(image: GrayImage, *, try_invert: bool = True) -> list[bytes]:
    found = zxingcpp.read_barcodes(image, formats=QR_ONLY, try_invert=try_invert)
    return sorted(b.bytes for b in found)


def test_scene_is_a_deterministic_gray_frame() -> None:
    a = make_scene(640, 480, seed=3)
    assert a.shape == (480, 640) and a.dtype == np.uint8 and a.flags.c_contiguous
    assert np.array_equal(a, make_scene(640, 480, seed=3))
    assert 60 < float(a.mean()) < 200 and float(a.std()) > 5  # a lit wall, not a flat fill
    assert payloads(a) == []


def test_successive_frames_differ_only_by_sensor_noise() -> None:
    frames = idle_frames(640, 480, 12, seed=9)
    assert len(frames) == 12
    diffs = [f.astype(np.int16) - frames[0] for f in frames[1:]]
    for d in diffs:
        # two frames with sigma 2 noise each: their difference has sigma 2*sqrt(2) = 2.83
        assert 2.4 < float(d.std()) < 3.3 and abs(float(d.mean())) < 0.1
    assert len({f.tobytes() for f in frames}) == 12
    quiet = make_scene(640, 480, seed=1, noise=0.0, world=9)
    assert float(np.abs(frames[0].astype(np.int16) - quiet).mean()) < 2.0


def test_worlds_differ() -> None:
    a = make_scene(320, 240, seed=1, world=1).astype(np.int16)
    b = make_scene(320, 240, seed=1, world=2).astype(np.int16)
    assert float(np.abs(a - b).mean()) > 5


@pytest.mark.parametrize(("width", "height"), [(640, 480), (1280, 720)])
@pytest.mark.parametrize(
    "payload", [ALLOWED_BADGE, BINARY, b"QRG-PASS:" + b"0123456789abcdef" * 3 + b"!"]
)
def test_code_frames_read_back_exactly(width: int, height: int, payload: bytes) -> None:
    for seed in range(6):
        image = code_frame(width, height, payload, seed)
        assert image.shape == (height, width) and image.dtype == np.uint8
        assert payloads(image) == [payload], f"seed {seed}"


def test_code_frames_vary_with_the_seed() -> None:
    a, b = code_frame(640, 480, ALLOWED_BADGE, 1), code_frame(640, 480, ALLOWED_BADGE, 2)
    assert float(np.abs(a.astype(np.int16) - b).mean()) > 5


def test_dark_mode_code_is_light_on_dark_and_reads_only_inverted() -> None:
    spec = CodeSpec(ALLOWED_BADGE, dark_mode=True, center=(0.5, 0.5), angle_deg=0.0, tilt=0.0)
    image = make_scene(640, 480, codes=[spec], seed=4)
    assert payloads(image) == [ALLOWED_BADGE]
    assert payloads(image, try_invert=False) == []
    centre = image[240 - 60 : 240 + 60, 320 - 60 : 320 + 60]
    assert float(np.median(centre)) < 100  # mostly dark screen, light modules


def test_two_codes_in_one_scene_both_read() -> None:
    codes = [
        CodeSpec(ALLOWED_BADGE, scale=0.27, center=(0.28, 0.5), angle_deg=-6),
        CodeSpec(REVOKED_BADGE, scale=0.27, center=(0.72, 0.5), angle_deg=8),
    ]
    assert payloads(make_scene(640, 480, codes=codes, seed=5)) == sorted(
        [ALLOWED_BADGE, REVOKED_BADGE]
    )


def test_a_code_outside_the_frame_leaves_the_wall() -> None:
    away = CodeSpec(ALLOWED_BADGE, center=(3.0, 3.0))
    assert np.array_equal(make_scene(160, 120, codes=[away], seed=1), make_scene(160, 120, seed=1))


def test_too_small_a_scene_is_refused() -> None:
    with pytest.raises(ValueError, match="16x16"):
        make_scene(8, 8, seed=0)


def distinct_files(folder: Path) -> dict[tuple[int, int], Path]:
    out: dict[tuple[int, int], Path] = {}
    for p in sorted(folder.iterdir()):
        st = p.stat()
        out.setdefault((st.st_dev, st.st_ino), p)
    return out


def test_demo_reel_tells_the_story(tmp_path: Path) -> None:
    reel = write_demo_reel(tmp_path / "reel")
    assert (reel.width, reel.height, reel.fps) == (640, 480, 30.0)
    assert reel.frames == 534  # 17.8 s at 30 fps
    labels = [s.label for s in reel.segments]
    assert labels == [
        "idle",
        "allowed",
        "idle",
        "revoked",
        "idle",
        "unknown",
        "idle",
        "two_codes",
        "idle",
        "allowed_dark",
        "idle",
        "id_card",
        "idle",
    ]
    assert reel.segments[0].first_frame == 0 and reel.segments[-1].last_frame == reel.frames - 1
    for before, after in zip(reel.segments, reel.segments[1:], strict=False):
        assert after.first_frame == before.last_frame + 1
    by_label = {s.label: s for s in reel.segments}
    assert by_label["allowed"].payloads == (reel.allowed,)
    assert by_label["revoked"].payloads == (reel.revoked,)
    assert by_label["unknown"].payloads == (reel.unknown,)
    assert sorted(by_label["two_codes"].payloads) == sorted([reel.allowed, reel.revoked])
    assert by_label["allowed_dark"].payloads == (reel.allowed,)
    assert by_label["id_card"].payloads == (CHECKIN_CARD,)
    assert CHECKIN_CARD.decode().startswith("074085003417|280912345|Trần Văn Bình|14031985|")
    held = by_label["allowed"]
    assert held.last_frame - held.first_frame + 1 == 30  # held ~1 s
    assert len({reel.allowed, reel.revoked, reel.unknown}) == 3
    assert all(p.startswith(b"QRG-BADGE:") and p.isascii() for p in (reel.allowed, reel.unknown))
    assert (reel.allowed, reel.revoked, reel.unknown) == (
        ALLOWED_BADGE,
        REVOKED_BADGE,
        UNKNOWN_BADGE,
    )


def test_every_demo_frame_reads_as_its_segment_says(tmp_path: Path) -> None:
    reel = write_demo_reel(tmp_path / "reel")
    files = sorted((tmp_path / "reel").iterdir())
    assert [p.name for p in files] == [f"{i:05d}.png" for i in range(reel.frames)]
    distinct = distinct_files(tmp_path / "reel")
    assert len(distinct) <= 12 + 6 * 6  # idle frames and hand poses are written once each
    decoded: dict[tuple[int, int], list[bytes]] = {}
    for key, path in distinct.items():
        decoded[key] = payloads(load_gray(path))
    for seg in reel.segments:
        for i in range(seg.first_frame, seg.last_frame + 1):
            st = files[i].stat()
            assert decoded[(st.st_dev, st.st_ino)] == sorted(seg.payloads), (seg.label, i)
    on_disk = sum(p.stat().st_size for p in distinct.values())
    assert on_disk < 20 * 1024 * 1024


def test_demo_reel_replays_through_the_frame_source(tmp_path: Path) -> None:
    reel = write_demo_reel(tmp_path / "reel", width=320, height=240, fps=10)
    assert reel.frames == 10 + 6 * (10 + 18)
    with (src := ReplaySource(reel.folder, fps=0)):
        n = 0
        while (frame := src.read()) is not None:
            assert frame.image.shape == (240, 320) and frame.seq == n
            n += 1
        assert src.skipped == 0
    assert n == reel.frames


def test_rewriting_a_reel_leaves_no_stale_frames(tmp_path: Path) -> None:
    folder = tmp_path / "reel"
    write_demo_reel(folder, width=160, height=120, fps=20)
    (folder / "keep.txt").write_text("not ours")
    reel = write_demo_reel(folder, width=160, height=120, fps=5)
    pngs = sorted(p.name for p in folder.glob("*.png"))
    assert pngs == [f"{i:05d}.png" for i in range(reel.frames)]
    assert (folder / "keep.txt").exists()


def test_frames_without_hard_links_are_copied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_links(src: object, dst: object) -> None:
        raise PermissionError(1, "Operation not permitted")  # errno EPERM, as on FAT

    monkeypatch.setattr(os, "link", no_links)
    reel = write_demo_reel(tmp_path / "reel", width=160, height=120, fps=5)
    files = sorted((tmp_path / "reel").iterdir())
    assert len(files) == reel.frames
    assert all(p.stat().st_nlink == 1 for p in files)


def test_appended_segments_replace_the_tail_and_read_back(tmp_path: Path) -> None:
    folder = tmp_path / "reel"
    reel = write_demo_reel(folder, width=320, height=240, fps=5)
    head = [(p.name, p.stat().st_ino) for p in sorted(folder.glob("*.png"))]
    long_code = b"QG1:" + b"0123456789ABCDEF" * 14  # a pass-sized payload, 228 bytes
    first = [("pass", (CodeSpec(long_code, scale=0.5),))]
    append_to_reel(folder, reel.frames, first, width=320, height=240, fps=5)
    second = [("other", (CodeSpec(UNKNOWN_BADGE, scale=0.5),)), ("pass", first[0][1])]
    segments = append_to_reel(folder, reel.frames, second, width=320, height=240, fps=5)
    assert [(s.label, s.first_frame, s.last_frame) for s in segments] == [
        ("other", reel.frames, reel.frames + 4),
        ("idle", reel.frames + 5, reel.frames + 13),
        ("pass", reel.frames + 14, reel.frames + 18),
        ("idle", reel.frames + 19, reel.frames + 27),
    ]
    files = sorted(folder.glob("*.png"))
    # the earlier part is untouched (same files), the tail is the second append's only
    assert [(p.name, p.stat().st_ino) for p in files[: reel.frames]] == head
    assert [p.name for p in files] == [f"{i:05d}.png" for i in range(reel.frames + 28)]
    for seg in segments:
        for i in (seg.first_frame, seg.last_frame):
            assert payloads(load_gray(files[i])) == sorted(seg.payloads), (seg.label, i)
    with pytest.raises(ValueError, match="start >= 0"):
        append_to_reel(folder, reel.frames, [])
