"""Beeper: tones on PWM pins, on/off fallback on plain pins (case C14)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory, MockPWMPin

from drivers.buzzer import MAX_HZ, MIN_HZ, Beeper, Tone, pattern_seconds
from drivers.exceptions import DeviceClosedError
from drivers.feedback import DENY_TONES, GRANT_TONES

PIN = 18
LATE_S = 1.0
EARLY_S = 0.01


class RecordingPWMPin(MockPWMPin):  # type: ignore[misc]
    """A MockPWMPin that also keeps every frequency it was set to, with the time."""

    def __init__(self, factory: Any, info: Any) -> None:
        super().__init__(factory, info)
        self.frequencies: list[tuple[float, float | None]] = []

    def _set_frequency(self, value: float | None) -> None:
        self.frequencies.append((time.monotonic(), value))
        super()._set_frequency(value)

    def reset_history(self) -> None:
        self.frequencies.clear()
        self.clear_states()


@pytest.fixture
def pwm_factory() -> Iterator[Any]:
    factory = MockFactory(pin_class=RecordingPWMPin)
    yield factory
    factory.close()


@pytest.fixture
def plain_factory() -> Iterator[Any]:
    factory = MockFactory()
    yield factory
    factory.close()


def on_durations(pin: Any) -> list[float]:
    """Durations in s of each finished period the line was sounding (state > 0)."""
    states = pin.states
    return [states[i + 1].timestamp for i in range(len(states) - 1) if states[i].state > 0]


def off_gaps(pin: Any) -> list[float]:
    """Durations in s of silent periods between two sounding periods."""
    states = pin.states
    return [
        states[i + 1].timestamp
        for i in range(1, len(states) - 1)
        if states[i].state == 0 and states[i - 1].state > 0
    ]


def test_range_holds_grant_and_deny_tones() -> None:
    assert MIN_HZ <= 400.0 <= MAX_HZ
    assert MIN_HZ <= 2000.0 <= MAX_HZ


def test_c14_grant_tone_2khz_150ms_then_silent(pwm_factory: Any) -> None:
    with Beeper(PIN, pin_factory=pwm_factory) as beeper:
        assert beeper.has_tones
        pin = pwm_factory.pin(PIN)
        pin.reset_history()
        beeper.play(GRANT_TONES)
        assert beeper.is_playing
        assert beeper.wait_silent(timeout_s=10)
        assert [f for _, f in pin.frequencies] == [2000.0, None]
        assert pin.frequency is None
        assert pin.state == 0
        [on_s] = on_durations(pin)
        assert 0.15 - EARLY_S <= on_s <= 0.15 + LATE_S


def test_c14_deny_three_400hz_beeps(pwm_factory: Any) -> None:
    with Beeper(PIN, pin_factory=pwm_factory) as beeper:
        pin = pwm_factory.pin(PIN)
        pin.reset_history()
        beeper.play(DENY_TONES)
        assert beeper.wait_silent(timeout_s=10)
        assert [f for _, f in pin.frequencies] == [400.0, None] * 3
        assert pin.frequency is None
        ons = on_durations(pin)
        assert len(ons) == 3
        assert all(0.15 - EARLY_S <= d <= 0.15 + LATE_S for d in ons)
        gaps = off_gaps(pin)
        assert len(gaps) == 2
        assert all(0.15 - EARLY_S <= d <= 0.15 + LATE_S for d in gaps)
        # 50 % duty while sounding.
        assert {s.state for s in pin.states[1:]} == {0.5, 0.0}


def test_c14_plain_pin_falls_back_to_on_off_beeps_and_says_so_once(
    plain_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.buzzer")
    with Beeper(PIN, pin_factory=plain_factory) as beeper:
        assert not beeper.has_tones
        pin = plain_factory.pin(PIN)
        for pattern in (GRANT_TONES, DENY_TONES, GRANT_TONES):
            pin.clear_states()
            beeper.play(pattern)
            assert beeper.wait_silent(timeout_s=10)
            ons = on_durations(pin)
            assert len(ons) == len(pattern)
            assert all(0.15 - EARLY_S <= d <= 0.15 + LATE_S for d in ons)
            assert pin.state is False
    fallback = [r for r in caplog.records if "no PWM" in r.getMessage()]
    assert len(fallback) == 1
    assert fallback[0].levelno == logging.WARNING


def test_new_pattern_interrupts_current_one(pwm_factory: Any) -> None:
    with Beeper(PIN, pin_factory=pwm_factory) as beeper:
        pin = pwm_factory.pin(PIN)
        pin.reset_history()
        beeper.play([Tone(400.0, 60.0)])
        beeper.play(GRANT_TONES)
        # Would time out if the 60 s tone kept playing.
        assert beeper.wait_silent(timeout_s=10)
        played = [f for _, f in pin.frequencies if f is not None]
        assert played[-1] == 2000.0
        assert pin.frequency is None


def test_stop_silences_now(pwm_factory: Any) -> None:
    with Beeper(PIN, pin_factory=pwm_factory) as beeper:
        pin = pwm_factory.pin(PIN)
        beeper.play([Tone(1000.0, 60.0)])
        # The worker starts the tone in the background; wait for it on the condition.
        assert _wait_for(lambda: pin.frequency == 1000.0)
        beeper.stop()
        assert pin.frequency is None
        assert not beeper.is_playing
        assert beeper.wait_silent(timeout_s=0)


def test_out_of_range_frequency_is_clamped_and_logged_once(
    pwm_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="drivers.buzzer")
    with Beeper(PIN, pin_factory=pwm_factory) as beeper:
        pin = pwm_factory.pin(PIN)
        pin.reset_history()
        beeper.play([Tone(50.0, 0.01), Tone(9000.0, 0.01), Tone(50.0, 0.01)])
        assert beeper.wait_silent(timeout_s=10)
        played = [f for _, f in pin.frequencies if f is not None]
        assert played == [MIN_HZ, MAX_HZ, MIN_HZ]
    assert len([r for r in caplog.records if "clamped" in r.getMessage()]) == 1


@pytest.mark.parametrize("use_pwm", [True, False])
def test_active_low_buzzer_rests_high(use_pwm: bool) -> None:
    factory = MockFactory(pin_class=RecordingPWMPin) if use_pwm else MockFactory()
    with Beeper(PIN, pin_factory=factory, active_high=False) as beeper:
        pin = factory.pin(PIN)
        assert pin.state == 1
        pin.clear_states()
        beeper.play(GRANT_TONES)
        assert beeper.wait_silent(timeout_s=10)
        assert pin.state == 1
        # It did sound: the line left the resting level once.
        assert len(pin.states) >= 3
    factory.close()


def test_close_silences_first_and_is_idempotent(pwm_factory: Any) -> None:
    beeper = Beeper(PIN, pin_factory=pwm_factory)
    pin = pwm_factory.pin(PIN)
    beeper.play([Tone(400.0, 60.0)])
    assert _wait_for(lambda: pin.frequency == 400.0)
    beeper.close()
    assert pin.frequency is None
    assert pin.state == 0
    beeper.close()
    with pytest.raises(DeviceClosedError):
        beeper.play(GRANT_TONES)
    beeper.stop()  # no effect, no error


def test_tone_validation_and_length() -> None:
    with pytest.raises(ValueError):
        Tone(0.0, 0.1)
    with pytest.raises(ValueError):
        Tone(400.0, -0.1)
    assert pattern_seconds(DENY_TONES) == pytest.approx(0.9)


def _wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    # Only for states no event reports (a mock pin's level); polls briefly.
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
