"""``qrgate fleet rollout`` and ``qrgate fleet jobs``: staged over-the-air updates of the
readers and each reader's last job, for technicians (:mod:`ota.rollout`, :mod:`ota.jobs`)::

    qrgate fleet rollout --broker mqtt.acme.example --cafile ca.crt --version 1.5.0 \\
        --site hq --canary 5 --batch-size 100 --error-threshold 5
    qrgate fleet rollout --broker ... --resume            # after a halt or Ctrl-C
    qrgate fleet rollout --broker ... --abort             # cancel what has not started
    qrgate fleet jobs --broker ... [--site hq] [--json]

Exit status of ``rollout``: 0 done with every reader updated (or aborted as asked), 1 halted
(too many failures) or done with some readers not updated (failures under the threshold), 2
bad options or state file in the way, 3 broker or state file error, 130 interrupted (Ctrl-C;
the state file is kept for ``--resume``).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import click

from firmware.admin.common import BAD_INPUT, REFUSED, fail
from firmware.backoffice.mqtt import MqttSettings
from firmware.backoffice.options import broker_options, mqtt_settings
from firmware.exceptions import QrgateError
from ota.exceptions import JobPayloadError, OtaError, RolloutError
from ota.jobs import StatePayload, all_states, parse_ota_topic
from ota.mqtt import PahoTransport, collect_retained
from ota.rollout import (
    DISPLAY_ORDER,
    NO_RESPONSE,
    DeviceRecord,
    DeviceRef,
    Rollout,
    RolloutEngine,
    RolloutLock,
    RolloutStatus,
    load_rollout,
    save_rollout,
)

__all__ = ["jobs", "rollout"]

BROKER_FAILED = 3
INTERRUPTED = 130
DEFAULT_STATE = Path("qrgate-rollout.json")
DEFAULT_WAVE_TIMEOUT_S = 1800.0
_SHOWN_FAILURES = 20


def _transport(settings: MqttSettings, role: str) -> PahoTransport:
    client = settings.client(f"qrgate-{role}-{uuid.uuid4().hex[:12]}")
    return PahoTransport(client, settings.host, settings.port, keepalive_s=settings.keepalive_s)


def _parse_devices(text: str, site: str | None) -> list[DeviceRef]:
    refs = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if "/" in item:
            s, _, d = item.partition("/")
        elif site is not None:
            s, d = site, item
        else:
            raise click.BadParameter(
                f"{item!r}: give SITE/DEVICE or --site", param_hint="--devices"
            )
        try:
            refs.append(DeviceRef(d, s))
        except JobPayloadError as e:
            raise click.BadParameter(str(e), param_hint="--devices") from None
    if not refs:
        raise click.BadParameter("no devices named", param_hint="--devices")
    return refs


def _discover(opts: dict[str, Any], settings: MqttSettings) -> list[DeviceRef]:
    """The readers to update, from their retained status: those of --site, not already on
    the version, online unless --include-offline."""
    from firmware.backoffice.fleet import collect_status

    snapshot = collect_status(settings, settle_s=opts["settle"])
    refs, same, offline = [], 0, 0
    for s in snapshot.readers:
        if opts["site"] is not None and s.site != opts["site"]:
            continue
        if s.version == opts["version"]:
            same += 1
        elif not s.online and not opts["include_offline"]:
            offline += 1
        else:
            refs.append(DeviceRef(s.device, s.site))
    click.echo(
        f"{len(refs)} readers to update; {same} already on {opts['version']}; "
        f"{offline} offline left out" + ("" if offline == 0 else " (--include-offline)"),
        err=True,
    )
    if not snapshot.complete:
        click.echo("qrgate: the broker list may be incomplete (probe did not return)", err=True)
    return refs


def _summary(r: Rollout) -> str:
    counts = r.counts()
    return "  ".join(f"{name.lower()} {counts[name]}" for name in DISPLAY_ORDER if counts[name])


def _report(r: Rollout) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    table = Table(title=f"{r.version}: {r.status.value}", caption=r.rollout_id)
    table.add_column("State")
    table.add_column("Devices", justify="right")
    counts = r.counts()
    for name in DISPLAY_ORDER:
        if counts[name]:
            table.add_row(name, str(counts[name]))
    console.print(table)
    failed = [rec for rec in r.devices.values() if rec.failed]
    for rec in failed[:_SHOWN_FAILURES]:
        console.print(f"  {rec.key}: {_failure(rec)}", markup=False)
    if len(failed) > _SHOWN_FAILURES:
        console.print(f"  ... and {len(failed) - _SHOWN_FAILURES} more (see the state file)")
    if r.status is RolloutStatus.HALTED:
        console.print(f"[red]halted:[/red] {r.halt_reason}; {_NEXT_STEP}")
    elif r.status is RolloutStatus.DONE:
        ok, not_ok = r.outcome()
        console.print(f"{ok} of {len(r.devices)} readers updated, {not_ok} not (failed or silent)")
        silent = sum(1 for rec in r.devices.values() if rec.display == NO_RESPONSE)
        if silent:
            console.print(
                f"{silent} readers never answered: their job stays on the broker (a reader "
                "takes it when it comes back); --abort withdraws those jobs"
            )


_NEXT_STEP = "continue with --resume (optionally --error-threshold) or --abort"


def _failure(rec: DeviceRecord) -> str:
    """How a failed reader is listed: its state and reason, ``NO_RESPONSE no_response``
    (with its last report, if any) for a silent one."""
    detail = f" ({rec.detail})" if rec.detail else ""
    if rec.display == NO_RESPONSE:
        last = f" (last report {rec.state} {rec.reason}{detail})" if rec.state else ""
        return f"{NO_RESPONSE} no_response{last}"
    return f"{rec.display} {rec.reason}{detail}"


def _run_with_progress(
    engine: RolloutEngine, *, resume: bool, threshold: float | None
) -> RolloutStatus:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    r = engine.rollout
    total = len(r.devices)
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=False
    ) as progress:
        task = progress.add_task("starting", total=total)

        def show(ro: Rollout) -> None:
            done = sum(1 for rec in ro.devices.values() if rec.terminal or rec.cancelled)
            wave = min(ro.wave_index + 1, len(ro.waves))
            progress.update(
                task,
                completed=done,
                description=f"wave {wave}/{len(ro.waves)}  {_summary(ro)}",
            )

        engine.on_progress = show
        if resume:
            return engine.resume(error_threshold_pct=threshold)
        return engine.run()


@click.command("rollout")
@broker_options
@click.option("--version", "version", metavar="V", help="The release to install.")
@click.option("--site", help="Only the readers of this site.")
@click.option(
    "--devices",
    metavar="A,B,...",
    help="Only these readers (DEVICE with --site, or SITE/DEVICE) [default: every reader "
    "whose retained status shows another version].",
)
@click.option("--canary", type=click.IntRange(0), help="Readers in the first (canary) wave.")
@click.option("--batch-size", type=click.IntRange(1), help="Readers per later wave.")
@click.option(
    "--error-threshold",
    type=click.FloatRange(0, 100),
    help="Halt when more than this percent of the readers started so far failed.",
)
@click.option(
    "--wave-timeout",
    type=click.FloatRange(min=1),
    default=DEFAULT_WAVE_TIMEOUT_S,
    show_default=True,
    help="Seconds a wave may take; silent readers then count as failed (no_response).",
)
@click.option(
    "--state",
    "state_path",
    type=click.Path(path_type=Path, dir_okay=False),
    default=DEFAULT_STATE,
    show_default=True,
    help="The rollout's state file (kept for --resume and --abort).",
)
@click.option("--allow-downgrade", is_flag=True, help="Readers may install an older version.")
@click.option("--include-offline", is_flag=True, help="Also readers whose status is offline.")
@click.option(
    "--settle",
    type=click.FloatRange(0.1, 60.0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the retained statuses at most.",
)
@click.option("--resume", is_flag=True, help="Continue the halted or interrupted rollout.")
@click.option(
    "--abort",
    is_flag=True,
    help="Cancel the jobs not started; mark it ABORTED (a DONE rollout: cancel the jobs of "
    "readers that never answered).",
)
def rollout(**opts: Any) -> None:
    """Update readers in waves (canary first), halting when failures pass the threshold.

    Exit status: 0 done with every reader updated (or aborted as asked); 1 halted, or done
    with some readers not updated; 2 bad options or a state file in the way; 3 broker or
    state file error; 130 interrupted (continue with --resume).
    """
    if opts["resume"] and opts["abort"]:
        raise click.UsageError("--resume and --abort do not go together")
    settings = mqtt_settings(opts)
    path: Path = opts["state_path"]
    if not (opts["resume"] or opts["abort"]):
        missing = [
            f"--{n.replace('_', '-')}"
            for n in ("version", "canary", "batch_size", "error_threshold")
            if opts[n] is None
        ]
        if missing:
            raise click.UsageError(f"a new rollout needs {', '.join(missing)}")
    try:
        with RolloutLock(path):
            sys.exit(_rollout(opts, settings, path))
    except RolloutError as e:
        fail(e, BAD_INPUT)
    except (OtaError, QrgateError, OSError) as e:
        fail(e, BROKER_FAILED)


def _rollout(opts: dict[str, Any], settings: MqttSettings, path: Path) -> int:
    if opts["resume"] or opts["abort"]:
        hint = "start one without --resume" if opts["resume"] else "nothing to abort: check --state"
        r = load_rollout(path, missing_hint=hint)
        if opts["version"] is not None and opts["version"] != r.version:
            raise RolloutError(f"{path} is the rollout of {r.version}, not {opts['version']}")
    else:
        if path.exists():
            old = load_rollout(path)
            if old.status in (RolloutStatus.RUNNING, RolloutStatus.HALTED):
                raise RolloutError(
                    f"{path} holds rollout {old.rollout_id} of {old.version}, "
                    f"{old.status.value}: --resume or --abort it, or give another --state"
                )
        if opts["devices"]:
            refs = _parse_devices(opts["devices"], opts["site"])
        else:
            refs = _discover(opts, settings)
        r = Rollout.create(
            opts["version"],
            refs,
            canary=opts["canary"],
            batch_size=opts["batch_size"],
            error_threshold_pct=opts["error_threshold"],
            allow_downgrade=opts["allow_downgrade"],
        )
        click.echo(
            f"rollout {r.rollout_id}: {len(r.devices)} readers in {len(r.waves)} waves", err=True
        )
    transport = _transport(settings, "rollout")
    engine = RolloutEngine(r, path, transport, wave_timeout_s=opts["wave_timeout"])
    transport.connect()
    try:
        if not (opts["resume"] or opts["abort"]):
            save_rollout(path, r)
            click.echo(f"state file {path}", err=True)
        if opts["abort"]:
            was_done = r.status is RolloutStatus.DONE
            cancelled = engine.abort()
            if was_done:
                click.echo(
                    f"rollout was DONE: {len(cancelled)} jobs of readers that never answered "
                    "cancelled",
                    err=True,
                )
            else:
                click.echo(f"aborted: {len(cancelled)} jobs cancelled", err=True)
            _report(r)
            return 0
        try:
            status = _run_with_progress(
                engine, resume=opts["resume"], threshold=opts["error_threshold"]
            )
        except KeyboardInterrupt:
            save_rollout(path, r)
            click.echo(f"interrupted: {path} kept; continue with --resume", err=True)
            return INTERRUPTED
    finally:
        transport.close()
    _report(r)
    return 0 if status is RolloutStatus.DONE and r.outcome()[1] == 0 else REFUSED


JOB_COLUMNS = ("Device", "Site", "Job", "State", "Reason", "From", "To", "Download", "Running",
               "When")  # fmt: skip


@click.command("jobs")
@broker_options
@click.option("--site", help="Only the readers of this site.")
@click.option(
    "--settle",
    type=click.FloatRange(0.1, 60.0),
    default=2.0,
    show_default=True,
    help="Seconds to wait for the retained job states at most.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reader.")
def jobs(**opts: Any) -> None:
    """Each reader's last update job, from its retained ota/state report."""
    settings = mqtt_settings(opts)
    transport = _transport(settings, "jobs")
    try:
        transport.connect()
        try:
            found, complete = collect_retained(
                transport, all_states(opts["site"] or "+"), settle_s=opts["settle"]
            )
        finally:
            transport.close()
    except (OtaError, OSError) as e:
        fail(e, BROKER_FAILED)
    reports: list[StatePayload] = []
    for topic, payload in sorted(found.items()):
        parsed = parse_ota_topic(topic)
        if parsed is None:
            continue
        try:
            reports.append(StatePayload.parse(payload, site=parsed[0], device=parsed[1]))
        except JobPayloadError as e:
            click.echo(f"qrgate: skipped {topic}: {e}", err=True)
    if not complete:
        click.echo("qrgate: the list may be incomplete (probe did not return)", err=True)
    if opts["as_json"]:
        for rep in reports:
            click.echo(json.dumps(rep.to_dict(), sort_keys=True))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(reports)} readers with a job")
    for name in JOB_COLUMNS:
        table.add_column(name)
    for rep in reports:
        failed = rep.failed
        table.add_row(*_job_row(rep), style="red" if failed else None)
    Console().print(table)


def _job_row(rep: StatePayload) -> tuple[str, ...]:
    if rep.bytes_total:
        download = f"{rep.bytes_done * 100 // rep.bytes_total} % of {rep.bytes_total / 1e6:.1f} MB"
    else:
        download = "-"
    when = (
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rep.wall_ns / 1e9))
        if rep.wall_ns
        else "-"
    )
    reason = rep.reason + (f" ({rep.detail})" if rep.detail else "")
    return (
        rep.device, rep.site, rep.job_id, rep.state.value, reason, rep.from_version,
        rep.to_version, download, rep.current_version or "-", when,
    )  # fmt: skip
