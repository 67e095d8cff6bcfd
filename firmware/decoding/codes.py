"""What a decoder returns: raw payload bytes and where the code is, never a guessed text."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from drivers.frames import GrayImage

Point = tuple[float, float]


@dataclass(frozen=True, slots=True)
class DecodedCode:
    """One QR code found in a frame.

    ``payload``: the exact payload bytes as encoded in the symbol (byte mode bytes, ECI not
    applied). ``corners``: four (x, y) pixel points, top-left, top-right, bottom-right,
    bottom-left in the symbol's own orientation. ``backend``: the decoder that read it.
    ``exact``: False when the backend could not return the raw bytes (the policy then denies
    with ``unsupported_encoding`` rather than verify mangled bytes). ``inverted``/``mirrored``:
    how it was found. ``ms``: decode time of the call that found it, milliseconds.
    """

    payload: bytes
    corners: tuple[Point, Point, Point, Point]
    backend: str
    exact: bool = True
    inverted: bool = False
    mirrored: bool = False
    ms: float = field(default=0.0, compare=False)

    def text(self) -> str | None:
        """The payload as strict UTF-8 text, or None when it is not valid UTF-8."""
        try:
            return self.payload.decode("utf-8", errors="strict")
        except UnicodeDecodeError:
            return None


class Decoder(Protocol):
    """A QR decoding backend. ``decode`` is thread-compatible (one caller at a time)."""

    name: str

    def decode(self, image: GrayImage) -> list[DecodedCode]:
        """Find every QR code in a gray HxW uint8 image.

        Returns codes in a stable order (by position). Raises ``DecoderError`` only for an
        unusable image (wrong dtype or shape); an unreadable image returns ``[]``.
        """
        ...
