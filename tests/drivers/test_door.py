"""Door inputs on mock pins: levels, debouncing, callbacks that fail, close."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero import DigitalInputDevice
from gpiozero.pins.mock import MockFactory

from drivers.door import DoorContact, DoorInputs, ExitButton, TamperSwitch
from drivers.exceptions import DoorInputError
from drivers.pins import make_pin_factory
from tests.polling import wait_until

CONTACT, EXIT, TAMPER = 5, 6, 13
# Long enough that a burst of toggles in a tight loop always falls inside it.
BURST_BOUNCE_S = 0.3
FAST_BOUNCE_S = 0.01


@pytest.fixture(params=["MockPin", "mock-pwm"])
def factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    f = MockFactory() if request.param == "MockPin" else make_pin_factory("mock")
    yield f
    f.close()


def settle(device: Any) -> None:
    assert wait_until(lambda: not device.settling)


def test_door_contact_levels_with_pull_up(factory: Any) -> None:
    with DoorContact(CONTACT, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as contact:
        pin = factory.pin(CONTACT)
        assert pin.pull == "up"
        # Nothing pulls the line low: an open circuit (door open or wire cut) reads open.
        assert contact.is_open
        pin.drive_low()
        assert wait_until(lambda: not contact.is_open)
        pin.drive_high()
        assert wait_until(lambda: contact.is_open)


def test_door_contact_levels_with_pull_down(factory: Any) -> None:
    with DoorContact(CONTACT, pin_factory=factory, pull_up=False, bounce_s=0) as contact:
        pin = factory.pin(CONTACT)
        assert pin.pull == "down"
        assert contact.is_open
        pin.drive_high()
        assert wait_until(lambda: not contact.is_open)


def test_exit_button_and_tamper_levels(factory: Any) -> None:
    with (
        ExitButton(EXIT, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as button,
        TamperSwitch(TAMPER, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as tamper,
    ):
        assert not button.is_pressed
        assert tamper.is_tampered  # open circuit: case open or wire cut
        factory.pin(EXIT).drive_low()
        factory.pin(TAMPER).drive_low()
        assert wait_until(lambda: button.is_pressed and not tamper.is_tampered)


def test_callbacks_fire_once_per_change(factory: Any) -> None:
    events: list[str] = []
    with DoorContact(CONTACT, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as contact:
        contact.when_opened = lambda: events.append("opened")
        contact.when_closed = lambda: events.append("closed")
        pin = factory.pin(CONTACT)
        pin.drive_low()
        assert wait_until(lambda: events == ["closed"])
        pin.drive_high()
        assert wait_until(lambda: events == ["closed", "opened"])
        settle(contact)
        assert events == ["closed", "opened"]


def test_bounce_burst_yields_one_change_each_way(factory: Any) -> None:
    events: list[str] = []
    with DoorContact(CONTACT, pin_factory=factory, bounce_s=BURST_BOUNCE_S) as contact:
        contact.when_opened = lambda: events.append("opened")
        contact.when_closed = lambda: events.append("closed")
        pin = factory.pin(CONTACT)
        # Closing door: the reed switch chatters, ends closed (low).
        for _ in range(25):
            pin.drive_low()
            pin.drive_high()
        pin.drive_low()
        assert contact.settling
        assert contact.is_open  # nothing reported during the bounce
        settle(contact)
        assert events == ["closed"]
        assert not contact.is_open
        # Opening: chatter ending open (high).
        for _ in range(25):
            pin.drive_high()
            pin.drive_low()
        pin.drive_high()
        settle(contact)
        assert events == ["closed", "opened"]
        assert contact.is_open


def test_glitch_that_returns_to_the_same_level_reports_nothing(factory: Any) -> None:
    events: list[str] = []
    with ExitButton(EXIT, pin_factory=factory, bounce_s=BURST_BOUNCE_S) as button:
        button.when_pressed = lambda: events.append("pressed")
        pin = factory.pin(EXIT)
        for _ in range(5):
            pin.drive_low()
            pin.drive_high()
        assert button.settling
        settle(button)
        assert events == []
        assert not button.is_pressed


def test_exit_button_reports_presses_not_releases(factory: Any) -> None:
    presses: list[bool] = []
    with ExitButton(EXIT, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as button:
        button.when_pressed = lambda: presses.append(button.is_pressed)
        pin = factory.pin(EXIT)
        for _ in range(2):
            pin.drive_low()
            assert wait_until(lambda: button.is_pressed)
            pin.drive_high()
            assert wait_until(lambda: not button.is_pressed)
        settle(button)
        # The callback sees the new state already.
        assert presses == [True, True]


def test_tamper_callbacks(factory: Any) -> None:
    events: list[str] = []
    with TamperSwitch(TAMPER, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as tamper:
        tamper.when_tampered = lambda: events.append("tampered")
        tamper.when_restored = lambda: events.append("restored")
        pin = factory.pin(TAMPER)
        pin.drive_low()
        assert wait_until(lambda: events == ["restored"])
        pin.drive_high()
        assert wait_until(lambda: events == ["restored", "tampered"])


def test_a_raising_callback_is_logged_and_the_input_keeps_working(
    factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    events: list[str] = []

    def boom() -> None:
        raise RuntimeError("callback bug")

    with DoorContact(CONTACT, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as contact:
        contact.when_closed = boom
        contact.when_opened = lambda: events.append("opened")
        pin = factory.pin(CONTACT)
        with caplog.at_level(logging.ERROR, logger="drivers.door"):
            pin.drive_low()
            # The level changes before the callback runs: wait for the log line itself.
            assert wait_until(
                lambda: any("callback failed" in r.getMessage() for r in caplog.records)
            )
        assert any(r.exc_info and "callback bug" in str(r.exc_info[1]) for r in caplog.records)
        pin.drive_high()
        assert wait_until(lambda: events == ["opened"])


def test_close_is_idempotent_releases_the_pin_and_stops_callbacks(factory: Any) -> None:
    events: list[str] = []
    contact = DoorContact(CONTACT, pin_factory=factory, bounce_s=FAST_BOUNCE_S)
    contact.when_closed = lambda: events.append("closed")
    contact.close()
    contact.close()
    assert contact.closed
    # The pin is free again: another device can claim it.
    again = DigitalInputDevice(CONTACT, pin_factory=factory)
    again.close()
    # The closed contact no longer sees edges on the line.
    factory.pin(CONTACT).drive_low()
    assert events == []


def test_close_from_inside_a_callback_does_not_deadlock(factory: Any) -> None:
    contact = DoorContact(CONTACT, pin_factory=factory, bounce_s=FAST_BOUNCE_S)
    contact.when_closed = contact.close
    factory.pin(CONTACT).drive_low()
    assert wait_until(lambda: contact.closed)
    # The worker ends on its own once the callback returns.
    assert wait_until(
        lambda: not any(t.name.startswith("qrgate-door-contact") for t in threading.enumerate())
    )
    contact.close()


def test_bad_arguments(factory: Any) -> None:
    with pytest.raises(DoorInputError, match="pin_factory is required"):
        DoorContact(CONTACT, pin_factory=None)
    with pytest.raises(ValueError, match="bounce time"):
        ExitButton(EXIT, pin_factory=factory, bounce_s=-1)
    with pytest.raises(ValueError, match="bounce time"):
        DoorInputs(CONTACT, None, None, pin_factory=factory, bounce_s=float("nan"))


def test_door_inputs_read_and_unwired_inputs(factory: Any) -> None:
    with DoorInputs(CONTACT, None, TAMPER, pin_factory=factory, bounce_s=FAST_BOUNCE_S) as inputs:
        assert inputs.exit_button is None
        assert inputs.read() == {"door_open": True, "exit_pressed": None, "tampered": True}
        factory.pin(CONTACT).drive_low()
        factory.pin(TAMPER).drive_low()
        assert wait_until(
            lambda: inputs.read() == {"door_open": False, "exit_pressed": None, "tampered": False}
        )
    assert inputs.closed
    inputs.close()
    with DoorInputs(None, None, None, pin_factory=factory) as nothing:
        assert nothing.read() == {"door_open": None, "exit_pressed": None, "tampered": None}


def test_door_inputs_pin_in_use_closes_what_was_made(factory: Any) -> None:
    held = DigitalInputDevice(TAMPER, pin_factory=factory)
    try:
        with pytest.raises(DoorInputError, match=f"tamper on pin {TAMPER}"):
            DoorInputs(CONTACT, EXIT, TAMPER, pin_factory=factory)
        # The contact and exit button made before the failure were closed: pins free again.
        for pin in (CONTACT, EXIT):
            DigitalInputDevice(pin, pin_factory=factory).close()
    finally:
        held.close()
