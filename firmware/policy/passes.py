"""Signed passes and rotating codes: issuing them and reading them back.

Signed pass, QR text ``QG1:`` + base45 (RFC 9285) of a COSE_Sign1 (RFC 9052 §4.2, see
:mod:`firmware.policy.cose`), zlib-compressed when that is shorter (first byte 0x78; raw COSE
starts 0xD2). Its payload is a CWT claims map (RFC 8392 §3/§4):

====== ============ ========= ===============================================================
label  name         type      meaning
====== ============ ========= ===============================================================
1      iss          tstr      issuer name (required)
2      sub          tstr      holder (required)
4      exp          int       expiry, seconds since the epoch (required)
5      nbf          int       not before, seconds since the epoch
6      iat          int       issued at, seconds since the epoch (required)
7      cti          bstr      pass id, 1-32 bytes (required)
8      cnf          map       {1: COSE_Key} holder's Ed25519 key (RFC 8747): a rotating pass
-65537 doors        [tstr]    doors it opens ("*": every door)
-65538 zones        [tstr]    zones it opens
-65539 schedule     tstr      schedule group name
-65540 period_s     uint      rotation period in seconds, 1-300 (default 10)
====== ============ ========= ===============================================================

Unknown claims are ignored (forward compatible) but count toward the size cap.

Rotating code, QR text ``QGR1:`` + base45 of the CBOR array [pass_cose, step, door or null,
holder_sig]: the holder's phone signs ["qrgate-rotating-1", SHA-256(pass_cose), step, door]
with the key the pass's cnf names, for ``step = floor(unix_seconds / period_s)``.

Reading checks structure, the issuer (trust list), key validity and signatures only; the
clock (:func:`check_time`, :func:`check_step`), replay (:class:`ReplayCache`), doors,
schedules and revocation are the policy's.
"""

from __future__ import annotations

import hashlib
import math
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import base45
import cbor2
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from firmware.exceptions import PassError
from firmware.policy.cose import (
    ALG_NAMES,
    MAX_COSE_BYTES,
    PrivateKey,
    decode_cbor,
    decode_okp_key,
    encode_okp_key,
    kid_of,
    malformed,
    parse_sign1,
    sign1,
    verify,
)
from firmware.policy.trust import TrustList
from firmware.policy.verdict import Reason

__all__ = [
    "MAX_COSE_BYTES",
    "PASS_PREFIX",
    "ROTATING_PREFIX",
    "PassClaims",
    "ReplayCache",
    "VerifiedCache",
    "VerifiedPass",
    "VerifiedRotating",
    "check_step",
    "check_time",
    "issue_pass",
    "parse_claims",
    "read_pass",
    "read_rotating",
    "rotating_code",
    "step_of",
    "unwrap_pass",
]

PASS_PREFIX = b"QG1:"
ROTATING_PREFIX = b"QGR1:"
ROTATING_CONTEXT = "qrgate-rotating-1"
MAX_QR_BYTES = 4096
MAX_CLAIM_CHARS = 256
MAX_LIST_ENTRIES = 64
MAX_CTI_BYTES = 32
MAX_SECONDS = 2**53 - 1  # NumericDate bound: exact in a JSON number and a double
DEFAULT_PERIOD_S = 10
MAX_PERIOD_S = 300
HOLDER_SIGNATURE_BYTES = 64

# RFC 8392 §4 / RFC 8747 §3.1 claim keys; qrgate's in the private-use range (< -65536)
ISS, SUB, EXP, NBF, IAT, CTI, CNF = 1, 2, 4, 5, 6, 7, 8
DOORS, ZONES, SCHEDULE, PERIOD_S = -65537, -65538, -65539, -65540
CNF_COSE_KEY = 1
_REQUIRED = ((ISS, "iss"), (SUB, "sub"), (EXP, "exp"), (IAT, "iat"), (CTI, "cti"))


@dataclass(frozen=True, slots=True)
class PassClaims:
    """The claims of a pass (module docstring).

    Times in seconds since the epoch. ``nbf``: None when absent. ``cti``: the pass id (1-32
    bytes). ``doors``/``zones``: None when the claim is absent (the policy decides what that
    means), else the names as given. ``schedule``: a schedule group name or None.
    ``holder_key``: the holder's raw 32-byte Ed25519 public key (a rotating pass) or None.
    ``period_s``: rotation period, 1-300 seconds.
    """

    iss: str
    sub: str
    exp: int
    nbf: int | None
    iat: int
    cti: bytes
    doors: tuple[str, ...] | None = None
    zones: tuple[str, ...] | None = None
    schedule: str | None = None
    holder_key: bytes | None = None
    period_s: int = DEFAULT_PERIOD_S

    @property
    def rotating(self) -> bool:
        """True for a rotating pass (it names a holder key), valid only inside a QGR1 code."""
        return self.holder_key is not None


@dataclass(frozen=True, slots=True)
class VerifiedPass:
    """A pass whose issuer signature checked out. ``kid``: the issuer key id. ``alg``:
    "EdDSA" or "ES256". ``cose``: the COSE_Sign1 bytes (decompressed)."""

    claims: PassClaims
    kid: bytes
    alg: str
    cose: bytes


@dataclass(frozen=True, slots=True)
class VerifiedRotating:
    """A rotating code whose pass and holder signatures checked out. ``step``: the time step
    it was made for (:func:`step_of`). ``door``: the door it names, or None for any."""

    pass_: VerifiedPass
    step: int
    door: str | None


# --- claims -----------------------------------------------------------------------------------


def _bad_claim(name: str, detail: str) -> PassError:
    return malformed(f"claim_{name}", f"{name}: {detail}")


def _text(v: object, name: str) -> str:
    if type(v) is not str or not 0 < len(v) <= MAX_CLAIM_CHARS:
        raise _bad_claim(name, f"expected a text string of 1-{MAX_CLAIM_CHARS} characters")
    return v


def _time(v: object, name: str) -> int:
    if type(v) is not int or not 0 <= v <= MAX_SECONDS:
        raise _bad_claim(name, "expected an integer number of seconds, 0..2^53-1")
    return v


def _names(v: object, name: str) -> tuple[str, ...]:
    if type(v) is not list or len(v) > MAX_LIST_ENTRIES:
        raise _bad_claim(name, f"expected an array of at most {MAX_LIST_ENTRIES} text strings")
    return tuple(_text(x, name) for x in v)


def parse_claims(payload: bytes) -> PassClaims:
    """The claims in a COSE payload (module docstring); no signature check.

    Raises PassError(MALFORMED, why): "claims" (not a CBOR map), "missing_<name>" (a
    required claim is absent) or "claim_<name>" (wrong type or out of range)."""
    m = decode_cbor(payload, "claims")
    if type(m) is not dict:
        raise malformed("claims", "the payload must be a CBOR map of claims")
    for key, name in _REQUIRED:
        if key not in m:
            raise malformed(f"missing_{name}", f"required claim {name} ({key}) is absent")
    cti = m[CTI]
    if type(cti) is not bytes or not 0 < len(cti) <= MAX_CTI_BYTES:
        raise _bad_claim("cti", f"expected a byte string of 1-{MAX_CTI_BYTES} bytes")
    holder_key = None
    if CNF in m:
        cnf = m[CNF]
        if type(cnf) is not dict or len(cnf) != 1 or CNF_COSE_KEY not in cnf:
            raise _bad_claim("cnf", "expected {1: COSE_Key} (RFC 8747)")
        try:
            holder_key = decode_okp_key(cnf[CNF_COSE_KEY])
        except PassError as e:
            raise _bad_claim("cnf", str(e)) from None
    period_s = m.get(PERIOD_S, DEFAULT_PERIOD_S)
    if type(period_s) is not int or not 1 <= period_s <= MAX_PERIOD_S:
        raise _bad_claim("period_s", f"expected an integer 1-{MAX_PERIOD_S}")
    return PassClaims(
        iss=_text(m[ISS], "iss"),
        sub=_text(m[SUB], "sub"),
        exp=_time(m[EXP], "exp"),
        nbf=_time(m[NBF], "nbf") if NBF in m else None,
        iat=_time(m[IAT], "iat"),
        cti=cti,
        doors=_names(m[DOORS], "doors") if DOORS in m else None,
        zones=_names(m[ZONES], "zones") if ZONES in m else None,
        schedule=_text(m[SCHEDULE], "schedule") if SCHEDULE in m else None,
        holder_key=holder_key,
        period_s=period_s,
    )


def _encode_claims(c: PassClaims) -> bytes:
    m: dict[int, Any] = {ISS: c.iss, SUB: c.sub, EXP: c.exp, IAT: c.iat, CTI: c.cti}
    if c.nbf is not None:
        m[NBF] = c.nbf
    if c.holder_key is not None:
        m[CNF] = {CNF_COSE_KEY: encode_okp_key(c.holder_key)}
    if c.doors is not None:
        m[DOORS] = list(c.doors)
    if c.zones is not None:
        m[ZONES] = list(c.zones)
    if c.schedule is not None:
        m[SCHEDULE] = c.schedule
    if c.period_s != DEFAULT_PERIOD_S:
        m[PERIOD_S] = c.period_s
    return cbor2.dumps(m)


# --- the signed pass --------------------------------------------------------------------------


def issue_pass(
    claims: PassClaims, private_key: PrivateKey, kid: bytes | None = None, compress: bool = True
) -> bytes:
    """The QR text (ASCII bytes, entirely in the QR alphanumeric charset) of a pass with
    ``claims`` signed by ``private_key`` under ``kid`` (default: the key's own
    :func:`~firmware.policy.cose.kid_of`). With ``compress``, zlib-compressed only when that
    is shorter. Raises ValueError when the claims would not read back (a wrong type, a size
    cap), for an unsupported key or when the text would exceed MAX_QR_BYTES."""
    try:
        payload = _encode_claims(claims)
        parsed = parse_claims(payload)
    except (PassError, ValueError, TypeError, cbor2.CBOREncodeError) as e:
        raise ValueError(f"cannot issue the pass: {e}") from None
    if parsed != claims:  # e.g. doors given as a list: would not compare equal when read
        raise ValueError("cannot issue the pass: claims would not read back equal")
    cose = sign1(payload, private_key, kid if kid is not None else kid_of(private_key.public_key()))
    body = cose
    if compress:
        packed = zlib.compress(cose, 9)
        if len(packed) < len(cose):
            body = packed
    text: bytes = PASS_PREFIX + base45.b45encode(body)
    if len(text) > MAX_QR_BYTES:
        raise ValueError(f"the pass would be {len(text)} bytes of QR text (cap {MAX_QR_BYTES})")
    return text


def _base45(text: bytes, prefix: bytes) -> bytes:
    if not text.startswith(prefix):
        raise malformed("prefix", f"expected the prefix {prefix.decode()}")
    if len(text) > MAX_QR_BYTES:
        raise malformed("too_large", f"{len(text)} bytes of QR text (cap {MAX_QR_BYTES})")
    try:
        data: bytes = base45.b45decode(text[len(prefix) :])
    except (ValueError, TypeError):
        raise malformed("base45", "not base45 (RFC 9285) after the prefix") from None
    return data


def unwrap_pass(text: bytes) -> bytes:
    """The COSE_Sign1 bytes in a ``QG1:`` text: prefix, base45, zlib if the first byte is
    0x78 (decompressed to at most MAX_COSE_BYTES). No CBOR or signature check. Raises
    PassError(MALFORMED, why) with why "prefix", "too_large", "base45", "zlib" or
    "cose_tag" (neither zlib nor a COSE_Sign1 tag)."""
    data = _base45(text, PASS_PREFIX)
    if data[:1] == b"\x78":
        d = zlib.decompressobj()
        try:
            cose = d.decompress(data, MAX_COSE_BYTES + 1)
        except zlib.error:
            raise malformed("zlib", "broken zlib stream") from None
        if len(cose) > MAX_COSE_BYTES:
            raise malformed("too_large", f"decompresses past {MAX_COSE_BYTES} bytes")
        if not d.eof or d.unused_data:
            raise malformed("zlib", "truncated zlib stream or bytes after it")
        data = cose
    if data[:1] != b"\xd2":
        raise malformed("cose_tag", "neither zlib (0x78) nor a COSE_Sign1 (0xD2)")
    return data


def _verify_cose(cose: bytes, trust: TrustList) -> VerifiedPass:
    """Parse, look up the issuer key, verify, then apply the rules that read claims (so they
    only ever see authenticated claims, and a forgery is always a bad signature)."""
    s = parse_sign1(cose)
    key = trust.get(s.kid)
    if key is None:
        raise PassError(
            Reason.UNKNOWN_ISSUER, "unknown_kid", f"pass signed by unknown key {s.kid.hex()}"
        )
    verify(s, key.public_key, key.alg_id)
    claims = parse_claims(s.payload)
    if key.iss is not None and claims.iss != key.iss:
        raise PassError(
            Reason.UNKNOWN_ISSUER,
            "iss_mismatch",
            f"pass issuer {claims.iss!r:.60} is not key {s.kid.hex()}'s issuer {key.iss!r:.60}",
        )
    if not key.valid_at(claims.iat):
        raise PassError(
            Reason.UNKNOWN_ISSUER,
            "key_validity",
            f"pass issued at {claims.iat}, outside key {s.kid.hex()}'s validity "
            f"[{key.not_before}, {key.not_after}]",
        )
    return VerifiedPass(claims, s.kid, ALG_NAMES[s.alg], cose)


def read_pass(text: bytes, trust: TrustList, *, allow_rotating: bool = False) -> VerifiedPass:
    """Read and verify a ``QG1:`` pass against ``trust``; no clock checks (see check_time).

    Order: prefix and size, base45, zlib (≤ MAX_COSE_BYTES), COSE structure, issuer key by
    kid, alg match, signature, claims, the key's iss, iat within the key's validity. A
    rotating pass (cnf claim) is refused unless ``allow_rotating`` (for inspection tools):
    shown bare, it is a screenshot. Raises PassError: MALFORMED (see unwrap_pass,
    cose.parse_sign1, parse_claims), UNKNOWN_ISSUER ("unknown_kid", "iss_mismatch",
    "key_validity"), BAD_SIGNATURE ("alg_mismatch", "signature"), STALE_CODE
    ("rotating_pass_shown_static")."""
    vp = _verify_cose(unwrap_pass(text), trust)
    if vp.claims.rotating and not allow_rotating:
        raise PassError(
            Reason.STALE_CODE,
            "rotating_pass_shown_static",
            "a rotating pass shown as its bare QG1 code (a screenshot): show the live code",
        )
    return vp


def check_time(claims: PassClaims, now_s: float, leeway_s: float = 60) -> Reason | None:
    """EXPIRED when ``now_s`` is at or past exp + leeway (RFC 8392 §3.1.4), NOT_YET_VALID
    when before nbf - leeway, else None. Seconds since the epoch; pure."""
    if now_s >= claims.exp + leeway_s:
        return Reason.EXPIRED
    if claims.nbf is not None and now_s < claims.nbf - leeway_s:
        return Reason.NOT_YET_VALID
    return None


# --- the rotating code ------------------------------------------------------------------------


def step_of(now_s: float, period_s: int) -> int:
    """The time step of ``now_s`` (seconds since the epoch): floor(now_s / period_s)."""
    return math.floor(now_s / period_s)


def check_step(step: int, now_s: float, period_s: int, skew: int = 1) -> Reason | None:
    """STALE_CODE unless ``step`` is within ``skew`` steps of now's step, else None. Pure."""
    return None if abs(step - step_of(now_s, period_s)) <= skew else Reason.STALE_CODE


def _holder_tbs(pass_digest: bytes, step: int, door: str | None) -> bytes:
    return cbor2.dumps([ROTATING_CONTEXT, pass_digest, step, door])


def rotating_code(
    pass_cose: bytes, holder_private_key: Ed25519PrivateKey, step: int, door: str | None
) -> bytes:
    """The ``QGR1:`` QR text (ASCII) for a rotating pass at ``step`` (see step_of), for
    ``door`` or any door (None). ``pass_cose``: the pass's COSE_Sign1 bytes, uncompressed
    (VerifiedPass.cose, or unwrap_pass of its QG1 text). Raises ValueError for a negative
    step, a door that is not 1-256 characters or text past MAX_QR_BYTES."""
    if type(step) is not int or not 0 <= step <= MAX_SECONDS:
        raise ValueError(f"step must be an integer 0..2^53-1, not {step!r}")
    if door is not None and not (type(door) is str and 0 < len(door) <= MAX_CLAIM_CHARS):
        raise ValueError(f"door must be None or 1-{MAX_CLAIM_CHARS} characters")
    digest = hashlib.sha256(pass_cose).digest()
    sig = holder_private_key.sign(_holder_tbs(digest, step, door))
    text: bytes = ROTATING_PREFIX + base45.b45encode(cbor2.dumps([pass_cose, step, door, sig]))
    if len(text) > MAX_QR_BYTES:
        raise ValueError(f"the code would be {len(text)} bytes of QR text (cap {MAX_QR_BYTES})")
    return text


@dataclass(frozen=True, slots=True)
class _Verified:
    trust: TrustList
    pass_: VerifiedPass
    holder: Ed25519PublicKey


class VerifiedCache:
    """A bounded LRU of passes whose issuer signature checked out, keyed by SHA-256 of the
    pass's COSE bytes, so a holder's rotating code costs one signature check per step.

    An entry counts only for the TrustList object it was verified against: a new credential
    set (a key removed) starts over. Failures are never cached. Thread-safe."""

    def __init__(self, capacity: int = 256) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._entries: OrderedDict[bytes, _Verified] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def _get(self, digest: bytes, trust: TrustList) -> _Verified | None:
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None or entry.trust is not trust:
                return None
            self._entries.move_to_end(digest)
            return entry

    def _put(self, digest: bytes, entry: _Verified) -> None:
        with self._lock:
            self._entries[digest] = entry
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()


def read_rotating(text: bytes, trust: TrustList, verified_cache: VerifiedCache) -> VerifiedRotating:
    """Read and verify a ``QGR1:`` rotating code against ``trust``: the inner pass's issuer
    signature (cached in ``verified_cache``) and the holder's signature over (SHA-256 of the
    pass, step, door). No clock, replay or door checks (see check_step, ReplayCache).

    Raises PassError: MALFORMED ("prefix", "too_large", "base45", "rotating" (not a CBOR
    array of 4), "step", "door", "holder_signature" (not 64 bytes), "not_rotating" (the
    pass names no holder key), and the pass's own: see read_pass), UNKNOWN_ISSUER and
    BAD_SIGNATURE as read_pass, and BAD_SIGNATURE "holder_signature"."""
    env = decode_cbor(_base45(text, ROTATING_PREFIX), "rotating")
    if type(env) is not list or len(env) != 4:
        raise malformed("rotating", "a rotating code is a CBOR array of 4")
    pass_cose, step, door, sig = env
    if type(pass_cose) is not bytes:
        raise malformed("rotating", "the pass must be a byte string")
    if type(step) is not int or not 0 <= step <= MAX_SECONDS:
        raise malformed("step", "step must be an integer 0..2^53-1")
    if door is not None and not (type(door) is str and 0 < len(door) <= MAX_CLAIM_CHARS):
        raise malformed("door", f"door must be null or 1-{MAX_CLAIM_CHARS} characters")
    if type(sig) is not bytes or len(sig) != HOLDER_SIGNATURE_BYTES:
        raise malformed("holder_signature", "the holder signature must be 64 bytes")
    digest = hashlib.sha256(pass_cose).digest()
    entry = verified_cache._get(digest, trust)
    if entry is None:
        vp = _verify_cose(pass_cose, trust)
        if vp.claims.holder_key is None:
            raise malformed("not_rotating", "the pass names no holder key (cnf)")
        holder = Ed25519PublicKey.from_public_bytes(vp.claims.holder_key)
        entry = _Verified(trust, vp, holder)
        verified_cache._put(digest, entry)
    try:
        entry.holder.verify(sig, _holder_tbs(digest, step, door))
    except InvalidSignature:
        raise PassError(
            Reason.BAD_SIGNATURE,
            "holder_signature",
            "rotating code not signed by the pass's holder key for this step and door",
        ) from None
    return VerifiedRotating(entry.pass_, step, door)


class ReplayCache:
    """The (pass id, step) pairs already granted here, at most ``capacity`` (oldest
    forgotten first). Size it above the grants a reader makes in (2 x skew + 1) periods:
    an older step is refused as stale anyway. Thread-safe."""

    def __init__(self, capacity: int = 4096) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self._seen: OrderedDict[tuple[bytes, int], None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def seen(self, cti: bytes, step: int) -> bool:
        """True when (cti, step) was added and not yet forgotten."""
        with self._lock:
            return (cti, step) in self._seen

    def add(self, cti: bytes, step: int) -> None:
        """Remember (cti, step), forgetting the oldest pair past capacity."""
        with self._lock:
            self._seen[(cti, step)] = None
            self._seen.move_to_end((cti, step))
            while len(self._seen) > self.capacity:
                self._seen.popitem(last=False)
