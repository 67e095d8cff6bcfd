"""The rollout planner, its counting and halting rules, and its state file (ota.rollout), with
no broker: the engine over a real mosquitto is in test_fleet.py."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ota.exceptions import RolloutError
from ota.job import JobState
from ota.jobs import StatePayload
from ota.mqtt import PahoTransport, plain_client
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
