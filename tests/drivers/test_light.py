"""StatusLight: RGB (with and without PWM) and red/green pair; colors, blinks, close."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from drivers.exceptions import DeviceClosedError, FeedbackError
from drivers.light import COLORS, PAIR_COLORS, RGB_COLORS, StatusLight
from tests.polling import wait_until

R, G, B = 5, 6, 13
EARLY_S = 0.01
LATE_S = 1.0


@pytest.fixture
def pwm_factory() -> Iterator[Any]:
    factory = MockFactory(pin_class=MockPWMPin)
    yield factory
    factory.close()


@pytest.fixture
def plain_factory() -> Iterator[Any]:
    factory = MockFactory()
    yield factory
    factory.close()


def pins(factory: Any, *numbers: int) -> tuple[float, ...]:
    return tuple(float(factory.pin(n).state) for n in numbers)


def on_durations(pin: Any) -> list[float]:
    states = pin.states
    return [states[i + 1].timestamp for i in range(len(states) - 1) if states[i].state > 0]


def test_rgb_with_pwm_shows_every_color(pwm_factory: Any) -> None:
    with StatusLight(R, G, B, pin_factory=pwm_factory) as light:
        assert light.kind == "rgb"
        assert light.has_pwm
        assert pins(pwm_factory, R, G, B) == (0.0, 0.0, 0.0)
        for color in COLORS:
            light.show(color)
            assert pins(pwm_factory, R, G, B) == RGB_COLORS[color]
            assert light.color == color
        light.show("amber")
        assert pins(pwm_factory, R, G, B) == (1.0, 0.5, 0.0)


def test_rgb_without_pwm_shows_amber_as_red_and_green(plain_factory: Any) -> None:
    with StatusLight(R, G, B, pin_factory=plain_factory) as light:
        assert not light.has_pwm
        light.show("amber")
        assert pins(plain_factory, R, G, B) == (1.0, 1.0, 0.0)
        light.show("blue")
        assert pins(plain_factory, R, G, B) == (0.0, 0.0, 1.0)


def test_common_anode_rgb_is_inverted(plain_factory: Any) -> None:
    with StatusLight(R, G, B, pin_factory=plain_factory, active_high=False) as light:
        assert pins(plain_factory, R, G, B) == (1.0, 1.0, 1.0)
        light.show("red")
        assert pins(plain_factory, R, G, B) == (0.0, 1.0, 1.0)
        light.close()
        # Turned off before gpiozero released the pins.
        assert pins(plain_factory, R, G, B) == (1.0, 1.0, 1.0)


def test_pair_colors(plain_factory: Any) -> None:
    with StatusLight(R, G, pin_factory=plain_factory) as light:
        assert light.kind == "pair"
        for color in COLORS:
            light.show(color)
            assert pins(plain_factory, R, G) == PAIR_COLORS[color]


def test_rgb_blink_n_times_in_background_then_off(pwm_factory: Any) -> None:
    with StatusLight(R, G, B, pin_factory=pwm_factory) as light:
        red = pwm_factory.pin(R)
        red.clear_states()
        light.blink("red", 0.1, 0.1, n=3)
        assert wait_until(lambda: len(red.states) >= 7)
        assert [s.state for s in red.states] == [0, 1, 0, 1, 0, 1, 0]
        assert all(0.1 - EARLY_S <= d <= 0.1 + LATE_S for d in on_durations(red))
        assert pins(pwm_factory, G, B) == (0.0, 0.0)


def test_pair_blink_red_amber_keeps_both_leds_in_step(plain_factory: Any) -> None:
    with StatusLight(R, G, pin_factory=plain_factory) as light:
        red, green = plain_factory.pin(R), plain_factory.pin(G)
        green.clear_states()
        light.blink("red", 0.05, 0.05, n=2, off_color="amber")
        assert wait_until(lambda: len(green.states) >= 4)
        # Red is on throughout; green adds amber in the off phase.
        assert red.state
        assert [s.state for s in green.states] == [False, True, False, True]


def test_show_stops_a_running_blink(plain_factory: Any) -> None:
    before = set(threading.enumerate())
    with StatusLight(R, G, pin_factory=plain_factory) as light:
        light.blink("red", 0.05, 0.05)
        assert len(set(threading.enumerate()) - before) == 1
        light.show("green")
        assert set(threading.enumerate()) == before
        red = plain_factory.pin(R)
        red.clear_states()
        assert pins(plain_factory, R, G) == (0.0, 1.0)
        # The blink is over for good: nothing changes red from now on.
        light.show("green")
        assert [s.state for s in red.states] == [False]


@pytest.mark.parametrize("blue", [B, None])
def test_close_mid_blink_turns_off_and_joins(plain_factory: Any, blue: int | None) -> None:
    light = StatusLight(R, G, blue, pin_factory=plain_factory)
    light.blink("white", 0.02, 0.02)
    assert wait_until(lambda: plain_factory.pin(R).state)
    light.close()
    assert pins(plain_factory, R, G) == (0.0, 0.0)
    assert light.color == "off"
    light.close()
    with pytest.raises(DeviceClosedError):
        light.show("green")
    with pytest.raises(DeviceClosedError):
        light.blink("green", 1, 1)
    light.off()  # no effect, no error


def test_bad_arguments(plain_factory: Any) -> None:
    with StatusLight(R, G, B, pin_factory=plain_factory) as light:
        with pytest.raises(ValueError, match="unknown color 'purple'"):
            light.show("purple")
        with pytest.raises(ValueError):
            light.blink("red", -1, 1)
    with pytest.raises(FeedbackError, match="pin_factory is required"):
        StatusLight(R, G, B, pin_factory=None)
    with pytest.raises(FeedbackError, match="blue=99"):
        StatusLight(R, G, 99, pin_factory=plain_factory)
    # Nothing stayed claimed by the failed attempt.
    with StatusLight(R, G, B, pin_factory=plain_factory) as light:
        light.show("white")


def test_pair_releases_red_when_green_pin_is_taken(plain_factory: Any) -> None:
    with StatusLight(7, G, pin_factory=plain_factory):
        with pytest.raises(FeedbackError):
            StatusLight(R, G, pin_factory=plain_factory)
        # Red was released after the failure: it can be claimed again.
        with StatusLight(R, 8, pin_factory=plain_factory) as other:
            other.show("red")
            assert plain_factory.pin(R).state
