"""Exact reads on the real-photo corpus per backend, and the corpus loader itself."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import segno
from PIL import Image

from firmware.decoding.codes import DecodedCode
from firmware.decoding.corpus import FOLDERS, CorpusItem, load_gray, load_manifest, read_ok
from firmware.decoding.registry import BACKENDS, make_decoder
from firmware.exceptions import CorpusError
from tests.shared import need_shared

# Reference figures from shared/corpus/README.md (zxing-cpp 3.1, pyzbar 0.1.9 + libzbar 0.23);
# the cascade targets are the union of the two measured here.
AT_LEAST = {
    ("zxing-cpp", "zxing-blackbox"): 167,
    ("zxing-cpp", "zxing-cpp-samples"): 125,
    ("zbar", "zxing-blackbox"): 148,
    ("zbar", "zxing-cpp-samples"): 95,
    ("cascade", "zxing-blackbox"): 169,
    ("cascade", "zxing-cpp-samples"): 129,
}
SIZES = {"zxing-blackbox": 180, "zxing-cpp-samples": 137}

Reads = dict[tuple[str, str], list[bool]]


@pytest.fixture(scope="module")
def reads() -> Reads:
    """For each (backend, folder): whether each manifest item was read exactly."""
    corpus = need_shared() / "corpus"
    decoders = {name: make_decoder(name) for name in BACKENDS}
    result: Reads = {}
    for folder in FOLDERS:
        items = load_manifest(corpus / folder)
        for item in items:
            image = load_gray(item.image)
            for name, decoder in decoders.items():
                result.setdefault((name, folder), []).append(read_ok(item, decoder.decode(image)))
    return result


@pytest.mark.parametrize("folder", FOLDERS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_exact_reads_reach_the_reference(reads: Reads, backend: str, folder: str) -> None:
    got = reads[(backend, folder)]
    assert len(got) == SIZES[folder]
    assert sum(got) >= AT_LEAST[(backend, folder)], f"{backend} read {sum(got)}/{len(got)}"


@pytest.mark.parametrize("folder", FOLDERS)
def test_cascade_reads_every_image_either_backend_reads(reads: Reads, folder: str) -> None:
    zxing, zbar, cascade = (reads[(b, folder)] for b in ("zxing-cpp", "zbar", "cascade"))
    missed = [
        i
        for i, (a, b, c) in enumerate(zip(zxing, zbar, cascade, strict=True))
        if (a or b) and not c
    ]
    assert missed == []
    # Some photos are read by zbar only: that is what the cascade is for.
    assert any(b and not a for a, b in zip(zxing, zbar, strict=True))


# --- manifest ------------------------------------------------------------------------------


def test_manifest_items_hold_exact_payloads() -> None:
    items = load_manifest(need_shared() / "corpus" / "zxing-blackbox")
    assert len(items) == 180
    assert all(item.image.is_file() for item in items)
    (multi,) = [item for item in items if "multi=" in item.notes]
    assert len(multi.expected) == 4
    assert multi.expected[0].startswith(b"You earned the class a 5 MINUTE DANCE PARTY!!")
    first = items[0]
    assert first.image.name == "1.png"
    assert first.expected == ((first.image.parent / "1.txt").read_bytes(),)


def write_manifest(folder: Path, *rows: str) -> None:
    header = "image_file\texpected_payload_file_or_text\tnotes"
    (folder / "manifest.tsv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def test_manifest_inline_text_file_payload_and_multi(tmp_path: Path) -> None:
    (tmp_path / "p.bin").write_bytes(b"\x00\xff\n")
    (tmp_path / "m.txt").write_bytes(b"one\ntwo\n")
    write_manifest(
        tmp_path, "a.png\tGrüße\tinline", "b.png\tp.bin\tbinary", "c.png\tm.txt\tmulti=2"
    )
    a, b, c = load_manifest(tmp_path)
    assert a == CorpusItem(tmp_path.resolve() / "a.png", ("Grüße".encode(),), "inline")
    assert b.expected == (b"\x00\xff\n",)
    assert c.expected == (b"one", b"two")


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (("a.png\tmissing.txt\t",), "missing.txt"),
        (("a.png\tm.txt\tmulti=3",), "holds 2 payloads"),
        (("a.png\tonly two fields",), "3 tab-separated"),
    ],
)
def test_bad_manifest_raises_corpus_error(
    tmp_path: Path, rows: tuple[str, ...], message: str
) -> None:
    (tmp_path / "m.txt").write_bytes(b"one\ntwo\n")
    write_manifest(tmp_path, *rows)
    with pytest.raises(CorpusError, match=message):
        load_manifest(tmp_path)


def test_missing_manifest_or_header_raises_corpus_error(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="cannot read"):
        load_manifest(tmp_path)
    (tmp_path / "manifest.tsv").write_text("file\tpayload\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="header"):
        load_manifest(tmp_path)


# --- read_ok -------------------------------------------------------------------------------


def code(payload: bytes, *, exact: bool = True) -> DecodedCode:
    square = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
    return DecodedCode(payload=payload, corners=square, backend="test", exact=exact)


def item(*expected: bytes) -> CorpusItem:
    return CorpusItem(image=Path("x.png"), expected=expected, notes="")


def test_read_ok_needs_exact_bytes() -> None:
    assert read_ok(item(b"abc"), [code(b"abc")])
    assert not read_ok(item(b"abc"), [code(b"abc ")])
    assert not read_ok(item(b"abc"), [code(b"abc", exact=False)])
    assert not read_ok(item(b"abc"), [])


def test_read_ok_compares_japanese_and_chinese_codes_as_text() -> None:
    text = "日本語"
    assert read_ok(item(text.encode()), [code(text.encode("cp932"))])
    assert read_ok(item("阿".encode()), [code("阿".encode("gb2312"))])  # QR Hanzi mode
    assert not read_ok(item(text.encode()), [code("日本".encode("cp932"))])
    # What a charset-guessing decoder makes of Shift-JIS bytes does not count.
    mojibake = text.encode("cp932").decode("latin-1").encode("utf-8")
    assert not read_ok(item(text.encode()), [code(mojibake)])


def test_read_ok_needs_every_payload_of_a_multi_code_image() -> None:
    multi = item(b"one", b"two")
    assert read_ok(multi, [code(b"two"), code(b"one"), code(b"three")])
    assert not read_ok(multi, [code(b"one")])


# --- load_gray -----------------------------------------------------------------------------


@pytest.fixture
def qr_rgb() -> Image.Image:
    """A dark-blue-on-cream QR code of b"LOAD" (colour on purpose), 4 px modules."""
    path_image = segno.make_qr("LOAD")
    matrix = np.array([list(row) for row in path_image.matrix], dtype=bool)
    matrix = np.pad(matrix, 4).repeat(4, axis=0).repeat(4, axis=1)
    rgb = np.where(matrix[..., None], [20, 30, 90], [250, 240, 220]).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


@pytest.mark.parametrize(
    ("suffix", "convert"),
    [
        (".png", "RGB"),
        (".png", "P"),
        (".png", "1"),
        (".png", "LA"),
        (".png", "I;16"),
        (".webp", "RGB"),
        (".jpg", "L"),
    ],
)
def test_load_gray_reads_every_mode(
    tmp_path: Path, qr_rgb: Image.Image, suffix: str, convert: str
) -> None:
    path = tmp_path / f"code{suffix}"
    gray = qr_rgb.convert("L")
    if convert == "I;16":
        wide = np.asarray(gray, dtype=np.uint16) * 257  # full 16-bit range
        Image.fromarray(wide).save(path)
    elif convert == "P":
        qr_rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(path)
    elif convert == "1":
        gray.convert("1", dither=Image.Dither.NONE).save(path)
    elif suffix == ".webp":
        qr_rgb.save(path, lossless=True)
    else:
        qr_rgb.convert(convert).save(path)
    image = load_gray(path)
    assert image.dtype == np.uint8 and image.shape == (qr_rgb.height, qr_rgb.width)
    assert image.flags.c_contiguous
    assert image[0, 0] > 200  # quiet zone stays light
    assert make_decoder("zxing-cpp").decode(image)[0].payload == b"LOAD"


def test_load_gray_puts_transparency_on_white(tmp_path: Path, qr_rgb: Image.Image) -> None:
    rgba = np.asarray(qr_rgb.convert("RGBA")).copy()
    light = rgba[..., 0] > 128
    rgba[light] = (0, 0, 0, 0)  # a transparent, black-valued background
    path = tmp_path / "code.png"
    Image.fromarray(rgba, "RGBA").save(path)
    image = load_gray(path)
    assert image[0, 0] == 255
    assert make_decoder("zxing-cpp").decode(image)[0].payload == b"LOAD"


def test_load_gray_raises_corpus_error_on_a_bad_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(CorpusError, match=r"broken\.png"):
        load_gray(path)
    with pytest.raises(CorpusError):
        load_gray(tmp_path / "absent.png")
