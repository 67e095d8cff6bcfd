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
    block by block (mean absolute difference, gray levels); a block that changed more than the
    measured noise floor plus ``margin`` means something moved. The noise floor adapts (EMA over
    unchanged frames), so a noisier camera or low light does not keep the decoder busy.
    """

    def __init__(self, *, max_skip: int = 10, margin: float = 3.0) -> None:
        self.max_skip = max_skip
        self.margin = margin
        self.floor = 0.0
        self.skipped_total = 0
        self._ref: npt.NDArray[np.int16] | None = None
        self._skipped_run = 0

    def _sample(self, image: GrayImage) -> npt.NDArray[np.int16]:
        return image[::_STEP, ::_STEP].astype(np.int16)

    def _block_change(self, sample: npt.NDArray[np.int16]) -> float:
        assert self._ref is not None
        diff = np.abs(sample - self._ref)
        h, w = diff.shape
        gh, gw = min(_GRID[0], h), min(_GRID[1], w)
        bh, bw = h // gh, w // gw
        blocks = diff[: bh * gh, : bw * gw].reshape(gh, bh, gw, bw).mean(axis=(1, 3))
        return float(blocks.max())

    def should_decode(self, image: GrayImage) -> bool:
        """True when ``image`` (gray HxW uint8) may hold something new."""
        if self.max_skip <= 0 or image.size == 0:
            return True
        sample = self._sample(image)
        if self._ref is None or self._ref.shape != sample.shape:
            return True
        change = self._block_change(sample)
        if change > self.floor * 1.5 + self.margin or self._skipped_run >= self.max_skip:
            return True
        self.floor = change if self.floor == 0.0 else 0.9 * self.floor + 0.1 * change
        self._skipped_run += 1
        self.skipped_total += 1
        return False

    def decoded(self, image: GrayImage, found_codes: bool) -> None:
        """Report a decode result: only an empty frame becomes the reference, so a code in
        view is decoded on every frame (the repeat window needs to see it)."""
        self._skipped_run = 0
        self._ref = None if found_codes or image.size == 0 else self._sample(image)
