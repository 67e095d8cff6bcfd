"""What a credential kind is given to check one payload, and what it answers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from firmware.clock import ClockState
from firmware.policy.verdict import Reason

if TYPE_CHECKING:
    from firmware.policy.credentials import CredentialSet


@dataclass(frozen=True, slots=True)
class ScanContext:
    """One payload's circumstances.

    ``wall_s``: wall clock, seconds since the epoch. ``clock``: how far it can be trusted.
    ``floor_s``: a lower bound for the true time (0.0 when unknown). ``door``/``zones``: this
    reader's door and the zones it belongs to. ``subject``: keyed HMAC of the payload (hex).
    ``hmac``: the site's keyed HMAC, for kinds that name a subject by something other than
    the whole payload (an ID card by its ID number). ``credentials``: the set in force.
    """

    wall_s: float
    clock: ClockState
    floor_s: float
    door: str
    zones: frozenset[str]
    subject: str
    hmac: Callable[[bytes], str]
    credentials: CredentialSet


@dataclass(frozen=True, slots=True)
class Check:
    """A kind's answer for one payload.

    ``granted``/``reason``: the verdict. ``why``: a precise sub-reason or None. ``subject``:
    replaces the payload HMAC as the event's subject (e.g. the HMAC of a pass's holder, so all
    of one person's passes share it). ``detail``: kept in the event (pass id, issuer, a masked
    identity), never a raw payload. ``valid``: well formed, authentic, not revoked and in
    date, before any door or schedule rule. ``identity``: names the credential behind a
    changing payload (a rotating pass's id), so a code that rotates while held up is a repeat,
    not a second scan. ``on_grant``: called once the frame's decision is a grant that is
    acted on (a rotating code's step is spent then, not when it is merely checked).
    """

    granted: bool
    reason: Reason
    why: str | None = None
    subject: str | None = None
    detail: Mapping[str, Any] | None = None
    valid: bool = False
    identity: bytes | None = None
    on_grant: Callable[[], None] | None = None


class CredentialKind(Protocol):
    """A kind of credential (badge, signed pass, rotating pass, ID card...)."""

    name: str

    def claims(self, payload: bytes) -> bool:
        """True when this kind understands ``payload`` (cheap: a prefix test)."""
        ...

    def check(self, payload: bytes, ctx: ScanContext) -> Check:
        """The verdict on one payload this kind claims.

        Must not raise for hostile input: a payload it claims but cannot parse is
        ``Reason.MALFORMED`` (or a more precise reason) with a ``why``.
        """
        ...
