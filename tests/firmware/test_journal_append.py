"""The append path: commits in the caller's thread beside the writer thread's work, the
writer mutex and its deadline, the database lock of another process, WAL checkpoints off the
append path, the byte cap for appends the writer never saw, and the latency benchmark. Real
SQLite files in tmp_path throughout."""

from __future__ import annotations

import itertools
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.journal.bench import append_latency
from firmware.journal.events import StoredEvent
from firmware.journal.spill import read_spill
from firmware.journal.store import (
    CAP_LAG_MAX,
    CHECKPOINT_FRAMES,
    CHECKPOINT_HARD_FRAMES,
    HOUSEKEEPING_EVERY,
    WAL_SIZE_LIMIT,
    Journal,
    _Item,
)
from tests.firmware.test_journal import (
    BOOT,
    db_rows,
    journal,
    journal_threads,
    make_event,
    wait_until,
)
from tests.firmware.test_journal_faults import collector, integrity, write_lock_held


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    assert journal_threads() == []


# --- appends from several threads beside the writer's work --------------------------------------


def test_two_appending_threads_beside_outbox_marks_and_timing_updates(tmp_path: Path) -> None:
    """Two scan threads append (each followed by its timing update, as the pipeline does)
    while an uplink thread reads, publishes and acks: every append commits in the caller's
    thread, every change lands on the right row, and the uplink only ever sees a gapless run
    of seqs, which holds only if seq order is commit order."""
    path = tmp_path / "j.db"
    per_thread = 250
    total = 2 * per_thread
    receipts: list[list[Any]] = [[], []]
    stop = threading.Event()
    uplink_seen: list[int] = []
    uplink_errors: list[str] = []

    with journal(path) as j:

        def scan(k: int) -> None:
            for i in range(per_thread):
                r = j.append(make_event(k * 1000 + i))
                receipts[k].append(r)
                j.update_timing(r.seq, r.seq / 4)

        def uplink() -> None:
            expected = 1
            while expected <= total and not stop.is_set():
                batch = [s.seq for s in j.unpublished(40)]
                if batch != list(range(expected, expected + len(batch))):
                    uplink_errors.append(f"expected a run from {expected}, got {batch}")
                    return
                if batch:
                    j.mark_published(batch)
                    uplink_seen.extend(batch)
                    expected = batch[-1] + 1
                    if len(uplink_seen) % 3 == 0:
                        j.mark_acked_through(batch[-1])

        threads = [threading.Thread(target=scan, args=(k,)) for k in (0, 1)]
        threads.append(threading.Thread(target=uplink))
        for t in threads:
            t.start()
        for t in threads[:2]:
            t.join()
        threads[2].join(timeout=30)
        stop.set()
        threads[2].join()
        j.mark_acked_through(total // 2)
        assert j.flush()
        stats = j.stats

    assert uplink_errors == []
    assert uplink_seen == list(range(1, total + 1))
    for rs in receipts:
        assert [r.durability for r in rs] == ["committed"] * per_thread
        seqs = [r.seq for r in rs]
        assert seqs == sorted(seqs)
    by_seq = {r.seq: r for rs in receipts for r in rs}
    assert sorted(by_seq) == list(range(1, total + 1))
    rows = db_rows(
        path,
        "SELECT seq, event_id, frame_to_relay_ms, published, acked FROM events ORDER BY seq",
    )
    assert [(s, e) for s, e, *_ in rows] == [(s, by_seq[s].event_id) for s in range(1, total + 1)]
    assert [ms for _, _, ms, _, _ in rows] == [s / 4 for s in range(1, total + 1)]
    assert all(published == 1 for *_, published, _ in rows)
    acked = {s for s, _, _, _, a in rows if a}
    assert set(range(1, total // 2 + 1)) <= acked
    assert (stats.committed, stats.spilled, stats.lost, stats.pending) == (total, 0, 0, 0)
    assert integrity(path) == "ok"


def test_a_full_journal_at_the_row_cap_still_drops_in_the_same_transaction(
    tmp_path: Path,
) -> None:
    """At the row limit an append goes through the writer, whose transaction drops the
    oldest rows with the insert: the row count never passes max_rows, not even briefly."""
    path = tmp_path / "j.db"
    with journal(path, max_rows=20) as j:
        counts = []
        for i in range(45):
            assert j.append(make_event(i)).durability == "committed"
            counts.append(db_rows(path, "SELECT count(*) FROM events")[0][0])
        stats = j.stats
    assert max(counts) == 20
    assert stats.rows == counts[-1] and stats.rows + stats.dropped_by_cap == 45


# --- the writer mutex and the database lock ----------------------------------------------------


def test_an_append_spills_rather_than_wait_past_the_deadline_for_the_writer_mutex(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer holds the mutex in a long operation (here: its transaction blocks until
    released): an append meanwhile spills at its deadline instead of waiting for it, and the
    writer moves it in afterwards."""
    path = tmp_path / "j.db"
    reports, report = collector()
    inside, release = threading.Event(), threading.Event()
    with Journal(path, boot_id=BOOT, append_deadline_s=0.05, report=report) as j:
        first = j.append(make_event(1))
        real_attempt = j._attempt

        def long_attempt(*args: Any) -> Any:
            inside.set()
            release.wait(10)
            return real_attempt(*args)

        monkeypatch.setattr(j, "_attempt", long_attempt)
        j.update_timing(first.seq, 12.5)  # the writer takes the mutex for this and stalls
        assert inside.wait(5)
        try:
            stalled = j.append(make_event(2))
            assert j.stats.pending == 1  # not in yet: the writer is still stalled
        finally:
            release.set()
        assert j.flush()
        after = j.append(make_event(3))
        stats = j.stats
    assert (first.durability, stalled.durability, after.durability) == (
        "committed",
        "spilled",
        "committed",
    )
    assert [c for c, _ in reports] == ["journal_spilling"]
    assert dict(reports)["journal_spilling"]["why"] == "deadline"
    assert db_rows(path, "SELECT seq, event_id, frame_to_relay_ms FROM events ORDER BY seq") == [
        (first.seq, first.event_id, 12.5),
        (stalled.seq, stalled.event_id, None),
        (after.seq, after.event_id, None),
    ]
    assert (stats.spilled, stats.lost, stats.pending) == (1, 0, 0)
    assert read_spill(tmp_path / "j.db.spill").events == ()  # emptied once durable


def test_c19_an_append_committing_itself_spills_when_another_process_holds_the_lock(
    tmp_path: Path,
) -> None:
    """The C19 spill path from the caller's own commit: nothing queued, so the append takes
    the mutex and meets the other process's lock in SQLite; it spills, and once the lock goes
    the writer moves it in, in seq order with what came after."""
    path = tmp_path / "j.db"
    reports, report = collector()
    with Journal(path, boot_id=BOOT, append_deadline_s=0.05, report=report) as j:
        before = j.append(make_event(0))
        with write_lock_held(path):
            locked = [j.append(make_event(i)) for i in (1, 2)]
            spill = read_spill(tmp_path / "j.db.spill")
        after = j.append(make_event(3))
        assert j.flush()
        assert j.wait_durable()
        assert wait_until(lambda: (tmp_path / "j.db.spill").stat().st_size == 0)
        stats = j.stats
    assert before.durability == "committed"
    assert [r.durability for r in locked] == ["spilled", "spilled"]
    assert [e.seq for e in spill.events] == [r.seq for r in locked]
    assert after.durability in ("committed", "spilled")  # behind the backlog, via the writer
    assert [c for c, _ in reports] == ["journal_spilling"]
    assert dict(reports)["journal_spilling"]["why"] == "deadline"
    everything = [before, *locked, after]
    assert db_rows(path) == [(r.seq, r.event_id) for r in everything]
    assert (stats.committed, stats.lost, stats.pending) == (4, 0, 0)


def test_time_spent_waiting_for_the_mutex_comes_off_the_database_lock_wait(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An append that waited for the writer mutex waits on the database lock only for what
    is left of its deadline: it lowers the connection's busy timeout for its commit, then
    puts it back."""
    path = tmp_path / "j.db"
    statements: list[str] = []

    def trace(conn: sqlite3.Connection) -> None:
        conn.set_trace_callback(statements.append)

    inside, release = threading.Event(), threading.Event()
    with Journal(path, boot_id=BOOT, append_deadline_s=1.0, on_connect=trace) as j:
        first = j.append(make_event(1))
        real_attempt = j._attempt

        def slow_attempt(*args: Any) -> Any:
            inside.set()
            release.wait(10)
            return real_attempt(*args)

        monkeypatch.setattr(j, "_attempt", slow_attempt)
        j.update_timing(first.seq, 1.0)
        assert inside.wait(5)
        result: list[Any] = []
        appender = threading.Thread(target=lambda: result.append(j.append(make_event(2))))
        appender.start()
        # hold the mutex past the tenth of the deadline the append keeps for itself
        assert wait_until(lambda: False, timeout_s=0.3) is False
        del statements[:]
        release.set()
        appender.join()
        assert j.flush()
    assert result[0].durability == "committed"
    busy = [s for s in statements if s.startswith("PRAGMA busy_timeout=")]
    waits = [int(s.split("=")[1]) for s in busy]
    # the writer's own short timeout and the resting value (900 ms) come and go around it
    lowered = [w for w in waits if w not in (20, 900)]
    assert len(lowered) == 1 and 0 <= lowered[0] < 700
    assert waits[waits.index(lowered[0]) + 1] == 900


# --- WAL checkpoints off the append path ----------------------------------------------------


def wal_frames(j: Journal) -> int:
    frames = j._wal_frames()
    assert frames is not None
    return frames[0]


def test_checkpoints_are_the_writers_and_keep_the_wal_bounded(tmp_path: Path) -> None:
    """The writer connection never checkpoints on its own (a checkpoint inside an append's
    COMMIT would put its fsyncs on the door's path); the writer thread does, and restarts
    the WAL, so it stays bounded even at full speed."""
    path = tmp_path / "j.db"
    wal = Path(f"{path}-wal")
    with journal(path) as j:
        with j._wlock:
            assert j._conn is not None
            assert j._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0] == 0
        peak = 0
        restarts = 0
        last = wal_frames(j)
        for i in range(4000):
            r = j.append(make_event(i, detail={"i": i, "pad": "w" * 300}))
            j.update_timing(r.seq, 3.0)
            if i % 25 == 0:
                peak = max(peak, wal.stat().st_size)
                now = wal_frames(j)
                restarts += now < last
                last = now
        assert j.flush()
        stats = j.stats
    # 4,000 such scans write well over 16,000 WAL frames (64 MiB) without checkpoints
    assert restarts >= 3
    assert peak <= 6 * WAL_SIZE_LIMIT
    assert stats.committed == 4000 and stats.spilled == 0
    assert db_rows(path, "SELECT count(*) FROM events WHERE frame_to_relay_ms = 3.0") == [(4000,)]
    reset = db_rows(path, "SELECT value FROM meta WHERE key = 'wal_reset_wall_ns'")
    assert len(reset) == 1 and int(reset[0][0]) > 0
    assert integrity(path) == "ok"


def test_at_a_door_pace_the_writer_thread_checkpoints_and_restarts_the_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Across CHECKPOINT_FRAMES at 50 scans a second, the checkpoint and the WAL restart
    commit both run in the writer thread, and the WAL stays near its usual size."""
    path = tmp_path / "j.db"
    calls: list[tuple[str, str]] = []
    with journal(path) as j:
        real_checkpoint, real_prime = j._checkpoint, j._prime_wal

        def checkpoint(rconn: sqlite3.Connection) -> bool:
            calls.append(("checkpoint", threading.current_thread().name))
            return real_checkpoint(rconn)

        def prime(conn: sqlite3.Connection) -> None:
            calls.append(("prime", threading.current_thread().name))
            real_prime(conn)

        monkeypatch.setattr(j, "_checkpoint", checkpoint)
        monkeypatch.setattr(j, "_prime_wal", prime)
        i = 0
        while wal_frames(j) < CHECKPOINT_FRAMES - 100:  # most of the way at full speed
            r = j.append(make_event(i, detail={"pad": "d" * 300}))
            j.update_timing(r.seq, 1.0)
            i += 1
        frames = [wal_frames(j)]
        pause = threading.Event()
        # the rest at a door's pace, until the WAL restarted and some scans after it; a
        # checkpoint that a scan overlapped (a loaded machine) is finished a second later
        for k in range(400):
            pause.wait(0.02)
            r = j.append(make_event(i + k, detail={"pad": "d" * 300}))
            j.update_timing(r.seq, 1.0)
            frames.append(wal_frames(j))
            restarts = [n for n, (a, b) in enumerate(itertools.pairwise(frames)) if b < a]
            if restarts and len(frames) > restarts[0] + 20:
                break
        assert j.flush()
    assert restarts
    assert max(frames) < CHECKPOINT_HARD_FRAMES
    assert {"checkpoint", "prime"} <= {what for what, _ in calls}
    assert {thread for _, thread in calls} == {"qrgate-journal-writer"}


# --- the byte cap for appends committed in the caller's thread -----------------------------


def used_bytes(path: Path) -> int:
    pages = db_rows(
        path,
        "SELECT (SELECT page_count FROM pragma_page_count())"
        " - (SELECT freelist_count FROM pragma_freelist_count())",
    )[0][0]
    return int(pages) * 4096


def test_the_byte_cap_catches_up_with_appends_without_a_flush(tmp_path: Path) -> None:
    """Fewer appends than HOUSEKEEPING_EVERY, nothing else for the writer to do: its idle
    round still applies the byte cap to them."""
    path = tmp_path / "j.db"
    cap = 64 * 1024
    n = HOUSEKEEPING_EVERY - 2
    assert n * 12_000 > 2 * cap
    with journal(path, max_bytes=cap) as j:
        receipts = [j.append(make_event(i, detail={"pad": "b" * 12_000})) for i in range(n)]
        assert wait_until(lambda: used_bytes(path) <= cap, timeout_s=10.0)
        stats = j.stats
    assert {r.durability for r in receipts} == {"committed"}
    g = db_rows(path, "SELECT from_seq, to_seq, count, reason FROM gaps ORDER BY id")
    assert g and {x[3] for x in g} == {"cap_bytes"}
    assert stats.rows + stats.dropped_by_cap == n
    survivors = [r[0] for r in db_rows(path)]
    assert survivors == [r.seq for r in receipts][-len(survivors) :]


def test_appends_stop_committing_themselves_when_the_cap_lags_a_starved_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer gets no CPU (here: its rounds wait for a gate): appends commit themselves
    until CAP_LAG_MAX of them wait for the size cap, then go through the writer (spilling at
    the deadline while it stalls), so the cap never falls further behind. Once the writer
    runs, everything lands and the cap holds."""
    path = tmp_path / "j.db"
    cap = 64 * 1024
    gate = threading.Event()
    with Journal(path, boot_id=BOOT, append_deadline_s=0.05, max_bytes=cap) as j:
        real_round = j._round

        def starved_round(*args: Any) -> Any:
            gate.wait(10)
            return real_round(*args)

        monkeypatch.setattr(j, "_round", starved_round)
        try:
            receipts = [
                j.append(make_event(i, detail={"pad": "s" * 3000})) for i in range(CAP_LAG_MAX + 3)
            ]
        finally:
            gate.set()
        assert j.flush()
        stats = j.stats
    assert [r.durability for r in receipts] == ["committed"] * CAP_LAG_MAX + ["spilled"] * 3
    assert used_bytes(path) <= cap
    assert stats.rows + stats.dropped_by_cap == CAP_LAG_MAX + 3
    assert stats.dropped_by_cap > 0 and stats.pending == 0
    survivors = [r[0] for r in db_rows(path)]
    assert survivors == [r.seq for r in receipts][-len(survivors) :]


# --- the writer's queue ------------------------------------------------------------------------


def test_a_late_seq_queued_after_a_later_one_keeps_the_queue_in_seq_order(
    tmp_path: Path,
) -> None:
    """An append whose own commit failed queues its seq after another thread may have
    spilled a later one; the queue (flush, the writer) stays in seq order."""
    j = journal(tmp_path / "j.db")
    # the writer sees none of it: cleared before the lock goes
    with j, j._lock:
        assert not j._pending
        for seq in (7, 5, 6):
            stored = StoredEvent(seq, f"id-{seq}", BOOT, make_event(seq))
            j._add_pending(_Item(stored, (seq,)))
        assert list(j._pending) == [5, 6, 7]
        j._pending.clear()


# --- the benchmark --------------------------------------------------------------------------


def test_append_latency_reports_percentiles_of_committed_appends(tmp_path: Path) -> None:
    result = append_latency(tmp_path / "bench.db", n=40, interval_s=0.001)
    assert set(result) == {"p50_ms", "p99_ms", "max_ms", "n", "not_committed"}
    assert result["n"] == 40 and result["not_committed"] == 0
    assert 0 < result["p50_ms"] <= result["p99_ms"] <= result["max_ms"]
    rows = db_rows(tmp_path / "bench.db", "SELECT count(*), count(frame_to_relay_ms) FROM events")
    assert rows == [(50, 50)]  # 10 warm-up scans and 40 measured, each with its timing
    with pytest.raises(ValueError):
        append_latency(tmp_path / "other.db", n=0)
    assert not os.path.exists(tmp_path / "other.db")
