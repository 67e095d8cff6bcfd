"""``qrgate selftest``: cycle every output, read every input, say what worked.

For the installer after wiring: the status light shows each colour, the buzzer plays the
grant and deny patterns, the relay pulses once (it unlocks the door: skipped with
``--no-relay``, confirmed unless ``--yes``), and the door inputs are read once. Each step is
reported ok, FAILED (with the reason) or skipped. The relay is locked at the end whatever
happened, also when a step fails or the run is interrupted.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

from drivers.exceptions import DriverError
from firmware.config import Config
from firmware.exceptions import QrgateError

LED_STEP_S = 0.3
"""Seconds each colour is shown: long enough to see, short enough to count."""

TONE_GAP_S = 0.3
"""Silence between the grant and the deny pattern, seconds, so they are heard apart."""

RELAY_PULSE_S = 0.5
"""Relay test pulse, seconds: the strike clicks open and shut, the door barely unlocks."""

LOCK_WAIT_S = 5.0
"""How long after the pulse's end the relay may take to report locked, seconds."""


class Inputs(Protocol):
    """The door inputs as the self-test uses them (drivers.door.DoorInputs)."""

    def read(self) -> dict[str, bool | None]:
        """Input name -> its state now; None: not wired."""
        ...

    def close(self) -> None:
        """Release the pins (idempotent)."""
        ...


InputsFactory = Callable[[Config, Any], Inputs]
"""Builds the door inputs from the config on a pin factory."""


@dataclass(frozen=True)
class Step:
    """One step's outcome. ``ok``: True, False (failed) or None (skipped). ``detail``: what
    was done, or why it failed or was skipped."""

    name: str
    ok: bool | None
    detail: str

    @property
    def status(self) -> str:
        """ "ok", "FAILED" or "skipped"."""
        return {True: "ok", False: "FAILED", None: "skipped"}[self.ok]


@dataclass
class SelftestReport:
    """Every step in order, and the inputs read (name -> state; None: not wired)."""

    steps: list[Step] = field(default_factory=list)
    inputs: dict[str, bool | None] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """True when no step failed (skipped steps do not fail the test)."""
        return all(s.ok is not False for s in self.steps)

    def step(self, name: str) -> Step:
        """The step called ``name``; raises KeyError."""
        for s in self.steps:
            if s.name == name:
                return s
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        """The report as JSON-ready data."""
        return {
            "ok": self.ok,
            "steps": [{"name": s.name, "status": s.status, "detail": s.detail} for s in self.steps],
            "inputs": dict(self.inputs),
        }


def door_inputs(config: Config, factory: Any) -> Inputs:
    """The door inputs of ``[doors]`` on ``factory`` (drivers.door.DoorInputs)."""
    from drivers.door import DoorInputs

    d = config.doors
    inputs: Inputs = DoorInputs(
        d.contact_pin,
        d.exit_pin,
        d.tamper_pin,
        pin_factory=factory,
        pull_up=d.pull_up,
        bounce_s=d.bounce_ms / 1000,
    )
    return inputs


INPUT_WORDS: dict[str, tuple[str, str, str]] = {
    "door_open": ("door contact", "door open", "door shut"),
    "exit_pressed": ("exit button", "pressed", "released"),
    "tampered": ("tamper switch", "case open", "case shut"),
}
"""Input name of DoorInputs.read() -> (what it is, reading when True, reading when False)."""


def describe_inputs(states: dict[str, bool | None]) -> str:
    """One line for a person: "door contact: door shut; exit button: not wired; ..."."""
    parts = []
    for name, value in states.items():
        what, yes, no = INPUT_WORDS.get(name, (name, "active", "inactive"))
        parts.append(f"{what}: {'not wired' if value is None else (yes if value else no)}")
    return "; ".join(parts)


def _why(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def run_selftest(
    config: Config,
    factory: Any,
    *,
    relay: bool = True,
    led_step_s: float = LED_STEP_S,
    pulse_s: float = RELAY_PULSE_S,
    make_inputs: InputsFactory = door_inputs,
    sleep: Callable[[float], None] = time.sleep,
) -> SelftestReport:
    """Cycle the light, the buzzer and (``relay``) the relay of ``config`` on the gpiozero
    pin ``factory``, then read the door inputs. The caller holds the instance lock, owns
    ``factory`` and closes it after.

    ``led_step_s``: seconds per colour. ``pulse_s``: relay pulse, seconds. ``make_inputs``:
    builds the inputs (a seam for tests). Never raises for a device failure: each is a failed
    step. Every output ends off and the relay locked, whatever happened.
    """
    from firmware.daemon import make_feedback

    report = SelftestReport()
    try:
        feedback = make_feedback(config, factory)
    except Exception as e:  # a pin that cannot be claimed: nothing can be cycled
        report.steps.append(Step("outputs", False, f"could not set up the outputs: {_why(e)}"))
        feedback = None
    if feedback is not None:
        try:
            report.steps.append(_light_step(feedback.light, led_step_s, sleep))
            report.steps.append(_buzzer_step(feedback.beeper, sleep))
            if relay:
                report.steps.append(_relay_step(feedback.relay, pulse_s))
            else:
                report.steps.append(
                    Step("relay", None, "not pulsed (--no-relay, or not confirmed)")
                )
        finally:
            # the door first: Feedback.close() locks the relay before anything else
            feedback.close()
    report.steps.append(_inputs_step(config, factory, make_inputs, report))
    return report


def _light_step(light: Any, step_s: float, sleep: Callable[[float], None]) -> Step:
    if light is None:
        return Step("status light", None, "no status light configured")
    colours = ("red", "green", "blue") if light.kind == "rgb" else ("red", "green", "amber")
    errors = light.errors
    shown: list[str] = []
    try:
        for colour in colours:
            light.show(colour)
            shown.append(colour)
            sleep(step_s)
    except Exception as e:
        return Step("status light", False, f"{_why(e)} (shown before it: {shown or 'none'})")
    finally:
        with contextlib.suppress(Exception):  # reported above, or by close()
            light.off()
    if light.errors != errors:
        return Step("status light", False, f"{light.errors - errors} LED errors (see the log)")
    return Step("status light", True, f"showed {', '.join(colours)}, {step_s:g} s each")


def _buzzer_step(beeper: Any, sleep: Callable[[float], None]) -> Step:
    from drivers.buzzer import pattern_seconds
    from drivers.feedback import DENY_TONES, GRANT_TONES

    if beeper is None:
        return Step("buzzer", None, "no buzzer configured ([gpio] buzzer_pin)")
    errors = beeper.errors
    try:
        for i, tones in enumerate((GRANT_TONES, DENY_TONES)):
            if i:
                sleep(TONE_GAP_S)
            beeper.play(tones)
            if not beeper.wait_silent(pattern_seconds(tones) + 2.0):
                return Step("buzzer", False, "a pattern did not end (buzzer worker stuck)")
    except Exception as e:
        return Step("buzzer", False, _why(e))
    finally:
        with contextlib.suppress(Exception):  # close() tries again and logs
            beeper.stop()
    if beeper.errors != errors:
        return Step("buzzer", False, f"{beeper.errors - errors} buzzer errors (see the log)")
    how = "tones" if beeper.has_tones else "on/off beeps (the pin has no PWM)"
    return Step("buzzer", True, f"played the grant and the deny pattern as {how}")


def _relay_step(relay: Any, pulse_s: float) -> Step:
    if relay is None:
        return Step("relay", None, "no relay configured")
    try:
        relay.pulse(pulse_s)
        if not relay.is_unlocked:
            return Step("relay", False, "the relay did not switch to unlocked")
        if not relay.wait_locked(pulse_s + LOCK_WAIT_S):
            return Step("relay", False, "the relay did not lock again after the pulse")
    except Exception as e:
        return Step("relay", False, _why(e))
    finally:
        with contextlib.suppress(Exception):  # close() tries again and logs
            relay.off()
    return Step("relay", True, f"pulsed {pulse_s:g} s and locked again (the strike clicks)")


def _inputs_step(
    config: Config, factory: Any, make_inputs: InputsFactory, report: SelftestReport
) -> Step:
    if not config.doors.pins:
        return Step("inputs", None, "no door inputs configured ([doors])")
    inputs: Inputs | None = None
    try:
        inputs = make_inputs(config, factory)
        report.inputs = dict(inputs.read())
    except Exception as e:
        return Step("inputs", False, _why(e))
    finally:
        if inputs is not None:
            with contextlib.suppress(Exception):
                inputs.close()
    # a contact or tamper loop that is open (or a cut wire) reads "door open" / "case open"
    return Step("inputs", True, describe_inputs(report.inputs))


@click.command("selftest")
@click.option(
    "--config", "config_path", type=click.Path(path_type=Path), required=True, help="TOML config."
)
@click.option("--no-relay", is_flag=True, help="Do not pulse the relay (the door stays locked).")
@click.option("--yes", "-y", is_flag=True, help="Pulse the relay without asking.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object on stdout.")
def selftest(config_path: Path, no_relay: bool, yes: bool, as_json: bool) -> None:
    """Cycle the status light, the buzzer and the relay, read the door inputs, report.

    The relay step UNLOCKS THE DOOR for half a second: it asks first unless --yes; --no-relay
    skips it. Stop the reader service first (it holds the pins). Exit 0 when every step
    worked, 1 when one failed or the service runs, 2 for a bad config.
    """
    from drivers.pins import make_pin_factory
    from firmware.config import load_config
    from firmware.tools import maintenance_lock

    try:
        config = load_config(config_path)
    except QrgateError as e:
        click.echo(f"qrgate selftest: {e}", err=True)
        sys.exit(2)
    with maintenance_lock(config, "selftest"):
        relay = not no_relay
        if relay and not yes:
            # the question goes to stderr (stdout may be --json); no answer is a no
            try:
                relay = click.confirm(
                    f"The relay test unlocks the door (pin {config.gpio.relay_pin}) for "
                    f"{RELAY_PULSE_S:g} s. Pulse it?",
                    default=False,
                    err=True,
                )
            except click.Abort:
                relay = False
        name = config.gpio.pin_factory
        try:
            factory = make_pin_factory(None if name == "auto" else name)
        except DriverError as e:
            click.echo(f"qrgate selftest: {e}", err=True)
            sys.exit(1)
        try:
            report = run_selftest(config, factory, relay=relay)
        finally:
            factory.close()
    if as_json:
        click.echo(json.dumps(report.to_json()))
    else:
        for s in report.steps:
            click.echo(f"{s.status:<8} {s.name}: {s.detail}")
        click.echo("PASS" if report.ok else "FAIL")
    sys.exit(0 if report.ok else 1)
