"""DoorMonitor on real door inputs over mock pins: openings by grant, exit request or force,
held-open, tamper, bounce, failing callbacks, close."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from gpiozero import Device

from drivers.door import DoorInputs
from drivers.pins import make_pin_factory
from firmware.doors import EVENT_CODES, DoorMonitor
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("no_leaks")

CONTACT, EXIT, TAMPER = 5, 6, 13
BOUNCE_S = 0.01
BURST_BOUNCE_S = 0.3
POLL_S = 0.005


class FakeRelay:
    """The two relay calls the monitor makes: "is it unlocked" and "unlock"."""

    def __init__(self) -> None:
        self.unlocked = False
        self.pulses = 0
        self.fail = False

    def is_unlocked(self) -> bool:
        return self.unlocked

    def pulse(self) -> int:
        if self.fail:
            raise RuntimeError("relay gone")
        self.pulses += 1
        self.unlocked = True
        return 0


class Clock:
    """A monotonic clock the test moves by hand, seconds."""

    def __init__(self) -> None:
        self.now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self.now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self.now += seconds


class Events:
    """A thread-safe ``record`` that keeps every event."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: list[tuple[str, dict[str, object]]] = []

    def __call__(self, code: str, detail: dict[str, object]) -> None:
        assert code in EVENT_CODES
        with self._lock:
            self._items.append((code, dict(detail)))

    @property
    def items(self) -> list[tuple[str, dict[str, object]]]:
        with self._lock:
            return list(self._items)

    @property
    def codes(self) -> list[str]:
        return [code for code, _ in self.items]

    def wait_codes(self, *codes: str) -> None:
        assert wait_until(lambda: self.codes == list(codes)), self.codes


@pytest.fixture
def factory() -> Iterator[Any]:
    f = make_pin_factory("mock")
    yield f
    f.close()
    assert Device.pin_factory is None


def make_inputs(factory: Any, bounce_s: float = BOUNCE_S, *, door_shut: bool = True) -> DoorInputs:
    """Door inputs with the tamper switch closed and the door shut (unless told), settled."""
    inputs = DoorInputs(CONTACT, EXIT, TAMPER, pin_factory=factory, bounce_s=bounce_s)
    factory.pin(TAMPER).drive_low()
    if door_shut:
        factory.pin(CONTACT).drive_low()
    assert inputs.contact is not None and inputs.tamper is not None
    assert wait_until(
        lambda: (
            inputs.read() == {"door_open": not door_shut, "exit_pressed": False, "tampered": False}
        )
    )
    return inputs


@pytest.fixture
def inputs(factory: Any) -> Iterator[DoorInputs]:
    i = make_inputs(factory)
    yield i
    i.close()


@pytest.fixture
def relay() -> FakeRelay:
    return FakeRelay()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> Events:
    return Events()


MonitorMaker = Callable[..., DoorMonitor]


@pytest.fixture
def monitor(
    inputs: DoorInputs, relay: FakeRelay, clock: Clock, events: Events
) -> Iterator[MonitorMaker]:
    made: list[DoorMonitor] = []

    def make(**kw: Any) -> DoorMonitor:
        args: dict[str, Any] = {
            "relay_unlocked": relay.is_unlocked,
            "unlock": relay.pulse,
            "record": events,
            "held_open_s": 30.0,
            "exit_unlocks": True,
            "poll_s": POLL_S,
            "monotonic": clock,
        }
        args.update(kw)
        m = DoorMonitor(inputs, **args)
        made.append(m)
        m.start()
        return m

    yield make
    for m in made:
        m.close()


def open_door(factory: Any) -> None:
    factory.pin(CONTACT).drive_high()


def shut_door(factory: Any) -> None:
    factory.pin(CONTACT).drive_low()


def test_opening_while_the_relay_is_unlocked_is_a_granted_opening(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    m = monitor()
    relay.unlocked = True
    open_door(factory)
    events.wait_codes("door_opened")
    assert events.items == [("door_opened", {"cause": "unlocked"})]
    assert m.door_open
    clock.advance(4.25)
    shut_door(factory)
    events.wait_codes("door_opened", "door_closed")
    assert events.items[1] == ("door_closed", {"open_s": 4.25, "was_held_open": False})
    assert not m.door_open


def test_opening_without_grant_or_exit_request_is_forced(
    factory: Any, monitor: MonitorMaker, events: Events
) -> None:
    monitor()
    open_door(factory)
    events.wait_codes("door_opened", "door_forced_open")
    assert events.items == [("door_opened", {"cause": "forced"}), ("door_forced_open", {})]


def test_opening_just_after_the_pulse_ended_is_within_the_grace(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    m = monitor(grace_s=2.0)
    relay.unlocked = True
    assert wait_until(lambda: m.relay_seen_unlocked_at == clock())
    relay.unlocked = False
    clock.advance(1.5)
    open_door(factory)
    events.wait_codes("door_opened")
    assert events.items == [("door_opened", {"cause": "unlocked"})]


def test_opening_after_the_grace_is_forced(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    m = monitor(grace_s=2.0)
    relay.unlocked = True
    assert wait_until(lambda: m.relay_seen_unlocked_at == clock())
    relay.unlocked = False
    clock.advance(2.5)
    open_door(factory)
    events.wait_codes("door_opened", "door_forced_open")


def test_exit_request_unlocks_and_the_opening_is_an_exit(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, events: Events
) -> None:
    monitor(exit_unlocks=True)
    factory.pin(EXIT).drive_low()
    events.wait_codes("exit_request")
    assert events.items == [("exit_request", {"unlocked": True})]
    assert relay.pulses == 1
    factory.pin(EXIT).drive_high()
    open_door(factory)
    events.wait_codes("exit_request", "door_opened")
    assert events.items[1] == ("door_opened", {"cause": "exit_request"})


def test_exit_request_without_unlocking_still_excuses_the_opening(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    monitor(exit_unlocks=False, exit_window_s=5.0)
    factory.pin(EXIT).drive_low()
    events.wait_codes("exit_request")
    assert events.items == [("exit_request", {"unlocked": False})]
    assert relay.pulses == 0
    clock.advance(4.0)
    open_door(factory)
    events.wait_codes("exit_request", "door_opened")
    assert events.items[1] == ("door_opened", {"cause": "exit_request"})


def test_opening_long_after_an_exit_request_is_forced(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    monitor(exit_unlocks=False, exit_window_s=5.0)
    factory.pin(EXIT).drive_low()
    events.wait_codes("exit_request")
    clock.advance(6.0)
    open_door(factory)
    events.wait_codes("exit_request", "door_opened", "door_forced_open")


def test_a_failing_unlock_is_reported_in_the_exit_request(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, events: Events
) -> None:
    relay.fail = True
    m = monitor(exit_unlocks=True)
    factory.pin(EXIT).drive_low()
    events.wait_codes("exit_request")
    assert events.items == [("exit_request", {"unlocked": False})]
    assert m.errors == 1


def test_held_open_once_per_opening_then_closed_with_flag(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    relay.unlocked = True
    m = monitor(held_open_s=10.0)
    open_door(factory)
    events.wait_codes("door_opened")
    clock.advance(9.0)
    clock.advance(1.5)
    events.wait_codes("door_opened", "door_held_open")
    assert events.items[1] == ("door_held_open", {"open_s": 10.5})
    clock.advance(60.0)
    # The monitor thread stamps the (unlocked) relay each round: once the stamp shows the new
    # time, a round ran with the door still open and held-open already raised.
    assert wait_until(lambda: m.relay_seen_unlocked_at == clock())
    assert events.codes == ["door_opened", "door_held_open"]
    shut_door(factory)
    events.wait_codes("door_opened", "door_held_open", "door_closed")
    assert events.items[2] == ("door_closed", {"open_s": 70.5, "was_held_open": True})

    # The next opening has its own held-open alarm.
    open_door(factory)
    events.wait_codes("door_opened", "door_held_open", "door_closed", "door_opened")
    clock.advance(10.0)
    events.wait_codes(
        "door_opened", "door_held_open", "door_closed", "door_opened", "door_held_open"
    )


def test_held_open_on_the_real_clock(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, events: Events
) -> None:
    relay.unlocked = True
    monitor(held_open_s=0.2, monotonic=time.monotonic)
    open_door(factory)
    events.wait_codes("door_opened", "door_held_open")
    open_s = events.items[1][1]["open_s"]
    assert isinstance(open_s, float) and open_s >= 0.2
    shut_door(factory)
    events.wait_codes("door_opened", "door_held_open", "door_closed")
    assert events.items[2][1]["was_held_open"] is True


def test_closing_before_held_open_raises_no_alarm(
    factory: Any, monitor: MonitorMaker, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    relay.unlocked = True
    m = monitor(held_open_s=10.0)
    open_door(factory)
    events.wait_codes("door_opened")
    clock.advance(9.9)
    shut_door(factory)
    events.wait_codes("door_opened", "door_closed")
    clock.advance(100.0)
    # A monitor round after the long wait with the door shut: no late alarm.
    assert wait_until(lambda: m.relay_seen_unlocked_at == clock())
    assert events.codes == ["door_opened", "door_closed"]
    assert events.items[1] == ("door_closed", {"open_s": 9.9, "was_held_open": False})


def test_tamper_and_cleared(factory: Any, monitor: MonitorMaker, events: Events) -> None:
    monitor()
    factory.pin(TAMPER).drive_high()
    events.wait_codes("tamper")
    factory.pin(TAMPER).drive_low()
    events.wait_codes("tamper", "tamper_cleared")
    assert events.items == [("tamper", {}), ("tamper_cleared", {})]


def test_abnormal_states_at_start_are_recorded(
    factory: Any, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    inputs = DoorInputs(CONTACT, EXIT, TAMPER, pin_factory=factory, bounce_s=BOUNCE_S)
    try:
        # Nothing drives the lines low: door open and case open (or wires cut) at start.
        with DoorMonitor(
            inputs,
            relay_unlocked=relay.is_unlocked,
            unlock=relay.pulse,
            record=events,
            held_open_s=5.0,
            exit_unlocks=True,
            poll_s=POLL_S,
            monotonic=clock,
        ) as m:
            m.start()
            assert events.items == [
                ("door_opened", {"cause": "unknown", "at_start": True}),
                ("tamper", {"at_start": True}),
            ]
            clock.advance(5.0)
            events.wait_codes("door_opened", "tamper", "door_held_open")
            shut_door(factory)
            events.wait_codes("door_opened", "tamper", "door_held_open", "door_closed")
    finally:
        inputs.close()


def test_contact_bounce_gives_one_opened_and_one_closed(
    factory: Any, relay: FakeRelay, clock: Clock, events: Events
) -> None:
    inputs = make_inputs(factory, BURST_BOUNCE_S)
    try:
        with DoorMonitor(
            inputs,
            relay_unlocked=relay.is_unlocked,
            unlock=relay.pulse,
            record=events,
            held_open_s=30.0,
            exit_unlocks=True,
            poll_s=POLL_S,
            monotonic=clock,
        ) as m:
            m.start()
            relay.unlocked = True
            pin = factory.pin(CONTACT)
            for _ in range(30):
                pin.drive_high()
                pin.drive_low()
            pin.drive_high()
            events.wait_codes("door_opened")
            for _ in range(30):
                pin.drive_low()
                pin.drive_high()
            pin.drive_low()
            events.wait_codes("door_opened", "door_closed")
            assert inputs.contact is not None
            assert wait_until(lambda: inputs.contact is not None and not inputs.contact.settling)
            assert events.codes == ["door_opened", "door_closed"]
    finally:
        inputs.close()


def test_a_raising_record_is_logged_and_nothing_stops(
    factory: Any, monitor: MonitorMaker, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []

    def bad_record(code: str, detail: dict[str, object]) -> None:
        calls.append(code)
        raise OSError("journal full")

    with caplog.at_level(logging.ERROR, logger="firmware.doors"):
        m = monitor(record=bad_record)
        open_door(factory)
        assert wait_until(lambda: calls == ["door_opened", "door_forced_open"])
        shut_door(factory)
        factory.pin(EXIT).drive_low()
        # Two inputs, two worker threads: these two may come in either order.
        assert wait_until(lambda: sorted(calls[2:]) == ["door_closed", "exit_request"])
    assert wait_until(lambda: m.errors == 4)
    assert any("could not record door_opened" in r.getMessage() for r in caplog.records)


def test_close_is_idempotent_and_detaches(
    factory: Any, inputs: DoorInputs, monitor: MonitorMaker, events: Events
) -> None:
    m = monitor()
    m.close()
    m.close()
    assert m.closed
    assert inputs.contact is not None and inputs.contact.when_opened is None
    open_door(factory)
    factory.pin(TAMPER).drive_high()
    assert wait_until(lambda: inputs.read()["door_open"] is True)
    assert wait_until(lambda: inputs.read()["tampered"] is True)
    assert events.items == []
    with pytest.raises(RuntimeError, match="closed"):
        m.start()
    assert not any(t.name == "qrgate-doors" for t in threading.enumerate())


def test_close_without_start(inputs: DoorInputs, relay: FakeRelay, events: Events) -> None:
    m = DoorMonitor(
        inputs,
        relay_unlocked=relay.is_unlocked,
        unlock=None,
        record=events,
        held_open_s=1.0,
        exit_unlocks=True,
    )
    m.close()
    assert events.items == []


def test_only_an_exit_button_wired(factory: Any, relay: FakeRelay, events: Events) -> None:
    with (
        DoorInputs(None, EXIT, None, pin_factory=factory, bounce_s=BOUNCE_S) as inputs,
        DoorMonitor(
            inputs,
            relay_unlocked=relay.is_unlocked,
            unlock=relay.pulse,
            record=events,
            held_open_s=1.0,
            exit_unlocks=True,
        ) as m,
    ):
        m.start()
        factory.pin(EXIT).drive_low()
        events.wait_codes("exit_request")
        assert relay.pulses == 1
        assert not m.door_open


def test_bad_times(inputs: DoorInputs, relay: FakeRelay, events: Events) -> None:
    for kw in ({"held_open_s": 0}, {"grace_s": -1}, {"poll_s": 0}, {"exit_window_s": float("inf")}):
        args: dict[str, Any] = {
            "relay_unlocked": relay.is_unlocked,
            "unlock": None,
            "record": events,
            "held_open_s": 1.0,
            "exit_unlocks": False,
            **kw,
        }
        with pytest.raises(ValueError, match="seconds"):
            DoorMonitor(inputs, **args)
