"""The device id from the hardware (provisioning.identity) and ``qrgate identity``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

import firmware.exceptions
import firmware.uplink.identity
from firmware.tools.identity import identity
from provisioning import identity as ident
from provisioning.device import DeviceKeys, identity_dir
from provisioning.exceptions import DeviceIdentityError, ProvisioningError
from tests.provisioning.test_device import SmallCa


def sources(tmp_path: Path) -> dict[str, Path]:
    return {
        "devicetree": tmp_path / "serial-number",
        "cpuinfo": tmp_path / "cpuinfo",
        "machine_id": tmp_path / "machine-id",
    }


def test_sources_in_order_board_serial_then_cpuinfo_then_machine_id(tmp_path: Path) -> None:
    paths = sources(tmp_path)
    paths["machine_id"].write_text("3D1219C7C4C5404AAA1F6D2A48ADFDA4\n")
    assert ident.device_id_source(**paths) == (
        "3d1219c7c4c5404aaa1f6d2a48adfda4",
        str(paths["machine_id"]),
    )
    paths["cpuinfo"].write_text(
        "processor\t: 0\nHardware\t: BCM2835\nRevision\t: c03111\nSerial\t\t: 00000000DEADBEEF\n"
        "Model\t\t: Raspberry Pi 4 Model B Rev 1.1\n"
    )
    assert ident.device_id_source(**paths) == (
        "00000000deadbeef",
        f"{paths['cpuinfo']} Serial",
    )
    paths["devicetree"].write_bytes(b"10000000a1b2c3d4\x00")  # as the kernel gives it
    assert ident.device_id_source(**paths) == (
        "10000000a1b2c3d4",
        str(paths["devicetree"]),
    )
    assert ident.device_id(**paths) == "10000000a1b2c3d4"


def test_unusable_values_are_skipped(tmp_path: Path) -> None:
    paths = sources(tmp_path)
    paths["devicetree"].write_bytes(b"0000000000000000\x00")  # a board that reports none
    paths["cpuinfo"].write_text("Serial\t\t: 0000000000000000\n")
    paths["machine_id"].write_text("ab/+#\n")  # would break a topic
    with pytest.raises(DeviceIdentityError) as e:
        ident.device_id(**paths)
    assert str(e.value) == (
        f"no device id: tried {paths['devicetree']} (unusable), {paths['cpuinfo']} Serial "
        f"(unusable), {paths['machine_id']} (unusable)"
    )
    paths["machine_id"].write_text("0123456789abcdef0123456789abcdef\n")
    assert ident.device_id(**paths) == "0123456789abcdef0123456789abcdef"


def test_missing_sources_are_named(tmp_path: Path) -> None:
    paths = sources(tmp_path)
    with pytest.raises(DeviceIdentityError, match=r"serial-number \(absent\).*machine-id \(absent"):
        ident.device_id(**paths)


def test_is_device_id() -> None:
    assert ident.is_device_id("10000000a1b2c3d4")
    assert ident.is_device_id("door-1_a")
    for bad in ("", "abc", "Door1", "a/b1", "a+bc", "-abc", "a" * 65, "abcd\n"):
        assert not ident.is_device_id(bad), bad


def test_firmware_names_are_the_provisioning_ones() -> None:
    # one function and one class: firmware's `except DeviceIdentityError` catches what
    # provisioning raises
    assert firmware.uplink.identity.device_id is ident.device_id
    assert firmware.uplink.identity.device_id_source is ident.device_id_source
    assert firmware.exceptions.DeviceIdentityError is DeviceIdentityError
    assert issubclass(DeviceIdentityError, ProvisioningError)
    assert firmware.uplink.identity.client_id("10000000a1b2c3d4") == "qrgate-10000000a1b2c3d4"
    with pytest.raises(firmware.exceptions.DeviceIdentityError):
        raise DeviceIdentityError("caught under its firmware name")


def this_machine() -> tuple[str | None, str | None, str | None]:
    """(id, source, error) as the hardware of the machine running the tests gives them."""
    try:
        device, source = ident.device_id_source()
    except DeviceIdentityError as e:
        return None, None, str(e)
    return device, source, None


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "qrgate.toml"
    cfg.write_text(
        f'[reader]\nstate_dir = "{tmp_path / "state"}"\n'
        '[camera]\nsource = "replay"\npath = "reel.png"\n'
    )
    return cfg


def test_identity_command_without_config_prints_the_device_id(tmp_path: Path) -> None:
    device, source, error = this_machine()
    r = CliRunner().invoke(identity, ["--json"])
    doc = json.loads(r.stdout)
    assert doc == {
        "device_id": device,
        "device_id_source": source,
        "device_id_error": error,
        "identity": None,
    }
    assert r.exit_code == (0 if device else 1)
    text = CliRunner().invoke(identity, [])
    if device:
        assert text.stdout.splitlines()[0] == f"device id      {device}  (from {source})"
    else:
        assert text.stdout.splitlines()[0] == f"device id      unknown: {error}"


def test_identity_command_shows_key_and_certificate(tmp_path: Path) -> None:
    device, _, _ = this_machine()
    if device is None:
        pytest.fail("this machine gives no device id; the test needs one (write /etc/machine-id)")
    cfg = write_config(tmp_path)
    keys = DeviceKeys(identity_dir(tmp_path / "state"))

    r = CliRunner().invoke(identity, ["--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    status = json.loads(r.stdout)["identity"]
    assert status["state"] == "not enrolled"
    assert status["folder"] == str(keys.folder)
    assert (
        f"{keys.folder}: not enrolled"
        in CliRunner().invoke(identity, ["--config", str(cfg)]).stdout
    )

    fingerprint = keys.create_key()
    ca = SmallCa()
    keys.store_certificate(ca.sign(keys.make_csr(device)), ca.pem, device_id=device)
    r = CliRunner().invoke(identity, ["--config", str(cfg), "--json"])
    assert r.exit_code == 0, r.output
    status = json.loads(r.stdout)["identity"]
    assert status["state"] == "enrolled"
    assert status["key_fingerprint"] == fingerprint
    assert status["certificate"]["subject"] == f"CN={device}"
    assert status["certificate"]["matches_device"] is True
    assert status["certificate"]["not_after"] == "2028-11-30T00:00:00+00:00"
    lines = CliRunner().invoke(identity, ["--config", str(cfg)]).stdout.splitlines()
    assert lines[1:] == [
        f"identity       {keys.folder}: enrolled",
        f"key            ECDSA P-256, SHA-256 {fingerprint}",
        f"certificate    CN={device}, serial 1234abcd",
        "  issued by    CN=qrgate test issuing CA",
        "  valid        2026-12-01T00:00:00+00:00 to 2028-11-30T00:00:00+00:00",
    ]


def test_identity_command_bad_config_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[reader\n")
    r = CliRunner().invoke(identity, ["--config", str(bad)])
    assert r.exit_code == 2
    assert r.stderr.startswith("qrgate identity: ")
