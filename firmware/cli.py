"""The ``qrgate`` command: run the daemon, check config, and tools for people at a reader."""

from __future__ import annotations

import atexit
import json
import logging
import secrets
import signal
import sys
import time
from pathlib import Path
from types import FrameType

import click

from firmware import __version__
from firmware.exceptions import ConfigError, QrgateError


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group()
@click.version_option(__version__, prog_name="qrgate")
def main() -> None:
    """qrgate: firmware for QR-code door readers."""


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), required=True,
              help="TOML config file.")
@click.option("-v", "--verbose", is_flag=True)
def run(config_path: Path, verbose: bool) -> None:
    """Run the reader daemon until SIGTERM/SIGINT (or the end of a replayed reel)."""
    from firmware.config import load_config
    from firmware.daemon import build_reader
    from firmware.logs import log_scan, setup_logging

    listener = setup_logging(verbose)
    atexit.register(listener.stop)
    try:
        config = load_config(config_path)
        reader = build_reader(config, listeners=[log_scan])
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2 if isinstance(e, ConfigError) else 3)
    except Exception as e:  # drivers' errors (pins, camera) name their own fix
        click.echo(f"qrgate: cannot start: {e}", err=True)
        sys.exit(3)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reader.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        reader.start()
        while not reader.wait(0.5):
            pass
    finally:
        reader.stop()
    logging.getLogger("qrgate").info("stopped: %s", json.dumps(reader.summary()))
    sys.exit(reader.exit_code)


@main.group("config")
def config_group() -> None:
    """Reader configuration."""


@config_group.command("check")
@click.argument("file", type=click.Path(path_type=Path))
def config_check(file: Path) -> None:
    """Validate FILE (and the badge list and key it names); exit 0 if it is usable."""
    from firmware.config import load_config
    from firmware.daemon import make_policy

    try:
        config = load_config(file)
        _, badges = make_policy(config)
    except QrgateError as e:
        click.echo(f"invalid: {e}", err=True)
        sys.exit(2)
    click.echo(f"ok: {file}: door {config.reader.door!r}, camera {config.camera.source}, "
               f"decoder {config.decoder.backend}, {len(badges.allow)} allowed and "
               f"{len(badges.deny)} denied badges, journal {config.journal_path}")


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--backend", default="zxing-cpp", show_default=True,
              type=click.Choice(["zxing-cpp", "zbar", "cascade"]))
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file.")
def decode(files: tuple[Path, ...], backend: str, as_json: bool) -> None:
    """Decode the QR codes in image FILES and show their exact payload bytes."""
    from drivers.replay import load_gray
    from firmware.decoding.registry import make_decoder

    try:
        decoder = make_decoder(backend)
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(3)
    failed = False
    for f in files:
        try:
            image = load_gray(f)
        except Exception as e:
            failed = True
            err = f"cannot read image: {e}"
            if as_json:
                click.echo(json.dumps({"file": str(f), "codes": [], "error": err}))
            else:
                click.echo(f"{f}: {err}", err=True)
            continue
        t0 = time.perf_counter()
        codes = decoder.decode(image)
        ms = round((time.perf_counter() - t0) * 1000, 3)
        if as_json:
            click.echo(json.dumps({"file": str(f), "codes": [
                {"bytes_hex": c.payload.hex(), "text": c.text(), "backend": c.backend,
                 "ms": ms} for c in codes]}, ensure_ascii=False))
            continue
        if not codes:
            click.echo(f"{f}: no code ({ms} ms)")
        for c in codes:
            click.echo(f"{f}: {len(c.payload)} bytes via {c.backend} ({ms} ms): "
                       f"{printable(c.payload)}")
    sys.exit(1 if failed else 0)


def printable(payload: bytes, limit: int = 120) -> str:
    """A payload for a terminal or log line: UTF-8 text with control characters escaped, or
    hex when it is not UTF-8; cut at ``limit`` characters."""
    try:
        text: str | None = payload.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None:
        shown = "hex:" + payload.hex()
    else:
        shown = repr(text)[1:-1] if not text.isprintable() else text
    return shown if len(shown) <= limit else shown[:limit] + f"… ({len(payload)} bytes)"


@main.group()
def journal() -> None:
    """Read the journal (safe while the daemon runs: read-only)."""


def _journal_path(config: Path | None, db: Path | None) -> Path:
    if db is not None:
        return db
    from firmware.config import load_config

    try:
        return load_config(config or Path("/etc/qrgate/qrgate.toml")).journal_path
    except ConfigError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2)


@journal.command("tail")
@click.option("--config", type=click.Path(path_type=Path), help="Reader config file.")
@click.option("--db", type=click.Path(path_type=Path), help="Journal file (instead of --config).")
@click.option("-n", "count", default=20, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def journal_tail(config: Path | None, db: Path | None, count: int, as_json: bool) -> None:
    """The newest events, oldest first."""
    from firmware.journal.reader import JournalReader

    path = _journal_path(config, db)
    try:
        events = JournalReader(path).tail(count)
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2)
    for s in events:
        ev = s.event
        if as_json:
            click.echo(json.dumps({"seq": s.seq, "event_id": s.event_id, "boot_id": s.boot_id,
                                   "kind": ev.kind, "wall_ns": ev.wall_ns,
                                   "clock_synced": ev.clock_synced, "door": ev.door,
                                   "direction": ev.direction, "decision": ev.decision,
                                   "reason": ev.reason, "credential_kind": ev.credential_kind,
                                   "subject": ev.subject, "codes": list(ev.codes),
                                   "decode_ms": ev.decode_ms, "verdict_ms": ev.verdict_ms,
                                   "frame_to_relay_ms": ev.frame_to_relay_ms,
                                   "published": s.published, "acked": s.acked}))
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.wall_ns / 1e9))
        synced = "" if ev.clock_synced else "~"
        f2r = f" {ev.frame_to_relay_ms:.1f}ms" if ev.frame_to_relay_ms is not None else ""
        click.echo(f"{s.seq:>8} {synced}{when} {ev.door} {ev.kind:<8} {ev.decision or '-':<7} "
                   f"{ev.reason:<20} {ev.credential_kind or '-':<7} "
                   f"{(ev.subject or '-')[:16]}{f2r}")


@journal.command("stats")
@click.option("--config", type=click.Path(path_type=Path), help="Reader config file.")
@click.option("--db", type=click.Path(path_type=Path), help="Journal file (instead of --config).")
def journal_stats(config: Path | None, db: Path | None) -> None:
    """Counts by decision and reason, outbox state, gaps, file size."""
    from firmware.journal.reader import JournalReader

    path = _journal_path(config, db)
    try:
        stats = JournalReader(path).stats()
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2)
    click.echo(json.dumps(stats, indent=2, default=str))


@main.group()
def badge() -> None:
    """Site key and badge lists (allowlist and denylist of keyed HMACs)."""


@badge.command("keygen")
@click.argument("keyfile", type=click.Path(path_type=Path))
def badge_keygen(keyfile: Path) -> None:
    """Write a new 32-byte site HMAC key (hex) to KEYFILE, mode 0600. Refuses to overwrite."""
    import os

    try:
        fd = os.open(keyfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        click.echo(f"qrgate: {keyfile} exists; not overwriting a site key", err=True)
        sys.exit(2)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    click.echo(f"wrote {keyfile}")


def _payload(text: str | None, hex_: str | None) -> bytes:
    if (text is None) == (hex_ is None):
        raise click.UsageError("give exactly one of --text or --hex")
    if text is not None:
        return text.encode("utf-8")
    try:
        return bytes.fromhex(hex_ or "")
    except ValueError:
        raise click.UsageError("--hex must be hexadecimal bytes") from None


@badge.command("add")
@click.option("--key", "keyfile", type=click.Path(path_type=Path), required=True)
@click.option("--list", "listfile", type=click.Path(path_type=Path), required=True,
              help="Badge list JSON (created if missing).")
@click.option("--text", help="Payload as UTF-8 text.")
@click.option("--hex", "hex_", help="Payload as hex bytes.")
@click.option("--deny", is_flag=True, help="Put it on the denylist instead of the allowlist.")
@click.option("--label", default="", help="A name for the allowlist entry.")
def badge_add(  # noqa: PLR0917 - click passes options positionally
    keyfile: Path, listfile: Path, text: str | None, hex_: str | None, deny: bool, label: str
) -> None:
    """Add a badge payload (as its keyed HMAC) to a badge list; bumps the list version."""
    from firmware.policy.badges import BadgeList, load_badges, write_badges
    from firmware.policy.subjects import SubjectHasher, load_key

    payload = _payload(text, hex_)
    try:
        subject = SubjectHasher(load_key(keyfile)).subject(payload)
        old = load_badges(listfile) if listfile.exists() else BadgeList.of()
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2)
    allow, denied, labels = set(old.allow), set(old.deny), dict(old.labels)
    if deny:
        denied.add(subject)
    else:
        allow.add(subject)
        labels[subject] = label
    write_badges(listfile, BadgeList(frozenset(allow), frozenset(denied), labels,
                                     old.version + 1))
    click.echo(f"{'denied' if deny else 'allowed'} {subject}")


@main.command()
@click.option("--reel", type=click.Path(path_type=Path, exists=True),
              help="Replay this folder of photos instead of the generated demo reel.")
@click.option("--camera", help="Use this V4L2 webcam (e.g. /dev/video0) instead of a reel.")
@click.option("--state", type=click.Path(path_type=Path), default=Path("demo-state"),
              show_default=True, help="Folder for the demo's config, badges and journal.")
@click.option("--fps", default=30.0, show_default=True)
def demo(reel: Path | None, camera: str | None, state: Path, fps: float) -> None:
    """Run the real daemon on the embedded demo (generated reel, mock pins)."""
    from firmware.demo.run import run_demo

    _setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_demo(state, reel=reel, camera=camera, fps=fps))


if __name__ == "__main__":
    main()
