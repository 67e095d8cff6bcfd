"""The update job of one reader: a pure state machine plus a power-cut-safe store.

States and transitions follow AWS IoT Jobs (QUEUED, IN_PROGRESS split into DOWNLOADING,
INSTALLING and PENDING_COMMIT, then a terminal state). Every transition carries a reason code
(lower-case ``snake_case``) and the two versions involved, so the technician reads exactly what
happened on each device::

    QUEUED         --START-->      DOWNLOADING     "download_started"
    DOWNLOADING    --PROGRESS-->   DOWNLOADING     "download_progress" (bytes done / total)
    DOWNLOADING    --RESUME-->     DOWNLOADING     "resumed_after_restart"
    DOWNLOADING    --DOWNLOADED--> INSTALLING      "verified"
    INSTALLING     --SWITCHED-->   PENDING_COMMIT  "switched"
    PENDING_COMMIT --HEALTHY-->    SUCCEEDED       "healthy"
    PENDING_COMMIT --ROLLBACK-->   ROLLED_BACK     reason required
    QUEUED, DOWNLOADING --REJECT-->             REJECTED  reason required
    QUEUED, DOWNLOADING, INSTALLING --FAIL-->   FAILED    reason required
    QUEUED, DOWNLOADING, INSTALLING --WAIT-->   (same state)  reason required
                   ("waiting_for_clock", "waiting_for_door_idle": the job is held, not lost)

SUCCEEDED, FAILED, ROLLED_BACK and REJECTED are terminal: nothing leaves them. REJECTED means
the bundle or the job itself was refused (tampered, downgrade, too little disk); FAILED means
an accepted update could not be carried out; in both the old release was never touched.

Each transition may carry a ``detail``: one line of text for people (pip's last error lines,
the exit code of a crashed release), at most :data:`MAX_DETAIL_CHARS` characters, never
parsed; the next transition replaces it.

Restart after a kill -9 or a power cut (:func:`recover`), given the version now running::

    state at restart  running version   outcome
    QUEUED            any               QUEUED (unchanged: start again)
    DOWNLOADING       any               DOWNLOADING "resumed_after_restart", progress kept
    INSTALLING        to_version        PENDING_COMMIT "switched_before_restart"
    INSTALLING        anything else     FAILED "interrupted_install" (old release untouched)
    PENDING_COMMIT    to_version        PENDING_COMMIT (unchanged: the health check decides)
    PENDING_COMMIT    anything else     ROLLED_BACK "crashed_before_commit"
    terminal          any               unchanged

:class:`JobStore` writes each new state to disk (temp file, fsync, rename, folder fsync)
before the caller acts on it, so the state read back after a restart is never ahead of what
was done except by the one step that was about to start, which is what the table handles.
"""

from __future__ import annotations

import enum
import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ota.exceptions import JobStateError
from provisioning.files import NotRegularFileError, fsync_dir, read_regular, write_atomic

#: Largest job file read back (bytes): a job is a few hundred bytes.
JOB_FILE_CAP = 64 * 1024

#: Longest ``detail`` kept (characters); longer texts are cut (ota.jobs reports as many).
MAX_DETAIL_CHARS = 256

_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")


class JobState(enum.StrEnum):
    """Where a job is; the string values are the ones published over MQTT."""

    QUEUED = "QUEUED"
    DOWNLOADING = "DOWNLOADING"
    INSTALLING = "INSTALLING"
    PENDING_COMMIT = "PENDING_COMMIT"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"

    @property
    def terminal(self) -> bool:
        """True for SUCCEEDED, FAILED, ROLLED_BACK and REJECTED."""
        return self in _TERMINAL


_TERMINAL = frozenset(
    {JobState.SUCCEEDED, JobState.FAILED, JobState.ROLLED_BACK, JobState.REJECTED}
)


class EventKind(enum.StrEnum):
    """What happened to a job (see the module docstring for where each one is legal)."""

    START = "START"
    PROGRESS = "PROGRESS"
    RESUME = "RESUME"
    DOWNLOADED = "DOWNLOADED"
    SWITCHED = "SWITCHED"
    HEALTHY = "HEALTHY"
    ROLLBACK = "ROLLBACK"
    REJECT = "REJECT"
    FAIL = "FAIL"
    WAIT = "WAIT"


_S, _E = JobState, EventKind

#: (state, event) -> next state; anything missing is an illegal transition.
TRANSITIONS: dict[tuple[JobState, EventKind], JobState] = {
    (_S.QUEUED, _E.START): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.PROGRESS): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.RESUME): _S.DOWNLOADING,
    (_S.DOWNLOADING, _E.DOWNLOADED): _S.INSTALLING,
    (_S.INSTALLING, _E.SWITCHED): _S.PENDING_COMMIT,
    (_S.PENDING_COMMIT, _E.HEALTHY): _S.SUCCEEDED,
    (_S.PENDING_COMMIT, _E.ROLLBACK): _S.ROLLED_BACK,
    (_S.QUEUED, _E.REJECT): _S.REJECTED,
    (_S.DOWNLOADING, _E.REJECT): _S.REJECTED,
    (_S.QUEUED, _E.FAIL): _S.FAILED,
    (_S.DOWNLOADING, _E.FAIL): _S.FAILED,
    (_S.INSTALLING, _E.FAIL): _S.FAILED,
    (_S.QUEUED, _E.WAIT): _S.QUEUED,
    (_S.DOWNLOADING, _E.WAIT): _S.DOWNLOADING,
    (_S.INSTALLING, _E.WAIT): _S.INSTALLING,
}

#: Reason used when the event gives none; events missing here must give a reason.
DEFAULT_REASONS: dict[EventKind, str] = {
    _E.START: "download_started",
    _E.PROGRESS: "download_progress",
    _E.RESUME: "resumed_after_restart",
    _E.DOWNLOADED: "verified",
    _E.SWITCHED: "switched",
    _E.HEALTHY: "healthy",
}


@dataclass(frozen=True)
class Event:
    """Something that happened to a job.

    ``reason`` is a ``snake_case`` code (at most 64 characters), required for ROLLBACK,
    REJECT, FAIL and WAIT. ``bytes_done`` and ``bytes_total`` (bytes; total None when unknown)
    are read only for PROGRESS. ``detail``: text for people (see the module docstring)."""

    kind: EventKind
    reason: str = ""
    bytes_done: int = 0
    bytes_total: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class Job:
    """One update of one reader from ``from_version`` to ``to_version``.

    ``step`` counts transitions (0 when queued) so a report can be ordered and a stale one
    dropped; ``bytes_done``/``bytes_total`` are the download progress in bytes (total None
    while unknown) and are kept through the later states. ``allow_downgrade``: the job may
    install an older version (kept so a resumed job checks the target as the request did).
    ``detail``: one line for people about the last transition ("" when none; at most
    :data:`MAX_DETAIL_CHARS` characters)."""

    job_id: str
    from_version: str
    to_version: str
    state: JobState = JobState.QUEUED
    reason: str = "queued"
    step: int = 0
    bytes_done: int = 0
    bytes_total: int | None = None
    allow_downgrade: bool = False
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The job as a JSON-ready dict (the job file and the MQTT job report)."""
        return {
            "job_id": self.job_id,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "state": self.state.value,
            "reason": self.reason,
            "step": self.step,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "allow_downgrade": self.allow_downgrade,
            "detail": self.detail,
        }

    @classmethod
    def from_dict(cls, data: object) -> Job:
        """Parse :meth:`to_dict` output. Raises JobStateError on any missing, extra or
        ill-typed field, unknown state, bad reason code or impossible progress."""
        if not isinstance(data, dict):
            raise JobStateError("job record is not a JSON object")
        fields = {
            "job_id",
            "from_version",
            "to_version",
            "state",
            "reason",
            "step",
            "bytes_done",
            "bytes_total",
            "allow_downgrade",
            "detail",
        }
        if set(data) != fields:
            raise JobStateError(f"job record has fields {sorted(data)}, expected {sorted(fields)}")
        for name in ("job_id", "from_version", "to_version", "state", "reason"):
            if not isinstance(data[name], str) or not data[name]:
                raise JobStateError(f"job record field {name!r} is not a non-empty string")
        for name in ("step", "bytes_done"):
            if type(data[name]) is not int or data[name] < 0:
                raise JobStateError(f"job record field {name!r} is not a non-negative integer")
        total = data["bytes_total"]
        if total is not None and (type(total) is not int or total < 0):
            raise JobStateError("job record field 'bytes_total' is not null or an integer >= 0")
        if not isinstance(data["allow_downgrade"], bool):
            raise JobStateError("job record field 'allow_downgrade' is not true or false")
        detail = data["detail"]
        if not isinstance(detail, str) or len(detail) > MAX_DETAIL_CHARS:
            raise JobStateError(
                f"job record field 'detail' is not a string of at most {MAX_DETAIL_CHARS} chars"
            )
        try:
            state = JobState(data["state"])
        except ValueError:
            raise JobStateError(f"job record has unknown state {data['state']!r}") from None
        _check_reason(data["reason"])
        _check_progress(data["bytes_done"], total)
        return cls(
            job_id=data["job_id"],
            from_version=data["from_version"],
            to_version=data["to_version"],
            state=state,
            reason=data["reason"],
            step=data["step"],
            bytes_done=data["bytes_done"],
            bytes_total=total,
            allow_downgrade=data["allow_downgrade"],
            detail=detail,
        )


def one_line(text: str) -> str:
    """``text`` as one printable line of at most :data:`MAX_DETAIL_CHARS` characters (control
    characters become spaces, runs of blanks one space): a job's ``detail``."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text)
    return " ".join(cleaned.split())[:MAX_DETAIL_CHARS]


def _check_reason(reason: str) -> None:
    if not _REASON.fullmatch(reason):
        raise JobStateError(f"reason {reason!r} is not a snake_case code of at most 64 characters")


def _check_progress(done: int, total: int | None) -> None:
    if done < 0 or (total is not None and (total < 0 or done > total)):
        raise JobStateError(f"impossible download progress {done}/{total} bytes")


def advance(job: Job, event: Event) -> Job:
    """The job after ``event`` (a new Job; ``job`` is unchanged).

    Raises JobStateError when ``event`` is not legal in ``job.state`` (terminal states accept
    nothing), when a ROLLBACK, REJECT, FAIL or WAIT has no reason, when the reason is not a
    ``snake_case`` code, or when PROGRESS gives negative bytes or more than the total."""
    target = TRANSITIONS.get((job.state, event.kind))
    if target is None:
        raise JobStateError(
            f"job {job.job_id}: {event.kind.value} is not allowed in state {job.state.value}"
        )
    reason = event.reason or DEFAULT_REASONS.get(event.kind, "")
    if not reason:
        raise JobStateError(f"job {job.job_id}: {event.kind.value} needs a reason code")
    _check_reason(reason)
    done, total = job.bytes_done, job.bytes_total
    if event.kind is EventKind.PROGRESS:
        _check_progress(event.bytes_done, event.bytes_total)
        done, total = event.bytes_done, event.bytes_total
    return replace(
        job,
        state=target,
        reason=reason,
        step=job.step + 1,
        bytes_done=done,
        bytes_total=total,
        detail=one_line(event.detail),
    )


def recover(job: Job, current_version: str | None) -> Job:
    """What a restart after a kill -9 or power cut in ``job.state`` means, given the version
    now running (``current_version``, None when there is none); the table is in the module
    docstring. Pure: the caller persists the result (:meth:`JobStore.advance` does)."""
    if job.state is JobState.DOWNLOADING:
        return advance(job, Event(EventKind.RESUME))
    if job.state is JobState.INSTALLING:
        if current_version == job.to_version:
            # the link was switched but the SWITCHED step was not recorded before the cut
            return advance(job, Event(EventKind.SWITCHED, "switched_before_restart"))
        return advance(job, Event(EventKind.FAIL, "interrupted_install"))
    if job.state is JobState.PENDING_COMMIT and current_version != job.to_version:
        return advance(job, Event(EventKind.ROLLBACK, "crashed_before_commit"))
    return job


class JobStore:
    """The current job of the reader, kept in one JSON file at ``path`` (mode 0600).

    Writes are atomic (provisioning.files.write_atomic: temp file, fsync, rename, folder
    fsync): after a power cut the file holds the old job or the new one, never a torn one."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def save(self, job: Job) -> None:
        """Write ``job`` durably. Raises OSError when the folder is not writable."""
        data = json.dumps(job.to_dict(), sort_keys=True, indent=1).encode() + b"\n"
        write_atomic(self.path, data, 0o600, overwrite=True)

    def load(self) -> Job | None:
        """The stored job, or None when there is no job file. Raises JobStateError naming the
        file when it is not a regular file, too large, not JSON or not a valid job record."""
        try:
            data, _mode = read_regular(self.path, JOB_FILE_CAP, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except (NotRegularFileError, OSError) as exc:
            raise JobStateError(f"{self.path}: cannot read the job file: {exc}") from exc
        try:
            return Job.from_dict(json.loads(data))
        except (ValueError, JobStateError) as exc:
            raise JobStateError(f"{self.path}: damaged job file: {exc}") from exc

    def advance(self, job: Job, event: Event) -> Job:
        """:func:`advance`, then :meth:`save` the result before returning it: the caller acts
        on a step only once it is on disk. Raises JobStateError (nothing written) or
        OSError."""
        new = advance(job, event)
        self.save(new)
        return new

    def recover(self, current_version: str | None) -> Job | None:
        """Load the job, apply :func:`recover` and save the result if it changed; None when
        there is no job. Raises JobStateError (damaged file) or OSError."""
        job = self.load()
        if job is None:
            return None
        new = recover(job, current_version)
        if new != job:
            self.save(new)
        return new

    def clear(self) -> None:
        """Remove the job file (durably); no error when there is none."""
        self.path.unlink(missing_ok=True)
        fsync_dir(self.path.parent)
