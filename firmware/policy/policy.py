"""The verdict: a pure function of (codes in view, credential state, repeat window, clocks).

Credential kinds plug in through :class:`CredentialKind`: each claims the payloads it
understands (by prefix, say) and checks them. The first kind that claims a payload decides it;
the badge kind claims everything and goes last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from firmware.decoding.codes import DecodedCode
from firmware.policy.repeat import RepeatWindow
from firmware.policy.subjects import SubjectHasher
from firmware.policy.verdict import CodeVerdict, Decision, Reason


class CredentialKind(Protocol):
    """A kind of credential (badge, signed pass, rotating pass, ID card...)."""

    name: str

    def claims(self, payload: bytes) -> bool:
        """True when this kind understands ``payload`` (cheap: a prefix test)."""
        ...

    def check(self, payload: bytes, subject: str, wall_ns: int) -> tuple[bool, Reason]:
        """(granted, reason) for one payload at wall time ``wall_ns`` (ns since the epoch).

        Must not raise for hostile input: a payload it claims but cannot parse is
        ``Reason.MALFORMED``.
        """
        ...


class Policy:
    """Decides on the codes in one frame.

    ``kinds``: credential kinds in claim order. ``hasher``: keyed HMAC naming subjects.
    ``max_payload``: bytes; a longer payload is malformed without being checked.
    """

    def __init__(
        self, kinds: Sequence[CredentialKind], hasher: SubjectHasher, max_payload: int = 4096
    ) -> None:
        self.kinds = tuple(kinds)
        self.hasher = hasher
        self.max_payload = max_payload

    def _one(self, code: DecodedCode, wall_ns: int) -> CodeVerdict:
        payload = code.payload
        subject = self.hasher.subject(payload)
        kind_name = "unknown"
        if not code.exact:
            granted, reason = False, Reason.UNSUPPORTED_ENCODING
        elif not payload or len(payload) > self.max_payload:
            granted, reason = False, Reason.MALFORMED
        else:
            granted, reason = False, Reason.UNKNOWN
            for kind in self.kinds:
                if kind.claims(payload):
                    kind_name = kind.name
                    granted, reason = kind.check(payload, subject, wall_ns)
                    break
        return CodeVerdict(granted, reason, kind_name, subject, len(payload), code.backend)

    def decide(
        self, codes: Sequence[DecodedCode], seen: RepeatWindow, mono_ns: int, wall_ns: int
    ) -> Decision | None:
        """The decision for the codes in one frame, or None when there are none.

        ``seen`` is only read here (the caller records the codes afterwards with
        ``seen.observe``). A frame whose every distinct payload is inside the repeat window
        gives a ``suppressed`` decision. Several distinct codes: denied, ``revoked`` if any is
        revoked, else ``multiple_codes`` ("one code at a time").
        """
        distinct: dict[bytes, DecodedCode] = {}
        for c in codes:
            # an exact read wins over a mangled one of the same payload
            if c.payload not in distinct or (c.exact and not distinct[c.payload].exact):
                distinct[c.payload] = c
        if not distinct:
            return None
        if all(seen.is_recent(p, mono_ns) for p in distinct):
            return Decision(False, Reason.REPEAT, None, None, (), suppressed=True)
        verdicts = tuple(
            sorted((self._one(c, wall_ns) for c in distinct.values()), key=lambda v: v.subject)
        )
        if len(verdicts) == 1:
            v = verdicts[0]
            return Decision(v.granted, v.reason, v.kind, v.subject, verdicts)
        # A granted code must never mask a revoked one; verdicts are sorted by subject so the
        # answer does not depend on the order the decoder listed the codes.
        revoked = [v for v in verdicts if v.reason is Reason.REVOKED]
        if revoked:
            return Decision(False, Reason.REVOKED, revoked[0].kind, revoked[0].subject, verdicts)
        return Decision(False, Reason.MULTIPLE_CODES, None, None, verdicts)
