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
from typing import TYPE_CHECKING, Any, ClassVar

import click

from drivers.exceptions import DriverError
from firmware import __version__
from firmware.backoffice.options import broker_options, mqtt_settings
from firmware.exceptions import ConfigError, CredentialListError, QrgateError

if TYPE_CHECKING:
    pass


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


class _LazyGroup(click.Group):
    """A group some of whose commands live in other modules, imported only when named: the
    administration tools pull in cryptography and numpy, which `qrgate journal tail` and
    the daemon's start never need before they decide to."""

    lazy: ClassVar[dict[str, str]] = {
        "ca": "firmware.admin.ca:ca",
        "camera": "firmware.tools.camera_check:camera",
        "credentials": "firmware.admin.credentials:credentials",
        "enroll": "firmware.admin.enroll:enroll",
        "factory-reset": "firmware.tools.factory_reset:factory_reset",
        "identity": "firmware.tools.identity:identity",
        "keys": "firmware.admin.keys:keys",
        "ota": "firmware.admin.ota:ota",
        "pass": "firmware.admin.passes:pass_group",
        "provision-mode": "firmware.tools.provision_mode:provision_mode",
        "provision": "firmware.admin.provision:provision",
        "relay": "firmware.tools.relay:relay",
        "selftest": "firmware.tools.selftest:selftest",
    }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.lazy:
            return super().get_command(ctx, cmd_name)
        import importlib

        module, attr = self.lazy[cmd_name].split(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):
            raise TypeError(f"{self.lazy[cmd_name]} is not a click command")
        return command


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="qrgate")
def main() -> None:
    """qrgate: firmware for QR-code door readers."""


@main.command()
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="TOML config file.",
)
@click.option("-v", "--verbose", is_flag=True)
def run(config_path: Path, verbose: bool) -> None:
    """Run the reader daemon until SIGTERM, SIGINT or SIGHUP (or the end of a replayed reel).

    Each of those signals locks the door and stops cleanly; under systemd, Restart= brings the
    reader back (that is how a changed badge list or config is taken up). Under systemd
    (NOTIFY_SOCKET set) it sends READY=1 once camera, GPIO and journal are up, STATUS= lines,
    WATCHDOG=1 while the scan loop makes progress, and STOPPING=1."""
    from drivers.systemd import ServiceNotifier
    from firmware.config import load_config
    from firmware.daemon import build_reader, describe
    from firmware.logs import scan_logger, setup_logging
    from firmware.supervisor import Supervisor

    listener = setup_logging(verbose)
    atexit.register(listener.stop)
    notifier = ServiceNotifier.from_env()
    try:
        config = load_config(config_path)
        if config.provisioning.public_key is not None:
            # a reader set up for provisioning mode and not provisioned yet waits for its
            # code instead; once provisioned it exits 0 and systemd starts it as a reader
            from firmware.provisioning_mode import needs_provisioning
            from provisioning.identity import device_id

            device = device_id()
            if needs_provisioning(config, device):
                from firmware.tools.provision_mode import run_provisioning

                sys.exit(run_provisioning(config, notifier, device=device))
        reader = build_reader(config, listeners=[scan_logger(config.reader.door)])
    except QrgateError as e:
        notifier.status(f"cannot start: {e}")
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2 if isinstance(e, ConfigError) else 3)
    except Exception as e:  # drivers' errors (pins, camera) name their own fix
        notifier.status(f"cannot start: {e}")
        click.echo(f"qrgate: cannot start: {e}", err=True)
        sys.exit(3)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        reader.stop_event.set()

    # SIGHUP too: its default action kills the process without locking the door (closing the
    # SSH session an installer started the daemon from sends it)
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    interval = notifier.watchdog_interval_s
    if interval is not None and interval < config.camera.read_timeout_s + 1:
        logging.getLogger("qrgate").warning(
            "WatchdogSec (%.1f s) is shorter than [camera] read_timeout_s + 1 s: a camera stall"
            " will be cured by a restart rather than by re-opening the camera",
            interval,
        )
    try:
        reader.start()
        Supervisor(
            stop=reader.stop_event,
            health=reader.health,
            scan=reader.scan,
            notifier=notifier,
            describe=lambda: describe(reader),
        ).run()
    except (QrgateError, DriverError) as e:
        # journal unusable...: one clear line, the door locked, non-zero exit
        reader.stop()
        click.echo(f"qrgate: cannot start: {e}", err=True)
        sys.exit(3)
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
    """Validate FILE (and the key and credential files it names); exit 0 if it is usable."""
    from firmware.config import load_config
    from firmware.daemon import link_settings, make_policy, make_snapshot_store, with_provisioned

    try:
        config = with_provisioned(load_config(file))
        creds = make_policy(config).credentials
        make_snapshot_store(config)  # the snapshot key file, as `qrgate run` loads it
        if config.uplink.enabled:
            link_settings(config, "config-check")  # TLS files and the password file
        if config.ota.repo_url:
            from firmware.ota_agent import load_trusted_root

            load_trusted_root(config)  # as `qrgate ota agent` loads it
    except QrgateError as e:
        click.echo(f"invalid: {e}", err=True)
        sys.exit(2)
    updates = f"updates from {config.ota.repo_url}" if config.ota.repo_url else "updates off"
    click.echo(
        f"ok: {file}: door {config.reader.door!r}, camera {config.camera.source}, "
        f"decoder {config.decoder.backend}, mode {config.reader.mode}, "
        f"{len(creds.badges.allow)} allowed and {len(creds.badges.deny)} denied badges, "
        f"{len(creds.trust)} issuer keys, {creds.deny_cti + creds.deny_sub} revocations, "
        f"journal {config.journal_path}, {updates}"
    )


@main.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--backend",
    default="zxing-cpp",
    show_default=True,
    type=click.Choice(["zxing-cpp", "zbar", "cascade"]),
)
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
            click.echo(
                json.dumps(
                    {
                        "file": str(f),
                        "codes": [
                            {
                                "bytes_hex": c.payload.hex(),
                                "text": c.text(),
                                "backend": c.backend,
                                "ms": ms,
                            }
                            for c in codes
                        ],
                    },
                    ensure_ascii=False,
                )
            )
            continue
        if not codes:
            click.echo(f"{f}: no code ({ms} ms)")
        for c in codes:
            click.echo(
                f"{f}: {len(c.payload)} bytes via {c.backend} ({ms} ms): {printable(c.payload)}"
            )
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
@click.option("-n", "count", default=20, show_default=True, type=click.IntRange(min=1))
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
            click.echo(
                json.dumps(
                    {
                        "seq": s.seq,
                        "event_id": s.event_id,
                        "boot_id": s.boot_id,
                        "kind": ev.kind,
                        "wall_ns": ev.wall_ns,
                        "clock_synced": ev.clock_synced,
                        "door": ev.door,
                        "direction": ev.direction,
                        "decision": ev.decision,
                        "reason": ev.reason,
                        "credential_kind": ev.credential_kind,
                        "subject": ev.subject,
                        "codes": list(ev.codes),
                        "decode_ms": ev.decode_ms,
                        "verdict_ms": ev.verdict_ms,
                        "frame_to_relay_ms": ev.frame_to_relay_ms,
                        "published": s.published,
                        "acked": s.acked,
                    }
                )
            )
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ev.wall_ns / 1e9))
        synced = "" if ev.clock_synced else "~"
        f2r = f" {ev.frame_to_relay_ms:.1f}ms" if ev.frame_to_relay_ms is not None else ""
        click.echo(
            f"{s.seq:>8} {synced}{when} {ev.door} {ev.kind:<8} {ev.decision or '-':<7} "
            f"{ev.reason:<20} {ev.credential_kind or '-':<7} "
            f"{(ev.subject or '-')[:16]}{f2r}"
        )


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
    try:
        payload = text.encode("utf-8") if text is not None else bytes.fromhex(hex_ or "")
    except ValueError:
        raise click.UsageError("--hex must be hexadecimal bytes") from None
    if not payload:
        raise click.UsageError("an empty payload can never be scanned")
    return payload


@badge.command("add")
@click.option("--key", "keyfile", type=click.Path(path_type=Path), required=True)
@click.option(
    "--list",
    "listfile",
    type=click.Path(path_type=Path),
    required=True,
    help="Badge list JSON (created if missing).",
)
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
    write_badges(listfile, BadgeList(frozenset(allow), frozenset(denied), labels, old.version + 1))
    click.echo(f"{'denied' if deny else 'allowed'} {subject}")


@badge.command("remove")
@click.option("--key", "keyfile", type=click.Path(path_type=Path), required=True)
@click.option(
    "--list",
    "listfile",
    type=click.Path(path_type=Path),
    required=True,
    help="Badge list JSON (created by --revoke if missing).",
)
@click.option("--text", help="Payload as UTF-8 text.")
@click.option("--hex", "hex_", help="Payload as hex bytes.")
@click.option(
    "--revoke", is_flag=True, help="Move it to the denylist instead of dropping it from both."
)
def badge_remove(
    keyfile: Path, listfile: Path, text: str | None, hex_: str | None, revoke: bool
) -> None:
    """Take a badge payload (as its keyed HMAC) off the allowlist and the denylist, or with
    --revoke off the allowlist and onto the denylist; bumps the list version. Exit 1 when
    there was nothing to change."""
    from firmware.policy.badges import BadgeList, load_badges, write_badges
    from firmware.policy.subjects import SubjectHasher, load_key

    payload = _payload(text, hex_)
    try:
        subject = SubjectHasher(load_key(keyfile)).subject(payload)
        if not listfile.exists() and not revoke:
            raise CredentialListError(f"{listfile}: no such badge list")
        old = load_badges(listfile) if listfile.exists() else BadgeList.of()
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(2)
    allow = old.allow - {subject}
    denied = old.deny | {subject} if revoke else old.deny - {subject}
    if allow == old.allow and denied == old.deny:
        where = "already on the denylist" if revoke else "on neither list"
        click.echo(f"{subject} is {where}: nothing changed")
        sys.exit(1)
    labels = {s: label for s, label in old.labels.items() if s != subject}
    write_badges(listfile, BadgeList(allow, denied, labels, old.version + 1))
    click.echo(f"{'revoked' if revoke else 'removed'} {subject}")


@main.command()
@click.option(
    "--reel",
    type=click.Path(path_type=Path, exists=True),
    help="Replay this folder of photos instead of the generated demo reel.",
)
@click.option("--camera", help="Use this V4L2 webcam (e.g. /dev/video0) instead of a reel.")
@click.option(
    "--state",
    type=click.Path(path_type=Path),
    default=Path("demo-state"),
    show_default=True,
    help="Folder for the demo's config, badges and journal.",
)
@click.option("--fps", default=30.0, show_default=True)
@click.option(
    "--mosquitto",
    envvar="QRGATE_MOSQUITTO",
    metavar="PATH",
    help="The mosquitto executable for the demo's private broker [default: mosquitto on "
    "PATH, else /usr/sbin/mosquitto]; where there is none the demo runs without a broker.",
)
def demo(
    reel: Path | None, camera: str | None, state: Path, fps: float, mosquitto: str | None
) -> None:
    """Run the real daemon on the embedded demo (generated reel, mock pins), with a private
    MQTT broker and the reference back office (`qrgate ingest`)."""
    from firmware.demo.run import run_demo

    _setup_logging(False)
    logging.getLogger().setLevel(logging.WARNING)
    sys.exit(run_demo(state, reel=reel, camera=camera, fps=fps, mosquitto=mosquitto))


# -- the reference back office ------------------------------------------------------------

_broker_options = broker_options
_mqtt_settings = mqtt_settings


@main.command()
@_broker_options
@click.option(
    "--db",
    required=True,
    metavar="FILE_OR_URL",
    help="SQLite file (created if missing) or postgresql://USER@HOST/DB URL.",
)
@click.option(
    "--group",
    default="qrgate-ingest",
    show_default=True,
    help="Shared-subscription group: the workers of one group share the events.",
)
@click.option(
    "--client-id",
    help="This worker's MQTT client id, unique per worker and stable "
    "across its restarts [default: qrgate-ingest-HOSTNAME-GROUP].",
)
@click.option(
    "--session-expiry",
    default=3600,
    show_default=True,
    type=click.IntRange(0, 2**32 - 1),
    help="Seconds the broker keeps this worker's session (and queues its share) "
    "while it is away; 0: a clean session each start.",
)
@click.option("-v", "--verbose", is_flag=True)
def ingest(**opts: Any) -> None:
    """Store readers' events and status from MQTT and publish their acks (until SIGTERM)."""
    import threading

    from firmware.backoffice.ingest import IngestWorker, serve
    from firmware.backoffice.store import open_store

    _setup_logging(opts["verbose"])
    settings = _mqtt_settings(opts)
    try:
        store = open_store(opts["db"])
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(3)
    try:
        try:
            worker = IngestWorker(
                store,
                settings,
                group=opts["group"],
                client_id=opts["client_id"],
                session_expiry_s=opts["session_expiry"],
            )
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--group") from None
        stop = threading.Event()

        def on_signal(signum: int, frame: FrameType | None) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        code = serve(worker, stop)
    finally:
        store.close()
    sys.exit(code)


@main.command()
@click.option(
    "--db",
    required=True,
    metavar="FILE_OR_URL",
    help="The store ingest writes: SQLite file or postgresql:// URL.",
)
@click.option(
    "--since",
    required=True,
    metavar="ISO_DATE",
    help="Start, e.g. 2025-03-03 or 2025-03-03T08:00 (in --tz unless it has an offset).",
)
@click.option("--until", metavar="ISO_DATE", help="End, exclusive [default: now].")
@click.option("--by", type=click.Choice(["hour", "day"]), default="day", show_default=True)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also write the rows to this CSV file.",
)
@click.option(
    "--png",
    "png_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Also draw a bar chart into this PNG file.",
)
@click.option("--tz", "tz_name", help="IANA time zone of the periods [default: this machine's].")
def report(**opts: Any) -> None:
    """Entries, exits, granted and denied scans per door, per hour or day."""
    import datetime as dt

    from rich.console import Console

    from firmware.backoffice import report as rep
    from firmware.backoffice.store import open_store

    try:
        tz = rep.zone(opts["tz_name"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tz") from None
    try:
        since = rep.parse_when(opts["since"], tz)
        until = rep.parse_when(opts["until"], tz) if opts["until"] else dt.datetime.now(tz)
        if until <= since:
            raise ValueError(f"--until {until.isoformat()} is not after --since")
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--since/--until") from None
    try:
        store = open_store(opts["db"], create=False)
        try:
            result = rep.build_report(store, since, until, opts["by"], tz)
        finally:
            store.close()
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(3)
    console = Console()
    console.print(rep.report_table(result))
    if result.readers:
        console.print(rep.readers_table(result, tz))
    try:
        if opts["csv_path"]:
            rep.write_csv(result, opts["csv_path"])
            click.echo(f"wrote {opts['csv_path']}")
        if opts["png_path"]:
            rep.write_png(result, opts["png_path"])
            click.echo(f"wrote {opts['png_path']}")
    except OSError as e:
        click.echo(f"qrgate: cannot write: {e}", err=True)
        sys.exit(3)


class _LazyFleet(_LazyGroup):
    lazy: ClassVar[dict[str, str]] = {
        "jobs": "firmware.admin.fleet_rollout:jobs",
        "rollout": "firmware.admin.fleet_rollout:rollout",
    }


@main.group(cls=_LazyFleet)
def fleet() -> None:
    """The readers as the broker sees them."""


@fleet.command("status")
@_broker_options
@click.option(
    "--settle",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0.1, 60.0),
    help="Seconds to wait for retained statuses at most.",
)
@click.option("--tz", "tz_name", help="IANA time zone for times [default: this machine's].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reader.")
def fleet_status(**opts: Any) -> None:
    """One table of all readers from their retained status topics."""
    from rich.console import Console

    from firmware.backoffice.fleet import collect_status, fleet_table
    from firmware.backoffice.report import zone

    try:
        tz = zone(opts["tz_name"])
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--tz") from None
    try:
        snapshot = collect_status(_mqtt_settings(opts), settle_s=opts["settle"])
    except QrgateError as e:
        click.echo(f"qrgate: {e}", err=True)
        sys.exit(3)
    for reason in snapshot.malformed:
        click.echo(f"qrgate: skipped status {reason}", err=True)
    if opts["as_json"]:
        for s in snapshot.readers:
            click.echo(s.payload_json)
    else:
        Console().print(fleet_table(snapshot, tz))


if __name__ == "__main__":
    main()
