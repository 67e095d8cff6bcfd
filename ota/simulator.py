"""A fleet of lightweight simulated readers on one MQTT connection, for rollout tests and the
benchmark.

Each simulated reader publishes a retained ``status`` (with its ``version``) and plays every
job it receives on ``ota/job`` through the real state machine of :mod:`ota.job`, publishing
each state on ``ota/state`` (retained, QoS 1) as :class:`ota.jobs.StatePayload`::

    QUEUED → DOWNLOADING (progress reports) → INSTALLING → PENDING_COMMIT → SUCCEEDED
                                                            └→ ROLLED_BACK "exited_at_start"
    readers in ``fail``:     QUEUED → DOWNLOADING → FAILED "download_failed"
    a downgrade or the running version: REJECTED "downgrade" / "same_version"
    an empty job while still QUEUED:    REJECTED "cancelled"
    readers in ``silent``:   nothing at all (a reader that is off)

A reader that reached SUCCEEDED runs the new version (its status is published again). A job
id a reader already played is ignored (retained jobs come again after a reconnect). One
thread plays every reader's steps in time order (``step_s`` apart).
"""

from __future__ import annotations

import heapq
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt

from ota.exceptions import FleetTransportError, JobPayloadError
from ota.job import Event, EventKind, Job, JobState, advance
from ota.jobs import PREFIX, JobRequest, OtaTopics, StatePayload, all_jobs, parse_ota_topic
from ota.mqtt import PahoTransport, plain_client
from ota.releases import version_key

log = logging.getLogger(__name__)


def pick(devices: Collection[str], fraction: float, *, seed: int = 0) -> set[str]:
    """``fraction`` (0-1) of ``devices``, chosen at random but the same for the same seed."""
    k = round(len(devices) * fraction)
    return set(random.Random(seed).sample(sorted(devices), k))


@dataclass(slots=True)
class _Reader:
    device: str
    version: str
    topics: OtaTopics
    job: Job | None = None
    plan: list[Event] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)


class FleetSimulator:
    """``n`` readers ``<prefix>0000``… of ``site`` running ``version``, on the broker at
    ``host``:``port`` (plain MQTT; ``client_factory`` makes the paho client, e.g. with TLS).

    ``fail``: devices whose downloads fail; ``crash_versions``: versions that roll back
    with "exited_at_start"; ``silent``: devices that never answer; ``step_s``: seconds
    between two states of one job; ``progress_reports``: DOWNLOADING progress reports per
    job; ``bundle_bytes``: the simulated bundle size (progress figures).
    ``with`` or :meth:`start`/:meth:`stop`. Raises FleetTransportError when the broker
    cannot be reached."""

    def __init__(
        self,
        host: str,
        port: int,
        site: str,
        n: int = 1000,
        *,
        version: str = "1.0.0",
        fail: Collection[str] = (),
        crash_versions: Collection[str] = (),
        silent: Collection[str] = (),
        step_s: float = 0.0,
        progress_reports: int = 2,
        bundle_bytes: int = 50_000_000,
        prefix: str = "sim",
        client_factory: Callable[[str], mqtt.Client] = plain_client,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        self.site = site
        self.devices = [f"{prefix}{i:04d}" for i in range(n)]
        self._readers = {
            d: _Reader(d, version, OtaTopics(site, d)) for d in self.devices if d not in silent
        }
        self.fail = frozenset(fail)
        self.crash_versions = frozenset(crash_versions)
        self.step_s = step_s
        self.progress_reports = progress_reports
        self.bundle_bytes = bundle_bytes
        self._wall_ns = wall_ns
        self.transport = PahoTransport(
            client_factory(f"qrgate-sim-{uuid.uuid4().hex[:12]}"), host, port
        )
        self._heap: list[tuple[float, int, str]] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.jobs_received = 0
        self.states_published = 0
        self.bad_jobs = 0

    # -- life cycle ---------------------------------------------------------------------

    def start(self) -> FleetSimulator:
        """Connect, publish every reader's retained status, subscribe to their jobs and
        start playing them. Raises FleetTransportError."""
        self.transport.connect()
        try:
            for reader in self._readers.values():
                self._publish_status(reader)
            self.transport.subscribe(all_jobs(self.site))
            self.transport.flush()
        except BaseException:
            self.transport.close()
            raise
        self._thread = threading.Thread(target=self._loop, name="fleet-simulator", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop playing, wait for the broker to take what was published, disconnect.
        Idempotent."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            try:
                self.transport.flush(5.0)
            except FleetTransportError as e:  # the broker may be gone: nothing to keep
                log.debug("simulator: flush at stop: %s", e)
        self.transport.close()

    def __enter__(self) -> FleetSimulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what the tests read ------------------------------------------------------------

    def states(self) -> dict[str, JobState | None]:
        """Each answering reader's job state (None before its first job)."""
        with self._lock:
            return {d: (r.job.state if r.job else None) for d, r in self._readers.items()}

    def versions(self) -> dict[str, str]:
        """Each answering reader's running version."""
        with self._lock:
            return {d: r.version for d, r in self._readers.items()}

    @property
    def published(self) -> int:
        """Messages this simulator published (statuses and state reports)."""
        return self.transport.published

    @property
    def received(self) -> int:
        """Messages the broker delivered to this simulator (jobs)."""
        return self.transport.received

    # -- the player ---------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, device = heapq.heappop(self._heap)
                self._step(self._readers[device])
            wait = 0.05 if not self._heap else max(0.0, min(0.05, self._heap[0][0] - now))
            msg = self.transport.next_message(wait)
            while msg is not None:
                self._on_job(*msg)
                msg = self.transport.next_message(0)

    def _schedule(self, reader: _Reader) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (time.monotonic() + self.step_s, self._seq, reader.device))

    def _on_job(self, topic: str, payload: bytes) -> None:
        parsed = parse_ota_topic(topic)
        if parsed is None or parsed[2] != "job" or parsed[1] not in self._readers:
            return
        reader = self._readers[parsed[1]]
        self.jobs_received += 1
        try:
            request = JobRequest.parse(payload)
        except JobPayloadError as e:
            self.bad_jobs += 1
            log.warning("simulator %s: bad job: %s", reader.device, e)
            return
        if request is None:
            job = reader.job
            if job is not None and job.state is JobState.QUEUED:
                reader.plan = []
                self._set(reader, advance(job, Event(EventKind.REJECT, "cancelled")))
            return
        if request.job_id in reader.seen:
            return
        reader.seen.add(request.job_id)
        job = Job(request.job_id, reader.version, request.version)
        self._set(reader, job)
        if request.version == reader.version:
            reader.plan = [Event(EventKind.REJECT, "same_version")]
        elif version_key(request.version) < version_key(reader.version) and not (
            request.allow_downgrade
        ):
            reader.plan = [Event(EventKind.REJECT, "downgrade")]
        elif reader.device in self.fail:
            reader.plan = [Event(EventKind.START), Event(EventKind.FAIL, "download_failed")]
        else:
            total = self.bundle_bytes
            progress = [
                Event(EventKind.PROGRESS, bytes_done=total * i // self.progress_reports,
                      bytes_total=total)
                for i in range(1, self.progress_reports + 1)
            ]  # fmt: skip
            last = (
                Event(EventKind.ROLLBACK, "exited_at_start")
                if request.version in self.crash_versions
                else Event(EventKind.HEALTHY)
            )
            reader.plan = [
                Event(EventKind.START), *progress, Event(EventKind.DOWNLOADED),
                Event(EventKind.SWITCHED), last,
            ]  # fmt: skip
        self._schedule(reader)

    def _step(self, reader: _Reader) -> None:
        if not reader.plan or reader.job is None or reader.job.state.terminal:
            return
        event = reader.plan.pop(0)
        self._set(reader, advance(reader.job, event))
        if reader.plan:
            self._schedule(reader)

    def _set(self, reader: _Reader, job: Job) -> None:
        with self._lock:
            reader.job = job
            if job.state is JobState.SUCCEEDED:
                reader.version = job.to_version
        # the new release runs while its health is checked; a rollback returns to the old one
        running = job.to_version if job.state is JobState.PENDING_COMMIT else reader.version
        report = StatePayload.from_job(
            job,
            site=self.site,
            device=reader.device,
            current_version=running,
            wall_ns=self._wall_ns(),
        )
        self.transport.publish(reader.topics.state, report.to_bytes(), qos=1, retain=True)
        self.states_published += 1
        if job.state is JobState.SUCCEEDED:
            self._publish_status(reader)

    def _publish_status(self, reader: _Reader) -> None:
        status = {
            "online": True,
            "device": reader.device,
            "site": self.site,
            "door": "sim",
            "version": reader.version,
            "boot_id": "simulated",
            "backlog": 0,
            "clock_synced": True,
            "last_scan_wall_ns": None,
            "wall_ns": self._wall_ns(),
        }
        topic = f"{PREFIX}/{self.site}/{reader.device}/status"
        payload = json.dumps(status, separators=(",", ":")).encode()
        self.transport.publish(topic, payload, qos=1, retain=True)
