"""DoorRelay: locked at start and on every exit, pulses, extensions (case C13)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero import DigitalOutputDevice
from gpiozero.pins.mock import MockFactory

from drivers.exceptions import DeviceClosedError, FeedbackError
from drivers.pins import make_pin_factory
from drivers.relay import DoorRelay, unlock_energises_for

PIN = 17
# Scheduling on a loaded 2-core CI box can make a timer late, never early.
LATE_S = 1.5
EARLY_S = 0.01


FACTORIES: dict[str, Callable[[], Any]] = {
    "MockPin": MockFactory,
    "mock-pwm": lambda: make_pin_factory("mock"),
}


@pytest.fixture(params=sorted(FACTORIES))
def factory(request: pytest.FixtureRequest) -> Iterator[Any]:
    f = FACTORIES[request.param]()
    yield f
    f.close()


def levels(pin: Any) -> list[int]:
    """Every level the line was driven to, as 0/1, oldest first (first = before claiming)."""
    return [int(bool(s.state)) for s in pin.states]


def level_durations(pin: Any, level: int) -> list[float]:
    """Durations in s of each finished period the line spent at ``level``."""
    states = pin.states
    return [
        states[i + 1].timestamp
        for i in range(len(states) - 1)
        if int(bool(states[i].state)) == level
    ]


@pytest.mark.parametrize("active_high", [True, False])
def test_inactive_at_construction_never_pulses_at_boot(factory: Any, active_high: bool) -> None:
    inactive = 0 if active_high else 1
    with DoorRelay(PIN, pin_factory=factory, active_high=active_high) as relay:
        pin = factory.pin(PIN)
        assert pin.function == "output"
        assert pin.state == inactive
        # After the mock's pre-claim level, the line was only ever driven inactive.
        assert set(levels(pin)[1:]) <= {inactive}
        assert not relay.is_energised
        assert not relay.is_unlocked
        assert relay.pulse_count == 0


@pytest.mark.parametrize("active_high", [True, False])
def test_pulse_energises_synchronously_then_releases_after_pulse_s(
    factory: Any, active_high: bool
) -> None:
    active = 1 if active_high else 0
    with DoorRelay(PIN, pin_factory=factory, active_high=active_high, pulse_s=0.3) as relay:
        pin = factory.pin(PIN)
        pin.clear_states()
        before = time.monotonic_ns()
        t_ns = relay.pulse()
        after = time.monotonic_ns()
        # Energised in the caller's thread: already on when pulse() returns.
        assert pin.state == active
        assert relay.is_energised
        assert before <= t_ns <= after
        assert relay.wait_locked(timeout_s=10)
        assert pin.state == 1 - active
        assert levels(pin) == [1 - active, active, 1 - active]
        [on_s] = level_durations(pin, active)
        assert 0.3 - EARLY_S <= on_s <= 0.3 + LATE_S
        assert relay.pulse_count == 1


def test_pulse_during_pulse_extends_it(factory: Any) -> None:
    with DoorRelay(PIN, pin_factory=factory, pulse_s=0.4) as relay:
        pin = factory.pin(PIN)
        pin.clear_states()
        relay.pulse()
        time.sleep(0.2)  # a second grant arrives while the door is open
        relay.pulse()
        assert relay.wait_locked(timeout_s=10)
        # One unlock period, not two, lasting from the first pulse to 0.4 s after the second.
        assert levels(pin) == [0, 1, 0]
        [on_s] = level_durations(pin, 1)
        assert 0.6 - EARLY_S <= on_s <= 0.6 + LATE_S
        assert relay.pulse_count == 2


def test_shorter_pulse_never_shortens_a_running_one(factory: Any) -> None:
    with DoorRelay(PIN, pin_factory=factory) as relay:
        pin = factory.pin(PIN)
        pin.clear_states()
        relay.pulse(0.6)
        relay.pulse(0.05)
        assert relay.wait_locked(timeout_s=10)
        [on_s] = level_durations(pin, 1)
        assert 0.6 - EARLY_S <= on_s <= 0.6 + LATE_S


def test_off_ends_pulse_now(factory: Any) -> None:
    with DoorRelay(PIN, pin_factory=factory) as relay:
        relay.pulse(30)
        relay.off()
        assert factory.pin(PIN).state == 0
        assert relay.wait_locked(timeout_s=0)


@pytest.mark.parametrize("active_high", [True, False])
def test_c13_close_mid_pulse_leaves_line_inactive(factory: Any, active_high: bool) -> None:
    inactive = 0 if active_high else 1
    relay = DoorRelay(PIN, pin_factory=factory, active_high=active_high)
    pin = factory.pin(PIN)
    relay.pulse(30)
    assert pin.state == 1 - inactive
    relay.close()
    assert pin.state == inactive
    assert pin.function == "input"  # released by gpiozero
    assert not relay.is_energised
    relay.close()  # idempotent
    assert pin.state == inactive


def test_gpiozero_close_alone_leaves_active_low_line_energised() -> None:
    # The reason DoorRelay.close() drives off() first (FIELD-NOTES, C13).
    factory = MockFactory()
    device = DigitalOutputDevice(PIN, active_high=False, initial_value=False, pin_factory=factory)
    device.on()
    device.close()
    assert factory.pin(PIN).state == 0  # still energised
    factory.close()


@pytest.mark.parametrize("active_high", [True, False])
def test_c13a_exception_mid_pulse_then_close_leaves_line_inactive(
    factory: Any, active_high: bool
) -> None:
    inactive = 0 if active_high else 1

    def grant_then_crash() -> None:
        with DoorRelay(PIN, pin_factory=factory, active_high=active_high) as relay:
            relay.pulse(30)
            raise RuntimeError("bug in the scan loop")

    with pytest.raises(RuntimeError, match="bug in the scan loop"):
        grant_then_crash()
    assert factory.pin(PIN).state == inactive


def test_closed_relay_refuses_pulses(factory: Any) -> None:
    relay = DoorRelay(PIN, pin_factory=factory)
    relay.close()
    with pytest.raises(DeviceClosedError):
        relay.pulse()
    relay.off()  # no effect, no error
    assert relay.closed
    assert factory.pin(PIN).state == 0


def test_fail_safe_lock_rests_energised_and_a_pulse_cuts_power(factory: Any) -> None:
    unlock_energises = unlock_energises_for("fail-safe")
    assert unlock_energises is False
    relay = DoorRelay(PIN, pin_factory=factory, pulse_s=0.2, unlock_energises=unlock_energises)
    pin = factory.pin(PIN)
    # Resting = locked = maglock powered = relay energised (active-high board: line high).
    assert pin.state == 1
    assert relay.is_energised
    assert not relay.is_unlocked
    pin.clear_states()
    relay.pulse()
    assert pin.state == 0
    assert relay.is_unlocked
    assert not relay.is_energised
    assert relay.wait_locked(timeout_s=10)
    assert levels(pin) == [1, 0, 1]
    relay.pulse(30)
    relay.close()
    # Locked again before gpiozero released the line.
    assert pin.state == 1


def test_fail_secure_maps_to_unlock_energises() -> None:
    assert unlock_energises_for("fail-secure") is True
    assert unlock_energises_for(" Fail-Safe ") is False
    with pytest.raises(ValueError, match="fail-secure, fail-safe"):
        unlock_energises_for("magnetic")


def test_bad_arguments(factory: Any) -> None:
    with pytest.raises(ValueError):
        DoorRelay(PIN, pin_factory=factory, pulse_s=0)
    with pytest.raises(FeedbackError, match="pin_factory is required"):
        DoorRelay(PIN, pin_factory=None)
    with DoorRelay(PIN, pin_factory=factory) as relay:
        with pytest.raises(ValueError):
            relay.pulse(float("nan"))
        with pytest.raises(ValueError):
            relay.pulse(-1)
        assert relay.pulse_count == 0
        with pytest.raises(FeedbackError, match="pin 17"):
            DoorRelay(PIN, pin_factory=factory)  # pin already claimed


def test_one_worker_thread_for_many_pulses(factory: Any) -> None:
    before = set(threading.enumerate())
    with DoorRelay(PIN, pin_factory=factory) as relay:
        for _ in range(20):
            relay.pulse(0.01)
        assert len(set(threading.enumerate()) - before) == 1
        assert relay.wait_locked(timeout_s=10)
        assert relay.pulse_count == 20
