"""The frame-source seam: every camera yields :class:`Frame` objects via :class:`FrameSource`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self, runtime_checkable

import numpy as np
import numpy.typing as npt

GrayImage = npt.NDArray[np.uint8]
"""A gray frame: HxW ``uint8`` numpy array, C-contiguous."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One captured frame.

    ``image``: gray frame, HxW uint8. ``t_ns``: monotonic capture time in nanoseconds
    (``time.monotonic_ns()`` clock). ``seq``: per-source sequence number, from 0, without gaps
    for frames delivered. ``origin``: where it came from (a file name for replay; "" otherwise),
    for logs only.
    """

    image: GrayImage
    t_ns: int
    seq: int
    origin: str = ""


class FrameSource(ABC):
    """A camera. ``open()`` then ``read()`` repeatedly, then ``close()`` (idempotent).

    Also a context manager. Implementations are used from one thread (the capture thread).
    """

    name: str = "frames"

    @abstractmethod
    def open(self) -> None:
        """Acquire the device. Raises :class:`drivers.exceptions.CameraUnavailableError`."""

    @abstractmethod
    def read(self, timeout_s: float = 5.0) -> Frame | None:
        """Block until the next frame (paced at the source's frame rate) and return it.

        Returns ``None`` when a finite source (a replay reel played once) is exhausted.
        Raises :class:`drivers.exceptions.CameraTimeoutError` when no frame came within
        ``timeout_s`` seconds, :class:`drivers.exceptions.FrameSourceError` on device failure.
        """

    @abstractmethod
    def close(self) -> None:
        """Release the device. Safe to call twice."""

    def __enter__(self) -> Self:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@runtime_checkable
class Focusable(Protocol):
    """A camera whose focus can be re-run on demand (a lens with autofocus)."""

    def focus_cycle(self) -> None:
        """Start one autofocus cycle and return at once. Never raises because the camera has no
        autofocus or is closed: that is a no-op."""


@runtime_checkable
class Snapshotting(Protocol):
    """A camera that can hand over a full-size colour frame besides its gray frames."""

    def snapshot(self) -> npt.NDArray[np.uint8]:
        """The next full-size frame of the main stream: HxWx3 uint8, RGB order."""
