"""The reader's update agent: takes jobs from MQTT, runs them one at a time through the
updater, reports every state back.

Topics and payloads are :mod:`ota.jobs`' contract: the agent subscribes the reader's retained
``ota/job`` and publishes each job state retained, QoS 1, on ``ota/state``.

Threads and ordering:

* the **network loop** (:meth:`Agent.run`, the caller's thread) owns the broker connection.
  Each attempt builds a new client (``connect``); a connection that fails, or a state publish
  the broker does not acknowledge within ``publish_timeout_s``, ends the session: the client is
  closed and a new one is tried after a backoff with full jitter (``backoff_min_s`` doubling up
  to ``backoff_max_s``, reset once a session stayed up ``STABLE_S``). Between attempts the
  job keeps running: the broker being away never stops or delays an update;
* the **worker** (thread ``qrgate-ota-worker``) first calls ``updater.resume()`` (a job cut
  short by a kill -9 or power cut carries on), then runs one job at a time with
  ``updater.run(request)``; it never runs in paho's callback thread;
* the updater's ``report(job)`` callback (:meth:`Agent.report`) only queues the state: the
  network loop publishes it and forgets it only after the broker's PUBACK; unacknowledged
  states are published again on the next connection. Reports of one job are coalesced to the
  newest (the topic is retained: the newest state is what counts), but a job's last state is
  never replaced by the next job's first.

Jobs: the retained ``ota/job`` arrives again on every (re)connect, so a job whose id already
finished (kept in ``<state_dir>/agent.json``, written atomically after the job's terminal state
is on disk in the updater's job store) or is running is ignored. A newer job received while one
runs waits (only the newest waits); an empty retained payload cancels a job that is waiting
(reported REJECTED "cancelled" here) or else asks the updater to cancel the running job
(:meth:`Updater.cancel`: taken only while it is QUEUED, e.g. waiting for the clock; the
updater then reports REJECTED "cancelled"), never one that has started downloading. A
payload that breaks the contract is dropped with its reason logged.

The agent sets no last will: the daemon's ``status`` already says online or offline.
"""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from ota.exceptions import FleetTransportError, JobPayloadError, OtaError
from ota.job import Event, EventKind, Job, advance
from ota.jobs import JobRequest, OtaTopics, StatePayload, check_id
from ota.mqtt import Transport
from provisioning.files import NotRegularFileError, read_regular, write_atomic

log = logging.getLogger(__name__)

STABLE_S = 10.0
"""A session that stayed up this long (seconds) resets the reconnect backoff."""
POLL_S = 0.1
"""Longest wait for a message before queued states are looked at again, seconds."""
OUTBOX_LIMIT = 32
"""Job states waiting for the broker at most (one per job after coalescing): more means many
jobs finished while the broker was away; the oldest are dropped (their jobs' retained state
is overwritten by the newest anyway)."""
AGENT_FILE = "agent.json"
_AGENT_FILE_CAP = 4096


class Updater(Protocol):
    """What the agent needs of :class:`ota.updater.Updater` (constructed with the agent's
    :meth:`Agent.report` as its ``report`` callback)."""

    def run(self, request: JobRequest) -> Job:
        """Carry out ``request`` to a terminal state (reporting each step); the final job."""
        ...

    def resume(self) -> Job | None:
        """Finish the job a restart interrupted; the final job, or None when there was none."""
        ...

    def cancel(self, job_id: str) -> bool:
        """Cancel the running job ``job_id`` if it has not started downloading (it then ends
        REJECTED "cancelled", reported as every step); False when it cannot be. Called from
        the network loop while the worker runs the job: must be thread-safe."""
        ...


class Connection(Transport, Protocol):
    """A connected :class:`ota.mqtt.Transport` the agent can also close."""

    def close(self) -> None:
        """Disconnect and stop the network thread; idempotent."""
        ...


@dataclass
class AgentStats:
    """Counters since start, for logs and tests. ``received``: ``ota/job`` messages;
    ``rejected``: of which broke the contract; ``duplicates``: ignored as finished or running;
    ``cancelled``: jobs cancelled by an empty payload (waiting, or running but not yet
    downloading); ``runs``: jobs handed to the
    updater; ``published``: states acknowledged by the broker; ``sessions``: connections made;
    ``connect_failures``: attempts or sessions that failed."""

    received: int = 0
    rejected: int = 0
    duplicates: int = 0
    cancelled: int = 0
    runs: int = 0
    published: int = 0
    sessions: int = 0
    connect_failures: int = 0


class FinishedJobs:
    """The id of the last job that reached a terminal state, in ``path`` (JSON
    ``{"last_finished_job_id": str}``, mode 0600, written with
    :func:`provisioning.files.write_atomic`). A damaged file is logged and read as none: the
    updater's own job store still refuses to run a finished job twice."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> str | None:
        """The stored id, or None (no file, or a damaged one: logged)."""
        try:
            data, _mode = read_regular(self.path, _AGENT_FILE_CAP, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except (NotRegularFileError, OSError) as e:
            log.error("%s unreadable (%s): no finished job remembered", self.path, e)
            return None
        try:
            obj = json.loads(data)
            job_id = obj["last_finished_job_id"]
            return check_id("job_id", job_id)
        except (ValueError, KeyError, TypeError, JobPayloadError) as e:
            log.error("%s damaged (%s): no finished job remembered", self.path, e)
            return None

    def save(self, job_id: str) -> None:
        """Store ``job_id`` durably. Raises OSError."""
        data = json.dumps({"last_finished_job_id": job_id}).encode() + b"\n"
        write_atomic(self.path, data, 0o600, overwrite=True)


class Agent:
    """The update agent of one reader (see the module docstring).

    ``make_updater(report)``: builds the updater with the agent's report callback.
    ``connect()``: a new connected :class:`Connection` per attempt (raises
    FleetTransportError). ``site``/``device``: the reader's topic levels. ``state_dir``: where
    ``agent.json`` lives (the updater's state folder). ``current_version()``: the release
    running now, for the reports (None if none; an OtaError is logged and read as None).
    ``publish_timeout_s``: seconds to wait for a state's PUBACK before the session is given
    up. ``backoff_min_s``/``backoff_max_s``: reconnect backoff, seconds. ``rng``/``wall_ns``:
    injected jitter source and wall clock (ns since the epoch)."""

    def __init__(
        self,
        make_updater: Callable[[Callable[[Job], None]], Updater],
        *,
        connect: Callable[[], Connection],
        site: str,
        device: str,
        state_dir: Path,
        current_version: Callable[[], str | None],
        publish_timeout_s: float = 10.0,
        backoff_min_s: float = 0.5,
        backoff_max_s: float = 60.0,
        rng: random.Random | None = None,
        wall_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        if not 0 < backoff_min_s <= backoff_max_s:
            raise ValueError("need 0 < backoff_min_s <= backoff_max_s")
        self.topics = OtaTopics(site, device)
        self.site, self.device = site, device
        self._connect = connect
        self._current_version = current_version
        self._publish_timeout_s = publish_timeout_s
        self._backoff_min_s, self._backoff_max_s = backoff_min_s, backoff_max_s
        self._rng = rng or random.Random()
        self._wall_ns = wall_ns
        self._finished = FinishedJobs(state_dir / AGENT_FILE)
        self.stats = AgentStats()
        self._cond = threading.Condition()
        # under _cond: shared by the network loop, the worker and report()
        self._outbox: list[Job] = []
        self._waiting: JobRequest | None = None
        self._running: str | None = None
        self._last_finished = self._finished.load()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self.updater = make_updater(self.report)

    # --- called by the updater (any thread) --------------------------------------------------

    def report(self, job: Job) -> None:
        """Queue ``job``'s state for publishing; returns at once (never blocks the job)."""
        with self._cond:
            last = self._outbox[-1] if self._outbox else None
            if last is not None and last.job_id == job.job_id:
                if job.step >= last.step:
                    self._outbox[-1] = job
            else:
                self._outbox.append(job)
                if len(self._outbox) > OUTBOX_LIMIT:
                    dropped = self._outbox.pop(0)
                    log.warning("state of job %s dropped unsent (outbox full)", dropped.job_id)
            self._cond.notify_all()

    # --- life cycle --------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Start the worker, then keep a broker session up until ``stop`` is set. Returns
        after closing the connection; the worker is asked to stop and joined for a moment (a
        job in progress cannot be interrupted: the updater persists its every step, so a
        process that exits mid-job resumes it on the next start)."""
        self._stop = stop
        self._worker = threading.Thread(target=self._work, name="qrgate-ota-worker", daemon=True)
        self._worker.start()
        delay_n = 0
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self._session(stop)
                except FleetTransportError as e:
                    self.stats.connect_failures += 1
                    log.warning("update agent: broker session ended: %s", e)
                if stop.is_set():
                    break
                if time.monotonic() - started >= STABLE_S:
                    delay_n = 0
                ceiling = min(self._backoff_max_s, self._backoff_min_s * 2 ** min(delay_n, 32))
                delay_n += 1
                stop.wait(self._rng.uniform(ceiling / 2, ceiling))
        finally:
            with self._cond:
                self._cond.notify_all()
            self._worker.join(timeout=5.0)
            if self._worker.is_alive():
                log.warning("update agent stopping with a job in progress: it resumes on restart")

    def _session(self, stop: threading.Event) -> None:
        conn = self._connect()
        try:
            self.stats.sessions += 1
            conn.subscribe(self.topics.job, qos=1)
            log.info("update agent connected; waiting for jobs on %s", self.topics.job)
            while not stop.is_set():
                self._flush(conn)
                msg = conn.next_message(POLL_S)
                if msg is not None:
                    self._on_message(*msg)
        finally:
            conn.close()

    def _flush(self, conn: Connection) -> None:
        while True:
            with self._cond:
                if not self._outbox:
                    return
                job = self._outbox[0]
            payload = self._payload(job)
            if payload is not None:
                conn.publish(self.topics.state, payload, qos=1, retain=True)
                conn.flush(self._publish_timeout_s)  # raises: the state stays queued
                self.stats.published += 1
                log.info("job %s: %s (%s) reported", job.job_id, job.state.value, job.reason)
            with self._cond:
                # report() may have replaced it with a newer state of the same job meanwhile
                if self._outbox and self._outbox[0] is job:
                    self._outbox.pop(0)

    def _payload(self, job: Job) -> bytes | None:
        try:
            current = self._current_version()
        except OtaError as e:
            log.error("current release unreadable for the report: %s", e)
            current = None
        try:
            return StatePayload.from_job(
                job,
                site=self.site,
                device=self.device,
                current_version=current,
                wall_ns=self._wall_ns(),
            ).to_bytes()
        except JobPayloadError as e:  # a job the contract cannot carry: a bug, never a loop
            log.error("job %s: state not reportable: %s", job.job_id, e)
            return None

    def _on_message(self, topic: str, payload: bytes) -> None:
        if topic != self.topics.job:
            return
        self.stats.received += 1
        try:
            request = JobRequest.parse(payload)
        except JobPayloadError as e:
            self.stats.rejected += 1
            log.warning("update job rejected: %s", e)
            return
        if request is None:
            with self._cond:
                cancelled, self._waiting = self._waiting, None
                running = self._running
            if cancelled is not None:
                self.stats.cancelled += 1
                log.info("job %s cancelled before it started", cancelled.job_id)
                # the rollout waits for a terminal state from every reader it sent a job to
                self.report(self._cancelled(cancelled))
            elif running is not None:
                self._cancel_running(running)
            return
        with self._cond:
            if request.job_id in (self._last_finished, self._running):
                self.stats.duplicates += 1
                log.debug("job %s already finished or running: ignored", request.job_id)
                return
            if self._waiting is not None and self._waiting.job_id != request.job_id:
                log.info(
                    "job %s replaced by job %s before it started",
                    self._waiting.job_id,
                    request.job_id,
                )
            self._waiting = request
            self._cond.notify_all()

    def _cancel_running(self, job_id: str) -> None:
        try:
            taken = self.updater.cancel(job_id)
        except Exception:  # a bug in the updater must not end the network loop
            log.exception("job %s: cancelling failed", job_id)
            return
        if taken:
            # the updater ends the job REJECTED "cancelled" and reports it through report()
            self.stats.cancelled += 1
            log.info("job %s cancelled before its download started", job_id)
        else:
            log.warning("job %s not cancelled: its download has started", job_id)

    def _cancelled(self, request: JobRequest) -> Job:
        try:
            current = self._current_version() or ""
        except OtaError:
            current = ""
        queued = Job(job_id=request.job_id, from_version=current, to_version=request.version)
        return advance(queued, Event(EventKind.REJECT, "cancelled"))

    # --- the worker --------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            job = self.updater.resume()
        except Exception:
            # a damaged job store must not stop new jobs: the updater logged what it could
            log.exception("resuming the interrupted job failed")
        else:
            if job is not None:
                self._done(job)
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._waiting is not None or self._stop.is_set())
                if self._stop.is_set():
                    return
                request = self._waiting
                self._waiting = None
                assert request is not None
                if request.job_id == self._last_finished:
                    self.stats.duplicates += 1
                    continue
                self._running = request.job_id
                self.stats.runs += 1
            log.info("job %s: updating to %s", request.job_id, request.version)
            try:
                self._done(self.updater.run(request))
            except Exception:
                log.exception("job %s: the updater failed", request.job_id)
            finally:
                with self._cond:
                    self._running = None

    def _done(self, job: Job) -> None:
        self.report(job)  # the updater reported it too, unless it was already terminal
        if not job.state.terminal:
            return
        try:
            self._finished.save(job.job_id)
        except OSError as e:
            log.error("cannot remember job %s as finished: %s", job.job_id, e)
        with self._cond:
            self._last_finished = job.job_id
