"""Replay frame source: a folder of images, a list of image files or a video, paced like a camera.

Used by the demo, the benchmark and the field-case tests (C05-C10): every frame goes through the
same :class:`drivers.frames.FrameSource` seam as a real camera.
"""

from __future__ import annotations

import logging
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from drivers.exceptions import CameraTimeoutError, FrameFileError, FrameSourceError
from drivers.frames import Frame, FrameSource, GrayImage

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".pgm", ".ppm", ".tif", ".tiff"}
)
"""File name endings (case-insensitive) taken from a reel folder; other files are ignored."""

VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mkv", ".mov"})
"""File name endings replayed as a video through OpenCV."""

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
"""Decoded frames kept in memory per source (512 MiB): a 15 s 1280x720 reel at 30 fps fits."""

_NS_PER_S = 1_000_000_000
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key putting ``frame2.png`` before ``frame10.png`` (digit runs compare as numbers)."""
    parts = (
        (0, int(part), "") if part.isdigit() else (1, 0, part.casefold())
        for part in _DIGITS.split(name)
        if part
    )
    return (*parts, (2, 0, name))  # ties ("a01" vs "a1"): the exact name decides, order is total


def load_gray(path: Path) -> GrayImage:
    """Read an image file as a gray HxW uint8 array (a new, writable, C-contiguous array).

    EXIF orientation is applied; colour becomes luma (ITU-R 601); alpha is composited over white
    (the paper a transparent code is printed on); 16-bit images keep their top 8 bits; palette,
    CMYK and 1-bit images are converted; of an animation only the first frame is read.
    Raises :class:`drivers.exceptions.FrameFileError` ("<path>: <reason>") when the file is
    missing, empty, not an image, corrupt, or holds a 0x0 image.
    """
    try:
        size = path.stat().st_size
    except OSError as e:
        raise FrameFileError(f"{path}: cannot read the file ({e.strerror or e})") from e
    if size == 0:
        raise FrameFileError(f"{path}: empty file (0 bytes)")
    try:
        with Image.open(path) as im:
            gray = _pil_to_gray(im)
    except UnidentifiedImageError as e:
        raise FrameFileError(f"{path}: not an image Pillow can read (unknown format)") from e
    except Image.DecompressionBombError as e:
        raise FrameFileError(f"{path}: image too large ({e})") from e
    # Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, zlib.error, struct.error
    # on damaged data; any of them means "this file is bad", never "stop the reader".
    except Exception as e:
        raise FrameFileError(f"{path}: corrupt image data ({type(e).__name__}: {e})") from e
    if gray.size == 0:
        raise FrameFileError(f"{path}: image is empty ({gray.shape[1]}x{gray.shape[0]})")
    return gray


def _pil_to_gray(im: Image.Image) -> GrayImage:
    im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        # "I" is how older Pillow opens 16-bit PNGs: treat its range as 16 bits as well.
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return np.ascontiguousarray(wide >> 8, dtype=np.uint8)
    if mode == "F":
        f = np.nan_to_num(np.asarray(im, dtype=np.float64))
        peak = 1.0 if f.size and float(f.max()) <= 1.0 else 255.0
        return np.ascontiguousarray(np.clip(f * (255.0 / peak), 0, 255) + 0.5, dtype=np.uint8)
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode in ("L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, im.convert("RGBA"))
    if im.mode not in ("L", "1", "RGB"):
        im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV, RGBA...: Pillow converts these to RGB
    return np.array(im.convert("L"), dtype=np.uint8)


def _read_only(image: GrayImage) -> GrayImage:
    if image.flags.writeable:
        image = image.view()  # a read-only view: the loader's own array stays as it was
        image.setflags(write=False)
    return image


class _Reel(Protocol):
    """One pass over a reel's images; ``rewind`` starts the next pass."""

    skipped: int
    cached_bytes: int

    def next(self) -> tuple[GrayImage, str] | None: ...

    def rewind(self) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class _Entry:
    path: Path
    key: object  # file identity: hard links and repeated list entries share one decoded image


class _FileReel:
    def __init__(
        self, paths: Sequence[Path], budget: int, loader: Callable[[Path], GrayImage]
    ) -> None:
        self._entries = [_Entry(p, _identity(p)) for p in paths]
        self._budget = budget
        self._loader = loader
        self._cache: dict[object, GrayImage] = {}
        self._bad: set[object] = set()
        self._pos = 0
        self.skipped = 0
        self.cached_bytes = 0

    def next(self) -> tuple[GrayImage, str] | None:
        while self._pos < len(self._entries):
            entry = self._entries[self._pos]
            self._pos += 1
            if entry.key in self._bad:
                continue
            image = self._cache.get(entry.key)
            if image is None:
                image = self._load(entry)
                if image is None:
                    continue
            return image, entry.path.name
        return None

    def _load(self, entry: _Entry) -> GrayImage | None:
        try:
            image = self._loader(entry.path)
            if image.ndim != 2 or image.dtype != np.uint8 or image.size == 0:
                raise FrameFileError(
                    f"{entry.path}: loader gave a {image.dtype} array of shape {image.shape},"
                    " not a non-empty HxW uint8 image"
                )
        except FrameFileError as e:
            self._bad.add(entry.key)
            self.skipped += 1
            log.warning("replay: skipping %s", e)
            return None
        image = _read_only(np.ascontiguousarray(image))
        if self.cached_bytes + image.nbytes <= self._budget:
            self._cache[entry.key] = image
            self.cached_bytes += image.nbytes
        return image

    def rewind(self) -> None:
        self._pos = 0

    def close(self) -> None:
        self._cache.clear()
        self.cached_bytes = 0


def _identity(path: Path) -> object:
    try:
        st = path.stat()
    except OSError:
        return str(path)
    return (st.st_dev, st.st_ino)


class _VideoReel:
    """A video file: decoded once into memory when it fits the budget, else streamed every pass."""

    def __init__(self, path: Path, budget: int) -> None:
        import cv2  # imported here: only video replay needs OpenCV

        self._cv2: Any = cv2
        self._path = path
        self._budget = budget
        self._frames: list[GrayImage] = []
        self._complete = False  # every frame of the video is in self._frames
        self._streaming = False  # the video did not fit the budget
        self._pos = 0
        self._capture: Any = None
        self.skipped = 0
        self.cached_bytes = 0
        self._open_capture()

    def _open_capture(self) -> None:
        self._capture = self._cv2.VideoCapture(str(self._path))
        if not self._capture.isOpened():
            self._capture.release()
            self._capture = None
            raise FrameSourceError(
                f"replay: cannot open video {self._path} (corrupt file or codec not supported)"
            )

    def next(self) -> tuple[GrayImage, str] | None:
        origin = f"{self._path.name}#{self._pos}"
        if self._complete:
            if self._pos >= len(self._frames):
                return None
            self._pos += 1
            return self._frames[self._pos - 1], origin
        if self._capture is None:
            return None
        ok, bgr = self._capture.read()
        if not ok or bgr is None:
            self._capture.release()
            self._capture = None
            self._complete = not self._streaming
            return None
        gray = self._cv2.cvtColor(bgr, self._cv2.COLOR_BGR2GRAY) if bgr.ndim == 3 else bgr
        image = _read_only(np.ascontiguousarray(gray, dtype=np.uint8))
        if not self._streaming:
            if self.cached_bytes + image.nbytes <= self._budget:
                self._frames.append(image)
                self.cached_bytes += image.nbytes
            else:
                self._streaming = True  # half a video in memory saves no decoding: drop it
                self._frames.clear()
                self.cached_bytes = 0
        self._pos += 1
        return image, origin

    def rewind(self) -> None:
        self._pos = 0
        if not self._complete:
            self._frames.clear()  # a partial pass is read again from the start
            self.cached_bytes = 0
            if self._capture is not None:
                self._capture.release()
            self._open_capture()

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None
        self._frames.clear()
        self.cached_bytes = 0


class ReplaySource(FrameSource):
    """Frames from image files or a video, paced on the monotonic clock like a camera.

    ``items``: a folder (its image files, see :data:`IMAGE_SUFFIXES`, in natural name order;
    subfolders, hidden files and other files are ignored), one image file, a list of image files
    (played in the given order; a file may appear many times), or one video file
    (:data:`VIDEO_SUFFIXES`, decoded with OpenCV, converted to gray).
    ``fps``: delivery rate in frames per second; 0 delivers as fast as ``read`` is called.
    ``loop``: start again after the last image instead of ending. ``repeat``: each image is
    delivered this many times in a row (a badge held up for ``repeat`` frames).
    ``cache_bytes``: decoded images (HxW bytes each) kept in memory as read-only arrays, so a
    looping reel decodes each file once; images beyond the budget are decoded on every pass.
    ``loader``: reads one file as gray (default :func:`load_gray`); raises ``FrameFileError``.

    Frames are read-only arrays shared between deliveries: copy one before changing it.
    ``Frame.t_ns`` is the monotonic delivery time, ``seq`` counts from 0, ``origin`` is the file
    name (``video.mp4#17`` for a video frame). An unreadable image is skipped with one warning
    naming the file and the reason, once per source, and counted in :attr:`skipped`.
    """

    name = "replay"

    def __init__(
        self,
        items: Path | Sequence[Path],
        *,
        fps: float = 30.0,
        loop: bool = False,
        repeat: int = 1,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
        sleep: Callable[[float], None] = time.sleep,
        loader: Callable[[Path], GrayImage] = load_gray,
    ) -> None:
        if not (math.isfinite(fps) and fps >= 0):
            raise ValueError(f"fps must be a finite number >= 0, got {fps!r}")
        if repeat < 1:
            raise ValueError(f"repeat must be >= 1, got {repeat!r}")
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes!r}")
        self._items: Path | tuple[Path, ...] = (
            Path(items) if isinstance(items, str | os.PathLike) else tuple(Path(p) for p in items)
        )
        self._period_ns = round(_NS_PER_S / fps) if fps > 0 else 0
        self._loop = loop
        self._repeat = repeat
        self._budget = cache_bytes
        self._monotonic_ns = monotonic_ns
        self._sleep = sleep
        self._loader = loader
        self._reel: _Reel | None = None
        self._skipped_closed = 0  # the count of the last reel, readable after close()
        self._reset()

    def _reset(self) -> None:
        self._current: tuple[GrayImage, str] | None = None
        self._left = 0  # deliveries left of self._current
        self._seq = 0
        self._due_ns: int | None = None
        self._ended = False

    @property
    def skipped(self) -> int:
        """How many distinct files were found unreadable and skipped since the last ``open``."""
        return self._reel.skipped if self._reel else self._skipped_closed

    @property
    def cached_bytes(self) -> int:
        """Bytes of decoded images held in memory now (at most ``cache_bytes``)."""
        return self._reel.cached_bytes if self._reel else 0

    def open(self) -> None:
        """Find the images and check at least one is readable.

        Raises :class:`drivers.exceptions.FrameSourceError` when the path does not exist, the
        folder has no image files, every image is unreadable, or the video cannot be opened.
        Opening again starts from the first image with ``seq`` 0.
        """
        self.close()
        self._reset()
        self._skipped_closed = 0
        reel = self._make_reel()
        first = reel.next()
        if first is None:
            reel.close()
            self._skipped_closed = reel.skipped
            why = (
                f"all {reel.skipped} image files are unreadable (see the warnings above)"
                if reel.skipped
                else "it holds no frames"
            )
            raise FrameSourceError(f"replay: nothing to play in {self._describe()}: {why}")
        reel.rewind()
        self._reel = reel

    def _describe(self) -> str:
        if isinstance(self._items, Path):
            kind = "folder" if self._items.is_dir() else "file"
            return f"{kind} {self._items}"
        return f"the list of {len(self._items)} files starting with {self._items[0]}"

    def _make_reel(self) -> _Reel:
        items = self._items
        if isinstance(items, tuple):
            if not items:
                raise FrameSourceError("replay: the list of image files is empty")
            videos = [p for p in items if p.suffix.lower() in VIDEO_SUFFIXES]
            if videos:
                raise FrameSourceError(
                    f"replay: {videos[0]} is a video: give a video file alone, not in a list"
                )
            return _FileReel(items, self._budget, self._loader)
        if not items.exists():
            raise FrameSourceError(f"replay: {items} does not exist")
        if items.is_dir():
            paths = sorted(
                (
                    p
                    for p in items.iterdir()
                    if p.suffix.lower() in IMAGE_SUFFIXES
                    and not p.name.startswith(".")
                    and p.is_file()
                ),
                key=lambda p: natural_key(p.name),
            )
            if not paths:
                kinds = ", ".join(sorted(IMAGE_SUFFIXES))
                raise FrameSourceError(f"replay: no image files ({kinds}) in folder {items}")
            return _FileReel(paths, self._budget, self._loader)
        if items.suffix.lower() in VIDEO_SUFFIXES:
            return _VideoReel(items, self._budget)
        return _FileReel([items], self._budget, self._loader)

    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """The next frame, when it is due; ``None`` once a non-looping reel has ended.

        Sleeps until the frame's slot (``1/fps`` after the previous one). A consumer that fell
        behind by more than one slot gets the next frame at once and the schedule restarts from
        there, so frames never come in a burst.
        Raises :class:`drivers.exceptions.CameraTimeoutError` after sleeping ``timeout_s`` when
        the slot is further away than that (fps below ``1/timeout_s``; the same frame comes on
        the next call), and :class:`drivers.exceptions.FrameSourceError` when the source is not
        open or every image has become unreadable.
        """
        reel = self._reel
        if reel is None:
            raise FrameSourceError("replay: read() before open() or after close()")
        if self._ended:
            return None
        if self._left == 0:
            nxt = reel.next()
            if nxt is None and self._loop:
                reel.rewind()
                nxt = reel.next()
                if nxt is None:
                    raise FrameSourceError(f"replay: every image in {self._describe()} is gone")
            if nxt is None:
                self._ended = True
                return None
            self._current, self._left = nxt, self._repeat
        assert self._current is not None
        t_ns = self._wait_for_slot(timeout_s)
        self._left -= 1
        image, origin = self._current
        frame = Frame(image=image, t_ns=t_ns, seq=self._seq, origin=origin)
        self._seq += 1
        return frame

    def _wait_for_slot(self, timeout_s: float) -> int:
        now = self._monotonic_ns()
        if self._period_ns == 0:
            return now
        due = now if self._due_ns is None else self._due_ns
        wait_ns = due - now
        if wait_ns > 0:
            if wait_ns > timeout_s * _NS_PER_S:
                self._sleep(timeout_s)
                raise CameraTimeoutError(
                    f"replay: next frame due in {wait_ns / _NS_PER_S:.3f} s,"
                    f" beyond the {timeout_s} s read timeout"
                )
            self._sleep(wait_ns / _NS_PER_S)
            now = self._monotonic_ns()
        nxt = due + self._period_ns
        # Late by more than a whole slot: start a fresh schedule rather than catch up in a burst.
        self._due_ns = nxt if nxt > now else now + self._period_ns
        return now

    def close(self) -> None:
        """Release the video and drop the decoded images. Safe to call twice."""
        if self._reel is not None:
            self._skipped_closed = self._reel.skipped
            self._reel.close()
            self._reel = None
