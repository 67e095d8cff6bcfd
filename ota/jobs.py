"""The OTA job contract over MQTT: topics and payloads shared by the reader's update agent,
the fleet rollout and the fleet simulator (pure: no I/O).

Both topics sit under a reader's ``qrgate/v1/<site>/<device>/`` (the prefix of
``firmware.uplink.topics``, repeated here because ``ota`` imports nothing from ``firmware``):

``ota/job`` (→ reader, QoS 1, retained)
    ``{"job_id": str, "version": str, "allow_downgrade": bool, "rollout": str,
    "issued_wall_ns": int}`` (:class:`JobRequest`). An empty retained payload cancels a job
    that has not started downloading (a reader that already downloads carries on).
``ota/state`` (reader →, QoS 1, retained)
    ``{"device", "site", "job_id", "state", "reason", "from_version", "to_version", "step",
    "bytes_done", "bytes_total", "current_version", "detail", "wall_ns"}``
    (:class:`StatePayload`): states and reason codes of :mod:`ota.job`; ``step`` orders the
    reports of one job; ``detail`` is free text for people (at most 256 characters, "" when
    none), never parsed.

Parsers ignore fields they do not know (later additions) and refuse payloads over
:data:`MAX_PAYLOAD_BYTES` unread.

A reader's agent::

    topics = OtaTopics(site, device)
    subscribe(topics.job)                     # retained: the pending job arrives at once
    request = JobRequest.parse(payload)       # None: cancelled; raises JobPayloadError
    publish(topics.state, StatePayload.from_job(job, site=..., device=..., current_version=...,
            wall_ns=time.time_ns()).to_bytes(), qos=1, retain=True)
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from ota.exceptions import JobPayloadError, ReleaseError
from ota.job import MAX_DETAIL_CHARS as JOB_DETAIL_CHARS
from ota.job import Job, JobState
from ota.releases import check_version

PREFIX = "qrgate/v1"
"""The contract prefix (``firmware.uplink.topics.PREFIX``; a test keeps them equal)."""

MAX_PAYLOAD_BYTES = 4096
"""Largest ``ota/job`` or ``ota/state`` payload read (bytes): real ones are under 600."""

MAX_DETAIL_CHARS = JOB_DETAIL_CHARS
"""Longest ``detail`` text in a state report (characters; :data:`ota.job.MAX_DETAIL_CHARS`)."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")
_REASON = re.compile(r"[a-z][a-z0-9_]{0,63}")
_NAME_FORBIDDEN = "/+#\x00"


def check_name(what: str, value: str) -> str:
    """Return ``value`` when it can be a site or device part of a topic (non-empty, no
    ``/ + #`` or NUL, at most 128 characters); raise JobPayloadError naming ``what``."""
    if not value or len(value) > 128 or any(c in value for c in _NAME_FORBIDDEN):
        raise JobPayloadError(f"{what} {value!r} cannot be part of an MQTT topic")
    return value


def check_id(what: str, value: str) -> str:
    """Return ``value`` when it is a job or rollout id (``[A-Za-z0-9][A-Za-z0-9._:-]``, at
    most 64 characters); raise JobPayloadError naming ``what`` otherwise."""
    if not _ID.fullmatch(value):
        raise JobPayloadError(f"{what} {value!r} is not an id of 1-64 letters, digits, . _ : -")
    return value


@dataclass(frozen=True, slots=True)
class OtaTopics:
    """The OTA topics of one reader: ``qrgate/v1/<site>/<device>/ota/{job,state}``. Raises
    JobPayloadError when ``site`` or ``device`` cannot be part of a topic."""

    site: str
    device: str

    def __post_init__(self) -> None:
        check_name("site", self.site)
        check_name("device", self.device)

    @property
    def job(self) -> str:
        """``qrgate/v1/<site>/<device>/ota/job``."""
        return f"{PREFIX}/{self.site}/{self.device}/ota/job"

    @property
    def state(self) -> str:
        """``qrgate/v1/<site>/<device>/ota/state``."""
        return f"{PREFIX}/{self.site}/{self.device}/ota/state"


def all_jobs(site: str = "+") -> str:
    """Subscription filter for the jobs of every reader of ``site`` (``+``: every site)."""
    return f"{PREFIX}/{site if site == '+' else check_name('site', site)}/+/ota/job"


def all_states(site: str = "+") -> str:
    """Subscription filter for the state reports of every reader of ``site`` (``+``: every
    site)."""
    return f"{PREFIX}/{site if site == '+' else check_name('site', site)}/+/ota/state"


def parse_ota_topic(topic: str) -> tuple[str, str, str] | None:
    """``(site, device, "job" | "state")`` of an OTA topic, None for any other topic."""
    parts = topic.split("/")
    if len(parts) != 6 or f"{parts[0]}/{parts[1]}" != PREFIX or parts[4] != "ota":
        return None
    if parts[5] not in ("job", "state") or not parts[2] or not parts[3]:
        return None
    return parts[2], parts[3], parts[5]


def _load(payload: bytes, what: str) -> dict[str, Any]:
    if len(payload) > MAX_PAYLOAD_BYTES:
        raise JobPayloadError(f"{what}: {len(payload)} bytes, over the {MAX_PAYLOAD_BYTES} limit")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise JobPayloadError(f"{what}: not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise JobPayloadError(f"{what}: not JSON ({e.msg} at {e.pos})") from None
    except RecursionError:
        raise JobPayloadError(f"{what}: JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise JobPayloadError(f"{what}: a JSON {type(obj).__name__}, not an object")
    return obj


def _dumps(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _str(obj: dict[str, Any], name: str, what: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise JobPayloadError(f"{what}: {name!r} must be a non-empty string, found {value!r}")
    return value


def _int(obj: dict[str, Any], name: str, what: str, *, optional: bool = False) -> int | None:
    value = obj.get(name)
    if value is None and optional:
        return None
    if type(value) is not int or value < 0:
        raise JobPayloadError(f"{what}: {name!r} must be an integer >= 0, found {value!r}")
    return value


def _version(value: str, name: str, what: str) -> str:
    try:
        return check_version(value)
    except ReleaseError:
        raise JobPayloadError(f"{what}: {name!r} {value!r} is not a release version") from None


@dataclass(frozen=True, slots=True)
class JobRequest:
    """An update job as published on ``ota/job``.

    ``job_id``: the job (the rollout uses its rollout id: one job, many readers);
    ``version``: the release to install (a TUF target ``qrgate-<version>.tar``);
    ``allow_downgrade``: the reader may install a version older than the running one;
    ``rollout``: the rollout that issued it ("" when sent by hand); ``issued_wall_ns``: wall
    clock of the sender, ns since the epoch (information only: the reader's clock may be
    wrong). Raises JobPayloadError on a bad id or version."""

    job_id: str
    version: str
    allow_downgrade: bool = False
    rollout: str = ""
    issued_wall_ns: int = 0

    def __post_init__(self) -> None:
        check_id("job_id", self.job_id)
        _version(self.version, "version", "job")
        if self.rollout:
            check_id("rollout", self.rollout)
        if type(self.issued_wall_ns) is not int or self.issued_wall_ns < 0:
            raise JobPayloadError(f"job: issued_wall_ns {self.issued_wall_ns!r} is not >= 0")

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the contract."""
        return {
            "job_id": self.job_id,
            "version": self.version,
            "allow_downgrade": self.allow_downgrade,
            "rollout": self.rollout,
            "issued_wall_ns": self.issued_wall_ns,
        }

    def to_bytes(self) -> bytes:
        """The payload to publish (compact UTF-8 JSON) on :attr:`OtaTopics.job`."""
        return _dumps(self.to_dict())

    @classmethod
    def parse(cls, payload: bytes) -> JobRequest | None:
        """The job in an ``ota/job`` payload; None for an empty payload (the job is
        cancelled). Raises JobPayloadError (oversized, not a JSON object, ``job_id`` or
        ``version`` missing or invalid, ``allow_downgrade`` not a boolean, ...)."""
        if not payload:
            return None
        what = "ota/job"
        obj = _load(payload, what)
        allow = obj.get("allow_downgrade", False)
        if not isinstance(allow, bool):
            raise JobPayloadError(f"{what}: 'allow_downgrade' must be true or false")
        rollout = obj.get("rollout", "")
        if not isinstance(rollout, str):
            raise JobPayloadError(f"{what}: 'rollout' must be a string")
        issued = _int(obj, "issued_wall_ns", what, optional=True)
        return cls(
            job_id=_str(obj, "job_id", what),
            version=_str(obj, "version", what),
            allow_downgrade=allow,
            rollout=rollout,
            issued_wall_ns=issued or 0,
        )


@dataclass(frozen=True, slots=True)
class StatePayload:
    """One state report on ``ota/state``: where ``job_id`` is on ``device`` of ``site``.

    ``state``/``reason``: :class:`ota.job.JobState` and its snake_case reason code;
    ``from_version``/``to_version``: the update; ``step``: transitions so far (orders the
    reports of one job); ``bytes_done``/``bytes_total``: download progress in bytes (total
    None while unknown); ``current_version``: the release running now (None if none);
    ``detail``: text for people, at most :data:`MAX_DETAIL_CHARS` (cut on build);
    ``wall_ns``: the reader's wall clock, ns since the epoch. Raises JobPayloadError when a
    field breaks the contract."""

    device: str
    site: str
    job_id: str
    state: JobState
    reason: str
    from_version: str
    to_version: str
    step: int = 0
    bytes_done: int = 0
    bytes_total: int | None = None
    current_version: str | None = None
    detail: str = ""
    wall_ns: int = 0

    def __post_init__(self) -> None:
        check_name("device", self.device)
        check_name("site", self.site)
        check_id("job_id", self.job_id)
        if not isinstance(self.state, JobState):
            raise JobPayloadError(f"ota/state: state {self.state!r} is not a JobState")
        if not _REASON.fullmatch(self.reason):
            raise JobPayloadError(f"ota/state: reason {self.reason!r} is not a snake_case code")
        for name in ("from_version", "to_version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 64:
                raise JobPayloadError(f"ota/state: {name} {value!r} is not a version string")
        if self.current_version is not None and (
            not isinstance(self.current_version, str) or len(self.current_version) > 64
        ):
            raise JobPayloadError(f"ota/state: current_version {self.current_version!r}")
        total = self.bytes_total
        if self.bytes_done < 0 or (total is not None and (total < 0 or self.bytes_done > total)):
            raise JobPayloadError(f"ota/state: impossible progress {self.bytes_done}/{total} bytes")
        if len(self.detail) > MAX_DETAIL_CHARS:
            raise JobPayloadError(f"ota/state: detail over {MAX_DETAIL_CHARS} characters")

    @classmethod
    def from_job(
        cls,
        job: Job,
        *,
        site: str,
        device: str,
        current_version: str | None,
        wall_ns: int,
        detail: str | None = None,
    ) -> StatePayload:
        """The report of ``job`` (an :class:`ota.job.Job`) as ``device`` of ``site`` sends it;
        ``detail`` (default: the job's own) is cut to :data:`MAX_DETAIL_CHARS`."""
        if detail is None:
            detail = job.detail
        return cls(
            device=device,
            site=site,
            job_id=job.job_id,
            state=job.state,
            reason=job.reason,
            from_version=job.from_version,
            to_version=job.to_version,
            step=job.step,
            bytes_done=job.bytes_done,
            bytes_total=job.bytes_total,
            current_version=current_version,
            detail=detail[:MAX_DETAIL_CHARS],
            wall_ns=wall_ns,
        )

    @property
    def failed(self) -> bool:
        """True for the terminal states that count against a rollout's error threshold:
        FAILED, ROLLED_BACK and REJECTED."""
        return self.state in (JobState.FAILED, JobState.ROLLED_BACK, JobState.REJECTED)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the contract."""
        return {
            "device": self.device,
            "site": self.site,
            "job_id": self.job_id,
            "state": self.state.value,
            "reason": self.reason,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "step": self.step,
            "bytes_done": self.bytes_done,
            "bytes_total": self.bytes_total,
            "current_version": self.current_version,
            "detail": self.detail,
            "wall_ns": self.wall_ns,
        }

    def to_bytes(self) -> bytes:
        """The payload to publish (compact UTF-8 JSON, retained, QoS 1) on
        :attr:`OtaTopics.state`."""
        return _dumps(self.to_dict())

    @classmethod
    def parse(
        cls, payload: bytes, *, site: str | None = None, device: str | None = None
    ) -> StatePayload:
        """The report in an ``ota/state`` payload. With ``site``/``device`` (from the topic)
        the payload must name the same ones. Raises JobPayloadError (oversized, not a JSON
        object, missing or ill-typed field, unknown state, bad reason, impossible progress,
        another device's report)."""
        what = "ota/state"
        obj = _load(payload, what)
        raw_state = _str(obj, "state", what)
        try:
            state = JobState(raw_state)
        except ValueError:
            raise JobPayloadError(f"{what}: unknown state {raw_state!r}") from None
        current = obj.get("current_version")
        if current is not None and not isinstance(current, str):
            raise JobPayloadError(f"{what}: 'current_version' must be a string or null")
        detail = obj.get("detail", "")
        if not isinstance(detail, str):
            raise JobPayloadError(f"{what}: 'detail' must be a string")
        report = cls(
            device=_str(obj, "device", what),
            site=_str(obj, "site", what),
            job_id=_str(obj, "job_id", what),
            state=state,
            reason=_str(obj, "reason", what),
            from_version=_str(obj, "from_version", what),
            to_version=_str(obj, "to_version", what),
            step=_int(obj, "step", what, optional=True) or 0,
            bytes_done=_int(obj, "bytes_done", what, optional=True) or 0,
            bytes_total=_int(obj, "bytes_total", what, optional=True),
            current_version=current,
            detail=detail,
            wall_ns=_int(obj, "wall_ns", what, optional=True) or 0,
        )
        if device is not None and report.device != device:
            raise JobPayloadError(f"{what}: payload device {report.device!r} is not {device!r}")
        if site is not None and report.site != site:
            raise JobPayloadError(f"{what}: payload site {report.site!r} is not {site!r}")
        return report
