"""Reading a QR photo corpus (``shared/corpus/<folder>``) and judging a decoder's answer on it.

Used by the corpus tests and by the benchmark. A folder holds ``manifest.tsv``, tab-separated
with a header row: ``image_file`` (relative to the folder), ``expected_payload_file_or_text``
(a relative ``.txt``/``.bin`` file holding the exact payload, or the payload text itself) and
``notes``. A row whose notes contain ``multi=N`` names a file with N expected payloads, one per
line. Typical use::

    for item in load_manifest(corpus / "zxing-blackbox"):
        ok = read_ok(item, decoder.decode(load_gray(item.image)))
"""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from drivers.exceptions import FrameFileError
from drivers.frames import GrayImage
from drivers.replay import load_gray as replay_load_gray
from firmware.decoding.codes import DecodedCode
from firmware.exceptions import CorpusError

FOLDERS: Final[tuple[str, ...]] = ("zxing-blackbox", "zxing-cpp-samples")
"""The corpus folders under ``shared/corpus``."""

_COLUMNS: Final = ("image_file", "expected_payload_file_or_text", "notes")
_MULTI: Final = re.compile(r"\bmulti=(\d+)\b")
_LEGACY_CHARSETS: Final = ("cp932", "gb18030")  # Shift-JIS (Kanji mode), GB 2312 (Hanzi mode)


@dataclass(frozen=True, slots=True)
class CorpusItem:
    """One corpus image and what a correct read returns.

    ``image``: absolute path of the image file. ``expected``: the exact payload bytes of every
    code that must be read (one for most images, several for a multi-code image). ``notes``:
    the manifest's free-text notes (source, charset, "inverted", ...).
    """

    image: Path
    expected: tuple[bytes, ...]
    notes: str


def load_manifest(folder: Path) -> list[CorpusItem]:
    """The items of ``folder/manifest.tsv``, in manifest order.

    Raises :class:`CorpusError` when the manifest is missing or malformed, a payload file it
    names is missing, or a multi-code row's payload count does not match its ``multi=N`` note.
    Image files are not opened here (see :func:`load_gray`).
    """
    manifest = folder / "manifest.tsv"
    try:
        text = manifest.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{manifest}: cannot read ({exc})") from exc
    rows = list(csv.reader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or tuple(rows[0][:3]) != _COLUMNS:
        raise CorpusError(f"{manifest}: header must be {' | '.join(_COLUMNS)}")
    items = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 3:
            raise CorpusError(f"{manifest}:{number}: expected 3 tab-separated fields")
        image_name, payload_ref, notes = row
        expected = _expected(folder, payload_ref, notes, f"{manifest}:{number}")
        items.append(
            CorpusItem(image=(folder / image_name).resolve(), expected=expected, notes=notes)
        )
    return items


def load_gray(path: Path) -> GrayImage:
    """Decode an image file to an HxW uint8 gray array, the way the replay camera does
    (:func:`drivers.replay.load_gray`). Raises :class:`CorpusError` when it cannot be read."""
    try:
        return replay_load_gray(path)
    except FrameFileError as exc:
        raise CorpusError(str(exc)) from exc


def read_ok(item: CorpusItem, codes: Iterable[DecodedCode]) -> bool:
    """True when ``codes`` contain every payload ``item`` expects, byte for byte.

    Only codes with ``exact=True`` count. Extra codes are allowed. The corpus stores every
    expected payload as UTF-8 text, but Japanese codes carry Shift-JIS bytes (QR's Kanji mode,
    or byte mode without ECI) and one Chinese code GB 2312 bytes (QR's Hanzi mode): so an
    expected payload that is not ASCII also matches a payload whose cp932 or GB 18030 decoding
    is exactly the same text.
    """
    payloads = [code.payload for code in codes if code.exact]
    return all(any(_same(want, got) for got in payloads) for want in item.expected)


def _same(expected: bytes, payload: bytes) -> bool:
    if payload == expected:
        return True
    if expected.isascii():
        return False
    try:
        text = expected.decode("utf-8")
    except UnicodeDecodeError:  # a binary expected payload matches only byte for byte
        return False
    for charset in _LEGACY_CHARSETS:
        try:
            if payload.decode(charset) == text:
                return True
        except UnicodeDecodeError:
            continue
    return False


def _expected(folder: Path, ref: str, notes: str, where: str) -> tuple[bytes, ...]:
    if ref.endswith((".txt", ".bin")):
        path = folder / ref
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CorpusError(f"{where}: payload file {ref} cannot be read ({exc})") from exc
    else:
        data = ref.encode("utf-8")
    multi = _MULTI.search(notes)
    if multi is None:
        return (data,)
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if len(lines) != int(multi.group(1)):
        raise CorpusError(f"{where}: {ref} holds {len(lines)} payloads, notes say {multi.group(0)}")
    return tuple(lines)
