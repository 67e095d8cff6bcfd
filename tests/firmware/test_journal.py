"""The journal's normal life: ids, round trips, seq across restarts, outbox, timing, group
fsync, the spill log, the read-only reader, threads. Faults (kill -9, damage, locks, full
disk, size cap) are in test_journal_faults.py. Real SQLite files in tmp_path throughout."""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest

from firmware.exceptions import JournalDamagedError, JournalError
from firmware.journal.bench import append_rate
from firmware.journal.events import NewEvent, StoredEvent
from firmware.journal.ids import Uuid7Generator, boot_id, uuid7
from firmware.journal.reader import JournalReader
from firmware.journal.spill import SpillLog, read_spill
from firmware.journal.store import EVENT_FIELDS, Journal
from tests.polling import wait_until

BOOT = "6f1c1f2e-3c1a-4b7e-9a55-0d2f0c8e1a11"


# --- helpers shared with test_journal_faults.py -------------------------------------------


def make_event(i: int = 0, **overrides: Any) -> NewEvent:
    """A fully populated scan event; ``i`` lands in ``detail`` and the subject."""
    subject = f"{i:064x}"
    values: dict[str, Any] = {
        "kind": "scan",
        "wall_ns": 1_750_000_000_000_000_000 + i,
        "clock_synced": i % 2 == 0,
        "mono_ns": 5_000_000_000 + i,
        "door": "front",
        "direction": "in",
        "decision": "granted" if i % 3 else "denied",
        "reason": "granted" if i % 3 else "revoked",
        "credential_kind": "badge",
        "subject": subject,
        "codes": (
            {
                "subject": subject,
                "kind": "badge",
                "reason": "granted",
                "length": 24,
                "backend": "zxing",
            },
        ),
        "decode_ms": 4.25,
        "verdict_ms": 0.125,
        "frame_to_relay_ms": None,
        "detail": {"i": i},
    }
    values.update(overrides)
    return NewEvent(**values)


def journal(path: Path, **kw: Any) -> Journal:
    """A journal for tests: a generous append deadline, so a slow machine never turns
    "committed" into "spilled"; the tests of the deadline itself use the real one."""
    kw.setdefault("boot_id", BOOT)
    kw.setdefault("append_deadline_s", 5.0)
    return Journal(path, **kw)


def db_rows(path: Path, sql: str = "SELECT seq, event_id FROM events ORDER BY seq") -> list[Any]:
    """Rows read straight from the file with a separate connection."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql).fetchall()
    finally:
        conn.close()


def journal_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("qrgate-journal")]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    assert journal_threads() == []


# --- ids -------------------------------------------------------------------------------------


def test_uuid7_is_rfc9562_v7_and_strictly_increasing() -> None:
    before_ms = time.time_ns() // 1_000_000
    ids = [uuid7() for _ in range(20_000)]
    after_ms = time.time_ns() // 1_000_000
    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    for text in (ids[0], ids[-1]):
        u = uuid.UUID(text)
        assert str(u) == text
        assert u.version == 7
        assert u.variant == uuid.RFC_4122
        assert before_ms <= u.int >> 80 <= after_ms


def test_uuid7_stays_increasing_when_the_clock_steps_back_or_stands_still() -> None:
    now = [1_750_000_000_000_000_000]
    gen = Uuid7Generator(clock_ns=lambda: now[0])
    a = [gen() for _ in range(1000)]  # 1,000 ids in one millisecond
    now[0] -= 600 * 1_000_000_000  # NTP steps the clock back 10 minutes
    b = [gen() for _ in range(10)]
    ids = a + b
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {uuid.UUID(x).int >> 80 for x in ids} == {1_750_000_000_000}


def test_boot_id_reads_the_kernel_file_and_falls_back_to_one_uuid_per_process(
    tmp_path: Path,
) -> None:
    f = tmp_path / "boot_id"
    f.write_text("0F1C1F2E-3C1A-4B7E-9A55-0D2F0C8E1A11\n")
    assert boot_id(f) == "0f1c1f2e-3c1a-4b7e-9a55-0d2f0c8e1a11"
    missing = tmp_path / "nope"
    first = boot_id(missing)
    assert uuid.UUID(first).version == 4
    assert boot_id(missing) == first
    (tmp_path / "bad").write_text("not a uuid")
    assert boot_id(tmp_path / "bad") == first


# --- appends, seq, round trip ------------------------------------------------------------------


def test_event_columns_follow_newevent() -> None:
    assert tuple(f.name for f in fields(NewEvent)) == EVENT_FIELDS


def test_every_field_round_trips(tmp_path: Path) -> None:
    full = make_event(7, frame_to_relay_ms=31.5, detail={"note": "Tür 3", "n": [1, 2.5, None]})
    bare = NewEvent(
        kind="incident",
        wall_ns=1,
        clock_synced=False,
        mono_ns=2,
        door="",
        direction="",
        reason="camera_stalled",
    )
    with journal(tmp_path / "j.db") as j:
        r1, r2 = j.append(full), j.append(bare)
        assert (r1.durability, r2.durability) == ("committed", "committed")
        got = j.unpublished(10)
    tail = JournalReader(tmp_path / "j.db").tail(10)
    for stored in (got, tail):
        assert [s.seq for s in stored] == [r1.seq, r2.seq]
        assert [s.event_id for s in stored] == [r1.event_id, r2.event_id]
        assert [s.event for s in stored] == [full, bare]
        assert {s.boot_id for s in stored} == {BOOT}
        assert not any(s.published or s.acked for s in stored)


def test_seq_strictly_increases_and_continues_after_reopen(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    receipts = []
    for _ in range(3):
        with journal(path) as j:
            receipts += [j.append(make_event(i)) for i in range(40)]
    assert [r.seq for r in receipts] == list(range(1, 121))
    assert {r.durability for r in receipts} == {"committed"}
    ids = [r.event_id for r in receipts]
    assert len(set(ids)) == 120 and all(uuid.UUID(i).version == 7 for i in ids)
    assert db_rows(path) == [(r.seq, r.event_id) for r in receipts]
    assert (tmp_path / "j.db.seq").read_text().strip() == "120"


def test_appends_from_several_threads_get_distinct_increasing_seqs(tmp_path: Path) -> None:
    with journal(tmp_path / "j.db") as j:
        out: list[list[int]] = [[] for _ in range(4)]

        def worker(k: int) -> None:
            for i in range(100):
                out[k].append(j.append(make_event(i)).seq)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for seqs in out:
        assert seqs == sorted(seqs)
    assert sorted(s for seqs in out for s in seqs) == list(range(1, 401))
    assert [r[0] for r in db_rows(tmp_path / "j.db")] == list(range(1, 401))


def test_update_timing_is_applied_after_the_commit(tmp_path: Path) -> None:
    with journal(tmp_path / "j.db") as j:
        r = j.append(make_event(1))
        j.update_timing(r.seq, 87.5)
        j.update_timing(999, 1.0)  # never stored: dropped, no error
        assert j.flush()
        assert db_rows(tmp_path / "j.db", "SELECT seq, frame_to_relay_ms FROM events") == [
            (r.seq, 87.5)
        ]


def test_outbox_unpublished_published_acked(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with journal(path) as j:
        for i in range(10):
            j.append(make_event(i))
        assert [s.seq for s in j.unpublished(4)] == [1, 2, 3, 4]
        j.mark_published([1, 2, 3, 5])
        assert [s.seq for s in j.unpublished(4)] == [4, 6, 7, 8]
        j.mark_acked_through(4)
        assert j.flush()
        assert [s.seq for s in j.unpublished(100)] == [6, 7, 8, 9, 10]
        flags = db_rows(path, "SELECT seq, published, acked FROM events ORDER BY seq")
    assert flags[:6] == [(1, 1, 1), (2, 1, 1), (3, 1, 1), (4, 1, 1), (5, 1, 0), (6, 0, 0)]
    assert JournalReader(path).stats()["unpublished"] == 5
    assert JournalReader(path).stats()["unacked"] == 6


# --- group fsync ------------------------------------------------------------------------------


def test_group_fsync_follows_commits(tmp_path: Path) -> None:
    with journal(tmp_path / "j.db", fsync_interval_s=0.05) as j:
        assert j.stats.fsyncs == 0
        j.append(make_event(1))
        assert wait_until(lambda: j.stats.fsyncs >= 1, timeout_s=2.0)
        age = j.stats.last_fsync_age_ms
        assert age is not None and age >= 0
        before = j.stats.fsyncs
        j.append(make_event(2))
        assert j.wait_durable(timeout_s=2.0)
        assert j.stats.fsyncs == before + 1
        # nothing written: no more fsyncs however long we wait
        threading.Event().wait(0.2)
        assert j.stats.fsyncs == before + 1


# --- life cycle ----------------------------------------------------------------------------


def test_close_is_idempotent_and_leaves_no_threads(tmp_path: Path) -> None:
    j = journal(tmp_path / "j.db")
    j.close()  # never opened
    j = journal(tmp_path / "j.db")
    j.open()
    j.open()
    assert len(journal_threads()) == 2
    j.append(make_event())
    j.close()
    j.close()
    assert journal_threads() == []
    with pytest.raises(JournalError):
        j.append(make_event())
    with pytest.raises(JournalError):
        j.open()
    assert not (tmp_path / "j.db-wal").exists()  # the last connection checkpointed


def test_open_fails_with_journal_error_when_no_journal_can_be_created(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    j = journal(blocker / "j.db")
    with pytest.raises(JournalError):
        j.open()
    a_dir = tmp_path / "dir.db"
    a_dir.mkdir()
    with pytest.raises(JournalError):
        journal(a_dir).open()


def test_append_rate_measures_committed_appends(tmp_path: Path) -> None:
    rate = append_rate(tmp_path / "bench.db", seconds=0.2)
    rows = db_rows(tmp_path / "bench.db", "SELECT count(*) FROM events")[0][0]
    assert rate > 0 and rows >= 1


# --- the spill log ----------------------------------------------------------------------------


def stored(seq: int) -> StoredEvent:
    """An event as the journal would have written it to the spill log."""
    return StoredEvent(seq=seq, event_id=uuid7(), boot_id=BOOT, event=make_event(seq))


def test_spill_torn_last_line_is_ignored_and_the_next_line_starts_clean(tmp_path: Path) -> None:
    path = tmp_path / "j.db.spill"
    log = SpillLog(path)
    log.open()
    events = [stored(s) for s in (1, 2, 3)]
    for e in events:
        log.append(e)
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole + whole.splitlines(keepends=True)[0][:40])  # torn by a power cut
    got = read_spill(path)
    assert list(got.events) == events and got.bad_lines == 1 and got.max_seq == 3
    log.open()
    log.append(e4 := stored(4))
    log.close()
    got = read_spill(path)
    assert list(got.events) == [*events, e4] and got.bad_lines == 1


def test_spill_line_with_a_bad_checksum_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "j.db.spill"
    log = SpillLog(path)
    log.open()
    a, b = stored(1), stored(2)
    log.append(a)
    log.append(b)
    log.close()
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(lines[0].replace(b'"door":"front"', b'"door":"frunt"') + lines[1])
    got = read_spill(path)
    assert list(got.events) == [b] and got.bad_lines == 1
    assert read_spill(tmp_path / "absent").events == ()


def test_spill_log_is_replayed_into_the_database_exactly_once(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with journal(path) as j:
        first = [j.append(make_event(i)) for i in range(5)]
    # what a killed daemon leaves: seq 5 (already committed too), 6-8, and a torn tail
    already = StoredEvent(5, first[4].event_id, BOOT, make_event(4))
    spilled = [stored(6), stored(7), stored(8)]
    log = SpillLog(tmp_path / "j.db.spill")
    log.open()
    for e in (already, *spilled):
        log.append(e)
    log.close()
    with (tmp_path / "j.db.spill").open("ab") as f:
        f.write(b'0badc0de {"seq": 9')
    reports: list[tuple[str, dict[str, Any]]] = []
    with journal(path, report=lambda c, d: reports.append((c, d))) as j:
        nxt = j.append(make_event(9))
        assert nxt.seq == 9  # continues above the spill log's highest seq
        assert j.flush()
        assert j.wait_durable()
        assert wait_until(lambda: (tmp_path / "j.db.spill").stat().st_size == 0)
        assert j.stats.committed == 4  # 6, 7, 8 moved in, 9 appended; 5 was there
    rows = db_rows(path)
    assert [r[0] for r in rows] == list(range(1, 10))
    assert rows[5:8] == [(e.seq, e.event_id) for e in spilled]
    assert JournalReader(path).tail(4)[0:3] == spilled
    assert (
        "journal_spill_damaged",
        {"path": str(tmp_path / "j.db.spill"), "bad_lines": 1},
    ) in reports
    with journal(path) as j:  # nothing left to replay
        assert j.append(make_event(10)).seq == 10
    assert [r[0] for r in db_rows(path)] == list(range(1, 11))


# --- the reader ------------------------------------------------------------------------------


def test_reader_reads_while_the_journal_runs(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with journal(path) as j:
        receipts = [j.append(make_event(i)) for i in range(12)]
        j.append(
            NewEvent(
                kind="incident",
                wall_ns=42,
                clock_synced=False,
                mono_ns=1,
                door="",
                direction="",
                reason="camera_stalled",
            )
        )
        j.mark_published(range(1, 6))
        j.mark_acked_through(3)
        assert j.flush()
        reader = JournalReader(path)
        tail = reader.tail(3)
        stats = reader.stats()
        after = j.append(make_event(99))  # the reader did not get in the writer's way
    assert [s.seq for s in tail] == [11, 12, 13]
    assert tail[0].event_id == receipts[10].event_id
    assert after.durability == "committed"
    assert stats["rows"] == 13 and (stats["first_seq"], stats["last_seq"]) == (1, 13)
    assert stats["by_decision"] == {"granted": 8, "denied": 4, "none": 1}
    assert stats["by_reason"] == {"granted": 8, "revoked": 4, "camera_stalled": 1}
    assert (stats["unpublished"], stats["unacked"]) == (8, 10)
    assert (stats["gaps"], stats["dropped"]) == (0, 0)
    assert stats["last_wall_ns"] == 42 and stats["last_clock_synced"] is False
    assert stats["file_bytes"] > 0 and stats["schema_version"] == 1
    assert reader.tail(0) == []


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(JournalError):
        JournalReader(tmp_path / "missing.db").tail(5)
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a database" * 300)
    with pytest.raises(JournalDamagedError):
        JournalReader(bad).stats()
