"""Refocusing when a code is in view but cannot be read (field case C10).

Continuous autofocus can settle on the background behind a card held close to the lens and stay
there. :class:`FocusAssist` watches the scan loop's verdicts: after a run of unreadable frames
that still show something code-like (:func:`code_like_blob`), it asks the camera for one focus
cycle, then waits a cooldown (growing while cycles bring no read) and a fresh run.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import numpy as np
import numpy.typing as npt

from drivers.frames import Focusable, GrayImage

log = logging.getLogger(__name__)

# code_like_blob works on the frame shrunk to about this many rows (480 -> 120: 4x4 averages)
_SMALL_ROWS = 120
_TILE = 8  # tile side in shrunk pixels: 32 px of a 640x480 frame
# Tile contrast (max - min in shrunk pixels) that counts as "busy". The 4x4 averaging takes
# sensor noise down to a quarter, so noise alone stays below it; modules next to quiet zone or
# card, even defocused, stay far above it.
_BUSY_RANGE = 96
# The strongest tile of a code-like blob: black modules against white (about 200-250 here even
# heavily defocused). Grey-on-grey edges, printed text and a blank card's rim reach about 130.
_PEAK_RANGE = 160
_MIN_TILES = 4
_MAX_ASPECT = 2.5  # a code seen at an angle is still roughly square; a long edge is not
_MIN_FILL = 0.5  # busy tiles over the blob's bounding box: a card's rim is a hollow ring


def code_like_blob(image: GrayImage) -> bool:
    """Whether a gray frame (HxW uint8) shows a compact, high-contrast, textured patch such as a
    QR code, sharp or defocused. Cheap (well under 1 ms at 640x480): it works on the frame
    shrunk by area averaging and split into tiles.

    True needs a connected group of busy tiles (contrast in the tile) that is roughly square,
    mostly filled, has a busy tile whose eight neighbours are all busy (a solid patch, not an
    outline or a line), and holds black-against-white contrast. False for flat frames, sensor
    noise, edges and outlines. Bold print or a checkered pattern can pass too: callers limit
    what a false positive costs (see :class:`FocusAssist`).
    """
    h, w = image.shape[:2]
    factor = max(1, min(h, w) // _SMALL_ROWS)
    sh, sw = h // factor, w // factor
    rows, cols = sh // _TILE, sw // _TILE
    if rows < 3 or cols < 3:
        return False
    # area averaging by an integer factor as block sums: strided adds are 10x faster than a
    # reshaped mean here
    crop: npt.NDArray[np.uint32] = image[: sh * factor, : sw * factor].astype(np.uint32)
    across = crop[:, 0::factor].copy()
    for k in range(1, factor):
        across += crop[:, k::factor]
    small = across[0::factor].copy()
    for k in range(1, factor):
        small += across[k::factor]
    tiles = small[: rows * _TILE, : cols * _TILE].reshape(rows, _TILE, cols, _TILE)
    sums_spread = tiles.max(axis=(1, 3)) - tiles.min(axis=(1, 3))
    spread = sums_spread.astype(np.float32) / (factor * factor)
    busy = spread >= _BUSY_RANGE
    if int(busy.sum()) < _MIN_TILES:
        return False
    core = _solid(busy)
    for cells in _groups(busy):
        ys, xs = cells[:, 0], cells[:, 1]
        height, width = int(ys.max() - ys.min()) + 1, int(xs.max() - xs.min()) + 1
        area = len(cells)
        if area < _MIN_TILES:
            continue
        if max(width, height) > _MAX_ASPECT * min(width, height):
            continue
        if area < _MIN_FILL * width * height:
            continue
        if not core[ys, xs].any():
            continue
        if float(spread[ys, xs].max()) >= _PEAK_RANGE:
            return True
    return False


def _solid(busy: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Busy tiles whose eight neighbours are all busy (outside the frame counts as not)."""
    padded = np.pad(busy, 1, constant_values=False)
    h, w = busy.shape
    out = np.ones_like(busy)
    for dy in range(3):
        for dx in range(3):
            out &= padded[dy : dy + h, dx : dx + w]
    return out


def _groups(busy: npt.NDArray[np.bool_]) -> list[npt.NDArray[np.intp]]:
    """The 8-connected groups of busy tiles, each as an array of (row, col). The tile grid
    is small (about 15x20 at 640x480): a plain flood fill, and no OpenCV in the daemon."""
    h, w = busy.shape
    seen = np.zeros_like(busy)
    groups = []
    for y0, x0 in np.argwhere(busy):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        stack, cells = [(int(y0), int(x0))], []
        while stack:
            y, x = stack.pop()
            cells.append((y, x))
            for ny in range(max(0, y - 1), min(h, y + 2)):
                for nx in range(max(0, x - 1), min(w, x + 2)):
                    if busy[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        groups.append(np.array(cells, dtype=np.intp))
    return groups


class FocusAssist:
    """Asks ``camera`` for a focus cycle after ``after_frames`` consecutive unreadable frames
    that each show a code-like blob.

    ``camera``: anything :class:`drivers.frames.Focusable` (``None``: never triggers).
    ``after_frames``: run length in frames (0: never). ``cooldown_s``: seconds after a cycle
    before the next may start; it doubles for each cycle that is not followed by a readable
    frame, up to ``max_cooldown_s`` (a static poster or a card that cannot be read must not keep
    the lens hunting), and is back to ``cooldown_s`` after a read. ``monotonic``: clock in
    seconds. Each cycle needs a fresh run: the run restarts at the cycle, and at every readable
    or blob-free frame. Used from one thread (the scan loop).
    """

    def __init__(
        self,
        camera: Focusable | None,
        *,
        after_frames: int,
        cooldown_s: float = 3.0,
        max_cooldown_s: float = 30.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if after_frames < 0 or cooldown_s < 0 or max_cooldown_s < cooldown_s:
            raise ValueError(
                f"focus assist: after_frames {after_frames} and cooldown {cooldown_s} s must not"
                f" be negative, and the cooldown cap {max_cooldown_s} s not below the cooldown"
            )
        self._camera = camera
        self._after_frames = after_frames
        self._base_cooldown_s = cooldown_s
        self._max_cooldown_s = max_cooldown_s
        self._cooldown_s = cooldown_s
        self._monotonic = monotonic
        self._run = 0
        self._streak = 0  # cycles since the last readable frame
        self._last_cycle: float | None = None
        self.cycles = 0
        """Focus cycles asked so far."""

    @property
    def enabled(self) -> bool:
        """False when there is no camera to focus or ``after_frames`` is 0."""
        return self._camera is not None and self._after_frames > 0

    def observe(self, image: GrayImage, readable: bool) -> bool:
        """Take one frame's verdict (``image``: gray HxW uint8; ``readable``: a code was
        decoded from it). Returns True when this frame started a focus cycle. Never raises
        because of the camera: a failing ``focus_cycle`` is logged."""
        if not self.enabled:
            return False
        if readable:
            self._run = 0
            self._streak = 0
            self._cooldown_s = self._base_cooldown_s
            return False
        if not code_like_blob(image):
            self._run = 0
            return False
        self._run += 1
        if self._run < self._after_frames:
            return False
        now = self._monotonic()
        if self._last_cycle is not None and now - self._last_cycle < self._cooldown_s:
            return False
        # each cycle since the last read doubles the wait before the next one
        self._streak += 1
        self._cooldown_s = min(
            self._base_cooldown_s * 2 ** (self._streak - 1), self._max_cooldown_s
        )
        self._run = 0
        self._last_cycle = now
        self.cycles += 1
        assert self._camera is not None
        try:
            self._camera.focus_cycle()
        except Exception:
            log.exception("focus cycle failed")
            return False
        log.info("focus cycle: %d unreadable frames showed a code", self._after_frames)
        return True
