"""A reader's updater wired for tests, and a driver to run it in a subprocess that a test
kills with SIGKILL at a chosen step.

Everything is real except two seams: the installer makes a release whose ``bin/qrgate`` is
``tests/ota/fake_daemon.py`` (after opening the bundle with ``ota.bundle.open_bundle``; the
pip install is tested in test_install.py) and the door activity is scripted. The TUF
repository, fetcher, download, releases, job store and service supervisor (a child process
speaking sd_notify) are the production code.

Driver: ``python -m tests.ota.updater_rig CONFIG.json``; the config holds a :class:`Rig`'s
fields plus ``kill_at`` (a reason code: when the updater reports it, the driver prints
``at <reason>`` and blocks, so the test kills it exactly there; ``installing_midway``
blocks inside the installer, after the release folder is created and before its stamp) and
``request`` (job id, version, allow_downgrade).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ota.bundle import open_bundle
from ota.exceptions import BundleError, InstallError
from ota.fetch import Fetcher, free_bytes
from ota.health import SubprocessSupervisor
from ota.job import Job, JobStore
from ota.jobs import JobRequest
from ota.releases import STAGING_PREFIX, Releases
from ota.updater import Updater

FAKE = Path(__file__).with_name("fake_daemon.py")
BUILD_NS = 1_700_000_000 * 10**9
"""Build time of the small test bundles (tests.ota.conftest.small_bundle's default)."""


class FakeInstaller:
    """Opens the bundle (checked), then makes ``releases/<version>`` whose ``bin/qrgate``
    runs the fake daemon in ``modes[version]`` (default ``good``), then stamps it. Mode
    ``broken``: fails as pip would. ``hang``: block after creating the folder (the driver's
    ``installing_midway``)."""

    def __init__(self, releases: Releases, modes: dict[str, str], hang: bool = False) -> None:
        self.releases, self.modes, self.hang = releases, modes, hang

    def __call__(self, bundle: Path, version: str) -> Path:
        self.releases.releases_dir.mkdir(parents=True, exist_ok=True)
        staging = self.releases.releases_dir / f"{STAGING_PREFIX}{secrets.token_hex(4)}"
        try:
            manifest = open_bundle(bundle, staging, max_bytes=1 << 30)
        except BundleError as e:
            raise InstallError("bad_bundle", str(e)) from e
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        assert manifest.version == version
        mode = self.modes.get(version, "good")
        if mode == "broken":
            raise InstallError("install_failed", "pip install: ERROR: No space left on device")
        dest = self.releases.path(version)
        (dest / "bin").mkdir(parents=True)
        if self.hang:
            print("at installing_midway", flush=True)
            threading.Event().wait()
        script = dest / "bin" / "qrgate"
        script.write_text(
            f"#!/bin/sh\nexport QRGATE_FAKE_VERSION={version}\n"
            f"exec {sys.executable} {FAKE} {mode}\n"
        )
        script.chmod(0o755)
        self.releases.complete(version)
        return dest


class Door:
    """Door activity: busy for the first ``busy_looks`` looks, then idle."""

    def __init__(self, busy_looks: int = 0) -> None:
        self.busy_looks = busy_looks
        self.looks = 0

    def busy(self) -> bool:
        self.looks += 1
        return self.looks <= self.busy_looks


@dataclass
class Clock:
    """Wall clock (ns) and sync flag; ``synced_after`` looks report unsynced first."""

    offset_ns: int = 0
    synced_after: int = 0
    looks: int = 0

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def synced(self) -> bool:
        self.looks += 1
        return self.looks > self.synced_after


@dataclass
class Rig:
    """One reader: install root ``root``, state folder ``state``, repository ``url`` with
    its trusted root in ``trusted_root``, fake daemon modes by version."""

    root: Path
    state: Path
    url: str
    trusted_root: Path
    modes: dict[str, str] = field(default_factory=dict)
    door_busy_looks: int = 0
    clock_wait_s: float = 5.0

    @property
    def running_file(self) -> Path:
        return self.state / "running"

    def running(self) -> str:
        """The version of the fake daemon started last (``?`` when none, or while the
        daemon is still writing the file: it is not written atomically)."""
        try:
            words = self.running_file.read_text().split()
        except FileNotFoundError:
            return "?"
        return words[0] if words else "?"

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict[str, object]) -> Rig:
        return cls(
            root=Path(str(d["root"])),
            state=Path(str(d["state"])),
            url=str(d["url"]),
            trusted_root=Path(str(d["trusted_root"])),
            modes=dict(d["modes"]),  # type: ignore[call-overload]
            door_busy_looks=int(d["door_busy_looks"]),  # type: ignore[call-overload]
            clock_wait_s=float(d["clock_wait_s"]),  # type: ignore[arg-type]
        )

    def supervisor(self) -> SubprocessSupervisor:
        notify = self.state / "n"
        notify.mkdir(parents=True, exist_ok=True)
        return SubprocessSupervisor(
            lambda: [self.root / "current" / "bin" / "qrgate"],
            notify_dir=notify,
            env={**os.environ, "QRGATE_FAKE_RUNNING": str(self.running_file)},
            watchdog_s=0.4,
            stop_timeout_s=5,
        )

    def updater(
        self,
        report: Callable[[Job], None],
        supervisor: SubprocessSupervisor,
        *,
        clock: Clock | None = None,
        free_space: Callable[[Path], int] | None = None,
        hang_in_install: bool = False,
        progress_every_s: float = 1.0,
    ) -> Updater:
        releases = Releases(self.root)
        return Updater(
            store=JobStore(self.state / "job.json"),
            releases=releases,
            fetcher=Fetcher(
                self.state / "metadata",
                self.state / "cache",
                self.url,
                self.trusted_root.read_bytes(),
            ),
            installer=FakeInstaller(releases, self.modes, hang=hang_in_install),
            supervisor=supervisor,
            activity=Door(self.door_busy_looks),
            report=report,
            clock=clock or Clock(),
            device_type="rpi4",
            python_tag="cp311",
            keep=2,
            health_deadline_s=20,
            min_pings=3,
            need_broker=True,
            clock_wait_s=self.clock_wait_s,
            poll_s=0.05,
            door_poll_s=0.01,
            health_poll_s=0.05,
            progress_step=0.0,
            progress_every_s=progress_every_s,
            free_space=free_space or free_bytes,
        )


def main(config_path: str) -> int:
    cfg = json.loads(Path(config_path).read_text())
    rig = Rig.from_json(cfg["rig"])
    kill_at: str = cfg["kill_at"]

    def report(job: Job) -> None:
        print(f"state {job.state.value} {job.reason}", flush=True)
        if job.reason == kill_at:
            print(f"at {kill_at}", flush=True)
            threading.Event().wait()

    supervisor = rig.supervisor()
    updater = rig.updater(
        report,
        supervisor,
        hang_in_install=kill_at == "installing_midway",
        progress_every_s=0.0,
    )
    job = updater.run(JobRequest(**cfg["request"]))
    print(f"done {job.state.value} {job.reason}", flush=True)
    supervisor.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
