"""The rollout planner, its counting and halting rules, and its state file (ota.rollout), with
no broker: the engine over a real mosquitto is in test_fleet.py."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware.admin.fleet_rollout import rollout
from firmware.demo.broker import free_port
from ota.exceptions import RolloutError
from ota.job import JobState
from ota.jobs import OtaTopics, StatePayload, parse_ota_topic
from ota.mqtt import PROBE_PREFIX, PahoTransport, plain_client
from ota.rollout import (
    CANCELLED,
    NO_RESPONSE,
    NOT_STARTED,
    SENT,
    DeviceRef,
    Rollout,
    RolloutEngine,
    RolloutLock,
    RolloutStatus,
    Wave,
    load_rollout,
    plan,
    save_rollout,
)


def refs(n: int, site: str = "hq") -> list[DeviceRef]:
    return [DeviceRef(f"d{i:03d}", site) for i in range(n)]


def test_plan_canary_then_batches_in_device_order() -> None:
    devices = [*reversed(refs(10)), DeviceRef("d000", "lab")]
    waves = plan(devices, canary=2, batch_size=4)
    assert waves == [
        Wave(0, ("hq/d000", "lab/d000"), canary=True),
        Wave(1, ("hq/d001", "hq/d002", "hq/d003", "hq/d004")),
        Wave(2, ("hq/d005", "hq/d006", "hq/d007", "hq/d008")),
        Wave(3, ("hq/d009",)),
    ]
    assert plan(list(reversed(devices)), canary=2, batch_size=4) == waves  # deterministic


def test_plan_edges() -> None:
    assert [len(w.devices) for w in plan(refs(5), canary=0, batch_size=2)] == [2, 2, 1]
    assert not plan(refs(5), canary=0, batch_size=2)[0].canary
    assert [len(w.devices) for w in plan(refs(3), canary=10, batch_size=2)] == [3]
    assert [len(w.devices) for w in plan(refs(1001), canary=10, batch_size=250)] == [
        10, 250, 250, 250, 241
    ]  # fmt: skip


@pytest.mark.parametrize(
    "devices, canary, batch, why",
    [
        ([], 1, 1, "no devices"),
        ([DeviceRef("a", "s"), DeviceRef("a", "s")], 1, 1, "named twice: s/a"),
        (refs(3), -1, 1, "canary"),
        (refs(3), 1, 0, "batch size"),
    ],
)
def test_plan_refuses(devices: list[DeviceRef], canary: int, batch: int, why: str) -> None:
    with pytest.raises(RolloutError, match=why):
        plan(devices, canary=canary, batch_size=batch)


def test_create_refuses_bad_version_threshold_and_id() -> None:
    with pytest.raises(RolloutError, match="release version"):
        Rollout.create("latest", refs(3), canary=1, batch_size=1, error_threshold_pct=5)
    with pytest.raises(RolloutError, match="between 0 and 100"):
        Rollout.create("1.0", refs(3), canary=1, batch_size=1, error_threshold_pct=101)
    with pytest.raises(RolloutError, match="not an id"):
        Rollout.create("1.0", refs(3), canary=1, batch_size=1, error_threshold_pct=5,
                       rollout_id="a b")  # fmt: skip
    r = Rollout.create("1.2.0", refs(3), canary=1, batch_size=1, error_threshold_pct=5)
    assert r.rollout_id.startswith("rollout-1.2.0-")
    assert r.job_request(5).to_dict() == {
        "job_id": r.rollout_id, "version": "1.2.0", "allow_downgrade": False,
        "rollout": r.rollout_id, "issued_wall_ns": 5,
    }  # fmt: skip


def report(
    r: Rollout, key: str, state: JobState, reason: str = "x", *, step: int = 5,
    job_id: str | None = None,
) -> StatePayload:  # fmt: skip
    site, device = key.split("/")
    return StatePayload(
        device=device, site=site, job_id=job_id or r.rollout_id, state=state, reason=reason,
        from_version="1.0", to_version=r.version, step=step,
    )  # fmt: skip


def started(r: Rollout, wave: int) -> None:
    for key in r.waves[wave].devices:
        r.devices[key].published = True


def test_counting_and_the_threshold() -> None:
    r = Rollout.create("1.1", refs(30), canary=10, batch_size=10, error_threshold_pct=10)
    assert r.counts() == {NOT_STARTED: 30}
    started(r, 0)
    assert (r.started(), r.failures(), r.over_threshold()) == (10, 0, False)
    canary = r.waves[0].devices
    assert r.apply(report(r, canary[0], JobState.ROLLED_BACK, "exited_at_start"))
    # 1 of 10 is 10 %, not above 10 %
    assert (r.failures(), r.over_threshold()) == (1, False)
    assert r.apply(report(r, canary[1], JobState.REJECTED, "tampered"))
    assert (r.failures(), r.over_threshold()) == (2, True)
    counts = r.counts()
    assert counts[JobState.ROLLED_BACK.value] == 1 and counts[SENT] == 8
    assert counts[NOT_STARTED] == 20
    r.halt()
    assert r.status is RolloutStatus.HALTED
    assert r.halt_reason == "2 of 10 started devices failed (20.0 % > 10 %)"


def test_reports_that_do_not_count() -> None:
    r = Rollout.create("1.1", refs(3), canary=1, batch_size=2, error_threshold_pct=0)
    key = r.waves[0].devices[0]
    assert r.apply(report(r, key, JobState.DOWNLOADING, "download_progress", step=3))
    assert not r.apply(report(r, key, JobState.QUEUED, "queued", step=0))  # older step
    assert not r.apply(report(r, key, JobState.FAILED, "boom", job_id="another-job"))
    assert not r.apply(report(r, "hq/unknown", JobState.FAILED, "boom"))
    assert not r.apply(report(r, key, JobState.DOWNLOADING, "download_progress", step=3))
    assert r.devices[key].state == "DOWNLOADING" and r.devices[key].published
    assert r.failures() == 0


def test_no_response_counts_until_a_terminal_report() -> None:
    r = Rollout.create("1.1", refs(4), canary=0, batch_size=4, error_threshold_pct=30)
    started(r, 0)
    a, b, c, d = r.waves[0].devices
    r.apply(report(r, a, JobState.SUCCEEDED, "healthy"))
    r.apply(report(r, b, JobState.DOWNLOADING, "download_progress"))
    assert not r.wave_finished(r.waves[0])
    assert r.time_out(r.waves[0]) == [b, c, d]
    assert r.counts()[NO_RESPONSE] == 3 and r.over_threshold()
    for key in (b, c):
        r.apply(report(r, key, JobState.SUCCEEDED, "healthy", step=9))
    # 1 of 4 = 25 % <= 30 %
    assert (r.failures(), r.over_threshold()) == (1, False)
    assert r.devices[b].display == "SUCCEEDED"


def test_reopen_accepts_the_failures_seen() -> None:
    r = Rollout.create("1.1", refs(20), canary=5, batch_size=5, error_threshold_pct=10)
    started(r, 0)
    r.apply(report(r, r.waves[0].devices[0], JobState.FAILED, "download_failed"))
    assert r.over_threshold()
    r.halt()
    r.reopen(error_threshold_pct=50)
    assert (r.status, r.halt_reason, r.error_threshold_pct, r.resumes) == (
        RolloutStatus.RUNNING,
        "",
        50.0,
        1,
    )
    assert (r.started(), r.failures(), r.over_threshold()) == (4, 0, False)
    assert r.devices[r.waves[0].devices[0]].failed  # still shown as failed
    r.status = RolloutStatus.DONE
    with pytest.raises(RolloutError, match="DONE: nothing to resume"):
        r.reopen()


def test_state_file_round_trip(tmp_path: Path) -> None:
    r = Rollout.create("2.0rc1", refs(7), canary=2, batch_size=3, error_threshold_pct=12.5,
                       allow_downgrade=True, wall_ns=99)  # fmt: skip
    started(r, 0)
    r.apply(report(r, r.waves[0].devices[0], JobState.ROLLED_BACK, "exited_at_start"))
    r.devices[r.waves[0].devices[1]].cancelled = True
    r.halt()
    path = tmp_path / "rollout.json"
    save_rollout(path, r)
    back = load_rollout(path)
    assert back == r
    assert back.counts()[CANCELLED] == 1
    save_rollout(path, back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rollout.json"]  # no temp files
    assert path.stat().st_mode & 0o777 == 0o644


def _tamper(path: Path, change: object) -> None:
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "change, why",
    [
        (lambda d: d.update(format=2), "format 1"),
        (lambda d: d.update(status="PAUSED"), "PAUSED"),
        (lambda d: d.update(wave_index=9), "wave index"),
        (lambda d: d.update(error_threshold_pct=-1), "between 0 and 100"),
        (lambda d: d["devices"]["hq/d000"].update(state="LOST"), "state"),
        (lambda d: d["devices"]["hq/d000"].update(published="yes"), "published"),
        (lambda d: d["devices"]["hq/d000"].pop("wave"), "fields"),
        (lambda d: d["waves"][0]["devices"].append("hq/zzz"), "same readers"),
        (lambda d: d.update(rollout_id="../x"), "not an id"),
    ],
)
def test_damaged_state_file_is_refused(tmp_path: Path, change: object, why: str) -> None:
    path = tmp_path / "r.json"
    save_rollout(path, Rollout.create("1.1", refs(3), canary=1, batch_size=1,
                                      error_threshold_pct=5))  # fmt: skip
    _tamper(path, change)
    with pytest.raises(RolloutError, match=why) as info:
        load_rollout(path)
    assert str(path) in str(info.value)


def test_state_file_missing_not_json_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(RolloutError, match="no rollout state file"):
        load_rollout(tmp_path / "none.json")
    (tmp_path / "bad.json").write_bytes(b"{not json")
    with pytest.raises(RolloutError, match="not JSON"):
        load_rollout(tmp_path / "bad.json")
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(RolloutError, match="cannot read"):
        load_rollout(tmp_path / "fifo.json")


def test_lock_keeps_a_second_process_off(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    with RolloutLock(path), pytest.raises(RolloutError, match="another process"):
        RolloutLock(path).__enter__()
    with RolloutLock(path):  # released
        pass


def test_engine_refuses_what_it_cannot_run(tmp_path: Path) -> None:
    r = Rollout.create("1.1", refs(3), canary=1, batch_size=1, error_threshold_pct=5)
    # never connected: the refusals come before any broker traffic
    transport = PahoTransport(plain_client("unused"), "127.0.0.1", 1)
    with pytest.raises(RolloutError, match="above 0"):
        RolloutEngine(r, tmp_path / "r.json", transport, wave_timeout_s=0)
    engine = RolloutEngine(r, tmp_path / "r.json", transport, wave_timeout_s=5)
    r.halt()
    with pytest.raises(RolloutError, match="HALTED: resume it first"):
        engine.run()
    r.status = RolloutStatus.ABORTED
    with pytest.raises(RolloutError, match="already ABORTED"):
        engine.abort()
    assert not (tmp_path / "r.json").exists()


class FakeBroker:
    """A :class:`ota.mqtt.Transport` without a broker, on a fake clock: publishes are
    recorded, a probe comes straight back, and waiting for a message with nothing queued
    moves the clock on by the whole wait. ``answer`` (key, job payload) → reports to queue."""

    def __init__(self, answer: Callable[[str], list[StatePayload]] | None = None) -> None:
        self.now = 0.0
        self.queue: list[tuple[str, bytes]] = []
        self.jobs: list[tuple[str, bytes]] = []
        self.answer = answer

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        if topic.startswith(PROBE_PREFIX):
            self.queue.append((topic, payload))
            return
        self.jobs.append((topic, payload))
        parsed = parse_ota_topic(topic)
        if self.answer is not None and parsed is not None and payload:
            for rep in self.answer(f"{parsed[0]}/{parsed[1]}"):
                self.queue.append((OtaTopics(rep.site, rep.device).state, rep.to_bytes()))

    def subscribe(self, topic: str, qos: int = 1) -> None:
        pass

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        if self.queue:
            return self.queue.pop(0)
        self.now += timeout_s
        return None

    def flush(self, timeout_s: float = 5.0) -> None:
        pass

    def job_keys(self) -> list[str]:
        keys = []
        for topic, payload in self.jobs:
            parsed = parse_ota_topic(topic)
            assert parsed is not None
            keys.append(f"{parsed[0]}/{parsed[1]}" + ("" if payload else " cancel"))
        return keys


def engine(r: Rollout, path: Path, fake: FakeBroker, timeout: float = 100) -> RolloutEngine:
    return RolloutEngine(r, path, fake, wave_timeout_s=timeout, monotonic=lambda: fake.now)


def test_resume_does_not_resend_nor_wait_for_readers_already_counted(tmp_path: Path) -> None:
    path = tmp_path / "r.json"

    # canary hq/d000 silent; hq/d001 fails; the rest succeed at once
    def answer(key: str) -> list[StatePayload]:
        if key == "hq/d000":
            return []
        state = JobState.FAILED if key == "hq/d001" else JobState.SUCCEEDED
        return [report(r, key, state, "download_failed" if key == "hq/d001" else "healthy")]

    r = Rollout.create("1.1", refs(6), canary=2, batch_size=2, error_threshold_pct=50)
    fake = FakeBroker(answer)
    assert engine(r, path, fake).run() is RolloutStatus.HALTED
    assert fake.now >= 100  # waited the wave timeout for hq/d000
    assert r.halt_reason == "2 of 2 started devices failed (100.0 % > 50 %)"
    assert r.devices["hq/d000"].display == NO_RESPONSE

    saved = load_rollout(path)
    fake2 = FakeBroker(lambda key: [report(saved, key, JobState.SUCCEEDED, "healthy")])
    assert engine(saved, path, fake2).resume(error_threshold_pct=10) is RolloutStatus.DONE
    # the two counted readers got nothing again, and nobody waited for them
    assert fake2.job_keys() == ["hq/d002", "hq/d003", "hq/d004", "hq/d005"]
    assert fake2.now < 1
    assert saved.outcome() == (4, 2)
    assert saved.counts() == {"SUCCEEDED": 4, "FAILED": 1, NO_RESPONSE: 1}


def test_resume_waits_again_for_readers_started_but_silent(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    r = Rollout.create("1.1", refs(4), canary=0, batch_size=4, error_threshold_pct=10)
    # d000 fails at once (halts the wave); the others have their job but have not answered
    fake = FakeBroker(
        lambda key: [report(r, key, JobState.FAILED, "boom")] if key == "hq/d000" else []
    )
    assert engine(r, path, fake).run() is RolloutStatus.HALTED
    assert fake.now < 100 and r.counts()[SENT] == 3

    saved = load_rollout(path)
    fake2 = FakeBroker()
    assert engine(saved, path, fake2, timeout=50).resume() is RolloutStatus.HALTED
    # sent again (idempotent) and waited on for a fresh timeout; d000 left alone
    assert fake2.job_keys() == ["hq/d001", "hq/d002", "hq/d003"]
    assert 50 <= fake2.now < 51
    assert saved.counts() == {"FAILED": 1, NO_RESPONSE: 3}
    # the halt reason adds up with the table: 3 new failures besides the accepted one
    assert saved.halt_reason == (
        "3 of 3 started devices failed (100.0 % > 10 %), besides 1 earlier failure accepted "
        "by --resume"
    )

    # a second resume accepts those too, waits for nobody and ends DONE with 0 updated
    again = load_rollout(path)
    fake3 = FakeBroker()
    assert engine(again, path, fake3).resume() is RolloutStatus.DONE
    assert fake3.job_keys() == [] and fake3.now < 1
    assert again.outcome() == (0, 4)

    # an abort of the DONE rollout withdraws the jobs of the silent readers; it stays DONE
    done = load_rollout(path)
    fake4 = FakeBroker()
    assert engine(done, path, fake4).abort() == ["hq/d001", "hq/d002", "hq/d003"]
    assert fake4.job_keys() == ["hq/d001 cancel", "hq/d002 cancel", "hq/d003 cancel"]
    assert load_rollout(path).status is RolloutStatus.DONE
    assert load_rollout(path).counts() == {"FAILED": 1, CANCELLED: 3}
    assert engine(load_rollout(path), path, FakeBroker()).abort() == []


def test_missing_state_file_hint_and_lock_file_cleanup(tmp_path: Path) -> None:
    path = tmp_path / "missing.json"
    with pytest.raises(RolloutError, match=r"no rollout state file \(nothing to abort"):
        load_rollout(path, missing_hint="nothing to abort")
    with RolloutLock(path):
        assert (tmp_path / "missing.json.lock").exists()
    assert list(tmp_path.iterdir()) == []  # no state file: no lock file left
    with RolloutLock(path):
        save_rollout(path, Rollout.create("1.1", refs(1), canary=0, batch_size=1,
                                          error_threshold_pct=5))  # fmt: skip
    assert sorted(p.name for p in tmp_path.iterdir()) == ["missing.json", "missing.json.lock"]


def test_lock_on_a_removed_lock_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    lock = RolloutLock(path)
    fd = os.open(lock.path, os.O_RDWR | os.O_CREAT, 0o644)  # opened by a slow second process
    lock.path.unlink()  # then removed by the first one on its way out
    os.close(fd)
    (tmp_path / "r.json.lock").write_text("")  # and a third one made a new one
    with RolloutLock(path):  # the new file locks fine
        pass


class SleepyBroker(FakeBroker):
    """A FakeBroker for the command, which runs on the real clock: waits really pass (the
    command's wave timeout is 1 s at least)."""

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        if self.queue:
            return self.queue.pop(0)
        time.sleep(timeout_s)
        return None


def test_cli_halt_listing_resume_and_honest_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from firmware.admin import fleet_rollout

    state = tmp_path / "r.json"
    brokers: list[SleepyBroker] = []

    def transport(settings: object, role: str) -> SleepyBroker:
        brokers.append(SleepyBroker())  # every reader silent
        return brokers[-1]

    monkeypatch.setattr(fleet_rollout, "_transport", transport)

    def run(args: list[str]) -> tuple[int, str]:
        result = CliRunner().invoke(rollout, args)
        return result.exit_code, " ".join(result.output.split())  # rich wraps lines

    common = ["--broker", "127.0.0.1:1", "--state", str(state), "--wave-timeout", "1"]
    new = [*common, "--version", "1.1", "--devices", "a,b", "--site", "hq", "--canary", "1",
           "--batch-size", "1", "--error-threshold", "50"]  # fmt: skip
    code, halted = run(new)
    assert code == 1, halted
    assert "hq/a: NO_RESPONSE no_response" in halted
    assert f"state file {state}" in halted
    assert halted.endswith(
        "halted: 1 of 1 started devices failed (100.0 % > 50 %); continue with --resume "
        "(optionally --error-threshold) or --abort"
    )
    code, resumed = run([*common, "--resume"])
    assert code == 1, resumed
    assert "1 of 1 started devices failed (100.0 % > 50 %), besides 1 earlier failure" in (resumed)
    assert [b.job_keys() for b in brokers] == [["hq/a"], ["hq/b"]]  # hq/a not sent again
    code, done = run([*common, "--resume"])
    assert code == 1, done  # DONE, but nobody was updated
    assert "DONE" in done and "0 of 2 readers updated, 2 not (failed or silent)" in done
    assert "--abort withdraws" in done
    assert brokers[-1].job_keys() == []
    code, aborted = run([*common, "--abort"])
    assert code == 0, aborted
    assert "rollout was DONE: 2 jobs of readers that never answered cancelled" in aborted
    assert brokers[-1].job_keys() == ["hq/a cancel", "hq/b cancel"]
    assert load_rollout(state).status is RolloutStatus.DONE


def test_cli_missing_state_and_unreachable_broker_leave_nothing(tmp_path: Path) -> None:
    run = CliRunner().invoke
    state = tmp_path / "missing.json"
    common = ["--broker", f"127.0.0.1:{free_port()}", "--state", str(state)]
    aborted = run(rollout, [*common, "--abort"])
    assert aborted.exit_code == 2
    assert "no rollout state file (nothing to abort: check --state)" in aborted.output
    resumed = run(rollout, [*common, "--resume"])
    assert resumed.exit_code == 2 and "start one without --resume" in resumed.output
    down = run(rollout, [*common, "--version", "1.0", "--canary", "1", "--batch-size", "1",
                         "--error-threshold", "5", "--devices", "a,b", "--site", "s"])  # fmt: skip
    assert down.exit_code == 3 and "cannot reach broker" in down.output
    assert "readers in 2 waves" in down.output and "state file" not in down.output
    assert list(tmp_path.iterdir()) == []  # no state file, no stray lock file
