"""What ``qrgate demo`` writes before anything runs: the demo reader's identity (``SITE`` in
its config, ``DEVICE`` for :func:`~firmware.daemon.build_reader`) and, in the state folder, a
site key and a pass issuer key (both kept across runs, mode 0600), the issuer's trust list, a
badge list with the demo's allowed badge on the allowlist and its revoked badge on the
denylist, a generated camera-like reel and the ``qrgate.toml`` that points the reader at all
of them and, through ``[uplink]``, at the demo's broker.

The reel has two parts. The badges and the ID card do not depend on time: that part is
written again only when ``REEL_VERSION`` changes. The passes do (a pass expires, a rotating
code is only good for its time step), so their frames are signed and rendered afresh on
every prepare, after the cached part: a signed pass, an expired one, a rotating pass's live
code and a screenshot of its code from a few minutes before (about 1 s per kind).
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from firmware.admin.passes import issue
from firmware.demo.broker import HOST
from firmware.demo.reel import (
    ALLOWED_BADGE,
    REVOKED_BADGE,
    CodeSpec,
    append_to_reel,
    write_demo_reel,
)
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.cose import PrivateKey
from firmware.policy.keys import generate_key, load_private_key, save_private_key
from firmware.policy.passes import rotating_code, step_of, unwrap_pass
from firmware.policy.subjects import SubjectHasher, load_key
from firmware.policy.trust import IssuerKey, TrustList

REEL_VERSION = "2"
DOOR = "demo-door"
ISSUER = "demo-office"
# A rotating code is accepted one step either side of now ([policy] rotating_skew_steps = 1),
# so a code made at prepare time stays good for 60-120 s: longer than the reel takes to play.
ROTATING_PERIOD_S = 60
SCREENSHOT_AGE_STEPS = 5  # the screenshot: the code of 5 minutes ago
SITE = "demo"
# A fixed device id instead of the machine's: the demo's broker is private, and a fixed name
# keeps the back office's rows, the fleet table and the printed commands the same every run.
DEVICE = "demo-reader"


def _ensure_key(path: Path) -> bytes:
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return load_key(path)


def _ensure_issuer(state: Path) -> PrivateKey:
    """The demo's pass issuer key (made once, 0600) and its trust list (written every time)."""
    path = state / "issuer.key"
    if not path.exists():
        save_private_key(path, generate_key())
    key = load_private_key(path)
    trust = TrustList.of([IssuerKey.of(key.public_key(), iss=ISSUER)])
    (state / "trust.json").write_text(json.dumps(trust.to_json(), indent=1) + "\n")
    return key


def pass_codes(key: PrivateKey, now_s: int) -> list[tuple[str, tuple[CodeSpec, ...]]]:
    """The reel's pass segments for a run at ``now_s``: a signed pass valid for a day, one
    that expired an hour ago, a rotating pass's code for now's step and for a step
    :data:`SCREENSHOT_AGE_STEPS` periods ago (a screenshot), all for :data:`DOOR`."""
    day = 86_400
    signed = issue(key, iss=ISSUER, sub="carol", exp=now_s + day, now_s=now_s, doors=[DOOR])
    expired = issue(
        key, iss=ISSUER, sub="erin", exp=now_s - 3600, now_s=now_s - 2 * day, doors=[DOOR]
    )
    rotating = issue(
        key,
        iss=ISSUER,
        sub="dave",
        exp=now_s + day,
        now_s=now_s - 3600,
        doors=[DOOR],
        rotating=True,
        period_s=ROTATING_PERIOD_S,
    )
    if rotating.holder is None:  # issue(rotating=True) always makes one
        raise ValueError("the rotating pass came without a holder key")
    cose = unwrap_pass(rotating.text)
    step = step_of(now_s, ROTATING_PERIOD_S)
    live = rotating_code(cose, rotating.holder, step, DOOR)
    old = rotating_code(cose, rotating.holder, step - SCREENSHOT_AGE_STEPS, DOOR)

    def held(payload: bytes, angle: float, dark: bool = False) -> tuple[CodeSpec, ...]:
        # passes are long (220-420 characters): held closer than a badge, so they still read
        return (CodeSpec(payload, dark_mode=dark, scale=0.5, center=(0.5, 0.5), angle_deg=angle),)

    return [
        ("signed_pass", held(signed.text, 5)),
        ("expired_pass", held(expired.text, -6)),
        ("rotating_pass", held(live, 4, dark=True)),
        ("rotating_screenshot", held(old, -4, dark=True)),
    ]


def _ensure_reel(folder: Path, key: PrivateKey) -> None:
    """The cached badge and ID-card part (again when ``REEL_VERSION`` changes), then this
    run's pass frames after it."""
    marker = folder / ".reel-version"
    version, _, frames = marker.read_text().partition(" ") if marker.exists() else ("", "", "")
    if version != REEL_VERSION or not frames.isdigit():
        folder.mkdir(parents=True, exist_ok=True)
        frames = str(write_demo_reel(folder, width=640, height=480, fps=30).frames)
        marker.write_text(f"{REEL_VERSION} {frames}")
    codes = pass_codes(key, int(time.time()))
    append_to_reel(folder, int(frames), codes, width=640, height=480, fps=30)


def prepare(
    state: Path,
    *,
    reel: Path | None,
    camera: str | None,
    fps: float,
    uplink_port: int | None = None,
) -> Path:
    """Write the demo's key, badges, reel and config into ``state``; return the config path.

    ``uplink_port``: the loopback port of the demo's broker for ``[uplink]`` (None: no
    uplink section)."""
    state.mkdir(parents=True, exist_ok=True)
    hasher = SubjectHasher(_ensure_key(state / "site.key"))
    issuer = _ensure_issuer(state)
    write_badges(
        state / "badges.json",
        BadgeList(
            frozenset({hasher.subject(ALLOWED_BADGE)}),
            frozenset({hasher.subject(REVOKED_BADGE)}),
            {hasher.subject(ALLOWED_BADGE): "alice (demo)"},
            1,
        ),
    )
    if camera:
        cam = f'source = "v4l2"\ndevice = "{camera}"\nfps = {fps}'
    else:
        if reel is None:
            reel = state / "reel"
            _ensure_reel(reel, issuer)
        cam = f'source = "replay"\npath = "{reel.resolve()}"\nfps = {fps}'
    uplink = ""
    if uplink_port is not None:
        uplink = f"""
[uplink]
# the demo's private mosquitto; when there is none, nothing listens on this port and the
# journal's backlog grows until a broker is there
enabled = true
host = "{HOST}"
port = {uplink_port}
transport = "tcp"
site = "{SITE}"
"""
    config = state / "qrgate.toml"
    config.write_text(f"""# written by `qrgate demo`
[reader]
# the passes name this door
door = "{DOOR}"
direction = "in"
# a venue's check-in reader: an ID card is logged and granted; badges and passes work as at
# an access door
mode = "checkin"
state_dir = "."

[camera]
{cam}

[decoder]
backend = "zxing-cpp"

[policy]
badges = "badges.json"
hmac_key = "site.key"
trust = "trust.json"
# shorter than a real door's 5 s so each presentation in the 29 s reel counts
repeat_window_s = 1.5

[gpio]
pin_factory = "mock"
pulse_s = 1.0
{uplink}""")
    return config
