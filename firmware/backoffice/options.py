"""The broker options every back-office command takes (--broker, TLS, login), in one place."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from firmware.backoffice.mqtt import MqttSettings

_F = TypeVar("_F", bound=Callable[..., Any])


def broker_options(f: _F) -> _F:
    """Add --broker and the TLS/login options to a click command."""
    options = [
        click.option(
            "--broker",
            required=True,
            metavar="HOST[:PORT]",
            help="MQTT broker; also mqtt://HOST:PORT or mqtts://HOST:PORT.",
        ),
        click.option("--tls", is_flag=True, help="TLS (implied by --cafile or --certfile)."),
        click.option(
            "--cafile",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help="CA certificate (PEM) for the broker [default: the system's].",
        ),
        click.option(
            "--certfile",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help="Client certificate (PEM) when the broker asks for one.",
        ),
        click.option(
            "--keyfile",
            type=click.Path(path_type=Path, exists=True, dir_okay=False),
            help="Client key (PEM) for --certfile.",
        ),
        click.option("--username", help="MQTT username."),
        click.option(
            "--password",
            envvar="QRGATE_MQTT_PASSWORD",
            help="MQTT password (better: $QRGATE_MQTT_PASSWORD).",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def mqtt_settings(opts: dict[str, Any]) -> MqttSettings:
    """The :class:`MqttSettings` of the options :func:`broker_options` added. Raises
    click.BadParameter naming --broker."""
    try:
        return MqttSettings.parse(
            opts["broker"],
            tls=opts["tls"],
            ca_file=opts["cafile"],
            cert_file=opts["certfile"],
            key_file=opts["keyfile"],
            username=opts["username"],
            password=opts["password"],
        )
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--broker") from None
