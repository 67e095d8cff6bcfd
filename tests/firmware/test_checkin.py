"""ID-card check-in: CCCD QR and 2021 personal QR parsing, routing claims, what is kept.

The accept and reject lines of ``shared/cases/README.md`` ("Vietnamese chip ID card (CCCD)
QR payloads") are written out byte for byte below; every person is invented.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import unicodedata
from collections.abc import Callable
from datetime import date, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.exceptions import ConfigError, IdCardError
from firmware.policy.checkin import (
    KEEP_ALLOWED,
    KEEP_DEFAULT,
    MAX_PAYLOAD_BYTES,
    PROVINCES,
    WHYS,
    IdCard,
    Person,
    PersonalQr,
    Sex,
    looks_like_cccd,
    looks_like_personal_qr,
    mask_name,
    parse_cccd,
    parse_keep,
    parse_personal_qr,
    person_of,
    person_record,
)
from firmware.policy.subjects import SubjectHasher
from firmware.policy.verdict import Reason

# --- the cases README, verbatim ---------------------------------------------------------------
ACCEPT_1 = (
    "074085003417|280912345|Trần Văn Bình|14031985|Nam|"
    "Tổ 3, Khu phố Mẫu, Phường Bình Hòa, Thuận An, Bình Dương|10052021"
)
ACCEPT_2 = (
    "079303004521||Lê Thị Thu Hà|02092003|Nữ|45/2 Đường Số 7, Phường 11, Quận 6, TP Hồ Chí Minh|"
    "21062021"
)
ACCEPT_1_BOM_CRLF = b"\xef\xbb\xbf" + ACCEPT_1.encode("utf-8") + b"\r\n"
REJECT_11_DIGITS = "07408500341|280912345|Trần Văn Bình|14031985|Nam|Thuận An, Bình Dương|10052021"
REJECT_G3_1993 = "079303004521||Lê Thị Thu Hà|02091993|Nữ|Quận 6, TP Hồ Chí Minh|21062021"
PERSONAL_QR = "074085003417|TRAN VAN BINH|1985-03-14|0|160000000000000001|<1<<0900000000"

ADDRESS_1 = "Tổ 3, Khu phố Mẫu, Phường Bình Hòa, Thuận An, Bình Dương"
KEY = bytes(range(32))
HMAC: Callable[[bytes], str] = SubjectHasher(KEY).subject

# The 63 province/city codes of Circular 07/2016/TT-BCA Annex 1, written out independently
# of the module's table.
_CODES = (
    "001 002 004 006 008 010 011 012 014 015 017 019 020 022 024 025 026 027 030 031 033 034 "
    "035 036 037 038 040 042 044 045 046 048 049 051 052 054 056 058 060 062 064 066 067 068 "
    "070 072 074 075 077 079 080 082 083 084 086 087 089 091 092 093 094 095 096"
)
PROVINCE_CODES = _CODES.split()


def cccd(
    *,
    id_number: str = "074085003417",
    old_id: str = "280912345",
    name: str = "Trần Văn Bình",
    birth: str = "14031985",
    sex: str = "Nam",
    address: str = ADDRESS_1,
    issue: str = "10052021",
    extra: tuple[str, ...] = (),
) -> bytes:
    """ACCEPT_1 with some fields replaced."""
    fields = [id_number, old_id, name, birth, sex, address, issue, *extra]
    return "|".join(fields).encode("utf-8")


def pqr(
    *,
    id_number: str = "074085003417",
    name: str = "TRAN VAN BINH",
    birth: str = "1985-03-14",
    sex: str = "0",
    app1: str = "160000000000000001",
    app2: str = "<1<<0900000000",
) -> bytes:
    """PERSONAL_QR with some fields replaced."""
    return "|".join([id_number, name, birth, sex, app1, app2]).encode("utf-8")


def cccd_why(payload: bytes, today: date | None = None) -> str:
    with pytest.raises(IdCardError) as e:
        parse_cccd(payload, today=today)
    assert e.value.reason == Reason.INVALID_ID_CARD
    assert e.value.why in WHYS
    return e.value.why


def pqr_why(payload: bytes, today: date | None = None) -> str:
    with pytest.raises(IdCardError) as e:
        parse_personal_qr(payload, today=today)
    assert e.value.reason == Reason.INVALID_ID_CARD
    assert e.value.why in WHYS
    return e.value.why


def arabic_indic(s: str) -> str:
    return s.translate({ord("0") + i: 0x0660 + i for i in range(10)})


def fullwidth(s: str) -> str:
    return s.translate({ord("0") + i: 0xFF10 + i for i in range(10)})


# --- the README's accept lines -----------------------------------------------------------------


def test_readme_accept_1() -> None:
    card = parse_cccd(ACCEPT_1.encode("utf-8"), today=date(2026, 1, 1))
    assert card.id_number == "074085003417"
    assert card.old_id == "280912345"
    assert card.name == "Trần Văn Bình"
    assert card.birth_date == date(1985, 3, 14)
    assert card.sex is Sex.MALE
    assert card.address == ADDRESS_1
    assert card.issue_date == date(2021, 5, 10)
    assert card.extra == ()
    assert card.province == "Bình Dương"


def test_readme_accept_2() -> None:
    card = parse_cccd(ACCEPT_2.encode("utf-8"), today=date(2026, 1, 1))
    assert card.id_number == "079303004521"
    assert card.old_id is None
    assert card.name == "Lê Thị Thu Hà"
    assert card.birth_date == date(2003, 9, 2)
    assert card.sex is Sex.FEMALE
    assert card.address == "45/2 Đường Số 7, Phường 11, Quận 6, TP Hồ Chí Minh"
    assert card.issue_date == date(2021, 6, 21)
    assert card.province == "TP Hồ Chí Minh"


def test_readme_accept_bom_and_crlf_is_the_same_card() -> None:
    assert ACCEPT_1_BOM_CRLF[:3] == b"\xef\xbb\xbf" and ACCEPT_1_BOM_CRLF[-2:] == b"\r\n"
    assert parse_cccd(ACCEPT_1_BOM_CRLF) == parse_cccd(ACCEPT_1.encode("utf-8"))


@pytest.mark.parametrize(
    "framed",
    [
        b"\xef\xbb\xbf" + ACCEPT_1.encode(),
        ACCEPT_1.encode() + b"\n",
        ACCEPT_1.encode() + b"\r",
        ACCEPT_1.encode() + b"\r\n\r\n",
    ],
)
def test_bom_and_line_endings_alone_are_stripped(framed: bytes) -> None:
    assert parse_cccd(framed) == parse_cccd(ACCEPT_1.encode())


@pytest.mark.parametrize(
    ("framed", "why"),
    [
        (ACCEPT_1.encode() + b" ", "issue_date"),  # a space could be data: not stripped
        (ACCEPT_1.encode() + b"\t", "issue_date"),
        (b" " + ACCEPT_1.encode(), "id_digits"),
        ("\u00a0".encode() + ACCEPT_1.encode(), "id_digits"),
        (b"\xef\xbb\xbf\xef\xbb\xbf" + ACCEPT_1.encode(), "id_digits"),  # one BOM only
        (b"\xff\xfe" + ACCEPT_1.encode(), "not_utf8"),  # a UTF-16 BOM is not framing
        (b"\r\n" + ACCEPT_1.encode(), "id_digits"),  # only trailing line ends go
    ],
)
def test_other_framing_is_not_stripped(framed: bytes, why: str) -> None:
    assert cccd_why(framed) == why


# --- the README's reject lines -----------------------------------------------------------------


def test_readme_reject_id_with_11_digits() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(REJECT_11_DIGITS.encode("utf-8"))
    assert (e.value.reason, e.value.why) == (Reason.INVALID_ID_CARD, "id_digits")
    assert "ID has 11 digits" in str(e.value)


def test_readme_reject_g3_born_1993() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(REJECT_G3_1993.encode("utf-8"))
    assert (e.value.reason, e.value.why) == (Reason.INVALID_ID_CARD, "century_mismatch")
    assert str(e.value) == "G=3 means born in the 2000s, birth date says 1993"


def test_readme_reject_personal_qr_is_another_kind() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(PERSONAL_QR.encode("utf-8"))
    assert (e.value.reason, e.value.why) == (Reason.INVALID_ID_CARD, "personal_qr")
    assert "personal QR" in str(e.value)


# --- field count, 11-field cards ---------------------------------------------------------------


def test_eleven_field_card_with_empty_extras() -> None:
    card = parse_cccd(ACCEPT_1.encode() + b"||||")
    assert card.extra == ("", "", "", "")
    assert card.id_number == "074085003417" and card.issue_date == date(2021, 5, 10)


def test_eleven_field_card_with_filled_extras() -> None:
    extra = ("Trần Văn An", "Nguyễn Thị Hoa", "", "01/2024 cấp đổi")
    card = parse_cccd(cccd(extra=extra))
    assert card.extra == extra


@pytest.mark.parametrize("kept", [1, 2, 3, 4, 5, 6])
def test_fewer_fields_refused(kept: int) -> None:
    payload = "|".join(ACCEPT_1.split("|")[:kept]).encode()
    assert cccd_why(payload) == "field_count"


@pytest.mark.parametrize("added", [1, 2, 3, 5, 6, 20])
def test_more_fields_refused(added: int) -> None:
    # 8, 9, 10, 12, 13 and 27 fields: neither the 2016 nor the 2024 layout
    assert cccd_why(ACCEPT_1.encode() + b"|x" * added) == "field_count"


def test_field_count_examples() -> None:
    assert cccd_why(b"") == "field_count"
    assert cccd_why(b"074085003417") == "field_count"
    assert cccd_why(ACCEPT_1.encode() + b"|") == "field_count"  # 8 fields
    assert cccd_why(ACCEPT_1.encode() + b"|||||") == "field_count"  # 12 fields
    # 6 fields without a YYYY-MM-DD 3rd field: not a personal QR either.
    assert cccd_why(b"074085003417|280912345|Tr\xe1\xba\xa7n|14031985|Nam|x") == "field_count"


# --- strict UTF-8, Unicode digits, NFC ----------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        b"\xff",  # never valid
        b"\xc0\xaf",  # overlong "/"
        b"\xed\xa0\x80",  # a UTF-16 surrogate
        b"\xe1\xba",  # truncated sequence
        b"\xf4\x90\x80\x80",  # above U+10FFFF
    ],
)
def test_invalid_utf8_refused(bad: bytes) -> None:
    assert cccd_why(cccd().replace("Văn".encode(), b"V" + bad + b"n", 1)) == "not_utf8"
    assert pqr_why(pqr().replace(b"TRAN", b"TR" + bad, 1)) == "not_utf8"


def test_utf16_and_latin1_payloads_refused() -> None:
    assert cccd_why(ACCEPT_1.encode("utf-16")) == "not_utf8"
    assert cccd_why("074085003417||Lê|14031985|Nam|Ô|10052021".encode("latin-1")) == "not_utf8"


@pytest.mark.parametrize("digits", [arabic_indic, fullwidth])
def test_unicode_digits_refused_everywhere(digits: Callable[[str], str]) -> None:
    # str.isdigit() says True for all of these, int() would even read them.
    assert digits("074085003417").isdigit()
    assert cccd_why(cccd(id_number=digits("074085003417"))) == "id_digits"
    assert cccd_why(cccd(id_number="07408500341" + digits("7"))) == "id_digits"
    assert cccd_why(cccd(old_id=digits("280912345"))) == "old_id"
    assert cccd_why(cccd(birth=digits("14031985"))) == "birth_date"
    assert cccd_why(cccd(issue=digits("10052021"))) == "issue_date"
    assert pqr_why(pqr(id_number=digits("074085003417"))) == "id_digits"
    assert pqr_why(pqr(birth=digits("1985") + "-03-14")) == "birth_date"


def test_other_digit_lookalikes_refused() -> None:
    assert cccd_why(cccd(id_number="07408500341\u00b2")) == "id_digits"  # superscript two
    assert cccd_why(cccd(id_number="074085_03417")) == "id_digits"  # int() takes "1_0"
    assert cccd_why(cccd(id_number=" 74085003417")) == "id_digits"
    assert cccd_why(cccd(id_number="0740850034170")) == "id_digits"  # 13 digits
    assert cccd_why(cccd(id_number="")) == "id_digits"


def test_unicode_digit_message_names_the_character() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(cccd(id_number=arabic_indic("074085003417")))
    assert "ARABIC-INDIC DIGIT ZERO" in str(e.value)


@pytest.mark.parametrize("line", [ACCEPT_1, ACCEPT_2])
def test_nfd_input_accepted_and_normalised(line: str) -> None:
    nfd = unicodedata.normalize("NFD", line).encode("utf-8")
    assert nfd != line.encode("utf-8")  # the test really feeds decomposed text
    card = parse_cccd(nfd)
    assert card == parse_cccd(line.encode("utf-8"))
    assert unicodedata.is_normalized("NFC", card.name)
    assert unicodedata.is_normalized("NFC", card.address)


def test_nfd_sex_field_nu_is_female() -> None:
    nfd_nu = unicodedata.normalize("NFD", "Nữ")
    assert len(nfd_nu) == 4
    card = parse_cccd(cccd(id_number="074185003417", sex=nfd_nu))
    assert card.sex is Sex.FEMALE


# --- dates -------------------------------------------------------------------------------------


def test_future_birth_date_refused() -> None:
    assert cccd_why(ACCEPT_1.encode(), today=date(1985, 3, 13)) == "birth_date"
    born_2030 = cccd(id_number="074230003417", birth="01012030", issue="01012031")
    assert cccd_why(born_2030, today=date(2026, 1, 1)) == "birth_date"
    # without a trusted date the calendar rules still hold, only "future" cannot be told
    assert parse_cccd(born_2030).birth_date == date(2030, 1, 1)


def test_future_issue_date_refused() -> None:
    assert cccd_why(ACCEPT_1.encode(), today=date(2021, 5, 9)) == "issue_date"
    assert parse_cccd(ACCEPT_1.encode(), today=date(2021, 5, 10)).issue_date == date(2021, 5, 10)


def test_today_may_be_a_datetime() -> None:
    assert cccd_why(ACCEPT_1.encode(), today=datetime(2021, 5, 9, 23, 59)) == "issue_date"
    assert parse_cccd(ACCEPT_1.encode(), today=datetime(2022, 1, 1, 8)).sex is Sex.MALE


@pytest.mark.parametrize(
    "birth", ["29021985", "29021900", "31042000", "00011985", "14001985", "14131985", "1403198"]
)
def test_birth_date_not_a_real_date(birth: str) -> None:
    assert cccd_why(cccd(birth=birth)) == "birth_date"


def test_29_february_only_in_leap_years() -> None:
    # 2000 is a leap year (divisible by 400): G=2, YY=00
    card = parse_cccd(cccd(id_number="074200003417", birth="29022000"))
    assert card.birth_date == date(2000, 2, 29)
    assert cccd_why(cccd(issue="29022021")) == "issue_date"
    assert parse_cccd(cccd(issue="29022024")).issue_date == date(2024, 2, 29)


def test_issue_date_rules() -> None:
    assert cccd_why(cccd(issue="13031985")) == "issue_date"  # before the birth date
    assert parse_cccd(cccd(issue="14031985")).issue_date == date(1985, 3, 14)  # at birth: ok
    assert cccd_why(cccd(issue="2021-05-10")) == "issue_date"
    assert cccd_why(cccd(issue="")) == "issue_date"


def test_date_messages_do_not_quote_the_date() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(cccd(birth="29021985"))
    assert "1985" not in str(e.value) and "birth date" in str(e.value)


# --- the ID number's structure -----------------------------------------------------------------


def test_province_table_is_the_official_list() -> None:
    assert sorted(PROVINCES) == PROVINCE_CODES
    assert len(PROVINCES) == 63
    assert PROVINCES["001"] == "Hà Nội" and PROVINCES["096"] == "Cà Mau"
    assert PROVINCES["046"] == "Thừa Thiên Huế" and PROVINCES["079"] == "TP Hồ Chí Minh"
    assert all(unicodedata.is_normalized("NFC", n) for n in PROVINCES.values())


@pytest.mark.parametrize("code", PROVINCE_CODES)
def test_every_province_code_accepted(code: str) -> None:
    card = parse_cccd(cccd(id_number=code + "085003417"))
    assert card.province == PROVINCES[code]


@pytest.mark.parametrize("code", ["003", "000", "005", "050", "078", "090", "097", "099", "999"])
def test_province_gaps_refused(code: str) -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(cccd(id_number=code + "085003417"))
    assert e.value.why == "province"
    assert f"province code {code}" in str(e.value)


def test_century_digit_against_birth_date() -> None:
    assert cccd_why(cccd(id_number="074285003417")) == "century_mismatch"  # G=2: 2000s
    assert cccd_why(cccd(id_number="074485003417")) == "century_mismatch"  # G=4: 2100s
    # G=4/5 are the 2100s (Circular 07/2016/TT-BCA Art. 7), G=8/9 the 2300s
    born_2105 = cccd(id_number="074405003417", birth="01012105", issue="01012106")
    assert parse_cccd(born_2105).birth_date.year == 2105
    assert cccd_why(born_2105, today=date(2026, 1, 1)) == "birth_date"
    born_2301 = cccd(id_number="074901003417", birth="01012301", sex="Nữ", issue="01012302")
    assert parse_cccd(born_2301).sex is Sex.FEMALE
    assert cccd_why(cccd(birth="14031899", id_number="074099003417")) == "birth_date"


def test_year_digits_against_birth_year() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(cccd(id_number="074086003417"))
    assert e.value.why == "birth_year_mismatch"
    assert "86" in str(e.value) and "1985" in str(e.value)


def test_sex_field_against_g_digit() -> None:
    with pytest.raises(IdCardError) as e:
        parse_cccd(cccd(sex="Nữ"))  # G=0: male
    assert e.value.why == "sex_mismatch"
    assert str(e.value) == "G=0 means male, sex field says Nữ"
    female_2003 = ACCEPT_2.replace("|Nữ|", "|Nam|").encode()  # G=3: female
    assert cccd_why(female_2003) == "sex_mismatch"
    assert parse_cccd(cccd(id_number="074185003417", sex="Nữ")).sex is Sex.FEMALE


@pytest.mark.parametrize("sex", ["nam", "NAM", "Nu", "nữ", "Nữ ", "M", "", "0"])
def test_sex_field_must_be_nam_or_nu(sex: str) -> None:
    assert cccd_why(cccd(sex=sex)) == "sex"


@pytest.mark.parametrize("old_id", ["28091234", "2809123456", "28091234a", "280 91234", "-"])
def test_old_id_must_be_empty_or_9_digits(old_id: str) -> None:
    assert cccd_why(cccd(old_id=old_id)) == "old_id"


# --- name, address, extras ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "",
        " Trần Văn Bình",
        "Trần Văn Bình ",
        "Trần  Văn Bình",
        "Trần Văn B1nh",
        "Trần\u200bVăn",  # zero-width space
        "Trần\u202eVăn",  # right-to-left override
        "Trần <b>Văn</b>",
        "'Trần",
        "Trần\tVăn",
        "A" * 101,
    ],
)
def test_bad_names_refused(name: str) -> None:
    assert cccd_why(cccd(name=name)) == "name"


@pytest.mark.parametrize("name", ["H'Hen Niê", "Nguyễn Thị Minh-Khai", "Đỗ Ánh", "A" * 100])
def test_names_with_marks_accepted(name: str) -> None:
    assert parse_cccd(cccd(name=name)).name == name


@pytest.mark.parametrize(
    "address", ["", "   ", "Thuận An\x00", "Bình\u202eDương", "Dòng 1\u2028Dòng 2", "x" * 401]
)
def test_bad_addresses_refused(address: str) -> None:
    assert cccd_why(cccd(address=address)) == "address"


@pytest.mark.parametrize("value", ["a\x07b", "\u200d", "y" * 201])
def test_bad_extra_fields_refused(value: str) -> None:
    assert cccd_why(cccd(extra=("", "", value, ""))) == "extra_field"


def test_payload_size_cap() -> None:
    big = cccd(address="x" * 380, extra=("y" * 200,) * 4)
    assert len(big) <= MAX_PAYLOAD_BYTES
    assert parse_cccd(big).extra[0] == "y" * 200
    too_big = cccd(address="Ấp " * 600)
    assert len(too_big) > MAX_PAYLOAD_BYTES
    assert cccd_why(too_big) == "too_long"
    assert pqr_why(pqr(app1="1" * 4000)) == "too_long"
    assert looks_like_cccd(too_big)  # claimed, so the answer is "too_long", not "unknown"


def test_messages_never_quote_personal_data() -> None:
    payloads = [
        cccd(sex="Nữ"),
        cccd(id_number="074086003417"),
        cccd(birth="29021985"),
        cccd(issue="13031985"),
        cccd(address="Bình\u202eDương"),
        cccd(name="Trần Văn B1nh"),
        REJECT_G3_1993.encode(),
    ]
    for p in payloads:
        with pytest.raises(IdCardError) as e:
            parse_cccd(p)
        text = str(e.value)
        for secret in ("074085003417", "079303004521", "Trần", "Bình", "Thu Hà", "280912345"):
            assert secret not in text, (e.value.why, text)


def test_repr_hides_personal_data() -> None:
    card = parse_cccd(ACCEPT_1.encode())
    qr = parse_personal_qr(PERSONAL_QR.encode())
    for r in (repr(card), repr(qr)):
        assert "074085003417" not in r and "Bình" not in r and "BINH" not in r
        assert "1985" not in r and "Thuận An" not in r


# --- the personal QR ---------------------------------------------------------------------------


def test_personal_qr_example_accepted() -> None:
    qr = parse_personal_qr(PERSONAL_QR.encode("utf-8"), today=date(2021, 8, 1))
    assert qr == PersonalQr("074085003417", "TRAN VAN BINH", date(1985, 3, 14), Sex.MALE)
    assert parse_personal_qr(b"\xef\xbb\xbf" + PERSONAL_QR.encode() + b"\r\n") == qr


def test_personal_qr_with_old_9_digit_id() -> None:
    qr = parse_personal_qr(pqr(id_number="280912345"))
    assert qr.id_number == "280912345" and qr.sex is Sex.MALE
    # no structure to check on a 9-digit number: a female there is fine
    assert parse_personal_qr(pqr(id_number="280912345", sex="1")).sex is Sex.FEMALE


def test_personal_qr_female() -> None:
    qr = parse_personal_qr(pqr(id_number="074185003417", name="TRAN THI BINH", sex="1"))
    assert qr.sex is Sex.FEMALE and qr.name == "TRAN THI BINH"


@pytest.mark.parametrize(
    ("payload", "why"),
    [
        (PERSONAL_QR.encode() + b"|x", "field_count"),
        (PERSONAL_QR.rsplit("|", 1)[0].encode(), "field_count"),
        (ACCEPT_1.encode(), "field_count"),
        (pqr(id_number="07408500341"), "id_digits"),
        (pqr(id_number="0740850034"), "id_digits"),
        (pqr(id_number=fullwidth("074085003417")), "id_digits"),
        (pqr(id_number="003085003417"), "province"),
        (pqr(name=""), "name"),
        (pqr(name="TRAN  VAN BINH"), "name"),
        (pqr(name="TRAN VAN BINH 2"), "name"),
        (pqr(birth="14-03-1985"), "birth_date"),
        (pqr(birth="14031985"), "birth_date"),
        (pqr(birth="1985-3-14"), "birth_date"),
        (pqr(birth="1985-02-29"), "birth_date"),
        (pqr(birth="1985-13-01"), "birth_date"),
        (pqr(birth="1899-12-31", id_number="074099003417"), "birth_date"),
        (pqr(sex="2"), "sex"),
        (pqr(sex="M"), "sex"),
        (pqr(sex=""), "sex"),
        (pqr(app1="1600\x00"), "app_field"),
        (pqr(app2="é"), "app_field"),
        (pqr(app2="x" * 65), "app_field"),
        (pqr(id_number="074285003417"), "century_mismatch"),
        (pqr(id_number="074086003417"), "birth_year_mismatch"),
        (pqr(sex="1"), "sex_mismatch"),
    ],
)
def test_personal_qr_variants_refused(payload: bytes, why: str) -> None:
    assert pqr_why(payload) == why


def test_personal_qr_future_birth_date() -> None:
    assert pqr_why(PERSONAL_QR.encode(), today=date(1985, 3, 13)) == "birth_date"
    assert parse_personal_qr(PERSONAL_QR.encode(), today=date(1985, 3, 14)).sex is Sex.MALE


def test_personal_qr_app_fields_dropped() -> None:
    qr = parse_personal_qr(PERSONAL_QR.encode())
    assert "160000000000000001" not in repr(dataclasses.astuple(qr))
    assert [f.name for f in dataclasses.fields(qr)] == ["id_number", "name", "birth_date", "sex"]


# --- routing claims ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        ACCEPT_1.encode(),
        ACCEPT_2.encode(),
        ACCEPT_1_BOM_CRLF,
        ACCEPT_1.encode() + b"||||",
        REJECT_G3_1993.encode(),  # well shaped, so parse_cccd gives the precise reason
    ],
)
def test_looks_like_cccd(payload: bytes) -> None:
    assert looks_like_cccd(payload)
    assert not looks_like_personal_qr(payload)


@pytest.mark.parametrize(
    "payload",
    [
        PERSONAL_QR.encode(),
        b"\xef\xbb\xbf" + PERSONAL_QR.encode() + b"\r\n",
        pqr(id_number="280912345"),
        pqr(birth="1985-02-29"),  # the shape is right: parse_personal_qr says why not
    ],
)
def test_looks_like_personal_qr(payload: bytes) -> None:
    assert looks_like_personal_qr(payload)
    assert not looks_like_cccd(payload)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"|",
        b"QRG-BADGE:alice",
        b"QG1:6BFOXN*TS0BI$ZD4N9:9S6RCVN5+O30K3/XIV0W23NTDE",
        b"074085003417",
        b"074085003417|",
        REJECT_11_DIGITS.encode(),
        fullwidth(ACCEPT_1[:12]).encode() + ACCEPT_1[12:].encode(),
        arabic_indic(PERSONAL_QR[:12]).encode() + PERSONAL_QR[12:].encode(),
        b"0" + ACCEPT_1.encode(),
        ACCEPT_1.encode() + b"|",
        b"074085003417|280912345|Tr\xe1\xba\xa7n|14031985|Nam|x",  # 6 fields, no ISO date
        pqr(birth="14-03-1985"),
        pqr(id_number="0740850034"),
        b"\xb2\x55\xf6\x25\x1c\xf7\xa0\x51\x3d\x07",  # the binary field case B02
        b"\xef\xbb\xbf",
    ],
)
def test_neither_kind_claims_other_payloads(payload: bytes) -> None:
    assert not looks_like_cccd(payload)
    assert not looks_like_personal_qr(payload)


# --- what is kept about a person ---------------------------------------------------------------


def test_default_record_is_minimal() -> None:
    card = parse_cccd(ACCEPT_1.encode())
    record = person_of(card, HMAC, KEEP_DEFAULT)
    expected_subject = hmac.new(KEY, b"cccd-id:074085003417", hashlib.sha256).hexdigest()
    assert record == {
        "id_hmac": expected_subject,
        "name_masked": "Trần V** B**",
        "birth_year": 1985,
    }
    assert person_of(card, HMAC) == record  # keep defaults to KEEP_DEFAULT
    assert set(record) == KEEP_DEFAULT  # the dict's keys are the keep names
    for dropped in ("address", "old_id", "full_name", "birth_date", "issue_date", "sex"):
        assert dropped not in record
    flat = repr(record)
    for secret in ("074085003417", "280912345", "Trần Văn Bình", "Bình", "14031985", "1985-03-14"):
        assert secret not in flat
    assert "Thuận An" not in flat and "Bình Dương" not in flat


def test_subject_is_not_a_plain_hash_of_the_id() -> None:
    subject = person_of(parse_cccd(ACCEPT_1.encode()), HMAC)["id_hmac"]
    assert subject != hashlib.sha256(b"074085003417").hexdigest()
    assert subject != hmac.new(KEY, b"074085003417", hashlib.sha256).hexdigest()  # domain


def test_all_extras_kept_when_asked() -> None:
    record = person_of(parse_cccd(ACCEPT_2.encode()), HMAC, KEEP_ALLOWED)
    assert record["name_masked"] == "Lê T** T** H**"
    assert record["birth_year"] == 2003
    assert record["sex"] == "female"
    assert record["full_name"] == "Lê Thị Thu Hà"
    assert record["birth_date"] == "2003-09-02"
    assert record["issue_date"] == "2021-06-21"
    assert set(record) == KEEP_ALLOWED
    assert "address" not in record and "old_id" not in record


def test_keep_never_allows_address_or_old_id() -> None:
    assert frozenset({"id_hmac", "name_masked", "birth_year"}) == KEEP_DEFAULT
    assert KEEP_DEFAULT | {"sex", "full_name", "birth_date", "issue_date"} == KEEP_ALLOWED
    card = parse_cccd(ACCEPT_1.encode())
    for bad in ("address", "old_id", "id_number", "extra"):
        with pytest.raises(ValueError, match=bad):
            person_of(card, HMAC, frozenset({bad}))
        with pytest.raises(ConfigError) as e:
            parse_keep(["sex", bad], file="/etc/qrgate/reader.toml", key="checkin.keep")
        assert e.value.key == "checkin.keep" and bad in e.value.found
    assert parse_keep(["sex", "sex"], file="f", key="k") == frozenset({"sex"})


def test_a_site_may_keep_less_than_the_default() -> None:
    card = parse_cccd(ACCEPT_1.encode())
    assert person_of(card, HMAC, frozenset()) == {}
    only_subject = person_of(card, HMAC, frozenset({"id_hmac"}))
    assert only_subject == {
        "id_hmac": hmac.new(KEY, b"cccd-id:074085003417", hashlib.sha256).hexdigest()
    }
    assert person_of(card, HMAC, frozenset({"name_masked", "sex"})) == {
        "name_masked": "Trần V** B**",
        "sex": "male",
    }


def test_hmac_depends_on_the_key() -> None:
    card = parse_cccd(ACCEPT_1.encode())
    other = SubjectHasher(bytes(range(1, 33))).subject
    assert person_of(card, HMAC)["id_hmac"] != person_of(card, other)["id_hmac"]


def test_same_person_same_subject_whatever_else_the_card_says() -> None:
    base = person_of(parse_cccd(ACCEPT_1.encode()), HMAC)["id_hmac"]
    moved = parse_cccd(cccd(address="Phường 1, Quận 3, TP Hồ Chí Minh", issue="01072024"))
    renewed = parse_cccd(cccd(old_id="", extra=("", "", "", "")))
    assert person_of(moved, HMAC)["id_hmac"] == base
    assert person_of(renewed, HMAC)["id_hmac"] == base
    # the same 12-digit number on a personal QR is the same subject
    assert person_of(parse_personal_qr(PERSONAL_QR.encode()), HMAC)["id_hmac"] == base
    other = parse_cccd(cccd(id_number="074085003418"))
    assert person_of(other, HMAC)["id_hmac"] != base


def test_personal_qr_record() -> None:
    qr = parse_personal_qr(PERSONAL_QR.encode())
    assert person_of(qr, HMAC) == {
        "id_hmac": hmac.new(KEY, b"cccd-id:074085003417", hashlib.sha256).hexdigest(),
        "name_masked": "TRAN V** B**",
        "birth_year": 1985,
    }
    everything = person_of(qr, HMAC, KEEP_ALLOWED)
    assert everything["birth_date"] == "1985-03-14" and everything["sex"] == "male"
    assert "issue_date" not in everything  # a personal QR has none
    old = parse_personal_qr(pqr(id_number="280912345"))
    assert person_of(old, HMAC)["id_hmac"] == (
        hmac.new(KEY, b"cmnd-id:280912345", hashlib.sha256).hexdigest()
    )


def test_person_record_is_frozen() -> None:
    person = person_record(parse_cccd(ACCEPT_1.encode()), HMAC, frozenset({"sex"}))
    assert person == Person(sex="male")  # only what keep names
    with pytest.raises(dataclasses.FrozenInstanceError):
        person.full_name = "Trần Văn Bình"  # type: ignore[misc]
    card = parse_cccd(ACCEPT_1.encode())
    assert isinstance(card, IdCard)
    with pytest.raises(dataclasses.FrozenInstanceError):
        card.name = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("name", "masked"),
    [
        ("Trần Văn Bình", "Trần V** B**"),
        ("Lê Thị Thu Hà", "Lê T** T** H**"),
        ("Bình", "B**"),
        ("Nguyễn Đức Ánh", "Nguyễn Đ** Á**"),
        ("H'Hen Niê", "H'Hen N**"),
        ("Vàng A X\u030cang", "Vàng A** X\u030c**"),  # X + caron has no precomposed form
    ],
)
def test_mask_name(name: str, masked: str) -> None:
    assert mask_name(name) == masked
    assert mask_name(unicodedata.normalize("NFD", name)) == masked  # letters taken whole
    given = name.rsplit(maxsplit=1)[-1]
    if len(name.split()) > 1 or len(given) > 1:
        assert given not in masked.split()


# --- fuzzing -----------------------------------------------------------------------------------

VALID_FIELDS = [
    "074085003417",
    "079303004521",
    "280912345",
    "",
    "Trần Văn Bình",
    "TRAN VAN BINH",
    "14031985",
    "29021985",
    "1985-03-14",
    "Nam",
    "Nữ",
    "0",
    "1",
    ADDRESS_1,
    "10052021",
    "160000000000000001",
    "<1<<0900000000",
]
field_st = st.one_of(st.sampled_from(VALID_FIELDS), st.text(max_size=24))


def _only_id_card_errors(payload: bytes) -> None:
    for parse, claims in (
        (parse_cccd, looks_like_cccd),
        (parse_personal_qr, looks_like_personal_qr),
    ):
        claimed = claims(payload)
        assert isinstance(claimed, bool)
        try:
            parse(payload, today=date(2026, 1, 1))
        except IdCardError as e:
            assert e.reason == Reason.INVALID_ID_CARD and e.why in WHYS
        else:
            assert claimed  # a claim never misses a payload its parser accepts


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(payload: bytes) -> None:
    _only_id_card_errors(payload)
    _only_id_card_errors(b"\xef\xbb\xbf" + payload)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(field_st, max_size=13),
    st.sampled_from([b"", b"\xef\xbb\xbf"]),
    st.sampled_from([b"", b"\r\n"]),
)
def test_fuzz_pipe_joined_fields(fields: list[str], bom: bytes, eol: bytes) -> None:
    _only_id_card_errors(bom + "|".join(fields).encode("utf-8") + eol)


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_real_cards(data: st.DataObject) -> None:
    base = bytearray(data.draw(st.sampled_from([ACCEPT_1_BOM_CRLF, PERSONAL_QR.encode()])))
    for _ in range(data.draw(st.integers(1, 4))):
        i = data.draw(st.integers(0, len(base)))
        op = data.draw(st.sampled_from(["set", "insert", "delete"]))
        b = data.draw(st.integers(0, 255))
        if op == "insert" or i == len(base):
            base.insert(i, b)
        elif op == "set":
            base[i] = b
        else:
            del base[i]
    _only_id_card_errors(bytes(base))


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_generated_cards_round_trip(data: st.DataObject) -> None:
    province = data.draw(st.sampled_from(PROVINCE_CODES))
    birth = data.draw(st.dates(date(1900, 1, 1), date(2025, 12, 31)))
    sex = data.draw(st.sampled_from([Sex.MALE, Sex.FEMALE]))
    serial = data.draw(st.text("0123456789", min_size=6, max_size=6))
    words = data.draw(
        st.lists(
            st.sampled_from(["Nguyễn", "Thị", "Văn", "Ánh", "Đức", "Hà", "Bảo"]),
            min_size=1,
            max_size=5,
        )
    )
    issued_after = data.draw(st.integers(0, 3650))
    g = 2 * ((birth.year - 1900) // 100) + (1 if sex is Sex.FEMALE else 0)
    id_number = f"{province}{g}{birth.year % 100:02d}{serial}"
    issue = date.fromordinal(min(birth.toordinal() + issued_after, date(2025, 12, 31).toordinal()))
    name = " ".join(words)
    payload = cccd(
        id_number=id_number,
        name=name,
        birth=birth.strftime("%d%m%Y"),
        sex="Nam" if sex is Sex.MALE else "Nữ",
        issue=issue.strftime("%d%m%Y"),
    )
    assert looks_like_cccd(payload) and not looks_like_personal_qr(payload)
    card = parse_cccd(payload, today=date(2026, 1, 1))
    assert (card.id_number, card.name, card.birth_date, card.sex, card.issue_date) == (
        id_number,
        name,
        birth,
        sex,
        issue,
    )
    masked = mask_name(name).split()
    assert all(w.endswith("**") and len(w) == 3 for w in masked[1:])
    qr = pqr(id_number=id_number, name=name, birth=birth.isoformat(), sex=str(g % 2))
    assert looks_like_personal_qr(qr) and not looks_like_cccd(qr)
    assert parse_personal_qr(qr).id_number == id_number
