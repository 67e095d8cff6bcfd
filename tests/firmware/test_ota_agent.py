"""firmware/ota_agent.py, the updater service's composition: config errors exit 2 naming the
key, and a config with [ota] and [uplink] gives an agent whose updater carries the config's
values and whose broker session (the reader's [uplink] settings, its own client id) comes up
against a real mosquitto."""

from __future__ import annotations

import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware.cli import main as cli_main
from firmware.config import load_config
from firmware.demo.broker import LocalBroker
from firmware.ota_agent import build_agent, ota_agent_command
from ota.health import ActivityFile, SystemdSupervisor
from ota.repository import init_repository, trusted_root
from ota.updater import Updater
from tests.firmware.conftest import need_mosquitto, no_leaks, stack
from tests.polling import wait_until

__all__ = ["need_mosquitto", "no_leaks", "stack"]

BASE = """
[camera]
source = "v4l2"
"""


def real_root(tmp_path: Path) -> None:
    """A release engineer's 1.root.json as ``tmp_path/root.json``."""
    init_repository(tmp_path / "repo", tmp_path / "keys")
    (tmp_path / "root.json").write_bytes(trusted_root(tmp_path / "repo"))


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "qrgate.toml"
    f.write_text(BASE + text)
    return f


def test_no_repository_url_is_a_config_error(tmp_path: Path) -> None:
    r = CliRunner().invoke(ota_agent_command, ["--config", str(write(tmp_path, ""))])
    assert r.exit_code == 2
    assert "[ota.repo_url] expected the TUF repository's http(s) URL, found nothing" in r.output


def test_an_unreadable_trusted_root_is_a_config_error(tmp_path: Path) -> None:
    text = '[ota]\nrepo_url = "http://127.0.0.1:9/repo"\ntrusted_root = "missing.json"\n'
    r = CliRunner().invoke(ota_agent_command, ["--config", str(write(tmp_path, text))])
    assert r.exit_code == 2
    assert "[ota.trusted_root] expected a readable TUF root.json" in r.output


@pytest.mark.parametrize("content", [b"", b"{}", b"not json", b'{"signed": {"_type": "targets"}}'])
def test_a_trusted_root_that_is_not_tuf_root_metadata_is_a_config_error(
    tmp_path: Path, content: bytes
) -> None:
    (tmp_path / "root.json").write_bytes(content)
    text = '[ota]\nrepo_url = "http://127.0.0.1:9/repo"\ntrusted_root = "root.json"\n'
    config = write(tmp_path, text)
    for command in (ota_agent_command, cli_main):
        args = (
            ["--config", str(config)]
            if command is ota_agent_command
            else ["config", "check", str(config)]
        )
        r = CliRunner().invoke(command, args)
        assert r.exit_code == 2, r.output
        assert "[ota.trusted_root] expected a readable TUF root.json" in r.output
        assert "not a TUF root.json" in r.output


def test_config_check_says_where_updates_come_from(tmp_path: Path) -> None:
    real_root(tmp_path)
    text = '[ota]\nrepo_url = "http://127.0.0.1:9/repo"\ntrusted_root = "root.json"\n'
    r = CliRunner().invoke(cli_main, ["config", "check", str(write(tmp_path, text))])
    assert r.exit_code == 0, r.output
    assert r.output.rstrip().endswith("updates from http://127.0.0.1:9/repo")


def test_uplink_off_is_a_config_error(tmp_path: Path) -> None:
    real_root(tmp_path)
    text = (
        '[ota]\nrepo_url = "http://127.0.0.1:9/repo"\ntrusted_root = "root.json"\n'
        'device_type = "rpi5"\n'
    )
    r = CliRunner().invoke(ota_agent_command, ["--config", str(write(tmp_path, text))])
    assert r.exit_code == 2
    assert "[uplink.enabled] expected true" in r.output


@pytest.mark.usefixtures("no_leaks", "need_mosquitto")
def test_the_agent_is_wired_from_the_config_and_reaches_the_broker(
    tmp_path: Path, stack: ExitStack
) -> None:
    broker = LocalBroker(tmp_path / "broker")
    broker.start()
    stack.callback(broker.stop)
    real_root(tmp_path)
    config = load_config(
        write(
            tmp_path,
            f"""
[uplink]
enabled = true
host = "127.0.0.1"
port = {broker.port}
site = "hq"
reconnect_min_s = 0.1
reconnect_max_s = 1

[ota]
repo_url = "http://127.0.0.1:9/repo"
trusted_root = "root.json"
install_root = "opt"
state_dir = "updater"
device_type = "rpi4"
keep = 2
health_deadline_s = 30
quiet_s = 7
activity_file = "run/activity.json"
""",
        )
    )
    agent = build_agent(config, device="reader-7")
    updater = agent.updater
    assert isinstance(updater, Updater)
    assert (updater.device_type, updater.keep, updater.health_deadline_s) == ("rpi4", 2, 30.0)
    assert updater.releases.root == tmp_path / "opt"
    assert isinstance(updater.supervisor, SystemdSupervisor)
    assert updater.supervisor.unit == "qrgate.service"
    assert isinstance(updater.activity, ActivityFile)
    assert updater.activity.path == tmp_path / "run" / "activity.json"
    assert updater.activity.quiet_ns == 7_000_000_000
    assert agent.topics.job == "qrgate/v1/hq/reader-7/ota/job"
    assert (tmp_path / "updater").stat().st_mode & 0o777 == 0o700

    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), name="test-ota-agent")
    thread.start()
    try:
        # connected and subscribed with the reader's settings; no job was interrupted
        assert wait_until(lambda: agent.stats.sessions == 1)
        assert agent.stats.connect_failures == 0
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert "qrgate-reader-7-updater" in broker.log_path.read_text()
