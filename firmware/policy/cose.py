"""COSE_Sign1 (RFC 9052 §4.2) with EdDSA (Ed25519) and ES256 (P-256), and the OKP COSE_Key.

Only what qrgate's passes need: one signer, the algorithm in the protected header, an empty
external_aad, an attached payload. Parsing is strict and capped, because a pass is the text of
a QR code anyone can print:

- the CBOR must be well formed, definite-length, at most :data:`MAX_DEPTH` deep and
  :data:`MAX_ITEMS` items, with no tag but the outer COSE_Sign1 tag 18 and nothing after it.
  cbor2 has no switch to turn its semantic tag decoders off (tag 36 imports the email
  parser, 35 compiles a regex, 28/29 build cyclic lists, 4/5 raise decimal errors), so
  :func:`decode_cbor` checks the raw bytes before cbor2 sees them;
- every failure is :class:`~firmware.exceptions.PassError` with a stable ``why``.

Algorithms (RFC 9053 §2.1, §2.2): ``-8`` EdDSA with Ed25519 (RFC 8032); ``-7`` ES256, ECDSA
P-256 with SHA-256, the signature being r || s, each a 32-byte big-endian integer (not DER).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from firmware.exceptions import PassError
from firmware.policy.verdict import Reason

EDDSA = -8  # RFC 9053 §2.2
ES256 = -7  # RFC 9053 §2.1
ALG_IDS = {"EdDSA": EDDSA, "ES256": ES256}
ALG_NAMES = {EDDSA: "EdDSA", ES256: "ES256"}

COSE_SIGN1_TAG = 18  # RFC 9052 §4.2; encoded as the single byte 0xD2
HDR_ALG, HDR_CRIT, HDR_KID = 1, 2, 4  # RFC 9052 §3.1

MAX_COSE_BYTES = 4096
MAX_KID_BYTES = 16
MAX_DEPTH = 16
MAX_ITEMS = 512  # data items in one CBOR document; a pass with 64 doors and 64 zones has ~150
SIGNATURE_BYTES = 64  # both algorithms: Ed25519 R || S, ES256 r || s

# COSE_Key (RFC 9052 §7, RFC 9053 §7.2): kty OKP with crv Ed25519
KEY_KTY, KEY_ALG, KEY_CRV, KEY_X, KEY_D = 1, 3, -1, -2, -4
KTY_OKP, CRV_ED25519 = 1, 6
ED25519_KEY_BYTES = 32

PrivateKey = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey = Ed25519PublicKey | ec.EllipticCurvePublicKey


def malformed(why: str, detail: str) -> PassError:
    """A PassError(MALFORMED, ``why``) whose message carries ``detail``."""
    return PassError(Reason.MALFORMED, why, f"malformed pass ({why}): {detail}")


@dataclass(frozen=True, slots=True)
class Sign1:
    """A structurally valid COSE_Sign1 (RFC 9052 §4.2), not yet verified.

    ``protected``: the serialized protected header, exactly as signed. ``unprotected``: the
    unprotected header map. ``payload``/``signature``: as carried. ``alg``: the COSE algorithm
    from the protected header (:data:`EDDSA` or :data:`ES256`). ``kid``: the key id (1-16
    bytes) from the protected header, or else the unprotected one.
    """

    protected: bytes
    unprotected: Mapping[Any, Any]
    payload: bytes
    signature: bytes
    alg: int
    kid: bytes


# --- strict CBOR ------------------------------------------------------------------------------


class _NotWellFormedError(Exception):
    """Raised inside the byte checker; turned into PassError by :func:`decode_cbor`."""


def _skip(data: bytes, pos: int) -> int:
    """The position just after the data item at ``pos`` (RFC 8949 §3), checking it is
    well formed, definite-length, untagged, at most MAX_DEPTH containers deep and at most
    MAX_ITEMS items.

    A loop with an explicit stack, not recursion: it walks up to MAX_COSE_BYTES items of
    unauthenticated input, and a call per item would double the cost."""
    n = len(data)
    pending = 1  # items still to read in the innermost open container
    stack: list[int] = []  # the pending counts of the containers around it
    items = 0
    while True:
        while pending == 0:
            if not stack:
                return pos
            pending = stack.pop()
        pending -= 1
        items += 1
        if items > MAX_ITEMS:
            raise _NotWellFormedError(f"more than {MAX_ITEMS} data items")
        if pos >= n:
            raise _NotWellFormedError("truncated")
        head = data[pos]
        major, info = head >> 5, head & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            end = pos + (1 << (info - 24))
            if end > n:
                raise _NotWellFormedError("truncated")
            arg = int.from_bytes(data[pos:end], "big")
            pos = end
        else:
            raise _NotWellFormedError(f"indefinite length or reserved value (byte 0x{head:02x})")
        if major <= 1:  # unsigned / negative integer
            continue
        if major <= 3:  # byte / text string
            if arg > n - pos:
                raise _NotWellFormedError("truncated")
            pos += arg
        elif major <= 5:  # array / map
            count = arg if major == 4 else 2 * arg
            if count > n - pos:  # every item takes at least one byte
                raise _NotWellFormedError("truncated")
            if count:
                if len(stack) >= MAX_DEPTH:
                    raise _NotWellFormedError(f"nested deeper than {MAX_DEPTH}")
                stack.append(pending)
                pending = count
        elif major == 6:
            raise _NotWellFormedError(f"tag {arg} (no tags allowed here)")
        elif info not in (20, 21, 22, 25, 26, 27):
            # major 7: only false, true, null and floats; no simple values or undefined
            raise _NotWellFormedError(f"simple value (byte 0x{head:02x})")


def decode_cbor(data: bytes, why: str, *, tag: int | None = None) -> Any:
    """Decode one strict CBOR item that is the whole of ``data``.

    No tags inside; with ``tag``, the item must be that tag in its one-byte form (tags 0-23)
    and the result is a ``cbor2.CBORTag``. Raises PassError(MALFORMED, ``why``).
    """
    start = 0
    if tag is not None:
        if data[:1] != bytes([0xC0 | tag]):
            raise malformed(why, f"expected CBOR tag {tag}")
        start = 1
    try:
        end = _skip(data, start)
    except _NotWellFormedError as e:
        raise malformed(why, f"not strict CBOR: {e}") from None
    if end != len(data):
        raise malformed(why, f"{len(data) - end} bytes after the CBOR item")
    try:
        return cbor2.loads(data)
    except Exception as e:  # well formed by now, so e.g. invalid UTF-8 in a text string
        raise malformed(why, f"not decodable CBOR: {type(e).__name__}") from None


# --- keys -------------------------------------------------------------------------------------


def alg_of(key: PrivateKey | PublicKey) -> int:
    """The COSE algorithm for ``key``: EDDSA for Ed25519, ES256 for P-256.

    Raises ValueError for any other key (an RSA key, another curve)."""
    if isinstance(key, Ed25519PrivateKey | Ed25519PublicKey):
        return EDDSA
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1
    ):
        return ES256
    raise ValueError(f"unsupported key type {type(key).__name__}: expected Ed25519 or P-256")


def kid_of(public_key: PublicKey) -> bytes:
    """The issuer key id: the first 8 bytes of SHA-256 of the SubjectPublicKeyInfo DER."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()[:8]


def encode_okp_key(public_key: Ed25519PublicKey | bytes) -> dict[int, Any]:
    """The COSE_Key map {1: 1 (OKP), -1: 6 (Ed25519), -2: x} of an Ed25519 public key
    (RFC 9053 §7.2) given as a key object or its 32 raw bytes. Raises ValueError."""
    raw = public_key if isinstance(public_key, bytes) else public_key.public_bytes_raw()
    if len(raw) != ED25519_KEY_BYTES:
        raise ValueError(f"an Ed25519 public key is 32 bytes, not {len(raw)}")
    return {KEY_KTY: KTY_OKP, KEY_CRV: CRV_ED25519, KEY_X: raw}


def decode_okp_key(obj: object) -> bytes:
    """The 32 raw bytes of the Ed25519 public key in a decoded COSE_Key map.

    kty must be 1 (OKP), crv 6 (Ed25519), x 32 bytes; alg, if present, -8; a private part
    (d, -4) is refused. Other parameters are ignored. Raises PassError(MALFORMED, "cose_key").
    """
    if not isinstance(obj, dict):
        raise malformed("cose_key", "a COSE_Key must be a map")
    kty, crv, x = obj.get(KEY_KTY), obj.get(KEY_CRV), obj.get(KEY_X)
    if type(kty) is not int or kty != KTY_OKP or type(crv) is not int or crv != CRV_ED25519:
        raise malformed("cose_key", "expected kty 1 (OKP) and crv 6 (Ed25519)")
    if KEY_ALG in obj and (type(obj[KEY_ALG]) is not int or obj[KEY_ALG] != EDDSA):
        raise malformed("cose_key", "alg must be -8 (EdDSA)")
    if KEY_D in obj:
        raise malformed("cose_key", "holds a private key")
    if not isinstance(x, bytes) or len(x) != ED25519_KEY_BYTES:
        raise malformed("cose_key", "x must be a 32-byte string")
    return x


# --- COSE_Sign1 -------------------------------------------------------------------------------


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes signed: Sig_structure ["Signature1", protected, h'' (external_aad), payload]
    (RFC 9052 §4.4)."""
    return cbor2.dumps(["Signature1", protected, b"", payload])


def sign1(payload: bytes, key: PrivateKey, kid: bytes) -> bytes:
    """A tagged COSE_Sign1 over ``payload`` with ``kid`` and alg in the protected header
    and an empty unprotected header. Raises ValueError for an unsupported key or a kid that
    is not 1-16 bytes."""
    alg = alg_of(key)
    if not isinstance(kid, bytes) or not 0 < len(kid) <= MAX_KID_BYTES:
        raise ValueError(f"kid must be 1-{MAX_KID_BYTES} bytes")
    protected = cbor2.dumps({HDR_ALG: alg, HDR_KID: kid})
    tbs = sig_structure(protected, payload)
    if isinstance(key, Ed25519PrivateKey):
        signature = key.sign(tbs)
    else:
        r, s = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(COSE_SIGN1_TAG, [protected, {}, payload, signature]))


def parse_sign1(data: bytes) -> Sign1:
    """Check the structure of a tagged COSE_Sign1 and take it apart; no signature check.

    Tag 18 in its one-byte form; an array of 4: protected bstr holding a map (RFC 9052 §3),
    unprotected map, payload bstr, 64-byte signature bstr. alg must be in the protected
    header and be -8 or -7; kid (1-16 bytes) in either header; no label in both; crit is not
    supported. At most MAX_COSE_BYTES. Raises PassError(MALFORMED, why) with why one of
    "too_large", "cbor", "cose_structure", "protected", "duplicate_header", "crit", "alg",
    "kid", "signature".
    """
    if len(data) > MAX_COSE_BYTES:
        raise malformed("too_large", f"COSE_Sign1 of {len(data)} bytes (cap {MAX_COSE_BYTES})")
    item = decode_cbor(data, "cbor", tag=COSE_SIGN1_TAG)
    body = item.value
    if not isinstance(body, list) or len(body) != 4:
        raise malformed("cose_structure", "COSE_Sign1 must be an array of 4")
    protected, unprotected, payload, signature = body
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict):
        raise malformed("cose_structure", "headers must be a bstr and a map")
    if not isinstance(payload, bytes):
        raise malformed("cose_structure", "payload must be an attached bstr")
    if not isinstance(signature, bytes):
        raise malformed("cose_structure", "signature must be a bstr")
    # RFC 9052 §3: a zero-length protected header stands for the empty map
    prot = decode_cbor(protected, "protected") if protected else {}
    if not isinstance(prot, dict):
        raise malformed("protected", "the protected header must encode a map")
    if any(label in prot for label in unprotected):
        raise malformed("duplicate_header", "a label is in both headers (RFC 9052 §3)")
    if HDR_CRIT in prot:
        raise malformed("crit", "critical header parameters are not supported")
    alg = prot.get(HDR_ALG)
    if type(alg) is not int or alg not in ALG_NAMES:
        raise malformed("alg", f"alg must be in the protected header, -8 or -7; got {alg!r:.40}")
    kid = prot[HDR_KID] if HDR_KID in prot else unprotected.get(HDR_KID)
    if not isinstance(kid, bytes) or not 0 < len(kid) <= MAX_KID_BYTES:
        raise malformed("kid", f"kid must be a bstr of 1-{MAX_KID_BYTES} bytes")
    if len(signature) != SIGNATURE_BYTES:
        raise malformed("signature", f"signature of {len(signature)} bytes (expected 64)")
    return Sign1(protected, unprotected, payload, signature, alg, kid)


def verify(sign1: Sign1, public_key: PublicKey, alg: int) -> None:
    """Check ``sign1``'s signature with ``public_key``, a key for COSE algorithm ``alg``.

    The header's alg must equal ``alg`` and suit the key, so a kid cannot point an ES256
    header at an Ed25519 key (kid confusion). Raises PassError(BAD_SIGNATURE, why) with why
    "alg_mismatch" or "signature".
    """
    if sign1.alg != alg or alg_of(public_key) != alg:
        raise PassError(
            Reason.BAD_SIGNATURE,
            "alg_mismatch",
            f"bad signature: the header says {ALG_NAMES.get(sign1.alg)} but the key "
            f"{sign1.kid.hex()} is {ALG_NAMES.get(alg)}",
        )
    tbs = sig_structure(sign1.protected, sign1.payload)
    sig = sign1.signature
    try:
        if isinstance(public_key, Ed25519PublicKey):
            public_key.verify(sig, tbs)
        else:
            der = encode_dss_signature(
                int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
            )
            public_key.verify(der, tbs, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise PassError(
            Reason.BAD_SIGNATURE,
            "signature",
            f"bad signature: not signed by issuer key {sign1.kid.hex()}",
        ) from None
