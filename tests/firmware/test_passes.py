"""Signed passes (QG1) and rotating codes (QGR1): issue, read, refuse; real keys and
signatures; python-cwt as an independent COSE implementation; hypothesis fuzzing."""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import base45
import cbor2
import cwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.exceptions import PassError
from firmware.policy import cose, passes
from firmware.policy.cose import PrivateKey
from firmware.policy.keys import generate_key, public_key_pem
from firmware.policy.passes import (
    PASS_PREFIX,
    ROTATING_PREFIX,
    PassClaims,
    ReplayCache,
    VerifiedCache,
    check_step,
    check_time,
    issue_pass,
    read_pass,
    read_rotating,
    rotating_code,
    step_of,
    unwrap_pass,
)
from firmware.policy.trust import IssuerKey, TrustList
from firmware.policy.verdict import Reason

ED = Ed25519PrivateKey.generate()
KEYS: dict[str, PrivateKey] = {"EdDSA": ED, "ES256": generate_key("ES256")}
ALGS = sorted(KEYS)
HOLDER = Ed25519PrivateKey.generate()
HOLDER_RAW = HOLDER.public_key().public_bytes_raw()
IAT = 1_800_000_000
EXP = IAT + 86_400
TRUST = TrustList.of(IssuerKey.of(k.public_key(), iss="acme") for k in KEYS.values())
QR_ALNUM = re.compile(rb"[0-9A-Z $%*+\-./:]*")

CLAIMS = PassClaims(
    iss="acme",
    sub="alice@example.com",
    exp=EXP,
    nbf=IAT - 60,
    iat=IAT,
    cti=bytes.fromhex("00112233445566778899aabbccddeeff"),
    doors=("front", "lab-2"),
    zones=("hq",),
    schedule="office-hours",
)
ROTATING = replace(CLAIMS, cti=b"rotating-pass-01", holder_key=HOLDER_RAW, period_s=30)
MINIMAL = {1: "acme", 2: "bob", 4: EXP, 6: IAT, 7: b"cti-1"}


def kid(key: PrivateKey = ED) -> bytes:
    return cose.kid_of(key.public_key())


def b45(data: bytes) -> bytes:
    text: bytes = base45.b45encode(data)
    return text


def unb45(text: bytes) -> bytes:
    data: bytes = base45.b45decode(text)
    return data


def qr(cose_bytes: bytes) -> bytes:
    return PASS_PREFIX + b45(cose_bytes)


def signed(claims: Any, key: PrivateKey = ED, key_id: bytes | None = None) -> bytes:
    """QG1 text of any payload (a claims map, or raw bytes) properly signed by ``key``."""
    payload = claims if isinstance(claims, bytes) else cbor2.dumps(claims)
    return qr(cose.sign1(payload, key, key_id or kid(key)))


def body_of(text: bytes) -> bytes:
    return unb45(text[len(PASS_PREFIX) :])


def refusal(call: Callable[[], object]) -> tuple[str, str]:
    with pytest.raises(PassError) as e:
        call()
    return e.value.reason, e.value.why


def refused(text: bytes, trust: TrustList = TRUST) -> tuple[str, str]:
    return refusal(lambda: read_pass(text, trust))


# --- round trips ------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("compress", [True, False])
def test_pass_round_trip(alg: str, compress: bool) -> None:
    text = issue_pass(CLAIMS, KEYS[alg], compress=compress)
    assert text.startswith(b"QG1:") and QR_ALNUM.fullmatch(text)
    vp = read_pass(text, TRUST)
    assert vp.claims == CLAIMS
    assert (vp.kid, vp.alg) == (kid(KEYS[alg]), alg)
    assert vp.cose == unwrap_pass(text) and vp.cose[0] == 0xD2
    assert not vp.claims.rotating


def test_compressed_only_when_shorter() -> None:
    # Ed25519 signatures are deterministic: both texts carry the same COSE bytes
    small = issue_pass(CLAIMS, ED, compress=True)
    assert small == issue_pass(CLAIMS, ED, compress=False)
    assert body_of(small)[0] == 0xD2
    big = replace(CLAIMS, doors=tuple(f"building-a-floor-{i:02d}" for i in range(40)))
    packed, plain = issue_pass(big, ED), issue_pass(big, ED, compress=False)
    assert body_of(packed)[0] == 0x78 and body_of(plain)[0] == 0xD2
    assert len(packed) < len(plain)
    assert zlib.decompress(body_of(packed)) == body_of(plain)
    assert read_pass(packed, TRUST).claims == read_pass(plain, TRUST).claims == big


def test_minimal_pass_defaults() -> None:
    c = read_pass(signed(MINIMAL), TRUST).claims
    assert c == PassClaims("acme", "bob", EXP, None, IAT, b"cti-1")
    assert (c.doors, c.zones, c.schedule, c.holder_key, c.period_s) == (None, None, None, None, 10)


def test_empty_door_list_is_kept_apart_from_absent() -> None:
    c = replace(CLAIMS, doors=(), zones=None)
    assert read_pass(issue_pass(c, ED), TRUST).claims == c


def test_unknown_claims_are_ignored() -> None:
    text = signed({**MINIMAL, 3: "aud", "note": [1, {2: b"x"}], -70000: 1.5})
    assert read_pass(text, TRUST).claims.sub == "bob"


@settings(max_examples=100, deadline=None)
@given(
    st.text(min_size=1, max_size=64),
    st.lists(st.text(min_size=1, max_size=20), max_size=8).map(tuple),
    st.integers(0, 2**53 - 1),
    st.binary(min_size=1, max_size=32),
)
def test_issued_text_is_qr_alphanumeric(
    sub: str, doors: tuple[str, ...], exp: int, cti: bytes
) -> None:
    c = replace(CLAIMS, sub=sub, doors=doors, exp=exp, cti=cti)
    text = issue_pass(c, ED)
    assert QR_ALNUM.fullmatch(text)
    assert read_pass(text, TRUST).claims == c
    code = rotating_code(unwrap_pass(text), HOLDER, exp // 10, doors[0] if doors else None)
    assert QR_ALNUM.fullmatch(code)


def test_issue_pass_refuses_what_would_not_read_back() -> None:
    for bad in (
        replace(CLAIMS, iss=""),
        replace(CLAIMS, sub="x" * 257),
        replace(CLAIMS, exp=-1),
        replace(CLAIMS, cti=b""),
        replace(CLAIMS, doors=("",)),
        replace(CLAIMS, doors=tuple("d" for _ in range(65))),
        replace(CLAIMS, doors=["front"]),  # type: ignore[arg-type]
        replace(CLAIMS, holder_key=bytes(31)),
        replace(CLAIMS, period_s=0),
        replace(CLAIMS, nbf=True),  # bool is not an int here
        replace(CLAIMS, schedule=object()),  # type: ignore[arg-type]
    ):
        with pytest.raises(ValueError, match="cannot issue"):
            issue_pass(bad, ED)
    huge = replace(CLAIMS, doors=tuple(f"{i:03d}" + "x" * 200 for i in range(64)))
    with pytest.raises(ValueError, match="bytes of QR text"):
        issue_pass(huge, ED, compress=False)


# --- the issuer -------------------------------------------------------------------------------


def test_unknown_kid() -> None:
    other = generate_key("EdDSA")
    assert refused(issue_pass(CLAIMS, other)) == (Reason.UNKNOWN_ISSUER, "unknown_kid")
    assert refused(issue_pass(CLAIMS, ED), TrustList.empty()) == (
        Reason.UNKNOWN_ISSUER,
        "unknown_kid",
    )


@pytest.mark.parametrize("alg", ALGS)
def test_other_key_with_the_trusted_kid_is_bad_signature(alg: str) -> None:
    text = issue_pass(CLAIMS, generate_key(alg), kid(KEYS[alg]))
    assert refused(text) == (Reason.BAD_SIGNATURE, "signature")


def test_kid_confusion_es256_header_with_eddsa_kid() -> None:
    text = issue_pass(CLAIMS, KEYS["ES256"], kid(KEYS["EdDSA"]))
    assert refused(text) == (Reason.BAD_SIGNATURE, "alg_mismatch")
    text = issue_pass(CLAIMS, KEYS["EdDSA"], kid(KEYS["ES256"]))
    assert refused(text) == (Reason.BAD_SIGNATURE, "alg_mismatch")


@pytest.mark.parametrize("alg", ALGS)
def test_forged_payload_or_signature(alg: str) -> None:
    s = cose.parse_sign1(unwrap_pass(issue_pass(CLAIMS, KEYS[alg])))
    payload = cbor2.loads(s.payload)
    payload[-65537] = ["*"]  # every door
    for p, sig in (
        (cbor2.dumps(payload), s.signature),
        (s.payload, s.signature[:10] + bytes([s.signature[10] ^ 1]) + s.signature[11:]),
        (s.payload, bytes(64)),
    ):
        forged = cbor2.dumps(cbor2.CBORTag(18, [s.protected, {}, p, sig]))
        assert refused(qr(forged)) == (Reason.BAD_SIGNATURE, "signature")
        assert refused(qr(zlib.compress(forged))) == (Reason.BAD_SIGNATURE, "signature")


@pytest.mark.parametrize(
    ("header", "why"),
    [
        ({1: "none", 4: kid()}, "alg"),
        ({1: "EdDSA", 4: kid()}, "alg"),
        ({4: kid()}, "alg"),
        ({1: -8}, "kid"),
        ({1: -8, 4: kid(), 2: [1]}, "crit"),
    ],
)
def test_header_refusals(header: dict[int, Any], why: str) -> None:
    protected = cbor2.dumps(header)
    payload = cbor2.dumps(MINIMAL)
    sig = ED.sign(cose.sig_structure(protected, payload))
    text = qr(cbor2.dumps(cbor2.CBORTag(18, [protected, {}, payload, sig])))
    assert refused(text) == (Reason.MALFORMED, why)


def test_iss_must_match_the_keys_issuer() -> None:
    assert refused(issue_pass(replace(CLAIMS, iss="evil"), ED)) == (
        Reason.UNKNOWN_ISSUER,
        "iss_mismatch",
    )
    # a key entry without iss accepts any issuer name
    open_trust = TrustList.of([IssuerKey.of(ED.public_key())])
    assert read_pass(issue_pass(replace(CLAIMS, iss="evil"), ED), open_trust).claims.iss == "evil"


def test_iat_must_lie_in_the_keys_validity() -> None:
    windowed = TrustList.of([IssuerKey.of(ED.public_key(), "acme", IAT - 100, IAT + 100)])
    for iat, ok in ((IAT - 101, False), (IAT - 100, True), (IAT + 100, True), (IAT + 101, False)):
        text = issue_pass(replace(CLAIMS, iat=iat), ED)
        if ok:
            assert read_pass(text, windowed).claims.iat == iat
        else:
            assert refused(text, windowed) == (Reason.UNKNOWN_ISSUER, "key_validity")


def test_a_forgery_is_a_bad_signature_before_any_claim_rule() -> None:
    # claims that break the iss and validity rules, under a signature that does not verify
    text = issue_pass(replace(CLAIMS, iss="evil", iat=0), generate_key("EdDSA"), kid())
    assert refused(text) == (Reason.BAD_SIGNATURE, "signature")


# --- framing ----------------------------------------------------------------------------------


def test_framing_refusals() -> None:
    text = issue_pass(CLAIMS, ED, compress=False)
    body = body_of(text)
    cases = {
        b"QG2:" + text[4:]: "prefix",
        text[4:]: "prefix",
        text + b"0" * 4096: "too_large",
        text[:-1] if len(text[4:]) % 3 == 2 else text[:-2]: "base45",  # a lone last char
        text.lower(): "prefix",
        PASS_PREFIX + text[4:].lower(): "base45",
        PASS_PREFIX + b"GGW": "base45",  # 65535 < value
        PASS_PREFIX: "cose_tag",
        qr(b"\x84" + body[1:]): "cose_tag",
        qr(body[:-2]): "cbor",  # truncated
        qr(body + b"\x00"): "cbor",  # trailing byte
        qr(b"\x78\x9c" + b"\x00" * 10): "zlib",
        qr(zlib.compress(body)[:-3]): "zlib",  # truncated stream
        qr(zlib.compress(body) + b"\x00"): "zlib",  # bytes after the stream
        qr(zlib.compress(b"\x00" + body)): "cose_tag",
    }
    for bad, why in cases.items():
        assert refused(bad) == (Reason.MALFORMED, why), bad[:40]


def test_zlib_bomb_is_capped() -> None:
    bomb = zlib.compress(b"\xd2" + b"\x00" * 2_500_000, 9)
    text = qr(bomb)
    assert len(text) < 4096  # fits a QR code; 2.5 MB once inflated
    assert refused(text) == (Reason.MALFORMED, "too_large")
    # exactly at the cap is still read (and then fails as CBOR, not as size)
    assert refused(qr(zlib.compress(b"\xd2" + b"\x00" * 4095))) == (Reason.MALFORMED, "cbor")


def test_huge_payload_over_the_qr_cap() -> None:
    text = signed({**MINIMAL, 99: b"x" * 3000})
    assert len(text) > 4096
    assert refused(text) == (Reason.MALFORMED, "too_large")
    # the same bulk of unknown claims within the cap is fine
    assert read_pass(signed({**MINIMAL, 99: b"x" * 2000}), TRUST).claims.sub == "bob"
    # many small items are capped too (cose.MAX_ITEMS), after the signature checked out
    text = signed({**MINIMAL, 99: [0] * 600})
    assert len(text) < 4096
    assert refused(text) == (Reason.MALFORMED, "claims")


def test_nested_tags_are_refused() -> None:
    for claims in (
        {**MINIMAL, 4: cbor2.CBORTag(1, EXP)},
        {**MINIMAL, 99: cbor2.CBORTag(36, "Subject: x\n\nbody")},
        {**MINIMAL, 99: cbor2.CBORTag(28, [cbor2.CBORTag(29, 0)])},
    ):
        assert refused(signed(claims)) == (Reason.MALFORMED, "claims")
    tagged_payload = cbor2.dumps(cbor2.CBORTag(24, cbor2.dumps(MINIMAL)))
    assert refused(signed(tagged_payload)) == (Reason.MALFORMED, "claims")
    inner = unwrap_pass(signed(MINIMAL))
    assert refused(qr(cbor2.dumps(cbor2.CBORTag(55799, cbor2.loads(inner))))) == (
        Reason.MALFORMED,
        "cose_tag",
    )


# --- claims -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["iss", "sub", "exp", "iat", "cti"])
def test_missing_required_claim(name: str) -> None:
    label = {"iss": 1, "sub": 2, "exp": 4, "iat": 6, "cti": 7}[name]
    claims = {k: v for k, v in MINIMAL.items() if k != label}
    assert refused(signed(claims)) == (Reason.MALFORMED, f"missing_{name}")


WRONG_TYPES = [
    (1, 5, "iss"),
    (1, b"acme", "iss"),
    (1, "", "iss"),
    (1, "a" * 257, "iss"),
    (1, ["acme"], "iss"),
    (2, None, "sub"),
    (2, 7, "sub"),
    (4, "2030-01-01", "exp"),
    (4, True, "exp"),
    (4, 1.8e9, "exp"),
    (4, -1, "exp"),
    (4, 2**53, "exp"),
    (5, "x", "nbf"),
    (5, None, "nbf"),
    (5, False, "nbf"),
    (6, b"\x00", "iat"),
    (6, 1.5, "iat"),
    (7, "cti-1", "cti"),
    (7, b"", "cti"),
    (7, bytes(33), "cti"),
    (7, [1], "cti"),
    (8, HOLDER_RAW, "cnf"),
    (8, {}, "cnf"),
    (8, {3: b"kid"}, "cnf"),
    (8, {1: {1: 1, -1: 6, -2: HOLDER_RAW}, 3: b"kid"}, "cnf"),
    (8, {1: {1: 1, -1: 4, -2: HOLDER_RAW}}, "cnf"),
    (8, {1: {1: 1, -1: 6, -2: HOLDER_RAW[:31]}}, "cnf"),
    (8, {1: {1: 1, -1: 6, -2: HOLDER_RAW, -4: bytes(32)}}, "cnf"),
    (-65537, "front", "doors"),
    (-65537, [1], "doors"),
    (-65537, [""], "doors"),
    (-65537, ["a" * 257], "doors"),
    (-65537, ["d"] * 65, "doors"),
    (-65537, {"front": 1}, "doors"),
    (-65537, None, "doors"),
    (-65538, [b"hq"], "zones"),
    (-65538, "hq", "zones"),
    (-65538, ["z"] * 65, "zones"),
    (-65539, 7, "schedule"),
    (-65539, ["office"], "schedule"),
    (-65539, "", "schedule"),
    (-65540, 0, "period_s"),
    (-65540, 301, "period_s"),
    (-65540, -10, "period_s"),
    (-65540, True, "period_s"),
    (-65540, 10.0, "period_s"),
    (-65540, "10", "period_s"),
]


@pytest.mark.parametrize(("label", "value", "name"), WRONG_TYPES)
def test_wrong_claim_type(label: int, value: Any, name: str) -> None:
    assert refused(signed({**MINIMAL, label: value})) == (Reason.MALFORMED, f"claim_{name}")


def test_bignum_time_is_a_tag() -> None:
    # cbor2 writes 2**64 as a tag 2 bignum: refused with every other tag
    assert refused(signed({**MINIMAL, 4: 2**64})) == (Reason.MALFORMED, "claims")


@pytest.mark.parametrize("payload", [cbor2.dumps([1, 2]), cbor2.dumps("claims"), b"", b"\xa1"])
def test_payload_must_be_a_claims_map(payload: bytes) -> None:
    assert refused(signed(payload)) == (Reason.MALFORMED, "claims")


def test_claim_limits_are_inclusive() -> None:
    c = read_pass(
        signed(
            {
                **MINIMAL,
                1: "a" * 256,
                7: bytes(32),
                4: 2**53 - 1,
                -65537: ["d"] * 64,
                -65540: 300,
            }
        ),
        TrustList.of([IssuerKey.of(ED.public_key())]),
    ).claims
    assert (len(c.iss), len(c.cti), c.exp, len(c.doors or ()), c.period_s) == (
        256,
        32,
        2**53 - 1,
        64,
        300,
    )


# --- time -------------------------------------------------------------------------------------


def test_check_time() -> None:
    c = replace(CLAIMS, nbf=1000, exp=2000)
    assert check_time(c, 1500) is None
    assert check_time(c, 2059.9) is None
    assert check_time(c, 2060) is Reason.EXPIRED
    assert check_time(c, 2000, leeway_s=0) is Reason.EXPIRED
    assert check_time(c, 1999.9, leeway_s=0) is None
    assert check_time(c, 940) is None
    assert check_time(c, 939.9) is Reason.NOT_YET_VALID
    assert check_time(c, 999, leeway_s=0) is Reason.NOT_YET_VALID
    assert check_time(replace(c, nbf=None), 0) is None


def test_step_of_and_check_step() -> None:
    assert step_of(1_800_000_009.99, 10) == 180_000_000
    assert step_of(1_800_000_010, 10) == 180_000_001
    assert step_of(59.9, 30) == 1
    now = 1_800_000_015.0
    assert [check_step(s, now, 10) for s in (179_999_999, 180_000_000, 180_000_002)] == [
        Reason.STALE_CODE,
        None,
        None,
    ]
    assert check_step(180_000_003, now, 10) is Reason.STALE_CODE
    assert check_step(180_000_003, now, 10, skew=2) is None


# --- rotating codes ---------------------------------------------------------------------------


def rotating_pass(key: PrivateKey = ED, claims: PassClaims = ROTATING) -> bytes:
    return unwrap_pass(issue_pass(claims, key))


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("door", ["front", None])
def test_rotating_round_trip(alg: str, door: str | None) -> None:
    pc = rotating_pass(KEYS[alg])
    step = step_of(IAT + 3600, ROTATING.period_s)
    code = rotating_code(pc, HOLDER, step, door)
    assert code.startswith(b"QGR1:") and QR_ALNUM.fullmatch(code)
    vr = read_rotating(code, TRUST, VerifiedCache())
    assert (vr.step, vr.door) == (step, door)
    assert vr.pass_.claims == ROTATING and vr.pass_.cose == pc and vr.pass_.alg == alg
    assert vr.pass_.claims.rotating


def test_rotating_pass_shown_static_is_stale() -> None:
    text = issue_pass(ROTATING, ED)
    assert refused(text) == (Reason.STALE_CODE, "rotating_pass_shown_static")
    assert read_pass(text, TRUST, allow_rotating=True).claims == ROTATING


def envelope(code: bytes) -> list[Any]:
    return list(cbor2.loads(unb45(code[len(ROTATING_PREFIX) :])))


def pack(env: list[Any]) -> bytes:
    return ROTATING_PREFIX + b45(cbor2.dumps(env))


def read_code(code: bytes, trust: TrustList = TRUST) -> tuple[str, str]:
    return refusal(lambda: read_rotating(code, trust, VerifiedCache()))


def test_holder_signature_binds_step_door_and_pass() -> None:
    pc = rotating_pass()
    env = envelope(rotating_code(pc, HOLDER, 100, "front"))
    bad_sig = (Reason.BAD_SIGNATURE, "holder_signature")
    assert read_code(pack([pc, 101, "front", env[3]])) == bad_sig  # another step
    assert read_code(pack([pc, 100, "back", env[3]])) == bad_sig  # another door
    assert read_code(pack([pc, 100, None, env[3]])) == bad_sig  # door taken out
    # splicing: the signature made for this pass put on another pass of the same holder
    other = rotating_pass(claims=replace(ROTATING, cti=b"another-pass", doors=("*",)))
    assert read_code(pack([other, 100, "front", env[3]])) == bad_sig
    # a valid code from another holder key than the pass's cnf
    assert read_code(rotating_code(pc, Ed25519PrivateKey.generate(), 100, "front")) == bad_sig
    # untouched it reads
    assert read_rotating(pack(env), TRUST, VerifiedCache()).step == 100


def test_rotating_code_over_a_static_pass() -> None:
    code = rotating_code(unwrap_pass(issue_pass(CLAIMS, ED)), HOLDER, 1, None)
    assert read_code(code) == (Reason.MALFORMED, "not_rotating")


def test_rotating_envelope_refusals() -> None:
    pc = rotating_pass()
    env = envelope(rotating_code(pc, HOLDER, 100, "front"))
    good = pack(env)
    cases = {
        PASS_PREFIX + good[5:]: "prefix",
        ROTATING_PREFIX + base45.b45encode(cbor2.dumps(env)[:-2]): "rotating",
        good + b"0" * 4096: "too_large",
        good[:-1] if len(good[5:]) % 3 == 2 else good[:-2]: "base45",
        pack(env[:3]): "rotating",
        pack([*env, 1]): "rotating",
        ROTATING_PREFIX + base45.b45encode(cbor2.dumps(tuple(env)) + b"\x00"): "rotating",
        pack([pc.hex(), 100, "front", env[3]]): "rotating",
        pack([pc, -1, "front", env[3]]): "step",
        pack([pc, True, "front", env[3]]): "step",
        pack([pc, 2**53, "front", env[3]]): "step",
        pack([pc, "100", "front", env[3]]): "step",
        pack([pc, 100, "", env[3]]): "door",
        pack([pc, 100, "d" * 257, env[3]]): "door",
        pack([pc, 100, b"front", env[3]]): "door",
        pack([pc, 100, "front", env[3][:63]]): "holder_signature",
        pack([pc, 100, "front", None]): "holder_signature",
        pack([zlib.compress(pc), 100, "front", env[3]]): "cbor",
        pack([b"", 100, "front", env[3]]): "cbor",
    }
    for bad, why in cases.items():
        assert read_code(bad) == (Reason.MALFORMED, why), bad[:40]


def test_rotating_inner_pass_is_verified() -> None:
    forged = rotating_pass(generate_key("EdDSA"))
    assert read_code(rotating_code(forged, HOLDER, 5, None)) == (
        Reason.UNKNOWN_ISSUER,
        "unknown_kid",
    )
    forged = unwrap_pass(issue_pass(ROTATING, generate_key("EdDSA"), kid()))
    cache = VerifiedCache()
    code = rotating_code(forged, HOLDER, 5, None)
    for _ in range(2):
        assert refusal(lambda: read_rotating(code, TRUST, cache)) == (
            Reason.BAD_SIGNATURE,
            "signature",
        )
    assert len(cache) == 0  # a failure is never cached


def test_issuer_signature_checked_once_per_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[bytes] = []
    real_verify = cose.verify

    def counting(s: cose.Sign1, key: cose.PublicKey, alg: int) -> None:
        calls.append(s.kid)
        real_verify(s, key, alg)

    monkeypatch.setattr(passes, "verify", counting)
    pc, cache = rotating_pass(), VerifiedCache()
    for step in range(100, 105):
        assert read_rotating(rotating_code(pc, HOLDER, step, "front"), TRUST, cache).step == step
    assert calls == [kid()] and len(cache) == 1
    # a new trust list object (a new credential set) verifies again
    trust2 = TrustList.of(TRUST.values())
    read_rotating(rotating_code(pc, HOLDER, 105, "front"), trust2, cache)
    assert len(calls) == 2
    # and a key removed from the trust list is not served from the cache
    code = rotating_code(pc, HOLDER, 106, "front")
    without = TrustList.of(k for k in TRUST.values() if k.kid != kid())
    assert refusal(lambda: read_rotating(code, without, cache)) == (
        Reason.UNKNOWN_ISSUER,
        "unknown_kid",
    )
    # a bad holder signature is refused even when the pass is cached
    env = envelope(code)
    assert refusal(lambda: read_rotating(pack([pc, 107, "front", env[3]]), trust2, cache)) == (
        Reason.BAD_SIGNATURE,
        "holder_signature",
    )


def test_verified_cache_is_bounded_lru() -> None:
    cache = VerifiedCache(capacity=2)
    pcs = [rotating_pass(claims=replace(ROTATING, cti=bytes([i]) * 4)) for i in range(3)]
    for pc in pcs:
        read_rotating(rotating_code(pc, HOLDER, 1, None), TRUST, cache)
    assert len(cache) == 2
    cache.clear()
    assert len(cache) == 0
    with pytest.raises(ValueError):
        VerifiedCache(0)


def test_rotating_code_refuses_bad_arguments() -> None:
    pc = rotating_pass()
    for step, door in ((-1, None), (True, None), (1, ""), (1, "d" * 257)):
        with pytest.raises(ValueError):
            rotating_code(pc, HOLDER, step, door)


def test_replay_cache() -> None:
    r = ReplayCache(capacity=3)
    assert not r.seen(b"a", 1)
    r.add(b"a", 1)
    assert r.seen(b"a", 1) and not r.seen(b"a", 2) and not r.seen(b"b", 1)
    r.add(b"a", 2)
    r.add(b"b", 1)
    r.add(b"a", 1)  # refreshed: now the newest
    r.add(b"c", 1)  # evicts the oldest, (a, 2)
    assert len(r) == 3
    assert [r.seen(*k) for k in ((b"a", 1), (b"a", 2), (b"b", 1), (b"c", 1))] == [
        True,
        False,
        True,
        True,
    ]
    with pytest.raises(ValueError):
        ReplayCache(0)


# --- interoperability with python-cwt ---------------------------------------------------------


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("alg", ALGS)
def test_cwt_verifies_our_pass(alg: str) -> None:
    key = KEYS[alg]
    vp = read_pass(issue_pass(ROTATING, key), TRUST, allow_rotating=True)
    pub = cwt.COSEKey.from_pem(public_key_pem(key), kid=kid(key))
    # python-cwt's COSE layer only: its CWT layer would apply its own clock to exp
    payload = cwt.COSE.new(verify_kid=True).decode(vp.cose, pub)
    claims = cbor2.loads(payload)
    assert claims[1] == "acme" and claims[7] == ROTATING.cti and claims[-65540] == 30
    assert claims[8] == {1: {1: 1, -1: 6, -2: HOLDER_RAW}}
    holder = cwt.COSEKey.new(claims[8][1])  # the cnf is a COSE_Key python-cwt accepts
    assert holder.to_dict()[-2] == HOLDER_RAW


@pytest.mark.parametrize("alg", ALGS)
def test_we_read_a_pass_cwt_signs(alg: str) -> None:
    key = KEYS[alg]
    ck = cwt.COSEKey.from_pem(private_pem(key), kid=kid(key), alg=alg)
    payload = cbor2.dumps({**MINIMAL, -65537: ["front"], 8: {1: cose.encode_okp_key(HOLDER_RAW)}})
    cose_bytes = cwt.COSE.new(alg_auto_inclusion=True).encode(payload, ck, protected={4: kid(key)})
    vp = read_pass(qr(cose_bytes), TRUST, allow_rotating=True)
    assert (vp.claims.sub, vp.claims.doors, vp.claims.holder_key) == ("bob", ("front",), HOLDER_RAW)
    assert vp.alg == alg
    # and a rotating code around it
    code = rotating_code(cose_bytes, HOLDER, 7, None)
    assert read_rotating(code, TRUST, VerifiedCache()).pass_.claims.cti == b"cti-1"


# --- fuzzing: only PassError ever escapes -----------------------------------------------------


def only_pass_errors(call: Callable[[], object]) -> None:
    try:
        call()
    except PassError as e:
        assert isinstance(e.why, str) and e.why and isinstance(e.reason, Reason)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    cache = VerifiedCache()
    for text in (data, PASS_PREFIX + data, ROTATING_PREFIX + data):
        only_pass_errors(lambda t=text: read_pass(t, TRUST))  # type: ignore[misc]
        only_pass_errors(lambda t=text: read_rotating(t, TRUST, cache))  # type: ignore[misc]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.booleans())
def test_fuzz_random_base45(data: bytes, packed: bool) -> None:
    body = zlib.compress(data) if packed else data
    for prefix in (b"\xd2", b"\x78", b""):
        only_pass_errors(lambda p=prefix: read_pass(qr(p + body), TRUST))  # type: ignore[misc]
        only_pass_errors(
            lambda p=prefix: read_rotating(  # type: ignore[misc]
                ROTATING_PREFIX + base45.b45encode(p + body), TRUST, VerifiedCache()
            )
        )


SCALARS = (
    st.integers(-(2**70), 2**70)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=True)
    | st.binary(max_size=40)
    | st.text(max_size=40)
)
CBOR_VALUES = st.recursive(
    SCALARS | st.builds(cbor2.CBORTag, st.sampled_from([0, 1, 2, 4, 5, 18, 24, 28, 36]), SCALARS),
    lambda inner: (
        st.lists(inner, max_size=6)
        | st.dictionaries(st.integers(-70000, 10) | st.text(max_size=5), inner, max_size=6)
    ),
    max_leaves=30,
)
CLAIM_LABELS = st.sampled_from([1, 2, 4, 5, 6, 7, 8, -65537, -65538, -65539, -65540, 3, "x"])


@settings(max_examples=300, deadline=None)
@given(CBOR_VALUES)
def test_fuzz_any_cbor_payload_in_a_signed_cose(value: Any) -> None:
    try:
        payload = cbor2.dumps(value)
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError):
        return
    only_pass_errors(lambda: read_pass(signed(payload), TRUST))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(CLAIM_LABELS, CBOR_VALUES, max_size=12), st.booleans())
def test_fuzz_claims_maps_in_a_signed_cose(extra: dict[Any, Any], base: bool) -> None:
    claims = {**MINIMAL, **extra} if base else extra
    try:
        payload = cbor2.dumps(claims)
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError):
        return
    text = signed(payload)
    only_pass_errors(lambda: read_pass(text, TRUST, allow_rotating=True))
    if len(text) > 2000:  # its rotating code would not fit the QR cap
        return
    code = rotating_code(unwrap_pass(text), HOLDER, 1, None)
    only_pass_errors(lambda: read_rotating(code, TRUST, VerifiedCache()))


@settings(max_examples=300, deadline=None)
@given(CBOR_VALUES, CBOR_VALUES, CBOR_VALUES)
def test_fuzz_cose_headers_and_envelopes(protected: Any, unprotected: Any, step: Any) -> None:
    payload = cbor2.dumps(MINIMAL)
    try:
        prot = cbor2.dumps(protected)
        sig = ED.sign(cose.sig_structure(prot, payload))
        cose_bytes = cbor2.dumps(cbor2.CBORTag(18, [prot, unprotected, payload, sig]))
        env = cbor2.dumps([cose_bytes, step, unprotected, sig])
    except (cbor2.CBOREncodeError, ValueError, TypeError, OverflowError):
        return
    only_pass_errors(lambda: read_pass(qr(cose_bytes), TRUST))
    code = ROTATING_PREFIX + base45.b45encode(env)
    only_pass_errors(lambda: read_rotating(code, TRUST, VerifiedCache()))


def test_sha256_of_cose_names_the_pass_in_the_holder_signature() -> None:
    # the holder signs ["qrgate-rotating-1", SHA-256(pass_cose), step, door] (design format)
    pc = rotating_pass()
    sig = envelope(rotating_code(pc, HOLDER, 9, "lab"))[3]
    tbs = cbor2.dumps(["qrgate-rotating-1", hashlib.sha256(pc).digest(), 9, "lab"])
    HOLDER.public_key().verify(sig, tbs)
