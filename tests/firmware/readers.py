"""Builds real readers for tests: real decoder, journal on disk, gpiozero mock pins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from drivers.frames import FrameSource
from drivers.pins import make_pin_factory
from firmware.config import Config
from firmware.daemon import Reader, build_reader
from firmware.pipeline import ScanReport
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.subjects import SubjectHasher

KEY = bytes(range(100, 132))
HASHER = SubjectHasher(KEY)


def write_reader_config(
    tmp_path: Path,
    *,
    allow: Sequence[bytes] = (),
    deny: Sequence[bytes] = (),
    repeat_window_s: float = 5.0,
    backend: str = "zxing-cpp",
    reel: Path | None = None,
    fps: float = 30.0,
    extra: str = "",
) -> Path:
    """A complete reader config in ``tmp_path`` (key, badge list, replay camera, mock pins)."""
    (tmp_path / "site.key").write_text(KEY.hex())
    write_badges(
        tmp_path / "badges.json",
        BadgeList.of(
            allow=[HASHER.subject(p) for p in allow],
            deny=[HASHER.subject(p) for p in deny],
            version=1,
        ),
    )
    f = tmp_path / "qrgate.toml"
    f.write_text(f"""
[reader]
door = "test-door"
state_dir = "state"

[camera]
source = "replay"
path = "{reel or tmp_path / "reel"}"
fps = {fps}

[decoder]
backend = "{backend}"

[policy]
badges = "badges.json"
hmac_key = "site.key"
repeat_window_s = {repeat_window_s}

[gpio]
pin_factory = "mock"
pulse_s = 0.2
{extra}
""")
    return f


def make_reader(
    config: Config,
    source: FrameSource,
    *,
    listeners: Sequence[Callable[[ScanReport], None]] = (),
    pin_factory: Any = None,
    synced: bool = False,
) -> Reader:
    """A reader on mock PWM pins with the given frame source; its clock is NTP-synced when
    ``synced`` (else untrusted, as on a Pi that just booted without network)."""
    return build_reader(
        config,
        pin_factory=pin_factory or make_pin_factory("mock"),
        source=source,
        listeners=listeners,
        clock_synced=lambda: synced,
    )
