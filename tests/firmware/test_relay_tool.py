"""``qrgate relay off`` (the unit's ExecStopPost) on mock pins, through click's CliRunner."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import drivers.pins
from drivers.pins import make_pin_factory
from firmware.lock import InstanceLock
from firmware.tools.relay import relay

pytestmark = pytest.mark.usefixtures("no_leaks")


def write_config(tmp_path: Path, gpio: str = "") -> Path:
    (tmp_path / "reel.png").write_bytes(b"")  # never opened: relay off touches no camera
    cfg = tmp_path / "qrgate.toml"
    cfg.write_text(
        f'[reader]\nstate_dir = "{tmp_path / "state"}"\n'
        '[camera]\nsource = "replay"\npath = "reel.png"\n'
        f'[gpio]\npin_factory = "mock"\nrelay_pin = 17\n{gpio}'
    )
    return cfg


class _KeptFactory:
    """The mock factory the command makes, kept open after its close() so the test can read
    the pin the relay left behind."""

    def __init__(self, factory: Any) -> None:
        self.factory = factory

    def __getattr__(self, name: str) -> Any:
        return getattr(self.factory, name)

    def close(self) -> None:
        pass


@pytest.fixture
def pins(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    factory = make_pin_factory("mock")
    made: list[str] = []

    def make(name: str) -> Any:
        made.append(name)
        return _KeptFactory(factory)

    monkeypatch.setattr(drivers.pins, "make_pin_factory", make)
    yield factory, made
    factory.close()


def _stuck_energised(factory: Any, pin: int, level: bool) -> Any:
    """The line as a killed daemon may leave it: an output held at ``level``."""
    p = factory.pin(pin)
    p.function = "output"
    p.state = level
    return p


def test_relay_off_de_energises_a_stuck_fail_secure_relay(tmp_path: Path, pins: Any) -> None:
    factory, made = pins
    line = _stuck_energised(factory, 17, True)
    r = CliRunner().invoke(relay, ["off", "--config", str(write_config(tmp_path))])
    assert r.exit_code == 0, r.output
    assert made == ["mock"]
    assert r.output == "relay on GPIO17 de-energised: the door is locked\n"
    assert line.state == 0  # active-high board: low is de-energised
    assert line.function == "input"  # released


def test_relay_off_active_low_board(tmp_path: Path, pins: Any) -> None:
    factory, _ = pins
    line = _stuck_energised(factory, 17, False)  # low energises an active-low board
    cfg = write_config(tmp_path, "relay_active_high = false\n")
    r = CliRunner().invoke(relay, ["off", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert line.state == 1


def test_relay_off_fail_safe_says_the_lock_opens(tmp_path: Path, pins: Any) -> None:
    cfg = write_config(tmp_path, 'strike = "fail-safe"\n')
    r = CliRunner().invoke(relay, ["off", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "released: the fail-safe lock opens" in r.output


def test_relay_off_with_the_real_mock_factory(tmp_path: Path) -> None:
    r = CliRunner().invoke(relay, ["off", "--config", str(write_config(tmp_path))])
    assert r.exit_code == 0, r.output
    assert r.output == "relay on GPIO17 de-energised: the door is locked\n"


def test_relay_off_refuses_while_the_daemon_holds_the_lock(tmp_path: Path, pins: Any) -> None:
    factory, made = pins
    cfg = write_config(tmp_path)
    line = _stuck_energised(factory, 17, True)
    with InstanceLock(tmp_path / "state" / "qrgate.lock"):
        r = CliRunner().invoke(relay, ["off", "--config", str(cfg)])
    assert r.exit_code == 1
    assert "the reader service is running: stop it first" in r.output
    assert made == []  # no pin factory, no line touched
    assert line.state == 1


def test_relay_off_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text(write_config(tmp_path).read_text().replace("relay_pin = 17", "relay_pin = 'x'"))
    r = CliRunner().invoke(relay, ["off", "--config", str(bad)])
    assert r.exit_code == 2
    assert "relay_pin" in r.output


def test_relay_off_works_past_a_mistake_in_another_section(tmp_path: Path, pins: Any) -> None:
    factory, _ = pins
    line = _stuck_energised(factory, 17, True)
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text() + "[doors]\ncontact_pin = 99\n")
    r = CliRunner().invoke(relay, ["off", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "contact_pin" in r.output and "using its [reader] and [gpio] only" in r.output
    assert line.state == 0
