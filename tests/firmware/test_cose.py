"""COSE_Sign1 (RFC 9052) with EdDSA and ES256, the OKP COSE_Key, issuer key files and the
trust list: real keys, real signatures, and python-cwt as an independent implementation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

import cbor2
import cwt
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.exceptions import CredentialListError, KeyFileError, PassError
from firmware.policy import cose
from firmware.policy.cose import EDDSA, ES256, PrivateKey
from firmware.policy.keys import (
    generate_key,
    load_private_key,
    load_public_key,
    public_key_pem,
    save_private_key,
    save_public_key,
)
from firmware.policy.trust import (
    IssuerKey,
    TrustList,
    load_trust,
    rfc3339_to_seconds,
    seconds_to_rfc3339,
    trust_entry,
)
from firmware.policy.verdict import Reason

KEYS: dict[str, PrivateKey] = {"EdDSA": generate_key("EdDSA"), "ES256": generate_key("ES256")}
ALGS = sorted(KEYS)


def kid(alg: str) -> bytes:
    return cose.kid_of(KEYS[alg].public_key())


def raw_sign1(protected: Any, unprotected: Any, payload: Any, signature: Any) -> bytes:
    return cbor2.dumps(cbor2.CBORTag(18, [protected, unprotected, payload, signature]))


def signed_with_header(header: dict[Any, Any], key: PrivateKey, payload: bytes = b"p") -> bytes:
    """A COSE_Sign1 with any protected header, signed correctly by ``key``."""
    protected = cbor2.dumps(header)
    tbs = cose.sig_structure(protected, payload)
    if isinstance(key, Ed25519PrivateKey):
        sig = key.sign(tbs)
    else:
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return raw_sign1(protected, {}, payload, sig)


def why_of(data: bytes) -> tuple[str, str]:
    with pytest.raises(PassError) as e:
        cose.parse_sign1(data)
    return e.value.reason, e.value.why


# --- sign1 / parse_sign1 / verify -------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_sign1_round_trip(alg: str) -> None:
    key = KEYS[alg]
    data = cose.sign1(b"hello pass", key, kid(alg))
    assert data[0] == 0xD2
    s = cose.parse_sign1(data)
    assert s.alg == cose.ALG_IDS[alg]
    assert s.kid == kid(alg) and len(s.kid) == 8
    assert cbor2.loads(s.protected) == {1: cose.ALG_IDS[alg], 4: kid(alg)}
    assert s.unprotected == {}
    assert s.payload == b"hello pass"
    assert len(s.signature) == 64
    cose.verify(s, key.public_key(), cose.ALG_IDS[alg])


def test_es256_signature_is_raw_r_s() -> None:
    key = KEYS["ES256"]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    s = cose.parse_sign1(cose.sign1(b"x", key, b"k"))
    r, ss = int.from_bytes(s.signature[:32], "big"), int.from_bytes(s.signature[32:], "big")
    # the raw pair, re-encoded as DER, verifies with cryptography directly
    key.public_key().verify(
        encode_dss_signature(r, ss),
        cose.sig_structure(s.protected, s.payload),
        ec.ECDSA(hashes.SHA256()),
    )


def _flip_last_bit(signature: bytes) -> bytes:
    return signature[:-1] + bytes([signature[-1] ^ 0x01])


@pytest.mark.parametrize("alg", ALGS)
def test_altered_payload_or_signature_is_bad_signature(alg: str) -> None:
    key = KEYS[alg]
    s = cose.parse_sign1(cose.sign1(b"pay", key, kid(alg)))
    alg_id = cose.ALG_IDS[alg]
    for forged in (
        cose.Sign1(s.protected, s.unprotected, b"paz", s.signature, s.alg, s.kid),
        cose.Sign1(s.protected, s.unprotected, s.payload, bytes(64), s.alg, s.kid),
        # one bit flipped (a fixed last byte would equal the real one once in 256 keys)
        cose.Sign1(
            s.protected, s.unprotected, s.payload, _flip_last_bit(s.signature), s.alg, s.kid
        ),
    ):
        with pytest.raises(PassError) as e:
            cose.verify(forged, key.public_key(), alg_id)
        assert (e.value.reason, e.value.why) == (Reason.BAD_SIGNATURE, "signature")


@pytest.mark.parametrize("alg", ALGS)
def test_other_key_same_kid_is_bad_signature(alg: str) -> None:
    other = generate_key(alg)
    s = cose.parse_sign1(cose.sign1(b"pay", other, kid(alg)))
    with pytest.raises(PassError) as e:
        cose.verify(s, KEYS[alg].public_key(), cose.ALG_IDS[alg])
    assert (e.value.reason, e.value.why) == (Reason.BAD_SIGNATURE, "signature")


def test_header_alg_must_match_the_key() -> None:
    # an ES256 header pointed at an EdDSA key (kid confusion), and the reverse
    s = cose.parse_sign1(cose.sign1(b"pay", KEYS["ES256"], kid("EdDSA")))
    with pytest.raises(PassError) as e:
        cose.verify(s, KEYS["EdDSA"].public_key(), EDDSA)
    assert (e.value.reason, e.value.why) == (Reason.BAD_SIGNATURE, "alg_mismatch")
    s = cose.parse_sign1(cose.sign1(b"pay", KEYS["EdDSA"], kid("ES256")))
    with pytest.raises(PassError) as e:
        cose.verify(s, KEYS["ES256"].public_key(), ES256)
    assert e.value.why == "alg_mismatch"
    # the caller's alg disagrees with the key object itself
    with pytest.raises(PassError) as e:
        cose.verify(s, KEYS["ES256"].public_key(), EDDSA)
    assert e.value.why == "alg_mismatch"


def test_sign1_refuses_bad_kid_and_key() -> None:
    with pytest.raises(ValueError, match="kid"):
        cose.sign1(b"x", KEYS["EdDSA"], b"")
    with pytest.raises(ValueError, match="kid"):
        cose.sign1(b"x", KEYS["EdDSA"], bytes(17))
    with pytest.raises(ValueError, match="unsupported key"):
        cose.sign1(b"x", ec.generate_private_key(ec.SECP384R1()), b"k")


K8 = b"12345678"
SIG = bytes(64)
GOOD_PROT = cbor2.dumps({1: -8, 4: K8})


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (cbor2.dumps([GOOD_PROT, {}, b"p", SIG]), "cbor"),  # untagged
        (cbor2.dumps(cbor2.CBORTag(17, [GOOD_PROT, {}, b"p", SIG])), "cbor"),  # COSE_Mac0
        (b"\xd8\x12" + cbor2.dumps([GOOD_PROT, {}, b"p", SIG]), "cbor"),  # tag 18, long form
        (cbor2.dumps(cbor2.CBORTag(55799, cbor2.CBORTag(18, [GOOD_PROT, {}, b"p", SIG]))), "cbor"),
        (cbor2.dumps(cbor2.CBORTag(18, cbor2.CBORTag(18, [GOOD_PROT]))), "cbor"),  # nested tag
        (raw_sign1(GOOD_PROT, {}, cbor2.CBORTag(24, b"p"), SIG), "cbor"),  # tagged payload
        (raw_sign1(GOOD_PROT, {}, b"p", SIG) + b"\x00", "cbor"),  # trailing byte
        (raw_sign1(GOOD_PROT, {}, b"p", SIG)[:-1], "cbor"),  # truncated
        (b"\xd2\x9f" + cbor2.dumps(GOOD_PROT) + b"\xa0\x41p" + cbor2.dumps(SIG) + b"\xff", "cbor"),
        (b"\xd2\x84" + cbor2.dumps(GOOD_PROT) + b"\xa0\x41p\xf7", "cbor"),  # undefined
        (b"\xd2" + b"\x81" * 40 + b"\x00", "cbor"),  # deep nesting
        (cbor2.dumps(cbor2.CBORTag(18, [GOOD_PROT, {}, b"p"])), "cose_structure"),
        (cbor2.dumps(cbor2.CBORTag(18, {1: 2})), "cose_structure"),
        (raw_sign1({1: -8, 4: K8}, {}, b"p", SIG), "cose_structure"),  # protected not a bstr
        (raw_sign1(GOOD_PROT, [], b"p", SIG), "cose_structure"),
        (raw_sign1(GOOD_PROT, {}, None, SIG), "cose_structure"),  # detached payload
        (raw_sign1(GOOD_PROT, {}, "p", SIG), "cose_structure"),
        (raw_sign1(GOOD_PROT, {}, b"p", "sig"), "cose_structure"),
        (raw_sign1(cbor2.dumps([1, -8]), {}, b"p", SIG), "protected"),
        (raw_sign1(b"\xa1\x01", {}, b"p", SIG), "protected"),  # truncated map
        (raw_sign1(cbor2.dumps(cbor2.CBORTag(1, 0)), {}, b"p", SIG), "protected"),
        (raw_sign1(GOOD_PROT, {1: -8}, b"p", SIG), "duplicate_header"),
        (raw_sign1(cbor2.dumps({1: -8, 2: [4], 4: K8}), {}, b"p", SIG), "crit"),
        (raw_sign1(b"", {4: K8}, b"p", SIG), "alg"),  # empty protected: no alg
        (raw_sign1(cbor2.dumps({4: K8}), {}, b"p", SIG), "alg"),
        (raw_sign1(cbor2.dumps({4: K8}), {1: -8}, b"p", SIG), "alg"),  # alg unprotected only
        (raw_sign1(cbor2.dumps({1: "none", 4: K8}), {}, b"p", SIG), "alg"),
        (raw_sign1(cbor2.dumps({1: "EdDSA", 4: K8}), {}, b"p", SIG), "alg"),
        (raw_sign1(cbor2.dumps({1: None, 4: K8}), {}, b"p", SIG), "alg"),
        (raw_sign1(cbor2.dumps({1: 0, 4: K8}), {}, b"p", SIG), "alg"),
        (raw_sign1(cbor2.dumps({1: -257, 4: K8}), {}, b"p", SIG), "alg"),  # RS256
        (raw_sign1(cbor2.dumps({1: -35, 4: K8}), {}, b"p", SIG), "alg"),  # ES384
        (raw_sign1(cbor2.dumps({1: 5, 4: K8}), {}, b"p", SIG), "alg"),  # HMAC 256/256
        (raw_sign1(cbor2.dumps({1: -8}), {}, b"p", SIG), "kid"),  # no kid
        (raw_sign1(cbor2.dumps({1: -8, 4: "12345678"}), {}, b"p", SIG), "kid"),
        (raw_sign1(cbor2.dumps({1: -8, 4: b""}), {}, b"p", SIG), "kid"),
        (raw_sign1(cbor2.dumps({1: -8, 4: bytes(17)}), {}, b"p", SIG), "kid"),
        (raw_sign1(cbor2.dumps({1: -8}), {4: 7}, b"p", SIG), "kid"),
        (raw_sign1(GOOD_PROT, {}, b"p", bytes(63)), "signature"),
        (raw_sign1(GOOD_PROT, {}, b"p", bytes(65)), "signature"),
        (raw_sign1(GOOD_PROT, {}, bytes(4096), SIG), "too_large"),
    ],
)
def test_parse_sign1_refuses(data: bytes, why: str) -> None:
    assert why_of(data) == (Reason.MALFORMED, why)


def test_alg_true_is_not_an_integer() -> None:
    # bool is a subclass of int in Python; CBOR true (0xf5) must not pass as alg 1
    assert why_of(raw_sign1(cbor2.dumps({1: True, 4: K8}), {}, b"p", SIG))[1] == "alg"


def test_kid_may_be_unprotected() -> None:
    s = cose.parse_sign1(raw_sign1(cbor2.dumps({1: -7}), {4: K8, "x": 1}, b"p", SIG))
    assert (s.alg, s.kid, s.unprotected) == (ES256, K8, {4: K8, "x": 1})


@pytest.mark.parametrize(
    "tagged",
    [
        cbor2.CBORTag(36, "Subject: x\n\nbody"),  # cbor2 would run the email parser
        cbor2.CBORTag(35, "(a+)+$"),  # ... compile a regex
        cbor2.CBORTag(5, [2**63, 3]),  # ... raise decimal.Overflow
        cbor2.CBORTag(1, 10**30),  # ... fail on a datetime
        cbor2.CBORTag(2, b"\xff" * 2000),  # ... build a bignum past int-str limits
    ],
)
def test_decode_cbor_refuses_every_tag_inside(tagged: cbor2.CBORTag) -> None:
    with pytest.raises(PassError) as e:
        cose.decode_cbor(cbor2.dumps({1: tagged}), "claims")
    assert (e.value.reason, e.value.why) == (Reason.MALFORMED, "claims")
    assert "tag" in str(e.value)


def test_decode_cbor_refuses_shared_reference_cycles() -> None:
    # tag 28 / 29: a list that contains itself
    with pytest.raises(PassError) as e:
        cose.decode_cbor(b"\xd8\x1c\x81\xd8\x1d\x00", "claims")
    assert e.value.why == "claims"


def test_decode_cbor_accepts_plain_items() -> None:
    item = {1: "iss", -2: b"\x00" * 3, "k": [True, False, None, 1.5, -(2**64)], 2: {3: []}}
    assert cose.decode_cbor(cbor2.dumps(item), "claims") == item
    # nested to MAX_DEPTH is fine, one more is not
    deep = b"\x81" * cose.MAX_DEPTH + b"\x00"
    assert cose.decode_cbor(deep, "x") is not None
    with pytest.raises(PassError, match="deeper"):
        cose.decode_cbor(b"\x81" + deep, "x")
    # at most MAX_ITEMS data items, the array itself included
    assert cose.decode_cbor(cbor2.dumps([0] * (cose.MAX_ITEMS - 1)), "x") == [0] * 511
    with pytest.raises(PassError, match="more than 512 data items"):
        cose.decode_cbor(cbor2.dumps([0] * cose.MAX_ITEMS), "x")


def test_decode_cbor_invalid_utf8_is_malformed() -> None:
    with pytest.raises(PassError) as e:
        cose.decode_cbor(b"\xa1\x01\x62\xff\xfe", "claims")
    assert e.value.why == "claims"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_fuzz_parse_sign1_raises_only_pass_error(data: bytes) -> None:
    for candidate in (data, b"\xd2" + data, b"\xd2\x84" + data):
        try:
            cose.parse_sign1(candidate)
        except PassError as e:
            assert e.reason == Reason.MALFORMED


# --- keys, kid, COSE_Key ----------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_kid_is_sha256_of_spki_der(alg: str) -> None:
    public = KEYS[alg].public_key()
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert cose.kid_of(public) == hashlib.sha256(der).digest()[:8]
    assert cose.kid_of(generate_key(alg).public_key()) != cose.kid_of(public)


def test_okp_key_round_trip() -> None:
    public = Ed25519PrivateKey.generate().public_key()
    m = cose.encode_okp_key(public)
    assert m == {1: 1, -1: 6, -2: public.public_bytes_raw()}
    assert cose.decode_okp_key(cbor2.loads(cbor2.dumps(m))) == public.public_bytes_raw()
    assert cose.decode_okp_key({**m, 3: -8, 2: b"kid"}) == public.public_bytes_raw()
    with pytest.raises(ValueError, match="32 bytes"):
        cose.encode_okp_key(bytes(31))


@pytest.mark.parametrize(
    "bad",
    [
        [1, 6, bytes(32)],
        {1: 2, -1: 6, -2: bytes(32)},  # EC2
        {1: 1, -1: 4, -2: bytes(32)},  # X25519
        {1: 1, -1: 7, -2: bytes(57)},  # Ed448
        {1: 1, -1: 6, -2: bytes(31)},
        {1: 1, -1: 6, -2: "x" * 32},
        {1: 1, -1: 6},
        {1: True, -1: 6, -2: bytes(32)},
        {1: 1, -1: 6, -2: bytes(32), 3: -7},
        {1: 1, -1: 6, -2: bytes(32), -4: bytes(32)},  # a private key
    ],
)
def test_decode_okp_key_refuses(bad: object) -> None:
    with pytest.raises(PassError) as e:
        cose.decode_okp_key(bad)
    assert (e.value.reason, e.value.why) == (Reason.MALFORMED, "cose_key")


def test_alg_of() -> None:
    assert cose.alg_of(KEYS["EdDSA"]) == EDDSA
    assert cose.alg_of(KEYS["ES256"].public_key()) == ES256
    with pytest.raises(ValueError):
        cose.alg_of(ec.generate_private_key(ec.SECP384R1()))


# --- interoperability with python-cwt ---------------------------------------------------------


def private_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.mark.parametrize("alg", ALGS)
def test_cwt_verifies_what_we_sign(alg: str) -> None:
    data = cose.sign1(b"interop payload", KEYS[alg], kid(alg))
    pub = cwt.COSEKey.from_pem(public_key_pem(KEYS[alg]), kid=kid(alg))
    assert cwt.COSE.new(verify_kid=True).decode(data, pub) == b"interop payload"
    # and refuses our signature once the payload is changed
    s = cose.parse_sign1(data)
    forged = raw_sign1(s.protected, {}, b"interop payloaD", s.signature)
    with pytest.raises(cwt.VerifyError):
        cwt.COSE.new().decode(forged, pub)


@pytest.mark.parametrize("alg", ALGS)
@pytest.mark.parametrize("kid_protected", [True, False])
def test_we_verify_what_cwt_signs(alg: str, kid_protected: bool) -> None:
    ck = cwt.COSEKey.from_pem(private_pem(KEYS[alg]), kid=kid(alg), alg=alg)
    if kid_protected:
        data = cwt.COSE.new(alg_auto_inclusion=True).encode(
            b"from cwt", ck, protected={4: kid(alg)}
        )
    else:
        data = cwt.COSE.new(alg_auto_inclusion=True, kid_auto_inclusion=True).encode(
            b"from cwt", ck
        )
    s = cose.parse_sign1(data)
    assert (s.payload, s.kid, s.alg) == (b"from cwt", kid(alg), cose.ALG_IDS[alg])
    assert (4 in s.unprotected) is not kid_protected
    cose.verify(s, KEYS[alg].public_key(), cose.ALG_IDS[alg])
    with pytest.raises(PassError):
        cose.verify(s, generate_key(alg).public_key(), cose.ALG_IDS[alg])


# --- key files --------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ALGS)
def test_private_key_file_round_trip(tmp_path: Path, alg: str) -> None:
    path = tmp_path / "issuer.pem"
    save_private_key(path, KEYS[alg])
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    loaded = load_private_key(path)
    assert cose.kid_of(loaded.public_key()) == kid(alg)
    assert [p.name for p in tmp_path.iterdir()] == ["issuer.pem"]  # no temp file left
    pub = tmp_path / "issuer.pub.pem"
    save_public_key(pub, KEYS[alg])
    assert cose.kid_of(load_public_key(pub)) == kid(alg)
    assert pub.read_bytes() == public_key_pem(KEYS[alg].public_key())


def test_save_private_key_refuses_to_replace(tmp_path: Path) -> None:
    path = tmp_path / "k.pem"
    save_private_key(path, KEYS["EdDSA"])
    with pytest.raises(KeyFileError, match="already exists"):
        save_private_key(path, KEYS["ES256"])
    assert cose.alg_of(load_private_key(path)) == EDDSA
    save_private_key(path, KEYS["ES256"], overwrite=True)
    assert cose.alg_of(load_private_key(path)) == ES256
    with pytest.raises(KeyFileError, match="cannot write"):
        save_private_key(tmp_path / "no" / "dir.pem", KEYS["EdDSA"])


def test_generate_key_unknown_alg() -> None:
    with pytest.raises(ValueError, match="RS256"):
        generate_key("RS256")


def write(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def test_load_private_key_refuses(tmp_path: Path) -> None:
    good = private_pem(KEYS["EdDSA"])
    cases: list[tuple[Path, str]] = [
        (write(tmp_path / "open.pem", good, 0o644), "owner only"),
        (write(tmp_path / "group.pem", good, 0o640), "owner only"),
        (write(tmp_path / "junk.pem", b"not a key"), "not a PEM private key"),
        (write(tmp_path / "pub.pem", public_key_pem(KEYS["EdDSA"])), "not a PEM private key"),
        (write(tmp_path / "big.pem", b"x" * 70_000), "larger than"),
        (
            write(
                tmp_path / "enc.pem",
                KEYS["EdDSA"].private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.BestAvailableEncryption(b"secret"),
                ),
            ),
            "passphrase",
        ),
        (
            write(
                tmp_path / "rsa.pem",
                private_pem(rsa.generate_private_key(65537, 2048)),  # type: ignore[arg-type]
            ),
            "RSAPrivateKey",
        ),
        (
            write(
                tmp_path / "p384.pem",
                private_pem(ec.generate_private_key(ec.SECP384R1())),
            ),
            "unsupported key",
        ),
        (tmp_path / "missing.pem", "cannot read"),
        (tmp_path, "not a regular file"),
    ]
    fifo = tmp_path / "fifo.pem"
    os.mkfifo(fifo, 0o600)
    cases.append((fifo, "not a regular file"))  # and it does not hang waiting for a writer
    for path, message in cases:
        with pytest.raises(KeyFileError, match=message):
            load_private_key(path)


def test_load_public_key_refuses(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(write(tmp_path / "priv.pem", private_pem(KEYS["EdDSA"])))
    rsa_pub = public_key_pem(rsa.generate_private_key(65537, 2048).public_key())  # type: ignore[arg-type]
    with pytest.raises(KeyFileError, match="RSAPublicKey"):
        load_public_key(write(tmp_path / "rsa.pub", rsa_pub))
    with pytest.raises(KeyFileError, match="cannot read"):
        load_public_key(tmp_path / "nothing.pub")


# --- the trust list ---------------------------------------------------------------------------

T2030 = 1_893_456_000  # 2030-01-01T00:00:00Z


def test_trust_json_round_trip() -> None:
    doc = {
        "keys": [
            trust_entry(KEYS["EdDSA"].public_key(), iss="acme"),
            trust_entry(KEYS["ES256"].public_key(), not_before=0, not_after=T2030),
        ]
    }
    assert doc["keys"][0] == {
        "kid": kid("EdDSA").hex(),
        "alg": "EdDSA",
        "public_key": base64.b64encode(
            KEYS["EdDSA"]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).decode(),
        "iss": "acme",
    }
    assert doc["keys"][1]["not_after"] == "2030-01-01T00:00:00Z"
    tl = TrustList.from_json(json.loads(json.dumps(doc)))
    assert len(tl) == 2 and kid("EdDSA") in tl and list(tl) == [kid("EdDSA"), kid("ES256")]
    ed, es = tl.get(kid("EdDSA")), tl.get(kid("ES256"))
    assert ed is not None and es is not None
    assert (ed.alg, ed.alg_id, ed.iss, ed.not_before, ed.not_after) == (
        "EdDSA",
        -8,
        "acme",
        None,
        None,
    )
    assert (es.alg, es.alg_id, es.iss, es.not_before, es.not_after) == ("ES256", -7, None, 0, T2030)
    assert cose.kid_of(es.public_key) == kid("ES256")
    assert tl.get(b"\x00" * 8) is None
    assert tl.to_json() == doc
    assert TrustList.from_json(tl.to_json()) == tl
    assert len(TrustList.empty()) == 0 and TrustList.from_json({"keys": []}) == TrustList.empty()


def test_issuer_key_validity_window_is_inclusive() -> None:
    k = IssuerKey.of(KEYS["EdDSA"].public_key(), not_before=100, not_after=200)
    assert (k.kid, k.alg) == (kid("EdDSA"), "EdDSA")
    assert [k.valid_at(t) for t in (99, 100, 200, 201)] == [False, True, True, False]
    assert IssuerKey.of(KEYS["ES256"].public_key()).valid_at(0)


def entry(**over: Any) -> dict[str, Any]:
    e = trust_entry(KEYS["EdDSA"].public_key())
    e.update(over)
    return {k: v for k, v in e.items() if v is not None}


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([], "expected an object"),
        ({"keys": {}}, "keys: expected an array"),
        ({"keys": [], "version": 1}, "unknown key 'version'"),
        ({"keys": [entry(), entry()]}, r"keys\[1\] \(kid [0-9a-f]{16}\): duplicate kid"),
        ({"keys": ["x"]}, r"keys\[0\]: expected an object"),
        (
            {"keys": [entry(kid="00" * 8)]},
            r"keys\[0\] \(kid 0000000000000000\): kid .* does not match",
        ),
        ({"keys": [entry(kid="00" * 9)]}, "kid: expected 16 hex digits"),
        ({"keys": [entry(kid="zz" * 8)]}, "kid: expected 16 hex digits"),
        ({"keys": [entry(kid=None)]}, "kid: expected 16 hex digits"),
        ({"keys": [entry(alg="none")]}, "alg: expected 'EdDSA' or 'ES256'"),
        ({"keys": [entry(alg="ES256")]}, "does not match the key"),
        ({"keys": [entry(public_key="!!")]}, "not a base64 SubjectPublicKeyInfo"),
        (
            {"keys": [entry(public_key=base64.b64encode(b"\x30\x03\x02\x01\x00").decode())]},
            "not a base64",
        ),
        ({"keys": [entry(public_key=7)]}, "public_key: expected base64"),
        ({"keys": [entry(public_key="A" * 2000)]}, "public_key: expected base64"),
        ({"keys": [entry(iss="")]}, "iss: expected a string"),
        ({"keys": [entry(iss="x" * 257)]}, "iss: expected a string"),
        ({"keys": [entry(not_before="2030-01-01")]}, "not_before: expected an RFC 3339"),
        ({"keys": [entry(not_after="2030-01-01T00:00:00")]}, "not_after: expected an RFC 3339"),
        ({"keys": [entry(not_after="2030-02-31T00:00:00Z")]}, "not_after: day is out of range"),
        ({"keys": [entry(not_after=1893456000)]}, "not_after: expected an RFC 3339"),
        (
            {"keys": [entry(not_before="2031-01-01T00:00:00Z", not_after="2030-01-01T00:00:00Z")]},
            "not_before is after not_after",
        ),
        ({"keys": [entry(comment="x")]}, "unknown key 'comment'"),
        ({"keys": [entry()] * 1001}, "more than 1000 keys"),
    ],
)
def test_trust_from_json_refuses(doc: object, message: str) -> None:
    with pytest.raises(CredentialListError, match=message):
        TrustList.from_json(doc)


def test_trust_refuses_rsa_and_other_curves() -> None:
    for key in (rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP384R1())):
        der = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        doc = {"keys": [entry(public_key=base64.b64encode(der).decode())]}
        with pytest.raises(CredentialListError, match=r"RSAPublicKey|unsupported key"):
            TrustList.from_json(doc)


def test_rfc3339() -> None:
    assert rfc3339_to_seconds("2030-01-01T00:00:00Z") == T2030
    assert rfc3339_to_seconds("2030-01-01t00:00:00z") == T2030
    assert rfc3339_to_seconds("2030-01-01T02:00:00+02:00") == T2030
    assert rfc3339_to_seconds("2030-01-01 00:00:00.999999999Z") == T2030
    assert rfc3339_to_seconds("2030-01-01T00:00:00.5Z", round_up=True) == T2030 + 1
    assert rfc3339_to_seconds("2030-01-01T00:00:00.000Z", round_up=True) == T2030
    assert seconds_to_rfc3339(T2030) == "2030-01-01T00:00:00Z"
    for bad in ("2030-01-01T24:00:00Z", "2030-W01", "", "2030-01-01T00:00:00+0200", 5):
        with pytest.raises(ValueError):
            rfc3339_to_seconds(bad)


def test_load_trust(tmp_path: Path) -> None:
    path = tmp_path / "trust.json"
    path.write_text(json.dumps({"keys": [entry(iss="acme")]}))
    tl = load_trust(path)
    assert len(tl) == 1 and tl[kid("EdDSA")].iss == "acme"
    for content, message in [
        (b"{", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b" " * (1024 * 1024 + 1), "larger than"),
        (json.dumps({"keys": [entry(kid="00" * 8)]}).encode(), r"trust\.json: trust: keys\[0\]"),
    ]:
        path.write_bytes(content)
        with pytest.raises(CredentialListError, match=message):
            load_trust(path)
    with pytest.raises(CredentialListError, match="cannot read"):
        load_trust(tmp_path / "absent.json")
