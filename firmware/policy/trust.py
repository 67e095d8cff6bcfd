"""The trust list: the issuer keys whose passes this reader accepts.

Document (JSON)::

    {"keys": [{"kid": "<16 hex>", "alg": "EdDSA" | "ES256",
               "public_key": "<base64 SubjectPublicKeyInfo DER>",
               "iss": "<issuer name>",                  # optional
               "not_before": "<RFC 3339>",              # optional
               "not_after": "<RFC 3339>"}]}             # optional

``kid`` must be the key's id (:func:`firmware.policy.cose.kid_of`); it is checked on loading
so a wrong entry never silently orphans passes. Key rotation: a pass is accepted only if its
``iat`` lies within [not_before, not_after] of the key that signed it, so a retired key signs
no new passes while the older ones live to their ``exp``, whatever the reader's clock says.
If the entry names ``iss``, the pass's ``iss`` must equal it.

The key-file functions live in :mod:`firmware.policy.keys` and are re-exported here.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from firmware.exceptions import CredentialListError
from firmware.policy.cose import ALG_IDS, ALG_NAMES, PublicKey, alg_of, kid_of
from firmware.policy.keys import (
    generate_key,
    load_private_key,
    load_public_key,
    public_key_pem,
    save_private_key,
    save_public_key,
)

__all__ = [
    "IssuerKey",
    "TrustList",
    "generate_key",
    "load_private_key",
    "load_public_key",
    "load_trust",
    "public_key_pem",
    "save_private_key",
    "save_public_key",
    "trust_entry",
]

MAX_TRUST_BYTES = 1024 * 1024
MAX_KEYS = 1000
MAX_PUBLIC_KEY_CHARS = 1024
MAX_ISS_CHARS = 256
ENTRY_KEYS = ("kid", "alg", "public_key", "iss", "not_before", "not_after")
_RFC3339 = re.compile(
    r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})",
    re.ASCII,
)


@dataclass(frozen=True, slots=True)
class IssuerKey:
    """One trusted issuer key.

    ``kid``: 8-byte key id (SHA-256 of the SPKI DER, first 8 bytes). ``alg``: "EdDSA" or
    "ES256". ``public_key``: the loaded key object (parsed once, here, not per scan).
    ``iss``: the issuer name its passes must carry, or None for any. ``not_before`` /
    ``not_after``: the window (seconds since the epoch, inclusive) a pass's ``iat`` must lie
    in, or None for open-ended.
    """

    kid: bytes
    alg: str
    public_key: PublicKey
    iss: str | None = None
    not_before: int | None = None
    not_after: int | None = None

    @classmethod
    def of(
        cls,
        public_key: PublicKey,
        iss: str | None = None,
        not_before: int | None = None,
        not_after: int | None = None,
    ) -> IssuerKey:
        """The entry for ``public_key``, its kid and alg derived. Raises ValueError for an
        unsupported key."""
        alg = ALG_NAMES[alg_of(public_key)]
        return cls(kid_of(public_key), alg, public_key, iss, not_before, not_after)

    @property
    def alg_id(self) -> int:
        """The COSE algorithm number (-8 EdDSA, -7 ES256)."""
        return ALG_IDS[self.alg]

    def valid_at(self, t: int) -> bool:
        """True when ``t`` (seconds since the epoch) lies in [not_before, not_after]."""
        return (self.not_before is None or t >= self.not_before) and (
            self.not_after is None or t <= self.not_after
        )


def _err(where: str, what: str) -> CredentialListError:
    return CredentialListError(f"trust: {where}: {what}")


def rfc3339_to_seconds(text: object, *, round_up: bool = False) -> int:
    """Seconds since the epoch of an RFC 3339 date-time with a time zone offset. A fraction
    of a second rounds down, or up with ``round_up`` (so a window of whole seconds never
    grows past the one written). Raises ValueError."""
    m = _RFC3339.fullmatch(text) if isinstance(text, str) and len(text) <= 40 else None
    if m is None:
        raise ValueError(f"expected an RFC 3339 date-time with an offset, found {text!r:.50}")
    date, time, frac, offset = m.groups()
    offset = "+00:00" if offset in ("Z", "z") else offset
    dt = datetime.fromisoformat(f"{date}T{time}{offset}")  # ValueError: 31 February, hour 24
    seconds = int(dt.timestamp())
    return seconds + 1 if round_up and frac and int(frac) else seconds


def seconds_to_rfc3339(seconds: int) -> str:
    """``seconds`` since the epoch as RFC 3339 UTC ("2030-01-01T00:00:00Z"). Raises
    ValueError (or OverflowError) outside years 1-9999."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def trust_entry(
    public_key: PublicKey,
    iss: str | None = None,
    not_before: int | None = None,
    not_after: int | None = None,
) -> dict[str, Any]:
    """The trust list entry (module docstring) for ``public_key``; ``not_before`` and
    ``not_after`` in seconds since the epoch; None parts are omitted. Raises ValueError for an
    unsupported key."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    entry: dict[str, Any] = {
        "kid": kid_of(public_key).hex(),
        "alg": ALG_NAMES[alg_of(public_key)],
        "public_key": base64.b64encode(der).decode("ascii"),
    }
    if iss is not None:
        entry["iss"] = iss
    if not_before is not None:
        entry["not_before"] = seconds_to_rfc3339(not_before)
    if not_after is not None:
        entry["not_after"] = seconds_to_rfc3339(not_after)
    return entry


def _entry(where: str, raw: object) -> IssuerKey:
    if not isinstance(raw, Mapping):
        raise _err(where, "expected an object {kid, alg, public_key, ...}")
    unknown = sorted(str(k) for k in raw if k not in ENTRY_KEYS)
    if unknown:
        raise _err(where, f"unknown key {unknown[0]!r:.40} (expected {', '.join(ENTRY_KEYS)})")
    kid_hex, alg, pk = raw.get("kid"), raw.get("alg"), raw.get("public_key")
    if alg not in ALG_IDS:
        raise _err(where, f"alg: expected 'EdDSA' or 'ES256', found {alg!r:.40}")
    if not isinstance(kid_hex, str) or not re.fullmatch(r"[0-9a-fA-F]{16}", kid_hex):
        raise _err(where, f"kid: expected 16 hex digits, found {kid_hex!r:.40}")
    kid = bytes.fromhex(kid_hex)
    if not isinstance(pk, str) or len(pk) > MAX_PUBLIC_KEY_CHARS:
        raise _err(where, "public_key: expected base64 SubjectPublicKeyInfo DER")
    try:
        key = serialization.load_der_public_key(base64.b64decode(pk, validate=True))
    except (binascii.Error, ValueError, UnsupportedAlgorithm):
        raise _err(where, "public_key: not a base64 SubjectPublicKeyInfo DER key") from None
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise _err(where, f"public_key: a {type(key).__name__}; expected Ed25519 or P-256")
    try:
        key_alg = ALG_NAMES[alg_of(key)]
    except ValueError as e:
        raise _err(where, f"public_key: {e}") from None
    if key_alg != alg:
        raise _err(where, f"alg {alg} does not match the key, an {key_alg} key")
    if kid_of(key) != kid:
        raise _err(
            where, f"kid {kid_hex} does not match the public key (its kid is {kid_of(key).hex()})"
        )
    iss = raw.get("iss")
    if iss is not None and not (isinstance(iss, str) and 0 < len(iss) <= MAX_ISS_CHARS):
        raise _err(where, f"iss: expected a string of 1-{MAX_ISS_CHARS} characters")
    try:
        nbf = rfc3339_to_seconds(raw["not_before"], round_up=True) if "not_before" in raw else None
    except ValueError as e:
        raise _err(where, f"not_before: {e}") from None
    try:
        naf = rfc3339_to_seconds(raw["not_after"]) if "not_after" in raw else None
    except ValueError as e:
        raise _err(where, f"not_after: {e}") from None
    if nbf is not None and naf is not None and nbf > naf:
        raise _err(where, "not_before is after not_after")
    return IssuerKey(kid, alg, key, iss, nbf, naf)


class TrustList:
    """The trusted issuer keys by kid (bytes): ``get``, ``in``, ``len``, iteration over kids,
    ``values()``. Immutable; build a new one to change it."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Iterable[IssuerKey] = ()) -> None:
        self._keys: dict[bytes, IssuerKey] = {}
        for k in keys:
            if k.kid in self._keys:
                raise ValueError(f"duplicate kid {k.kid.hex()}")
            self._keys[k.kid] = k

    @classmethod
    def empty(cls) -> TrustList:
        """A list trusting no key."""
        return cls()

    @classmethod
    def of(cls, keys: Iterable[IssuerKey]) -> TrustList:
        """A list of ``keys`` (for tests and tools). Raises ValueError for a duplicate kid."""
        return cls(keys)

    def get(self, kid: bytes) -> IssuerKey | None:
        """The :class:`IssuerKey` with ``kid``, or None."""
        return self._keys.get(kid)

    def __getitem__(self, kid: bytes) -> IssuerKey:
        return self._keys[kid]

    def __contains__(self, kid: object) -> bool:
        return kid in self._keys

    def values(self) -> Iterator[IssuerKey]:
        """The keys, in their order."""
        return iter(self._keys.values())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TrustList) and self._keys == other._keys

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[bytes]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"TrustList({[k.hex() for k in self._keys]})"

    @classmethod
    def from_json(cls, doc: object) -> TrustList:
        """Build from the document form (module docstring). Raises CredentialListError
        naming the entry (``keys[3] (kid ...)``)."""
        if not isinstance(doc, Mapping):
            raise _err("document", 'expected an object {"keys": [...]}')
        unknown = sorted(str(k) for k in doc if k != "keys")
        if unknown:
            raise _err("document", f"unknown key {unknown[0]!r:.40} (expected keys)")
        raw_keys = doc.get("keys", [])
        if not isinstance(raw_keys, list):
            raise _err("keys", "expected an array")
        if len(raw_keys) > MAX_KEYS:
            raise _err("keys", f"more than {MAX_KEYS} keys")
        keys: dict[bytes, IssuerKey] = {}
        for i, raw in enumerate(raw_keys):
            kid = raw.get("kid") if isinstance(raw, Mapping) else None
            where = f"keys[{i}]" + (f" (kid {kid:.16})" if isinstance(kid, str) else "")
            key = _entry(where, raw)
            if key.kid in keys:
                raise _err(where, "duplicate kid")
            keys[key.kid] = key
        return cls(keys.values())

    def to_json(self) -> dict[str, Any]:
        """The document form, keys in their order."""
        return {
            "keys": [
                trust_entry(k.public_key, k.iss, k.not_before, k.not_after)
                for k in self._keys.values()
            ]
        }


def load_trust(path: Path | str) -> TrustList:
    """Read and validate a trust list file (at most MAX_TRUST_BYTES). Raises
    CredentialListError naming the file and entry."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = f.read(MAX_TRUST_BYTES + 1)
    except OSError as e:
        raise CredentialListError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > MAX_TRUST_BYTES:
        raise CredentialListError(f"{path}: larger than {MAX_TRUST_BYTES} bytes")
    try:
        doc = json.loads(data)
    except (ValueError, RecursionError) as e:
        raise CredentialListError(f"{path}: not valid JSON: {type(e).__name__}") from None
    try:
        return TrustList.from_json(doc)
    except CredentialListError as e:
        raise CredentialListError(f"{path}: {e}") from None
