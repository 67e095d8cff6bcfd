"""Choosing a decoder backend by name, and the input/output rules every backend shares.

``make_decoder("zxing-cpp" | "zbar" | "cascade")`` builds a ready :class:`Decoder`. The backend
modules are imported only when asked for, so a reader without libzbar (or without the zxing-cpp
wheel, e.g. 32-bit Raspberry Pi OS) can still use the other one.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import numpy as np

from drivers.frames import GrayImage
from firmware.decoding.codes import DecodedCode, Decoder, Point
from firmware.exceptions import DecoderError

BACKENDS: Final[tuple[str, ...]] = ("zxing-cpp", "zbar", "cascade")
"""Every backend name :func:`make_decoder` accepts, the preferred one first."""


def make_decoder(name: str) -> Decoder:
    """Build the decoder backend called ``name`` (one of :data:`BACKENDS`).

    ``"cascade"`` is zxing-cpp with zbar as a second opinion on frames where zxing-cpp finds
    nothing. Raises :class:`DecoderUnavailableError` when the backend's library is missing here
    (the message says what to install) and :class:`DecoderError` for an unknown name (the message
    lists the choices).
    """
    if name == "zxing-cpp":
        from firmware.decoding.zxing import ZxingDecoder

        return ZxingDecoder()
    if name == "zbar":
        from firmware.decoding.zbar import ZbarDecoder

        return ZbarDecoder()
    if name == "cascade":
        from firmware.decoding.cascade import CascadeDecoder
        from firmware.decoding.zbar import ZbarDecoder
        from firmware.decoding.zxing import ZxingDecoder

        # zxing-cpp already reads light-on-dark and mirrored codes, so zbar's extra views would
        # only double its cost on the empty frames that dominate a door camera's day.
        return CascadeDecoder(ZxingDecoder(), ZbarDecoder(try_variants=False))
    raise DecoderError(f"unknown decoder backend {name!r}: choose one of {', '.join(BACKENDS)}")


def check_image(image: object) -> GrayImage:
    """Return ``image`` as a C-contiguous HxW ``uint8`` array (copied only if not contiguous).

    Raises :class:`DecoderError` when ``image`` is not a 2-D ``uint8`` numpy array. A 0-size
    array passes; callers answer it with ``[]``.
    """
    if not isinstance(image, np.ndarray):
        raise DecoderError(f"expected a 2-D uint8 numpy array, got {type(image).__name__}")
    if image.ndim != 2 or image.dtype != np.uint8:
        raise DecoderError(
            f"expected a 2-D uint8 gray image, got shape {image.shape} dtype {image.dtype}"
        )
    gray: GrayImage = np.ascontiguousarray(image)
    return gray


def in_reading_order(codes: Iterable[DecodedCode]) -> list[DecodedCode]:
    """Sort codes by their centre, top to bottom then left to right, then by payload.

    Gives every backend the same stable order for the same image; the policy must still not
    depend on it.
    """

    def key(code: DecodedCode) -> tuple[float, float, bytes]:
        cx, cy = _centre(code.corners)
        return (round(cy), round(cx), code.payload)

    return sorted(codes, key=key)


def _centre(corners: tuple[Point, Point, Point, Point]) -> Point:
    return (sum(p[0] for p in corners) / 4.0, sum(p[1] for p in corners) / 4.0)
