"""The reader's updater: carries one job from QUEUED to a terminal state, step by step.

Steps (states and reason codes of :mod:`ota.job`; each step is written to the
:class:`ota.job.JobStore` and reported *before* the updater acts on it)::

    QUEUED          clock synced? (else WAIT "waiting_for_clock", re-checked every poll_s,
                    REJECTED "clock_unsynced" after clock_wait_s)
                    until the download starts, :meth:`Updater.cancel` (another thread) ends
                    the job REJECTED "cancelled" at its next check (the clock wait wakes)
                    TUF refresh + target (REJECTED "metadata_expired", "metadata_rejected",
                    "target_unknown"; FAILED "metadata_unreachable")
                    clock later than the bundle's build? (WAIT, then REJECTED
                    "clock_behind_build")
                    target checks (REJECTED "python_mismatch", "wrong_device_type",
                    "same_version", "downgrade", "below_min_version") and free space >= 2x
                    the bundle (REJECTED "insufficient_disk"): all before any download
    DOWNLOADING     resumable download with progress (REJECTED "tampered",
                    "bundle_too_large"; FAILED "download_failed", detail: why;
                    FAILED "local_disk_error" in any step when the reader's disk fails)
    INSTALLING      "verified": venv from the wheelhouse (FAILED "install_failed",
                    "bad_bundle", detail: pip's last lines); door idle? (else WAIT
                    "waiting_for_door_idle", for as long as it takes); switch ``current``
                    (FAILED "switch_failed")
    PENDING_COMMIT  "switched": restart the service, health gate (READY, pings, broker)
    SUCCEEDED       "healthy": old releases pruned (keep N)
    ROLLED_BACK     "exited_at_start", "not_ready", "no_frames", "broker_not_connected",
                    "restart_failed": ``current`` back to the old release, service restarted

Restart after a kill -9 or power cut (:meth:`Updater.resume`): the table of
:func:`ota.job.recover`, plus: a job cut short in INSTALLING whose release folder is complete
(stamped) carries on to the door wait and the switch instead of failing; a ROLLED_BACK job
whose failed release is still ``current`` (the cut came between recording the rollback and
doing it) is rolled back now. Unstamped release folders of killed installs are removed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn, Protocol

from ota.bundle import native_platform
from ota.exceptions import (
    ClockNotReadyError,
    DownloadFailedError,
    InstallError,
    JobStateError,
    RejectedError,
    ReleaseError,
    UnhealthyError,
)
from ota.fetch import Target, check_clock, check_space, check_target, free_bytes
from ota.health import DoorActivity, ServiceSupervisor, wait_door_idle, wait_healthy
from ota.job import Event, EventKind, Job, JobState, JobStore
from ota.releases import Releases

log = logging.getLogger(__name__)

_E, _S = EventKind, JobState

NO_RELEASE = "none"
"""``from_version`` of a job on a reader with no ``current`` release (it is rejected)."""


class Clock(Protocol):
    """The wall clock and whether it can be trusted (NTP in step)."""

    def wall_ns(self) -> int:
        """Now, ns since the epoch."""
        ...

    def synced(self) -> bool:
        """True while the clock is synchronised."""
        ...


class BundleFetcher(Protocol):
    """What the updater needs of :class:`ota.fetch.Fetcher`."""

    def refresh_and_find(self, version: str) -> Target:
        """Refresh the TUF metadata and return the signed target of ``version``."""
        ...

    def fetch(self, target: Target, progress: Callable[[int, int], None] | None = None) -> Path:
        """Download and verify ``target`` (resuming); its path."""
        ...


class Request(Protocol):
    """A job as asked for (:class:`ota.jobs.JobRequest` fits)."""

    @property
    def job_id(self) -> str: ...

    @property
    def version(self) -> str: ...

    @property
    def allow_downgrade(self) -> bool: ...


Installer = Callable[[Path, str], Path]
"""``installer(bundle_tar, version)`` installs and stamps ``releases/<version>`` and returns
it (:func:`ota.install.install_release` with its options bound); raises InstallError."""


class _JobFinishedError(Exception):
    """The job reached a terminal state early (rejected or failed)."""

    def __init__(self, job: Job) -> None:
        super().__init__(job.reason)
        self.job = job


class Updater:
    """Drives update jobs of one reader (see the module docstring).

    ``store``: the job file; ``releases``: the install root; ``fetcher``: TUF client;
    ``installer``: see :data:`Installer`; ``supervisor``: restarts and watches the reader
    service; ``activity``: the door's activity (restart only when idle); ``report(job)``:
    called after each step is on disk (must not block; its errors are logged and ignored: the
    state is on disk and is reported again); ``clock``: wall clock and sync state;
    ``device_type`` (``rpi4``, ``rpi5``), ``python_tag`` (``cp311``) and ``platform`` (default
    this machine's, ``linux_aarch64`` on a Pi): what targets must
    fit. ``keep``: releases kept after a success. ``health_deadline_s``, ``min_pings``,
    ``need_broker``: the health gate (:func:`ota.health.wait_healthy`). ``clock_wait_s``:
    how long a job waits for a trustworthy clock before it is rejected, ``poll_s`` how often
    the clock is looked at, ``door_poll_s`` the door; seconds. Progress is reported when the
    download advanced ``progress_step`` (a fraction of the bundle) and ``progress_every_s``
    passed since the last report, and at the end. ``free_space(path)``: bytes free there.
    ``monotonic``/``sleep``: injected time (``sleep`` None: real time; the clock wait is
    then an Event wait that :meth:`cancel` wakes at once; an injected ``sleep`` is called
    as it is and the cancel is seen after it returns).

    One job at a time, from one thread (the agent's worker); only :meth:`cancel` may be
    called from another thread."""

    def __init__(
        self,
        *,
        store: JobStore,
        releases: Releases,
        fetcher: BundleFetcher,
        installer: Installer,
        supervisor: ServiceSupervisor,
        activity: DoorActivity,
        report: Callable[[Job], None],
        clock: Clock,
        device_type: str,
        python_tag: str,
        platform: str | None = None,
        keep: int = 3,
        health_deadline_s: float = 120.0,
        min_pings: int = 3,
        need_broker: bool = True,
        clock_wait_s: float = 600.0,
        poll_s: float = 5.0,
        door_poll_s: float = 0.5,
        health_poll_s: float = 0.2,
        progress_step: float = 0.05,
        progress_every_s: float = 1.0,
        free_space: Callable[[Path], int] = free_bytes,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] | None = None,
    ) -> None:
        self.store, self.releases, self.fetcher = store, releases, fetcher
        self.installer, self.supervisor, self.activity = installer, supervisor, activity
        self._report_cb, self.clock = report, clock
        self.device_type, self.python_tag, self.keep = device_type, python_tag, keep
        self.platform = platform or native_platform()
        self.health_deadline_s, self.min_pings = health_deadline_s, min_pings
        self.need_broker = need_broker
        self.clock_wait_s, self.poll_s, self.door_poll_s = clock_wait_s, poll_s, door_poll_s
        self.health_poll_s = health_poll_s
        self.progress_step, self.progress_every_s = progress_step, progress_every_s
        self.free_space = free_space
        self._monotonic = monotonic
        self._injected_sleep = sleep
        self._sleep: Callable[[float], None] = sleep or time.sleep
        # cancel(): the id of the job that may still be cancelled (QUEUED, before the
        # download starts) and whether it was; both under _lock
        self._lock = threading.Lock()
        self._cancellable: str | None = None
        self._cancel = threading.Event()

    # --- entry points ----------------------------------------------------------------------

    def run(self, request: Request) -> Job:
        """Carry out ``request`` to a terminal state and return the final job.

        A request whose job id is the stored job's is not started twice: a finished job is
        returned as it is, an unfinished one carried on (:meth:`resume`). Raises
        JobStateError when another job is unfinished (call :meth:`resume` first) and OSError
        when the job file cannot be written; every other failure ends in the job's state."""
        try:
            stored = self.store.load()
        except JobStateError as e:
            log.error("%s: starting afresh", e)
            stored = None
        if stored is not None and stored.job_id == request.job_id:
            if stored.state.terminal:
                return stored
            resumed = self.resume()
            assert resumed is not None  # the stored job
            return resumed
        if stored is not None and not stored.state.terminal:
            raise JobStateError(
                f"job {stored.job_id} is still {stored.state.value}: resume it before "
                f"starting job {request.job_id}"
            )
        current = self.releases.current_version()
        job = Job(
            request.job_id,
            current or NO_RELEASE,
            request.version,
            allow_downgrade=request.allow_downgrade,
        )
        with self._lock:
            self._cancellable = job.job_id
            self._cancel.clear()
        try:
            self.store.save(job)
            self._report(job)
            if current is None:
                return self._step(job, _E.REJECT, "no_current_release", "no `current` link")
            return self._drive(job, resumed=False)
        finally:
            self._end_cancellable()

    def resume(self) -> Job | None:
        """Finish the job a kill -9 or power cut interrupted (see the module docstring) and
        return it; a terminal job is returned as it is (after any rollback it still needs);
        None when there is no job file. Raises JobStateError (damaged job file) and
        OSError."""
        job = self.store.load()
        if job is None:
            return None
        current = self.releases.current_version()
        if (
            job.state is _S.INSTALLING
            and current != job.to_version
            and self.releases.is_complete(job.to_version)
        ):
            log.info(
                "job %s: release %s was installed before the restart", job.job_id, job.to_version
            )
        else:
            recovered = self.store.recover(current)
            assert recovered is not None  # loaded above
            if recovered != job:
                self._report(recovered)
            job = recovered
        if job.state is _S.ROLLED_BACK and current == job.to_version != job.from_version:
            self._roll_back(job)
        self._sweep()
        if job.state.terminal:
            return job
        return self._drive(job, resumed=True)

    def cancel(self, job_id: str) -> bool:
        """Cancel job ``job_id`` if it has not started downloading (QUEUED: waiting for the
        clock, or any step before the download): the running :meth:`run` ends it REJECTED
        "cancelled" at its next check (a clock wait is woken), persisted and reported as
        every step. True when the cancel is taken; False (nothing changed) when the job is
        downloading or later, finished, or not the one running. Thread-safe."""
        with self._lock:
            if job_id != self._cancellable:
                return False
            self._cancel.set()
            return True

    # --- the steps -------------------------------------------------------------------------

    def _drive(self, job: Job, *, resumed: bool) -> Job:
        if job.state is _S.QUEUED:
            with self._lock:
                if self._cancellable != job.job_id:  # resumed; run() set it (keep a cancel)
                    self._cancellable = job.job_id
                    self._cancel.clear()
        try:
            if job.state in (_S.QUEUED, _S.DOWNLOADING):
                job, target = self._prepare(job)
                job, bundle = self._download(job, target)
                job = self._install(job, bundle)
            if job.state is _S.INSTALLING:
                job = self._switch(job)
                resumed = False  # the door was just found idle
            if job.state is _S.PENDING_COMMIT:
                job = self._commit(job, door_wait=resumed)
        except _JobFinishedError as f:
            return f.job
        finally:
            self._end_cancellable()
        return job

    def _end_cancellable(self) -> None:
        with self._lock:
            self._cancellable = None
            self._cancel.clear()

    def _check_cancelled(self, job: Job) -> None:
        """End ``job`` REJECTED "cancelled" if :meth:`cancel` asked for it."""
        if self._cancel.is_set():
            log.info("job %s: cancelled before the download", job.job_id)
            self._finish(job, _E.REJECT, "cancelled", "cancelled before the download started")

    def _clock_pause(self) -> None:
        """Wait poll_s before the clock is looked at again; a cancel ends a real wait."""
        if self._injected_sleep is not None:
            self._injected_sleep(self.poll_s)
        else:
            self._cancel.wait(self.poll_s)

    def _prepare(self, job: Job) -> tuple[Job, Target]:
        deadline = self._monotonic() + self.clock_wait_s
        job = self._wait_clock(job, None, deadline)
        target = self._find(job)
        self._check_cancelled(job)
        job = self._wait_clock(job, target.build_time_ns, deadline)
        try:
            check_target(
                target,
                running=job.from_version,
                device_type=self.device_type,
                python=self.python_tag,
                platform=self.platform,
                allow_downgrade=job.allow_downgrade,
            )
            # a resumed download's part file is part of the bundle's space already
            free = self.free_space(self.releases.root) + job.bytes_done
            check_space(free, target.length)
        except RejectedError as e:
            self._finish(job, _E.REJECT, e.reason, e.detail)
        except ReleaseError as e:
            self._finish(job, _E.REJECT, "bad_version", str(e))
        return job, target

    def _wait_clock(self, job: Job, build_time_ns: int | None, deadline: float) -> Job:
        while True:
            self._check_cancelled(job)
            try:
                check_clock(build_time_ns or 0, self.clock.wall_ns(), self.clock.synced())
            except ClockNotReadyError as e:
                if job.reason != "waiting_for_clock":
                    job = self._step(job, _E.WAIT, "waiting_for_clock", f"{e.reason}: {e.detail}")
                if self._monotonic() >= deadline:
                    self._finish(job, _E.REJECT, e.reason, e.detail)
                self._clock_pause()
                continue
            return job

    def _find(self, job: Job) -> Target:
        try:
            return self.fetcher.refresh_and_find(job.to_version)
        except RejectedError as e:
            self._finish(job, _E.REJECT, e.reason, e.detail)
        except DownloadFailedError as e:
            self._finish(job, _E.FAIL, e.reason, e.detail)
        except ReleaseError as e:
            self._finish(job, _E.REJECT, "bad_version", str(e))
        except OSError as e:
            self._finish(job, _E.FAIL, "local_disk_error", f"TUF metadata: {e}")

    def _download(self, job: Job, target: Target) -> tuple[Job, Path]:
        if job.state is _S.QUEUED:
            with self._lock:  # from here on cancel() says False; one taken before is honoured
                self._cancellable = None
            self._check_cancelled(job)
            job = self._step(job, _E.START)
        last = [job.bytes_done, self._monotonic()]
        state = [job]

        def progress(done: int, total: int) -> None:
            step = self.progress_step * total
            now = self._monotonic()
            if done - last[0] >= step and now - last[1] >= self.progress_every_s:
                last[:] = [done, now]
                state[0] = self._step(state[0], _E.PROGRESS, bytes_done=done, bytes_total=total)

        try:
            bundle = self.fetcher.fetch(target, progress)
        except RejectedError as e:
            self._finish(state[0], _E.REJECT, e.reason, e.detail)
        except DownloadFailedError as e:
            self._finish(state[0], _E.FAIL, "download_failed", f"{e.reason}: {e.detail}")
        except OSError as e:
            self._finish(state[0], _E.FAIL, "local_disk_error", f"download: {e}")
        job = state[0]
        if job.bytes_done != target.length or job.bytes_total != target.length:
            job = self._step(job, _E.PROGRESS, bytes_done=target.length, bytes_total=target.length)
        return self._step(job, _E.DOWNLOADED), bundle

    def _install(self, job: Job, bundle: Path) -> Job:
        try:
            self.installer(bundle, job.to_version)
        except InstallError as e:
            self._finish(job, _E.FAIL, e.reason, e.detail)
        except OSError as e:
            self._finish(job, _E.FAIL, "local_disk_error", f"install: {e}")
        finally:
            # installed or refused, the bundle is not needed again (a new job fetches anew)
            bundle.unlink(missing_ok=True)
        return job

    def _switch(self, job: Job) -> Job:
        state = [job]

        def on_busy() -> None:
            state[0] = self._step(state[0], _E.WAIT, "waiting_for_door_idle")

        wait_door_idle(self.activity, poll_s=self.door_poll_s, on_busy=on_busy, sleep=self._sleep)
        job = state[0]
        try:
            self.releases.switch(job.to_version)
        except (OSError, ReleaseError) as e:
            self._finish(job, _E.FAIL, "switch_failed", str(e))
        return self._step(job, _E.SWITCHED)

    def _commit(self, job: Job, *, door_wait: bool) -> Job:
        if door_wait:
            wait_door_idle(self.activity, poll_s=self.door_poll_s, sleep=self._sleep)
        try:
            self.supervisor.restart()
            wait_healthy(
                self.supervisor,
                deadline_s=self.health_deadline_s,
                min_pings=self.min_pings,
                need_broker=self.need_broker,
                poll_s=self.health_poll_s,
                monotonic=self._monotonic,
                sleep=self._sleep,
            )
        except UnhealthyError as e:
            # recorded first: a cut now is finished by resume(), which sees the release still
            # current and rolls back then
            job = self._step(job, _E.ROLLBACK, e.reason, e.detail)
            self._roll_back(job)
            return job
        except OSError as e:
            job = self._step(job, _E.ROLLBACK, "restart_failed", str(e))
            self._roll_back(job)
            return job
        job = self._step(job, _E.HEALTHY)
        try:
            removed = self.releases.prune(self.keep)
        except (OSError, ReleaseError) as e:  # the update is done; space is freed next time
            log.error("job %s: pruning old releases failed: %s", job.job_id, e)
        else:
            if removed:
                log.info("old releases removed: %s", ", ".join(removed))
        return job

    def _roll_back(self, job: Job) -> None:
        """Point ``current`` at the job's old release again and restart the service."""
        try:
            if self.releases.previous_version() == job.from_version:
                self.releases.rollback()
            else:
                self.releases.switch(job.from_version)
        except (OSError, ReleaseError) as e:
            log.critical("job %s: rollback to %s failed: %s", job.job_id, job.from_version, e)
            return
        try:
            self.supervisor.restart()
        except OSError as e:
            log.critical("job %s: restart after the rollback failed: %s", job.job_id, e)

    # --- helpers ---------------------------------------------------------------------------

    def _sweep(self) -> None:
        try:
            removed = self.releases.sweep_incomplete()
        except (OSError, ReleaseError) as e:
            log.error("removing incomplete releases failed: %s", e)
            return
        if removed:
            log.info("incomplete releases removed: %s", ", ".join(removed))

    def _step(
        self,
        job: Job,
        kind: EventKind,
        reason: str = "",
        detail: str = "",
        *,
        bytes_done: int = 0,
        bytes_total: int | None = None,
    ) -> Job:
        job = self.store.advance(
            job, Event(kind, reason, bytes_done=bytes_done, bytes_total=bytes_total, detail=detail)
        )
        self._report(job)
        return job

    def _finish(self, job: Job, kind: EventKind, reason: str, detail: str) -> NoReturn:
        raise _JobFinishedError(self._step(job, kind, reason, detail))

    def _report(self, job: Job) -> None:
        log.info(
            "job %s: %s %s (%s -> %s)%s",
            job.job_id,
            job.state.value,
            job.reason,
            job.from_version,
            job.to_version,
            f": {job.detail}" if job.detail else "",
        )
        try:
            self._report_cb(job)
        except Exception:  # the state is on disk; a report lost here is sent again later
            log.exception("job %s: reporting the state failed", job.job_id)
