"""``qrgate factory-reset`` through click's CliRunner, on a state folder filled by the real
writers: an enrolled identity, a desired config, a credential snapshot, a clock record and a
real journal."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from firmware.journal.events import StoredEvent
from firmware.journal.ids import uuid7
from firmware.journal.reader import JournalReader
from firmware.journal.spill import encode_line
from firmware.lock import InstanceLock
from firmware.policy import snapshot
from firmware.tools.factory_reset import factory_reset
from firmware.uplink.desired import Desired, load_desired, save_desired
from provisioning.device import DeviceKeys, identity_dir
from provisioning.identity import device_id
from tests.firmware.test_journal import BOOT, journal, make_event
from tests.provisioning.test_device import SmallCa

pytestmark = pytest.mark.usefixtures("no_leaks")

DEVICE = "10000000a1b2c3d4"


@dataclass
class Reader:
    config: Path
    state: Path

    @property
    def journal(self) -> Path:
        return self.state / "journal.db"

    @property
    def keys(self) -> DeviceKeys:
        return DeviceKeys(identity_dir(self.state))

    def state_files(self) -> list[str]:
        """Every path under the state folder, relative, sorted."""
        return sorted(str(p.relative_to(self.state)) for p in self.state.rglob("*"))


def make_reader(tmp_path: Path, *, events: int = 3, acked: bool = True) -> Reader:
    state = tmp_path / "state"
    etc = tmp_path / "etc"
    etc.mkdir()
    cfg = etc / "qrgate.toml"
    cfg.write_text(
        f'[reader]\nstate_dir = "{state}"\n[camera]\nsource = "replay"\npath = "reel.png"\n'
    )
    state.mkdir()
    r = Reader(cfg, state)
    ca = SmallCa()
    keys = r.keys
    keys.create_key()
    keys.store_certificate(ca.sign(keys.make_csr(DEVICE)), ca.pem, device_id=DEVICE)
    save_desired(state, Desired(version=3, settings={"uplink": {"telemetry_s": 30}}))
    (state / snapshot.FILE_NAME).write_bytes(b"a kept snapshot")
    (state / f"{snapshot.FILE_NAME}.damaged-20261201T000000Z").write_bytes(b"damaged")
    (state / "clock.json").write_text(json.dumps({"wall_ns": 1, "mono_ns": 2, "boot_id": BOOT}))
    (state / "notes.txt").write_text("not the reader's: stays")
    with journal(r.journal) as j:
        receipts = [j.append(make_event(i)) for i in range(events)]
        if acked and receipts:
            j.mark_acked_through(receipts[-1].seq)
        assert j.flush()
    assert JournalReader(r.journal).stats()["unacked"] == (0 if acked else events)
    return r


def run(r: Reader, *args: str, stdin: str | None = None) -> Result:
    return CliRunner().invoke(factory_reset, ["--config", str(r.config), *args], input=stdin)


EVERYTHING = [
    "clock.json",
    snapshot.FILE_NAME,
    f"{snapshot.FILE_NAME}.damaged-20261201T000000Z",
    "desired.json",
    "identity",
    "identity/ca.crt",
    "identity/device.crt",
    "identity/device.csr",
    "identity/device.key",
    "journal.db",
    "journal.db.lock",
    "journal.db.seq",
    "journal.db.spill",
    "notes.txt",
]
AFTER = ["journal.db.lock", "journal.db.seq", "notes.txt", "qrgate.lock"]


def test_reset_removes_identity_state_and_journal(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    files = r.state_files()
    assert [f for f in files if not f.startswith("journal.db-")] == EVERYTHING
    before_id = device_id()

    result = run(r, "--yes")
    assert result.exit_code == 0, result.output
    removed = [line.removeprefix("removed ") for line in result.stdout.splitlines()[:-1]]
    gone = {str(r.state / f) for f in files if f not in AFTER}
    assert set(removed) == gone
    assert result.stdout.splitlines()[-1] == (
        f"kept {r.config} (the installer's config; --config-too removes it) and the device id "
        "(it comes from the hardware)"
    )
    assert result.stderr == ""  # --yes: no question

    assert r.state_files() == AFTER
    assert r.config.is_file()
    assert load_desired(r.state) is None
    assert r.keys.status(DEVICE)["state"] == "not enrolled"
    assert device_id() == before_id  # from the hardware: a reset does not change it
    # the kept seq mark makes the next journal number its events above the old ones, so the
    # back office (which still knows this device id) cannot ack them before they are sent
    reports: list[str] = []
    with journal(r.journal, report=lambda code, detail: reports.append(code)) as j:
        assert j.append(make_event(9)).seq > 3
    assert reports == ["journal_missing"]


def test_refuses_while_the_daemon_holds_the_lock(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    files = r.state_files()
    with InstanceLock(r.state / "qrgate.lock"):
        result = run(r, "--yes", "--force")
    assert result.exit_code == 1
    assert "qrgate factory-reset: the reader service is running: stop it first" in result.stderr
    assert result.stdout == ""
    assert r.state_files() == [*files, "qrgate.lock"]


def test_refuses_while_another_process_writes_the_journal(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    files = r.state_files()
    with journal(r.journal):  # a writer the instance lock does not cover
        result = run(r, "--yes", "--force")
        assert result.exit_code == 1
        assert f"another process is writing the journal {r.journal}" in result.stderr
        assert r.keys.key_path.is_file()
    # the journal's own -wal/-shm come and go with its connections
    kept = {f for f in r.state_files() if not f.startswith("journal.db-")}
    assert {f for f in files if not f.startswith("journal.db-")} <= kept


def test_unacknowledged_events_refuse_and_force_proceeds(tmp_path: Path) -> None:
    r = make_reader(tmp_path, events=3, acked=False)
    files = r.state_files()
    result = run(r, "--yes")
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        "qrgate factory-reset: 3 journal event(s) not acknowledged by the back office",
        "qrgate factory-reset: nothing removed; start the reader service until the back "
        "office has acknowledged them (`qrgate journal stats`: unacked 0), or give --force to "
        "lose them",
    ]
    assert [f for f in r.state_files() if f != "qrgate.lock"] == files

    result = run(r, "--yes", "--force")
    assert result.exit_code == 0, result.output
    assert r.state_files() == AFTER


def test_spilled_events_count_as_unacknowledged(tmp_path: Path) -> None:
    r = make_reader(tmp_path, events=2, acked=True)
    spilled = StoredEvent(seq=3, event_id=uuid7(), boot_id=BOOT, event=make_event(3))
    r.journal.with_name("journal.db.spill").write_bytes(encode_line(spilled))
    result = run(r, "--yes")
    assert result.exit_code == 1
    assert "1 journal event(s) not acknowledged" in result.stderr
    assert r.keys.key_path.is_file()


def test_an_unreadable_journal_refuses_unless_forced(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    for suffix in ("-wal", "-shm"):
        Path(f"{r.journal}{suffix}").unlink(missing_ok=True)
    r.journal.write_bytes(b"not a database" * 100)
    result = run(r, "--yes")
    assert result.exit_code == 1
    assert "cannot tell whether the journal holds unacknowledged events" in result.stderr
    assert r.journal.is_file() and r.keys.key_path.is_file()
    result = run(r, "--yes", "--force")
    assert result.exit_code == 0, result.output
    assert r.state_files() == AFTER


@pytest.mark.parametrize("answer", [None, "", "n\n", "no\n"])
def test_without_yes_no_answer_is_a_no(tmp_path: Path, answer: str | None) -> None:
    r = make_reader(tmp_path)
    files = r.state_files()
    result = run(r, stdin=answer)
    assert result.exit_code == 1
    assert "Reset this reader? [y/N]" in result.stderr
    assert f"  {r.keys.key_path}" in result.stderr  # the list of what it would remove
    assert result.stderr.splitlines()[-1] == "qrgate factory-reset: not confirmed; nothing removed"
    assert result.stdout == ""
    assert [f for f in r.state_files() if f != "qrgate.lock"] == files


def test_a_yes_answer_resets(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    result = run(r, stdin="y\n")
    assert result.exit_code == 0, result.output
    assert "Reset this reader? [y/N]" in result.stderr
    assert r.state_files() == AFTER


def test_config_too_removes_the_config_file(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    result = run(r, "--yes", "--config-too")
    assert result.exit_code == 0, result.output
    assert f"removed {r.config}" in result.stdout.splitlines()
    assert not r.config.exists()
    assert r.state_files() == AFTER


def test_a_second_reset_has_nothing_to_remove(tmp_path: Path) -> None:
    r = make_reader(tmp_path)
    assert run(r, "--yes").exit_code == 0
    result = run(r, "--yes")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "nothing to remove: the reader was already reset"


def test_bad_input_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[reader\n")
    result = CliRunner().invoke(factory_reset, ["--config", str(bad), "--yes"])
    assert result.exit_code == 2
    assert result.stderr.startswith("qrgate factory-reset: ")
    assert CliRunner().invoke(factory_reset, ["--yes"]).exit_code == 2  # --config is required
    assert os.listdir(tmp_path) == ["bad.toml"]
