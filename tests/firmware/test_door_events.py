"""Door inputs through the whole reader: mock pins → DoorMonitor → journal rows of kind
"door" → MQTT events at a real mosquitto; the exit button pulses the real relay."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from drivers.pins import make_pin_factory
from firmware.daemon import build_reader
from firmware.demo.broker import LocalBroker
from firmware.journal.reader import JournalReader
from tests.firmware.test_uplink import DEVICE, WAIT_S, back_office, reader_config
from tests.polling import wait_until

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")

CONTACT, EXIT, TAMPER = 22, 23, 24
DOORS = f"""
[doors]
contact_pin = {CONTACT}
exit_pin = {EXIT}
tamper_pin = {TAMPER}
bounce_ms = 10
held_open_s = 1
grace_s = 0.3
"""


def door_rows(journal: Path) -> list[tuple[str, dict[str, Any]]]:
    return [
        (s.event.reason, s.event.detail)
        for s in JournalReader(journal).tail(1000)
        if s.event.kind == "door"
    ]


def test_door_events_are_journaled_and_published(tmp_path: Path, stack: ExitStack) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port, extra="")
    toml = tmp_path / "r" / "qrgate.toml"
    toml.write_text(toml.read_text() + DOORS)
    from firmware.config import load_config

    cfg = load_config(toml)
    factory = make_pin_factory("mock")
    reader = build_reader(
        cfg,
        pin_factory=factory,
        source=_still_camera(),
        clock_synced=lambda: False,
        device_id=DEVICE,
    )
    stack.callback(reader.stop)
    # the door is shut and the case closed: circuits closed, the pulled-up lines low
    factory.pin(CONTACT).drive_low()
    factory.pin(TAMPER).drive_low()
    inputs = reader.door_inputs
    assert inputs is not None
    assert wait_until(
        lambda: inputs.read() == {"door_open": False, "exit_pressed": False, "tampered": False},
        WAIT_S,
    )
    reader.start()
    relay = reader.feedback.relay
    assert reader.doors is not None and not reader.doors.door_open
    # the exit button: the relay pulses, then the door opens and closes: an exit, no alarm
    factory.pin(EXIT).drive_low()
    assert wait_until(lambda: relay.pulse_count == 1, WAIT_S)
    factory.pin(EXIT).drive_high()
    factory.pin(CONTACT).drive_high()
    assert wait_until(lambda: reader.doors is not None and reader.doors.door_open, WAIT_S)
    factory.pin(CONTACT).drive_low()
    assert relay.wait_locked(WAIT_S)
    # later, the door forced and left open past held_open_s; the case opened
    assert wait_until(lambda: len(door_rows(cfg.journal_path)) >= 3, WAIT_S)
    # past the grace after the relay locked again: a later opening is forced
    assert wait_until(
        lambda: (
            reader.doors is not None
            and reader.doors.relay_seen_unlocked_at is not None
            and time.monotonic() - reader.doors.relay_seen_unlocked_at > 0.5
        ),
        WAIT_S,
    )
    factory.pin(CONTACT).drive_high()
    assert wait_until(
        lambda: "door_held_open" in [c for c, _ in door_rows(cfg.journal_path)], WAIT_S
    )
    factory.pin(CONTACT).drive_low()
    assert wait_until(lambda: reader.doors is not None and not reader.doors.door_open, WAIT_S)
    factory.pin(TAMPER).drive_high()
    want = [
        "exit_request",
        "door_opened",
        "door_closed",
        "door_opened",
        "door_forced_open",
        "door_held_open",
        "door_closed",
        "tamper",
    ]
    assert wait_until(lambda: len(door_rows(cfg.journal_path)) >= len(want), 5), door_rows(
        cfg.journal_path
    )
    rows = door_rows(cfg.journal_path)
    assert [c for c, _ in rows] == want
    assert rows[0][1] == {"unlocked": True}
    assert rows[1][1] == {"cause": "exit_request"}
    assert rows[3][1] == {"cause": "forced"}
    assert rows[6][1]["was_held_open"] is True
    # every one of them reached the back office as an event of kind "door"
    assert bo.wait(
        lambda: (
            sorted(e["reason"] for e in bo.events.values() if e["kind"] == "door") == sorted(want)
        )
    )
    assert relay.pulse_count == 1 and not relay.is_energised


def _still_camera() -> Any:
    from tests.firmware.test_uplink import FeedSource

    return FeedSource()
