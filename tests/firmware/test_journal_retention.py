"""Retention by age, and rows the outbox cannot read: neither may stall or hide anything."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from firmware.journal.outbox import OutboxReader
from firmware.journal.reader import JournalReader
from tests.firmware.test_journal import db_rows, journal, make_event
from tests.polling import wait_until

DAY_NS = 86_400 * 10**9
NOW_NS = 1_780_000_000 * 10**9


def gaps(path: Path) -> list[tuple[int, int, int, str]]:
    return db_rows(path, "SELECT from_seq, to_seq, count, reason FROM gaps ORDER BY id")


def _history(path: Path) -> None:
    """Rows 1-10: 40 days old, synced, 1-4 acked, 5-6 sent; 11-12: 40 days old by an unsynced
    clock; 13-15: synced, one day old."""
    with journal(path) as j:
        for i in range(10):
            j.append(make_event(i, wall_ns=NOW_NS - 40 * DAY_NS + i, clock_synced=True))
        for i in range(10, 12):
            j.append(make_event(i, wall_ns=NOW_NS - 40 * DAY_NS + i, clock_synced=False))
        for i in range(12, 15):
            j.append(make_event(i, wall_ns=NOW_NS - DAY_NS + i, clock_synced=True))
        j.mark_acked_through(4)
        j.mark_published([5, 6])
        assert j.flush()


def test_rows_past_the_age_limit_go_and_unacked_ones_leave_a_gap_record(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    _history(path)
    with journal(path, max_age_s=30 * 86_400, trusted_wall=lambda: NOW_NS) as j:
        # the first look runs right after open
        assert wait_until(lambda: j.stats.dropped_by_age == 10)
        assert j.stats.rows == 5
    # the synced young rows stay, and so do the old ones an unsynced clock stamped
    assert [r[0] for r in db_rows(path)] == [11, 12, 13, 14, 15]
    # 1-4 were acknowledged: the back office holds them; 5-10 are reported as lost to age
    assert gaps(path) == [(5, 10, 6, "max_age")]


def test_no_age_look_while_the_clock_is_not_trusted(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    _history(path)
    looked = threading.Event()

    def untrusted() -> int | None:
        looked.set()
        return None

    with journal(path, max_age_s=30 * 86_400, trusted_wall=untrusted) as j:
        assert looked.wait(10)
        j.append(make_event(99))
        assert j.flush()
        assert j.stats.dropped_by_age == 0
    assert len(db_rows(path)) == 16 and gaps(path) == []


def test_an_age_limit_shorter_than_every_row_keeps_the_unsynced_ones(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    _history(path)
    with journal(path, max_age_s=3600, trusted_wall=lambda: NOW_NS) as j:
        assert wait_until(lambda: j.stats.dropped_by_age == 13)
    assert [r[0] for r in db_rows(path)] == [11, 12]
    assert gaps(path) == [(5, 10, 6, "max_age"), (13, 15, 3, "max_age")]


def _damage_row(path: Path, seq: int) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute(
            "UPDATE events SET codes = '[{broken', detail = 'null x' WHERE seq = ?", (seq,)
        )
        conn.commit()
    finally:
        conn.close()


def test_an_unreadable_row_is_sent_in_its_place_as_an_incident(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with journal(path) as j:
        receipts = [j.append(make_event(i)) for i in range(5)]
        assert j.flush()
    _damage_row(path, 3)
    outbox = OutboxReader(path)
    try:
        rows = outbox.unsent_after(0, 10)
    finally:
        outbox.close()
    # the outbox does not stall on it: every seq comes back, in order
    assert [r.seq for r in rows] == [1, 2, 3, 4, 5]
    bad = rows[2]
    assert bad.event_id == receipts[2].event_id
    assert (bad.event.kind, bad.event.reason) == ("incident", "row_unreadable")
    assert bad.event.detail["kind"] == "scan" and "JSONDecodeError" in bad.event.detail["error"]
    assert bad.event.wall_ns == make_event(2).wall_ns and bad.event.door == "front"
    assert rows[3].event == make_event(3)  # its neighbours are untouched
    # people reading the journal see it the same way
    tail = JournalReader(path).tail(5)
    assert [e.event.reason for e in tail][2] == "row_unreadable"
