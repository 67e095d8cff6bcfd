"""The signed provisioning code: what an installer shows a new reader's camera.

Text: ``QGP1:`` + base45 (RFC 9285) of a tagged COSE_Sign1 (RFC 9052 §4.2), signed with the
fleet's provisioning key (EdDSA/Ed25519, RFC 8032; ES256 works the same way), no zlib (the
payload is mostly random bytes and a signature: compression only makes it longer). Every
character is in the QR alphanumeric set, so the symbol is made in alphanumeric mode. A code
is about 247 characters plus 1.5 per character of fleet, site, door and compact broker (below)
together: fleet ``acme``, site ``hq``, door ``lobby`` and broker
``mqtts://mqtt.acme.example:8883`` (compact ``mqtt.acme.example``) make 289 characters, a
version 10 symbol at error correction M (at most 311 characters, :data:`MAX_V10_CHARS`);
names of up to about 42 characters together fit version 10, longer ones need version 11+.

Payload: a CBOR map (RFC 8949) with integer keys, all required, nothing else (not a CWT:
keys 1-9 are this format's own)::

    1 fleet      tstr  fleet id: 1-64 of A-Z a-z 0-9 . _ -
    2 site       tstr  site name in MQTT topics: 1-64 printable, no / + # space, not "_..."
    3 door       tstr  door name: 1-64 printable characters
    4 direction  uint  0 "in", 1 "out", 2 "both"
    5 broker     tstr  compact broker URL: "host" (mqtts, port 8883), "host:port" (mqtts),
                       or "mqtt://host:port" (plain MQTT: labs only, see allow_plain_mqtt)
    6 ca_fp      bstr  SHA-256 of the DER of the fleet's root or issuing CA certificate (32)
    7 token      bstr  enrollment token, 16 bytes: token id (8) || secret (8)
    8 iat        uint  issued at, seconds since the epoch
    9 exp        uint  expires at, seconds since the epoch (> iat)

The token id is also the code's unique id (``cti``, replay detection): a code is used once.
The enrollment server stores the token id with SHA-256 of the secret
(:func:`token_secret_hash`), never the secret; 64 random secret bits are enough because the
server accepts each token once, before ``exp``, and a guess must be made online.

Verification (:func:`verify_provisioning`) is pure: no I/O, the clock and the used ids are
arguments. COSE itself comes from the caller (``provisioning`` imports nothing from
``firmware``): ``sign`` for issuing, a :class:`Sign1Opener` for reading. Every refusal is
:class:`~provisioning.exceptions.ProvisioningCodeError` with a :class:`Refusal` reason; the
text is capped (:data:`MAX_TEXT_CHARS`) before anything is decoded.

Clock policy: with a trusted clock (``now`` given) ``iat`` and ``exp`` are judged with
``leeway_s`` either way. A reader fresh out of the box usually has no trusted time yet
(``now=None``): the code is then accepted with ``clock_checked=False``, unless its ``exp`` is
already before the reader's clock floor (a time it knows has passed), because the enrollment
server judges the token's ``exp`` again with a trusted clock before it signs anything.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
import secrets
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

import base45
import cbor2

from provisioning.exceptions import ProvisioningCodeError

PREFIX = "QGP1:"
MAX_TEXT_CHARS = 2048  # the whole text; a real code is about 300
MAX_V10_CHARS = 311  # alphanumeric characters in a version 10 symbol at level M (ISO 18004)
MAX_NAME_CHARS = 64
MAX_LIFETIME_S = 30 * 86_400  # issuing refuses longer-lived codes: a code is a bearer secret
DEFAULT_LEEWAY_S = 60
MAX_TIME_S = 253_402_300_799  # 9999-12-31T23:59:59Z
CA_FINGERPRINT_BYTES = 32
TOKEN_ID_BYTES = 8
TOKEN_SECRET_BYTES = 8
MQTTS_PORT = 8883
MQTT_PORT = 1883

C_FLEET, C_SITE, C_DOOR, C_DIRECTION, C_BROKER, C_CA_FP, C_TOKEN, C_IAT, C_EXP = range(1, 10)
DIRECTIONS = ("in", "out", "both")  # index = wire value

_FLEET = re.compile(r"[A-Za-z0-9._-]{1,64}", re.ASCII)
_HOST = re.compile(r"[a-z0-9]([a-z0-9-]{0,62})(\.[a-z0-9]([a-z0-9-]{0,62}))*\.?", re.ASCII)
_BROKER = re.compile(r"(mqtts?)://(\[[^\]/]*\]|[^:/\[\]]*)(?::([0-9]{1,5}))?/?", re.ASCII)
_COMPACT = re.compile(r"(\[[^\]/]*\]|[^:/\[\]]*)(?::([0-9]{1,5}))?", re.ASCII)


class Refusal(StrEnum):
    """Why a code was refused (``ProvisioningCodeError.reason``)."""

    MALFORMED = "malformed"
    UNKNOWN_KEY = "unknown_key"
    BAD_SIGNATURE = "bad_signature"
    WRONG_FLEET = "wrong_fleet"
    NOT_YET_VALID = "not_yet_valid"
    EXPIRED = "expired"
    REPLAYED = "replayed"


NEXT_STEP: Mapping[Refusal, str] = {
    Refusal.MALFORMED: "not a readable provisioning code; show the reader the whole code "
    "again, or ask the administrator for a new one",
    Refusal.UNKNOWN_KEY: "signed by a provisioning key this firmware does not know; ask the "
    "administrator for a code signed with this fleet's key (or install firmware that has it)",
    Refusal.BAD_SIGNATURE: "the signature does not match (forged or damaged); ask the "
    "administrator for a new code",
    Refusal.WRONG_FLEET: "made for another fleet; ask this fleet's administrator for a code",
    Refusal.NOT_YET_VALID: "issued in the future by the reader's clock; check the "
    "administrator's clock and the reader's time, then show the code again",
    Refusal.EXPIRED: "expired; ask the administrator for a new code",
    Refusal.REPLAYED: "already used (each code enrolls one reader once); ask the "
    "administrator for a new code",
}


def refused(reason: Refusal, detail: str, why: str | None = None) -> ProvisioningCodeError:
    """A ProvisioningCodeError for ``reason`` whose message is ``detail`` and the next step."""
    label = f"{reason.value} ({why})" if why else reason.value
    return ProvisioningCodeError(
        reason.value, why, f"provisioning code refused, {label}: {detail}; {NEXT_STEP[reason]}"
    )


def _malformed(why: str, detail: str) -> ProvisioningCodeError:
    return refused(Refusal.MALFORMED, detail, why)


# --- claims ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProvisioningClaims:
    """What a provisioning code says.

    ``fleet``, ``site``, ``door``: names (see the module's table). ``direction``: "in",
    "out" or "both". ``broker``: the canonical URL ``mqtts://host:port`` (or ``mqtt://``,
    labs only); IPv6 hosts in brackets. ``ca_fingerprint``: SHA-256 of the fleet CA
    certificate's DER (32 bytes). ``token_id``, ``token_secret``: 8 random bytes each.
    ``iat``, ``exp``: seconds since the epoch. ``clock_checked``: set by
    :func:`verify_provisioning`, True when ``iat``/``exp`` were judged with a trusted clock
    (ignored when issuing).
    """

    fleet: str
    site: str
    door: str
    direction: str
    broker: str
    ca_fingerprint: bytes
    token_id: bytes
    token_secret: bytes
    iat: int
    exp: int
    clock_checked: bool = field(default=False, compare=False)

    @property
    def cti(self) -> bytes:
        """The code's unique id (replay detection): the token id."""
        return self.token_id

    @property
    def broker_tls(self) -> bool:
        """True for ``mqtts://`` (TLS), False for plain ``mqtt://``."""
        return self.broker.startswith("mqtts://")

    @property
    def broker_host(self) -> str:
        """The broker's host name or address (IPv6 without brackets)."""
        return split_broker(self.broker)[1]

    @property
    def broker_port(self) -> int:
        """The broker's TCP port."""
        return split_broker(self.broker)[2]


def token_secret_hash(secret: bytes) -> bytes:
    """SHA-256 of an enrollment token's secret: what the enrollment server stores."""
    return hashlib.sha256(secret).digest()


def _name(value: object, what: str, *, site: bool = False) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise ValueError(f"{what} must be 1-{MAX_NAME_CHARS} characters")
    if not value.isprintable():
        raise ValueError(f"{what} {value!r:.70} has control characters")
    if site and (any(c in value for c in "/+#\x00 ") or value.startswith("_")):
        raise ValueError(
            f"site {value!r:.70} must be an MQTT topic level: no '/', '+', '#' or spaces, "
            "not starting with '_'"
        )
    return value


def check_fleet(fleet: object) -> str:
    """``fleet`` if it is a fleet id (1-64 of A-Z a-z 0-9 . _ -); else ValueError."""
    if not isinstance(fleet, str) or not _FLEET.fullmatch(fleet):
        raise ValueError(f"fleet id {fleet!r:.70}: use 1-64 letters, digits, '.', '_' or '-'")
    return fleet


def _host(host: str) -> str:
    if host.startswith("["):
        try:
            # compressed: one spelling per address, so the canonical URL is unique
            return ipaddress.IPv6Address(host[1:-1]).compressed
        except ValueError:
            raise ValueError(f"{host!r:.70} is not an IPv6 address") from None
    host = host.lower()
    if len(host) > 253 or not _HOST.fullmatch(host):
        raise ValueError(f"{host!r:.70} is not a host name or IPv4 address")
    return host


def _port(text: str | None, default: int) -> int:
    if text is None:
        return default
    port = int(text)
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is outside 1-65535")
    return port


def _url(tls: bool, host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if tls else 'mqtt'}://{shown}:{port}"


def normalize_broker(url: str, *, allow_plain_mqtt: bool = False) -> str:
    """The canonical form ``mqtts://host:port`` of a broker URL (port 8883 by default; host
    lowercased; a trailing "/" dropped). ``mqtt://`` (no TLS, port 1883 by default) only with
    ``allow_plain_mqtt``, for labs. No user, password, path, query or fragment. Raises
    ValueError (message fit for the user)."""
    m = _BROKER.fullmatch(url.strip()) if isinstance(url, str) else None
    if m is None:
        raise ValueError(
            f"broker {url!r:.80}: expected mqtts://host[:port] (no user, path or query)"
        )
    tls = m.group(1) == "mqtts"
    if not tls and not allow_plain_mqtt:
        raise ValueError(
            "plain mqtt:// sends the enrollment token unencrypted; use mqtts:// (a lab "
            "broker without TLS needs the explicit allow-plain-MQTT option)"
        )
    return _url(tls, _host(m.group(2)), _port(m.group(3), MQTTS_PORT if tls else MQTT_PORT))


def split_broker(url: str) -> tuple[bool, str, int]:
    """(TLS?, host, port) of a canonical broker URL (IPv6 host without brackets). Raises
    ValueError."""
    m = _BROKER.fullmatch(url)
    if m is None:
        raise ValueError(f"not a broker URL: {url!r:.80}")
    tls = m.group(1) == "mqtts"
    return tls, _host(m.group(2)), _port(m.group(3), MQTTS_PORT if tls else MQTT_PORT)


def _compact_broker(url: str) -> str:
    tls, host, port = split_broker(url)
    if not tls:
        return _url(tls, host, port)
    shown = f"[{host}]" if ":" in host else host
    return shown if port == MQTTS_PORT else f"{shown}:{port}"


def _expand_broker(compact: str, allow_plain_mqtt: bool) -> str:
    if compact.startswith("mqtt://"):
        return normalize_broker(compact, allow_plain_mqtt=allow_plain_mqtt)
    m = _COMPACT.fullmatch(compact)
    if m is None:
        raise ValueError(f"broker {compact!r:.80} is not host[:port]")
    return _url(True, _host(m.group(1)), _port(m.group(2), MQTTS_PORT))


def check_claims(claims: ProvisioningClaims, *, allow_plain_mqtt: bool = False) -> None:
    """Check every claim's type and range (names, direction, canonical broker URL, sizes,
    0 < iat < exp ≤ year 9999). Raises ValueError naming the claim."""
    check_fleet(claims.fleet)
    _name(claims.site, "site", site=True)
    _name(claims.door, "door")
    if claims.direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {', '.join(DIRECTIONS)}")
    if normalize_broker(claims.broker, allow_plain_mqtt=allow_plain_mqtt) != claims.broker:
        raise ValueError(f"broker {claims.broker!r:.80} is not in canonical form")
    for value, size, what in (
        (claims.ca_fingerprint, CA_FINGERPRINT_BYTES, "CA fingerprint"),
        (claims.token_id, TOKEN_ID_BYTES, "token id"),
        (claims.token_secret, TOKEN_SECRET_BYTES, "token secret"),
    ):
        if not isinstance(value, bytes) or len(value) != size:
            raise ValueError(f"the {what} must be {size} bytes")
    for t, what in ((claims.iat, "iat"), (claims.exp, "exp")):
        if type(t) is not int or not 0 < t <= MAX_TIME_S:
            raise ValueError(f"{what} must be whole seconds since the epoch, before 9999")
    if claims.exp <= claims.iat:
        raise ValueError("exp must be after iat")


def new_claims(  # noqa: PLR0917 - every claim is required; keywords read better but are optional
    fleet: str,
    site: str,
    door: str,
    direction: str,
    broker: str,
    ca_fingerprint: bytes,
    iat: int,
    exp: int,
    *,
    allow_plain_mqtt: bool = False,
) -> ProvisioningClaims:
    """Claims for a new code, with a fresh random enrollment token (``secrets``). ``broker``
    is normalized (:func:`normalize_broker`). Raises ValueError (see :func:`check_claims`;
    also a lifetime ``exp - iat`` above :data:`MAX_LIFETIME_S`)."""
    claims = ProvisioningClaims(
        fleet=fleet,
        site=site,
        door=door,
        direction=direction,
        broker=normalize_broker(broker, allow_plain_mqtt=allow_plain_mqtt),
        ca_fingerprint=ca_fingerprint,
        token_id=secrets.token_bytes(TOKEN_ID_BYTES),
        token_secret=secrets.token_bytes(TOKEN_SECRET_BYTES),
        iat=iat,
        exp=exp,
    )
    check_claims(claims, allow_plain_mqtt=allow_plain_mqtt)
    if claims.exp - claims.iat > MAX_LIFETIME_S:
        raise ValueError(
            f"a provisioning code may live at most {MAX_LIFETIME_S // 86_400} days: it enrolls "
            "any reader that sees it"
        )
    return claims


def encode_claims(claims: ProvisioningClaims) -> bytes:
    """The CBOR payload of ``claims`` (the table in the module docstring). Raises ValueError
    for claims that :func:`check_claims` refuses (plain MQTT is allowed here)."""
    check_claims(claims, allow_plain_mqtt=True)
    return cbor2.dumps(
        {
            C_FLEET: claims.fleet,
            C_SITE: claims.site,
            C_DOOR: claims.door,
            C_DIRECTION: DIRECTIONS.index(claims.direction),
            C_BROKER: _compact_broker(claims.broker),
            C_CA_FP: claims.ca_fingerprint,
            C_TOKEN: claims.token_id + claims.token_secret,
            C_IAT: claims.iat,
            C_EXP: claims.exp,
        }
    )


def decode_claims(payload: bytes, *, allow_plain_mqtt: bool = False) -> ProvisioningClaims:
    """The claims in a verified payload. Raises ProvisioningCodeError(malformed, why) with
    why "claims" (not a map of exactly keys 1-9 with the right types and ranges), "broker"
    or "plain_mqtt" (mqtt:// without ``allow_plain_mqtt``)."""
    try:
        # the payload is signed by the fleet's key by now, so cbor2's tag decoders only see
        # what an administrator's tool wrote; anything it cannot decode is malformed
        raw: Any = cbor2.loads(payload)
    except Exception as e:
        raise _malformed("claims", f"the payload is not CBOR ({type(e).__name__})") from None
    if not isinstance(raw, dict) or set(raw) != set(range(C_FLEET, C_EXP + 1)):
        raise _malformed("claims", "the payload must be a map of exactly the claims 1-9")
    direction, compact, token = raw[C_DIRECTION], raw[C_BROKER], raw[C_TOKEN]
    if type(direction) is not int or not 0 <= direction < len(DIRECTIONS):
        raise _malformed("claims", "direction must be 0, 1 or 2")
    if not isinstance(token, bytes) or len(token) != TOKEN_ID_BYTES + TOKEN_SECRET_BYTES:
        raise _malformed("claims", "the enrollment token must be 16 bytes")
    if not isinstance(compact, str):
        raise _malformed("claims", "the broker must be a text string")
    if compact.startswith("mqtt://") and not allow_plain_mqtt:
        raise _malformed("plain_mqtt", "the broker is plain mqtt://, refused outside labs")
    try:
        broker = _expand_broker(compact, allow_plain_mqtt)
    except ValueError as e:
        raise _malformed("broker", str(e)) from None
    claims = ProvisioningClaims(
        fleet=raw[C_FLEET],
        site=raw[C_SITE],
        door=raw[C_DOOR],
        direction=DIRECTIONS[direction],
        broker=broker,
        ca_fingerprint=raw[C_CA_FP],
        token_id=token[:TOKEN_ID_BYTES],
        token_secret=token[TOKEN_ID_BYTES:],
        iat=raw[C_IAT],
        exp=raw[C_EXP],
    )
    try:
        check_claims(claims, allow_plain_mqtt=allow_plain_mqtt)
    except ValueError as e:
        raise _malformed("claims", str(e)) from None
    return claims


# --- the code ----------------------------------------------------------------------------------


def issue_provisioning(claims: ProvisioningClaims, sign: Callable[[bytes], bytes]) -> str:
    """The code text for ``claims``: ``QGP1:`` + base45 of ``sign(payload)``.

    ``sign`` takes the CBOR payload and returns a tagged COSE_Sign1 over it (the caller binds
    the key and kid: ``firmware.admin.provision.signer``). Raises ValueError for claims that
    would not read back equal, or a text over :data:`MAX_TEXT_CHARS`."""
    payload = encode_claims(claims)
    try:
        back = decode_claims(payload, allow_plain_mqtt=True)
    except ProvisioningCodeError as e:
        raise ValueError(f"cannot issue the code: {e}") from None
    if back != claims:
        raise ValueError("cannot issue the code: the claims would not read back equal")
    text: str = PREFIX + base45.b45encode(sign(payload)).decode("ascii")
    if len(text) > MAX_TEXT_CHARS:
        raise ValueError(f"the code would be {len(text)} characters (cap {MAX_TEXT_CHARS})")
    return text


class ParsedSign1(Protocol):
    """What :func:`verify_provisioning` needs of a parsed COSE_Sign1: its key id and its
    attached payload (``firmware.policy.cose.Sign1`` has both)."""

    @property
    def kid(self) -> bytes: ...

    @property
    def payload(self) -> bytes: ...


S = TypeVar("S", bound=ParsedSign1)
K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Sign1Opener(Generic[S, K]):
    """COSE_Sign1 reading, supplied by the caller.

    ``parse(data)``: the structurally checked COSE_Sign1 in ``data`` (hostile bytes, at most
    :data:`MAX_TEXT_CHARS` worth), no signature check; raises ValueError (message: a short
    reason) for anything malformed, and nothing else. ``verify(parsed, key)``: True when the
    signature is good for ``key`` (and the header's algorithm suits it), else False; never
    raises for a bad signature."""

    parse: Callable[[bytes], S]
    verify: Callable[[S, K], bool]


def read_text(text: str | bytes) -> bytes:
    """The COSE bytes in a code text (``str`` or the ASCII ``bytes`` a decoder returns):
    length cap, prefix, base45. No COSE or signature check. Raises
    ProvisioningCodeError(malformed, why) with why "too_large", "not_ascii", "prefix" or
    "base45"."""
    if len(text) > MAX_TEXT_CHARS:
        raise _malformed("too_large", f"{len(text)} characters (cap {MAX_TEXT_CHARS})")
    if isinstance(text, bytes):
        if not text.isascii():
            raise _malformed("not_ascii", "the code text is not ASCII")
        text = text.decode("ascii")
    elif not text.isascii():
        raise _malformed("not_ascii", "the code text is not ASCII")
    if not text.startswith(PREFIX):
        raise _malformed("prefix", f"expected the prefix {PREFIX}")
    try:
        data: bytes = base45.b45decode(text[len(PREFIX) :])
    except (ValueError, TypeError):
        raise _malformed("base45", "not base45 (RFC 9285) after the prefix") from None
    return data


def verify_provisioning(
    text: str | bytes,
    *,
    opener: Sign1Opener[S, K],
    public_keys: Mapping[bytes, K],
    fleet: str,
    now: int | None,
    seen: Container[bytes] = (),
    clock_floor: int | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
    allow_plain_mqtt: bool = False,
) -> ProvisioningClaims:
    """Read and check a provisioning code; no I/O.

    ``public_keys``: the fleet's provisioning public keys by kid. ``fleet``: this firmware's
    fleet id. ``now``: trusted seconds since the epoch, or None when the reader's clock is not
    trusted (then only ``clock_floor``, a time known to have passed, can show the code
    expired; the result has ``clock_checked=False``). ``seen``: token ids (cti) already used.
    ``leeway_s``: clock skew allowed either way. ``allow_plain_mqtt``: accept an ``mqtt://``
    broker (labs).

    Order: text (cap, prefix, base45), COSE structure, key by kid, signature, claims, fleet,
    times, replay. Raises ProvisioningCodeError (and nothing else) with reason "malformed"
    (why "too_large", "not_ascii", "prefix", "base45", "cose", "claims", "broker",
    "plain_mqtt"), "unknown_key", "bad_signature", "wrong_fleet", "not_yet_valid", "expired"
    or "replayed"."""
    data = read_text(text)
    try:
        parsed = opener.parse(data)
    except ValueError as e:
        raise _malformed("cose", f"not a COSE_Sign1 ({e!s:.80})") from None
    key = public_keys.get(parsed.kid)
    if key is None:
        raise refused(Refusal.UNKNOWN_KEY, f"key id {parsed.kid.hex()}")
    if not opener.verify(parsed, key):
        raise refused(Refusal.BAD_SIGNATURE, f"not signed by key {parsed.kid.hex()}")
    claims = decode_claims(parsed.payload, allow_plain_mqtt=allow_plain_mqtt)
    if claims.fleet != fleet:
        raise refused(Refusal.WRONG_FLEET, f"the code is for fleet {claims.fleet!r}")
    if now is not None:
        if claims.iat > now + leeway_s:
            raise refused(Refusal.NOT_YET_VALID, f"issued {claims.iat - now} s from now")
        if now >= claims.exp + leeway_s:
            raise refused(Refusal.EXPIRED, f"expired {now - claims.exp} s ago")
    elif clock_floor is not None and clock_floor >= claims.exp + leeway_s:
        raise refused(Refusal.EXPIRED, "expired before the reader's last known time")
    if claims.token_id in seen:
        raise refused(Refusal.REPLAYED, f"token {claims.token_id.hex()}")
    return replace(claims, clock_checked=now is not None)
