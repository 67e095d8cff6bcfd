"""make_pin_factory: names, automatic choice, and one clear error (case C11)."""

from __future__ import annotations

import importlib.util
import logging
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero import Device, DigitalOutputDevice
from gpiozero.pins.mock import MockFactory, MockPin, MockPWMPin

from drivers.exceptions import PinFactoryError
from drivers.pins import AUTO_ORDER, LevelKeepingMockPWMPin, make_pin_factory


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    assert [t for t in threading.enumerate() if t not in before] == []
    # Nothing here may choose gpiozero's process-wide factory.
    assert Device.pin_factory is None


def _fail(exc: Exception) -> Callable[[], Any]:
    def load() -> Any:
        raise exc

    return load


PI5_LOADERS = {
    "lgpio": _fail(ModuleNotFoundError("No module named 'lgpio'")),
    "rpigpio": _fail(RuntimeError("Cannot determine SOC peripheral base address")),
    "pigpio": _fail(OSError("failed to connect to localhost:8888")),
    "native": _fail(RuntimeError("unable to locate Pi revision")),
}


def test_mock_factory_has_pwm_pins() -> None:
    factory = make_pin_factory("mock")
    try:
        assert isinstance(factory, MockFactory)
        pin = factory.pin(18)
        assert isinstance(pin, MockPWMPin)
        pin.function = "output"
        pin.frequency = 2000.0
        assert pin.frequency == 2000.0
    finally:
        factory.close()


def test_mock_nopwm_factory_has_plain_pins() -> None:
    factory = make_pin_factory("MOCK-NOPWM")
    try:
        pin = factory.pin(18)
        assert type(pin) is MockPin
    finally:
        factory.close()


def test_real_factory_failing_here_names_factory_and_how_to_choose() -> None:
    if importlib.util.find_spec("RPi") is not None:
        pytest.skip("RPi.GPIO is installed: this is a Pi, rpigpio may work")
    with pytest.raises(PinFactoryError) as info:
        make_pin_factory("rpigpio", environ={})
    message = str(info.value)
    assert "rpigpio" in message
    assert "No module named 'RPi'" in message
    assert "GPIOZERO_PIN_FACTORY" in message
    assert "[gpio] pin_factory" in message
    assert "\n" not in message


def test_c11_pi5_auto_fails_fast_with_one_line_naming_every_factory() -> None:
    with pytest.raises(PinFactoryError) as info:
        make_pin_factory(None, environ={}, loaders=PI5_LOADERS)
    message = str(info.value)
    assert "\n" not in message
    for name in AUTO_ORDER:
        assert name in message
    assert "Cannot determine SOC peripheral base address" in message
    assert "No module named 'lgpio'" in message
    assert "GPIOZERO_PIN_FACTORY" in message
    assert "[gpio] pin_factory" in message
    # The order tried is gpiozero's own.
    assert message.index("lgpio (") < message.index("rpigpio (") < message.index("pigpio (")


def test_auto_takes_first_working_factory_and_logs_why_others_were_skipped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loaders = dict(PI5_LOADERS)
    loaders["pigpio"] = MockFactory
    caplog.set_level(logging.WARNING, logger="drivers.pins")
    factory = make_pin_factory("auto", environ={}, loaders=loaders)
    try:
        assert isinstance(factory, MockFactory)
    finally:
        factory.close()
    [record] = caplog.records
    assert "pigpio" in record.getMessage()
    assert "Cannot determine SOC peripheral base address" in record.getMessage()


def test_environment_variable_chooses_when_config_does_not() -> None:
    factory = make_pin_factory(None, environ={"GPIOZERO_PIN_FACTORY": "mock"})
    try:
        assert isinstance(factory.pin(4), MockPWMPin)
    finally:
        factory.close()
    with pytest.raises(PinFactoryError, match="GPIOZERO_PIN_FACTORY='rpigpio'"):
        make_pin_factory(None, environ={"GPIOZERO_PIN_FACTORY": "rpigpio"}, loaders=PI5_LOADERS)


def test_config_name_wins_over_environment() -> None:
    factory = make_pin_factory("mock-nopwm", environ={"GPIOZERO_PIN_FACTORY": "rpigpio"})
    try:
        assert type(factory.pin(4)) is MockPin
    finally:
        factory.close()


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(PinFactoryError, match="unknown GPIO pin factory 'gpiod'") as info:
        make_pin_factory("gpiod", environ={})
    assert "lgpio" in str(info.value)


def test_plain_mock_pwm_pin_drops_active_low_line_on_close_level_keeping_pin_does_not() -> None:
    # Why "mock" uses LevelKeepingMockPWMPin: gpiozero's MockPWMPin writes 0 on every close.
    for pin_class, level_after_close in ((MockPWMPin, 0), (LevelKeepingMockPWMPin, 1)):
        factory = MockFactory(pin_class=pin_class)
        device = DigitalOutputDevice(
            17, active_high=False, initial_value=False, pin_factory=factory
        )
        pin = factory.pin(17)
        assert pin.state == 1
        device.close()
        assert pin.state == level_after_close
        factory.close()


def test_level_keeping_pin_still_stops_running_pwm() -> None:
    factory = MockFactory(pin_class=LevelKeepingMockPWMPin)
    try:
        pin = factory.pin(18)
        pin.function = "output"
        pin.frequency = 400.0
        pin.state = 0.5
        pin.frequency = None
        assert pin.state == 0
        assert pin.frequency is None
    finally:
        factory.close()
