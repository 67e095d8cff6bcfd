"""The OTA job contract (ota.jobs): topics, job requests and state reports, pure."""

from __future__ import annotations

import json

import pytest

from firmware.uplink import topics as uplink_topics
from ota.exceptions import JobPayloadError
from ota.job import Event, EventKind, Job, JobState, advance
from ota.jobs import (
    MAX_DETAIL_CHARS,
    MAX_PAYLOAD_BYTES,
    PREFIX,
    JobRequest,
    OtaTopics,
    StatePayload,
    all_jobs,
    all_states,
    parse_ota_topic,
)


def test_prefix_is_the_uplink_contracts() -> None:
    assert PREFIX == uplink_topics.PREFIX


def test_topics_of_a_reader() -> None:
    t = OtaTopics("hq", "door-7")
    assert t.job == "qrgate/v1/hq/door-7/ota/job"
    assert t.state == "qrgate/v1/hq/door-7/ota/state"
    assert uplink_topics.parse_topic(t.job) == ("hq", "door-7", "ota/job")
    assert all_jobs("hq") == "qrgate/v1/hq/+/ota/job"
    assert all_states() == "qrgate/v1/+/+/ota/state"
    assert parse_ota_topic(t.state) == ("hq", "door-7", "state")
    assert parse_ota_topic(t.job) == ("hq", "door-7", "job")
    for other in ("qrgate/v1/hq/door-7/status", "qrgate/v2/hq/d/ota/job", "qrgate/v1/hq/d/ota/x",
                  "qrgate/v1/hq/d/ota/job/extra", "qrgate/v1//d/ota/job"):  # fmt: skip
        assert parse_ota_topic(other) is None


@pytest.mark.parametrize("site, device", [("", "d"), ("a/b", "d"), ("s", "+"), ("s", "#x")])
def test_topics_refuse_names_that_break_a_topic(site: str, device: str) -> None:
    with pytest.raises(JobPayloadError, match="cannot be part of an MQTT topic"):
        OtaTopics(site, device)
    with pytest.raises(JobPayloadError):
        all_jobs("a/b")


def test_job_request_round_trip() -> None:
    rid = "rollout-1.2.0-ab12"
    req = JobRequest(rid, "1.2.0", allow_downgrade=True, rollout=rid, issued_wall_ns=17 * 10**17)
    data = json.loads(req.to_bytes())
    assert data == {
        "job_id": "rollout-1.2.0-ab12",
        "version": "1.2.0",
        "allow_downgrade": True,
        "rollout": "rollout-1.2.0-ab12",
        "issued_wall_ns": 17 * 10**17,
    }
    assert JobRequest.parse(req.to_bytes()) == req


def test_job_request_minimal_and_cancel() -> None:
    assert JobRequest.parse(b"") is None
    req = JobRequest.parse(b'{"job_id": "j1", "version": "2.0rc1", "later_field": [1]}')
    assert req == JobRequest("j1", "2.0rc1", allow_downgrade=False, rollout="", issued_wall_ns=0)


@pytest.mark.parametrize(
    "payload, why",
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{", "not JSON"),
        (b"[1]", "not an object"),
        (b'{"version": "1.0"}', "'job_id'"),
        (b'{"job_id": "j", "version": "latest"}', "not a release version"),
        (b'{"job_id": "j", "version": ""}', "'version'"),
        (b'{"job_id": "../x", "version": "1.0"}', "not an id"),
        (b'{"job_id": "j", "version": "1.0", "allow_downgrade": "yes"}', "allow_downgrade"),
        (b'{"job_id": "j", "version": "1.0", "rollout": 5}', "'rollout'"),
        (b'{"job_id": "j", "version": "1.0", "issued_wall_ns": -1}', "issued_wall_ns"),
        (b'{"job_id": "j", "version": "1.0", "issued_wall_ns": 1.5}', "issued_wall_ns"),
        (b"[" * 100_000, "limit"),
        (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
    ],
)
def test_job_request_refuses_bad_payloads(payload: bytes, why: str) -> None:
    with pytest.raises(JobPayloadError, match=why):
        JobRequest.parse(payload)


def test_job_request_size_cap_is_checked_before_parsing() -> None:
    big = json.dumps({"job_id": "j", "version": "1.0", "pad": "x" * MAX_PAYLOAD_BYTES}).encode()
    with pytest.raises(JobPayloadError, match=f"over the {MAX_PAYLOAD_BYTES} limit"):
        JobRequest.parse(big)


def _job() -> Job:
    job = Job("j-7", "1.0.0", "1.1.0")
    job = advance(job, Event(EventKind.START))
    return advance(job, Event(EventKind.PROGRESS, bytes_done=400, bytes_total=1000))


def test_state_report_from_a_job_round_trips() -> None:
    rep = StatePayload.from_job(_job(), site="hq", device="d1", current_version="1.0.0",
                                wall_ns=123)  # fmt: skip
    data = json.loads(rep.to_bytes())
    assert data == {
        "device": "d1", "site": "hq", "job_id": "j-7", "state": "DOWNLOADING",
        "reason": "download_progress", "from_version": "1.0.0", "to_version": "1.1.0",
        "step": 2, "bytes_done": 400, "bytes_total": 1000, "current_version": "1.0.0",
        "detail": "", "wall_ns": 123,
    }  # fmt: skip
    assert StatePayload.parse(rep.to_bytes(), site="hq", device="d1") == rep
    assert not rep.failed


def test_state_report_detail_comes_from_the_job_and_is_capped() -> None:
    job = advance(Job("j", "1.0", "1.1"), Event(EventKind.FAIL, "install_failed", detail="pip: no"))
    rep = StatePayload.from_job(job, site="s", device="d", current_version="1.0", wall_ns=1)
    assert (rep.state, rep.reason, rep.detail, rep.failed) == (
        JobState.FAILED,
        "install_failed",
        "pip: no",
        True,
    )
    long = StatePayload.from_job(job, site="s", device="d", current_version=None, wall_ns=1,
                                 detail="x" * 1000)  # fmt: skip
    assert len(long.detail) == MAX_DETAIL_CHARS
    assert StatePayload.parse(long.to_bytes()).detail == "x" * MAX_DETAIL_CHARS


def _state(**change: object) -> bytes:
    base: dict[str, object] = {
        "device": "d1", "site": "hq", "job_id": "j", "state": "ROLLED_BACK",
        "reason": "exited_at_start", "from_version": "1.0", "to_version": "1.1",
    }  # fmt: skip
    base.update(change)
    return json.dumps({k: v for k, v in base.items() if v is not ...}).encode()


def test_state_report_minimal_fields_and_defaults() -> None:
    rep = StatePayload.parse(_state())
    assert rep.state is JobState.ROLLED_BACK and rep.failed
    assert (rep.step, rep.bytes_done, rep.bytes_total, rep.current_version, rep.wall_ns) == (
        0,
        0,
        None,
        None,
        0,
    )


@pytest.mark.parametrize(
    "change, why",
    [
        ({"state": "IN_PROGRESS"}, "unknown state"),
        ({"state": ...}, "'state'"),
        ({"reason": "Bad Reason"}, "snake_case"),
        ({"device": "a/b"}, "cannot be part"),
        ({"job_id": "x" * 65}, "not an id"),
        ({"bytes_done": 10, "bytes_total": 5}, "impossible progress"),
        ({"bytes_done": -1}, "'bytes_done'"),
        ({"bytes_total": "many"}, "'bytes_total'"),
        ({"current_version": 3}, "current_version"),
        ({"detail": ["x"]}, "'detail'"),
        ({"detail": "x" * (MAX_DETAIL_CHARS + 1)}, "detail over"),
        ({"to_version": "v" * 65}, "to_version"),
        ({"step": True}, "'step'"),
    ],
)
def test_state_report_refuses_bad_fields(change: dict[str, object], why: str) -> None:
    with pytest.raises(JobPayloadError, match=why):
        StatePayload.parse(_state(**change))


def test_state_report_must_match_its_topic() -> None:
    with pytest.raises(JobPayloadError, match="payload device 'd1' is not 'd2'"):
        StatePayload.parse(_state(), site="hq", device="d2")
    with pytest.raises(JobPayloadError, match="payload site 'hq' is not 'lab'"):
        StatePayload.parse(_state(), site="lab", device="d1")
