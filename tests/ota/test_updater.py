"""The updater against a real TUF repository on loopback, real release folders and job
store, and a real service child speaking sd_notify (tests/ota/updater_rig.py): update to a
good release (SUCCEEDED, through a dropped connection and a busy door), to one that crashes
(ROLLED_BACK), tampered, downgrade, expired metadata, a clock behind the build, too little
disk, a failing install, and a kill -9 at every persisted step followed by resume()."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from ota.exceptions import JobStateError
from ota.health import SubprocessSupervisor
from ota.job import Job, JobState, JobStore
from ota.jobs import JobRequest
from ota.releases import Releases
from ota.repository import init_repository, metadata_dir, publish, refresh_timestamp, targets_dir
from ota.updater import Updater
from tests.firmware.conftest import no_leaks
from tests.ota.conftest import small_bundle
from tests.ota.repo_server import RepoServer
from tests.ota.updater_rig import BUILD_NS, Clock, FakeInstaller, Rig
from tests.polling import wait_until

__all__ = ["no_leaks"]

pytestmark = pytest.mark.usefixtures("no_leaks")

PROJECT = Path(__file__).resolve().parents[2]
S = JobState
WHEEL_BYTES = 600_000  # several download chunks: progress and a cut mid-file are possible


@dataclass
class Reader:
    rig: Rig
    repo: Path
    keys: Path
    server: RepoServer
    bundles: Path
    reports: list[Job]
    supervisor: SubprocessSupervisor

    @property
    def releases(self) -> Releases:
        return Releases(self.rig.root)

    def publish(self, version: str, **kw: object) -> Path:
        bundle = small_bundle(self.bundles, version, wheel_bytes=WHEEL_BYTES, **kw)  # type: ignore[arg-type]
        publish(self.repo, self.keys, bundle)
        return bundle

    def updater(self, **kw: object) -> Updater:
        return self.rig.updater(self.reports.append, self.supervisor, **kw)  # type: ignore[arg-type]

    def run(self, job_id: str, version: str, allow_downgrade: bool = False, **kw: object) -> Job:
        return self.updater(**kw).run(JobRequest(job_id, version, allow_downgrade))

    def trail(self, job_id: str) -> list[tuple[str, str]]:
        """(state, reason) of each report of ``job_id``, repeats of progress collapsed."""
        out: list[tuple[str, str]] = []
        for j in self.reports:
            if j.job_id == job_id and (j.state.value, j.reason) not in out[-1:]:
                out.append((j.state.value, j.reason))
        return out

    def target_requests(self) -> list[tuple[str, int | None]]:
        return [r for r in self.server.faults.requests if r[0].startswith("/targets/")]


@pytest.fixture
def reader(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Reader]:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    with RepoServer(repo) as server:
        rig = Rig(
            root=tmp_path / "opt",
            state=tmp_path_factory.mktemp("st"),  # short: the notify socket lives there
            url=server.url,
            trusted_root=metadata_dir(repo) / "1.root.json",
            modes={"3.0": "crash"},
        )
        releases = Releases(rig.root)
        # release 1.0 as scripts/install.sh leaves it: installed, stamped, current
        FakeInstaller(releases, {})(small_bundle(tmp_path / "b1", "1.0"), "1.0")
        releases.switch("1.0")
        sup = rig.supervisor()
        try:
            yield Reader(rig, repo, keys, server, tmp_path / "bundles", [], sup)
        finally:
            sup.close()


def test_update_succeeds_then_a_crashing_release_is_rolled_back(reader: Reader) -> None:
    reader.publish("2.0")
    reader.publish("3.0")
    reader.server.faults.drop_targets_after = 200_000  # the first download is cut mid-file
    reader.server.faults.drops_left = 1
    reader.rig.door_busy_looks = 3
    job = reader.run("job-2", "2.0", progress_every_s=0.0)
    assert (job.state, job.reason) == (S.SUCCEEDED, "healthy")
    assert (job.from_version, job.to_version) == ("1.0", "2.0")
    trail = reader.trail("job-2")
    assert trail == [
        ("QUEUED", "queued"),
        ("DOWNLOADING", "download_started"),
        ("DOWNLOADING", "download_progress"),
        ("INSTALLING", "verified"),
        ("INSTALLING", "waiting_for_door_idle"),
        ("PENDING_COMMIT", "switched"),
        ("SUCCEEDED", "healthy"),
    ]
    steps = [j.step for j in reader.reports]
    assert steps == sorted(steps)
    size = (reader.bundles / "qrgate-2.0.tar").stat().st_size
    assert (job.bytes_done, job.bytes_total) == (size, size)
    # the download resumed where the connection was cut
    starts = [start for _, start in reader.target_requests()]
    assert starts[0] is None and starts[1] is not None and starts[1] > 0
    assert (reader.releases.current_version(), reader.releases.previous_version()) == ("2.0", "1.0")
    assert reader.rig.running() == "2.0"
    assert not any((reader.rig.state / "cache").glob("*.tar*"))  # the bundle is not kept
    assert JobStore(reader.rig.state / "job.json").load() == job
    # the same job again (a retained message after a reconnect) changes nothing
    assert reader.run("job-2", "2.0") == job

    job = reader.run("job-3", "3.0")
    assert (job.state, job.reason) == (S.ROLLED_BACK, "exited_at_start")
    assert "exit code 3" in job.detail
    assert (job.from_version, job.to_version) == ("2.0", "3.0")
    assert reader.trail("job-3")[-2:] == [
        ("PENDING_COMMIT", "switched"),
        ("ROLLED_BACK", "exited_at_start"),
    ]
    assert reader.releases.current_version() == "2.0"
    assert wait_until(lambda: reader.rig.running() == "2.0")  # restarted on the old release
    assert reader.supervisor.probe().running
    # the failed release stays installed (not current): a later prune removes it
    assert reader.releases.list() == ["1.0", "2.0", "3.0"]
    assert reader.releases.previous_version() is None


def test_tampered_bundle_is_rejected(reader: Reader) -> None:
    reader.publish("2.0")
    (served,) = targets_dir(reader.repo).glob("*.qrgate-2.0.tar")
    data = bytearray(served.read_bytes())
    data[-1000] ^= 0xFF
    served.write_bytes(bytes(data))
    job = reader.run("job-t", "2.0")
    assert (job.state, job.reason) == (S.REJECTED, "tampered")
    assert reader.releases.list() == ["1.0"]
    assert reader.releases.current_version() == "1.0"
    assert not any((reader.rig.state / "cache").iterdir())


@pytest.mark.parametrize(
    ("version", "allow", "reason"),
    [("0.9", False, "downgrade"), ("1.0", False, "same_version"), ("7.0", False, "target_unknown")],
)
def test_refused_before_any_download(
    reader: Reader, version: str, allow: bool, reason: str
) -> None:
    reader.publish("0.9")
    reader.publish("1.0")
    job = reader.run("job-d", version, allow)
    assert (job.state, job.reason) == (S.REJECTED, reason)
    assert reader.target_requests() == []
    assert reader.trail("job-d") == [("QUEUED", "queued"), ("REJECTED", reason)]


def test_downgrade_allowed_by_the_job(reader: Reader) -> None:
    reader.publish("0.9")
    job = reader.run("job-d", "0.9", allow_downgrade=True)
    assert (job.state, job.reason) == (S.SUCCEEDED, "healthy")
    assert reader.rig.running() == "0.9"


def test_too_little_disk_is_rejected_before_download(reader: Reader) -> None:
    bundle = reader.publish("2.0")
    size = bundle.stat().st_size
    job = reader.run("job-s", "2.0", free_space=lambda _p: 2 * size - 1)
    assert (job.state, job.reason) == (S.REJECTED, "insufficient_disk")
    assert reader.target_requests() == []


def test_expired_metadata_is_rejected(reader: Reader) -> None:
    reader.publish("2.0")
    refresh_timestamp(reader.repo, reader.keys, now=lambda: datetime.now(UTC) - timedelta(days=9))
    job = reader.run("job-e", "2.0")
    assert (job.state, job.reason) == (S.REJECTED, "metadata_expired")
    assert reader.releases.current_version() == "1.0"


def test_clock_behind_the_build_waits_then_reports_the_clock(reader: Reader) -> None:
    reader.publish("2.0", build_time_ns=BUILD_NS)
    reader.rig.clock_wait_s = 0.3
    behind = Clock(offset_ns=BUILD_NS - 3600 * 10**9 - time.time_ns())  # an hour before
    job = reader.run("job-c", "2.0", clock=behind)
    assert (job.state, job.reason) == (S.REJECTED, "clock_behind_build")
    assert reader.trail("job-c") == [
        ("QUEUED", "queued"),
        ("QUEUED", "waiting_for_clock"),
        ("REJECTED", "clock_behind_build"),
    ]
    assert reader.target_requests() == []


def test_a_job_waiting_for_the_clock_is_cancelled_one_downloading_is_not(
    reader: Reader,
) -> None:
    reader.publish("2.0", build_time_ns=BUILD_NS)
    behind = Clock(offset_ns=BUILD_NS - 3600 * 10**9 - time.time_ns())  # an hour before
    updater = reader.updater(clock=behind)
    updater.poll_s = 60.0  # only a woken wait lets the cancel end the job within the test
    done: list[Job] = []
    worker = threading.Thread(target=lambda: done.append(updater.run(JobRequest("job-c", "2.0"))))
    worker.start()
    try:
        assert wait_until(lambda: ("QUEUED", "waiting_for_clock") in reader.trail("job-c"))
        assert not updater.cancel("job-other")  # not the job it runs
        assert updater.cancel("job-c")
    finally:
        worker.join(10)
    assert not worker.is_alive()
    (job,) = done
    assert (job.state, job.reason) == (S.REJECTED, "cancelled")
    assert reader.trail("job-c") == [
        ("QUEUED", "queued"),
        ("QUEUED", "waiting_for_clock"),
        ("REJECTED", "cancelled"),
    ]
    assert JobStore(reader.rig.state / "job.json").load() == job
    assert reader.target_requests() == []  # nothing downloaded
    assert reader.releases.current_version() == "1.0"
    assert reader.releases.list() == ["1.0"]
    assert not updater.cancel("job-c")  # finished

    # once the download has started, a cancel is refused and changes nothing
    reader.rig.modes["2.0"] = "broken"  # ends the job quickly after the download
    answers: list[bool] = []

    def report(j: Job) -> None:
        reader.reports.append(j)
        if j.reason == "download_started":
            answers.append(late.cancel("job-d"))

    late = reader.rig.updater(report, reader.supervisor)
    job = late.run(JobRequest("job-d", "2.0"))
    assert answers == [False]
    assert (job.state, job.reason) == (S.FAILED, "install_failed")
    assert ("INSTALLING", "verified") in reader.trail("job-d")
    assert reader.releases.current_version() == "1.0"


def test_unsynced_clock_waits_then_the_job_goes_on(reader: Reader) -> None:
    reader.publish("2.0")
    job = reader.run("job-u", "2.0", clock=Clock(synced_after=3))
    assert (job.state, job.reason) == (S.SUCCEEDED, "healthy")
    assert reader.trail("job-u")[:3] == [
        ("QUEUED", "queued"),
        ("QUEUED", "waiting_for_clock"),
        ("DOWNLOADING", "download_started"),
    ]
    never = Clock(synced_after=10**9)
    reader.rig.clock_wait_s = 0.2
    reader.publish("2.1")
    assert reader.run("job-n", "2.1", clock=never).reason == "clock_unsynced"


def test_failing_install_keeps_the_old_release(reader: Reader) -> None:
    reader.publish("2.0")
    reader.rig.modes["2.0"] = "broken"
    job = reader.run("job-f", "2.0")
    assert (job.state, job.reason) == (S.FAILED, "install_failed")
    assert "No space left" in job.detail
    assert reader.releases.current_version() == "1.0"


def test_a_resumed_download_waits_for_the_clock_again(reader: Reader) -> None:
    reader.publish("2.0")
    store = JobStore(reader.rig.state / "job.json")
    store.save(Job("job-r", "1.0", "2.0", S.DOWNLOADING, "download_started", 1))
    job = reader.updater(clock=Clock(synced_after=2)).resume()
    assert job is not None
    assert (job.state, job.reason) == (S.SUCCEEDED, "healthy")
    assert reader.trail("job-r")[:3] == [
        ("DOWNLOADING", "resumed_after_restart"),
        ("DOWNLOADING", "waiting_for_clock"),
        ("DOWNLOADING", "download_progress"),
    ]
    assert reader.rig.running() == "2.0"


def test_a_failing_report_does_not_stop_the_job(reader: Reader) -> None:
    reader.publish("2.0")

    def broken(job: Job) -> None:
        raise ConnectionError("broker gone")

    job = reader.rig.updater(broken, reader.supervisor).run(JobRequest("job-b", "2.0"))
    assert (job.state, job.reason) == (S.SUCCEEDED, "healthy")
    assert JobStore(reader.rig.state / "job.json").load() == job


def test_another_unfinished_job_must_be_resumed_first(reader: Reader) -> None:
    store = JobStore(reader.rig.state / "job.json")
    store.save(Job("job-old", "1.0", "2.0", S.DOWNLOADING, "download_started", 1))
    with pytest.raises(JobStateError, match="job-old is still DOWNLOADING"):
        reader.run("job-new", "2.0")


# --- kill -9 at every persisted step, then resume() -----------------------------------------

KILLS = [
    # (version, kill at reason, final state, final reason, current after)
    ("2.0", "queued", S.SUCCEEDED, "healthy", "2.0"),
    ("2.0", "download_started", S.SUCCEEDED, "healthy", "2.0"),
    ("2.0", "download_progress", S.SUCCEEDED, "healthy", "2.0"),
    ("2.0", "verified", S.FAILED, "interrupted_install", "1.0"),
    ("2.0", "installing_midway", S.FAILED, "interrupted_install", "1.0"),
    ("2.0", "waiting_for_door_idle", S.SUCCEEDED, "healthy", "2.0"),
    ("2.0", "switched", S.SUCCEEDED, "healthy", "2.0"),
    ("2.0", "healthy", S.SUCCEEDED, "healthy", "2.0"),
    ("3.0", "switched", S.ROLLED_BACK, "exited_at_start", "1.0"),
    ("3.0", "exited_at_start", S.ROLLED_BACK, "exited_at_start", "1.0"),
]


@pytest.mark.parametrize(("version", "kill_at", "state", "reason", "current"), KILLS)
def test_kill_9_at_every_step_then_resume(  # noqa: PLR0917 - one per parametrized column
    reader: Reader,
    tmp_path: Path,
    version: str,
    kill_at: str,
    state: JobState,
    reason: str,
    current: str,
) -> None:
    reader.publish(version)
    if kill_at == "waiting_for_door_idle":
        reader.rig.door_busy_looks = 10**9  # the driver waits for the door until killed
    config = tmp_path / "driver.json"
    config.write_text(
        json.dumps(
            {
                "rig": reader.rig.to_json(),
                "kill_at": kill_at,
                "request": {"job_id": "job-k", "version": version, "allow_downgrade": False},
            }
        )
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.ota.updater_rig", str(config)],
        cwd=PROJECT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:  # the driver blocks after printing "at ..."
            lines.append(line)
            if line == f"at {kill_at}\n":
                break
        else:
            pytest.fail(f"driver ended before {kill_at}: {lines}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
    reader.rig.door_busy_looks = 0
    job = reader.updater().resume()
    assert job is not None
    assert (job.state, job.reason) == (state, reason), lines
    assert reader.releases.current_version() == current
    assert reader.releases.is_complete(current)
    if state is not S.FAILED and kill_at != "healthy":
        # the resumed updater restarted the service on the right release
        assert wait_until(lambda: reader.rig.running() == current)
        assert reader.supervisor.probe().running
    # nothing half-made is left: unstamped folders and staging are swept
    assert all(reader.releases.is_complete(v) for v in reader.releases.list())
    assert [p.name for p in reader.releases.releases_dir.iterdir() if p.name.startswith(".")] == []
    if kill_at == "download_progress":
        starts = [start for _, start in reader.target_requests()]
        assert starts[-1] is not None and starts[-1] > 0  # resumed the partial file
    # resuming again is a no-op on a terminal job
    assert reader.updater().resume() == job
