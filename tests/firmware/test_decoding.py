"""Decoder backends on the field cases (C01-C04, B06/B07) and on generated edge-case codes."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import segno

from drivers.frames import GrayImage
from firmware.decoding import zbar as zbar_module
from firmware.decoding.cascade import CascadeDecoder
from firmware.decoding.codes import DecodedCode, Decoder
from firmware.decoding.corpus import load_gray
from firmware.decoding.registry import BACKENDS, make_decoder
from firmware.decoding.zbar import ZBAR_CFG_BINARY, RawSymbol, ZbarDecoder, ZbarLibrary
from firmware.decoding.zxing import ZxingDecoder
from firmware.exceptions import DecoderError, DecoderUnavailableError
from tests.shared import case_file, need_shared

TEXT = "Tür 3 Zürich Straße"
B02_BYTES = bytes.fromhex("b255f6251cf7a0513d07")
DOOR1 = b"DOOR1:7f3a9c21e4b8"


def case(name: str) -> GrayImage:
    return load_gray(case_file(name))


def render(tmp_path: Path, content: str | bytes, **make: Any) -> GrayImage:
    """A segno QR code of ``content`` saved as PNG in tmp_path and loaded back, 4 px modules."""
    path = tmp_path / "code.png"
    segno.make_qr(content, **make).save(str(path), scale=4, border=4)
    return load_gray(path)


def payloads(codes: list[DecodedCode]) -> list[bytes]:
    return [c.payload for c in codes]


@pytest.fixture(params=BACKENDS)
def decoder(request: pytest.FixtureRequest) -> Decoder:
    return make_decoder(request.param)


# --- C01: charset --------------------------------------------------------------------------


@pytest.mark.parametrize(("image", "text"), [("B01.png", TEXT), ("B01-short.png", "â")])
def test_c01_utf8_without_eci_gives_the_raw_utf8_bytes(
    decoder: Decoder, image: str, text: str
) -> None:
    codes = decoder.decode(case(image))
    assert payloads(codes) == [text.encode("utf-8")]
    assert codes[0].exact
    assert codes[0].text() == text


def test_c01_eci_variant_gives_the_same_bytes(decoder: Decoder) -> None:
    plain = decoder.decode(case("B01.png"))
    with_eci = decoder.decode(case("B01-eci.png"))
    assert payloads(with_eci) == payloads(plain) == [TEXT.encode("utf-8")]


def test_c01_other_eci_charsets_are_not_transcoded(decoder: Decoder, tmp_path: Path) -> None:
    latin1 = render(tmp_path, "Grüße", encoding="iso-8859-1", eci=True)
    assert payloads(decoder.decode(latin1)) == [b"Gr\xfc\xdfe"]


def test_kanji_mode_gives_shift_jis_bytes(decoder: Decoder, tmp_path: Path) -> None:
    codes = decoder.decode(render(tmp_path, "日本語テキスト"))
    assert payloads(codes) == ["日本語テキスト".encode("cp932")]


# --- C02: binary -------------------------------------------------------------------------


def test_c02_binary_payload_is_exact(decoder: Decoder) -> None:
    codes = decoder.decode(case("B02.png"))
    assert payloads(codes) == [B02_BYTES]
    assert codes[0].exact
    assert codes[0].text() is None


@pytest.mark.parametrize(
    "payload",
    [
        b"\x00qr\x00gate\x00\xff\x00",
        b"\x00",
        b"no nul but high \xb2\xf6\xa0",
    ],
)
def test_c02_nul_bytes_round_trip(decoder: Decoder, tmp_path: Path, payload: bytes) -> None:
    codes = decoder.decode(render(tmp_path, payload))
    assert payloads(codes) == [payload]
    assert len(codes[0].payload) == len(payload)


def test_control_characters_round_trip(decoder: Decoder, tmp_path: Path) -> None:
    payload = bytes(range(32)) + b"\x7f\r\n"
    assert payloads(decoder.decode(render(tmp_path, payload))) == [payload]


def test_largest_binary_qr_round_trips(decoder: Decoder, tmp_path: Path) -> None:
    payload = random.Random(2953).randbytes(2953)  # version 40-L byte-mode capacity
    image = render(tmp_path, payload, error="l", boost_error=False)
    assert payloads(decoder.decode(image)) == [payload]


# --- C03: inverted and mirrored ------------------------------------------------------------


def read_within(decoder: Decoder, image: GrayImage, calls: int) -> list[DecodedCode]:
    """The codes of the first of ``calls`` consecutive decode calls that found any."""
    for _ in range(calls):
        codes = decoder.decode(image)
        if codes:
            return codes
    return []


@pytest.mark.parametrize("image", ["B04.png", "B04-mirror.png"])
def test_c03_inverted_and_mirrored_read_within_two_calls(decoder: Decoder, image: str) -> None:
    decoder.decode(case("B07.png"))  # a miss first: any retry state must still do
    assert payloads(read_within(decoder, case(image), 2)) == [DOOR1]


def test_c03_zbar_reports_how_it_found_the_code() -> None:
    zbar = ZbarDecoder()
    inverted = zbar.decode(case("B04.png"))
    mirrored = zbar.decode(case("B04-mirror.png"))
    assert [(c.inverted, c.mirrored) for c in inverted] == [(True, False)]
    assert [(c.inverted, c.mirrored) for c in mirrored] == [(False, True)]
    assert [(c.inverted, c.mirrored) for c in zbar.decode(case("B06.png"))] == [(False, False)]


class OldZbar(ZbarLibrary):
    """libzbar as an older build behaves: settings refused or ignored, no mirrored reading."""

    def __init__(self, *, binary: str = "works", mirrored: bool = True) -> None:
        super().__init__()
        self.binary = binary  # "works" | "refused" | "ignored"
        self.mirrored = mirrored
        self.scans = 0

    def set_config(self, scanner: Any, symbology: int, config: int, value: int) -> int:
        if config == ZBAR_CFG_BINARY and self.binary == "refused":
            return 1
        if config == ZBAR_CFG_BINARY and self.binary == "ignored":
            return 0
        return super().set_config(scanner, symbology, config, value)

    def scan(self, scanner: Any, image: GrayImage) -> list[RawSymbol]:
        self.scans += 1
        symbols = super().scan(scanner, image)
        if self.mirrored:
            return symbols
        return [s for s in symbols if not _zbar_points_mirrored(s[1])]


def _zbar_points_mirrored(points: tuple[tuple[int, int], ...]) -> bool:
    (x0, y0), (x1, y1), _, (x3, y3) = points  # libzbar's order: TL, BL, BR, TR
    # TL->TR crossed with TL->BL is positive for an upright symbol (y pointing down).
    return (x3 - x0) * (y1 - y0) - (y3 - y0) * (x1 - x0) < 0


@pytest.mark.parametrize("misses_before", [0, 1, 2])
def test_c03_zbar_without_mirror_support_retries_flipped(
    tmp_path: Path, misses_before: int
) -> None:
    lib = OldZbar(mirrored=False)
    zbar = ZbarDecoder(lib)
    assert not zbar.capabilities.mirrored
    normal = case("B06.png")
    mirrored_dark = render(tmp_path, DOOR1)[:, ::-1]
    mirrored_light = np.invert(mirrored_dark)
    for image in (case("B04.png"), case("B04-mirror.png"), mirrored_dark, mirrored_light):
        for _ in range(misses_before):
            assert zbar.decode(case("B07.png")) == []
        assert payloads(read_within(zbar, image, 2)) == [DOOR1]
    # A frame with a code costs the plain and the inverted scan, no flipped one.
    lib.scans = 0
    zbar.decode(normal)
    assert lib.scans == 2


def test_c03_flipped_retry_reports_corners_in_the_original_frame() -> None:
    native = ZbarDecoder().decode(case("B04-mirror.png"))
    retried = read_within(ZbarDecoder(OldZbar(mirrored=False)), case("B04-mirror.png"), 2)
    assert len(native) == len(retried) == 1
    assert retried[0].mirrored and native[0].mirrored
    for (x0, y0), (x1, y1) in zip(native[0].corners, retried[0].corners, strict=True):
        assert abs(x0 - x1) <= 2 and abs(y0 - y1) <= 2
    # Symbol top-left finder is at the image's top right in a mirrored code.
    assert native[0].corners[0] == (230.0, 33.0)


# --- zbar configuration fallbacks ---------------------------------------------------------


def test_zbar_here_gives_raw_bytes_and_reads_mirrored_codes() -> None:
    zbar = ZbarDecoder()
    assert zbar.capabilities.binary
    assert zbar.capabilities.mirrored


@pytest.mark.parametrize("binary", ["refused", "ignored"])
def test_zbar_without_binary_mode_marks_codes_inexact(binary: str) -> None:
    zbar = ZbarDecoder(OldZbar(binary=binary))
    assert not zbar.capabilities.binary
    codes = zbar.decode(case("B02.png"))
    assert len(codes) == 1
    assert not codes[0].exact
    assert codes[0].payload != B02_BYTES  # what zbar's charset guess makes of it
    assert [c.exact for c in zbar.decode(case("B01.png"))] == [False]


def test_zbar_unavailable_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import pyzbar

    monkeypatch.delattr(pyzbar, "wrapper", raising=False)
    monkeypatch.setitem(sys.modules, "pyzbar.wrapper", None)
    with pytest.raises(DecoderUnavailableError, match="apt install libzbar0"):
        make_decoder("zbar")
    with pytest.raises(DecoderUnavailableError):
        make_decoder("cascade")


def test_zxing_unavailable_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "zxingcpp", None)
    with pytest.raises(DecoderUnavailableError, match="pip install zxing-cpp"):
        ZxingDecoder()


class CountingLibrary(ZbarLibrary):
    def __init__(self) -> None:
        super().__init__()
        self.created = self.destroyed = 0

    def create_scanner(self) -> Any:
        self.created += 1
        return super().create_scanner()

    def destroy_scanner(self, scanner: Any) -> None:
        self.destroyed += 1
        super().destroy_scanner(scanner)


def test_zbar_keeps_one_scanner_and_frees_it_once() -> None:
    lib = CountingLibrary()
    with ZbarDecoder(lib) as zbar:
        for i in range(20):
            zbar.decode(case("B06.png" if i % 2 else "B07.png"))
        assert (lib.created, lib.destroyed) == (1, 0)
    zbar.close()
    assert (lib.created, lib.destroyed) == (1, 1)
    with pytest.raises(DecoderError, match="closed"):
        zbar.decode(case("B06.png"))


def test_zbar_renews_its_scanner_after_many_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    # libzbar keeps every decoded QR symbol until its scanner is destroyed (mchehab/zbar#258).
    monkeypatch.setattr(zbar_module, "RENEW_AFTER_SYMBOLS", 3)
    lib = CountingLibrary()
    zbar = ZbarDecoder(lib)
    for _ in range(2):
        assert payloads(zbar.decode(case("B02.png"))) == [B02_BYTES]
    assert (lib.created, lib.destroyed) == (1, 0)
    codes = zbar.decode(case("B02.png"))  # the third code: renewed after this frame
    assert (lib.created, lib.destroyed) == (2, 1)
    assert payloads(codes) == [B02_BYTES]
    # The new scanner has the same settings: raw bytes, QR only.
    codes = zbar.decode(case("B02.png"))
    assert payloads(codes) == [B02_BYTES] and codes[0].exact
    zbar.close()
    assert (lib.created, lib.destroyed) == (2, 2)


def test_zbar_scanner_is_freed_when_the_decoder_is_dropped() -> None:
    lib = CountingLibrary()
    zbar = ZbarDecoder(lib)
    zbar.decode(case("B06.png"))
    del zbar
    assert (lib.created, lib.destroyed) == (1, 1)


# --- C04: several codes; B06/B07 -----------------------------------------------------------


def test_c04_b05_codes_each_backend_finds(decoder: Decoder) -> None:
    codes = decoder.decode(case("B05.png"))
    # Measured here: every backend finds all three, A normal, B light-on-dark, C small; zbar
    # finds B only because it scans the inverted frame even when normal codes were found.
    assert sorted(payloads(codes)) == [b"DOOR1:" + c * 12 for c in (b"a", b"b", b"c")]
    assert decoder.decode(case("B05.png")) == codes  # same order every time
    if decoder.name == "zbar":
        assert {c.payload[-1:]: c.inverted for c in codes} == {b"a": False, b"b": True, b"c": False}


def test_b06_has_one_code_and_b07_none(decoder: Decoder) -> None:
    codes = decoder.decode(case("B06.png"))
    assert payloads(codes) == [DOOR1]
    (x, y) = codes[0].corners[0]
    assert abs(x - 235) <= 4 and abs(y - 174) <= 4  # the card's top-left corner
    assert decoder.decode(case("B07.png")) == []


def test_corners_are_top_left_top_right_bottom_right_bottom_left(decoder: Decoder) -> None:
    (code,) = decoder.decode(case("B01.png"))
    want = [(32, 32), (232, 32), (232, 232), (32, 232)]
    for (x, y), (wx, wy) in zip(code.corners, want, strict=True):
        assert abs(x - wx) <= 2 and abs(y - wy) <= 2
    assert code.backend in ("zxing-cpp", "zbar")
    assert code.ms > 0


# --- input validation ----------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 0), (0, 640), (480, 0)])
def test_empty_image_gives_no_codes(decoder: Decoder, shape: tuple[int, int]) -> None:
    assert decoder.decode(np.zeros(shape, dtype=np.uint8)) == []


def _bad_images() -> Iterator[Any]:
    yield np.zeros((48, 64), dtype=np.float32)
    yield np.zeros((48, 64), dtype=np.uint16)
    yield np.zeros((48, 64, 3), dtype=np.uint8)
    yield np.zeros((48,), dtype=np.uint8)
    yield [[0, 255], [255, 0]]


@pytest.mark.parametrize("bad", list(_bad_images()), ids=["f32", "u16", "rgb", "1d", "list"])
def test_wrong_image_type_raises_decoder_error(decoder: Decoder, bad: Any) -> None:
    with pytest.raises(DecoderError, match="2-D uint8"):
        decoder.decode(bad)


def test_a_non_contiguous_view_is_read(decoder: Decoder) -> None:
    frame = case("B06.png")
    view = frame[::1, 100:600]  # strided: rows are not contiguous
    assert not view.flags.c_contiguous
    assert payloads(decoder.decode(view)) == [DOOR1]


def test_unknown_backend_lists_the_choices() -> None:
    with pytest.raises(DecoderError, match="zxing-cpp, zbar, cascade"):
        make_decoder("opencv")


# --- cascade -----------------------------------------------------------------------------


class Counting:
    def __init__(self, inner: Decoder) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls = 0

    def decode(self, image: GrayImage) -> list[DecodedCode]:
        self.calls += 1
        return self.inner.decode(image)


def test_cascade_asks_zbar_only_when_zxing_reads_nothing() -> None:
    first, second = Counting(ZxingDecoder()), Counting(ZbarDecoder(try_variants=False))
    cascade = CascadeDecoder(first, second)
    assert [c.backend for c in cascade.decode(case("B06.png"))] == ["zxing-cpp"]
    assert (first.calls, second.calls) == (1, 0)
    assert cascade.decode(case("B07.png")) == []
    assert (first.calls, second.calls) == (2, 1)
    # A photo only zbar reads (corpus): the cascade returns zbar's code.
    photo = load_gray(need_shared() / "corpus/zxing-blackbox/qrcode-2/28.png")
    assert payloads(cascade.decode(photo)) == [b"http://www.webtech.co.jp/k/"]
    assert [c.backend for c in cascade.decode(photo)] == ["zbar"]
