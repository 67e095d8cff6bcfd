"""The update job state machine, its store and the restart table."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ota.exceptions import JobStateError, OtaError
from ota.job import (
    MAX_DETAIL_CHARS,
    TRANSITIONS,
    Event,
    EventKind,
    Job,
    JobState,
    JobStore,
    advance,
    recover,
)

S, E = JobState, EventKind


def job_in(state: JobState, bytes_done: int = 0, bytes_total: int | None = None) -> Job:
    return Job("job-7", "1.0", "1.1", state, "x", 3, bytes_done, bytes_total)


LEGAL = [
    (S.QUEUED, Event(E.START), S.DOWNLOADING, "download_started"),
    (
        S.DOWNLOADING,
        Event(E.PROGRESS, bytes_done=10, bytes_total=50),
        S.DOWNLOADING,
        "download_progress",
    ),
    (S.DOWNLOADING, Event(E.RESUME), S.DOWNLOADING, "resumed_after_restart"),
    (S.DOWNLOADING, Event(E.DOWNLOADED), S.INSTALLING, "verified"),
    (S.INSTALLING, Event(E.SWITCHED), S.PENDING_COMMIT, "switched"),
    (S.PENDING_COMMIT, Event(E.HEALTHY), S.SUCCEEDED, "healthy"),
    (S.PENDING_COMMIT, Event(E.ROLLBACK, "health_deadline"), S.ROLLED_BACK, "health_deadline"),
    (S.QUEUED, Event(E.REJECT, "downgrade"), S.REJECTED, "downgrade"),
    (S.DOWNLOADING, Event(E.REJECT, "tampered"), S.REJECTED, "tampered"),
    (S.QUEUED, Event(E.FAIL, "clock_not_synced"), S.FAILED, "clock_not_synced"),
    (S.DOWNLOADING, Event(E.FAIL, "download_gave_up"), S.FAILED, "download_gave_up"),
    (S.INSTALLING, Event(E.FAIL, "pip_failed"), S.FAILED, "pip_failed"),
    (S.QUEUED, Event(E.WAIT, "waiting_for_clock"), S.QUEUED, "waiting_for_clock"),
    (S.DOWNLOADING, Event(E.WAIT, "waiting_for_clock"), S.DOWNLOADING, "waiting_for_clock"),
    (S.INSTALLING, Event(E.WAIT, "waiting_for_door_idle"), S.INSTALLING, "waiting_for_door_idle"),
]


def test_legal_list_covers_the_whole_table() -> None:
    assert {(s, ev.kind) for s, ev, _, _ in LEGAL} == set(TRANSITIONS)


@pytest.mark.parametrize(("state", "event", "target", "reason"), LEGAL)
def test_every_legal_transition(
    state: JobState, event: Event, target: JobState, reason: str
) -> None:
    before = job_in(state)
    after = advance(before, event)
    assert after.state is target
    assert after.reason == reason
    assert after.step == 4
    assert (after.job_id, after.from_version, after.to_version) == ("job-7", "1.0", "1.1")
    assert before.state is state  # frozen input unchanged


ILLEGAL = [(s, k) for s in JobState for k in EventKind if (s, k) not in TRANSITIONS]


@pytest.mark.parametrize(("state", "kind"), ILLEGAL)
def test_illegal_transitions_refused(state: JobState, kind: EventKind) -> None:
    with pytest.raises(JobStateError, match=f"{kind.value} is not allowed in state {state.value}"):
        advance(job_in(state), Event(kind, "some_reason"))


def test_terminal_states_accept_nothing() -> None:
    terminal = {s for s in JobState if s.terminal}
    assert terminal == {S.SUCCEEDED, S.FAILED, S.ROLLED_BACK, S.REJECTED}
    assert not any(s in terminal for s, _ in TRANSITIONS)


def test_failure_events_need_a_reason_code() -> None:
    for state, kind in [
        (S.QUEUED, E.FAIL),
        (S.QUEUED, E.REJECT),
        (S.PENDING_COMMIT, E.ROLLBACK),
        (S.INSTALLING, E.WAIT),
    ]:
        with pytest.raises(JobStateError, match="needs a reason code"):
            advance(job_in(state), Event(kind))
    for bad in ["Bad", "has space", "x" * 65, "1st", "a-b"]:
        with pytest.raises(JobStateError, match="snake_case"):
            advance(job_in(S.QUEUED), Event(E.FAIL, bad))


def test_progress_is_recorded_and_kept() -> None:
    job = advance(Job("j", "1.0", "2.0"), Event(E.START))
    assert (job.bytes_done, job.bytes_total) == (0, None)
    job = advance(job, Event(E.PROGRESS, bytes_done=4096, bytes_total=None))
    assert (job.bytes_done, job.bytes_total) == (4096, None)
    job = advance(job, Event(E.PROGRESS, bytes_done=8192, bytes_total=10000))
    job = advance(job, Event(E.DOWNLOADED))
    assert (job.state, job.bytes_done, job.bytes_total, job.step) == (S.INSTALLING, 8192, 10000, 4)
    for done, total in [(-1, 10), (11, 10), (1, -5)]:
        with pytest.raises(JobStateError, match="impossible download progress"):
            advance(job_in(S.DOWNLOADING), Event(E.PROGRESS, bytes_done=done, bytes_total=total))


def test_detail_is_one_capped_line_replaced_by_the_next_step() -> None:
    job = advance(job_in(S.INSTALLING), Event(E.WAIT, "waiting_for_door_idle", detail="x"))
    assert job.detail == "x"
    noisy = "pip: error\n\tline two\x1b[31m " + "y" * 400
    failed = advance(job, Event(E.FAIL, "install_failed", detail=noisy))
    assert failed.detail.startswith("pip: error line two [31m yyy")
    assert len(failed.detail) == MAX_DETAIL_CHARS
    assert advance(job_in(S.QUEUED), Event(E.START)).detail == ""
    downgrade = Job("j", "2.0", "1.0", allow_downgrade=True, detail="d")
    assert Job.from_dict(json.loads(json.dumps(downgrade.to_dict()))) == downgrade


def test_waiting_keeps_the_download_progress() -> None:
    job = job_in(S.DOWNLOADING, 40, 100)
    waited = advance(job, Event(E.WAIT, "waiting_for_clock"))
    assert (waited.state, waited.bytes_done, waited.bytes_total) == (S.DOWNLOADING, 40, 100)


def test_error_hierarchy() -> None:
    assert issubclass(JobStateError, OtaError)


def test_store_round_trip_and_mode(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "job.json")
    assert store.load() is None
    job = store.advance(Job("job-9", "1.0", "1.2"), Event(E.START))
    job = store.advance(job, Event(E.PROGRESS, bytes_done=300, bytes_total=900))
    loaded = store.load()
    assert loaded == job
    assert loaded is not None and loaded.state is S.DOWNLOADING
    assert json.loads((tmp_path / "job.json").read_text()) == {
        "job_id": "job-9",
        "from_version": "1.0",
        "to_version": "1.2",
        "state": "DOWNLOADING",
        "reason": "download_progress",
        "step": 2,
        "bytes_done": 300,
        "bytes_total": 900,
        "allow_downgrade": False,
        "detail": "",
    }
    assert os.stat(tmp_path / "job.json").st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no temp files left
    store.clear()
    assert store.load() is None
    store.clear()


def test_store_refused_step_writes_nothing(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "job.json")
    job = Job("j", "1.0", "1.1", state=S.SUCCEEDED, reason="healthy", step=5)
    store.save(job)
    with pytest.raises(JobStateError):
        store.advance(job, Event(E.START))
    assert store.load() == job


GOOD = Job("j", "1.0", "1.1").to_dict()

DAMAGED = [
    (b"{not json", "damaged job file"),
    (b"", "damaged job file"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({**GOOD, "state": "DANCING"}).encode(), "unknown state 'DANCING'"),
    (json.dumps({**GOOD, "extra": 1}).encode(), "has fields"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "step"}).encode(), "has fields"),
    (json.dumps({**GOOD, "step": "3"}).encode(), "'step' is not a non-negative integer"),
    (json.dumps({**GOOD, "step": True}).encode(), "'step' is not a non-negative integer"),
    (json.dumps({**GOOD, "to_version": ""}).encode(), "'to_version' is not a non-empty string"),
    (json.dumps({**GOOD, "reason": "Bad Reason"}).encode(), "snake_case"),
    (json.dumps({**GOOD, "bytes_done": 5, "bytes_total": 4}).encode(), "impossible"),
    (json.dumps({**GOOD, "allow_downgrade": 1}).encode(), "'allow_downgrade' is not true"),
    (json.dumps({**GOOD, "detail": "x" * 257}).encode(), "'detail' is not a string"),
    (json.dumps({**GOOD, "detail": None}).encode(), "'detail' is not a string"),
    (b"\xff\xfe", "damaged job file"),
]


@pytest.mark.parametrize(("content", "message"), DAMAGED)
def test_damaged_file_names_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "job.json"
    path.write_bytes(content)
    with pytest.raises(JobStateError, match=message) as info:
        JobStore(path).load()
    assert str(path) in str(info.value)


def test_not_a_regular_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real.json").write_text(json.dumps(GOOD))
    (tmp_path / "job.json").symlink_to(tmp_path / "real.json")
    with pytest.raises(JobStateError, match="cannot read the job file") as info:
        JobStore(tmp_path / "job.json").load()
    assert str(tmp_path / "job.json") in str(info.value)
    (tmp_path / "dir.json").mkdir()
    with pytest.raises(JobStateError, match="cannot read the job file"):
        JobStore(tmp_path / "dir.json").load()


RECOVERY = [
    # state, running version, expected state, expected reason
    (S.QUEUED, "1.0", S.QUEUED, "x"),
    (S.DOWNLOADING, "1.0", S.DOWNLOADING, "resumed_after_restart"),
    (S.INSTALLING, "1.0", S.FAILED, "interrupted_install"),
    (S.INSTALLING, None, S.FAILED, "interrupted_install"),
    (S.INSTALLING, "1.1", S.PENDING_COMMIT, "switched_before_restart"),
    (S.PENDING_COMMIT, "1.1", S.PENDING_COMMIT, "x"),
    (S.PENDING_COMMIT, "1.0", S.ROLLED_BACK, "crashed_before_commit"),
    (S.SUCCEEDED, "1.1", S.SUCCEEDED, "x"),
    (S.FAILED, "1.0", S.FAILED, "x"),
    (S.ROLLED_BACK, "1.0", S.ROLLED_BACK, "x"),
    (S.REJECTED, "1.0", S.REJECTED, "x"),
]


@pytest.mark.parametrize(("state", "running", "target", "reason"), RECOVERY)
def test_recovery_table(
    state: JobState, running: str | None, target: JobState, reason: str
) -> None:
    job = job_in(state, bytes_done=70, bytes_total=100)
    after = recover(job, running)
    assert (after.state, after.reason) == (target, reason)
    assert (after.bytes_done, after.bytes_total) == (70, 100)  # progress kept for resuming
    assert after.step == (3 if after == job else 4)


def test_store_recover_persists_the_outcome(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "job.json")
    assert store.recover("1.0") is None
    store.save(job_in(S.PENDING_COMMIT))
    after = store.recover("1.0")
    assert after is not None and after.state is S.ROLLED_BACK
    assert store.load() == after
    assert store.recover("1.0") == after  # terminal: a second restart changes nothing
