"""``qrgate pass``: issue signed and rotating passes, play a holder's phone, inspect a code.

- ``pass issue`` signs a pass (:func:`firmware.policy.passes.issue_pass`) with an issuer key
  from ``qrgate keys new`` and draws its ``QG1:`` code: a PNG, an SVG or the terminal. The
  code text is base45, all in the QR alphanumeric character set, so the symbol is made in
  alphanumeric mode (11 bits per 2 characters instead of 16 in byte mode), error correction
  M, 4 modules of quiet zone (ISO/IEC 18004 §9.1). A rotating pass (``--rotating``) binds a
  holder Ed25519 key made here; the holder's wallet file (:func:`save_wallet`) is what the
  holder's phone would keep.
- ``pass show`` plays the phone: a fresh ``QGR1:`` code per time step, in the terminal or as
  PNG frames (``--at`` makes the code of another moment: a stale screenshot).
- ``pass inspect`` explains what a reader would answer to a code (an image or its text),
  with the reader's own policy built from its config (:func:`reader_policy`), or with no
  trust at all (:func:`offline_policy`).

Wallet file (JSON, mode 0600)::

    {"format": "qrgate-wallet-1",
     "pass": "QG1:...",                       # the pass as issued
     "holder_key": "<base64 of the 32-byte Ed25519 private key (RFC 8032 seed)>",
     "period_s": 10}                          # the pass's rotation period

The logic is in plain functions that take the time (seconds or ns since the epoch) and the
clock as arguments; the click commands read files, the clock and options, and print.
"""

from __future__ import annotations

import base64
import binascii
import json
import secrets
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import base45
import click
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.admin.common import fail, time_option
from firmware.admin.keys import write_file
from firmware.clock import ClockTrust
from firmware.exceptions import KeyFileError, PassError, QrgateError
from firmware.policy.context import Check, CredentialKind
from firmware.policy.cose import ALG_NAMES, PrivateKey, decode_cbor, parse_sign1
from firmware.policy.keys import load_private_key, read_regular
from firmware.policy.passes import (
    DEFAULT_PERIOD_S,
    MAX_CLAIM_CHARS,
    MAX_LIST_ENTRIES,
    MAX_PERIOD_S,
    MAX_QR_BYTES,
    ROTATING_PREFIX,
    PassClaims,
    VerifiedCache,
    issue_pass,
    parse_claims,
    read_pass,
    read_rotating,
    rotating_code,
    step_of,
    unwrap_pass,
)
from firmware.policy.policy import ClockSource, Policy
from firmware.policy.trust import TrustList, seconds_to_rfc3339
from firmware.policy.verdict import Reason

if TYPE_CHECKING:
    from firmware.config import Config
    from firmware.policy.credentials import CredentialSet

__all__ = [
    "KINDS",
    "PNG_SCALE",
    "QUIET_ZONE",
    "Frame",
    "IssuedPass",
    "Wallet",
    "draw_qr",
    "explain",
    "inspect_payload",
    "issue",
    "load_wallet",
    "make_qr",
    "offline_policy",
    "parse_names",
    "pass_group",
    "reader_clock",
    "reader_policy",
    "rotating_frames",
    "save_qr",
    "save_wallet",
    "wallet_json",
]

PNG_SCALE = 8  # pixels per module: a 41x41 symbol becomes 392 px with its quiet zone
QUIET_ZONE = 4  # modules, the minimum ISO/IEC 18004 asks for
ERROR_CORRECTION = "m"  # ~15 % of the symbol may be lost (a glare spot on a phone screen)
CTI_BYTES = 16
WALLET_FORMAT = "qrgate-wallet-1"
MAX_WALLET_BYTES = 64 * 1024
HOLDER_KEY_BYTES = 32
CLOCK_FILE = "clock.json"  # the daemon's last-sync record in reader.state_dir

KINDS = ("signed_pass", "rotating_pass", "badge", "cccd", "personal_qr", "unknown")
"""The kinds :func:`inspect_payload` names."""


# --- issuing ----------------------------------------------------------------------------------


def parse_names(text: str | None, what: str) -> tuple[str, ...] | None:
    """A comma-separated list of door or zone names ("a,b"; "*" is every door), or None
    when ``text`` is None. Blanks around names are dropped. Raises ValueError for an empty
    list, a name longer than 256 characters or more than 64 names."""
    if text is None:
        return None
    names = tuple(n.strip() for n in text.split(","))
    if not names or any(not n for n in names):
        raise ValueError(f"{what}: expected names separated by commas, found {text!r:.60}")
    if any(len(n) > MAX_CLAIM_CHARS for n in names) or len(names) > MAX_LIST_ENTRIES:
        raise ValueError(
            f"{what}: at most {MAX_LIST_ENTRIES} names of at most {MAX_CLAIM_CHARS} characters"
        )
    return tuple(dict.fromkeys(names))


@dataclass(frozen=True, slots=True)
class IssuedPass:
    """A pass just issued. ``text``: its ``QG1:`` QR text (ASCII). ``holder``: the holder's
    private key for a rotating pass, else None."""

    text: bytes
    claims: PassClaims
    holder: Ed25519PrivateKey | None = None


def issue(
    key: PrivateKey,
    *,
    iss: str,
    sub: str,
    exp: int,
    now_s: int,
    nbf: int | None = None,
    doors: Sequence[str] | None = None,
    zones: Sequence[str] | None = None,
    schedule: str | None = None,
    rotating: bool = False,
    period_s: int = DEFAULT_PERIOD_S,
    cti: bytes | None = None,
) -> IssuedPass:
    """Sign a pass with ``key``: iat ``now_s``, a random 16-byte pass id unless ``cti`` is
    given, times in seconds since the epoch. ``rotating``: make a holder Ed25519 key pair
    and bind its public half (cnf claim) with rotation period ``period_s`` (1-300 s).

    A pass must name doors ("*" for every door) or zones, or it would open nothing. Raises
    ValueError (a claim out of range, nbf after exp, no doors or zones, text too large)."""
    if not doors and not zones:
        raise ValueError("give doors ('*' for every door) or zones: this pass would open nothing")
    if nbf is not None and nbf >= exp:
        raise ValueError("the pass would never be valid: nbf is not before exp")
    if not 1 <= period_s <= MAX_PERIOD_S:
        raise ValueError(f"the rotation period must be 1-{MAX_PERIOD_S} seconds")
    holder = Ed25519PrivateKey.generate() if rotating else None
    claims = PassClaims(
        iss=iss,
        sub=sub,
        exp=exp,
        nbf=nbf,
        iat=now_s,
        cti=cti if cti is not None else secrets.token_bytes(CTI_BYTES),
        doors=tuple(doors) if doors else None,
        zones=tuple(zones) if zones else None,
        schedule=schedule,
        holder_key=holder.public_key().public_bytes_raw() if holder is not None else None,
        period_s=period_s if rotating else DEFAULT_PERIOD_S,
    )
    return IssuedPass(issue_pass(claims, key), claims, holder)


# --- the holder's wallet ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Wallet:
    """A rotating pass as its holder keeps it. ``pass_text``: the ``QG1:`` text. ``cose``:
    its COSE_Sign1 bytes (what a rotating code carries). ``holder``: the private key the
    pass's cnf claim names."""

    pass_text: bytes
    cose: bytes
    claims: PassClaims
    holder: Ed25519PrivateKey

    @property
    def period_s(self) -> int:
        """The rotation period, seconds."""
        return self.claims.period_s


def wallet_json(issued: IssuedPass) -> bytes:
    """The wallet document (module docstring) of a rotating pass, UTF-8 JSON. Raises
    ValueError for a pass without a holder key."""
    if issued.holder is None:
        raise ValueError("not a rotating pass: it has no holder key")
    doc = {
        "format": WALLET_FORMAT,
        "pass": issued.text.decode("ascii"),
        "holder_key": base64.b64encode(issued.holder.private_bytes_raw()).decode("ascii"),
        "period_s": issued.claims.period_s,
    }
    return (json.dumps(doc, indent=1) + "\n").encode("utf-8")


def save_wallet(path: Path, issued: IssuedPass) -> None:
    """Write the wallet of a rotating pass to ``path``, mode 0600 (it holds a private key),
    never over an existing file. Raises KeyFileError; ValueError for a static pass."""
    write_file(path, wallet_json(issued), 0o600, overwrite=False)


def _read_private_file(path: Path, cap: int) -> bytes:
    """The bytes of a regular file readable by its owner only, at most ``cap``."""
    data, mode = read_regular(path, cap)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: holds a private key, so it must be readable by its owner only "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )
    return data


def load_wallet(path: Path) -> Wallet:
    """Read a holder's wallet (module docstring) and check it hangs together: the pass is
    well formed (its issuer signature is not checked: the holder has no trust list), it is
    a rotating pass, the holder key is the one its cnf claim names and the period matches.

    Raises KeyFileError naming the file: unreadable, not 0600, too large, not a wallet."""
    data = _read_private_file(Path(path), MAX_WALLET_BYTES)

    def bad(what: str) -> KeyFileError:
        return KeyFileError(f"{path}: not a qrgate wallet: {what}")

    try:
        doc = json.loads(data)
    except (ValueError, RecursionError):
        raise bad("not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != WALLET_FORMAT:
        raise bad(f'expected an object with "format": "{WALLET_FORMAT}"')
    text, key_b64, period = doc.get("pass"), doc.get("holder_key"), doc.get("period_s")
    if not isinstance(text, str) or not text.isascii():
        raise bad('"pass" must be the QG1 text of the pass')
    try:
        raw = base64.b64decode(key_b64, validate=True) if isinstance(key_b64, str) else b""
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != HOLDER_KEY_BYTES:
        raise bad('"holder_key" must be a base64 32-byte Ed25519 private key')
    holder = Ed25519PrivateKey.from_private_bytes(raw)
    try:
        cose = unwrap_pass(text.encode("ascii"))
        claims = parse_claims(parse_sign1(cose).payload)
    except PassError as e:
        raise bad(str(e)) from None
    if claims.holder_key is None:
        raise bad("the pass is not a rotating pass (it names no holder key)")
    if claims.holder_key != holder.public_key().public_bytes_raw():
        raise bad("the holder key is not the one the pass names")
    if type(period) is not int or period != claims.period_s:
        raise bad(f'"period_s" must be the pass\'s period, {claims.period_s}')
    return Wallet(text.encode("ascii"), cose, claims, holder)


@dataclass(frozen=True, slots=True)
class Frame:
    """One rotating code. ``step``: its time step; ``start_s``: the step's first second
    (seconds since the epoch; it is current until ``start_s + period``); ``text``: the
    ``QGR1:`` QR text."""

    step: int
    start_s: int
    text: bytes


def rotating_frames(
    wallet: Wallet, at_s: float, count: int = 1, door: str | None = None
) -> list[Frame]:
    """The holder's codes for ``count`` consecutive steps from the one holding ``at_s``
    (seconds since the epoch), each signed for ``door`` (None: any door). Raises
    ValueError for a time before 1970, a count below 1 or a bad door name."""
    if count < 1:
        raise ValueError("count must be at least 1")
    first = step_of(at_s, wallet.period_s)
    return [
        Frame(step, step * wallet.period_s, rotating_code(wallet.cose, wallet.holder, step, door))
        for step in range(first, first + count)
    ]


# --- drawing ----------------------------------------------------------------------------------


def make_qr(text: bytes) -> Any:
    """The QR symbol (a segno QRCode) for a pass or rotating code text: alphanumeric mode,
    error correction M exactly (not raised when it would fit), smallest version. Raises
    ValueError when the text is not in the QR alphanumeric set (0-9 A-Z space $%*+-./:)."""
    import segno

    return segno.make_qr(
        text.decode("ascii"), error=ERROR_CORRECTION, mode="alphanumeric", boost_error=False
    )


def save_qr(text: bytes, path: Path, kind: str = "png") -> None:
    """Write the symbol of ``text`` as ``kind`` "png" (8 px per module) or "svg", with a
    4-module quiet zone. Raises OSError, ValueError (see make_qr)."""
    if kind not in ("png", "svg"):
        raise ValueError(f"unknown image kind {kind!r}")
    make_qr(text).save(str(path), kind=kind, scale=PNG_SCALE, border=QUIET_ZONE)


def draw_qr(text: bytes, out: TextIO) -> None:
    """Draw the symbol of ``text`` on a terminal (ANSI colours, 2 characters per module)."""
    make_qr(text).terminal(out=out, border=QUIET_ZONE)


# --- inspecting -------------------------------------------------------------------------------


def reader_clock(
    state_dir: Path | None,
    holdover_s: float = 24 * 3600.0,
    probe: Callable[[], bool] | None = None,
) -> ClockTrust:
    """The clock trust a reader with ``state_dir`` has now: the kernel's NTP state (or
    ``probe``), this boot's id, the persisted last sync as holdover and floor. Read only."""
    from firmware.journal.ids import boot_id

    # an inspection must not change what the reader will believe after its next reboot
    return ClockTrust(
        probe,
        state_file=state_dir / CLOCK_FILE if state_dir is not None else None,
        boot_id=boot_id(),
        holdover_s=holdover_s,
        read_only=True,
    )


def _kept_snapshot(config: Config) -> CredentialSet | None:
    """The credential snapshot the reader of ``config`` keeps in its state_dir, as its
    daemon would load it at start, or None. The store's loading tidies its folder (moves a
    bad file aside), so it loads a copy, in a temporary folder."""
    from firmware.daemon import make_snapshot_store
    from firmware.policy.snapshot import SnapshotStore

    store = make_snapshot_store(config)
    if not store.path.is_file():
        return None
    with tempfile.TemporaryDirectory(prefix="qrgate-inspect-") as tmp:
        copy = Path(tmp) / store.path.name
        shutil.copyfile(store.path, copy)
        return SnapshotStore(Path(tmp), store.public_key, site=store.site).load()


def reader_policy(config: Config, clock: ClockSource | None = None) -> Policy:
    """The policy the reader of ``config`` decides with, as its daemon builds it at start:
    :func:`firmware.daemon.make_policy` with the back office's desired settings kept in its
    state_dir, the kept credential snapshot in place of the local files when there is a
    usable one, on ``clock`` (default: :func:`reader_clock` of its state_dir). Writes
    nothing in the state_dir. Raises CredentialListError (a credential file), ConfigError
    (the snapshot key)."""
    from firmware.daemon import make_policy
    from firmware.uplink.desired import load_desired, overlay

    desired = load_desired(config.reader.state_dir)
    if desired is not None:
        config = overlay(config, desired)
    if clock is None:
        clock = reader_clock(config.reader.state_dir, config.policy.clock_holdover_h * 3600)
    policy = make_policy(config, clock)
    kept = _kept_snapshot(config)
    if kept is not None:
        policy.credentials = kept
    return policy


def offline_policy(clock: ClockSource) -> Policy:
    """A policy that trusts nothing: no issuer keys, no badges, an access reader. What
    ``pass inspect`` uses without a reader config: a pass is then unknown_issuer."""
    from firmware.policy.badges import BadgeKind
    from firmware.policy.kinds import IdCardKind, RotatingPassKind, SignedPassKind
    from firmware.policy.subjects import SubjectHasher

    kinds: list[CredentialKind] = [
        SignedPassKind(),
        RotatingPassKind(),
        IdCardKind(checkin=False),
        BadgeKind(),
    ]
    return Policy(kinds, SubjectHasher(secrets.token_bytes(32)), clock=clock)


def _when(seconds: float | None) -> str | None:
    """RFC 3339 UTC, or the number itself where RFC 3339 cannot write it."""
    if seconds is None:
        return None
    try:
        return seconds_to_rfc3339(int(seconds))
    except (ValueError, OverflowError, OSError):
        return str(int(seconds))


def _claims_json(c: PassClaims) -> dict[str, Any]:
    return {
        "iss": c.iss,
        "sub": c.sub,
        "iat": _when(c.iat),
        "nbf": _when(c.nbf),
        "exp": _when(c.exp),
        "pass_id": c.cti.hex(),
        "doors": list(c.doors) if c.doors is not None else None,
        "zones": list(c.zones) if c.zones is not None else None,
        "schedule": c.schedule,
        "rotating": c.rotating,
        "period_s": c.period_s if c.rotating else None,
    }


def _rotating_parts(payload: bytes) -> tuple[bytes, int, str | None]:
    """(pass COSE, step, door) of a ``QGR1:`` text, unverified. Raises PassError."""
    if len(payload) > MAX_QR_BYTES:
        raise PassError(Reason.MALFORMED, "too_large", "malformed code: too large")
    try:
        data = base45.b45decode(payload[len(ROTATING_PREFIX) :])
    except (ValueError, TypeError):
        raise PassError(Reason.MALFORMED, "base45", "malformed code: not base45") from None
    env = decode_cbor(data, "rotating")
    if type(env) is not list or len(env) != 4:
        raise PassError(Reason.MALFORMED, "rotating", "malformed code: not a CBOR array of 4")
    cose, step, door, _ = env
    if type(cose) is not bytes or type(step) is not int or not (door is None or type(door) is str):
        raise PassError(Reason.MALFORMED, "rotating", "malformed code: wrong element types")
    return cose, step, door


def _describe_pass(payload: bytes, trust: TrustList | None, now_s: float) -> dict[str, Any]:
    """What a pass or rotating code says (claims decoded whether or not they can be
    trusted) and whether its signatures verify against ``trust``."""
    out: dict[str, Any] = {"claims": None, "claims_verified": False, "kid": None, "alg": None}
    rotating = payload.startswith(ROTATING_PREFIX)
    try:
        if rotating:
            cose, step, door = _rotating_parts(payload)
        else:
            cose = unwrap_pass(payload)
        s = parse_sign1(cose)
        out["kid"], out["alg"] = s.kid.hex(), ALG_NAMES[s.alg]
        claims = parse_claims(s.payload)
    except PassError as e:
        out["problem"] = str(e)
        return out
    out["claims"] = _claims_json(claims)
    if rotating:
        now_step = step_of(now_s, claims.period_s)
        out["code"] = {
            "step": step,
            "step_start": _when(step * claims.period_s),
            "current_step": now_step,
            "steps_behind": now_step - step,
            "door": door,
        }
    if trust is None:
        out["problem"] = "no trust list (no --config): the signature was not checked"
        return out
    try:
        if rotating:
            read_rotating(payload, trust, VerifiedCache())
        else:
            read_pass(payload, trust, allow_rotating=True)
    except PassError as e:
        out["problem"] = str(e)
    else:
        out["claims_verified"] = True
    return out


def _kind(name: str, check: Check) -> str:
    if name in ("signed_pass", "rotating_pass"):
        return name
    if name == "id_card":
        card = (check.detail or {}).get("card")
        return "personal_qr" if card == "personal_qr" else "cccd"
    if name == "badge" and check.reason in (Reason.GRANTED, Reason.REVOKED):
        return "badge"
    return "unknown"


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple | frozenset | set):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes):
        return value.hex()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def inspect_payload(
    payload: bytes,
    policy: Policy,
    now_ns: int,
    *,
    exact: bool = True,
    configured: bool = True,
) -> dict[str, Any]:
    """What ``policy`` answers to ``payload`` at ``now_ns`` (ns since the epoch), and why:
    a JSON-ready dict.

    Keys: ``kind`` (one of :data:`KINDS`), ``valid`` (well formed, authentic, not revoked
    and in date, before any door or schedule rule), ``decision`` ("granted"/"denied"),
    ``reason`` (a Reason value), ``why`` (sub-reason or None), ``explanation`` (a
    sentence), ``clock`` ({state, now, floor}), ``reader`` ({configured, door, zones,
    issuer_keys, credentials: {source "config" | "snapshot", version}}), ``subject``
    (keyed HMAC when ``configured``), ``detail`` (what the event would keep). Passes add
    ``claims`` ({iss, sub, iat, nbf, exp (RFC 3339), pass_id, doors, zones, schedule,
    rotating, period_s}), ``claims_verified`` (False: decoded without trusting them),
    ``kid``, ``alg``, ``problem`` (the first failure, a sentence); rotating codes also
    ``code`` ({step, step_start, current_step, steps_behind, door}). ``exact``: False when
    the decoder could not give the exact bytes. Never raises for hostile input."""
    name, check = policy.check(payload, now_ns, exact)
    now_s = now_ns / 1e9
    state = policy.clock.state()
    kind = _kind(name, check)
    floor = policy.clock.floor_s()
    result: dict[str, Any] = {
        "kind": kind,
        "valid": check.valid,
        "decision": "granted" if check.granted else "denied",
        "reason": str(check.reason),
        "why": check.why,
        "clock": {
            "state": str(state),
            "now": _when(now_s),
            "floor": _when(floor) if floor > 0 else None,
        },
        "reader": {
            "configured": configured,
            "door": policy.door if configured else None,
            "zones": sorted(policy.zones) if configured else [],
            "issuer_keys": len(policy.credentials.trust),
            "credentials": {
                "source": policy.credentials.source,
                "version": policy.credentials.version,
            },
        },
        "subject": (check.subject or policy.hasher.subject(payload)) if configured else None,
        "detail": _jsonable(check.detail) if check.detail else None,
    }
    if kind in ("signed_pass", "rotating_pass"):
        trust = policy.credentials.trust if configured else None
        result.update(_describe_pass(payload, trust, now_s))
    result["explanation"] = _sentence(result)
    return result


def _names(xs: Sequence[str] | None) -> str:
    return ", ".join(xs) if xs else "none"


def _sentence(r: Mapping[str, Any]) -> str:
    """One sentence saying why (the reason and its why, with the claims that matter)."""
    reason, why, kind = str(r["reason"]), r["why"], str(r["kind"])
    c = r.get("claims") or {}
    code = r.get("code") or {}
    door = r["reader"]["door"]
    sentences: dict[tuple[str, str | None], str] = {
        ("granted", None): "this reader would open the door",
        ("unknown", None): "not a credential this reader knows (on no badge list, no known format)",
        ("revoked", None): "the badge is on the denylist",
        ("revoked", "pass_revoked"): "this pass id is on the denylist",
        ("revoked", "holder_revoked"): "every pass of this holder is revoked",
        ("revoked", "id_denied"): "this ID number is on the denylist",
        ("malformed", "length"): "empty, or longer than the reader's max_payload",
        ("malformed", "internal_error"): "the reader failed on this code (a bug): denied",
        ("unsupported_encoding", None): "the decoder could not give the exact bytes",
        ("bad_signature", "signature"): "the issuer signature does not verify: altered or forged",
        ("bad_signature", "alg_mismatch"): "the header's algorithm is not the key's (forged)",
        ("bad_signature", "holder_signature"): (
            "the holder signature does not verify for this step and door"
        ),
        ("unknown_issuer", "unknown_kid"): (
            f"signed by key {r.get('kid')}, which is not in this reader's trust list"
            if r["reader"]["configured"]
            else "no reader config (--config), so no issuer key is trusted: not verified"
        ),
        ("unknown_issuer", "iss_mismatch"): (
            f"issuer {c.get('iss')!r} is not the issuer the trust list names for its key"
        ),
        ("unknown_issuer", "key_validity"): (
            f"issued at {c.get('iat')}, outside its key's validity window (a retired key)"
        ),
        ("expired", None): f"expired at {c.get('exp')}",
        ("expired", "expired_before_clock_floor"): (
            f"expired at {c.get('exp')}, before the last time this reader's clock was synced"
        ),
        ("not_yet_valid", None): f"not valid before {c.get('nbf')}",
        ("clock_untrusted", "time_limited_credential"): (
            "the reader's clock is not trusted (no NTP sync): time-limited credentials are "
            "refused until it is"
        ),
        ("wrong_door", "not_for_this_door"): (
            f"opens doors {_names(c.get('doors'))} and zones {_names(c.get('zones'))}, "
            f"not door {door!r}"
        ),
        ("wrong_door", "code_for_another_door"): (
            f"the code was made for door {code.get('door')!r}, not {door!r}"
        ),
        ("outside_schedule", None): f"outside schedule {c.get('schedule')!r}'s hours now",
        ("outside_schedule", "unknown_schedule"): (
            f"schedule group {c.get('schedule')!r} is not known to this reader"
        ),
        ("stale_code", "rotating_pass_shown_static"): (
            "a rotating pass shown as its bare QG1 code (a screenshot): show the live code"
        ),
        ("stale_code", "step_out_of_range"): (
            f"made for step {code.get('step')} ({code.get('step_start')}), "
            f"{code.get('steps_behind')} steps from now: an old screenshot or a wrong clock"
        ),
        ("replayed", "step_already_used"): "this step's code was already used at this reader",
        ("not_enrolled", None): "a well-formed ID card, not enrolled at this access reader",
    }
    if (reason, why) in sentences:
        return sentences[(reason, why)]
    if reason == "malformed":
        return f"not a well-formed {kind.replace('_', ' ')} ({why})"
    if reason == "invalid_id_card":
        return f"not a valid ID card ({why})"
    if (reason, None) in sentences:
        return sentences[(reason, None)] + (f" ({why})" if why else "")
    return reason + (f" ({why})" if why else "")


def explain(r: Mapping[str, Any]) -> list[str]:
    """A short human explanation of an :func:`inspect_payload` result, one line each."""
    label = r["kind"].replace("_", " ")
    verdict = "GRANTED" if r["decision"] == "granted" else "DENIED"
    why = f" ({r['why']})" if r["why"] else ""
    lines = [f"{label}: {verdict}, {r['reason']}{why}", f"  {r['explanation']}"]
    lines.append(
        "  valid: " + ("yes (well formed, authentic, not revoked, in date)" if r["valid"] else "no")
    )
    c = r.get("claims")
    if c is not None:
        trusted = (
            f"verified with key {r['kid']} ({r['alg']})"
            if r["claims_verified"]
            else "UNVERIFIED: decoded without trusting them"
        )
        lines.append(f"  claims, {trusted}:")
        lines.append(f"    issuer {c['iss']!r}, holder {c['sub']!r}, pass id {c['pass_id']}")
        nbf = f", valid from {c['nbf']}" if c["nbf"] else ""
        lines.append(f"    issued {c['iat']}{nbf}, expires {c['exp']}")
        sched = f", schedule {c['schedule']!r}" if c["schedule"] else ""
        lines.append(f"    doors {_names(c['doors'])}, zones {_names(c['zones'])}{sched}")
        if c["rotating"]:
            lines.append(f"    rotating pass: a new code every {c['period_s']} s")
        code = r.get("code")
        if code is not None:
            lines.append(
                f"    this code: step {code['step']} (from {code['step_start']}), "
                f"door {code['door'] or 'any'}; now step {code['current_step']}"
            )
    if r.get("problem") and not r["valid"]:
        lines.append(f"  {r['problem']}")
    detail = r.get("detail") or {}
    if "person" in detail:
        person = ", ".join(f"{k} {v}" for k, v in detail["person"].items())
        lines.append(f"  {detail.get('card')}: {person or 'nothing kept'}")
    reader = r["reader"]
    if reader["configured"]:
        zones = f", zones {', '.join(reader['zones'])}" if reader["zones"] else ""
        creds = reader["credentials"]
        origin = (
            f"snapshot version {creds['version']}"
            if creds["source"] == "snapshot"
            else "its local credential files"
        )
        lines.append(
            f"  reader: door {reader['door']!r}{zones}, {reader['issuer_keys']} issuer keys "
            f"({origin})"
        )
    else:
        lines.append("  reader: none given (--config): nothing is trusted")
    clock = r["clock"]
    floor = f", floor {clock['floor']}" if clock["floor"] else ""
    lines.append(f"  clock: {clock['state']}, now {clock['now']}{floor}")
    return lines


# --- the commands -----------------------------------------------------------------------------


@click.group("pass")
def pass_group() -> None:
    """Signed and rotating passes: issue them, show a holder's codes, inspect a code."""


@pass_group.command("issue")
@click.option(
    "--key",
    "keyfile",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Issuer private key (qrgate keys new).",
)
@click.option("--iss", required=True, help="Issuer name (as the trust list names it).")
@click.option("--sub", required=True, help="Holder: a name, an e-mail, an employee number.")
@click.option("--exp", required=True, metavar="TIME", help="Expiry: RFC 3339 or +30d, +8h, +15m.")
@click.option("--nbf", metavar="TIME", help="Not valid before TIME.")
@click.option("--doors", help="Doors it opens, comma-separated; '*' for every door.")
@click.option("--zones", help="Zones it opens, comma-separated.")
@click.option("--schedule", help="Schedule group whose hours it keeps.")
@click.option("--rotating", is_flag=True, help="A rotating pass bound to a holder key.")
@click.option(
    "--period",
    type=click.IntRange(1, MAX_PERIOD_S),
    default=DEFAULT_PERIOD_S,
    show_default=True,
    help="Seconds per rotating code.",
)
@click.option(
    "--wallet",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Holder wallet file to write (with --rotating; 0600).",
)
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG.")
@click.option("--svg", type=click.Path(path_type=Path, dir_okay=False), help="Write an SVG.")
def pass_issue(**o: Any) -> None:
    """Sign a pass and show its QG1 code: --png/--svg, else drawn in the terminal. The code
    text goes to standard output.

    TIME: RFC 3339 (2026-03-01T08:00:00+07:00), seconds since the epoch, or an offset from
    now such as +30d, +8h, +15m. A rotating pass needs --wallet: the holder's file from
    which `qrgate pass show` makes the live codes."""
    if o["rotating"] != (o["wallet"] is not None):
        raise click.UsageError("--rotating and --wallet go together")
    now = int(time.time())
    try:
        doors = parse_names(o["doors"], "--doors")
        zones = parse_names(o["zones"], "--zones")
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    exp = time_option(o["exp"], "--exp", now)
    assert exp is not None  # a required option
    try:
        key = load_private_key(o["keyfile"])
    except KeyFileError as e:
        fail(e)
        return
    try:
        issued = issue(
            key,
            iss=o["iss"],
            sub=o["sub"],
            exp=exp,
            now_s=now,
            nbf=time_option(o["nbf"], "--nbf", now),
            doors=doors,
            zones=zones,
            schedule=o["schedule"],
            rotating=o["rotating"],
            period_s=o["period"],
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        if o["wallet"] is not None:
            save_wallet(o["wallet"], issued)
            click.echo(f"wrote {o['wallet']} (the holder's wallet, 0600)", err=True)
        for kind in ("png", "svg"):
            if o[kind] is not None:
                save_qr(issued.text, o[kind], kind)
                click.echo(f"wrote {o[kind]}", err=True)
    except KeyFileError as e:
        fail(e)
    except OSError as e:
        fail(f"cannot write: {e}")
    c = issued.claims
    click.echo(
        f"pass id {c.cti.hex()} for {c.sub!r}, issued by {c.iss!r}, expires {_when(c.exp)}",
        err=True,
    )
    if c.exp <= now:
        click.echo("note: this pass has already expired", err=True)
    if c.rotating:
        click.echo(
            "note: a rotating pass is refused when shown as this bare QG1 code; show the live "
            f"code with: qrgate pass show --rotating {o['wallet']}",
            err=True,
        )
    click.echo(issued.text.decode("ascii"))
    if o["png"] is None and o["svg"] is None:
        draw_qr(issued.text, sys.stdout)


def _show_loop(wallet: Wallet, door: str | None, once: bool, at_s: float | None) -> None:
    """Redraw the current code at each step boundary (until Ctrl-C), or once."""
    while True:
        now = time.time() if at_s is None else at_s
        (frame,) = rotating_frames(wallet, now, 1, door)
        click.clear()
        draw_qr(frame.text, sys.stdout)
        ends = frame.start_s + wallet.period_s
        click.echo(
            f"{wallet.claims.sub}: step {frame.step}, door {door or 'any'}, "
            f"until {_when(ends)}" + ("" if once or at_s is not None else "  (Ctrl-C stops)")
        )
        click.echo(frame.text.decode("ascii"))
        if once or at_s is not None:
            return
        time.sleep(max(0.0, ends - time.time()) + 0.01)


@pass_group.command("show")
@click.option(
    "--rotating",
    "wallet_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    metavar="WALLET",
    help="The holder's wallet (pass issue --rotating --wallet).",
)
@click.option("--door", help="Bind each code to this door [default: any door].")
@click.option(
    "--png-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Write PNG frames here instead of drawing in the terminal.",
)
@click.option(
    "--frames",
    type=click.IntRange(1, 1000),
    default=6,
    show_default=True,
    help="PNG frames to write, one per step.",
)
@click.option("--at", metavar="TIME", help="Codes for this moment instead of now (RFC 3339 …).")
@click.option("--once", is_flag=True, help="Terminal: draw the current code once and exit.")
def pass_show(**o: Any) -> None:
    """Play the holder's phone: a fresh QGR1 code every period, drawn in the terminal
    (until Ctrl-C, or --once) or written as PNG frames for the steps from now (or --at)."""
    try:
        wallet = load_wallet(o["wallet_path"])
    except KeyFileError as e:
        fail(e)
        return
    at = time_option(o["at"], "--at", int(time.time()))
    door = o["door"]
    if o["png_dir"] is None:
        try:
            _show_loop(wallet, door, o["once"], at)
        except KeyboardInterrupt:
            click.echo()
        except ValueError as e:
            raise click.UsageError(str(e)) from None
        return
    out: Path = o["png_dir"]
    try:
        frames = rotating_frames(wallet, at if at is not None else time.time(), o["frames"], door)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        out.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(frames):
            path = out / f"frame-{i:03d}-step-{f.step}.png"
            save_qr(f.text, path)
            click.echo(f"{path}: step {f.step}, from {_when(f.start_s)}")
    except OSError as e:
        fail(f"cannot write: {e}")


def _read_input(arg: str, as_text: bool, backend: str) -> tuple[bytes, bool]:
    """(payload, exact) from an image path or the payload text. Exits 2 when unreadable."""
    path = Path(arg)
    try:
        is_image = not as_text and path.is_file()
    except OSError:  # a payload longer than a file name may be (ENAMETOOLONG)
        is_image = False
    if not is_image:
        suffix = path.suffix.lower()
        if not as_text and suffix in (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif"):
            fail(f"{arg}: no such image (give --text to inspect it as a payload)")
        payload = arg.encode("utf-8", "surrogateescape")
        if not payload:
            fail("an empty payload")
        return payload, True
    from drivers.exceptions import DriverError
    from drivers.replay import load_gray
    from firmware.decoding.registry import make_decoder

    try:
        decoder = make_decoder(backend)
        codes = decoder.decode(load_gray(path))
    except (QrgateError, DriverError) as e:
        fail(e)
    distinct = {c.payload: c for c in codes}
    if not distinct:
        fail(f"{arg}: no QR code found")
    if len(distinct) > 1:
        fail(f"{arg}: {len(distinct)} codes in the image (a reader denies that); crop to one")
    (code,) = distinct.values()
    return code.payload, code.exact


@pass_group.command("inspect")
@click.argument("source", metavar="IMAGE|STRING")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The reader's config: judge with its policy, credentials and clock.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@click.option("--text", "as_text", is_flag=True, help="SOURCE is the payload even if a file.")
@click.option(
    "--backend",
    type=click.Choice(["zxing-cpp", "zbar", "cascade"]),
    help="Decoder for an image [default: the config's, else zxing-cpp].",
)
def pass_inspect(
    source: str, config_path: Path | None, as_json: bool, as_text: bool, backend: str | None
) -> None:
    """Explain why this reader would grant or refuse a code now: IMAGE (PNG, JPEG...)
    decoded to its exact bytes, or STRING, the payload text itself.

    Without --config nothing is trusted: a pass's claims are shown unverified. Exit 0
    whatever the verdict; 2 when the input or the config cannot be read."""
    config = None
    if config_path is not None:
        from firmware.config import load_config

        try:
            config = load_config(config_path)
        except QrgateError as e:
            fail(e)
            return
    chosen = backend or (config.decoder.backend if config is not None else "zxing-cpp")
    payload, exact = _read_input(source, as_text, chosen)
    try:
        policy = reader_policy(config) if config is not None else offline_policy(reader_clock(None))
    except QrgateError as e:
        fail(e)
        return
    result = inspect_payload(
        payload, policy, time.time_ns(), exact=exact, configured=config is not None
    )
    if as_json:
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    lines = explain(result)
    colour = "green" if result["decision"] == "granted" else "red"
    click.echo(click.style(lines[0], fg=colour, bold=True))
    for line in lines[1:]:
        click.echo(line)
