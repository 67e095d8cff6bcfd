"""The OTA updater end to end, with nothing faked but the clock's NTP flag.

Real bundles built from this project (v1 9.1.0, v2 9.2.0, and v3 9.3.0 whose ``qrgate run``
exits with code 3 before READY), a real TUF repository served over HTTP on loopback, real
pip installs into venvs (:func:`ota.install.install_release`, wired as
``firmware.ota_agent.build_agent`` wires it), a real mosquitto, and the installed release's
real ``qrgate run`` daemon (replay camera, mock pins, ``[uplink]`` to the broker) started by
:class:`ota.health.SubprocessSupervisor` and judged by the production health gate (READY,
watchdog pings, ``MQTT connected``).

It proves: v1 installed by hand runs and is healthy; the update to v2 goes QUEUED ->
DOWNLOADING -> INSTALLING -> PENDING_COMMIT -> SUCCEEDED and leaves a v2 daemon running
from ``releases/9.2.0``; the update to the crashing v3 is ROLLED_BACK ("exited_at_start",
the exit code in the detail) and a v2 daemon is healthy again; a downgrade request is
REJECTED ("downgrade") before anything is downloaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from firmware.demo.broker import LocalBroker
from ota.fetch import MAX_BUNDLE_BYTES, Fetcher
from ota.health import ActivityFile, SubprocessSupervisor, wait_healthy
from ota.install import install_release
from ota.job import Job, JobState, JobStore
from ota.jobs import JobRequest
from ota.releases import STAMP, Releases
from ota.repository import init_repository, publish, trusted_root
from ota.updater import Updater
from tests.firmware.conftest import need_mosquitto, no_leaks
from tests.firmware.readers import write_reader_config
from tests.firmware.test_uplink import uplink_toml
from tests.ota.conftest import BundleFactory
from tests.ota.repo_server import RepoServer
from tests.ota.updater_rig import Clock

__all__ = ["need_mosquitto", "no_leaks"]

pytestmark = pytest.mark.usefixtures("no_leaks")

V1, V2, V3 = "9.1.0", "9.2.0", "9.3.0"
HEALTH_DEADLINE_S = 60.0


def crash_at_start(tree: Path) -> None:
    """v3: ``qrgate run`` exits with code 3 before it sets anything up (no READY)."""
    cli = tree / "firmware" / "cli.py"
    text = cli.read_text(encoding="utf-8")
    anchor = "    listener = setup_logging(verbose)\n"
    assert text.count(anchor) == 1, "firmware/cli.py run() changed: update the v3 patch"
    cli.write_text(
        text.replace(anchor, "    raise SystemExit(3)  # v3: crashes at start\n" + anchor),
        encoding="utf-8",
    )


@pytest.fixture
def broker(need_mosquitto: None, tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path / "broker", persistence=False) as b:
        yield b


def blank_reel(folder: Path) -> Path:
    """A few grey frames without a code: frames flow (watchdog pings), nobody scans (the door
    stays idle)."""
    folder.mkdir(parents=True)
    for i in range(4):
        Image.new("L", (320, 240), 96 + 16 * i).save(folder / f"{i:05d}.png")
    return folder


def daemon_cmdline(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    return [part.decode() for part in raw.split(b"\0") if part]


def test_install_update_crash_rollback_and_downgrade(
    native_bundle_factory: BundleFactory, broker: LocalBroker, tmp_path: Path
) -> None:
    # --- the repository: v1 (only for the downgrade request), v2 and the crashing v3 ------
    bundles = {
        V1: native_bundle_factory(V1),
        V2: native_bundle_factory(V2),
        V3: native_bundle_factory(V3, patch=crash_at_start),
    }
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    for bundle in bundles.values():
        publish(repo, keys, bundle)

    # --- the reader: v1 installed by hand, the way the image ships it ----------------------
    root, state = tmp_path / "opt", tmp_path / "st"
    state.mkdir()  # build_agent makes the state folder before the job store writes there
    releases = Releases(root)

    def installer(bundle: Path, version: str) -> Path:
        # firmware.ota_agent.build_agent's installer, with this machine's base interpreter;
        # v2, the release that must run on, gets .pyc files as on a reader, the others skip
        # them (suite time: about 8 s each)
        return install_release(
            bundle,
            releases,
            version,
            python=sys._base_executable,
            pip=None,
            max_bytes=MAX_BUNDLE_BYTES,
            compile_bytecode=version == V2,
        )

    half = releases.path(V1)  # a killed install's leftover under the name: replaced
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "python").write_text("leftover")
    v1_dir = installer(bundles[V1], V1)
    assert (v1_dir / "bin" / "python").is_symlink()  # the venv's, not the leftover file
    assert (v1_dir / STAMP).read_text() == f"{V1}\n"
    assert sorted(p.name for p in releases.releases_dir.iterdir()) == [V1]  # no staging left
    # qrgate and numpy come from the bundle's wheels in the venv, not from this checkout
    where = subprocess.run(
        [v1_dir / "bin" / "python", "-I", "-c", "import firmware, numpy; print(firmware.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(v1_dir))
    stamp_ns = (v1_dir / STAMP).stat().st_mtime_ns
    assert installer(bundles[V1], V1) == v1_dir  # a complete release is kept as it is
    assert (v1_dir / STAMP).stat().st_mtime_ns == stamp_ns
    releases.switch(V1)
    assert releases.current_version() == V1

    conf = tmp_path / "reader"
    conf.mkdir()
    activity_file = tmp_path / "activity.json"
    cfg = write_reader_config(
        conf,
        reel=blank_reel(tmp_path / "reel"),
        fps=20,
        extra=uplink_toml(broker.port) + f'\n[ota]\nactivity_file = "{activity_file}"\n',
    )
    cfg.write_text(cfg.read_text().replace("fps = 20", "fps = 20\nloop = true"))

    notify = tmp_path / "n"
    notify.mkdir()
    # the release's own interpreter and packages only: nothing of this checkout leaks in
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    supervisor = SubprocessSupervisor(
        lambda: [root / "current" / "bin" / "qrgate", "run", "--config", cfg],
        notify_dir=notify,
        env=env,
        watchdog_s=1.0,
        stop_timeout_s=10,
    )
    server = RepoServer(repo)
    try:
        supervisor.restart()
        try:
            wait_healthy(supervisor, deadline_s=HEALTH_DEADLINE_S, min_pings=3)
        except Exception:
            pytest.fail(f"v1 daemon unhealthy; log:\n{supervisor.log_path.read_text()[-3000:]}")

        def running_release() -> Path:
            assert supervisor.pid is not None
            # the venv's script runs under its own interpreter: argv[0] is releases/<v>/bin/python
            return Path(daemon_cmdline(supervisor.pid)[0]).parent.parent

        assert running_release() == releases.path(V1)

        reported: list[Job] = []
        updater = Updater(
            store=JobStore(state / "job.json"),
            releases=releases,
            fetcher=Fetcher(state / "metadata", state / "cache", server.url, trusted_root(repo)),
            installer=installer,
            supervisor=supervisor,
            activity=ActivityFile(activity_file),
            report=reported.append,
            clock=Clock(),  # always synced: this machine's NTP state is not under test
            device_type="rpi4",
            python_tag=f"cp{sys.version_info.major}{sys.version_info.minor}",
            health_deadline_s=HEALTH_DEADLINE_S,
            min_pings=3,
            need_broker=True,
            clock_wait_s=5,
            poll_s=0.05,
            door_poll_s=0.05,
            health_poll_s=0.1,
        )

        # --- v1 -> v2: SUCCEEDED, the daemon now runs from releases/9.2.0 -------------------
        job = updater.run(JobRequest("e2e-v2", V2))
        assert (job.state, job.reason) == (JobState.SUCCEEDED, "healthy"), job
        assert (job.from_version, job.to_version) == (V1, V2)
        assert releases.current_version() == V2
        assert releases.previous_version() == V1
        states = [j.state for j in reported]
        assert [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s] == [
            JobState.QUEUED,
            JobState.DOWNLOADING,
            JobState.INSTALLING,
            JobState.PENDING_COMMIT,
            JobState.SUCCEEDED,
        ]
        assert reported[-1] == job
        assert running_release() == releases.path(V2)
        assert supervisor.probe().running

        # --- v2 -> v3 (exits at start): ROLLED_BACK, v2 healthy again -----------------------
        reported.clear()
        job = updater.run(JobRequest("e2e-v3", V3))
        assert (job.state, job.reason) == (JobState.ROLLED_BACK, "exited_at_start"), job
        assert "exit code 3" in job.detail, job.detail
        assert JobState.PENDING_COMMIT in [j.state for j in reported]  # it was switched to
        assert releases.current_version() == V2
        try:
            wait_healthy(supervisor, deadline_s=HEALTH_DEADLINE_S, min_pings=3)
        except Exception:
            pytest.fail(f"v2 unhealthy after rollback:\n{supervisor.log_path.read_text()[-3000:]}")
        assert running_release() == releases.path(V2)

        # --- a downgrade to v1, not allowed: REJECTED before any download -------------------
        reported.clear()
        targets_before = [p for p, _ in server.faults.requests if p.startswith("/targets/")]
        job = updater.run(JobRequest("e2e-down", V1))
        assert (job.state, job.reason) == (JobState.REJECTED, "downgrade"), job
        assert [j.state for j in reported] == [JobState.QUEUED, JobState.REJECTED]
        targets_after = [p for p, _ in server.faults.requests if p.startswith("/targets/")]
        assert targets_after == targets_before  # no bundle requested
        assert not any(V1 in p.name for p in (state / "cache").iterdir())
        assert releases.current_version() == V2
        assert running_release() == releases.path(V2)
    finally:
        supervisor.close()
        server.close()
