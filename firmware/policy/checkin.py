"""Check-in with a Vietnamese chip ID card (CCCD) QR or a 2021 health-app personal QR.

Both are third-party payloads: the reader validates them byte-exactly and keeps as little
as it can (Decree 13/2023/ND-CP, Law 91/2025/QH15: collect only what the purpose needs).

CCCD QR (``shared/cases/README.md``, "Vietnamese chip ID card (CCCD) QR payloads"):
UTF-8 text, fields separated by ``|``::

    ID(12) | old ID(9 or empty) | full name | birth DDMMYYYY | Nam/Nữ | address | issue DDMMYYYY

Cards issued from July 2024 may carry 4 more fields (11 in all), each possibly empty.

The 12-digit ID number is ``PPP G YY RRRRRR`` (Decree 137/2015/ND-CP Art. 13, Circular
07/2016/TT-BCA Art. 7 and its Annex 1): ``PPP`` the code of the province or city where the
birth was registered (:data:`PROVINCES`, the 63 codes 001-096 with gaps); ``G`` century and
sex: 0/1 born 1900-1999 male/female, 2/3 2000-2099, 4/5 2100-2199, 6/7 2200-2299, 8/9
2300-2399 (even male, odd female, century ``1900 + 100 * (G // 2)``); ``YY`` the last two
digits of the birth year; ``RRRRRR`` a serial. There is no check digit, so the only
internal checks are province, century, sex and year against the other fields.

Personal QR of the 2021 health apps (example in the cases README)::

    ID(12, or the old 9) | NAME | birth YYYY-MM-DD | sex 0/1 | app field | app field

Every parse error is :class:`~firmware.exceptions.IdCardError` with reason
``Reason.INVALID_ID_CARD``, a stable ``why`` from :data:`WHYS` and a message naming the field.
Messages never quote the full ID number, the name, the address or a full date (they reach
logs); they quote at most the digits the rule is about (``"G=3 means born in the 2000s,
birth date says 1993"``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from datetime import date, datetime
from enum import StrEnum
from typing import Final

from firmware.exceptions import ConfigError, IdCardError
from firmware.policy.verdict import Reason

MAX_PAYLOAD_BYTES: Final = 2048
"""Largest payload parsed, bytes: the cases' cards are under 200 bytes; this leaves room for
long addresses and the 2024 extra fields, within a QR code's 2953-byte maximum."""
MAX_NAME_CHARS: Final = 100
"""Longest full name, characters after NFC (the longest Vietnamese names are ~50)."""
MAX_ADDRESS_CHARS: Final = 400
"""Longest address, characters after NFC."""
MAX_EXTRA_CHARS: Final = 200
"""Longest of the 4 extra fields of cards from July 2024, characters after NFC."""
MAX_APP_FIELD_CHARS: Final = 64
"""Longest app-specific field (5th, 6th) of a personal QR, characters."""
MIN_BIRTH_YEAR: Final = 1900
"""Earliest birth year: the ID number's century digit cannot say anything earlier."""

CCCD_FIELDS: Final = 7
CCCD_FIELDS_2024: Final = 11
PERSONAL_QR_FIELDS: Final = 6

ID_DOMAIN: Final = b"cccd-id:"
"""HMAC domain of a 12-digit ID number: the card and a personal QR with the same number give
the same subject."""
OLD_ID_DOMAIN: Final = b"cmnd-id:"
"""HMAC domain of a 9-digit old (CMND) number, a different number space."""

_BOM: Final = b"\xef\xbb\xbf"
_DATE_ISO = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")  # [0-9], not \d: \d takes any digit
_DATE_ISO_BYTES = re.compile(rb"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_NAME_MARKS: Final = frozenset("'’-")  # H'Hen Niê (Ê Đê names), hyphenated names
_FEMALE_DIGITS: Final = frozenset("13579")

PROVINCES: Final[dict[str, str]] = {
    "001": "Hà Nội",
    "002": "Hà Giang",
    "004": "Cao Bằng",
    "006": "Bắc Kạn",
    "008": "Tuyên Quang",
    "010": "Lào Cai",
    "011": "Điện Biên",
    "012": "Lai Châu",
    "014": "Sơn La",
    "015": "Yên Bái",
    "017": "Hòa Bình",
    "019": "Thái Nguyên",
    "020": "Lạng Sơn",
    "022": "Quảng Ninh",
    "024": "Bắc Giang",
    "025": "Phú Thọ",
    "026": "Vĩnh Phúc",
    "027": "Bắc Ninh",
    "030": "Hải Dương",
    "031": "Hải Phòng",
    "033": "Hưng Yên",
    "034": "Thái Bình",
    "035": "Hà Nam",
    "036": "Nam Định",
    "037": "Ninh Bình",
    "038": "Thanh Hóa",
    "040": "Nghệ An",
    "042": "Hà Tĩnh",
    "044": "Quảng Bình",
    "045": "Quảng Trị",
    "046": "Thừa Thiên Huế",
    "048": "Đà Nẵng",
    "049": "Quảng Nam",
    "051": "Quảng Ngãi",
    "052": "Bình Định",
    "054": "Phú Yên",
    "056": "Khánh Hòa",
    "058": "Ninh Thuận",
    "060": "Bình Thuận",
    "062": "Kon Tum",
    "064": "Gia Lai",
    "066": "Đắk Lắk",
    "067": "Đắk Nông",
    "068": "Lâm Đồng",
    "070": "Bình Phước",
    "072": "Tây Ninh",
    "074": "Bình Dương",
    "075": "Đồng Nai",
    "077": "Bà Rịa - Vũng Tàu",
    "079": "TP Hồ Chí Minh",
    "080": "Long An",
    "082": "Tiền Giang",
    "083": "Bến Tre",
    "084": "Trà Vinh",
    "086": "Vĩnh Long",
    "087": "Đồng Tháp",
    "089": "An Giang",
    "091": "Kiên Giang",
    "092": "Cần Thơ",
    "093": "Hậu Giang",
    "094": "Sóc Trăng",
    "095": "Bạc Liêu",
    "096": "Cà Mau",
}
"""Province/city code (3 ASCII digits) -> name, Circular 07/2016/TT-BCA Annex 1: the codes of
the 63 provinces where births were registered. ID numbers keep them after the 2025 merger."""

WHYS: Final = frozenset(
    {
        "too_long",
        "not_utf8",
        "field_count",
        "personal_qr",
        "id_digits",
        "province",
        "old_id",
        "name",
        "birth_date",
        "sex",
        "address",
        "issue_date",
        "extra_field",
        "app_field",
        "century_mismatch",
        "birth_year_mismatch",
        "sex_mismatch",
    }
)
"""Every ``why`` an :class:`IdCardError` from this module can carry."""


class Sex(StrEnum):
    """Sex as the card states it: ``Nam`` / ``Nữ`` on a CCCD, 0 / 1 on a personal QR."""

    MALE = "male"
    FEMALE = "female"


@dataclass(frozen=True, slots=True)
class IdCard:
    """A validated CCCD QR. Text is NFC; dates are real calendar dates.

    ``id_number``: 12 ASCII digits. ``old_id``: the old 9-digit number, or None when empty.
    ``extra``: the 4 fields of an 11-field card (July 2024 on), ``()`` on a 7-field card.
    The repr shows no personal data, so a stray log line cannot leak it.
    """

    id_number: str = field(repr=False)
    old_id: str | None = field(repr=False)
    name: str = field(repr=False)
    birth_date: date = field(repr=False)
    sex: Sex
    address: str = field(repr=False)
    issue_date: date = field(repr=False)
    extra: tuple[str, ...] = field(default=(), repr=False)

    @property
    def province(self) -> str:
        """Name of the province of birth registration (from the ID's first 3 digits)."""
        return PROVINCES[self.id_number[:3]]


@dataclass(frozen=True, slots=True)
class PersonalQr:
    """A validated 2021 health-app personal QR.

    ``id_number``: 12 ASCII digits (a CCCD-style number) or 9 (an old CMND number). The two
    app-specific fields are validated, then dropped. The repr shows no personal data.
    """

    id_number: str = field(repr=False)
    name: str = field(repr=False)
    birth_date: date = field(repr=False)
    sex: Sex


KEEP_DEFAULT: Final = frozenset({"id_hmac", "name_masked", "birth_year"})
"""What a check-in keeps unless the site says otherwise: the keyed HMAC of the ID number, the
masked name and the birth year."""
KEEP_ALLOWED: Final = KEEP_DEFAULT | frozenset({"sex", "full_name", "birth_date", "issue_date"})
"""Every item a site may keep (``[policy] keep``). Address, old ID number and the extra
fields of 2024 cards are not among them: they are dropped after validation."""


@dataclass(frozen=True, slots=True)
class Person:
    """What the reader keeps about a person who checked in; a field is None unless its name
    is in ``keep`` (and the card has it).

    ``id_hmac``: the caller's keyed HMAC (hex) of the ID number under :data:`ID_DOMAIN` (or
    :data:`OLD_ID_DOMAIN` for a 9-digit number). ``name_masked``: see :func:`mask_name`.
    ``birth_year``: e.g. 1985. ``sex``: "male" / "female". ``full_name``: NFC.
    ``birth_date``, ``issue_date``: ISO 8601 ``YYYY-MM-DD`` (a personal QR has no issue date).
    """

    id_hmac: str | None = None
    name_masked: str | None = None
    birth_year: int | None = None
    sex: str | None = None
    full_name: str | None = None
    birth_date: str | None = None
    issue_date: str | None = None

    def to_dict(self) -> dict[str, object]:
        """The kept fields (not None) as a JSON-ready dict, keyed by their ``keep`` names."""
        out: dict[str, object] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = value
        return out


def _fail(why: str, message: str) -> IdCardError:
    return IdCardError(Reason.INVALID_ID_CARD, why, message)


def _text(payload: bytes) -> str:
    """Bytes -> NFC text with the framing removed; raises IdCardError (too_long, not_utf8)."""
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise _fail("too_long", f"payload is {len(payload)} bytes, at most {MAX_PAYLOAD_BYTES}")
    raw = bytes(payload)
    # Only framing is removed: a UTF-8 byte-order mark that Windows tools prepend and the line
    # ending that scanner apps and keyboard-wedge readers append. Anything else (spaces, tabs,
    # Unicode whitespace) could be part of a field: str.strip() would silently change a value,
    # so such bytes stay and the field rules judge them.
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    raw = raw.rstrip(b"\r\n")
    try:
        text = raw.decode("utf-8", errors="strict")
    except UnicodeDecodeError as e:
        raise _fail(
            "not_utf8", f"payload is not valid UTF-8 at byte {e.start}: {e.reason}"
        ) from None
    # The card is NFC, but a re-encoding app may hand NFD ("Nữ" as u + horn + tilde).
    return unicodedata.normalize("NFC", text)


def _ascii_digits(s: str) -> bool:
    # str.isdigit alone accepts "٣", "３" and "²"; int() even accepts "1_0" and " 1".
    return s.isascii() and s.isdigit()


def _char_name(c: str) -> str:
    return f"U+{ord(c):04X} {unicodedata.name(c, 'unnamed')}"


def _check_id(value: str, lengths: tuple[int, ...], label: str) -> None:
    if not _ascii_digits(value):
        bad = next((c for c in value if not ("0" <= c <= "9")), None)
        what = "it is empty" if bad is None else f"it holds {_char_name(bad)}"
        raise _fail("id_digits", f"{label} must be ASCII digits 0-9; {what}")
    if len(value) not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise _fail("id_digits", f"{label} has {len(value)} digits, it must have {want}")
    if len(value) == 12 and value[:3] not in PROVINCES:
        raise _fail(
            "province",
            f"{label}: province code {value[:3]} is not a Vietnamese province or city code "
            "(001-096, with gaps)",
        )


def _check_name(value: str, label: str) -> None:
    if not value:
        raise _fail("name", f"{label} is empty")
    if len(value) > MAX_NAME_CHARS:
        raise _fail("name", f"{label} has {len(value)} characters, at most {MAX_NAME_CHARS}")
    if not unicodedata.category(value[0]).startswith("L"):
        raise _fail("name", f"{label} must start with a letter, found {_char_name(value[0])}")
    if value.endswith(" ") or "  " in value:
        raise _fail("name", f"{label} must be words separated by single spaces")
    for c in value:
        if c != " " and c not in _NAME_MARKS and unicodedata.category(c)[0] not in "LM":
            raise _fail("name", f"{label} holds {_char_name(c)}, not a letter of a name")


def _plain_text(value: str, why: str, label: str, limit: int, *, required: bool) -> None:
    if len(value) > limit:
        raise _fail(why, f"{label} has {len(value)} characters, at most {limit}")
    if required and not value.strip():
        raise _fail(why, f"{label} is empty")
    for c in value:
        # C*: controls, format (bidi overrides, zero-width), surrogates, private, unassigned.
        if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise _fail(why, f"{label} holds {_char_name(c)}, a control or invisible character")


def _year_ok(d: date, why: str, label: str, today: date | None) -> date:
    if d.year < MIN_BIRTH_YEAR:
        raise _fail(why, f"{label} year {d.year} is before {MIN_BIRTH_YEAR}")
    if today is not None and d > today:
        raise _fail(why, f"{label} is after today ({today.isoformat()})")
    return d


def _dmy(value: str, why: str, label: str) -> date:
    if len(value) != 8 or not _ascii_digits(value):
        raise _fail(why, f"{label} must be 8 ASCII digits DDMMYYYY")
    try:
        return date(int(value[4:]), int(value[2:4]), int(value[:2]))
    except ValueError:
        # Day and month say what is wrong; the full date is personal data and stays out.
        raise _fail(
            why, f"{label} is not a real calendar date (day {value[:2]}, month {value[2:4]})"
        ) from None


def _iso(value: str, why: str, label: str) -> date:
    if not _DATE_ISO.fullmatch(value):
        raise _fail(why, f"{label} must be YYYY-MM-DD in ASCII digits")
    try:
        return date(int(value[:4]), int(value[5:7]), int(value[8:]))
    except ValueError:
        raise _fail(
            why, f"{label} is not a real calendar date (month {value[5:7]}, day {value[8:]})"
        ) from None


def _cross_check(id_number: str, birth: date, sex: Sex, sex_shown: str) -> None:
    """The ID's century digit and year digits against the birth date and sex field."""
    g = int(id_number[3])
    century = 1900 + 100 * (g // 2)
    if not century <= birth.year < century + 100:
        raise _fail(
            "century_mismatch",
            f"G={g} means born in the {century}s, birth date says {birth.year}",
        )
    if id_number[4:6] != f"{birth.year % 100:02d}":
        raise _fail(
            "birth_year_mismatch",
            f"ID year digits {id_number[4:6]} differ from the birth year {birth.year}",
        )
    g_sex = Sex.FEMALE if id_number[3] in _FEMALE_DIGITS else Sex.MALE
    if g_sex is not sex:
        raise _fail("sex_mismatch", f"G={g} means {g_sex.value}, sex field says {sex_shown}")


def _as_date(today: date | None) -> date | None:
    # A datetime is a date, but comparing one with a date raises TypeError.
    return today.date() if isinstance(today, datetime) else today


def parse_cccd(payload: bytes, *, today: date | None = None) -> IdCard:
    """Parse and validate a CCCD QR payload (the raw QR bytes) into an :class:`IdCard`.

    Strict UTF-8; one leading byte-order mark and trailing CR/LF are dropped (nothing else is
    stripped); the text is NFC-normalised before any rule. Fields are checked in order, then
    the ID number against them (century, year, sex), so the first broken rule is reported.
    ``today``: the local date from a trusted clock; when given, birth and issue dates after
    it are refused. None (an untrusted clock) skips only that check.

    Raises IdCardError(Reason.INVALID_ID_CARD, why, message); ``why`` in :data:`WHYS`:
    too_long, not_utf8, field_count, personal_qr (6 fields with a YYYY-MM-DD 3rd field: use
    :func:`parse_personal_qr`), id_digits, province, old_id, name, birth_date, sex, address,
    issue_date, extra_field, century_mismatch, birth_year_mismatch, sex_mismatch.
    """
    today = _as_date(today)
    text = _text(payload)
    n = text.count("|") + 1
    if n not in (CCCD_FIELDS, CCCD_FIELDS_2024):
        if n == PERSONAL_QR_FIELDS and _DATE_ISO.fullmatch(text.split("|")[2]):
            raise _fail(
                "personal_qr",
                "6 fields with a YYYY-MM-DD birth date: a 2021 health-app personal QR, not a CCCD",
            )
        raise _fail(
            "field_count",
            f"payload has {n} fields, a CCCD QR has {CCCD_FIELDS} or {CCCD_FIELDS_2024}",
        )
    fields = text.split("|")
    id_number, old_id, name, birth_s, sex_s, address, issue_s = fields[:CCCD_FIELDS]
    extra = tuple(fields[CCCD_FIELDS:])

    _check_id(id_number, (12,), "ID")
    if old_id and (len(old_id) != 9 or not _ascii_digits(old_id)):
        raise _fail("old_id", "old ID (field 2) must be empty or 9 ASCII digits")
    _check_name(name, "name (field 3)")
    birth_label = "birth date (field 4)"
    birth = _year_ok(_dmy(birth_s, "birth_date", birth_label), "birth_date", birth_label, today)
    if sex_s not in ("Nam", "Nữ"):
        raise _fail("sex", "sex (field 5) must be Nam or Nữ")
    sex = Sex.MALE if sex_s == "Nam" else Sex.FEMALE
    _plain_text(address, "address", "address (field 6)", MAX_ADDRESS_CHARS, required=True)
    issue = _dmy(issue_s, "issue_date", "issue date (field 7)")
    if issue < birth:
        raise _fail("issue_date", "issue date (field 7) is before the birth date")
    if today is not None and issue > today:
        raise _fail("issue_date", f"issue date (field 7) is after today ({today.isoformat()})")
    for i, value in enumerate(extra, start=CCCD_FIELDS + 1):
        _plain_text(value, "extra_field", f"field {i}", MAX_EXTRA_CHARS, required=False)
    _cross_check(id_number, birth, sex, sex_s)
    return IdCard(id_number, old_id or None, name, birth, sex, address, issue, extra)


def parse_personal_qr(payload: bytes, *, today: date | None = None) -> PersonalQr:
    """Parse and validate a 2021 health-app personal QR (raw QR bytes) into a PersonalQr.

    Fields: ID (12 ASCII digits, or an old 9-digit CMND number: in 2021 many people still
    held only the 9-digit card, and the apps issued them codes too) | name (the example is
    uppercase ASCII without diacritics; any name that passes the CCCD name rule is taken) |
    birth date YYYY-MM-DD | sex digit (0 male, 1 female: the example's "TRAN VAN BINH" with
    its G=0 ID number reads male) | two app-specific fields (0-64 printable ASCII each,
    validated then dropped). A 12-digit ID gets the CCCD structure checks (province,
    century, year, sex); a 9-digit one has no structure to check.

    ``today`` as in :func:`parse_cccd`. Raises IdCardError(Reason.INVALID_ID_CARD, why,
    message) with ``why``: too_long, not_utf8, field_count, id_digits, province, name,
    birth_date, sex, app_field, century_mismatch, birth_year_mismatch, sex_mismatch.
    """
    today = _as_date(today)
    text = _text(payload)
    n = text.count("|") + 1
    if n != PERSONAL_QR_FIELDS:
        hint = " (7 or 11 fields: a CCCD QR)" if n in (CCCD_FIELDS, CCCD_FIELDS_2024) else ""
        raise _fail(
            "field_count", f"payload has {n} fields, a personal QR has {PERSONAL_QR_FIELDS}{hint}"
        )
    id_number, name, birth_s, sex_s, app1, app2 = text.split("|")
    _check_id(id_number, (12, 9), "ID")
    _check_name(name, "name (field 2)")
    birth_label = "birth date (field 3)"
    birth = _year_ok(_iso(birth_s, "birth_date", birth_label), "birth_date", birth_label, today)
    if sex_s not in ("0", "1"):
        raise _fail("sex", "sex (field 4) must be 0 (male) or 1 (female)")
    sex = Sex.MALE if sex_s == "0" else Sex.FEMALE
    for i, value in ((5, app1), (6, app2)):
        if len(value) > MAX_APP_FIELD_CHARS:
            raise _fail(
                "app_field",
                f"field {i} has {len(value)} characters, at most {MAX_APP_FIELD_CHARS}",
            )
        if not all(" " <= c <= "~" for c in value):
            raise _fail("app_field", f"field {i} must be printable ASCII")
    if len(id_number) == 12:
        _cross_check(id_number, birth, sex, sex_s)
    return PersonalQr(id_number, name, birth, sex)


def _head(payload: bytes) -> bytes:
    return payload[len(_BOM) :] if payload.startswith(_BOM) else payload


def looks_like_cccd(payload: bytes) -> bool:
    """A cheap claim, no full parse: an optional UTF-8 BOM, 12 ASCII digits, ``|``, and 7 or
    11 fields in all. False for anything else (a personal QR included); never raises."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return False
    # No size cap here: an oversized CCCD-shaped payload is claimed, so that parse_cccd
    # answers "too_long" instead of it falling through to another kind as "unknown".
    head = _head(bytes(payload))
    return (
        head[:12].isdigit()  # bytes.isdigit is ASCII-only
        and head[12:13] == b"|"
        and head.count(b"|") + 1 in (CCCD_FIELDS, CCCD_FIELDS_2024)
    )


def looks_like_personal_qr(payload: bytes) -> bool:
    """A cheap claim: an optional UTF-8 BOM, 12 or 9 ASCII digits, ``|``, 6 fields in all and
    a YYYY-MM-DD (ASCII digits) 3rd field. False for anything else; never raises."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        return False
    head = _head(bytes(payload))
    if head.count(b"|") + 1 != PERSONAL_QR_FIELDS:
        return False
    fields = head.split(b"|")
    return (
        len(fields[0]) in (12, 9)
        and fields[0].isdigit()
        and _DATE_ISO_BYTES.fullmatch(fields[2]) is not None
    )


def _initial(word: str) -> str:
    # The first letter with any combining marks NFC could not fold into it.
    end = 1
    while end < len(word) and unicodedata.category(word[end]).startswith("M"):
        end += 1
    return word[:end]


def mask_name(name: str) -> str:
    """A 2021-venue style mask: the family name (first word) whole, every other word as its
    first letter and ``**``: "Trần Văn Bình" -> "Trần V** B**"; a one-word name -> "B**".

    The given name (last word) is what identifies a person; family names are few (Nguyễn,
    Trần, Lê cover over half the country). ``**`` has a fixed length, so word lengths do not
    leak. Letters are taken whole after NFC ("Đức" -> "Đ**", not "D**"). A given name that is
    a single letter or equals the family name stays readable: inherent in the mask.
    """
    words = unicodedata.normalize("NFC", name).split()
    if not words:
        return ""
    if len(words) == 1:
        return _initial(words[0]) + "**"
    return " ".join([words[0], *(_initial(w) + "**" for w in words[1:])])


def parse_keep(values: Iterable[str], *, file: str, key: str) -> frozenset[str]:
    """Read a site's ``keep`` setting; raises ConfigError naming ``file`` and ``key`` for an
    entry outside :data:`KEEP_ALLOWED` (e.g. "address": never kept)."""
    out = frozenset(values)
    bad = sorted(out - KEEP_ALLOWED)
    if bad:
        raise ConfigError(file, key, f"a subset of {sorted(KEEP_ALLOWED)}", repr(bad))
    return out


def person_record(
    card: IdCard | PersonalQr,
    hasher_hmac: Callable[[bytes], str],
    keep: frozenset[str] = KEEP_DEFAULT,
) -> Person:
    """The :class:`Person` kept about ``card``'s holder: only the items named in ``keep``.

    ``hasher_hmac``: keyed HMAC of bytes to hex (e.g. ``SubjectHasher(key).subject``); it
    gets :data:`ID_DOMAIN` + the 12 ASCII digits (or :data:`OLD_ID_DOMAIN` + 9 digits), so
    the same person is the same subject whatever else the card says, and no plain hash of the
    number (10^6 guesses per prefix) is ever stored. ``keep`` ⊆ :data:`KEEP_ALLOWED`, else
    ValueError (a programming error: settings are checked with :func:`parse_keep`).
    """
    bad = sorted(keep - KEEP_ALLOWED)
    if bad:
        raise ValueError(f"keep holds {bad}; allowed: {sorted(KEEP_ALLOWED)}")
    domain = ID_DOMAIN if len(card.id_number) == 12 else OLD_ID_DOMAIN
    issue = card.issue_date if isinstance(card, IdCard) else None
    return Person(
        id_hmac=(
            hasher_hmac(domain + card.id_number.encode("ascii")) if "id_hmac" in keep else None
        ),
        name_masked=mask_name(card.name) if "name_masked" in keep else None,
        birth_year=card.birth_date.year if "birth_year" in keep else None,
        sex=card.sex.value if "sex" in keep else None,
        full_name=card.name if "full_name" in keep else None,
        birth_date=card.birth_date.isoformat() if "birth_date" in keep else None,
        issue_date=issue.isoformat() if issue is not None and "issue_date" in keep else None,
    )


def person_of(
    card: IdCard | PersonalQr,
    hasher_hmac: Callable[[bytes], str],
    keep: frozenset[str] = KEEP_DEFAULT,
) -> dict[str, object]:
    """``person_record(card, hasher_hmac, keep).to_dict()``: a dict whose keys are the names
    in ``keep`` (less ``issue_date`` for a personal QR), by default ``id_hmac``,
    ``name_masked`` and ``birth_year``. Never the address, old ID number or extra fields."""
    return person_record(card, hasher_hmac, keep).to_dict()
