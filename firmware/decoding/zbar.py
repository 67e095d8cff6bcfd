"""The zbar backend: libzbar (apt ``libzbar0``) through pyzbar's ctypes bindings.

pyzbar's own ``decode()`` cannot be used: it leaves zbar guessing a charset (Shift-JIS, Big5)
for codes without ECI and so re-encodes binary payloads, and it cannot read light-on-dark codes.
This module drives the scanner itself: QR only, ``ZBAR_CFG_BINARY`` for the raw payload bytes
(length taken from zbar, so NUL bytes survive), and an inverted pass for dark-mode codes.

What this libzbar can really do is checked once, at construction, by decoding two small
generated codes (a binary payload, a mirrored code); see :class:`ZbarCapabilities`.
"""

from __future__ import annotations

import ctypes
import time
import weakref
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

import numpy as np
import segno

from drivers.frames import GrayImage
from firmware.decoding.codes import DecodedCode, Point
from firmware.decoding.registry import check_image, in_reading_order
from firmware.exceptions import DecoderError, DecoderUnavailableError

# Values from zbar.h (0.23).
ZBAR_NONE: Final = 0
ZBAR_QRCODE: Final = 64
ZBAR_CFG_ENABLE: Final = 0
ZBAR_CFG_BINARY: Final = 4
_Y800: Final = int.from_bytes(b"Y800", "little")  # fourcc of 8-bit gray

_INSTALL_HINT: Final = "install it with `sudo apt install libzbar0` (and `pip install pyzbar`)"

RawSymbol = tuple[bytes, tuple[tuple[int, int], ...]]
"""One symbol as libzbar gives it: payload bytes and its location points (x, y) in pixels."""


class ZbarLibrary:
    """The few libzbar calls this backend makes, bound through pyzbar's ctypes wrapper.

    Raises :class:`DecoderUnavailableError` (with an install hint) when pyzbar or libzbar
    cannot be loaded. Tests may subclass it to imitate an older libzbar.
    """

    def __init__(self) -> None:
        try:
            from pyzbar import wrapper
        except (ImportError, OSError) as exc:
            raise DecoderUnavailableError(
                f"libzbar cannot be loaded ({exc}): {_INSTALL_HINT}"
            ) from exc
        self._w: Any = wrapper

    def version(self) -> tuple[int, int]:
        """libzbar's (major, minor) version, e.g. (0, 23); zbar reports no patch level."""
        major, minor = ctypes.c_uint(), ctypes.c_uint()
        self._w.zbar_version(ctypes.byref(major), ctypes.byref(minor))
        return (major.value, minor.value)

    def create_scanner(self) -> Any:
        """A new ``zbar_image_scanner_t*``; free it with :meth:`destroy_scanner`."""
        scanner = self._w.zbar_image_scanner_create()
        if not scanner:
            raise DecoderUnavailableError("zbar_image_scanner_create failed (out of memory?)")
        return scanner

    def destroy_scanner(self, scanner: Any) -> None:
        """Free a scanner made by :meth:`create_scanner`."""
        self._w.zbar_image_scanner_destroy(scanner)

    def set_config(self, scanner: Any, symbology: int, config: int, value: int) -> int:
        """``zbar_image_scanner_set_config``: 0 when libzbar accepted the setting, else non-zero."""
        return int(self._w.zbar_image_scanner_set_config(scanner, symbology, config, value))

    def scan(self, scanner: Any, image: GrayImage) -> list[RawSymbol]:
        """Scan a C-contiguous HxW uint8 image; QR symbols in libzbar's order.

        Location points are libzbar's: for QR the symbol's top-left, bottom-left, bottom-right,
        top-right corners. Raises :class:`DecoderError` if libzbar reports a scan failure.
        """
        w = self._w
        height, width = image.shape
        zimage = w.zbar_image_create()
        if not zimage:
            raise DecoderError("zbar_image_create failed (out of memory?)")
        try:
            w.zbar_image_set_format(zimage, _Y800)
            w.zbar_image_set_size(zimage, width, height)
            # zbar keeps only the pointer: ``image`` stays referenced until the image is freed.
            w.zbar_image_set_data(zimage, image.ctypes.data, image.size, None)
            if w.zbar_scan_image(scanner, zimage) < 0:
                raise DecoderError("libzbar failed to scan the image")
            symbols: list[RawSymbol] = []
            symbol = w.zbar_image_first_symbol(zimage)
            while symbol:
                if symbol.contents.type == ZBAR_QRCODE:
                    # Payloads may contain NUL bytes: read exactly zbar's length.
                    length = w.zbar_symbol_get_data_length(symbol)
                    data = ctypes.string_at(w.zbar_symbol_get_data(symbol), length)
                    points = tuple(
                        (
                            int(w.zbar_symbol_get_loc_x(symbol, i)),
                            int(w.zbar_symbol_get_loc_y(symbol, i)),
                        )
                        for i in range(w.zbar_symbol_get_loc_size(symbol))
                    )
                    symbols.append((data, points))
                symbol = w.zbar_symbol_next(symbol)
            return symbols
        finally:
            # Hands the image's symbols back to the scanner, which keeps them (mchehab/zbar#258).
            w.zbar_image_destroy(zimage)


@dataclass(frozen=True, slots=True)
class ZbarCapabilities:
    """What this libzbar proved it can do, on generated codes, when the decoder was built.

    ``binary``: returns raw payload bytes (``ZBAR_CFG_BINARY`` accepted and effective); when
    False every code is marked ``exact=False``, so the policy denies it as unsupported encoding
    instead of verifying bytes zbar re-encoded. ``mirrored``: reads mirrored codes itself
    (libzbar 0.23.9x does); when False the decoder retries a flipped frame after a miss.
    """

    binary: bool
    mirrored: bool


_PROBE_PAYLOAD: Final = b"\xb2\x00qrgate\xff\x07"

RENEW_AFTER_SYMBOLS: Final = 500
"""Codes a libzbar scanner decodes before it is replaced (bounds mchehab/zbar#258 to ~100 kB)."""


class _ScannerSlot:
    """The decoder's current libzbar scanner, shared with its finalizer."""

    __slots__ = ("scanner", "symbols")

    def __init__(self) -> None:
        self.scanner: Any = None
        self.symbols = 0


def _free_scanner(lib: ZbarLibrary, slot: _ScannerSlot) -> None:
    if slot.scanner is not None:
        scanner, slot.scanner = slot.scanner, None
        lib.destroy_scanner(scanner)


class ZbarDecoder:
    """QR reader on libzbar. One scanner per instance, reused from frame to frame (and renewed
    after every :data:`RENEW_AFTER_SYMBOLS` decoded codes, to bound a libzbar leak).

    ``library``: the libzbar binding (default: loaded here). ``try_variants`` (default on):
    also read light-on-dark (dark mode) and mirrored codes:

    - every frame is scanned a second time inverted. libzbar's own ``ZBAR_CFG_TEST_INVERTED``
      is not used: it inverts only when the normal pass found nothing, so it misses a
      light-on-dark code next to a normal one (``cases/B05.png``), and it does not say which
      codes were inverted. An empty frame costs the same two scans either way.
    - where libzbar cannot read mirrored codes, a frame where both passes found nothing is
      scanned once more, flipped, alternating between the plain and the inverted frame from
      call to call: a mirrored code, inverted or not, is read within two consecutive calls.

    With ``try_variants=False`` each frame is scanned once (a cascade behind zxing-cpp, which
    reads those codes itself). Not thread-safe: one caller at a time (libzbar runs without the
    GIL, so separate instances may run in parallel). :meth:`close` (or ``with``) frees the
    scanner; garbage collection frees it otherwise. Raises :class:`DecoderUnavailableError`
    when libzbar cannot be loaded or fails its start-up self-test.
    """

    name = "zbar"

    def __init__(self, library: ZbarLibrary | None = None, *, try_variants: bool = True) -> None:
        self._lib = library if library is not None else ZbarLibrary()
        self._slot = _ScannerSlot()
        self._free = weakref.finalize(self, _free_scanner, self._lib, self._slot)
        binary_set = self._renew_scanner()
        self.capabilities = self._self_test(binary_set=binary_set)
        self._try_variants = try_variants
        self._flip_inverted_next = False

    def decode(self, image: GrayImage) -> list[DecodedCode]:
        """Every QR code in ``image`` (HxW uint8), in reading order.

        Corners are pixel coordinates in ``image``, also for a code found in the flipped frame.
        ``inverted``: found in the inverted frame. ``mirrored``: from the corners' winding.
        ``exact`` is ``capabilities.binary``. Raises :class:`DecoderError` for an array that is
        not 2-D uint8 or after :meth:`close`; an empty image or one without a readable code
        gives ``[]``.
        """
        gray = check_image(image)
        scanner = self._slot.scanner
        if scanner is None:
            raise DecoderError("this zbar decoder is closed: make a new one")
        if gray.size == 0:
            return []
        start = time.perf_counter()
        found = [(symbol, False, False) for symbol in self._lib.scan(scanner, gray)]
        if self._try_variants:
            negative: GrayImage = np.invert(gray)
            found += [(symbol, True, False) for symbol in self._lib.scan(scanner, negative)]
            if not found and not self.capabilities.mirrored:
                inverted = self._flip_inverted_next
                self._flip_inverted_next = not inverted
                mirror = np.ascontiguousarray((negative if inverted else gray)[:, ::-1])
                found += [(s, inverted, True) for s in self._lib.scan(scanner, mirror)]
        self._slot.symbols += len(found)
        if self._slot.symbols >= RENEW_AFTER_SYMBOLS:
            self._renew_scanner()
        ms = (time.perf_counter() - start) * 1000.0
        width = gray.shape[1]
        codes: list[DecodedCode] = []
        for (payload, at), inverted, flipped in found:
            # A code found in the flipped frame is reported where it is in ``image``.
            points = tuple((width - 1 - x, y) for x, y in at) if flipped else at
            corners = _corners(points)
            code = DecodedCode(
                payload=payload,
                corners=corners,
                backend=self.name,
                exact=self.capabilities.binary,
                inverted=inverted,
                mirrored=_winding(corners) < 0,
                ms=ms,
            )
            if not any(_same_code(code, seen) for seen in codes):
                codes.append(code)
        return in_reading_order(codes)

    def close(self) -> None:
        """Free the libzbar scanner. Safe to call twice; :meth:`decode` raises afterwards."""
        self._free()

    def __enter__(self) -> ZbarDecoder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _renew_scanner(self) -> bool:
        """Replace the scanner with a new, configured one; True if libzbar accepted binary mode.

        libzbar parks every decoded QR symbol in a recycle list it never takes from again
        (mchehab/zbar#258: ~200 bytes per code here, freed only with the scanner), so a
        scanner is renewed after RENEW_AFTER_SYMBOLS codes; a new one costs ~6 microseconds.
        """
        lib = self._lib
        scanner = lib.create_scanner()
        if (
            lib.set_config(scanner, ZBAR_NONE, ZBAR_CFG_ENABLE, 0) != 0
            or lib.set_config(scanner, ZBAR_QRCODE, ZBAR_CFG_ENABLE, 1) != 0
        ):
            lib.destroy_scanner(scanner)
            self.close()
            raise DecoderUnavailableError(
                f"this libzbar cannot enable QR decoding: {_INSTALL_HINT}"
            )
        binary_set = lib.set_config(scanner, ZBAR_QRCODE, ZBAR_CFG_BINARY, 1) == 0
        old, self._slot.scanner, self._slot.symbols = self._slot.scanner, scanner, 0
        if old is not None:
            lib.destroy_scanner(old)
        return binary_set

    def _self_test(self, *, binary_set: bool) -> ZbarCapabilities:
        # A libzbar may accept a setting it does not honour: trust only what it does.
        probe = _probe_image(_PROBE_PAYLOAD)
        scanner = self._slot.scanner
        plain = self._lib.scan(scanner, probe)
        if not plain:
            self.close()
            raise DecoderUnavailableError(
                f"libzbar {self._lib.version()} failed to read a generated QR code: {_INSTALL_HINT}"
            )
        binary = binary_set and plain[0][0] == _PROBE_PAYLOAD
        mirrored = bool(self._lib.scan(scanner, np.ascontiguousarray(probe[:, ::-1])))
        return ZbarCapabilities(binary=binary, mirrored=mirrored)


def _probe_image(payload: bytes) -> GrayImage:
    """A crisp dark-on-light QR code of ``payload``: 4 px modules, 4-module quiet zone."""
    qr = segno.make_qr(payload, error="m", boost_error=False)
    dark = np.array([list(row) for row in qr.matrix], dtype=bool)
    dark = np.pad(dark, 4, constant_values=False)
    image: GrayImage = np.where(dark, 0, 255).astype(np.uint8).repeat(4, axis=0).repeat(4, axis=1)
    return image


def _corners(points: tuple[tuple[int, int], ...]) -> tuple[Point, Point, Point, Point]:
    """Top-left, top-right, bottom-right, bottom-left from libzbar's location points."""
    if len(points) == 4:
        # libzbar lists a QR symbol's corners as TL, BL, BR, TR.
        tl, bl, br, tr = ((float(x), float(y)) for x, y in points)
        return (tl, tr, br, bl)
    xs = [float(x) for x, _ in points] or [0.0]
    ys = [float(y) for _, y in points] or [0.0]
    return ((min(xs), min(ys)), (max(xs), min(ys)), (max(xs), max(ys)), (min(xs), max(ys)))


def _winding(corners: tuple[Point, Point, Point, Point]) -> float:
    """Twice the signed area of TL-TR-BR-BL with y pointing down: negative when mirrored."""
    return sum(
        x0 * y1 - x1 * y0
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1], strict=True)
    )


def _same_code(a: DecodedCode, b: DecodedCode) -> bool:
    """The same payload at the same place (found by two passes over one frame)."""
    if a.payload != b.payload:
        return False
    (ax, ay), (bx, by) = _centre(a.corners), _centre(b.corners)
    side = max(abs(a.corners[0][0] - a.corners[2][0]), abs(a.corners[0][1] - a.corners[2][1]))
    return abs(ax - bx) <= side / 2 and abs(ay - by) <= side / 2


def _centre(corners: tuple[Point, Point, Point, Point]) -> Point:
    return (sum(x for x, _ in corners) / 4.0, sum(y for _, y in corners) / 4.0)
