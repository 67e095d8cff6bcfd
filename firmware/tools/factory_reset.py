"""``qrgate factory-reset``: forget this reader's identity, kept state and journal, before it
is provisioned again (a new site or door, a reader taken back from a customer, a key that may
have leaked).

What it removes, all under the config's ``reader.state_dir`` (the journal where
``[journal] path`` puts it):

- ``identity/``: the device key, CSR, certificate and CA chain (:meth:`DeviceKeys.wipe`);
- ``desired.json``: the desired configuration the back office sent last;
- ``credentials.snapshot`` (and its ``.damaged-*`` copies): the credential snapshot;
- ``clock.json``: the last clock sync;
- ``provisioned.json``: the door and broker settings provisioning mode wrote;
- the journal: ``journal.db`` with ``-wal``/``-shm``, the spill log ``journal.db.spill`` and
  files moved aside (``journal.db.damaged-*``, ``journal.db.orphan-*``);
- leftover temp files of those writes.

What it keeps: ``provisioning-used.json`` (the provisioning codes this reader has used: one
must not provision it again after a reset), the device id (it comes from the hardware and
survives any reset), the lock files ``qrgate.lock`` and ``journal.db.lock`` (deleting a lock
file races whoever opens it next), and ``journal.db.seq``, the journal's seq high-water mark:
the back office keeps this reader's old events and acknowledgements under its unchanged device
id, so a journal starting again at seq 1 would be "acknowledged" for events it never sent; with
the mark kept the next journal numbers its events above the old ones and records a
``journal_missing`` incident. The config file stays too unless ``--config-too``: the file in
/etc is the installer's (and the package's), not the reader's state.

Safety: it holds the daemon's instance lock (refuses while the reader service runs) and the
journal's writer lock, asks first (unless ``--yes``), and refuses while the journal holds
events the back office has not acknowledged (unless ``--force``): a reset would lose them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from firmware.config import Config
from firmware.exceptions import JournalError, QrgateError
from provisioning.files import fsync_dir

# (name, glob patterns of what goes with it) in the state folder, besides the identity
# folder and the journal. Names as the modules writing them spell them.
_STATE_FILES = (
    # firmware/uplink/desired.py FILE_NAME, temp file name + ".tmp"
    ("desired configuration", ("desired.json", "desired.json.tmp")),
    # firmware/policy/snapshot.py FILE_NAME, its temp files and damaged copies
    (
        "credential snapshot",
        ("credentials.snapshot", ".credentials.snapshot.*.tmp", "credentials.snapshot.damaged-*"),
    ),
    # firmware/daemon.py state_file=state / "clock.json", firmware/clock.py temp file
    ("clock state", ("clock.json", "clock.json.tmp")),
    # firmware/provisioning_mode.py OVERLAY_FILE and its temp files (provisioning-used.json
    # stays: a code used before the reset must not provision it again)
    ("provisioned settings", ("provisioned.json", ".provisioned.json.*.tmp")),
)


@click.command("factory-reset")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="TOML config file (the daemon's): says where the state folder and journal are.",
)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@click.option(
    "--force",
    is_flag=True,
    help="Remove the journal even with events the back office has not acknowledged (lost).",
)
@click.option(
    "--config-too",
    is_flag=True,
    help="Also remove the config file (it belongs to the installer; kept by default).",
)
def factory_reset(config_path: Path, yes: bool, force: bool, config_too: bool) -> None:
    """Remove this reader's identity (key, certificate), kept desired config, credential
    snapshot, clock state and journal, so it can be provisioned again.

    Stop the reader service first. Asks for confirmation on stderr (no answer is a no)
    unless --yes. Refuses while the journal holds events the back office has not
    acknowledged unless --force. The device id does not change (it comes from the
    hardware); the config file stays unless --config-too. Prints each path removed. Exit
    status 0 when done, 1 when refused or not confirmed (nothing removed), 2 for an unusable
    config.
    """
    from firmware.config import load_config
    from firmware.tools import maintenance_lock

    try:
        config = load_config(config_path)
    except QrgateError as e:
        click.echo(f"qrgate factory-reset: {e}", err=True)
        sys.exit(2)
    with maintenance_lock(config, "factory-reset"), _journal_writer_lock(config.journal_path):
        backlog, why = _unacknowledged(config.journal_path)
        if (backlog or why) and not force:
            click.echo(f"qrgate factory-reset: {why or _backlog_text(backlog)}", err=True)
            click.echo(
                "qrgate factory-reset: nothing removed; start the reader service until the "
                "back office has acknowledged them (`qrgate journal stats`: unacked 0), or "
                "give --force to lose them",
                err=True,
            )
            sys.exit(1)
        targets = _targets(config)
        if config_too:
            targets.append(config_path)
        if not yes:
            click.echo("qrgate factory-reset removes:", err=True)
            for path in targets:
                click.echo(f"  {path}", err=True)
            if backlog:
                click.echo(f"  ({_backlog_text(backlog)}: lost)", err=True)
            try:
                ok = click.confirm("Reset this reader?", default=False, err=True)
            except click.Abort:
                click.echo(err=True)  # end the question's line: no answer came (EOF)
                ok = False
            if not ok:
                click.echo("qrgate factory-reset: not confirmed; nothing removed", err=True)
                sys.exit(1)
        removed = _remove(config, targets)
    for path in removed:
        click.echo(f"removed {path}")
    if not removed:
        click.echo("nothing to remove: the reader was already reset")
    if not config_too:
        click.echo(
            f"kept {config_path} (the installer's config; --config-too removes it) and the "
            "device id (it comes from the hardware)"
        )


def _backlog_text(backlog: int) -> str:
    return f"{backlog} journal event(s) not acknowledged by the back office"


def _unacknowledged(journal: Path) -> tuple[int, str | None]:
    """(events not acknowledged by the back office, why it cannot tell or None).

    Counts rows with ``acked = 0`` through the journal's read-only reader (sent or not) plus
    every event in the spill log (not in the database yet, so not acknowledged)."""
    from firmware.journal.reader import JournalReader
    from firmware.journal.spill import read_spill

    count = 0
    if journal.exists():
        try:
            count += int(JournalReader(journal).stats()["unacked"])
        except JournalError as e:
            return 0, f"cannot tell whether the journal holds unacknowledged events: {e}"
    spill = journal.with_name(journal.name + ".spill")
    try:
        contents = read_spill(spill)
    except OSError as e:
        return 0, f"cannot read the spill log {spill}: {e.strerror or e}"
    return count + len(contents.events), None


@contextmanager
def _journal_writer_lock(journal: Path) -> Iterator[None]:
    """Hold the journal's writer lock (``<journal>.lock``, as firmware.journal.store takes
    it) for the body: a journal outside the state folder may be open in a process the
    instance lock does not cover. Exits 1 when it is held."""
    lock_path = journal.with_name(journal.name + ".lock")
    if not lock_path.exists():
        yield  # no journal was ever opened here: nobody writes it
        return
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        click.echo(f"qrgate factory-reset: cannot open {lock_path}: {e.strerror or e}", err=True)
        raise SystemExit(1) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            click.echo(
                f"qrgate factory-reset: another process is writing the journal {journal}: "
                "stop it first; nothing removed",
                err=True,
            )
            raise SystemExit(1) from None
        yield
    finally:
        os.close(fd)


def _targets(config: Config) -> list[Path]:
    """Every existing path the reset removes, identity files first, journal last."""
    from provisioning.device import CERT_FILE, CHAIN_FILE, CSR_FILE, KEY_FILE, identity_dir

    state = config.reader.state_dir
    found: list[Path] = []
    ident = identity_dir(state)
    if ident.is_dir():
        found += [ident / n for n in (KEY_FILE, CSR_FILE, CERT_FILE, CHAIN_FILE)]
        found += sorted(ident.glob(".*.tmp"))
        found.append(ident)
    for _, patterns in _STATE_FILES:
        for pattern in patterns:
            found += sorted(state.glob(pattern))
    found += _journal_files(config.journal_path)
    return [p for p in dict.fromkeys(found) if os.path.lexists(p)]


def _journal_files(journal: Path) -> list[Path]:
    name = journal.name
    paths = [journal.with_name(name + s) for s in ("", "-wal", "-shm", ".spill", ".seq.tmp")]
    for kind in ("damaged", "orphan"):  # firmware/journal/store.py _move_aside kinds
        paths += sorted(journal.parent.glob(f"{name}.{kind}-*"))
    return paths


def _remove(config: Config, targets: list[Path]) -> list[Path]:
    """Remove ``targets`` (the identity folder through DeviceKeys.wipe); return what went.
    A path that cannot be removed is reported on stderr and exits 1 after the others."""
    from provisioning.device import DeviceKeys, identity_dir

    removed: list[Path] = []
    failed: list[str] = []
    ident = identity_dir(config.reader.state_dir)
    if ident in targets:
        try:
            removed += DeviceKeys(ident).wipe()
        except OSError as e:
            failed.append(f"{ident}: {e.strerror or e}")
    for path in targets:
        if ident in (path, path.parent) or path in removed:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            failed.append(f"{path}: {e.strerror or e}")
            continue
        removed.append(path)
    for folder in {p.parent for p in removed}:
        with contextlib.suppress(OSError):
            fsync_dir(folder)
    if failed:
        for path in removed:
            click.echo(f"removed {path}")
        for line in failed:
            click.echo(f"qrgate factory-reset: cannot remove {line}", err=True)
        sys.exit(1)
    return removed
