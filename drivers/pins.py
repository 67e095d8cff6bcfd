"""Pin factories: the one place that decides how qrgate talks to GPIO.

Every output device in ``drivers`` takes the factory made here as an explicit ``pin_factory``
argument; gpiozero's process-wide ``Device.pin_factory`` is never set.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

from drivers.exceptions import PinFactoryError

log = logging.getLogger(__name__)

Factory = Any
"""A gpiozero ``gpiozero.Factory`` (gpiozero ships no type information)."""

ENV_VAR = "GPIOZERO_PIN_FACTORY"
"""The environment variable gpiozero itself reads to choose a factory."""

CONFIG_KEY = "[gpio] pin_factory"
"""Where the configuration names the factory."""

AUTO_ORDER: tuple[str, ...] = ("lgpio", "rpigpio", "pigpio", "native")
"""The order gpiozero 2.0 tries real factories in; ``auto`` tries the same order."""

_REAL_FACTORIES: dict[str, str] = {
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "pigpio": "gpiozero.pins.pigpio:PiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
}

NAMES: tuple[str, ...] = ("auto", "mock", "mock-nopwm", *AUTO_ORDER)
"""Every name :func:`make_pin_factory` accepts."""

FactoryLoader = Callable[[], Factory]


class LevelKeepingMockPWMPin(MockPWMPin):  # type: ignore[misc]
    """gpiozero's ``MockPWMPin``, except that stopping PWM that is not running keeps the level.

    ``MockPWMPin`` writes 0 whenever its frequency is set to ``None``, and gpiozero does that
    on every close, so an active-low relay on a mock PWM pin would read "energised" after a
    correct close. Real backends (lgpio, RPi.GPIO) leave a line without PWM alone and release
    it to input; this pin does the same (the level stays, like plain ``MockPin``).
    """

    def _set_frequency(self, value: float | None) -> None:
        if value is None and self._frequency is None:
            return
        super()._set_frequency(value)


def _real_loader(name: str) -> FactoryLoader:
    module_name, class_name = _REAL_FACTORIES[name].split(":")

    def load() -> Factory:
        # Imported only when asked for: RPi.GPIO, lgpio and pigpio are absent off the Pi,
        # and importing RPi.GPIO on a Pi 5 already fails.
        module = importlib.import_module(module_name)
        return getattr(module, class_name)()

    return load


def _default_loaders() -> dict[str, FactoryLoader]:
    loaders: dict[str, FactoryLoader] = {
        "mock": lambda: MockFactory(pin_class=LevelKeepingMockPWMPin),
        "mock-nopwm": lambda: MockFactory(pin_class=MockPin),
    }
    for name in AUTO_ORDER:
        loaders[name] = _real_loader(name)
    return loaders


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _how_to_choose() -> str:
    return (
        f'choose one with {CONFIG_KEY} = "<name>" in the config or the environment variable '
        f"{ENV_VAR}=<name> (names: {', '.join(AUTO_ORDER)}, mock; on a Raspberry Pi 5 "
        "use lgpio: apt install python3-lgpio)"
    )


def make_pin_factory(
    name: str | None,
    *,
    environ: Mapping[str, str] | None = None,
    loaders: Mapping[str, FactoryLoader] | None = None,
) -> Factory:
    """Create the gpiozero pin factory called ``name``.

    ``name``: one of :data:`NAMES` (case-insensitive): ``"mock"`` (gpiozero ``MockFactory``
    whose pins support PWM, so tones play: :class:`LevelKeepingMockPWMPin`), ``"mock-nopwm"``
    (plain mock pins, no PWM), ``"lgpio"``, ``"rpigpio"``, ``"pigpio"``, ``"native"``.
    ``None`` or ``"auto"``: the name in ``environ[GPIOZERO_PIN_FACTORY]`` if set, else each of
    :data:`AUTO_ORDER` in turn (the order gpiozero uses) until one can be created.

    ``environ``: where ``GPIOZERO_PIN_FACTORY`` is read; ``os.environ`` when ``None``.
    ``loaders``: name -> zero-argument constructor, replacing the built-in ones of the same
    name (a test seam, e.g. to reproduce a Pi 5 where RPi.GPIO fails); the real backends are
    imported only when tried.

    Returns the factory; the caller passes it to every device and closes it last.
    Raises :class:`drivers.exceptions.PinFactoryError` with one line naming every factory
    tried, why each failed, and how to choose one (``[gpio] pin_factory`` or
    ``GPIOZERO_PIN_FACTORY``); also for an unknown name.
    """
    env = os.environ if environ is None else environ
    table = _default_loaders()
    if loaders is not None:
        table.update(loaders)

    chosen = (name or "auto").strip().lower()
    source = f"{CONFIG_KEY} = {name!r}"
    if chosen == "auto" and env.get(ENV_VAR):
        chosen = env[ENV_VAR].strip().lower()
        source = f"{ENV_VAR}={env[ENV_VAR]!r}"

    if chosen == "auto":
        failures: list[str] = []
        for candidate in AUTO_ORDER:
            try:
                factory = table[candidate]()
            except Exception as exc:
                failures.append(f"{candidate} ({_describe(exc)})")
                continue
            if failures:
                # gpiozero would hide these in warnings; say why the preferred ones were skipped.
                log.warning(
                    "GPIO pin factory %s chosen automatically; skipped: %s",
                    candidate,
                    "; ".join(failures),
                )
            return factory
        raise PinFactoryError(
            "no GPIO pin factory could be created; tried "
            + "; ".join(failures)
            + "; "
            + _how_to_choose()
        )

    if chosen not in table:
        raise PinFactoryError(
            f"unknown GPIO pin factory {chosen!r} (from {source}); " + _how_to_choose()
        )
    try:
        return table[chosen]()
    except Exception as exc:
        raise PinFactoryError(
            f"GPIO pin factory {chosen} (from {source}) could not be created: "
            f"{_describe(exc)}; " + _how_to_choose()
        ) from exc
