"""ota/agent.py against a real mosquitto: states published retained (QoS 1) in order, a
restart resumes the interrupted job, a finished or running job is never run twice, bad
payloads are dropped with their reason, a waiting job can be cancelled, and states produced
while the broker was killed arrive once it is back.

The updater is a recording implementation of the agent's Updater protocol over a real
JobStore and ota.job's state machine (the agent's contract is transport and ordering, not
installing): it drives every job QUEUED -> ... -> SUCCEEDED, reporting each persisted step,
and can hold a job in a state until the test releases it."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from firmware.demo.broker import HOST, LocalBroker
from ota.agent import Agent, Connection
from ota.job import Event, EventKind, Job, JobState, JobStore
from ota.jobs import JobRequest, OtaTopics, StatePayload
from ota.mqtt import PahoTransport, plain_client
from ota.releases import Releases
from ota.updater import Clock
from tests.firmware.conftest import need_mosquitto, no_leaks, stack
from tests.polling import wait_until

__all__ = ["need_mosquitto", "no_leaks", "stack"]

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")

SITE, DEVICE = "hq", "reader-1"
TOPICS = OtaTopics(SITE, DEVICE)
TOTAL = 100


class RecordingUpdater:
    """The agent's Updater protocol over a real JobStore: every step is persisted, then
    reported. ``hold_at``: the job waits in that state until ``release`` is set (``held`` is
    set when it gets there). ``calls``: ("resume", None), ("run", job_id) and
    ("cancel", job_id) in order; ``cancel`` is refused (as the real updater refuses a job
    that is downloading: the tests here hold jobs there)."""

    def __init__(
        self,
        report: Callable[[Job], None],
        store: JobStore,
        current: str,
        hold_at: JobState | None = None,
    ) -> None:
        self.report, self.store, self.current = report, store, current
        self.hold_at = hold_at
        self.held, self.release = threading.Event(), threading.Event()
        self.calls: list[tuple[str, str | None]] = []

    def resume(self) -> Job | None:
        self.calls.append(("resume", None))
        job = self.store.recover(self.current)
        if job is None or job.state.terminal:
            return job
        self.report(job)
        return self._drive(job)

    def run(self, request: JobRequest) -> Job:
        self.calls.append(("run", request.job_id))
        job = Job(request.job_id, from_version=self.current, to_version=request.version)
        self.store.save(job)
        self.report(job)
        return self._drive(job)

    def cancel(self, job_id: str) -> bool:
        self.calls.append(("cancel", job_id))
        return False

    def _drive(self, job: Job) -> Job:
        while not job.state.terminal:
            if job.state is self.hold_at and not self.release.is_set():
                self.held.set()
                assert self.release.wait(30), "the test never released the job"
            job = self.store.advance(job, self._next(job))
            if job.state is JobState.PENDING_COMMIT:
                self.current = job.to_version
            self.report(job)
        return job

    @staticmethod
    def _next(job: Job) -> Event:
        if job.state is JobState.QUEUED:
            return Event(EventKind.START)
        if job.state is JobState.DOWNLOADING:
            if job.bytes_done < TOTAL:
                return Event(EventKind.PROGRESS, bytes_done=job.bytes_done + 50, bytes_total=TOTAL)
            return Event(EventKind.DOWNLOADED)
        if job.state is JobState.INSTALLING:
            return Event(EventKind.SWITCHED)
        return Event(EventKind.HEALTHY)


@dataclass
class Running:
    agent: Agent
    updater: RecordingUpdater
    stop: threading.Event
    thread: threading.Thread

    def halt(self) -> None:
        self.stop.set()
        self.updater.release.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


@pytest.fixture
def broker(tmp_path: Path, stack: ExitStack) -> LocalBroker:
    b = LocalBroker(tmp_path / "broker")
    b.start()
    stack.callback(b.stop)
    return b


def connector(broker: LocalBroker, name: str) -> Callable[[], Connection]:
    def connect() -> Connection:
        t = PahoTransport(plain_client(name), HOST, broker.port, keepalive_s=5, timeout_s=5)
        t.connect()
        return t

    return connect


def start_agent(
    tmp_path: Path,
    broker: LocalBroker,
    stack: ExitStack,
    *,
    current: str = "1.0",
    hold_at: JobState | None = None,
) -> Running:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    store = JobStore(state / "job.json")
    made: list[RecordingUpdater] = []

    def make(report: Callable[[Job], None]) -> RecordingUpdater:
        made.append(RecordingUpdater(report, store, current, hold_at))
        return made[0]

    agent = Agent(
        make,
        connect=connector(broker, f"qrgate-{DEVICE}-updater"),
        site=SITE,
        device=DEVICE,
        state_dir=state,
        current_version=lambda: made[0].current,
        publish_timeout_s=1.0,
        backoff_min_s=0.05,
        backoff_max_s=0.5,
        rng=random.Random(7),
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), name="test-ota-agent")
    running = Running(agent, made[0], stop, thread)
    thread.start()
    stack.callback(running.halt)
    return running


def observer(broker: LocalBroker, stack: ExitStack, name: str = "observer") -> PahoTransport:
    t = PahoTransport(plain_client(name), HOST, broker.port, timeout_s=5)
    t.connect()
    stack.callback(t.close)
    t.subscribe(TOPICS.state)
    return t


def publish_job(broker: LocalBroker, payload: bytes, *, retain: bool = True) -> None:
    with PahoTransport(plain_client("technician"), HOST, broker.port, timeout_s=5) as t:
        t.connect()
        t.publish(TOPICS.job, payload, qos=1, retain=retain)
        t.flush(5)


def job(job_id: str, version: str = "2.0") -> bytes:
    return JobRequest(job_id=job_id, version=version, rollout="r1").to_bytes()


class States:
    """State reports seen by an observer, parsed."""

    def __init__(self, transport: PahoTransport) -> None:
        self.transport = transport
        self.seen: list[StatePayload] = []

    def pump(self) -> list[StatePayload]:
        while (msg := self.transport.next_message(0.01)) is not None:
            self.seen.append(StatePayload.parse(msg[1], site=SITE, device=DEVICE))
        return self.seen

    def until(self, predicate: Callable[[list[StatePayload]], bool], timeout_s: float = 20) -> None:
        assert wait_until(lambda: predicate(self.pump()), timeout_s), [
            (s.job_id, s.state.value, s.step) for s in self.seen
        ]

    def terminal(self, job_id: str) -> StatePayload:
        self.until(lambda seen: any(s.job_id == job_id and s.state.terminal for s in seen))
        return next(s for s in self.seen if s.job_id == job_id and s.state.terminal)


def retained_state(broker: LocalBroker, stack: ExitStack, name: str) -> StatePayload:
    """What a subscriber arriving now gets: the retained state."""
    states = States(observer(broker, stack, name))
    states.until(bool, 10)
    return states.seen[0]


def test_a_job_reports_every_step_retained_and_is_remembered(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    states = States(observer(broker, stack))
    running = start_agent(tmp_path, broker, stack)
    publish_job(broker, job("job-1"))
    done = states.terminal("job-1")
    assert (done.state, done.reason) == (JobState.SUCCEEDED, "healthy")
    assert (done.from_version, done.to_version, done.current_version) == ("1.0", "2.0", "2.0")
    assert (done.bytes_done, done.bytes_total) == (TOTAL, TOTAL)
    # in order, never a step twice or backwards (coalescing may skip some in between)
    steps = [s.step for s in states.seen]
    assert steps == sorted(set(steps)) and steps[-1] == done.step == 6
    assert running.updater.calls == [("resume", None), ("run", "job-1")]
    # retained: a dashboard subscribing later reads the outcome
    later = retained_state(broker, stack, "dashboard")
    assert (later.job_id, later.state, later.step) == ("job-1", JobState.SUCCEEDED, 6)
    # the finished job is on disk, for the next start
    agent_file = tmp_path / "state" / "agent.json"
    assert json.loads(agent_file.read_text()) == {"last_finished_job_id": "job-1"}
    assert agent_file.stat().st_mode & 0o777 == 0o600


def test_restart_resumes_the_interrupted_job_and_never_runs_it_twice(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    # what a kill -9 mid-download leaves: the job store in DOWNLOADING, the job retained
    (tmp_path / "state").mkdir()
    store = JobStore(tmp_path / "state" / "job.json")
    queued = Job("job-7", from_version="1.0", to_version="2.0")
    started = store.advance(queued, Event(EventKind.START))
    store.advance(started, Event(EventKind.PROGRESS, bytes_done=50, bytes_total=TOTAL))
    publish_job(broker, job("job-7"))
    states = States(observer(broker, stack))

    first = start_agent(tmp_path, broker, stack)
    done = states.terminal("job-7")
    # START, PROGRESS 50, RESUME, PROGRESS 100, DOWNLOADED, SWITCHED, HEALTHY
    assert (done.state, done.step, done.from_version) == (JobState.SUCCEEDED, 7, "1.0")
    # the retained job-7 came in and was ignored: resumed, never run again
    assert wait_until(lambda: first.agent.stats.duplicates >= 1)
    assert first.updater.calls == [("resume", None)]
    first.halt()

    # the next start finds the job finished: it reports it again and ignores the retained job
    second = start_agent(tmp_path, broker, stack, current="2.0")
    assert wait_until(lambda: second.agent.stats.duplicates >= 1)
    assert second.updater.calls == [("resume", None)]
    assert second.agent.stats.runs == 0
    again = retained_state(broker, stack, "dashboard")
    assert (again.job_id, again.state, again.step) == ("job-7", JobState.SUCCEEDED, 7)


def test_bad_payloads_are_dropped_with_their_reason(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="ota.agent")
    states = States(observer(broker, stack))
    running = start_agent(tmp_path, broker, stack)
    assert wait_until(lambda: running.agent.stats.sessions == 1)
    bad = {
        b"not json": "not JSON",
        b"[1, 2]": "not an object",
        b'{"job_id": "a/b", "version": "2.0"}': "job_id",
        b'{"job_id": "j1", "version": "../../etc"}': "not a release version",
        b'{"job_id": "j1", "version": "2.0", "allow_downgrade": "yes"}': "allow_downgrade",
        b'{"job_id": "j1"}': "'version' must be a non-empty string",
        b"\xff\xfe": "not UTF-8",
        b'{"job_id": "j1", "version": "2.0", "x": "' + b"y" * 5000 + b'"}': "over the",
    }
    for payload in bad:
        publish_job(broker, payload, retain=False)
    assert wait_until(lambda: running.agent.stats.rejected == len(bad))
    logged = [r.getMessage() for r in caplog.records if "update job rejected" in r.getMessage()]
    assert len(logged) == len(bad)
    for message, reason in zip(logged, bad.values(), strict=True):
        assert reason in message, (message, reason)
    # the agent is still there: a good job after them runs
    publish_job(broker, job("job-2"))
    assert states.terminal("job-2").state is JobState.SUCCEEDED
    assert running.updater.calls == [("resume", None), ("run", "job-2")]


def test_a_waiting_job_is_cancelled_by_an_empty_retained_job(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    states = States(observer(broker, stack))
    running = start_agent(tmp_path, broker, stack, hold_at=JobState.DOWNLOADING)
    publish_job(broker, job("job-a"))
    assert running.updater.held.wait(20)
    publish_job(broker, job("job-b", "3.0"))  # waits behind job-a
    publish_job(broker, job("job-a"))  # the running one again: ignored
    publish_job(broker, b"")  # cancels job-b, not job-a (it downloads already)
    assert wait_until(lambda: running.agent.stats.cancelled == 1)
    assert running.agent.stats.duplicates == 1
    running.updater.release.set()
    assert states.terminal("job-a").state is JobState.SUCCEEDED
    # job-b never ran, and nothing ran after job-a
    assert wait_until(lambda: running.agent.stats.published >= 2)
    assert running.updater.calls == [("resume", None), ("run", "job-a")]
    # the cancelled job is reported REJECTED "cancelled": a rollout waits for every reader
    cancelled = states.terminal("job-b")
    assert (cancelled.state, cancelled.reason, cancelled.to_version) == (
        JobState.REJECTED,
        "cancelled",
        "3.0",
    )


def test_states_from_while_the_broker_was_killed_arrive_after_it_is_back(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    states = States(observer(broker, stack))
    running = start_agent(tmp_path, broker, stack, hold_at=JobState.DOWNLOADING)
    publish_job(broker, job("job-9"))
    assert running.updater.held.wait(20)
    states.until(lambda seen: any(s.state is JobState.DOWNLOADING for s in seen))
    broker.kill()
    states.transport.close()
    running.updater.release.set()  # the job goes on without a broker
    store = JobStore(tmp_path / "state" / "job.json")
    assert wait_until(lambda: (j := store.load()) is not None and j.state.terminal, 20)
    # the agent noticed: its unacknowledged state is waiting for the next session
    assert wait_until(lambda: running.agent.stats.connect_failures >= 1, 20)
    broker.start()
    assert States(observer(broker, stack, "after-restart")).terminal("job-9").step == 6
    done = retained_state(broker, stack, "final")
    assert (done.job_id, done.state, done.step, done.current_version) == (
        "job-9",
        JobState.SUCCEEDED,
        6,
        "2.0",
    )
    assert running.agent.stats.sessions >= 2
    assert running.updater.calls == [("resume", None), ("run", "job-9")]


class NeverSynced:
    """A wall clock NTP never synchronises (the reader waits for it)."""

    @staticmethod
    def wall_ns() -> int:
        return time.time_ns()

    @staticmethod
    def synced() -> bool:
        return False


def start_real_agent(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack, clock: Clock
) -> tuple[Agent, Releases]:
    """The agent over the production updater, wired to real parts; the TUF repository is
    unreachable and nothing may be installed (the tests' jobs end before either)."""
    from ota.fetch import Fetcher
    from ota.health import ActivityFile, SystemdSupervisor
    from ota.updater import Updater

    state = tmp_path / "state"
    state.mkdir()
    releases = Releases(tmp_path / "opt")

    def installer(bundle: Path, version: str) -> Path:
        raise AssertionError("nothing may be installed")

    def make(report: Callable[[Job], None]) -> Updater:
        return Updater(
            store=JobStore(state / "job.json"),
            releases=releases,
            fetcher=Fetcher(state / "md", state / "cache", "http://127.0.0.1:9/", b"{}"),
            installer=installer,
            supervisor=SystemdSupervisor(systemctl=("false",)),
            activity=ActivityFile(tmp_path / "run" / "activity.json"),
            report=report,
            clock=clock,
            device_type="rpi4",
            python_tag="cp311",
        )

    agent = Agent(
        make,
        connect=connector(broker, f"qrgate-{DEVICE}-updater"),
        site=SITE,
        device=DEVICE,
        state_dir=state,
        current_version=releases.current_version,
        publish_timeout_s=1.0,
        backoff_min_s=0.05,
        backoff_max_s=0.5,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agent.run, args=(stop,), name="test-ota-agent")
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join(30)
        assert not thread.is_alive()

    stack.callback(halt)
    return agent, releases


def test_the_real_updater_rejects_a_job_on_a_reader_without_a_release(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    # with no `current` release the job is refused before any clock, TUF or install step
    from firmware.ota_agent import SystemClock

    states = States(observer(broker, stack))
    _agent, _releases = start_real_agent(tmp_path, broker, stack, SystemClock())
    publish_job(broker, job("job-r"))
    done = states.terminal("job-r")
    assert (done.state, done.reason, done.current_version) == (
        JobState.REJECTED,
        "no_current_release",
        None,
    )
    state = tmp_path / "state"
    assert json.loads((state / "agent.json").read_text()) == {"last_finished_job_id": "job-r"}


def test_an_empty_job_cancels_the_running_job_waiting_for_the_clock(
    tmp_path: Path, broker: LocalBroker, stack: ExitStack
) -> None:
    # the abort of a rollout reaches a reader whose job already runs but waits, QUEUED, for
    # a synced clock: the updater ends it REJECTED "cancelled" before any TUF or download
    states = States(observer(broker, stack))
    agent, releases = start_real_agent(tmp_path, broker, stack, NeverSynced())
    releases.path("1.0").mkdir(parents=True)
    releases.complete("1.0")
    releases.switch("1.0")
    publish_job(broker, job("job-w"))
    states.until(lambda seen: any(s.reason == "waiting_for_clock" for s in seen))
    publish_job(broker, b"")
    done = states.terminal("job-w")
    assert (done.state, done.reason, done.current_version) == (
        JobState.REJECTED,
        "cancelled",
        "1.0",
    )
    assert agent.stats.cancelled == 1
    assert releases.current_version() == "1.0"
    assert wait_until(
        lambda: (
            (tmp_path / "state" / "agent.json").exists()
            and json.loads((tmp_path / "state" / "agent.json").read_text())
            == {"last_finished_job_id": "job-w"}
        )
    )
