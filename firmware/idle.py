"""Idle skipping: a door reader spends nearly all its life looking at an empty scene.

Decoding every idle frame at 30 fps costs a few percent of a core here and 5-8x that on a Pi.
A frame that is unchanged from the last decoded frame that held no code, apart from sensor
noise, cannot hold a new code, so it is not decoded; at most ``max_skip`` frames in a row are
skipped, so a missed change costs at most that many frames.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from drivers.frames import GrayImage

_STEP = 8  # sample every 8th pixel each way: 1/64 of the frame
_GRID = (6, 8)  # blocks: a code held up fills at least one block of a 6x8 grid


class ChangeGate:
    """Decides whether a frame needs decoding.

    Compares a sparse sample of the frame with the sample of the last decoded empty frame,
    block by block (mean absolute difference, gray levels); a block that changed more than 1.5x
    the noise floor plus ``margin`` means something moved. The noise floor follows the 25th
    percentile block (sensor noise touches every block, a code only some) through a slow
    average, so a noisier camera or low light does not keep the decoder busy, and a code that
    fills most of the frame still counts as a change on the frame it appears in.
    """

    def __init__(self, *, max_skip: int = 10, margin: float = 3.0) -> None:
        self.max_skip = max_skip
        self.margin = margin
        self.floor = 0.0
        self.skipped_total = 0
        self._ref: npt.NDArray[np.uint8] | None = None
        self._skipped_run = 0

    def _sample(self, image: GrayImage) -> npt.NDArray[np.uint8]:
        return np.ascontiguousarray(image[::_STEP, ::_STEP])

    def _blocks(self, sample: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
        assert self._ref is not None
        diff = np.abs(sample.astype(np.int16) - self._ref).astype(np.float32)
        h, w = diff.shape
        rows, cols = min(_GRID[0], h), min(_GRID[1], w)
        # block means in two reductions; numpy alone, so the daemon never loads OpenCV
        # (16 MB of resident memory on a reader for one resize)
        r_edges = (np.arange(rows) * h) // rows
        c_edges = (np.arange(cols) * w) // cols
        sums = np.add.reduceat(np.add.reduceat(diff, r_edges, axis=0), c_edges, axis=1)
        counts = np.outer(np.diff(np.append(r_edges, h)), np.diff(np.append(c_edges, w)))
        means: npt.NDArray[np.float32] = (sums / counts).astype(np.float32)
        return means

    def should_decode(self, image: GrayImage) -> bool:
        """True when ``image`` (gray HxW uint8) may hold something new."""
        if self.max_skip <= 0 or image.size == 0:
            return True
        sample = self._sample(image)
        if self._ref is None or self._ref.shape != sample.shape:
            return True
        blocks = self._blocks(sample)
        flat = np.sort(blocks, axis=None)
        noise = float(flat[len(flat) // 4])
        self.floor = noise if self.floor == 0.0 else 0.95 * self.floor + 0.05 * noise
        if float(flat[-1]) > self.floor * 1.5 + self.margin:
            return True
        if self._skipped_run >= self.max_skip:
            return True
        self._skipped_run += 1
        self.skipped_total += 1
        return False

    def decoded(self, image: GrayImage, found_codes: bool) -> None:
        """Report a decode result: only an empty frame becomes the reference, so a code in
        view is decoded on every frame (the repeat window needs to see it)."""
        self._skipped_run = 0
        self._ref = None if found_codes or image.size == 0 else self._sample(image)
