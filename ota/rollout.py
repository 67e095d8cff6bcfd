"""A staged rollout of one release to many readers: canary wave, then waves of a fixed size,
halting by itself when too many of the readers started so far fail.

Three layers:

* :func:`plan` (pure): the waves, in a deterministic order (by device id, then site).
* :class:`Rollout` (plain data, :func:`save_rollout`/:func:`load_rollout`): everything a
  rollout knows, kept in one JSON file written atomically (temp file, fsync, rename), so an
  interrupted rollout (Ctrl-C, a lost laptop) continues with ``--resume`` and a halted one is
  resumed or aborted later. :class:`RolloutLock` keeps two processes off one file.
* :class:`RolloutEngine`: publishes each wave's job on ``ota/job`` (retained) and follows the
  readers' ``ota/state`` reports (:mod:`ota.jobs`).

Counting (what the error threshold compares): a device is *started* once its job was
published; it *failed* when it reported FAILED, ROLLED_BACK or REJECTED, or reported nothing
terminal before its wave's timeout (``no_response``; a later terminal report replaces that).
The rollout halts as soon as failures × 100 > threshold × started: as failures only grow
while a wave runs, that is the verdict the wave's end would give, reached earlier. Resuming a
halted rollout accepts the failures seen so far (they no longer count) and may change the
threshold. A resume does not send the job again to, nor wait again for, a reader already
counted (a terminal report, or ``no_response``); readers that had their job but had not
answered yet are waited on again, with a fresh wave timeout.

A rollout is DONE when every wave has run, whether or not some of its readers failed (the
failures stayed under the threshold): :meth:`Rollout.outcome` counts them.

A halt stops sending jobs at once; readers that already have theirs carry on, and their
reports are taken in by the resume (and shown by ``qrgate fleet jobs`` meanwhile). An abort
cancels the jobs of readers that have not started downloading (an empty retained job);
readers already downloading finish their update. A DONE rollout can be aborted too: that
cancels the jobs still retained for readers that never answered, and it stays DONE.
"""

from __future__ import annotations

import enum
import fcntl
import json
import logging
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ota.exceptions import JobPayloadError, ReleaseError, RolloutError
from ota.job import JobState
from ota.jobs import (
    JobRequest,
    OtaTopics,
    StatePayload,
    all_states,
    check_id,
    check_name,
    parse_ota_topic,
)
from ota.mqtt import PROBE_PREFIX, Transport
from ota.releases import check_version
from provisioning.files import NotRegularFileError, read_regular, write_atomic

log = logging.getLogger(__name__)

FORMAT = 1
STATE_FILE_CAP = 64 * 1024 * 1024
"""Largest rollout file read back (bytes): about 300 bytes per device."""

SYNC_S = 5.0
"""How long a start or an abort waits for the retained state reports at most (seconds)."""


class RolloutStatus(enum.StrEnum):
    """Where a rollout is. RUNNING also stands for an interrupted one (``--resume``)."""

    RUNNING = "RUNNING"
    HALTED = "HALTED"
    ABORTED = "ABORTED"
    DONE = "DONE"


#: What a device looks like in the counts, besides the job states of ota.job.
NOT_STARTED = "NOT_STARTED"
SENT = "SENT"
NO_RESPONSE = "NO_RESPONSE"
CANCELLED = "CANCELLED"

DISPLAY_ORDER = (
    NOT_STARTED, SENT, *(s.value for s in JobState), NO_RESPONSE, CANCELLED
)  # fmt: skip
_FAILED = frozenset({JobState.FAILED.value, JobState.ROLLED_BACK.value, JobState.REJECTED.value})


@dataclass(frozen=True, slots=True, order=True)
class DeviceRef:
    """A reader: ``device`` id in ``site`` (both valid topic parts; raises JobPayloadError)."""

    device: str
    site: str

    def __post_init__(self) -> None:
        check_name("site", self.site)
        check_name("device", self.device)

    @property
    def key(self) -> str:
        """``<site>/<device>``: the reader's key in a rollout file."""
        return f"{self.site}/{self.device}"


@dataclass(frozen=True, slots=True)
class Wave:
    """Wave ``index`` of a rollout: the device keys (``<site>/<device>``) it updates;
    ``canary`` for wave 0 when the plan has a canary."""

    index: int
    devices: tuple[str, ...]
    canary: bool = False


def plan(devices: Iterable[DeviceRef], *, canary: int, batch_size: int) -> list[Wave]:
    """The waves for ``devices``: wave 0 the first ``canary`` devices (none when 0), then
    waves of ``batch_size``, the last one smaller. Order: by device id, then site, so the same
    fleet always gives the same plan. Raises RolloutError for no devices, a device named
    twice, ``canary`` < 0 or ``batch_size`` < 1."""
    ordered = sorted(devices)
    if not ordered:
        raise RolloutError("no devices to update: check --site/--devices and the broker")
    keys = [d.key for d in ordered]
    if len(set(keys)) != len(keys):
        dup = sorted(k for k, n in Counter(keys).items() if n > 1)
        raise RolloutError(f"devices named twice: {', '.join(dup[:5])}")
    if canary < 0 or batch_size < 1:
        raise RolloutError(f"canary {canary} must be >= 0 and batch size {batch_size} >= 1")
    waves: list[Wave] = []
    if canary:
        waves.append(Wave(0, tuple(keys[:canary]), canary=True))
    rest = keys[canary:]
    for start in range(0, len(rest), batch_size):
        waves.append(Wave(len(waves), tuple(rest[start : start + batch_size])))
    return waves


@dataclass(slots=True)
class DeviceRecord:
    """What the rollout knows of one reader: ``wave`` it belongs to, whether its job was
    ``published``, its last report for this rollout's job (``state`` a JobState value or
    None, ``reason``, ``step``, ``bytes_done``/``bytes_total``, ``current_version``,
    ``detail``), ``no_response`` (its wave timed out before a terminal report),
    ``acknowledged`` (its failure was accepted by a resume) and ``cancelled`` (by an abort)."""

    site: str
    device: str
    wave: int
    published: bool = False
    state: str | None = None
    reason: str = ""
    step: int = -1
    bytes_done: int = 0
    bytes_total: int | None = None
    current_version: str | None = None
    detail: str = ""
    no_response: bool = False
    acknowledged: bool = False
    cancelled: bool = False

    @property
    def key(self) -> str:
        return f"{self.site}/{self.device}"

    @property
    def terminal(self) -> bool:
        return self.state is not None and JobState(self.state).terminal

    @property
    def settled(self) -> bool:
        """Nothing more to wait for: a terminal report, cancelled, or counted as
        ``no_response``."""
        return self.terminal or self.cancelled or self.no_response

    @property
    def failed(self) -> bool:
        """Counts against the threshold: FAILED, ROLLED_BACK, REJECTED or no response."""
        return self.published and (self.state in _FAILED or self.no_response)

    @property
    def display(self) -> str:
        """One of :data:`DISPLAY_ORDER`: the column the device is counted in."""
        if self.cancelled:
            return CANCELLED
        if self.no_response and not self.terminal:
            return NO_RESPONSE
        if self.state is not None:
            return self.state
        return SENT if self.published else NOT_STARTED


_RECORD_FIELDS: dict[str, type | tuple[type, ...]] = {
    "site": str, "device": str, "wave": int, "published": bool, "state": (str, type(None)),
    "reason": str, "step": int, "bytes_done": int, "bytes_total": (int, type(None)),
    "current_version": (str, type(None)), "detail": str, "no_response": bool,
    "acknowledged": bool, "cancelled": bool,
}  # fmt: skip


@dataclass(slots=True)
class Rollout:
    """A rollout of ``version`` as job ``rollout_id`` (one job id for every reader) with the
    options it was started with (``error_threshold_pct``: percent, 0-100), its ``waves``,
    one :class:`DeviceRecord` per reader by key, its ``status`` (``halt_reason`` text when
    HALTED), ``wave_index`` (the wave under way, or ``len(waves)`` when all are done) and
    ``created_wall_ns`` (ns since the epoch)."""

    rollout_id: str
    version: str
    allow_downgrade: bool
    canary: int
    batch_size: int
    error_threshold_pct: float
    waves: list[Wave]
    devices: dict[str, DeviceRecord]
    status: RolloutStatus = RolloutStatus.RUNNING
    halt_reason: str = ""
    wave_index: int = 0
    created_wall_ns: int = 0
    resumes: int = 0
    history: list[str] = field(default_factory=list)

    @classmethod
    def create(
        cls,
        version: str,
        devices: Iterable[DeviceRef],
        *,
        canary: int,
        batch_size: int,
        error_threshold_pct: float,
        allow_downgrade: bool = False,
        rollout_id: str | None = None,
        wall_ns: int | None = None,
    ) -> Rollout:
        """A new RUNNING rollout (nothing published yet). Raises RolloutError for a bad
        version, id, threshold or plan (see :func:`plan`)."""
        rid = rollout_id or f"rollout-{version}-{secrets.token_hex(4)}"
        try:
            check_version(version)
            check_id("rollout id", rid)
        except (JobPayloadError, ReleaseError) as e:
            raise RolloutError(str(e)) from None
        _check_threshold(error_threshold_pct)
        refs = list(devices)
        waves = plan(refs, canary=canary, batch_size=batch_size)
        by_key = {d.key: d for d in refs}
        records = {
            key: DeviceRecord(by_key[key].site, by_key[key].device, w.index)
            for w in waves
            for key in w.devices
        }
        return cls(
            rollout_id=rid,
            version=version,
            allow_downgrade=allow_downgrade,
            canary=canary,
            batch_size=batch_size,
            error_threshold_pct=float(error_threshold_pct),
            waves=waves,
            devices=records,
            created_wall_ns=time.time_ns() if wall_ns is None else wall_ns,
        )

    # -- counting -----------------------------------------------------------------------

    def counts(self) -> Counter[str]:
        """How many devices are in each :data:`DISPLAY_ORDER` column."""
        return Counter(r.display for r in self.devices.values())

    def started(self) -> int:
        """Devices whose job was published and whose failure is not acknowledged."""
        return sum(1 for r in self.devices.values() if r.published and not r.acknowledged)

    def failures(self) -> int:
        """Started devices that failed (see the module docstring), acknowledged ones aside."""
        return sum(1 for r in self.devices.values() if r.failed and not r.acknowledged)

    def accepted(self) -> int:
        """Failures accepted by a resume (no longer counted against the threshold)."""
        return sum(1 for r in self.devices.values() if r.failed and r.acknowledged)

    def outcome(self) -> tuple[int, int]:
        """``(succeeded, not succeeded)``: readers that reported SUCCEEDED, and all others."""
        ok = sum(1 for r in self.devices.values() if r.state == JobState.SUCCEEDED.value)
        return ok, len(self.devices) - ok

    def over_threshold(self) -> bool:
        """True when failures × 100 > threshold × started (and something failed)."""
        failures = self.failures()
        return failures > 0 and failures * 100 > self.error_threshold_pct * self.started()

    def wave_finished(self, wave: Wave) -> bool:
        """Every device of ``wave`` is :attr:`DeviceRecord.settled`."""
        return all(self.devices[k].settled for k in wave.devices)

    def job_request(self, wall_ns: int) -> JobRequest:
        """The job every reader of this rollout receives."""
        return JobRequest(
            job_id=self.rollout_id,
            version=self.version,
            allow_downgrade=self.allow_downgrade,
            rollout=self.rollout_id,
            issued_wall_ns=wall_ns,
        )

    # -- changes ------------------------------------------------------------------------

    def apply(self, report: StatePayload) -> bool:
        """Take a reader's state report; True when it changed the record. Reports of other
        jobs, unknown devices and older steps are ignored."""
        rec = self.devices.get(f"{report.site}/{report.device}")
        if rec is None or report.job_id != self.rollout_id or report.step < rec.step:
            return False
        new = (report.state.value, report.reason, report.step, report.bytes_done)
        if (rec.state, rec.reason, rec.step, rec.bytes_done) == new:
            return False
        rec.state, rec.reason, rec.step = report.state.value, report.reason, report.step
        rec.bytes_done, rec.bytes_total = report.bytes_done, report.bytes_total
        rec.current_version, rec.detail = report.current_version, report.detail
        if report.state.terminal:
            rec.no_response = False
        # a report proves the job reached the reader, even if our publish was not recorded
        rec.published = True
        return True

    def time_out(self, wave: Wave) -> list[str]:
        """Mark every published device of ``wave`` still waited on (not
        :attr:`~DeviceRecord.settled`) as ``no_response``; returns their keys."""
        late = []
        for key in wave.devices:
            rec = self.devices[key]
            if rec.published and not rec.settled:
                rec.no_response = True
                late.append(key)
        return late

    def halt(self) -> None:
        """Mark the rollout HALTED with the failure count as the reason (the count the
        threshold compares; failures accepted by a resume are named apart, so the reason adds
        up with the table)."""
        failures, started, accepted = self.failures(), self.started(), self.accepted()
        self.status = RolloutStatus.HALTED
        self.halt_reason = (
            f"{failures} of {started} started devices failed "
            f"({failures * 100 / max(started, 1):.1f} % > {self.error_threshold_pct:g} %)"
        )
        if accepted:
            self.halt_reason += (
                f", besides {accepted} earlier "
                f"{'failure' if accepted == 1 else 'failures'} accepted by --resume"
            )
        self.history.append(f"halted in wave {self.wave_index}: {self.halt_reason}")

    def reopen(self, *, error_threshold_pct: float | None = None) -> None:
        """Make a HALTED or interrupted rollout RUNNING again: the failures seen so far are
        accepted (no longer counted), and the threshold may change. Raises RolloutError for a
        DONE or ABORTED rollout or a bad threshold."""
        if self.status in (RolloutStatus.DONE, RolloutStatus.ABORTED):
            raise RolloutError(
                f"rollout {self.rollout_id} is {self.status.value}: nothing to resume; start "
                "a new rollout"
            )
        if error_threshold_pct is not None:
            _check_threshold(error_threshold_pct)
            self.error_threshold_pct = float(error_threshold_pct)
        if self.status is RolloutStatus.HALTED:
            for rec in self.devices.values():
                if rec.failed:
                    rec.acknowledged = True
            self.history.append(f"resumed in wave {self.wave_index}")
        self.status = RolloutStatus.RUNNING
        self.halt_reason = ""
        self.resumes += 1

    # -- the file -----------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready form saved by :func:`save_rollout`."""
        return {
            "format": FORMAT,
            "rollout_id": self.rollout_id,
            "version": self.version,
            "allow_downgrade": self.allow_downgrade,
            "canary": self.canary,
            "batch_size": self.batch_size,
            "error_threshold_pct": self.error_threshold_pct,
            "status": self.status.value,
            "halt_reason": self.halt_reason,
            "wave_index": self.wave_index,
            "created_wall_ns": self.created_wall_ns,
            "resumes": self.resumes,
            "history": list(self.history),
            "waves": [
                {"index": w.index, "canary": w.canary, "devices": list(w.devices)}
                for w in self.waves
            ],
            "devices": {
                key: {name: getattr(rec, name) for name in _RECORD_FIELDS}
                for key, rec in self.devices.items()
            },
        }

    @classmethod
    def from_dict(cls, data: object) -> Rollout:
        """Parse :meth:`to_dict` output. Raises RolloutError on anything that does not fit."""
        try:
            return _from_dict(data)
        except (KeyError, TypeError, ValueError, JobPayloadError) as e:
            raise RolloutError(f"damaged rollout record: {type(e).__name__}: {e}") from None


def _check_threshold(pct: float) -> None:
    if not 0 <= pct <= 100:
        raise RolloutError(f"error threshold {pct} % must be between 0 and 100")


def _from_dict(data: object) -> Rollout:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError("not a format 1 rollout object")
    waves = [
        Wave(int(w["index"]), tuple(str(k) for k in w["devices"]), bool(w["canary"]))
        for w in data["waves"]
    ]
    devices: dict[str, DeviceRecord] = {}
    for key, raw in data["devices"].items():
        if set(raw) != set(_RECORD_FIELDS):
            raise ValueError(f"device {key!r} has fields {sorted(raw)}")
        for name, kind in _RECORD_FIELDS.items():
            if not isinstance(raw[name], kind):
                raise TypeError(f"device {key!r} field {name!r} is {raw[name]!r}")
        rec = DeviceRecord(**raw)
        if rec.key != key or (rec.state is not None and rec.state not in JobState.__members__):
            raise ValueError(f"device {key!r} record does not match its key or state")
        DeviceRef(rec.device, rec.site)
        devices[key] = rec
    if sorted(k for w in waves for k in w.devices) != sorted(devices):
        raise ValueError("the waves and the devices do not list the same readers")
    rollout = Rollout(
        rollout_id=check_id("rollout id", str(data["rollout_id"])),
        version=str(data["version"]),
        allow_downgrade=bool(data["allow_downgrade"]),
        canary=int(data["canary"]),
        batch_size=int(data["batch_size"]),
        error_threshold_pct=float(data["error_threshold_pct"]),
        waves=waves,
        devices=devices,
        status=RolloutStatus(data["status"]),
        halt_reason=str(data["halt_reason"]),
        wave_index=int(data["wave_index"]),
        created_wall_ns=int(data["created_wall_ns"]),
        resumes=int(data["resumes"]),
        history=[str(h) for h in data["history"]],
    )
    if not 0 <= rollout.wave_index <= len(waves):
        raise ValueError(f"wave index {rollout.wave_index} outside 0-{len(waves)}")
    _check_threshold(rollout.error_threshold_pct)
    return rollout


def save_rollout(path: Path, rollout: Rollout) -> None:
    """Write ``rollout`` to ``path`` atomically (temp file, fsync, rename, folder fsync; mode
    0644). Raises OSError."""
    data = json.dumps(rollout.to_dict(), indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(path, data, 0o644, overwrite=True)


def load_rollout(path: Path, *, missing_hint: str = "start one without --resume") -> Rollout:
    """The rollout saved at ``path``. Raises RolloutError naming the file when it is missing
    (with ``missing_hint`` in brackets), not a regular file, over :data:`STATE_FILE_CAP`, not
    JSON or not a rollout record."""
    try:
        data, _mode = read_regular(path, STATE_FILE_CAP)
    except FileNotFoundError:
        raise RolloutError(f"{path}: no rollout state file ({missing_hint})") from None
    except (NotRegularFileError, OSError) as e:
        raise RolloutError(f"{path}: cannot read the rollout state: {e}") from None
    try:
        obj = json.loads(data)
    except ValueError as e:
        raise RolloutError(f"{path}: damaged rollout state (not JSON: {e})") from None
    try:
        return Rollout.from_dict(obj)
    except RolloutError as e:
        raise RolloutError(f"{path}: {e}") from None


class RolloutLock:
    """An exclusive ``flock`` on ``<state file>.lock`` while a process works on a rollout
    (``with``). Raises RolloutError when another process holds it. The lock file is removed
    on exit when there is no state file (nothing was written: a refused ``--resume``, an
    unreachable broker), so it does not linger beside nothing."""

    def __init__(self, path: Path) -> None:
        self.state_path = path
        self.path = path.with_name(path.name + ".lock")
        self._fd: int | None = None

    def _busy(self) -> RolloutError:
        return RolloutError(
            f"another process is working on this rollout ({self.path} is locked): stop "
            "it first (Ctrl-C), then --resume or --abort"
        )

    def __enter__(self) -> RolloutLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the holder before us may have removed the file (see __exit__): a lock on a
            # removed file guards nothing
            if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                raise BlockingIOError
        except (BlockingIOError, FileNotFoundError):
            os.close(fd)
            raise self._busy() from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            if not self.state_path.exists():
                # removed while still held: see the inode check in __enter__
                self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None


ProgressCallback = Callable[[Rollout], None]


class RolloutEngine:
    """Runs ``rollout`` (saved at ``path`` after each step, at most every ``save_every_s``
    seconds in between) over ``transport``.

    ``wave_timeout_s``: seconds a wave may take before its silent readers count as
    ``no_response`` (an interrupted or halted wave gets a fresh timeout on resume, for the
    readers not yet settled);
    ``on_progress``: called with the rollout after changes (at most every
    ``progress_every_s`` seconds, and at every wave boundary); ``monotonic``/``wall_ns``:
    clocks (seconds; ns since the epoch)."""

    def __init__(
        self,
        rollout: Rollout,
        path: Path,
        transport: Transport,
        *,
        wave_timeout_s: float,
        on_progress: ProgressCallback | None = None,
        save_every_s: float = 1.0,
        progress_every_s: float = 0.1,
        monotonic: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if wave_timeout_s <= 0:
            raise RolloutError(f"wave timeout {wave_timeout_s} s must be above 0")
        self.rollout = rollout
        self.path = path
        self.transport = transport
        self.wave_timeout_s = wave_timeout_s
        self.on_progress = on_progress
        self.save_every_s = save_every_s
        self.progress_every_s = progress_every_s
        self._mono = monotonic
        self._wall_ns = wall_ns
        self._dirty = False
        self._saved_at = -1e18
        self._progress_at = -1e18
        self._subscribed = False
        self.ignored = 0
        """Messages that were not a valid state report of a device of this rollout."""

    # -- helpers ------------------------------------------------------------------------

    def _save(self, *, force: bool = False) -> None:
        now = self._mono()
        if force or (self._dirty and now - self._saved_at >= self.save_every_s):
            save_rollout(self.path, self.rollout)
            self._dirty, self._saved_at = False, now

    def _progress(self, *, force: bool = False) -> None:
        now = self._mono()
        if self.on_progress is not None and (
            force or now - self._progress_at >= self.progress_every_s
        ):
            self._progress_at = now
            self.on_progress(self.rollout)

    def _handle(self, topic: str, payload: bytes) -> None:
        parsed = parse_ota_topic(topic)
        if parsed is None or parsed[2] != "state" or not payload:
            return
        site, device, _ = parsed
        try:
            report = StatePayload.parse(payload, site=site, device=device)
        except JobPayloadError as e:
            self.ignored += 1
            log.warning("%s: ignored: %s", topic, e)
            return
        if self.rollout.apply(report):
            self._dirty = True

    def _sync(self) -> None:
        """Subscribe to the state reports of the rollout's sites and take in the retained
        ones (until our probe comes back, at most :data:`SYNC_S` seconds)."""
        if self._subscribed:
            return
        for site in sorted({r.site for r in self.rollout.devices.values()}):
            self.transport.subscribe(all_states(site))
        probe = f"{PROBE_PREFIX}/{secrets.token_hex(8)}"
        self.transport.subscribe(probe)
        self.transport.publish(probe, b"probe", qos=1)
        self._subscribed = True
        deadline = self._mono() + SYNC_S
        while (left := deadline - self._mono()) > 0:
            msg = self.transport.next_message(left)
            if msg is None or msg[0] == probe:
                break
            self._handle(*msg)

    def _take_messages(self, wait_s: float) -> None:
        msg = self.transport.next_message(wait_s)
        taken = 0
        # take what is already queued without blocking: one save/progress per burst
        while msg is not None:
            self._handle(*msg)
            taken += 1
            if taken >= 1000:
                break
            msg = self.transport.next_message(0)

    # -- the two commands ----------------------------------------------------------------

    def run(self) -> RolloutStatus:
        """Publish wave after wave and follow the reports until the rollout is DONE or
        HALTED (returned; both saved). Raises RolloutError when the rollout is not RUNNING
        (:meth:`Rollout.reopen` first), FleetTransportError when the broker fails (the file
        keeps what was done: resume later), OSError when the file cannot be written."""
        r = self.rollout
        if r.status is not RolloutStatus.RUNNING:
            raise RolloutError(
                f"rollout {r.rollout_id} is {r.status.value}: "
                + ("resume it first" if r.status is RolloutStatus.HALTED else "nothing to run")
            )
        self._sync()
        self._save(force=True)
        while r.wave_index < len(r.waves):
            wave = r.waves[r.wave_index]
            request = r.job_request(self._wall_ns()).to_bytes()
            sent = 0
            for key in wave.devices:
                rec = r.devices[key]
                # again on resume for a reader that had not answered (the same job id,
                # retained, is idempotent for a reader); never for one already counted
                if rec.state is None and not rec.settled:
                    self.transport.publish(
                        OtaTopics(rec.site, rec.device).job, request, qos=1, retain=True
                    )
                    rec.published = True
                    sent += 1
            self.transport.flush()
            r.history.append(f"wave {wave.index} published ({sent} of {len(wave.devices)} devices)")
            self._save(force=True)
            self._progress(force=True)
            deadline = self._mono() + self.wave_timeout_s
            while not r.wave_finished(wave) and not r.over_threshold():
                left = deadline - self._mono()
                if left <= 0:
                    late = r.time_out(wave)
                    r.history.append(f"wave {wave.index} timed out: {len(late)} no response")
                    break
                self._take_messages(min(left, 0.25))
                self._save()
                self._progress()
            if r.over_threshold():
                r.halt()
                self._save(force=True)
                self._progress(force=True)
                return r.status
            r.wave_index += 1
            self._save(force=True)
            self._progress(force=True)
        r.status = RolloutStatus.DONE
        r.history.append("done")
        self._save(force=True)
        self._progress(force=True)
        return r.status

    def resume(self, *, error_threshold_pct: float | None = None) -> RolloutStatus:
        """Continue a HALTED or interrupted rollout: take in the readers' retained reports
        first (so the failures accepted are all those seen by now), then
        :meth:`Rollout.reopen` and :meth:`run`. Raises as those do."""
        if self.rollout.status in (RolloutStatus.DONE, RolloutStatus.ABORTED):
            self.rollout.reopen()  # raises RolloutError naming the status
        self._sync()
        self.rollout.reopen(error_threshold_pct=error_threshold_pct)
        return self.run()

    def abort(self) -> list[str]:
        """Cancel the jobs that have not started downloading (an empty retained ``ota/job``
        to each reader whose job was published and that reported nothing or QUEUED) and mark
        the rollout ABORTED (saved). A DONE rollout stays DONE: this only cancels the jobs
        left retained for its readers that never answered (``no_response``). Returns the
        keys cancelled. Raises RolloutError for an ABORTED rollout, FleetTransportError,
        OSError."""
        r = self.rollout
        if r.status is RolloutStatus.ABORTED:
            raise RolloutError(f"rollout {r.rollout_id} is already {r.status.value}")
        self._sync()
        cancelled = []
        for rec in r.devices.values():
            if rec.published and rec.state in (None, JobState.QUEUED.value) and not rec.cancelled:
                self.transport.publish(OtaTopics(rec.site, rec.device).job, b"", retain=True)
                rec.cancelled = True
                cancelled.append(rec.key)
        self.transport.flush()
        if r.status is RolloutStatus.DONE:
            r.history.append(f"after done: {len(cancelled)} jobs of silent readers cancelled")
        else:
            r.status = RolloutStatus.ABORTED
            r.history.append(f"aborted in wave {r.wave_index}: {len(cancelled)} jobs cancelled")
        self._save(force=True)
        self._progress(force=True)
        return cancelled
