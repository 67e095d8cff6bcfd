"""``qrgate identity``: who this reader is, and whether it holds a key and a certificate.

The device id comes from the hardware (:mod:`provisioning.identity`), so it prints without a
config; with ``--config`` it also reads ``<state_dir>/identity`` (:class:`DeviceKeys`): the
key's fingerprint and the certificate's subject, issuer and expiry. It reads only: no lock,
safe while the daemon runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from firmware.exceptions import QrgateError


@click.command("identity")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=None,
    help="TOML config (the daemon's), to read the key and certificate in its state folder.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def identity(config_path: Path | None, as_json: bool) -> None:
    """Show the device id (and where it comes from), the device key's fingerprint and the
    certificate.

    JSON keys: ``device_id``, ``device_id_source``, ``device_id_error`` (None or why no id),
    ``identity`` (None without --config, else the identity folder's status: ``state``,
    ``key_fingerprint`` (SHA-256 of the public key, hex), ``certificate`` (``subject``,
    ``issuer``, ``serial``, ``not_before``, ``not_after``, ``matches_key``,
    ``matches_device``), ``key_error``, ``certificate_error``). Exit status 0 when the id is
    known, 1 when the hardware gives none, 2 for an unusable config.
    """
    from firmware.config import load_config
    from provisioning.device import DeviceKeys, identity_dir
    from provisioning.exceptions import DeviceIdentityError
    from provisioning.identity import device_id_source

    device: str | None = None
    source: str | None = None
    error: str | None = None
    try:
        device, source = device_id_source()
    except DeviceIdentityError as e:
        error = str(e)
    status: dict[str, Any] | None = None
    if config_path is not None:
        try:
            config = load_config(config_path)
        except QrgateError as e:
            click.echo(f"qrgate identity: {e}", err=True)
            sys.exit(2)
        status = DeviceKeys(identity_dir(config.reader.state_dir)).status(device)
    if as_json:
        doc = {
            "device_id": device,
            "device_id_source": source,
            "device_id_error": error,
            "identity": status,
        }
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        _print(device, source, error, status)
    if error is not None:
        sys.exit(1)


def _print(
    device: str | None, source: str | None, error: str | None, status: dict[str, Any] | None
) -> None:
    if device is not None:
        click.echo(f"device id      {device}  (from {source})")
    else:
        click.echo(f"device id      unknown: {error}")
    if status is None:
        click.echo("identity       (give --config to read the key and certificate)")
        return
    click.echo(f"identity       {status['folder']}: {status['state']}")
    if status["key_fingerprint"] is not None:
        click.echo(f"key            ECDSA P-256, SHA-256 {status['key_fingerprint']}")
    elif status["key_error"] is None:
        click.echo("key            none (not provisioned)")
    if status["key_error"] is not None:
        click.echo(f"key            {status['key_error']}")
    cert = status["certificate"]
    if cert is not None:
        click.echo(f"certificate    {cert['subject']}, serial {cert['serial']}")
        click.echo(f"  issued by    {cert['issuer']}")
        click.echo(f"  valid        {cert['not_before']} to {cert['not_after']}")
        if cert["matches_device"] is False:
            click.echo("  WARNING      it names another device id: enroll again")
    if status["certificate_error"] is not None:
        click.echo(f"certificate    {status['certificate_error']}")
