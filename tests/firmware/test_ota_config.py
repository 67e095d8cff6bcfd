"""The [ota] config section: defaults, relative paths, every key's bounds named in the error,
and the device type read from the device tree when the config does not say."""

from __future__ import annotations

from pathlib import Path

import pytest

from firmware.config import OtaConfig, load_config, parse_config
from firmware.exceptions import ConfigError
from firmware.ota_agent import detect_device_type

OTA = """
[camera]
source = "v4l2"

[ota]
repo_url = "https://updates.example.org/qrgate/"
trusted_root = "ota-root.json"
install_root = "/srv/qrgate"
state_dir = "updater"
device_type = "rpi5"
keep = 4
health_deadline_s = 90
quiet_s = 8.5
activity_file = "/run/qrgate-test/activity.json"
max_bundle_mb = 300
clock_wait_s = 600
"""


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "qrgate.toml"
    f.write_text(text)
    return f


def test_defaults_without_the_section() -> None:
    c = parse_config({"camera": {"source": "v4l2"}}).ota
    assert c == OtaConfig()
    assert c.repo_url == "" and c.device_type is None
    assert c.trusted_root == Path("/etc/qrgate/ota-root.json")
    assert c.install_root == Path("/opt/qrgate")
    assert c.state_dir == Path("/var/lib/qrgate-updater")
    assert c.activity_file == Path("/run/qrgate/activity.json")
    assert (c.keep, c.health_deadline_s, c.quiet_s, c.max_bundle_mb) == (3, 120.0, 5.0, 400)
    assert c.clock_wait_s == 3600.0


def test_every_key_read_and_relative_paths_resolved(tmp_path: Path) -> None:
    c = load_config(write(tmp_path, OTA)).ota
    assert c == OtaConfig(
        repo_url="https://updates.example.org/qrgate",  # trailing slash dropped
        trusted_root=tmp_path / "ota-root.json",
        install_root=Path("/srv/qrgate"),
        state_dir=tmp_path / "updater",
        device_type="rpi5",
        keep=4,
        health_deadline_s=90.0,
        quiet_s=8.5,
        activity_file=Path("/run/qrgate-test/activity.json"),
        max_bundle_mb=300,
        clock_wait_s=600.0,
    )


@pytest.mark.parametrize(
    ("patch", "key", "expected", "found"),
    [
        (("https://updates", "ftp://updates"), "repo_url", "http:// or https://", "ftp://"),
        (('"https://updates.example.org/qrgate/"', '"updates.example.org"'), "repo_url",
         "URL", "string"),
        (('"https://updates.example.org/qrgate/"', '"https:///x"'), "repo_url", "URL", "https"),
        (('"https://updates.example.org/qrgate/"', "1"), "repo_url", "URL", "number 1"),
        (('trusted_root = "ota-root.json"', "trusted_root = true"), "trusted_root",
         "a path string", "boolean true"),
        (('"rpi5"', '"rpi3"'), "device_type", "'rpi4', 'rpi5'", "string 'rpi3'"),
        (("keep = 4", "keep = 0"), "keep", "an integer from 1 to 20", "number 0"),
        (("keep = 4", "keep = 2.5"), "keep", "an integer", "number 2.5"),
        (("health_deadline_s = 90", "health_deadline_s = 5"), "health_deadline_s",
         "from 10 to 3600", "number 5"),
        (("quiet_s = 8.5", "quiet_s = -1"), "quiet_s", "from 0 to 600", "number -1"),
        (("max_bundle_mb = 300", "max_bundle_mb = 5000"), "max_bundle_mb", "from 1 to 4096",
         "number 5000"),
        (("clock_wait_s = 600", 'clock_wait_s = "1h"'), "clock_wait_s", "a number",
         "string '1h'"),
        (('state_dir = "updater"', 'state_dir = "/srv/qrgate"'), "state_dir",
         "other than ota.install_root", "/srv/qrgate"),
        (("keep = 4", "keep = 4\nkeeep = 5"), "keeep", "known keys", "an unknown key"),
    ],
)  # fmt: skip
def test_bad_values_named(
    tmp_path: Path, patch: tuple[str, str], key: str, expected: str, found: str
) -> None:
    text = OTA.replace(*patch)
    assert text != OTA
    f = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert e.value.file == str(f) and e.value.key == f"ota.{key}"
    assert expected in e.value.expected and found in e.value.found


@pytest.mark.parametrize(
    ("model", "device_type"),
    [
        (b"Raspberry Pi 5 Model B Rev 1.0\x00", "rpi5"),
        (b"Raspberry Pi Compute Module 5 Rev 1.0\x00", "rpi5"),
        (b"Raspberry Pi 500 Rev 1.0\x00", "rpi5"),
        (b"Raspberry Pi 4 Model B Rev 1.5\x00", "rpi4"),
        (b"Raspberry Pi 400 Rev 1.0\x00", "rpi4"),
        (b"Raspberry Pi Compute Module 4 Rev 1.1\x00", "rpi4"),
    ],
)
def test_device_type_from_the_device_tree(tmp_path: Path, model: bytes, device_type: str) -> None:
    f = tmp_path / "model"
    f.write_bytes(model)
    assert detect_device_type(f) == device_type


@pytest.mark.parametrize("model", [b"Raspberry Pi 3 Model B Plus Rev 1.3\x00", b"", None])
def test_unknown_board_asks_for_the_key(tmp_path: Path, model: bytes | None) -> None:
    f = tmp_path / "model"
    if model is not None:
        f.write_bytes(model)
    with pytest.raises(ConfigError) as e:
        detect_device_type(f)
    assert e.value.key == "ota.device_type" and "'rpi4' or 'rpi5'" in e.value.expected
