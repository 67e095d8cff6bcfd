"""Fleet rollouts against a real mosquitto and the fleet simulator (ota.rollout, ota.simulator,
firmware.admin.fleet_rollout): waves, halting on the error threshold, resume, abort."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from firmware.admin.fleet_rollout import jobs, rollout
from firmware.demo.broker import LocalBroker, free_port
from ota.job import JobState
from ota.jobs import OtaTopics, StatePayload, all_jobs, all_states
from ota.mqtt import PahoTransport, collect_retained, plain_client
from ota.rollout import (
    NO_RESPONSE,
    NOT_STARTED,
    DeviceRef,
    Rollout,
    RolloutEngine,
    RolloutStatus,
    load_rollout,
)
from ota.simulator import FleetSimulator, pick
from tests.firmware.conftest import need_mosquitto, no_leaks
from tests.polling import wait_until

__all__ = ["need_mosquitto", "no_leaks"]

pytestmark = pytest.mark.usefixtures("no_leaks")

SITE = "fleet"


@pytest.fixture
def broker(need_mosquitto: None, tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path / "broker", persistence=False) as b:
        yield b


@pytest.fixture
def transport(broker: LocalBroker) -> Iterator[PahoTransport]:
    t = PahoTransport(plain_client("rollout-test"), broker.host, broker.port)
    t.connect()
    yield t
    t.close()


def new_rollout(sim: FleetSimulator, version: str = "1.1.0", **options: float) -> Rollout:
    opts: dict[str, float] = {"canary": 5, "batch_size": 30, "error_threshold_pct": 10}
    opts.update(options)
    return Rollout.create(
        version,
        [DeviceRef(d, SITE) for d in sim.devices],
        canary=int(opts["canary"]),
        batch_size=int(opts["batch_size"]),
        error_threshold_pct=opts["error_threshold_pct"],
    )


def retained(broker: LocalBroker, topic_filter: str) -> dict[str, bytes]:
    with PahoTransport(plain_client("look"), broker.host, broker.port) as t:
        t.connect()
        found, complete = collect_retained(t, topic_filter)
    assert complete
    return found


def test_canary_failure_above_threshold_halts_then_resume_completes(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    path = tmp_path / "rollout.json"
    with FleetSimulator(broker.host, broker.port, SITE, 100, fail={"sim0003"}) as sim:
        r = new_rollout(sim)  # canary 5: 1 failure is 20 % > 10 %
        seen: list[int] = []
        status = RolloutEngine(
            r, path, transport, wave_timeout_s=60, on_progress=lambda ro: seen.append(ro.wave_index)
        ).run()
        assert status is RolloutStatus.HALTED and r.wave_index == 0
        assert r.halt_reason == "1 of 5 started devices failed (20.0 % > 10 %)"
        assert r.devices[f"{SITE}/sim0003"].state == "FAILED"
        assert r.devices[f"{SITE}/sim0003"].reason == "download_failed"
        assert r.counts()[NOT_STARTED] == 95
        # no later wave got a job: the readers never heard of it
        assert [d for d, s in sim.states().items() if s is not None] == [
            f"sim{i:04d}" for i in range(5)
        ]
        assert seen and set(seen) == {0}
        on_disk = load_rollout(path)
        assert on_disk.status is RolloutStatus.HALTED and on_disk.halt_reason == r.halt_reason

        assert RolloutEngine(on_disk, path, transport, wave_timeout_s=60).resume() is (
            RolloutStatus.DONE
        )
        assert on_disk.counts() == {"SUCCEEDED": 99, "FAILED": 1}
        versions = sim.versions()
        assert versions.pop("sim0003") == "1.0.0"
        assert set(versions.values()) == {"1.1.0"}
    assert load_rollout(path).status is RolloutStatus.DONE
    # the readers' retained reports say the same to anyone who looks later
    states = retained(broker, all_states(SITE))
    assert len(states) == 100
    parsed = [StatePayload.parse(p) for p in states.values()]
    assert sum(p.state is JobState.SUCCEEDED for p in parsed) == 99


def test_failures_below_threshold_complete(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    fail = {"sim0050", "sim0071", "sim0093"}  # after the canary, 3 % in all
    with FleetSimulator(broker.host, broker.port, SITE, 100, fail=fail, step_s=0.001) as sim:
        r = new_rollout(sim, canary=10, error_threshold_pct=5)
        assert [len(w.devices) for w in r.waves] == [10, 30, 30, 30]
        assert RolloutEngine(r, tmp_path / "r.json", transport, wave_timeout_s=60).run() is (
            RolloutStatus.DONE
        )
        counts = r.counts()
        assert counts == {"SUCCEEDED": 97, "FAILED": 3}
        assert {k.split("/")[1] for k, d in r.devices.items() if d.failed} == fail
        assert sim.bad_jobs == 0
        assert sim.jobs_received == 100


def test_crashing_release_rolls_back_and_halts(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    with FleetSimulator(broker.host, broker.port, SITE, 20, crash_versions={"1.1.0"}) as sim:
        r = new_rollout(sim, canary=3, batch_size=10, error_threshold_pct=50)
        assert RolloutEngine(r, tmp_path / "r.json", transport, wave_timeout_s=60).run() is (
            RolloutStatus.HALTED
        )
        canary = [r.devices[k] for k in r.waves[0].devices]
        # halted at the second rollback (2 of 3 > 50 %): the third may still be in flight
        rolled = [d for d in canary if d.state == "ROLLED_BACK"]
        assert len(rolled) >= 2
        assert {(d.reason, d.current_version) for d in rolled} == {("exited_at_start", "1.0.0")}
        assert r.counts()[NOT_STARTED] == 17
        assert wait_until(
            lambda: [sim.states()[f"sim000{i}"] for i in range(3)] == [JobState.ROLLED_BACK] * 3
        )
        assert set(sim.versions().values()) == {"1.0.0"}


def test_silent_and_stuck_readers_time_out_then_abort_cancels_them(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"
    # step_s 600: the readers that answer stay QUEUED for the whole test
    with FleetSimulator(broker.host, broker.port, SITE, 12, silent={"sim0001"}, step_s=600) as sim:
        r = new_rollout(sim, canary=3, batch_size=5, error_threshold_pct=20)
        assert RolloutEngine(r, path, transport, wave_timeout_s=0.5).run() is (RolloutStatus.HALTED)
        assert r.counts() == {NO_RESPONSE: 3, NOT_STARTED: 9}
        assert "3 of 3 started devices failed" in r.halt_reason
        assert wait_until(lambda: sim.states()["sim0000"] is JobState.QUEUED)

        again = load_rollout(path)
        cancelled = RolloutEngine(again, path, transport, wave_timeout_s=0.5).abort()
        assert cancelled == [f"{SITE}/sim0000", f"{SITE}/sim0001", f"{SITE}/sim0002"]
        assert load_rollout(path).status is RolloutStatus.ABORTED
        # the QUEUED readers drop the job and say so; the silent one finds no job later
        assert wait_until(
            lambda: (
                sim.states()["sim0000"] is JobState.REJECTED
                and sim.states()["sim0002"] is JobState.REJECTED
            )
        )
        assert retained(broker, all_jobs(SITE)) == {}
        reports = retained(broker, all_states(SITE))
        assert sorted(reports) == [OtaTopics(SITE, f"sim000{i}").state for i in (0, 2)]
        assert StatePayload.parse(reports[OtaTopics(SITE, "sim0000").state]).reason == "cancelled"


def test_interrupted_rollout_resumes_without_resending_finished_waves(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    path = tmp_path / "r.json"

    def stop_in_wave_1(ro: Rollout) -> None:
        if ro.wave_index == 1 and ro.devices[ro.waves[1].devices[0]].published:
            raise KeyboardInterrupt  # the technician's Ctrl-C, wave 1 sent

    with FleetSimulator(broker.host, broker.port, SITE, 50) as sim:
        r = new_rollout(sim, canary=5, batch_size=20)
        with pytest.raises(KeyboardInterrupt):
            RolloutEngine(r, path, transport, wave_timeout_s=60, on_progress=stop_in_wave_1).run()
        saved = load_rollout(path)
        assert saved.status is RolloutStatus.RUNNING and saved.wave_index == 1
        assert saved.counts()[NOT_STARTED] == 25
        with PahoTransport(plain_client("resumed"), broker.host, broker.port) as second:
            second.connect()
            assert RolloutEngine(saved, path, second, wave_timeout_s=60).resume() is (
                RolloutStatus.DONE
            )
            # the canary wave was not sent again; at most wave 1 (20) and wave 2 (25) were
            jobs_sent = second.published - 1  # the retained-state probe
            assert 25 <= jobs_sent <= 45
        assert saved.counts() == {"SUCCEEDED": 50}
        assert set(sim.versions().values()) == {"1.1.0"}


def test_simulator_refuses_downgrades_and_same_version(
    broker: LocalBroker, transport: PahoTransport, tmp_path: Path
) -> None:
    with FleetSimulator(broker.host, broker.port, SITE, 4, version="2.0") as sim:
        r = new_rollout(sim, "1.9", canary=0, batch_size=4, error_threshold_pct=100)
        assert RolloutEngine(r, tmp_path / "a.json", transport, wave_timeout_s=60).run() is (
            RolloutStatus.DONE
        )
        assert {(d.state, d.reason) for d in r.devices.values()} == {("REJECTED", "downgrade")}
        same = new_rollout(sim, "2.0", canary=0, batch_size=4, error_threshold_pct=0)
        assert RolloutEngine(same, tmp_path / "b.json", transport, wave_timeout_s=60).run() is (
            RolloutStatus.HALTED
        )
        assert {d.reason for d in same.devices.values() if d.state} <= {"same_version"}
    assert pick([f"d{i}" for i in range(100)], 0.1, seed=1) == pick(
        [f"d{i}" for i in range(100)], 0.1, seed=1
    )
    assert len(pick([f"d{i}" for i in range(100)], 0.1, seed=1)) == 10


def test_cli_rollout_watch_halt_resume_abort(broker: LocalBroker, tmp_path: Path) -> None:
    state = tmp_path / "rollout.json"
    addr = ["--broker", f"{broker.host}:{broker.port}"]
    run = CliRunner().invoke
    new = [*addr, "--site", SITE, "--canary", "2", "--batch-size", "10", "--state", str(state)]
    with FleetSimulator(broker.host, broker.port, SITE, 30, crash_versions={"1.2.0"}) as sim:
        out = run(rollout, [*new, "--version", "1.1.0", "--error-threshold", "10"])
        assert out.exit_code == 0, out.output
        assert "30 readers to update; 0 already on 1.1.0" in out.output
        assert "SUCCEEDED" in out.output and "DONE" in out.output
        assert set(sim.versions().values()) == {"1.1.0"}

        listed = run(jobs, [*addr, "--site", SITE, "--json"])
        assert listed.exit_code == 0, listed.output
        rows = [json.loads(line) for line in listed.output.splitlines()]
        assert len(rows) == 30
        assert {(x["state"], x["to_version"], x["current_version"]) for x in rows} == {
            ("SUCCEEDED", "1.1.0", "1.1.0")
        }
        table = run(jobs, [*addr, "--site", SITE])
        assert table.exit_code == 0 and "30 readers with a job" in table.output

        halted = run(rollout, [*new, "--version", "1.2.0", "--error-threshold", "10"])
        assert halted.exit_code == 1, halted.output
        assert "halted:" in halted.output and "exited_at_start" in halted.output
        # it halts on the first report over the threshold: the second canary may be in flight
        assert re.search(r"halted: [12] of 2 started devices failed", halted.output)

        busy = run(rollout, [*new, "--version", "1.3.0", "--error-threshold", "10"])
        assert busy.exit_code == 2 and "--resume or --abort" in busy.output

        # both canaries have rolled back before the resume: it accepts both failures
        assert wait_until(
            lambda: {sim.states()["sim0000"], sim.states()["sim0001"]} == {JobState.ROLLED_BACK}
        )
        resumed = run(rollout, [*addr, "--state", str(state), "--resume"])
        assert resumed.exit_code == 1, resumed.output  # wave 1 crashes too
        assert load_rollout(state).wave_index == 1

        aborted = run(rollout, [*addr, "--state", str(state), "--abort"])
        assert aborted.exit_code == 0, aborted.output
        assert "aborted: 0 jobs cancelled" in aborted.output
        assert load_rollout(state).status is RolloutStatus.ABORTED
        assert set(sim.versions().values()) == {"1.1.0"}


def test_cli_refuses_bad_options_and_unreachable_broker(tmp_path: Path) -> None:
    run = CliRunner().invoke
    addr = ["--broker", f"127.0.0.1:{free_port()}"]
    state = ["--state", str(tmp_path / "r.json")]
    missing = run(rollout, [*addr, *state, "--version", "1.0"])
    assert missing.exit_code == 2
    assert "--canary, --batch-size, --error-threshold" in missing.output
    both = run(rollout, [*addr, *state, "--resume", "--abort"])
    assert both.exit_code == 2 and "do not go together" in both.output
    nothing = run(rollout, [*addr, *state, "--resume"])
    assert nothing.exit_code == 2 and "no rollout state file" in nothing.output
    down = run(rollout, [*addr, *state, "--version", "1.0", "--canary", "1", "--batch-size", "1",
                         "--error-threshold", "5", "--devices", "a,b", "--site", "s"])  # fmt: skip
    assert down.exit_code == 3 and "cannot reach broker" in down.output
    gone = run(jobs, addr)
    assert gone.exit_code == 3 and "cannot reach broker" in gone.output
