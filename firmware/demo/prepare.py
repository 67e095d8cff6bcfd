"""What ``qrgate demo`` writes before anything runs: the demo reader's identity (``SITE`` in
its config, ``DEVICE`` for :func:`~firmware.daemon.build_reader`) and, in the state folder, a
site key (kept across runs), a badge list with the demo's allowed badge on the allowlist and
its revoked badge on the denylist, a generated camera-like reel (written again only when
``REEL_VERSION`` changes) and the ``qrgate.toml`` that points the reader at all of them and,
through ``[uplink]``, at the demo's broker.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from firmware.demo.broker import HOST
from firmware.demo.reel import ALLOWED_BADGE, REVOKED_BADGE, write_demo_reel
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.subjects import SubjectHasher, load_key

REEL_VERSION = "1"
SITE = "demo"
# A fixed device id instead of the machine's: the demo's broker is private, and a fixed name
# keeps the back office's rows, the fleet table and the printed commands the same every run.
DEVICE = "demo-reader"


def _ensure_key(path: Path) -> bytes:
    if not path.exists():
        path.write_text(secrets.token_hex(32) + "\n")
        path.chmod(0o600)
    return load_key(path)


def _ensure_reel(folder: Path) -> None:
    marker = folder / ".reel-version"
    if marker.exists() and marker.read_text() == REEL_VERSION:
        return
    folder.mkdir(parents=True, exist_ok=True)
    write_demo_reel(folder, width=640, height=480, fps=30)
    marker.write_text(REEL_VERSION)


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
            _ensure_reel(reel)
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
door = "demo-door"
direction = "in"
state_dir = "."

[camera]
{cam}

[decoder]
backend = "zxing-cpp"

[policy]
badges = "badges.json"
hmac_key = "site.key"
# shorter than a real door's 5 s so each presentation in the 15 s reel counts
repeat_window_s = 1.5

[gpio]
pin_factory = "mock"
pulse_s = 1.0
{uplink}""")
    return config
