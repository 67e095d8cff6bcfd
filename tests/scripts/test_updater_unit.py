"""scripts/qrgate-updater.service: the keys the updater relies on (root, but only the paths
it writes are writable and only one capability is left), systemd's own checks, and a security
exposure of at most 2.5 from `systemd-analyze security --offline` (measured 2.3: it may read
adjtimex, see the unit)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import click

from firmware.cli import main
from firmware.ota_agent import ota_agent_command
from tests.scripts.test_unit import (
    INSTALLED_QRGATE,
    one,
    parse_unit,
    security_exposure,
    systemd_analyze,
)

UNIT = Path(__file__).resolve().parents[2] / "scripts" / "qrgate-updater.service"
MAX_EXPOSURE = 2.5


def test_unit_keys() -> None:
    unit = parse_unit(UNIT)
    service = {
        "ExecStart": f"{INSTALLED_QRGATE} ota agent --config /etc/qrgate/qrgate.toml",
        "User": "root",
        "Restart": "always",
        "RestartPreventExitStatus": "2",
        "StateDirectory": "qrgate-updater",
        "WorkingDirectory": "/var/lib/qrgate-updater",
        # release venvs must be readable by the qrgate user
        "UMask": "0022",
        "CapabilityBoundingSet": "CAP_DAC_READ_SEARCH",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
    }
    assert {k: one(unit, "Service", k) for k in service} == service
    writable = set(one(unit, "Service", "ReadWritePaths").split())
    assert writable == {"/opt/qrgate", "/var/lib/qrgate-updater"}
    assert one(unit, "Install", "WantedBy") == "multi-user.target"
    assert "network-online.target" not in " ".join(unit["Unit"].get("After", []))


def test_exec_start_is_the_agent_command() -> None:
    argv = shlex.split(one(parse_unit(UNIT), "Service", "ExecStart"))
    assert argv[:3] == [INSTALLED_QRGATE, "ota", "agent"]
    assert argv[3] == "--config"
    # the unit's command line resolves through the real CLI to the agent's command
    ctx = click.Context(main)
    group = main.get_command(ctx, argv[1])
    assert isinstance(group, click.Group)
    command = group.get_command(ctx, argv[2])
    assert command is ota_agent_command
    assert any("--config" in p.opts for p in command.params)


def test_systemd_security_exposure(tmp_path: Path) -> None:
    assert security_exposure(UNIT, tmp_path) <= MAX_EXPOSURE


def test_systemd_verify(tmp_path: Path) -> None:
    analyze = systemd_analyze()
    program = tmp_path / "qrgate"
    program.write_text("#!/bin/sh\nexit 0\n")
    program.chmod(0o755)
    (tmp_path / UNIT.name).write_text(UNIT.read_text().replace(INSTALLED_QRGATE, str(program)))
    r = subprocess.run(
        [analyze, "verify", str(tmp_path / UNIT.name)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (r.returncode, r.stderr) == (0, "")
