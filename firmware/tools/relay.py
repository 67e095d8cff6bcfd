"""``qrgate relay off``: drive the door relay to its locked state, then release the line.

The unit's ``ExecStopPost=`` safety net: it runs after every stop of the daemon, also after a
crash or a ``kill -9`` that left the relay where it was (e.g. energised mid-pulse on a
fail-secure strike). It builds the relay exactly as the daemon does (``[gpio]`` relay_pin,
relay_active_high, strike), which drives it to rest at construction, and closes it (off, then
release). A fail-safe lock is energised while locked: once this command exits the line is
released and the lock opens, as it does whenever the reader is not running (see
drivers/relay.py).

It takes the daemon's instance lock for the few milliseconds it needs, so it never fights a
running daemon: while one holds the lock it refuses with exit status 1.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from firmware.exceptions import QrgateError

if TYPE_CHECKING:
    from firmware.config import Config


@click.group("relay")
def relay() -> None:
    """The door relay, without the daemon."""


@relay.command("off")
@click.option(
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    required=True,
    help="TOML config file (the daemon's).",
)
def off(config_path: Path) -> None:
    """Lock the door: drive the relay to rest and release the line.

    Exit status 0 when done, 1 while the daemon holds the reader (nothing touched), 2 for an
    unusable config, 3 when the relay line cannot be driven."""
    from drivers.exceptions import DriverError
    from drivers.pins import make_pin_factory
    from drivers.relay import DoorRelay, unlock_energises_for
    from firmware.config import load_config
    from firmware.tools import maintenance_lock

    try:
        config = load_config(config_path)
    except QrgateError as e:
        # the safety net must not fail on a mistake in a section it does not need
        try:
            config = _relay_config(config_path)
        except QrgateError:
            click.echo(f"qrgate relay off: {e}", err=True)
            sys.exit(2)
        click.echo(f"qrgate relay off: {e}; using its [reader] and [gpio] only", err=True)
    g = config.gpio
    with maintenance_lock(config, "relay off"):
        try:
            factory = make_pin_factory(g.pin_factory)
            try:
                # construction drives the line to rest (locked); close() drives it again first
                DoorRelay(
                    g.relay_pin,
                    pin_factory=factory,
                    active_high=g.relay_active_high,
                    pulse_s=g.pulse_s,
                    unlock_energises=unlock_energises_for(g.strike),
                ).close()
            finally:
                factory.close()
        except DriverError as e:
            click.echo(f"qrgate relay off: cannot drive the relay: {e}", err=True)
            sys.exit(3)
    if unlock_energises_for(g.strike):
        click.echo(f"relay on GPIO{g.relay_pin} de-energised: the door is locked")
    else:
        click.echo(
            f"relay on GPIO{g.relay_pin} released: the fail-safe lock opens until the reader "
            "runs again"
        )


def _relay_config(path: Path) -> Config:
    """The config's [reader] (the lock's folder) and [gpio] (the relay) alone, validated as
    usual. Raises ConfigError."""
    import tomllib

    from firmware.config import parse_config
    from firmware.exceptions import ConfigError

    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(path), "<file>", "a readable TOML file", str(e)) from e
    part = {k: data[k] for k in ("reader", "gpio") if isinstance(data.get(k), dict)}
    part["camera"] = {"source": "v4l2"}  # not used; a replay camera would need a path
    return parse_config(part, str(path), path.parent)
