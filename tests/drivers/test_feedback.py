"""Feedback patterns over real gpiozero devices on mock pins (cases C13, C14)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero.pins.mock import MockFactory

from drivers.buzzer import Beeper, Tone
from drivers.feedback import (
    CONFIRM_BLINK,
    CONFIRM_TONES,
    DENY_BLINK,
    FAULT_TONES,
    OFFLINE_BLINK,
    Feedback,
)
from drivers.light import StatusLight
from drivers.pins import LevelKeepingMockPWMPin
from drivers.relay import DoorRelay
from tests.polling import wait_until

RELAY, BUZZER, R, G, B = 17, 18, 5, 6, 13
EARLY_S = 0.01
LATE_S = 1.5


class RecordingPin(LevelKeepingMockPWMPin):
    """A PWM mock pin that also keeps absolute times of levels and frequencies it was set to."""

    def __init__(self, factory: Any, info: Any) -> None:
        super().__init__(factory, info)
        self.frequencies: list[tuple[float, float | None]] = []
        self.writes: list[tuple[float, float]] = []

    def _set_frequency(self, value: float | None) -> None:
        self.frequencies.append((time.monotonic(), value))
        super()._set_frequency(value)

    def _set_state(self, value: float) -> None:
        self.writes.append((time.monotonic(), float(value)))
        super()._set_state(value)

    def reset_history(self) -> None:
        self.frequencies.clear()
        self.writes.clear()
        self.clear_states()


@pytest.fixture
def factory() -> Iterator[Any]:
    f = MockFactory(pin_class=RecordingPin)
    yield f
    f.close()


def build(
    factory: Any, *, pulse_s: float = 0.3, relay_active_high: bool = True
) -> tuple[Feedback, StatusLight, Beeper, DoorRelay]:
    light = StatusLight(R, G, B, pin_factory=factory)
    beeper = Beeper(BUZZER, pin_factory=factory)
    relay = DoorRelay(RELAY, pin_factory=factory, active_high=relay_active_high, pulse_s=pulse_s)
    return Feedback(light, beeper, relay), light, beeper, relay


def rgb(factory: Any) -> tuple[float, float, float]:
    return tuple(float(factory.pin(n).state) for n in (R, G, B))  # type: ignore[return-value]


def tones(pin: Any) -> list[float | None]:
    """Frequencies set on the buzzer pin, consecutive repeats collapsed."""
    out: list[float | None] = []
    for _, f in pin.frequencies:
        if not out or out[-1] != f:
            out.append(f)
    return out


def durations(pin: Any, on: Callable[[float], bool] = lambda s: s > 0) -> list[float]:
    """Durations in s of finished periods in which ``on(state)`` held (merged)."""
    out: list[float] = []
    states = pin.states
    run: float | None = None
    for i in range(len(states) - 1):
        if on(states[i].state):
            run = (run or 0.0) + states[i + 1].timestamp
        elif run is not None:
            out.append(run)
            run = None
    if run is not None and not on(states[-1].state):
        out.append(run)
    return out


def test_ready_is_steady_blue(factory: Any) -> None:
    with build(factory)[0] as fb:
        fb.ready()
        assert fb.wait_settled(10)
        assert rgb(factory) == (0.0, 0.0, 1.0)
        assert fb.errors == 0


def test_granted_unlocks_first_returns_energise_time_then_green_and_2khz(factory: Any) -> None:
    fb, light, beeper, relay = build(factory, pulse_s=0.3)
    assert (fb.relay, fb.light, fb.beeper) == (relay, light, beeper)
    with fb:
        fb.ready()
        assert fb.wait_settled(10)
        relay_pin, green, buzzer = factory.pin(RELAY), factory.pin(G), factory.pin(BUZZER)
        for p in (relay_pin, green, buzzer):
            p.reset_history()
        before = time.monotonic_ns()
        t_ns = fb.granted()
        after = time.monotonic_ns()
        # The door is open when granted() returns; light and sound are still to come or running.
        assert relay_pin.state == 1
        assert before <= t_ns <= after
        assert fb.pattern == "granted"
        assert fb.wait_settled(10)
        assert fb.pattern is None
        assert relay_pin.state == 0
        assert relay.pulse_count == 1
        # Back to the idle state.
        assert rgb(factory) == (0.0, 0.0, 1.0)
        assert light.color == "blue"
        # Relay before light: the first green write came after the relay was energised.
        assert relay_pin.writes[0][0] <= green.writes[0][0]
        [green_s] = durations(green)
        assert 0.3 - EARLY_S <= green_s <= 0.3 + LATE_S
        assert tones(buzzer) == [2000.0, None]
        [beep_s] = durations(buzzer)
        assert 0.15 - EARLY_S <= beep_s <= 0.15 + LATE_S


def test_granted_with_own_pulse_time(factory: Any) -> None:
    with build(factory, pulse_s=5.0)[0] as fb:
        relay_pin = factory.pin(RELAY)
        relay_pin.reset_history()
        fb.granted(0.2)
        assert fb.wait_settled(10)
        [open_s] = durations(relay_pin)
        assert 0.2 - EARLY_S <= open_s <= 0.2 + LATE_S


def test_grant_during_grant_keeps_green_as_long_as_the_door_is_open(factory: Any) -> None:
    with build(factory)[0] as fb:
        relay_pin, green = factory.pin(RELAY), factory.pin(G)
        relay_pin.reset_history()
        green.reset_history()
        fb.granted(0.6)
        fb.granted(0.1)
        assert fb.wait_settled(10)
        [open_s] = durations(relay_pin)
        [green_s] = durations(green)
        assert 0.6 - EARLY_S <= open_s <= 0.6 + LATE_S
        assert 0.6 - EARLY_S <= green_s <= 0.6 + LATE_S


def test_denied_blinks_red_three_times_with_three_400hz_beeps(factory: Any) -> None:
    fb, _, beeper, relay = build(factory)
    with fb:
        fb.ready()
        assert fb.wait_settled(10)
        red, buzzer = factory.pin(R), factory.pin(BUZZER)
        red.reset_history()
        buzzer.reset_history()
        fb.denied()
        # Returned before the pattern finished.
        assert fb.pattern == "denied"
        assert fb.wait_settled(10)
        assert beeper.wait_silent(10)
        on_s, _, n = DENY_BLINK
        reds = durations(red)
        assert len(reds) == n
        assert all(on_s - EARLY_S <= d <= on_s + LATE_S for d in reds)
        assert tones(buzzer) == [400.0, None] * 3
        assert rgb(factory) == (0.0, 0.0, 1.0)
        assert relay.pulse_count == 0
        assert factory.pin(RELAY).state == 0


def test_confirmed_blinks_green_with_three_rising_beeps_and_never_touches_the_relay(
    factory: Any,
) -> None:
    fb, _, beeper, relay = build(factory)
    with fb:
        fb.ready()
        assert fb.wait_settled(10)
        green, buzzer, relay_pin = factory.pin(G), factory.pin(BUZZER), factory.pin(RELAY)
        for p in (green, buzzer, relay_pin):
            p.reset_history()
        fb.confirmed()
        assert fb.pattern == "confirmed"
        assert fb.wait_settled(10)
        assert beeper.wait_silent(10)
        on_s, _, n = CONFIRM_BLINK
        greens = durations(green)
        assert len(greens) == n
        assert all(on_s - EARLY_S <= d <= on_s + LATE_S for d in greens)
        assert tones(buzzer) == [1000.0, None, 1500.0, None, 2000.0, None]
        assert [t.freq_hz for t in CONFIRM_TONES] == [1000.0, 1500.0, 2000.0]
        assert rgb(factory) == (0.0, 0.0, 1.0)
        assert relay.pulse_count == 0
        assert relay_pin.writes == []
        assert relay_pin.state == 0


def test_offline_is_a_slow_red_blink_and_returns_after_a_verdict(factory: Any) -> None:
    fb, light, _, _ = build(factory)
    with fb:
        red = factory.pin(R)
        fb.offline()
        assert wait_until(lambda: len(red.states) >= 4)  # on, off, on again
        on_s, off_s = OFFLINE_BLINK
        states = red.states
        assert [s.state for s in states[:4]] == [0, 1, 0, 1]
        assert on_s - EARLY_S <= states[2].timestamp <= on_s + LATE_S
        assert off_s - EARLY_S <= states[3].timestamp <= off_s + LATE_S
        fb.denied()
        assert fb.wait_settled(10)
        assert light.color == "red"
        red.reset_history()
        # Blinking again: red changes without any further call.
        assert wait_until(lambda: len(red.states) >= 3)


def test_fault_is_red_amber_with_one_long_low_tone(factory: Any) -> None:
    fb, light, _, _ = build(factory, pulse_s=0.2)
    with fb:
        red, green, buzzer = factory.pin(R), factory.pin(G), factory.pin(BUZZER)
        buzzer.reset_history()
        fb.fault()
        # Amber = red + half green on a PWM RGB LED: green alternates 0 / 0.5 under steady red.
        assert wait_until(lambda: len([s for s in green.states if s.state == 0.5]) >= 2)
        assert red.state == 1.0
        assert factory.pin(B).state == 0.0
        fb.granted()
        assert fb.wait_settled(10)
        assert light.color == "red"
        assert wait_until(lambda: len(tones(buzzer)) >= 4)
        fb.fault()  # already in fault: no second long tone
        assert fb.wait_settled(10)
        played = [f for f in tones(buzzer) if f is not None]
        assert played.count(FAULT_TONES[0].freq_hz) == 1
        assert 2000.0 in played


def test_idle_change_during_a_verdict_waits_for_its_end(factory: Any) -> None:
    fb, light, _, _ = build(factory, pulse_s=0.3)
    with fb:
        fb.offline()
        fb.granted()
        fb.ready()
        assert fb.pattern == "granted"
        assert fb.wait_settled(10)
        assert light.color == "blue"
        assert rgb(factory) == (0.0, 0.0, 1.0)


@pytest.mark.parametrize("relay_active_high", [True, False])
def test_c13b_stop_mid_pulse_with_blink_and_beep_running(
    factory: Any, relay_active_high: bool
) -> None:
    before = set(threading.enumerate())
    fb, _, beeper, _ = build(factory, relay_active_high=relay_active_high)
    relay_pin, red, buzzer = factory.pin(RELAY), factory.pin(R), factory.pin(BUZZER)
    fb.offline()
    fb.granted(30.0)
    fb.denied()
    # Everything is running in the background now.
    assert wait_until(lambda: red.state == 1.0 and buzzer.frequency == 400.0)
    assert relay_pin.state == (1 if relay_active_high else 0)
    assert beeper.is_playing
    fb.close()
    inactive = 0 if relay_active_high else 1
    assert relay_pin.state == inactive
    assert rgb(factory) == (0.0, 0.0, 0.0)
    assert buzzer.frequency is None
    assert buzzer.state == 0
    assert set(threading.enumerate()) == before
    # The relay was driven inactive before light and buzzer were touched.
    relay_off_t = relay_pin.writes[-1][0]
    later = [factory.pin(n).writes[-1][0] for n in (R, G, B, BUZZER)]
    assert all(relay_off_t <= t for t in later)
    fb.close()  # idempotent


def test_close_order_relay_first(factory: Any) -> None:
    order: list[str] = []

    class Relay(DoorRelay):
        def close(self) -> None:
            order.append("relay")
            super().close()

    class Light(StatusLight):
        def close(self) -> None:
            order.append("light")
            super().close()

    class Buzz(Beeper):
        def close(self) -> None:
            order.append("buzzer")
            super().close()

    fb = Feedback(
        Light(R, G, B, pin_factory=factory),
        Buzz(BUZZER, pin_factory=factory),
        Relay(RELAY, pin_factory=factory),
    )
    fb.close()
    fb.close()
    assert order == ["relay", "light", "buzzer"]


def test_c14_plain_pins_grant_never_raises_and_beeps_on_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    factory = MockFactory()  # no PWM anywhere
    fb, _, beeper, relay = build(factory, pulse_s=0.2)
    assert not beeper.has_tones
    buzzer = factory.pin(BUZZER)
    with fb:
        for _ in range(3):
            buzzer.clear_states()
            t_ns = fb.granted()
            assert t_ns > 0
            assert fb.wait_settled(10)
            [beep_s] = durations(buzzer)
            assert 0.15 - EARLY_S <= beep_s <= 0.15 + LATE_S
        buzzer.clear_states()
        fb.denied()
        assert fb.wait_settled(10)
        assert beeper.wait_silent(10)
        assert len(durations(buzzer)) == 3
        assert relay.pulse_count == 3
        assert fb.errors == 0
    factory.close()
    fallback = [r for r in caplog.records if "no PWM" in r.getMessage() and "buzzer" in r.name]
    assert len(fallback) == 1


def test_failing_light_is_logged_once_counted_and_never_raises(
    factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenLight(StatusLight):
        def show(self, color: str) -> None:
            raise OSError("LED driver gone")

        def blink(self, *args: Any, **kwargs: Any) -> None:
            raise OSError("LED driver gone")

    caplog.set_level(logging.WARNING, logger="drivers.feedback")
    light = BrokenLight(R, G, B, pin_factory=factory)
    relay = DoorRelay(RELAY, pin_factory=factory, pulse_s=0.1)
    with Feedback(light, Beeper(BUZZER, pin_factory=factory), relay) as fb:
        fb.ready()
        for _ in range(3):
            assert fb.granted() > 0
            fb.denied()
            assert fb.wait_settled(10)
        fb.offline()
        fb.fault()
        assert fb.wait_settled(10)
        assert relay.pulse_count == 3
        # Each round fails at least on the red blink and on the blue it returns to; calls posted
        # together may be shown in one go, so the exact count varies.
        assert fb.errors >= 7
    logged = [r for r in caplog.records if "LED driver gone" in r.getMessage()]
    assert len(logged) == 1


def test_failing_buzzer_is_logged_once_and_counted(
    factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenBeeper(Beeper):
        def play(self, pattern: Any) -> None:
            raise RuntimeError("buzzer shorted")

    caplog.set_level(logging.WARNING, logger="drivers.feedback")
    fb = Feedback(
        StatusLight(R, G, B, pin_factory=factory),
        BrokenBeeper(BUZZER, pin_factory=factory),
        DoorRelay(RELAY, pin_factory=factory, pulse_s=0.1),
    )
    with fb:
        for _ in range(3):
            assert fb.granted() > 0
            assert fb.wait_settled(10)
        assert fb.errors == 3
    assert len([r for r in caplog.records if "buzzer shorted" in r.getMessage()]) == 1


def test_failing_relay_returns_minus_one_and_shows_denied(
    factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    fb, _, _, relay = build(factory)
    with fb:
        relay.close()  # the relay is gone (e.g. its line was lost)
        t_ns = fb.granted()
        assert t_ns == -1
        assert fb.pattern == "denied"
        assert fb.errors == 1
        assert fb.wait_settled(10)
    assert any(
        r.levelno == logging.ERROR and "NOT unlocked" in r.getMessage() for r in caplog.records
    )


def test_after_close_every_method_is_a_quiet_no_op(factory: Any) -> None:
    fb = build(factory)[0]
    fb.close()
    fb.ready()
    fb.offline()
    fb.fault()
    fb.denied()
    assert fb.granted() == -1
    assert fb.wait_settled(0)
    assert factory.pin(RELAY).state == 0


def test_without_devices_the_clock_gives_the_grant_time() -> None:
    offset = 10**15
    with Feedback(None, None, None, clock=lambda: time.monotonic_ns() + offset) as fb:
        t_ns = fb.granted(0.05)
        assert t_ns >= offset
        fb.denied()
        fb.fault()
        assert fb.wait_settled(10)
        assert fb.errors == 0


def test_beeper_play_through_feedback_interrupts_previous_pattern(factory: Any) -> None:
    fb, _, beeper, _ = build(factory, pulse_s=0.2)
    with fb:
        beeper.play([Tone(300.0, 60.0)])
        fb.granted()
        assert fb.wait_settled(10)
        assert beeper.wait_silent(10)
        assert factory.pin(BUZZER).frequency is None
