"""The back office's retained desired configuration: checked, kept, applied, reported."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from firmware.demo.broker import LocalBroker
from firmware.exceptions import BadMessageError, DesiredConfigError
from firmware.uplink.desired import (
    FILE_NAME,
    Desired,
    DesiredConfig,
    load_desired,
    parse_desired,
)
from firmware.uplink.topics import Topics
from tests.firmware.test_uplink import (
    DEVICE,
    SITE,
    back_office,
    reader_config,
    running,
)

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")


def doc(version: Any, **sections: dict[str, Any]) -> bytes:
    return json.dumps({"version": version, "settings": sections}).encode()


def test_only_the_remote_settings_pass_with_the_config_files_checks() -> None:
    d = parse_desired(doc(3, policy={"repeat_window_s": 2}, gpio={"pulse_s": 4.5}))
    # typed as the config file would hold them
    assert d == Desired(3, {"policy": {"repeat_window_s": 2.0}, "gpio": {"pulse_s": 4.5}})
    refused = {
        "uplink.host cannot be set remotely": doc(4, uplink={"host": "evil.example"}),
        "section 'camera' cannot be set remotely": doc(4, camera={"fps": 5}),
        "gpio.relay_pin cannot be set remotely": doc(4, gpio={"relay_pin": 4}),
        "policy.repeat_window_s: expected a number from 0.5 to 3600": doc(
            4, policy={"repeat_window_s": 0}
        ),
        "gpio.pulse_s: expected a number": doc(4, gpio={"pulse_s": "long"}),
        "'version' must be an integer from 1": doc(0, policy={"repeat_window_s": 2}),
        # one absurd version would lock the reader out of every later document
        "'version' must be an integer from 1 to": doc(10**26, policy={"repeat_window_s": 2}),
    }
    for reason, payload in refused.items():
        with pytest.raises(DesiredConfigError, match=reason.replace("(", r"\(")):
            parse_desired(payload)
    with pytest.raises(BadMessageError, match="nested too deeply"):
        parse_desired(b"[" * 100_000)


class Recorder:
    def __init__(self) -> None:
        self.applied: list[Desired] = []
        self.reports: list[dict[str, Any]] = []


@pytest.fixture
def rec() -> Iterator[Recorder]:
    yield Recorder()


def test_versions_only_go_up_and_the_kept_file_survives_a_restart(
    tmp_path: Path, rec: Recorder
) -> None:
    dc = DesiredConfig(tmp_path, rec.applied.append, rec.reports.append)
    assert dc.offer(doc(2, gpio={"pulse_s": 5}))["state"] == "applied"
    # the broker hands the retained document again after every reconnect: applied once
    dc.offer(doc(2, gpio={"pulse_s": 5}))
    dc.offer(doc(1, gpio={"pulse_s": 9}))  # an older one never undoes a newer one
    assert [d.version for d in rec.applied] == [2]
    bad = dc.offer(doc(3, gpio={"relay_pin": 4}))
    assert bad["state"] == "refused" and bad["applied_version"] == 2
    assert "relay_pin" in bad["error"] and rec.reports[-1] == bad
    assert load_desired(tmp_path) == Desired(2, {"gpio": {"pulse_s": 5.0}})
    assert (tmp_path / FILE_NAME).stat().st_mode & 0o777 == 0o600


def test_a_damaged_kept_file_is_ignored(tmp_path: Path) -> None:
    (tmp_path / FILE_NAME).write_text('{"version": 2, "settings": {"gpio": {"pulse_s": -1}}}')
    assert load_desired(tmp_path) is None
    (tmp_path / FILE_NAME).write_bytes(b"\x00\x01garbage")
    assert load_desired(tmp_path) is None


def test_a_document_that_cannot_be_kept_is_not_applied(tmp_path: Path, rec: Recorder) -> None:
    gone = tmp_path / "no-such-folder"
    dc = DesiredConfig(gone, rec.applied.append, rec.reports.append)
    out = dc.offer(doc(2, gpio={"pulse_s": 5}))
    assert out["state"] == "refused" and "cannot keep it" in out["error"]
    assert rec.applied == []


def test_desired_config_over_mqtt_applies_live_and_stays_after_a_restart(tmp_path: Path) -> None:
    with ExitStack() as stack:
        over_mqtt(tmp_path, stack)


def over_mqtt(tmp_path: Path, stack: ExitStack) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = reader_config(tmp_path / "r", broker.port)
    topic = Topics(SITE, DEVICE).config_desired
    payload = doc(5, policy={"repeat_window_s": 7}, gpio={"pulse_s": 2.5})
    bo.paho.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def config_in_status(state: str) -> bool:
        raw = bo.latest.get(Topics(SITE, DEVICE).status)
        return raw is not None and (json.loads(raw).get("config") or {}).get("state") == state

    r = running(stack, cfg)
    r.ready()
    assert bo.wait(lambda: config_in_status("applied"))
    assert r.reader.scan.seen.window_ns == 7_000_000_000
    assert r.reader.feedback.relay.pulse_s == 2.5
    # a document is whole: what it leaves out goes back to the config file's value (0.5 s)
    whole = doc(6, gpio={"pulse_s": 4})
    bo.paho.publish(topic, whole, qos=1, retain=True).wait_for_publish(10)
    assert bo.wait(lambda: r.reader.feedback.relay.pulse_s == 4.0)
    assert r.reader.scan.seen.window_ns == 500_000_000
    payload = doc(7, policy={"repeat_window_s": 7}, gpio={"pulse_s": 2.5})
    bo.paho.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    assert bo.wait(lambda: r.reader.scan.seen.window_ns == 7_000_000_000)
    # a refused one leaves the settings as they were and says why in the status
    bad = doc(8, uplink={"host": "elsewhere"})
    bo.paho.publish(topic, bad, qos=1, retain=True).wait_for_publish(10)
    assert bo.wait(lambda: config_in_status("refused"))
    status = json.loads(bo.latest[Topics(SITE, DEVICE).status])["config"]
    assert status["version"] == 8 and status["applied_version"] == 7
    assert r.reader.scan.seen.window_ns == 7_000_000_000
    r.stop()
    # a restart without the broker keeps the applied settings
    broker.stop()
    again = running(stack, cfg)
    assert again.reader.scan.seen.window_ns == 7_000_000_000
    assert again.reader.feedback.relay.pulse_s == 2.5
    assert again.reader.config.policy.repeat_window_s == 7.0
