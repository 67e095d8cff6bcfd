"""Camera-like gray frames made here: a wall, a badge or a phone with a QR code, sensor noise.

The demo and the benchmark replay these through :class:`drivers.replay.ReplaySource`, so they go
through the same path as real camera frames. Everything is deterministic for a given seed.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import segno
from PIL import Image, ImageDraw, ImageFilter

from drivers.frames import GrayImage

F32 = npt.NDArray[np.float32]

ALLOWED_BADGE = b"QRG-BADGE:alice-0001"
REVOKED_BADGE = b"QRG-BADGE:bob-0002"
UNKNOWN_BADGE = b"QRG-BADGE:mallory-0666"
# the first accepted CCCD of the field cases (an invented person), shown at a check-in reader
CHECKIN_CARD = (
    "074085003417|280912345|Trần Văn Bình|14031985|Nam|"
    "Tổ 3, Khu phố Mẫu, Phường Bình Hòa, Thuận An, Bình Dương|10052021"
).encode()

_QUIET = 4  # modules of quiet zone around every code, as the QR standard asks
_SS = 2  # objects are drawn at twice the frame resolution, then box-filtered down
_FRAME_NAME = re.compile(r"^\d{5}\.png$")


@dataclass(frozen=True, slots=True)
class CodeSpec:
    """One QR code in a scene.

    ``payload``: the exact bytes encoded (byte mode, no ECI). ``dark_mode``: light modules on a
    dark phone screen (a phone in dark mode) instead of a printed card. ``scale``: side of the
    code including its quiet zone, as a fraction of the frame height (0.17-0.35 is a 4.5 cm code
    held 30-15 cm from a typical 60-70° lens). ``center``: the code's centre as fractions of
    (width, height). ``angle_deg``: rotation in the image plane, counter-clockwise. ``tilt``:
    keystone from holding the card tilted back (0 = facing the lens; 0.05 = top edge 10% narrower
    than the bottom).
    """

    payload: bytes
    dark_mode: bool = False
    scale: float = 0.3
    center: tuple[float, float] = (0.5, 0.5)
    angle_deg: float = 6.0
    tilt: float = 0.04


class Segment(NamedTuple):
    """A stretch of the demo reel: frames ``first_frame``..``last_frame`` (inclusive)."""

    label: str
    first_frame: int
    last_frame: int
    payloads: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class DemoReel:
    """A demo reel written to ``folder`` as ``00000.png``, ``00001.png``...

    ``frames``: number of frame files; ``fps``: the rate it is meant to be played at; segments
    in order. ``allowed``/``revoked``/``unknown``: the badge payloads, for the demo's badge list.
    """

    folder: Path
    frames: int
    fps: float
    width: int
    height: int
    segments: list[Segment] = field(default_factory=list)
    allowed: bytes = ALLOWED_BADGE
    revoked: bytes = REVOKED_BADGE
    unknown: bytes = UNKNOWN_BADGE


def make_scene(
    width: int,
    height: int,
    *,
    codes: Sequence[CodeSpec] = (),
    seed: int,
    noise: float = 2.0,
    world: int = 0,
    blur: float = 0.7,
) -> GrayImage:
    """A gray HxW uint8 camera frame of a wall, with ``codes`` held up in front of it.

    ``seed`` picks the sensor noise (Gaussian, ``noise`` gray levels standard deviation);
    ``world`` picks the wall, its lighting and a door edge, so frames with one ``world`` and
    different seeds look like successive frames of one camera. ``blur``: lens blur radius in
    pixels. Raises ValueError for a size below 16x16.
    """
    return _Scene(width, height, world).render(codes, seed=seed, noise=noise, blur=blur)


def idle_frames(width: int, height: int, n: int, seed: int) -> list[GrayImage]:
    """``n`` frames of the same empty scene (world ``seed``), each with its own sensor noise."""
    scene = _Scene(width, height, seed)
    return [scene.render((), seed=_mix(seed, i)) for i in range(n)]


def code_frame(width: int, height: int, payload: bytes, seed: int) -> GrayImage:
    """A frame with one printed badge holding ``payload``, placed, turned and tilted by ``seed``.

    Readable by zxing-cpp for payloads up to ~60 bytes (at most QR version 4) at 640x480 and up.
    """
    rng = np.random.default_rng(_mix(seed, 7))
    spec = CodeSpec(
        payload,
        scale=float(rng.uniform(0.27, 0.34)),
        center=(float(rng.uniform(0.42, 0.58)), float(rng.uniform(0.42, 0.58))),
        angle_deg=float(rng.uniform(-12.0, 12.0)),
        tilt=float(rng.uniform(-0.05, 0.05)),
    )
    return make_scene(width, height, codes=[spec], seed=seed, world=seed)


def write_demo_reel(
    folder: Path, *, width: int = 640, height: int = 480, fps: float = 30
) -> DemoReel:
    """Write the ~18 s demo story as numbered PNG frames in ``folder`` (created if needed).

    Idle 1 s; the allowed badge held 1 s; idle 1.8 s; the revoked badge; idle; an unknown code;
    idle; the allowed and the revoked badge together; idle; the allowed badge on a dark-mode
    phone; idle; an ID card (CCCD) shown for check-in; idle. A hand is not still, so each held
    code takes 6 poses in turn; 12 noisy idle frames are reused cyclically. Each distinct frame
    is written once and the repeats are hard links to it (copies where the file system has
    none), which keeps the reel small on disk and lets :class:`drivers.replay.ReplaySource`
    decode each distinct image once. Old ``NNNNN.png`` files in ``folder`` are removed first;
    other files are left alone. :func:`append_to_reel` tells more after it (the demo's
    passes, which depend on the time of the run).
    """
    rate = _rate(fps)
    folder.mkdir(parents=True, exist_ok=True)
    _remove_frames(folder, 0)
    segments = _write_story(
        folder, _story(rate, _demo_codes(), lead=True), width, height, start=0, offset=0
    )
    return DemoReel(
        folder=folder,
        frames=segments[-1].last_frame + 1,
        fps=rate,
        width=width,
        height=height,
        segments=segments,
    )


def append_to_reel(
    folder: Path,
    start: int,
    codes: Sequence[tuple[str, tuple[CodeSpec, ...]]],
    *,
    width: int = 640,
    height: int = 480,
    fps: float = 30,
) -> list[Segment]:
    """Replace the frames of ``folder`` from number ``start`` on with ``codes``, each held 1 s
    and followed by 1.8 s of idle wall, as :func:`write_demo_reel` tells its story (same
    wall, same sizes); returns their segments. ``start``: the frame count of the reel written
    before (its last segment is idle). Raises ValueError for a negative ``start`` or an empty
    ``codes``."""
    rate = _rate(fps)
    if start < 0 or not codes:
        raise ValueError("append_to_reel needs start >= 0 and at least one code segment")
    folder.mkdir(parents=True, exist_ok=True)
    _remove_frames(folder, start)
    story = _story(rate, codes, lead=False)
    return _write_story(folder, story, width, height, start=start, offset=len(_demo_codes()) + 1)


def _rate(fps: float) -> float:
    rate = float(fps)
    if not (math.isfinite(rate) and rate > 0):
        raise ValueError(f"fps must be > 0, got {fps!r}")
    return rate


def _remove_frames(folder: Path, start: int) -> None:
    for old in folder.iterdir():
        if _FRAME_NAME.match(old.name) and int(old.name[:5]) >= start:
            old.unlink()


_Story = list[tuple[str, int, tuple[CodeSpec, ...]]]


def _story(rate: float, codes: Sequence[tuple[str, tuple[CodeSpec, ...]]], *, lead: bool) -> _Story:
    hold = max(1, round(rate))
    gap = max(1, round(1.8 * rate))
    story: _Story = [("idle", hold, ())] if lead else []
    for label, specs in codes:
        story += [(label, hold, specs), ("idle", gap, ())]
    return story


def _write_story(
    folder: Path, story: _Story, width: int, height: int, *, start: int, offset: int
) -> list[Segment]:
    """Write ``story`` as frames ``start``, ``start + 1``...; ``offset``: added to the segment
    number that seeds the hand poses, so appended codes are not posed like the first ones."""
    scene = _Scene(width, height, world=2024)
    idle_variants = 12
    poses = 6
    segments: list[Segment] = []
    written: dict[tuple[str, int], Path] = {}
    index = start
    idle_seen = 0
    for label, count, specs in story:
        first = index
        for k in range(count):
            if specs:
                key = (label, k % poses)
                seed = _mix(len(segments) + offset, k % poses)
            else:
                key = ("idle", idle_seen % idle_variants)
                seed = _mix(1000, idle_seen % idle_variants)
                idle_seen += 1
            path = folder / f"{index:05d}.png"
            if key in written:
                _link_or_copy(written[key], path)
            else:
                posed = _jiggle(specs, seed) if specs else ()
                Image.fromarray(scene.render(posed, seed=seed)).save(path, compress_level=1)
                written[key] = path
            index += 1
        segments.append(Segment(label, first, index - 1, tuple(s.payload for s in specs)))
    return segments


def _demo_codes() -> list[tuple[str, tuple[CodeSpec, ...]]]:
    return [
        ("allowed", (CodeSpec(ALLOWED_BADGE, scale=0.32, center=(0.48, 0.52), angle_deg=7),)),
        ("revoked", (CodeSpec(REVOKED_BADGE, scale=0.3, center=(0.55, 0.48), angle_deg=-9),)),
        ("unknown", (CodeSpec(UNKNOWN_BADGE, scale=0.29, center=(0.5, 0.5), angle_deg=3),)),
        (
            "two_codes",
            (
                CodeSpec(ALLOWED_BADGE, scale=0.27, center=(0.28, 0.52), angle_deg=-6),
                CodeSpec(REVOKED_BADGE, scale=0.27, center=(0.72, 0.47), angle_deg=8),
            ),
        ),
        (
            "allowed_dark",
            (CodeSpec(ALLOWED_BADGE, dark_mode=True, scale=0.3, center=(0.5, 0.47), angle_deg=-5),),
        ),
        ("id_card", (CodeSpec(CHECKIN_CARD, scale=0.42, center=(0.5, 0.5), angle_deg=4),)),
    ]


def _jiggle(specs: Sequence[CodeSpec], seed: int) -> tuple[CodeSpec, ...]:
    """The same codes, moved as a hand holding them moves between frames."""
    rng = np.random.default_rng(_mix(seed, 11))
    out = []
    for s in specs:
        dx, dy = rng.normal(0.0, 0.006, size=2)
        out.append(
            CodeSpec(
                s.payload,
                dark_mode=s.dark_mode,
                scale=s.scale * float(1.0 + rng.normal(0.0, 0.015)),
                center=(s.center[0] + float(dx), s.center[1] + float(dy)),
                angle_deg=s.angle_deg + float(rng.normal(0.0, 1.2)),
                tilt=s.tilt + float(rng.normal(0.0, 0.01)),
            )
        )
    return tuple(out)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EXDEV, errno.EMLINK, errno.ENOTSUP, errno.EACCES):
            raise
        shutil.copyfile(src, dst)


def _mix(a: int, b: int) -> int:
    """A seed from two numbers that differs for every pair (Cantor pairing, sign folded)."""
    a, b = (2 * a if a >= 0 else -2 * a - 1), (2 * b if b >= 0 else -2 * b - 1)
    return (a + b) * (a + b + 1) // 2 + b


class _Scene:
    """One camera view of a wall: reflectance and lighting fixed, codes and noise per frame."""

    def __init__(self, width: int, height: int, world: int) -> None:
        if width < 16 or height < 16:
            raise ValueError(f"a scene needs at least 16x16 pixels, got {width}x{height}")
        self.width, self.height = width, height
        rng = np.random.default_rng(_mix(world, 3))
        y = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height
        x = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width
        aspect = width / height

        # Wall paint: a flat tone with a faint plaster texture (smooth noise a few pixels wide).
        tone = float(rng.uniform(150.0, 185.0))
        grain = rng.normal(0.0, 1.0, size=(height // 6 + 2, width // 6 + 2)).astype(np.float32)
        grain_img = Image.fromarray(grain, mode="F").resize(
            (width, height), Image.Resampling.BICUBIC
        )
        albedo = tone + 2.5 * np.asarray(grain_img, dtype=np.float32)
        # A door beside the wall: a darker panel and the dark gap at its edge.
        door_x = int(width * rng.uniform(0.78, 0.92))
        albedo[:, door_x:] -= float(rng.uniform(25.0, 45.0))
        albedo[:, max(0, door_x - 2) : door_x + 1] *= 0.45
        self.albedo: F32 = albedo.astype(np.float32)

        # Light: one side brighter, broad low-frequency patches, darker corners (vignetting).
        angle = rng.uniform(0.0, 2.0 * math.pi)
        light = 0.85 + 0.18 * ((x - 0.5) * math.cos(angle) + (y - 0.5) * math.sin(angle))
        for _ in range(3):
            fx, fy = rng.uniform(0.4, 1.4, size=2)
            px, py = rng.uniform(0.0, 2.0 * math.pi, size=2)
            light = light + 0.03 * np.sin(2 * math.pi * fx * x + px) * np.cos(
                2 * math.pi * fy * y + py
            )
        r2 = ((x - 0.5) * aspect) ** 2 + (y - 0.5) ** 2
        self.light: F32 = (light * (1.0 - 0.35 * r2 / (0.25 * aspect**2 + 0.25))).astype(np.float32)

    def render(
        self, codes: Sequence[CodeSpec], *, seed: int, noise: float = 2.0, blur: float = 0.7
    ) -> GrayImage:
        canvas = self.albedo.copy()
        for spec in codes:
            _place(canvas, spec, self.height)
        lit = canvas * self.light
        image = Image.fromarray(np.clip(lit + 0.5, 0, 255).astype(np.uint8))
        if blur > 0:
            image = image.filter(ImageFilter.GaussianBlur(blur))
        out = np.asarray(image, dtype=np.float32)
        if noise > 0:
            rng = np.random.default_rng(_mix(seed, 5))
            out = out + rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise)
        return np.ascontiguousarray(np.clip(out + 0.5, 0, 255), dtype=np.uint8)


def _code_modules(payload: bytes) -> npt.NDArray[np.bool_]:
    qr = segno.make_qr(payload, error="m", boost_error=False)
    dark = np.array([list(row) for row in qr.matrix], dtype=bool)
    return np.pad(dark, _QUIET, constant_values=False)


def _object_image(spec: CodeSpec, side_px: float) -> tuple[Image.Image, Image.Image, float]:
    """The card or phone in its own coordinates: (gray image, coverage mask, code side there).

    Drawn with whole pixels per module near ``_SS`` times the code's size in the frame, and the
    code centred at the middle of the returned image.
    """
    modules = _code_modules(spec.payload)
    n = modules.shape[0]
    px = max(2, math.ceil(_SS * side_px / n))
    code_side = n * px
    if spec.dark_mode:
        ink, paper = 220, 26  # the app draws light modules on its dark background
        body_w = round(code_side * 1.3)
        body_h = round(body_w * 2.05)
        img = Image.new("L", (body_w, body_h), 0)
        mask = Image.new("L", (body_w, body_h), 0)
        radius = body_w // 9
        ImageDraw.Draw(mask).rounded_rectangle((0, 0, body_w - 1, body_h - 1), radius, fill=255)
        draw = ImageDraw.Draw(img)
        draw.rounded_rectangle((0, 0, body_w - 1, body_h - 1), radius, fill=14)
        bezel = body_w // 24
        draw.rounded_rectangle(
            (bezel, bezel, body_w - 1 - bezel, body_h - 1 - bezel), radius - bezel, fill=paper
        )
        width, height = body_w, body_h
    else:
        ink, paper = 28, 238
        border = max(px, round(0.06 * code_side))
        width = height = code_side + 2 * border
        img = Image.new("L", (width, height), 212)  # a grey printed frame around the code
        mask = Image.new("L", (width, height), 0)
        radius = border
        ImageDraw.Draw(mask).rounded_rectangle((0, 0, width - 1, height - 1), radius, fill=255)
    cells = np.where(modules, ink, paper).astype(np.uint8)
    code = Image.fromarray(cells).resize((code_side, code_side), Image.Resampling.NEAREST)
    img.paste(code, ((width - code_side) // 2, (height - code_side) // 2))
    return img, mask, float(code_side)


def _place(canvas: F32, spec: CodeSpec, frame_height: int) -> None:
    """Draw the code's card or phone onto ``canvas`` (HxW reflectance), with a soft shadow."""
    h, w = canvas.shape
    side = spec.scale * frame_height
    obj, mask, code_side = _object_image(spec, side)
    ow, oh = obj.size
    k = side / code_side  # object pixels -> frame pixels
    cx, cy = spec.center[0] * w, spec.center[1] * h
    a = math.radians(spec.angle_deg)
    cos_a, sin_a = math.cos(a), math.sin(a)
    corners_obj = [(0.0, 0.0), (float(ow), 0.0), (float(ow), float(oh)), (0.0, float(oh))]
    corners_img = []
    for ox, oy in corners_obj:
        dx, dy = (ox - ow / 2) * k, (oy - oh / 2) * k
        dx *= 1.0 + spec.tilt * (2.0 * oy / oh - 1.0)  # keystone: one edge nearer the lens
        corners_img.append((cx + dx * cos_a + dy * sin_a, cy - dx * sin_a + dy * cos_a))

    pad = max(4.0, 0.06 * side)  # room for the shadow
    x0 = max(0, math.floor(min(p[0] for p in corners_img) - pad))
    y0 = max(0, math.floor(min(p[1] for p in corners_img) - pad))
    x1 = min(w, math.ceil(max(p[0] for p in corners_img) + 2 * pad))
    y1 = min(h, math.ceil(max(p[1] for p in corners_img) + 2 * pad))
    if x1 <= x0 or y1 <= y0:
        return  # entirely outside the frame
    out_size = ((x1 - x0) * _SS, (y1 - y0) * _SS)
    local = [((px - x0) * _SS, (py - y0) * _SS) for px, py in corners_img]
    coeffs = _perspective_coeffs(local, corners_obj)
    warped = obj.transform(
        out_size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BICUBIC, fillcolor=0
    ).reduce(_SS)
    cover = mask.transform(
        out_size, Image.Transform.PERSPECTIVE, coeffs, Image.Resampling.BILINEAR, fillcolor=0
    )
    shift = round(pad * 0.5 * _SS)
    shadow = Image.new("L", out_size, 0)
    shadow.paste(cover, (shift, shift))
    shadow = shadow.filter(ImageFilter.GaussianBlur(pad * _SS / 3)).reduce(_SS)
    cover = cover.reduce(_SS)

    region = canvas[y0:y1, x0:x1]
    alpha = np.asarray(cover, dtype=np.float32) / 255.0
    dim = 1.0 - 0.35 * np.asarray(shadow, dtype=np.float32) / 255.0
    region *= dim
    region += alpha * (np.asarray(warped, dtype=np.float32) - region)


def _perspective_coeffs(
    dst: Sequence[tuple[float, float]], src: Sequence[tuple[float, float]]
) -> tuple[float, ...]:
    """Pillow's 8 PERSPECTIVE coefficients mapping output points ``dst`` to input points ``src``."""
    rows = []
    rhs = []
    for (x, y), (u, v) in zip(dst, src, strict=True):
        rows.append([x, y, 1.0, 0.0, 0.0, 0.0, -u * x, -u * y])
        rows.append([0.0, 0.0, 0.0, x, y, 1.0, -v * x, -v * y])
        rhs += [u, v]
    solution = np.linalg.solve(np.array(rows, dtype=np.float64), np.array(rhs, dtype=np.float64))
    return tuple(float(c) for c in solution)
