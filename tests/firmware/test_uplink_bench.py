"""The uplink benchmark's measuring code (firmware/uplink/bench.py) at tiny sizes, against a
real mosquitto and a real daemon, so `make bench` cannot rot: the counts must add up and the
memory samples must be real. No timing is asserted."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from firmware.demo.broker import LocalBroker
from firmware.journal.bench import sample_event
from firmware.journal.outbox import OutboxReader
from firmware.journal.store import Journal
from firmware.uplink import bench as ub


@pytest.fixture
def broker(need_mosquitto: None, tmp_path: Path) -> Iterator[LocalBroker]:
    with LocalBroker(tmp_path / "broker", persistence=False) as b:
        yield b


def test_backlog_is_a_journal_that_opens_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "journal.db"
    ub.build_backlog(path, 1_200, chunk=500)
    reader = OutboxReader(path)
    try:
        assert reader.backlog() == 1_200
        rows = reader.unsent_after(0, 2_000)
    finally:
        reader.close()
    assert [r.seq for r in rows] == list(range(1, 1_201))
    assert len({r.event_id for r in rows}) == 1_200
    first, expected = rows[0].event, sample_event(1)
    assert (first.kind, first.decision, first.subject, first.codes) == (
        expected.kind,
        expected.decision,
        expected.subject,
        expected.codes,
    )
    with Journal(path, boot_id="next-boot") as journal:  # quick_check, seq continues
        receipt = journal.append(sample_event(0))
    assert (receipt.seq, receipt.durability) == (1_201, "committed")
    with pytest.raises(FileExistsError):
        ub.build_backlog(path, 1)


def test_drains_deliver_every_event(tmp_path: Path, broker: LocalBroker) -> None:
    path = tmp_path / "journal.db"
    ub.build_backlog(path, 300)
    batched = list(ub.outbox_payloads(path, 50))
    assert len(batched) == 6
    seqs = [e["seq"] for p in batched for e in json.loads(p)["events"]]
    assert seqs == list(range(1, 301))

    r = ub.drain_paho(batched, broker.host, broker.port, events=300)
    assert (r.events, r.messages) == (300, 6)
    assert 1 <= r.max_in_flight <= 64 and r.seconds > 0 and r.rate > 0
    r = ub.drain_paho(ub.outbox_payloads(path, 1), broker.host, broker.port, events=300, window=8)
    assert (r.events, r.messages) == (300, 300)
    assert r.max_in_flight <= 8

    up = ub.drain_uplink(path, broker.host, broker.port)
    assert up.events == 300 and 6 <= up.messages <= 300 and 1 <= up.max_in_flight <= 64
    reader = OutboxReader(path)
    try:
        assert reader.backlog() == 0  # every row marked published
        assert reader.max_published() == 300
    finally:
        reader.close()


def test_daemon_rss_samples_a_draining_daemon(tmp_path: Path, broker: LocalBroker) -> None:
    r = ub.daemon_rss(tmp_path / "daemon", broker.host, broker.port, backlog=500, max_s=120)
    assert (r.backlog, r.left) == (500, 0)
    assert r.samples > 0
    assert r.hwm_kb >= r.end_kb > 10 * 1024  # a Python daemon with numpy: tens of MB
    assert r.hwm_kb >= r.drain_peak_kb > 0


def test_outage_recovery_measures_each_outage(tmp_path: Path, broker: LocalBroker) -> None:
    trials = ub.outage_recovery(
        tmp_path / "reader", broker, outage_s=0.5, trials=2, events_per_s=50, stable_s=0.2
    )
    assert len(trials) == 2
    for t in trials:
        assert t.down_s >= 0.5  # the broker was really gone that long
        assert t.to_puback_s > 0
        assert t.attempts >= 1  # the link reconnected by itself
    assert broker.running
