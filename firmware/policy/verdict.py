"""The outcome of a scan: a decision with a reason, as stored in the journal and sent upstream."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Why a scan was granted or denied. Stable strings: they go into the journal and MQTT."""

    GRANTED = "granted"
    UNKNOWN = "unknown"
    REVOKED = "revoked"
    MALFORMED = "malformed"
    MULTIPLE_CODES = "multiple_codes"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    REPEAT = "repeat"


@dataclass(frozen=True, slots=True)
class CodeVerdict:
    """The verdict on one payload in view.

    ``subject``: keyed HMAC of the payload (hex), never the payload itself. ``kind``: the
    credential kind that claimed it ("badge", ...). ``length``: payload length in bytes.
    ``backend``: decoder that read it.
    """

    granted: bool
    reason: Reason
    kind: str
    subject: str
    length: int
    backend: str


@dataclass(frozen=True, slots=True)
class Decision:
    """The reader's answer to the codes in one frame.

    ``granted``: open the door. ``reason``: the deciding reason. ``kind``/``subject``: the
    deciding credential (None when several codes decided together). ``codes``: every distinct
    code in view, sorted by subject so the outcome never depends on decoder order.
    ``suppressed``: a repeat inside the repeat window; no feedback, no journal row.
    """

    granted: bool
    reason: Reason
    kind: str | None
    subject: str | None
    codes: tuple[CodeVerdict, ...]
    suppressed: bool = False
