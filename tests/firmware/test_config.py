"""Config: TOML validated at start; errors name file, key, expected and found."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware.cli import main
from firmware.config import load_config
from firmware.exceptions import ConfigError

GOOD = """
[reader]
door = "lobby"
direction = "in"
state_dir = "state"

[camera]
source = "replay"
path = "reel"
fps = 15

[decoder]
backend = "cascade"

[policy]
repeat_window_s = 2.5

[gpio]
pin_factory = "mock"
relay_pin = 17
relay_active_high = false
strike = "fail-safe"
led = { red = 5, green = 6 }
buzzer_pin = 12

[journal]
fsync_interval_ms = 50
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "qrgate.toml"
    f.write_text(text)
    return f


def test_good_config_resolves_relative_paths(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, GOOD))
    assert c.reader.door == "lobby" and c.reader.state_dir == tmp_path / "state"
    assert c.camera.path == tmp_path / "reel" and c.camera.fps == 15
    assert c.decoder.backend == "cascade" and c.policy.repeat_window_s == 2.5
    assert c.gpio.relay_active_high is False and c.gpio.strike == "fail-safe"
    assert dict(c.gpio.led) == {"red": 5, "green": 6}
    assert c.journal_path == tmp_path / "state" / "journal.db"
    assert c.journal.fsync_interval_ms == 50


@pytest.mark.parametrize(
    "patch, key, expected, found",
    [
        (("fps = 15", 'fps = "fast"'), "camera.fps", "a number from 0 to 240", "string 'fast'"),
        (("fps = 15", "fps = 1000"), "camera.fps", "a number from 0 to 240", "number 1000"),
        (
            ('backend = "cascade"', 'backend = "opencv"'),
            "decoder.backend",
            "'zxing-cpp'",
            "string 'opencv'",
        ),
        (
            ("relay_pin = 17", "relay_pin = 5"),
            "gpio",
            "a pin of its own",
            "gpio.relay_pin and gpio.led.red use 5",
        ),
        (
            ("fsync_interval_ms = 50", "fsync_interval_ms = 50\n[doors]\nexit_pin = 12"),
            "gpio",
            "a pin of its own",
            "gpio.buzzer_pin and doors.exit_pin use 12",
        ),
        (("relay_pin = 17", "relay_pn = 17"), "gpio.relay_pn", "known keys", "an unknown key"),
        (
            ("led = { red = 5, green = 6 }", "led = { red = 5 }"),
            "gpio.led",
            "{red, green}",
            "a table",
        ),
        (
            ("relay_active_high = false", 'relay_active_high = "no"'),
            "gpio.relay_active_high",
            "true or false",
            "string 'no'",
        ),
        (("[journal]", "[jornal]"), "jornal", "known keys", "an unknown key"),
        (('path = "reel"', ""), "camera.path", "a folder, image or video", "nothing"),
    ],
)
def test_bad_values_named(
    tmp_path: Path, patch: tuple[str, str], key: str, expected: str, found: str
) -> None:
    f = write(tmp_path, GOOD.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.file == str(f) and e.value.key == key
    assert expected in e.value.expected and found in e.value.found
    assert str(f) in str(e.value)


def test_broken_toml_names_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[camera\nsource = 1"))
    assert e.value.expected == "valid TOML" and "line 1" in e.value.found


def test_binary_and_missing_files(tmp_path: Path) -> None:
    f = tmp_path / "bin.toml"
    f.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(f)
    with pytest.raises(ConfigError, match="readable TOML file"):
        load_config(tmp_path / "missing.toml")


def test_badges_without_key_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, GOOD.replace("[policy]", '[policy]\nbadges = "b.json"')))
    assert e.value.key == "policy.hmac_key"


def test_config_check_cli(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["config", "check", str(write(tmp_path, GOOD))])
    assert r.exit_code == 0 and "door 'lobby'" in r.output
    bad = write(tmp_path, GOOD.replace("fps = 15", "fps = -1"))
    r = CliRunner().invoke(main, ["config", "check", str(bad)])
    assert r.exit_code == 2 and "camera.fps" in r.output


def test_config_check_loads_the_uplink_tls_files(tmp_path: Path) -> None:
    from firmware.demo.broker import make_test_pki

    pki = make_test_pki(tmp_path / "pki")
    assert pki.client_cert is not None and pki.client_key is not None
    uplink = (
        '\n[uplink]\nenabled = true\nhost = "broker.example"\ntransport = "tls"\n'
        f'ca = "{pki.ca_cert}"\ncert = "{pki.client_cert}"\nkey = "{pki.client_key}"\n'
    )
    good = write(tmp_path, GOOD + uplink)
    r = CliRunner().invoke(main, ["config", "check", str(good)])
    assert r.exit_code == 0, r.output
    # a key that does not belong to the certificate, and a CA file that is no certificate
    swapped = write(tmp_path, GOOD + uplink.replace(str(pki.client_key), str(pki.server_key)))
    r = CliRunner().invoke(main, ["config", "check", str(swapped)])
    assert r.exit_code == 2 and "uplink.cert" in r.output
    not_ca = write(tmp_path, GOOD + uplink.replace(str(pki.ca_cert), str(pki.server_key)))
    r = CliRunner().invoke(main, ["config", "check", str(not_ca)])
    assert r.exit_code == 2 and "uplink.ca" in r.output
    # an encrypted key: refused with the reason, never a passphrase prompt (nobody answers)
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_private_key(pki.client_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    locked = write(tmp_path, GOOD + uplink.replace(str(pki.client_key), str(encrypted)))
    r = CliRunner().invoke(main, ["config", "check", str(locked)], input="")
    assert r.exit_code == 2 and "an encrypted key" in r.output, r.output


PROVISIONING = """
[provisioning]
public_key = "keys/provisioning.pub.pem"
fleet = "acme"
ca = "/etc/qrgate/fleet-ca.crt"
enroll_port = 9884
enroll_user = "enroll-lobby"
enroll_password_file = "enroll.password"
"""


def test_provisioning_section_defaults_and_relative_paths(tmp_path: Path) -> None:
    d = load_config(write(tmp_path, GOOD)).provisioning
    assert (d.public_key, d.fleet, d.ca) == (None, "default", None)
    assert (d.enroll_port, d.enroll_user, d.enroll_password_file) == (8884, "enroll", None)
    c = load_config(write(tmp_path, GOOD + PROVISIONING)).provisioning
    assert c.public_key == tmp_path / "keys" / "provisioning.pub.pem"
    assert c.fleet == "acme" and c.ca == Path("/etc/qrgate/fleet-ca.crt")
    assert c.enroll_port == 9884 and c.enroll_user == "enroll-lobby"
    assert c.enroll_password_file == tmp_path / "enroll.password"


@pytest.mark.parametrize(
    "patch, key, expected, found",
    [
        (('fleet = "acme"', 'fleet = "acme corp"'), "fleet", "a fleet id", "string 'acme corp'"),
        (('fleet = "acme"', 'fleet = ""'), "fleet", "a fleet id", "string ''"),
        (("enroll_port = 9884", "enroll_port = 0"), "enroll_port", "1 to 65535", "number 0"),
        (('enroll_user = "enroll-lobby"', "enroll_user = 7"), "enroll_user", "printable", "7"),
        (('ca = "/etc/qrgate/fleet-ca.crt"', "ca = 1"), "ca", "a path string", "number 1"),
        (('fleet = "acme"', 'fleet = "acme"\nfleat = "x"'), "fleat", "known keys", "unknown"),
    ],
)
def test_provisioning_bad_values_named(
    tmp_path: Path, patch: tuple[str, str], key: str, expected: str, found: str
) -> None:
    f = write(tmp_path, GOOD + PROVISIONING.replace(*patch))
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.key == f"provisioning.{key}"
    assert expected in e.value.expected and found in e.value.found
