"""The verdict: a pure function of (codes in view, credential set, repeat window, clocks).

Credential kinds plug in through :class:`firmware.policy.context.CredentialKind`: each claims
the payloads it understands (by prefix, say) and checks them. The first kind that claims a
payload decides it; the badge kind claims everything and goes last.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from firmware.clock import ClockState
from firmware.decoding.codes import DecodedCode
from firmware.policy.context import Check, CredentialKind, ScanContext
from firmware.policy.credentials import CredentialSet
from firmware.policy.repeat import RepeatWindow
from firmware.policy.subjects import SubjectHasher
from firmware.policy.verdict import CodeVerdict, Decision, Reason

log = logging.getLogger(__name__)


class ClockSource(Protocol):
    """The clock's trust (:class:`firmware.clock.ClockTrust` in the daemon)."""

    def state(self) -> ClockState:
        """Cached, non-blocking."""
        ...

    def floor_s(self) -> float:
        """A lower bound for the true time, seconds since the epoch."""
        ...


class FixedClock:
    """A clock whose trust never changes (tools and tests). ``floor`` in seconds."""

    def __init__(self, state: ClockState = ClockState.UNTRUSTED, floor: float = 0.0) -> None:
        self._state, self._floor = state, floor

    def state(self) -> ClockState:
        """The fixed state."""
        return self._state

    def floor_s(self) -> float:
        """The fixed floor."""
        return self._floor


class Policy:
    """Decides on the codes in one frame.

    ``kinds``: credential kinds in claim order. ``hasher``: keyed HMAC naming subjects.
    ``max_payload``: bytes; a longer payload is malformed without being checked.
    ``credentials``: the set in force; replace the attribute whole to swap it (a scan sees the
    old set or the new one). ``clock``: the clock's trust (default: never trusted, so a
    time-limited credential is never granted on an unknown clock). ``door``/``zones``: this
    reader's door and zones.
    """

    def __init__(
        self,
        kinds: Sequence[CredentialKind],
        hasher: SubjectHasher,
        max_payload: int = 4096,
        *,
        credentials: CredentialSet | None = None,
        clock: ClockSource | None = None,
        door: str = "door-1",
        zones: Iterable[str] = (),
    ) -> None:
        self.kinds = tuple(kinds)
        self.hasher = hasher
        self.max_payload = max_payload
        self.credentials = credentials or CredentialSet()
        self.clock: ClockSource = clock or FixedClock()
        self.door, self.zones = door, frozenset(zones)
        self.internal_errors = 0

    def context(self, subject: str, wall_ns: int) -> ScanContext:
        """The circumstances of one payload decided at ``wall_ns`` (ns since the epoch)."""
        return ScanContext(
            wall_s=wall_ns / 1e9,
            clock=self.clock.state(),
            floor_s=self.clock.floor_s(),
            door=self.door,
            zones=self.zones,
            subject=subject,
            hmac=self.hasher.subject,
            credentials=self.credentials,
        )

    def check(self, payload: bytes, wall_ns: int, exact: bool = True) -> tuple[str, Check]:
        """(kind name, check) for one payload: what ``qrgate pass inspect`` shows.

        Never raises: a kind that fails on a payload denies it (fail-secure) with why
        ``internal_error``, logged and counted in ``internal_errors``."""
        subject = self.hasher.subject(payload)
        if not exact:
            return "unknown", Check(False, Reason.UNSUPPORTED_ENCODING, subject=subject)
        if not payload or len(payload) > self.max_payload:
            return "unknown", Check(False, Reason.MALFORMED, "length", subject=subject)
        for kind in self.kinds:
            if kind.claims(payload):
                try:
                    return kind.name, kind.check(payload, self.context(subject, wall_ns))
                except Exception:
                    self.internal_errors += 1
                    log.exception("%s check failed on a %d-byte payload", kind.name, len(payload))
                    return kind.name, Check(False, Reason.MALFORMED, "internal_error")
        return "unknown", Check(False, Reason.UNKNOWN)

    def _one(self, code: DecodedCode, wall_ns: int) -> tuple[CodeVerdict, Check]:
        kind, c = self.check(code.payload, wall_ns, code.exact)
        subject = c.subject or self.hasher.subject(code.payload)
        return CodeVerdict(
            c.granted,
            c.reason,
            kind,
            subject,
            len(code.payload),
            code.backend,
            c.why,
            c.detail,
            c.valid,
        ), c

    def decide(
        self, codes: Sequence[DecodedCode], seen: RepeatWindow, mono_ns: int, wall_ns: int
    ) -> Decision | None:
        """The decision for the codes in one frame, or None when there are none.

        ``seen`` is only read here (the caller records the codes and the decision's
        ``seen_keys`` afterwards with ``seen.observe``). A frame whose every distinct payload
        is inside the repeat window gives a ``suppressed`` decision, and so does a rotating
        code of a pass that was in view inside the window (it rotated while held up).
        Several distinct codes: denied, ``revoked`` if any is revoked, else
        ``multiple_codes`` ("one code at a time").
        """
        distinct: dict[bytes, DecodedCode] = {}
        for dc in codes:
            # an exact read wins over a mangled one of the same payload
            if dc.payload not in distinct or (dc.exact and not distinct[dc.payload].exact):
                distinct[dc.payload] = dc
        if not distinct:
            return None
        if all(seen.is_recent(p, mono_ns) for p in distinct):
            return Decision(False, Reason.REPEAT, None, None, (), suppressed=True)
        checked = sorted(
            (self._one(dc, wall_ns) for dc in distinct.values()), key=lambda p: p[0].subject
        )
        verdicts = tuple(v for v, _ in checked)
        clock = {"clock": str(self.clock.state())}
        if len(verdicts) == 1:
            v, c = checked[0]
            keys = (c.identity,) if c.identity is not None else ()
            if c.identity is not None and seen.is_recent(c.identity, mono_ns):
                return Decision(
                    False, Reason.REPEAT, None, None, (), suppressed=True, seen_keys=keys
                )
            detail = {**clock, **(v.detail or {})}
            if v.why:
                detail["why"] = v.why
            if c.granted and c.on_grant is not None:
                c.on_grant()
            return Decision(
                v.granted, v.reason, v.kind, v.subject, verdicts, detail=detail, seen_keys=keys
            )
        # A granted code must never mask a revoked one; verdicts are sorted by subject so the
        # answer does not depend on the order the decoder listed the codes.
        revoked = [v for v in verdicts if v.reason is Reason.REVOKED]
        if revoked:
            r = revoked[0]
            return Decision(False, Reason.REVOKED, r.kind, r.subject, verdicts, detail=clock)
        return Decision(False, Reason.MULTIPLE_CODES, None, None, verdicts, detail=clock)
