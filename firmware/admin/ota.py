"""``qrgate ota``: the release engineer's commands: a TUF repository, release bundles, and
publishing them::

    qrgate ota init --repo repo --keys keys            # once: keys and 1.root.json
    qrgate ota build --out dist                        # qrgate-<version>.tar for the Pi
    qrgate ota publish dist/qrgate-1.4.0.tar --repo repo --keys keys
    qrgate ota timestamp --repo repo --keys keys       # daily, from cron on the server
    qrgate ota rotate-root --repo repo --keys keys     # yearly, with the offline root keys

The logic is in :mod:`ota.bundle` and :mod:`ota.repository`; these commands parse options,
print what was done and turn errors into exit status 1 (refused) or 2 (bad input).
"""

from __future__ import annotations

from pathlib import Path

import click

from firmware.admin.common import REFUSED, fail
from firmware.config import DEVICE_TYPES

_DIR = click.Path(file_okay=False, path_type=Path)


@click.group("ota")
def ota() -> None:
    """Release bundles and the TUF repository readers update from."""


@ota.command("init")
@click.option("--repo", "repo_dir", type=_DIR, required=True, help="Repository folder to create.")
@click.option("--keys", "keys_dir", type=_DIR, required=True, help="Folder for the new keys.")
@click.option("--threshold", default=2, show_default=True, help="Root keys needed to sign a root.")
@click.option("--root-keys", default=3, show_default=True, help="Number of offline root keys.")
def init_command(repo_dir: Path, keys_dir: Path, threshold: int, root_keys: int) -> None:
    """Create a TUF repository and its Ed25519 keys (root keys offline, targets, snapshot
    and timestamp keys online)."""
    from ota.exceptions import OtaError
    from ota.repository import init_repository

    try:
        root = init_repository(repo_dir, keys_dir, root_threshold=threshold, root_keys=root_keys)
    except OtaError as e:
        fail(e, REFUSED)
    click.echo(f"repository: {repo_dir} (serve it as is over HTTP(S))")
    click.echo(f"trusted root for the firmware: {root}")
    click.echo(
        f"root keys: {keys_dir / 'offline'} ({threshold} of {root_keys} sign a root): "
        "move them to offline storage now"
    )
    click.echo(f"online keys: {keys_dir / 'online'} (targets, snapshot, timestamp)")


@ota.command("build")
@click.option(
    "--source",
    type=_DIR,
    default=Path("."),
    show_default=True,
    help="Project tree to build.",
)
@click.option("--out", "out_dir", type=_DIR, default=Path("dist"), show_default=True)
@click.option(
    "--platform",
    type=click.Choice(["linux_aarch64", "native"]),
    default="linux_aarch64",
    show_default=True,
    help="linux_aarch64: a Raspberry Pi; native: this machine (tests).",
)
@click.option("--python", "python_version", default="3.11", show_default=True)
@click.option("--min-version", default=None, help="Oldest release that may update to this one.")
@click.option(
    "--device-type",
    "device_types",
    multiple=True,
    type=click.Choice(DEVICE_TYPES),
    default=DEVICE_TYPES,
    show_default=True,
    help="A device type the bundle runs on (repeat the option).",
)
def build_command(  # noqa: PLR0917 - click passes options positionally
    source: Path,
    out_dir: Path,
    platform: str,
    python_version: str,
    min_version: str | None,
    device_types: tuple[str, ...],
) -> None:
    """Build qrgate-<version>.tar: the qrgate wheel, a wheelhouse of its dependencies and a
    manifest."""
    from ota.bundle import build_bundle
    from ota.exceptions import OtaError

    try:
        path = build_bundle(
            source,
            out_dir,
            platform=platform,
            python_version=python_version,
            device_types=device_types,
            min_version=min_version,
        )
    except OtaError as e:
        fail(e, REFUSED)
    click.echo(f"{path} ({path.stat().st_size} bytes)")


@ota.command("publish")
@click.argument("bundle", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--repo", "repo_dir", type=_DIR, required=True)
@click.option("--keys", "keys_dir", type=_DIR, required=True)
def publish_command(bundle: Path, repo_dir: Path, keys_dir: Path) -> None:
    """Add BUNDLE to the repository as target qrgate-<version>.tar and sign new targets,
    snapshot and timestamp metadata."""
    from ota.exceptions import OtaError
    from ota.repository import publish

    try:
        info = publish(repo_dir, keys_dir, bundle)
    except OtaError as e:
        fail(e, REFUSED)
    click.echo(f"published {info.path}: {info.length} bytes, sha256 {info.hashes['sha256']}")


@ota.command("timestamp")
@click.option("--repo", "repo_dir", type=_DIR, required=True)
@click.option("--keys", "keys_dir", type=_DIR, required=True)
def timestamp_command(repo_dir: Path, keys_dir: Path) -> None:
    """Re-sign snapshot and timestamp so readers keep accepting the repository (run daily)."""
    from ota.exceptions import OtaError
    from ota.repository import refresh_timestamp

    try:
        version = refresh_timestamp(repo_dir, keys_dir)
    except OtaError as e:
        fail(e, REFUSED)
    click.echo(f"timestamp version {version}")


@ota.command("rotate-root")
@click.option("--repo", "repo_dir", type=_DIR, required=True)
@click.option("--keys", "keys_dir", type=_DIR, required=True)
@click.option(
    "--replace",
    multiple=True,
    type=click.Choice(["root", "targets", "snapshot", "timestamp"]),
    help="Give this role new keys (repeat the option); the old key files are kept as "
    "<name>.retired-<N>.",
)
def rotate_root_command(repo_dir: Path, keys_dir: Path, replace: tuple[str, ...]) -> None:
    """Sign the next root version (new expiry date, optionally new keys): needs the offline
    root keys in KEYS/offline. Run it well before the root expires (every year)."""
    from ota.exceptions import OtaError
    from ota.repository import rotate_root

    try:
        path = rotate_root(repo_dir, keys_dir, replace=replace)
    except OtaError as e:
        fail(e, REFUSED)
    click.echo(f"{path} signed" + (f" (new keys: {', '.join(replace)})" if replace else ""))
    click.echo(f"move the root keys in {keys_dir / 'offline'} back to offline storage")


def _register_agent() -> None:
    # the reader's side lives with the daemon's composition (firmware/ota_agent.py); its
    # imports are light, the updater's are made when the command runs
    from firmware.ota_agent import ota_agent_command

    ota.add_command(ota_agent_command, "agent")


_register_agent()
