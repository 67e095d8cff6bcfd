"""The credential kinds a reader understands, in claim order: signed pass (``QG1:``), rotating
pass (``QGR1:``), ID card (CCCD) and 2021 personal QR, and the badge (everything else).

Each kind turns one payload into a :class:`~firmware.policy.context.Check`; the order of the
rules inside a kind is the order a person would want the reason in: is it ours and intact,
is it revoked, is it in date, is it for this door, is it for this hour, was it used already.

Clock policy (field case C21), per kind:

=====================  ==========================  =======================================
kind                   clock synced or holdover    clock untrusted
=====================  ==========================  =======================================
signed pass            exp/nbf ± leeway, schedule  denied ``clock_untrusted``; ``expired``
                                                   when it expired before the clock's floor
rotating pass          as above, and the step      denied ``clock_untrusted`` (as above)
badge                  no time rule                no time rule: granted if on the list
ID card / personal QR  no time rule                no time rule (check-in logs the clock)
=====================  ==========================  =======================================

A reader never grants because its clock is wrong: with an untrusted clock a slow clock could
make an expired pass look valid, so no time-limited credential is granted at all. The floor
(the newest time ever seen while synced) is certain, so a pass that expired before it is
called expired, which tells the holder the truth.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from firmware.clock import ClockState
from firmware.exceptions import CredentialError
from firmware.policy.checkin import (
    KEEP_DEFAULT,
    IdCard,
    PersonalQr,
    looks_like_personal_qr,
    parse_cccd,
    parse_personal_qr,
    person_record,
)
from firmware.policy.context import Check, ScanContext
from firmware.policy.denylist import key_for_cti, key_for_subject
from firmware.policy.passes import (
    PASS_PREFIX,
    ROTATING_PREFIX,
    PassClaims,
    ReplayCache,
    VerifiedCache,
    check_step,
    check_time,
    read_pass,
    read_rotating,
)
from firmware.policy.verdict import Reason

# Anything that starts like an ID number and a field separator is an ID card attempt, so a
# card with a mistyped number is answered "invalid_id_card: ID has 11 digits", not "unknown".
_ID_SHAPE = re.compile(rb"^(?:\xef\xbb\xbf)?[0-9]{6,15}\|")


@dataclass(frozen=True)
class PassRules:
    """How passes are judged. ``leeway_s``: seconds allowed either side of exp/nbf.
    ``skew_steps``: rotating-code steps accepted either side of the current one."""

    leeway_s: float = 60.0
    skew_steps: int = 1


def pass_subject(ctx: ScanContext, claims: PassClaims) -> str:
    """The event subject of a pass: keyed HMAC of (issuer, holder), so every pass of one
    holder shares it and the journal never holds the holder's name."""
    return ctx.hmac(key_for_subject(claims.iss, claims.sub))


def _revoked(ctx: ScanContext, claims: PassClaims) -> str | None:
    deny = ctx.credentials.denylist
    if key_for_cti(claims.cti) in deny:
        return "pass_revoked"
    if key_for_subject(claims.iss, claims.sub) in deny:
        return "holder_revoked"
    return None


def _time_rule(ctx: ScanContext, claims: PassClaims, rules: PassRules) -> Check | None:
    if ctx.clock is ClockState.UNTRUSTED:
        if ctx.floor_s >= claims.exp + rules.leeway_s:
            return Check(False, Reason.EXPIRED, "expired_before_clock_floor")
        return Check(False, Reason.CLOCK_UNTRUSTED, "time_limited_credential")
    reason = check_time(claims, ctx.wall_s, rules.leeway_s)
    return Check(False, reason) if reason is not None else None


def _door_rule(ctx: ScanContext, claims: PassClaims) -> bool:
    doors, zones = claims.doors or (), claims.zones or ()
    return "*" in doors or ctx.door in doors or not ctx.zones.isdisjoint(zones)


def judge_pass(
    ctx: ScanContext, claims: PassClaims, rules: PassRules, base: dict[str, Any]
) -> Check:
    """The rules after authenticity, shared by signed and rotating passes: revoked, time,
    door or zone, schedule. ``base``: the event detail so far (pass id, issuer)."""
    subject = pass_subject(ctx, claims)
    why = _revoked(ctx, claims)
    if why is not None:
        return Check(False, Reason.REVOKED, why, subject, base)
    t = _time_rule(ctx, claims, rules)
    if t is not None:
        return Check(False, t.reason, t.why, subject, base)
    if not _door_rule(ctx, claims):
        return Check(False, Reason.WRONG_DOOR, "not_for_this_door", subject, base, valid=True)
    if claims.schedule is not None:
        allowed = ctx.credentials.schedules.allows(claims.schedule, ctx.wall_s)
        if allowed is None:
            return Check(False, Reason.OUTSIDE_SCHEDULE, "unknown_schedule", subject, base, True)
        if not allowed:
            return Check(False, Reason.OUTSIDE_SCHEDULE, None, subject, base, valid=True)
    return Check(True, Reason.GRANTED, None, subject, base, valid=True)


def _pass_detail(claims: PassClaims, kid: bytes) -> dict[str, Any]:
    return {"pass_id": claims.cti.hex(), "iss": claims.iss, "kid": kid.hex()}


class SignedPassKind:
    """``QG1:`` signed passes (RFC 8392 CWT in RFC 9052 COSE_Sign1), verified with the
    issuer public keys of the credential set's trust list."""

    name = "signed_pass"

    def __init__(self, rules: PassRules | None = None) -> None:
        self.rules = rules or PassRules()

    def claims(self, payload: bytes) -> bool:
        """A ``QG1:`` prefix."""
        return payload.startswith(PASS_PREFIX)

    def check(self, payload: bytes, ctx: ScanContext) -> Check:
        """Authentic (PassError reasons), then :func:`judge_pass`."""
        try:
            vp = read_pass(payload, ctx.credentials.trust)
        except CredentialError as e:
            return Check(False, Reason(e.reason), e.why)
        return judge_pass(ctx, vp.claims, self.rules, _pass_detail(vp.claims, vp.kid))


class RotatingPassKind:
    """``QGR1:`` rotating codes: an issuer-signed pass binding a holder key, plus the
    holder's signature over the current time step (and door). A screenshot stops working
    after ``skew_steps`` steps; a step is granted once per reader (``replay``)."""

    name = "rotating_pass"

    def __init__(
        self,
        rules: PassRules | None = None,
        replay: ReplayCache | None = None,
        verified: VerifiedCache | None = None,
    ) -> None:
        self.rules = rules or PassRules()
        self.replay = replay or ReplayCache()
        self.verified = verified or VerifiedCache()

    def claims(self, payload: bytes) -> bool:
        """A ``QGR1:`` prefix."""
        return payload.startswith(ROTATING_PREFIX)

    def check(self, payload: bytes, ctx: ScanContext) -> Check:
        """Both signatures, then revoked and time (:func:`judge_pass` order), the step
        (``stale_code``), the code's door, the pass's door and schedule, and replay."""
        try:
            vr = read_rotating(payload, ctx.credentials.trust, self.verified)
        except CredentialError as e:
            return Check(False, Reason(e.reason), e.why)
        claims = vr.pass_.claims
        detail = {**_pass_detail(claims, vr.pass_.kid), "step": vr.step}
        subject = pass_subject(ctx, claims)
        verdict = judge_pass(ctx, claims, self.rules, detail)
        if not verdict.granted and verdict.reason is not Reason.WRONG_DOOR:
            return verdict
        stale = check_step(vr.step, ctx.wall_s, claims.period_s, self.rules.skew_steps)
        if stale is not None:
            return Check(False, stale, "step_out_of_range", subject, detail, valid=False)
        if vr.door is not None and vr.door != ctx.door:
            return Check(False, Reason.WRONG_DOOR, "code_for_another_door", subject, detail, True)
        if not verdict.granted:
            return verdict
        if self.replay.seen(claims.cti, vr.step):
            return Check(False, Reason.REPLAYED, "step_already_used", subject, detail, True)
        cti, step = claims.cti, vr.step
        return Check(
            True,
            Reason.GRANTED,
            None,
            subject,
            detail,
            valid=True,
            identity=b"pass:" + cti,
            # the step is spent only when the door really opens for it (not for a frame
            # denied for several codes, nor a presentation suppressed as a repeat)
            on_grant=lambda: self.replay.add(cti, step),
        )


class IdCardKind:
    """Vietnamese chip ID card (CCCD) QR and the 2021 health-app personal QR.

    ``checkin``: a venue's check-in reader: every well-formed card not on the denylist is
    granted and logged. Otherwise (an access reader) a card is granted only when the keyed
    HMAC of its ID number is on the badge allowlist. ``keep``: what the event keeps about
    the person (:data:`firmware.policy.checkin.KEEP_ALLOWED`); address and old ID number
    never. ``today``: not used for validation on an untrusted clock (a wrong clock must not
    refuse real cards)."""

    name = "id_card"

    def __init__(self, *, checkin: bool, keep: frozenset[str] = KEEP_DEFAULT) -> None:
        self.checkin, self.keep = checkin, keep

    def claims(self, payload: bytes) -> bool:
        """Digits then ``|``: an ID card or personal QR attempt."""
        return _ID_SHAPE.match(payload) is not None

    def check(self, payload: bytes, ctx: ScanContext) -> Check:
        """Parse strictly (IdCardError reasons), then denylist, then mode."""
        card: IdCard | PersonalQr
        today = None
        if ctx.clock is not ClockState.UNTRUSTED and math.isfinite(ctx.wall_s):
            today = datetime.fromtimestamp(ctx.wall_s, UTC).date()
        kind = "personal_qr" if looks_like_personal_qr(payload) else "cccd"
        try:
            card = (
                parse_personal_qr(payload, today=today)
                if kind == "personal_qr"
                else parse_cccd(payload, today=today)
            )
        except CredentialError as e:
            return Check(False, Reason(e.reason), e.why, detail={"card": kind})
        id_hmac = person_record(card, ctx.hmac, frozenset({"id_hmac"})).id_hmac
        kept = person_record(card, ctx.hmac, self.keep).to_dict()
        detail = {"card": kind, "person": kept}
        # a site that keeps no ID HMAC gets the payload's HMAC as the subject instead
        subject = id_hmac if "id_hmac" in self.keep else None
        badges = ctx.credentials.badges
        if id_hmac in badges.deny:
            return Check(False, Reason.REVOKED, "id_denied", subject, detail)
        if self.checkin or id_hmac in badges.allow:
            return Check(True, Reason.GRANTED, None, subject, detail, valid=True)
        return Check(False, Reason.NOT_ENROLLED, None, subject, detail, valid=True)
