"""The outcome of a scan: a decision with a reason, as stored in the journal and sent upstream."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    """Why a scan was granted or denied. Stable strings: they go into the journal and MQTT."""

    GRANTED = "granted"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    MALFORMED = "malformed"
    MULTIPLE_CODES = "multiple_codes"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    REPEAT = "repeat"
    # signed and rotating passes (RFC 8392 CWT in RFC 9052 COSE_Sign1)
    BAD_SIGNATURE = "bad_signature"
    UNKNOWN_ISSUER = "unknown_issuer"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    WRONG_DOOR = "wrong_door"
    OUTSIDE_SCHEDULE = "outside_schedule"
    STALE_CODE = "stale_code"  # a rotating code outside the current time step: a screenshot
    REPLAYED = "replayed"  # a rotating code whose time step was already used here
    CLOCK_UNTRUSTED = "clock_untrusted"  # a time-limited credential while the clock is untrusted
    # identity cards (check-in)
    INVALID_ID_CARD = "invalid_id_card"
    NOT_ENROLLED = "not_enrolled"  # a well-formed card this access reader has no grant for


@dataclass(frozen=True, slots=True)
class CodeVerdict:
    """The verdict on one payload in view.

    ``subject``: keyed HMAC of the payload (hex), never the payload itself. ``kind``: the
    credential kind that claimed it ("badge", ...). ``length``: payload length in bytes.
    ``backend``: decoder that read it. ``why``: a precise sub-reason ("id_digits",
    "rotating_pass_shown_static") or None. ``detail``: what the event keeps about the
    credential (pass id, issuer, a masked identity), never the raw payload. ``valid``: the
    credential is well formed, authentic, not revoked and in date, before any door or schedule
    rule (what ``qrgate pass inspect`` reports).
    """

    granted: bool
    reason: Reason
    kind: str
    subject: str
    length: int
    backend: str
    why: str | None = None
    detail: Mapping[str, Any] | None = None
    valid: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """The reader's answer to the codes in one frame.

    ``granted``: open the door. ``reason``: the deciding reason. ``kind``/``subject``: the
    deciding credential (None when several codes decided together). ``codes``: every distinct
    code in view, sorted by subject so the outcome never depends on decoder order.
    ``suppressed``: a repeat inside the repeat window; no feedback, no journal row.
    ``detail``: kept in the event's detail: the clock's trust state ("clock") and the deciding
    code's ``why`` and ``detail``. ``seen_keys``: besides the payloads, what the repeat
    window records as in view (a rotating pass's id).
    """

    granted: bool
    reason: Reason
    kind: str | None
    subject: str | None
    codes: tuple[CodeVerdict, ...]
    suppressed: bool = False
    detail: Mapping[str, Any] | None = None
    seen_keys: tuple[bytes, ...] = ()
