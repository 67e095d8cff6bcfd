"""The credential kinds inside the policy: signed and rotating passes, ID cards, clock trust.

Real keys and signatures; the verdict goes through :class:`Policy` as the scan loop calls it,
and through the camera pipeline from rendered PNGs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import base45
import pytest
import segno
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from PIL import Image

from drivers.replay import ReplaySource
from firmware.clock import ClockState
from firmware.config import load_config
from firmware.decoding.codes import DecodedCode
from firmware.journal.reader import JournalReader
from firmware.policy.badges import BadgeKind, BadgeList
from firmware.policy.cose import kid_of
from firmware.policy.credentials import CredentialSet, credentials_from_json
from firmware.policy.keys import generate_key
from firmware.policy.kinds import IdCardKind, PassRules, RotatingPassKind, SignedPassKind
from firmware.policy.passes import (
    PassClaims,
    issue_pass,
    rotating_code,
    step_of,
    unwrap_pass,
)
from firmware.policy.policy import FixedClock, Policy
from firmware.policy.repeat import RepeatWindow
from firmware.policy.schedules import Schedules
from firmware.policy.subjects import SubjectHasher
from firmware.policy.trust import IssuerKey, TrustList
from firmware.policy.verdict import Decision, Reason
from tests.firmware.readers import make_reader, write_reader_config

H = SubjectHasher(bytes(range(32)))
S = 1_000_000_000
NOW = 1_790_000_000.0  # 2026-09-21, a Monday
CORNERS = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
ISSUER = generate_key("EdDSA")
OTHER = generate_key("EdDSA")
ES = generate_key("ES256")
TRUST = TrustList.of([IssuerKey.of(ISSUER.public_key(), "acme"), IssuerKey.of(ES.public_key())])
CCCD = "074085003417|280912345|Trần Văn Bình|14031985|Nam|Tổ 3, Khu phố Mẫu, Phường Bình Hòa, Thuận An, Bình Dương|10052021".encode()  # noqa: E501
CCCD_BAD_ID = (
    "07408500341|280912345|Trần Văn Bình|14031985|Nam|Thuận An, Bình Dương|10052021".encode()
)
CCCD_BAD_CENTURY = (
    "079303004521||Lê Thị Thu Hà|02091993|Nữ|Quận 6, TP Hồ Chí Minh|21062021".encode()
)
PERSONAL = b"074085003417|TRAN VAN BINH|1985-03-14|0|160000000000000001|<1<<0900000000"


def claims(**kw: object) -> PassClaims:
    base: dict[str, object] = {
        "iss": "acme",
        "sub": "alice@acme.example",
        "exp": int(NOW) + 86400,
        "nbf": None,
        "iat": int(NOW) - 60,
        "cti": os.urandom(16),
        "doors": ("lobby",),
    }
    base.update(kw)
    return PassClaims(**base)  # type: ignore[arg-type]


def signed(key: object = ISSUER, **kw: object) -> bytes:
    return issue_pass(claims(**kw), key)  # type: ignore[arg-type]


def policy(
    clock: ClockState = ClockState.SYNCED,
    floor: float = 0.0,
    creds: CredentialSet | None = None,
    *,
    door: str = "lobby",
    zones: tuple[str, ...] = (),
    checkin: bool = False,
) -> Policy:
    rules = PassRules(leeway_s=60, skew_steps=1)
    return Policy(
        [
            SignedPassKind(rules),
            RotatingPassKind(rules),
            IdCardKind(checkin=checkin),
            BadgeKind(),
        ],
        H,
        credentials=creds or CredentialSet(trust=TRUST),
        clock=FixedClock(clock, floor),
        door=door,
        zones=zones,
    )


def decide(
    p: Policy,
    payload: bytes,
    at: float = NOW,
    seen: RepeatWindow | None = None,
    mono_s: float = 100.0,
) -> Decision:
    d = p.decide(
        [DecodedCode(payload, CORNERS, "zxing-cpp")],
        seen if seen is not None else RepeatWindow(2 * S),
        int(mono_s * S),
        int(at * S),
    )
    assert d is not None
    return d


def why(d: Decision) -> str | None:
    return (d.detail or {}).get("why")


# --- signed passes ----------------------------------------------------------------------------


def test_valid_pass_granted_with_pass_id_and_holder_subject() -> None:
    c = claims()
    d = decide(policy(), issue_pass(c, ISSUER))
    assert (d.granted, d.reason, d.kind) == (True, Reason.GRANTED, "signed_pass")
    assert d.detail is not None and d.detail["pass_id"] == c.cti.hex()
    assert d.detail["clock"] == "synced" and d.detail["iss"] == "acme"
    # every pass of one holder has the same subject, and it is not the holder's name
    assert d.subject == decide(policy(), signed()).subject
    assert "alice" not in str(d.subject)


def test_es256_pass_granted() -> None:
    assert decide(policy(), signed(ES, iss="other")).granted


@pytest.mark.parametrize(
    "kw, reason",
    [
        ({"exp": int(NOW) - 3600}, Reason.EXPIRED),
        ({"nbf": int(NOW) + 3600}, Reason.NOT_YET_VALID),
        ({"doors": ("garage",)}, Reason.WRONG_DOOR),
        ({"doors": None, "zones": ("floor-2",)}, Reason.WRONG_DOOR),
        ({"doors": ()}, Reason.WRONG_DOOR),
    ],
)
def test_pass_refusals(kw: dict[str, object], reason: Reason) -> None:
    d = decide(policy(), signed(**kw))
    assert (d.granted, d.reason) == (False, reason)


def test_leeway_at_expiry() -> None:
    assert decide(policy(), signed(exp=int(NOW) - 59)).granted
    assert decide(policy(), signed(exp=int(NOW) - 60)).reason is Reason.EXPIRED


def test_zone_and_wildcard_doors() -> None:
    p = policy(zones=("floor-2", "lobby-zone"))
    assert decide(p, signed(doors=None, zones=("floor-2",))).granted
    assert decide(policy(door="anything"), signed(doors=("*",))).granted


def test_forged_pass_and_unknown_key() -> None:
    good = signed()
    cose = bytearray(unwrap_pass(good))
    cose[-1] ^= 1  # one bit of the signature
    forged = b"QG1:" + base45.b45encode(bytes(cose))
    d = decide(policy(), forged)
    assert (d.granted, d.reason, why(d)) == (False, Reason.BAD_SIGNATURE, "signature")
    d = decide(policy(), signed(OTHER))
    assert (d.reason, why(d)) == (Reason.UNKNOWN_ISSUER, "unknown_kid")


def test_revoked_pass_and_revoked_holder() -> None:
    c = claims()
    creds = credentials_from_json(
        {"trust": TRUST.to_json(), "deny": {"cti": [c.cti.hex()], "sub": [["acme", "bob"]]}}
    )
    p = policy(creds=creds)
    d = decide(p, issue_pass(c, ISSUER))
    assert (d.reason, why(d)) == (Reason.REVOKED, "pass_revoked")
    d = decide(p, signed(sub="bob"))
    assert (d.reason, why(d)) == (Reason.REVOKED, "holder_revoked")
    assert decide(p, signed()).granted  # another pass of another holder


def test_schedule_rules() -> None:
    sched = Schedules.from_json(
        {
            "timezone": "UTC",
            "groups": {
                "office": {"windows": [{"days": "mon-fri", "from": "08:00", "to": "18:00"}]}
            },
        }
    )
    p = policy(creds=CredentialSet(trust=TRUST, schedules=sched))
    monday_noon = 1_789_948_800.0 + 12 * 3600  # 2026-09-21 00:00 UTC + 12 h
    assert decide(p, signed(schedule="office"), at=monday_noon).granted
    d = decide(p, signed(schedule="office"), at=monday_noon + 8 * 3600)
    assert (d.granted, d.reason) == (False, Reason.OUTSIDE_SCHEDULE)
    d = decide(p, signed(schedule="night-shift"), at=monday_noon)
    assert (d.reason, why(d)) == (Reason.OUTSIDE_SCHEDULE, "unknown_schedule")


# --- clock trust (C21) ------------------------------------------------------------------------


def test_c21_untrusted_clock_never_grants_a_time_limited_pass() -> None:
    """The wall clock 2 days behind: an expired pass would look valid. Denied, and the
    badge (no validity window) still works."""
    behind = NOW - 2 * 86400
    expired_yesterday = signed(exp=int(NOW) - 86400, iat=int(NOW) - 5 * 86400)
    p = policy(ClockState.UNTRUSTED)
    d = decide(p, expired_yesterday, at=behind)
    assert (d.granted, d.reason, d.detail and d.detail["clock"]) == (
        False,
        Reason.CLOCK_UNTRUSTED,
        "untrusted",
    )
    # the floor (newest synced time ever seen) proves this one expired
    d = decide(policy(ClockState.UNTRUSTED, floor=NOW), expired_yesterday, at=behind)
    assert (d.reason, why(d)) == (Reason.EXPIRED, "expired_before_clock_floor")
    # holdover: synced earlier this boot, not stepped since: time checks apply as usual
    assert decide(policy(ClockState.HOLDOVER), signed()).granted
    badge = b"QRG-BADGE:alice"
    creds = CredentialSet(trust=TRUST, badges=BadgeList.of(allow=[H.subject(badge)]))
    assert decide(policy(ClockState.UNTRUSTED, creds=creds), badge, at=behind).granted


# --- rotating passes --------------------------------------------------------------------------


def rotating(period: int = 10) -> tuple[bytes, Ed25519PrivateKey, PassClaims]:
    holder = Ed25519PrivateKey.generate()
    raw = holder.public_key().public_bytes_raw()
    c = claims(holder_key=raw, period_s=period)
    return unwrap_pass(issue_pass(c, ISSUER)), holder, c


def test_rotating_code_granted_once_per_step_and_screenshots_fail() -> None:
    cose, holder, _ = rotating()
    p = policy()
    step = step_of(NOW, 10)
    code = rotating_code(cose, holder, step, None)
    d = decide(p, code)
    assert (d.granted, d.kind) == (True, "rotating_pass")
    assert d.detail is not None and d.detail["step"] == step
    # the same code again, after the repeat window (a screenshot shown right away)
    d = decide(p, code, at=NOW + 3, mono_s=200)
    assert (d.granted, d.reason, why(d)) == (False, Reason.REPLAYED, "step_already_used")
    # a screenshot from a minute ago
    d = decide(p, rotating_code(cose, holder, step - 6, None), mono_s=300)
    assert (d.reason, why(d)) == (Reason.STALE_CODE, "step_out_of_range")
    # within the skew: the next step is fine
    assert decide(p, rotating_code(cose, holder, step + 1, None), mono_s=400).granted
    # the bare pass is a screenshot of the holder's pass
    d = decide(p, b"QG1:" + base45.b45encode(cose), mono_s=500)
    assert (d.reason, why(d)) == (Reason.STALE_CODE, "rotating_pass_shown_static")


def test_rotating_code_for_another_door_and_untrusted_clock() -> None:
    cose, holder, _ = rotating()
    step = step_of(NOW, 10)
    d = decide(policy(), rotating_code(cose, holder, step, "garage"))
    assert (d.reason, why(d)) == (Reason.WRONG_DOOR, "code_for_another_door")
    assert decide(policy(), rotating_code(cose, holder, step, "lobby")).granted
    d = decide(policy(ClockState.UNTRUSTED), rotating_code(cose, holder, step, None))
    assert d.reason is Reason.CLOCK_UNTRUSTED


def test_a_code_rotating_while_held_is_one_scan() -> None:
    """The phone shows a new code every 10 s while the holder stands at the reader: the door
    opens once; shown again after the repeat window, the next step opens it again."""
    cose, holder, _ = rotating()
    p, seen = policy(), RepeatWindow(2 * S)
    step = step_of(NOW, 10)
    first = decide(p, rotating_code(cose, holder, step, None), seen=seen, mono_s=100)
    assert first.granted
    seen.observe([rotating_code(cose, holder, step, None), *first.seen_keys], 100 * S)
    nxt = rotating_code(cose, holder, step + 1, None)
    held = decide(p, nxt, at=NOW + 1, seen=seen, mono_s=101)
    assert held.suppressed
    later = decide(p, nxt, at=NOW + 5, seen=seen, mono_s=105)
    assert later.granted  # step + 1 was not spent by the suppressed frame


def test_multiple_codes_spend_no_step() -> None:
    cose, holder, _ = rotating()
    p = policy()
    code = rotating_code(cose, holder, step_of(NOW, 10), None)
    d = p.decide(
        [DecodedCode(code, CORNERS, "zxing-cpp"), DecodedCode(b"other", CORNERS, "zxing-cpp")],
        RepeatWindow(2 * S),
        100 * S,
        int(NOW * S),
    )
    assert d is not None and d.reason is Reason.MULTIPLE_CODES
    assert decide(p, code, mono_s=200).granted


# --- ID cards ---------------------------------------------------------------------------------


def test_checkin_logs_a_masked_identity_only() -> None:
    d = decide(policy(checkin=True), CCCD)
    assert (d.granted, d.kind) == (True, "id_card")
    assert d.detail is not None
    assert d.detail["card"] == "cccd"
    assert d.detail["person"] == {
        "id_hmac": H.subject(b"cccd-id:074085003417"),
        "name_masked": "Trần V** B**",
        "birth_year": 1985,
    }
    assert d.subject == H.subject(b"cccd-id:074085003417")
    text = repr(d)
    for secret in ("074085003417", "280912345", "Bình Dương", "Văn Bình", "14031985"):
        assert secret not in text
    bom = decide(policy(checkin=True), b"\xef\xbb\xbf" + CCCD + b"\r\n")
    assert bom.granted and bom.subject == d.subject
    p = decide(policy(checkin=True), PERSONAL)
    assert p.granted and p.detail is not None and p.detail["card"] == "personal_qr"
    assert p.subject == d.subject  # the same person, whichever code they show


@pytest.mark.parametrize(
    "payload, expected_why",
    [(CCCD_BAD_ID, "id_digits"), (CCCD_BAD_CENTURY, "century_mismatch")],
)
def test_invalid_cards_refused_with_a_precise_reason(payload: bytes, expected_why: str) -> None:
    d = decide(policy(checkin=True), payload)
    assert (d.granted, d.reason, why(d)) == (False, Reason.INVALID_ID_CARD, expected_why)


def test_access_reader_grants_enrolled_cards_only() -> None:
    card = H.subject(b"cccd-id:074085003417")
    assert decide(policy(), CCCD).reason is Reason.NOT_ENROLLED
    enrolled = CredentialSet(trust=TRUST, badges=BadgeList.of(allow=[card]))
    assert decide(policy(creds=enrolled), CCCD).granted
    denied = CredentialSet(badges=BadgeList.of(deny=[card]))
    assert decide(policy(creds=denied, checkin=True), CCCD).reason is Reason.REVOKED


def test_credential_swap_is_one_assignment() -> None:
    p = policy(creds=CredentialSet())
    code = signed()
    assert decide(p, code).reason is Reason.UNKNOWN_ISSUER
    p.credentials = dataclasses.replace(p.credentials, trust=TRUST)
    assert decide(p, code).granted


def test_key_rotation_old_passes_live_new_ones_refused() -> None:
    old = IssuerKey.of(ISSUER.public_key(), "acme", None, int(NOW) - 3600)
    p = policy(creds=CredentialSet(trust=TrustList.of([old])))
    assert decide(p, signed(iat=int(NOW) - 7200)).granted
    d = decide(p, signed(iat=int(NOW) - 60))
    assert (d.reason, why(d)) == (Reason.UNKNOWN_ISSUER, "key_validity")
    assert kid_of(ISSUER.public_key()) == old.kid


# --- through the camera pipeline --------------------------------------------------------------


def _png(tmp_path: Path, name: str, text: bytes) -> Path:
    path = tmp_path / name
    segno.make(text.decode("ascii"), error="m", micro=False).save(path, scale=6, border=4)
    return path


def test_passes_through_the_camera_pipeline(tmp_path: Path) -> None:
    """Rendered PNGs of a valid, an expired and a rotating pass and its stale screenshot,
    through the real decoder, policy, relay and journal."""
    now = time.time()
    (tmp_path / "trust.json").write_text(json.dumps(TRUST.to_json()))
    cfg = load_config(
        write_reader_config(
            tmp_path,
            repeat_window_s=1.0,
            extra="",
        )
    )
    cfg = dataclasses.replace(
        cfg,
        reader=dataclasses.replace(cfg.reader, door="lobby"),
        policy=dataclasses.replace(cfg.policy, trust=tmp_path / "trust.json"),
    )
    valid = _png(tmp_path, "valid.png", signed(exp=int(now) + 3600, iat=int(now)))
    expired = _png(tmp_path, "expired.png", signed(exp=int(now) - 3600, iat=int(now) - 7200))
    holder = Ed25519PrivateKey.generate()
    rc = claims(
        exp=int(now) + 3600,
        iat=int(now),
        holder_key=holder.public_key().public_bytes_raw(),
        period_s=60,
    )
    cose = unwrap_pass(issue_pass(rc, ISSUER))
    live = _png(tmp_path, "live.png", rotating_code(cose, holder, step_of(now, 60), None))
    stale = _png(tmp_path, "stale.png", rotating_code(cose, holder, step_of(now, 60) - 5, None))
    blank = tmp_path / "blank.png"
    Image.new("L", Image.open(valid).size, 255).save(blank)
    reel = []
    for p in (valid, expired, live, stale):
        reel += [p] * 3 + [blank] * 40
    reader = make_reader(cfg, ReplaySource(reel, fps=30), synced=True)
    reader.start()
    try:
        assert reader.wait(60)
    finally:
        reader.stop()
    rows = [r.event for r in JournalReader(cfg.journal_path).tail(100) if r.event.kind == "scan"]
    assert [(e.credential_kind, e.decision, e.reason) for e in rows] == [
        ("signed_pass", "granted", "granted"),
        ("signed_pass", "denied", "expired"),
        ("rotating_pass", "granted", "granted"),
        ("rotating_pass", "denied", "stale_code"),
    ]
    assert rows[0].detail["clock"] == "synced"
    assert reader.feedback.relay.pulse_count == 2
