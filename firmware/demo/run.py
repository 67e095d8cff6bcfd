"""``qrgate demo``: the real daemon on an embedded default, with a live terminal view.

Writes a site key, a badge list (the demo's allowed badge on the allowlist, its revoked badge
on the denylist), a config and, unless another reel or a webcam is given, a generated
camera-like reel into a state folder; then runs the same :func:`build_reader` as
``qrgate run`` on gpiozero mock pins and prints each verdict with the LED, buzzer and relay
state, and a summary at the end.
"""

from __future__ import annotations

import queue
import secrets
import signal
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from rich.console import Console
from rich.table import Table

from firmware.config import load_config
from firmware.daemon import Reader, build_reader
from firmware.demo.reel import ALLOWED_BADGE, REVOKED_BADGE, write_demo_reel
from firmware.exceptions import QrgateError
from firmware.pipeline import ScanReport
from firmware.policy.badges import BadgeList, write_badges
from firmware.policy.subjects import SubjectHasher, load_key

REEL_VERSION = "1"


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


def prepare(state: Path, *, reel: Path | None, camera: str | None, fps: float) -> Path:
    """Write the demo's key, badges, reel and config into ``state``; return the config path."""
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
""")
    return config


class LiveView:
    """Prints each verdict from a queue on its own thread, so the scan thread never waits on
    the terminal."""

    def __init__(self, console: Console, reader_ref: list[Reader]) -> None:
        self.console = console
        self._reader_ref = reader_ref
        self._q: queue.Queue[ScanReport | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="qrgate-demo-view", daemon=True)
        self._t0 = time.monotonic_ns()

    def start(self) -> None:
        self._t0 = time.monotonic_ns()
        self._thread.start()

    def on_scan(self, report: ScanReport) -> None:
        self._q.put(report)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(5)

    def _states(self) -> str:
        fb: Any = self._reader_ref[0].feedback
        relay = "[bold green]UNLOCKED[/]" if fb.relay.is_unlocked else "locked"
        buzzer = "sounding" if fb.beeper is not None and fb.beeper.is_playing else "silent"
        return f"LED {fb.light.color:<5} buzzer {buzzer:<8} relay {relay:<8}"

    def _run(self) -> None:
        while (r := self._q.get()) is not None:
            time.sleep(0.005)  # let the background LED/buzzer patterns start before sampling
            d = r.decision
            t = (r.frame.t_ns - self._t0) / 1e9
            verdict = "[bold green]GRANTED[/]" if d.granted else "[bold red]DENIED [/]"
            f2r = (
                f"frame→relay {r.frame_to_relay_ms:5.2f} ms"
                if r.frame_to_relay_ms is not None
                else ""
            )
            self.console.print(
                f"{t:6.2f}s #{r.frame.seq:<4} {verdict} {d.reason!s:<14} {len(d.codes)} code"
                f"{'s' if len(d.codes) > 1 else ' '}  {self._states()}  "
                f"decode {r.decode_ms:4.2f} ms  {f2r}",
                highlight=False,
                soft_wrap=True,
            )


def run_demo(
    state: Path, *, reel: Path | None = None, camera: str | None = None, fps: float = 30.0
) -> int:
    """Run the demo; returns the process exit code."""
    console = Console()
    try:
        config = load_config(prepare(state, reel=reel, camera=camera, fps=fps))
        ref: list[Reader] = []
        view = LiveView(console, ref)
        reader = build_reader(config, listeners=[view.on_scan])
    except QrgateError as e:
        console.print(f"[red]qrgate demo: {e}[/]")
        return 2
    ref.append(reader)
    source = camera or (reel or state / "reel")
    console.print(
        f"[bold]qrgate demo[/]: door {config.reader.door!r}, camera "
        f"{config.camera.source} ({source}) at {fps:g} fps, decoder "
        f"{config.decoder.backend}, gpiozero mock pins, journal {config.journal_path}"
    )
    console.print(
        "[dim]badges: the demo's allowed badge is on the allowlist, its revoked "
        "badge on the denylist; anything else is unknown. Ctrl-C stops.[/]"
    )

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reader.stop_event.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    view.start()
    try:
        reader.start()
        while not reader.wait(0.5):
            pass
    finally:
        reader.stop()
        view.close()
    s = reader.summary()
    table = Table(title="summary", show_header=False)
    rows = [
        ("frames", s["frames"]),
        ("decoded frames", s["decoded_frames"]),
        ("idle frames skipped", s["skipped_idle"]),
        ("frames dropped (stale)", s["dropped"]),
        ("codes decoded", s["decodes"]),
        ("scans decided", s["decisions"]),
        ("granted", s["granted"]),
        ("denied", s["denied"]),
        ("repeats suppressed", s["suppressed_repeats"]),
        ("frame→relay p50", _ms(s["frame_to_relay_ms_p50"])),
        ("frame→relay p99", _ms(s["frame_to_relay_ms_p99"])),
        ("decode p50", _ms(s["decode_ms_p50"])),
    ]
    for k, v in rows:
        table.add_row(k, str(v))
    console.print(table)
    console.print(
        f"journal: {config.journal_path}  (try: .venv/bin/qrgate journal tail "
        f"--db {config.journal_path})"
    )
    return reader.exit_code


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f} ms"
