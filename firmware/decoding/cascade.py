"""The cascade backend: a fast first decoder, and a second one only for frames it reads nothing in.

Built by :func:`firmware.decoding.registry.make_decoder` as zxing-cpp then zbar: on the real-photo
corpus some images are read only by zbar, so the pair reads more than either alone, while frames
with a code cost what zxing-cpp costs. Frames without any code pay for both.
"""

from __future__ import annotations

import dataclasses
import time

from drivers.frames import GrayImage
from firmware.decoding.codes import DecodedCode, Decoder
from firmware.decoding.registry import check_image


class CascadeDecoder:
    """Decode with ``first``; only when it finds nothing, with ``second``.

    Each returned code keeps the ``backend`` name of the decoder that read it; its ``ms`` is the
    time of the whole cascade call. Thread-compatibility is that of the two decoders.
    """

    name = "cascade"

    def __init__(self, first: Decoder, second: Decoder) -> None:
        self.first = first
        self.second = second

    def decode(self, image: GrayImage) -> list[DecodedCode]:
        """Every QR code ``first`` finds in ``image`` (HxW uint8), else every one ``second`` finds.

        Raises :class:`DecoderError` for an array that is not 2-D uint8; an empty image or one
        neither decoder can read gives ``[]``.
        """
        gray = check_image(image)
        if gray.size == 0:
            return []
        start = time.perf_counter()
        codes = self.first.decode(gray)
        if not codes:
            codes = self.second.decode(gray)
        ms = (time.perf_counter() - start) * 1000.0
        return [dataclasses.replace(code, ms=ms) for code in codes]
