"""The journal under faults: kill -9 (C20a), a damaged file at start (C20b), a database locked
by another process (C19), the size cap, a full disk. Real SQLite files and real processes."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware.exceptions import JournalError
from firmware.journal.events import NewEvent
from firmware.journal.reader import JournalReader
from firmware.journal.store import HWM_MARGIN, Journal
from tests.firmware.test_journal import (
    BOOT,
    db_rows,
    journal,
    journal_threads,
    make_event,
    wait_until,
)

Reports = list[tuple[str, dict[str, Any]]]


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    yield
    assert journal_threads() == []


def collector() -> tuple[Reports, Any]:
    reports: Reports = []
    return reports, lambda code, detail: reports.append((code, detail))


def integrity(path: Path) -> str:
    return str(db_rows(path, "PRAGMA integrity_check")[0][0])


HOLDER = textwrap.dedent("""
    import sqlite3, sys
    conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
    conn.execute("BEGIN IMMEDIATE")
    print("locked", flush=True)
    sys.stdin.readline()
    conn.execute("COMMIT")
    print("released", flush=True)
""")


@contextlib.contextmanager
def write_lock_held(path: Path) -> Iterator[None]:
    """Another process holds BEGIN IMMEDIATE on ``path`` until the block ends."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdin is not None and holder.stdout is not None
    try:
        assert holder.stdout.readline() == "locked\n"
        yield
    finally:
        holder.stdin.write("\n")
        holder.stdin.close()
        holder.wait(timeout=10)
    assert holder.returncode == 0


# --- C20(a): kill -9 at random moments --------------------------------------------------------

CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from firmware.journal.events import NewEvent
    from firmware.journal.store import Journal

    j = Journal(Path(sys.argv[1]), boot_id="child")
    j.open()
    print("open", flush=True)
    sys.stdin.readline()  # "go"
    i = 0
    while True:
        r = j.append(NewEvent(kind="scan", wall_ns=time.time_ns(), clock_synced=True,
                              mono_ns=time.monotonic_ns(), door="front", direction="in",
                              decision="granted", reason="granted", credential_kind="badge",
                              subject=f"{i:064x}", detail={"i": i}))
        # the feedback: only after append returned
        sys.stdout.write(f"{r.seq} {r.durability}\\n")
        sys.stdout.flush()
        i += 1
""")


def test_c20a_every_scan_that_got_feedback_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)  # a different kill pattern each run; the seed replays one
    seen: dict[int, str] = {}
    for round_ in range(10):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None
        assert child.stdout.readline() == "open\n"
        with contextlib.ExitStack() as stack:
            if round_ % 2:
                # every other round the database is locked too: scans go to the spill log
                stack.enter_context(write_lock_held(path))
                most = 30
            else:
                most = 1500
            child.stdin.write("go\n")
            child.stdin.flush()
            # kill while it appends, after a random number of confirmed scans
            lines = [child.stdout.readline() for _ in range(rng.randint(1, most))]
            os.kill(child.pid, signal.SIGKILL)
            rest, _ = child.communicate()
        assert child.returncode == -signal.SIGKILL
        lines += (rest or "").splitlines(keepends=True)
        confirmed = {}
        for line in lines:
            if line.endswith("\n"):  # a torn last line was never feedback
                seq, durability = line.split()
                confirmed[int(seq)] = durability
        assert not (confirmed.keys() & seen.keys()), f"a seq was handed out again (seed {seed})"
        seen.update(confirmed)
        with journal(path) as j:  # the restart: replays the spill log
            assert j.flush()
        stored = {r[0] for r in db_rows(path)}
        missing = sorted(set(seen) - stored)
        assert missing == [], f"confirmed but lost: {missing[:10]} (seed {seed})"
        assert integrity(path) == "ok"
    # at least one confirmed scan per round, and the locked rounds confirmed spilled ones
    assert len(seen) >= 10 and "spilled" in seen.values()
    print(
        f"C20a: {len(seen)} confirmed scans over {round_ + 1} kills, "
        f"{sum(d == 'spilled' for d in seen.values())} of them spilled"
    )


# --- C20(b): a damaged file at start -----------------------------------------------------------


def _zero_a_page(path: Path) -> None:
    pages = path.stat().st_size // 4096
    with path.open("r+b") as f:
        f.seek(4096 * (pages // 2))
        f.write(b"\0" * 4096)


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _garbage(path: Path) -> None:
    path.write_bytes(random.Random(7).randbytes(path.stat().st_size))


def _newer_schema(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()


def _populated(path: Path, n: int = 300) -> None:
    with journal(path) as j:
        for i in range(n):
            j.append(make_event(i, detail={"i": i, "pad": "x" * 200}))


@pytest.mark.parametrize(
    ("damage", "error_word"),
    [
        (_zero_a_page, "malformed"),
        (_truncate, "malformed"),
        (_garbage, "not a database"),
        (_newer_schema, "schema version"),
    ],
    ids=["zeroed-page", "truncated", "garbage", "newer-schema"],
)
def test_c20b_damaged_file_is_moved_aside_and_a_fresh_journal_continues(
    tmp_path: Path, damage: Any, error_word: str
) -> None:
    path = tmp_path / "j.db"
    _populated(path)
    damage(path)
    damaged_bytes = path.read_bytes()
    reports, report = collector()
    with journal(path, report=report) as j:
        scan = j.append(make_event(1000))
        assert scan.durability == "committed"
    codes = [c for c, _ in reports]
    assert codes.count("journal_damaged") == 1
    detail = dict(reports)["journal_damaged"]
    moved = Path(detail["moved_to"])
    assert moved.parent == tmp_path and moved.name.startswith("j.db.damaged-")
    assert moved.read_bytes() == damaged_bytes  # kept aside untouched
    assert error_word in detail["error"]
    assert detail["hwm"] == 300
    # seq continues above everything the old file may have held
    assert scan.seq > 300 + HWM_MARGIN
    rows = db_rows(path, "SELECT seq, kind, reason, detail FROM events ORDER BY seq")
    assert [r[:3] for r in rows] == [
        (scan.seq - 1, "incident", "journal_damaged"),
        (scan.seq, "scan", "granted"),
    ]
    assert str(moved) in rows[0][3]
    assert detail["incident_seq"] == scan.seq - 1
    # one gap record over every seq below the new start: the back office's contiguous ack
    # can move past what the damaged file took with it
    assert gaps(path) == [(1, scan.seq - 2, 0, "journal_damaged")]
    assert integrity(path) == "ok"


def test_c20b_without_the_seq_sidecar_seq_still_continues_above_the_readable_max(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    _populated(path)
    (tmp_path / "j.db.seq").unlink()
    _zero_a_page(path)
    reports, report = collector()
    with journal(path, report=report) as j:
        scan = j.append(make_event(1))
    detail = dict(reports)["journal_damaged"]
    assert detail["hwm"] is None and detail["readable_max_seq"] == 300
    assert scan.seq == 300 + HWM_MARGIN + 2  # after the incident


def test_a_deleted_journal_with_a_seq_sidecar_is_an_incident(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    _populated(path, 20)
    path.unlink()
    reports, report = collector()
    with journal(path, report=report) as j:
        scan = j.append(make_event(1))
    assert [c for c, _ in reports] == ["journal_missing"]
    assert scan.seq == 20 + HWM_MARGIN + 2
    assert gaps(path) == [(1, 20 + HWM_MARGIN, 0, "journal_missing")]


# --- C19: the database is locked by another process ---------------------------------------------


def _external_count(path: Path) -> str:
    """Count rows from another process: the sqlite3 CLI when installed, else Python."""
    cli = shutil.which("sqlite3")
    if cli:
        cmd = [cli, "-readonly", "-cmd", ".timeout 2000", str(path), "SELECT count(*) FROM events;"]
    else:
        cmd = [
            sys.executable,
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1], timeout=2);"
            "print(c.execute('SELECT count(*) FROM events').fetchone()[0])",
            str(path),
        ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_c19_a_held_write_lock_never_blocks_an_append_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    reports, report = collector()
    # the real deadline: this test is about it
    with Journal(path, boot_id=BOOT, append_deadline_s=0.05, report=report) as j:
        with write_lock_held(path):
            counts: list[str] = []
            reader = threading.Thread(
                target=lambda: counts.extend(_external_count(path) for _ in range(3))
            )
            reader.start()
            receipts, took = [], []
            pace = threading.Event()
            start = time.monotonic()
            for i in range(60):  # 10 scans a second for 6 s
                pace.wait(max(0.0, start + i * 0.1 - time.monotonic()))
                t0 = time.monotonic()
                receipts.append(j.append(make_event(i)))
                took.append(time.monotonic() - t0)
            reader.join()
        # every append returned, none raised; with the lock held all of them spilled
        assert [r.durability for r in receipts] == ["spilled"] * 60
        assert max(took) < 1.0, f"an append took {max(took):.3f} s"
        print(
            f"C19 append wall time: max {max(took) * 1000:.1f} ms, "
            f"mean {sum(took) / len(took) * 1000:.1f} ms"
        )
        assert counts == ["0", "0", "0"]  # the CLI could read all along
        assert j.flush(timeout_s=5.0)
        assert j.wait_durable()
        assert wait_until(lambda: (tmp_path / "j.db.spill").stat().st_size == 0)
        stats = j.stats
    rows = db_rows(path)
    assert rows == [(r.seq, r.event_id) for r in receipts]  # all 60, once, in seq order
    assert [r[0] for r in rows] == list(range(1, 61))
    assert (stats.spilled, stats.committed, stats.lost) == (60, 60, 0)
    assert stats.transactions == 1  # group commit: the first commit after the lock took all 60
    assert [c for c, _ in reports] == ["journal_spilling"]


def test_c19_a_restart_while_the_lock_is_held_opens_at_once_and_spills(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with journal(path) as j:
        first = j.append(make_event(1))
    with contextlib.closing(Journal(path, boot_id=BOOT, append_deadline_s=0.05)) as j:
        with write_lock_held(path):
            j.open()  # reads only: the lock does not hold the start up
            second = j.append(make_event(2))
        assert second.durability == "spilled" and second.seq == first.seq + 1
        assert j.flush()
    assert db_rows(path) == [(first.seq, first.event_id), (second.seq, second.event_id)]


# --- the size cap ---------------------------------------------------------------------------


def gaps(path: Path) -> list[tuple[int, int, int, str]]:
    return db_rows(path, "SELECT from_seq, to_seq, count, reason FROM gaps ORDER BY id")


def test_row_cap_drops_acked_then_published_then_unsent_and_records_unacked_gaps(
    tmp_path: Path,
) -> None:
    path = tmp_path / "j.db"
    reports, report = collector()
    with journal(path, max_rows=100, report=report) as j:
        for i in range(100):
            j.append(make_event(i))
        j.mark_acked_through(5)  # 1-5 acked
        j.mark_published(range(51, 71))  # 51-70 sent, not acked
        assert j.flush()
        j.append(make_event(100))  # row 101: drop 11, down to 90
        assert j.flush()
        # acked rows 1-5 went first, without a gap record: the back office holds them
        assert gaps(path) == [(51, 56, 6, "cap_rows")]
        for i in range(101, 112):  # rows back to 101: the rest of the sent ones go
            j.append(make_event(i))
        assert gaps(path)[1:] == [(57, 67, 11, "cap_rows")]
        for i in range(112, 123):  # then the oldest unsent ones
            j.append(make_event(i))
        assert gaps(path)[2:] == [(6, 13, 8, "cap_rows"), (68, 70, 3, "cap_rows")]
        for i in range(123, 250):
            j.append(make_event(i))
            assert j.stats.rows <= 100
        assert j.flush()
        stats = j.stats
    seqs = [r[0] for r in db_rows(path)]
    assert len(seqs) == stats.rows <= 100
    assert seqs == list(range(251 - len(seqs), 251))  # the newest survive
    dropped = {s for a, b, _, _ in gaps(path) for s in range(a, b + 1)}
    assert dropped == set(range(6, 251)) - set(seqs)  # 1-5 were acked
    assert sum(g[2] for g in gaps(path)) + 5 == stats.dropped_by_cap == 250 - len(seqs)
    dropped_reports = [r for c, r in reports if c == "journal_dropped"]
    assert dropped_reports[0] == {
        "reason": "cap_rows",
        "count": 11,
        "unacked": 6,
        "runs": [(51, 56, 6)],
    }
    # every drop of rows the backend did not have yet is reported: all but the 5 acked ones
    assert sum(r["unacked"] for r in dropped_reports) == stats.dropped_by_cap - 5


def test_byte_cap_keeps_the_used_pages_under_max_bytes(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    cap = 256 * 1024
    with journal(path, max_bytes=cap) as j:
        for i in range(2000):
            assert j.append(make_event(i, detail={"pad": "y" * 500})).durability == "committed"
        assert j.flush()
        used = db_rows(
            path,
            "SELECT (SELECT page_count FROM pragma_page_count())"
            " - (SELECT freelist_count FROM pragma_freelist_count())",
        )[0][0]
        stats = j.stats
    assert used * 4096 <= cap
    assert path.stat().st_size <= 2 * cap
    g = gaps(path)
    assert g and {x[3] for x in g} == {"cap_bytes"}
    assert stats.rows + stats.dropped_by_cap == 2000


# --- a full disk (SQLITE_FULL through PRAGMA max_page_count) --------------------------------------


def _page_limit(pages: int) -> Any:
    def on_connect(conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA max_page_count = {pages}")

    return on_connect


def test_full_disk_drops_oldest_rows_and_never_raises(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    reports, report = collector()
    with journal(path, report=report, on_connect=_page_limit(60)) as j:
        receipts = [j.append(make_event(i, detail={"pad": "z" * 1500})) for i in range(300)]
        assert j.flush(timeout_s=10.0)
        stats = j.stats
    assert {r.durability for r in receipts} <= {"committed", "spilled"}
    assert stats.dropped_disk_full > 0 and stats.lost == 0
    assert "journal_full" in [c for c, _ in reports]
    rows = {r[0] for r in db_rows(path)}
    g = gaps(path)
    assert g and {x[3] for x in g} == {"disk_full"}
    dropped = {s for a, b, _, _ in g for s in range(a, b + 1)}
    assert rows | dropped == {r.seq for r in receipts} and not rows & dropped
    assert len(rows) + stats.dropped_disk_full == 300
    assert integrity(path) == "ok"


def test_an_event_that_cannot_fit_spills_without_costing_other_rows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "j.db"
    reports, report = collector()
    j = journal(path, report=report, on_connect=_page_limit(20))
    with j:

        def no_space(_: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        # neither the database nor the spill log can take it: "lost", counted, never raised
        with monkeypatch.context() as m:
            m.setattr(j._spill, "append", no_space)
            lost = j.append(make_event(0, detail={"pad": "h" * 200_000}))
        assert lost.durability == "lost"
        huge = j.append(make_event(1, detail={"pad": "h" * 200_000}))
        small = [j.append(make_event(i)) for i in (2, 3)]
        assert [r.durability for r in (huge, *small)] == ["spilled", "committed", "committed"]
        # the writer keeps retrying the big one; it must not drop rows to make room for it
        threading.Event().wait(0.3)
        stats = j.stats
    assert (stats.lost, stats.spilled, stats.dropped_disk_full) == (1, 1, 0)
    assert [r[0] for r in db_rows(path)] == [r.seq for r in small]
    assert "journal_lost" in [c for c, _ in reports]
    # it waits in the spill log for a start with room
    with journal(path) as j2:
        assert j2.flush()
    assert [r[0] for r in db_rows(path)] == [huge.seq, *(r.seq for r in small)]


def test_incident_events_need_no_door(tmp_path: Path) -> None:
    with journal(tmp_path / "j.db") as j:
        r = j.append(
            NewEvent(
                kind="incident",
                wall_ns=1,
                clock_synced=False,
                mono_ns=1,
                door="",
                direction="",
                reason="camera_stalled",
                detail={"frames": 500},
            )
        )
    assert r.durability == "committed"


def test_a_failing_database_spills_at_once_and_reports_once(tmp_path: Path) -> None:
    path = tmp_path / "j.db"

    def read_only(conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA query_only = 1")  # every write now fails (SQLITE_READONLY)

    reports, report = collector()
    with journal(path, report=report, on_connect=read_only) as j:
        t0 = time.monotonic()
        receipts = [j.append(make_event(i)) for i in range(5)]
        took = time.monotonic() - t0
        assert j.stats.pending == 5
    # the writer's failure answered the appends: none waited out the 5 s deadline
    assert took < 5.0
    assert [r.durability for r in receipts] == ["spilled"] * 5
    assert sorted(c for c, _ in reports) == ["journal_error", "journal_spilling"]
    assert db_rows(path) == []
    with journal(path) as j:  # a healthy start moves them in
        assert j.flush()
    assert db_rows(path) == [(r.seq, r.event_id) for r in receipts]


def test_one_writer_per_journal_file(tmp_path: Path) -> None:
    """Two daemons whose configs point at one journal: the second cannot open it (seqs would
    collide and rows vanish behind INSERT OR IGNORE)."""
    first = Journal(tmp_path / "j.db", boot_id="a")
    first.open()
    try:
        second = Journal(tmp_path / "j.db", boot_id="b")
        with pytest.raises(JournalError, match="another process is writing"):
            second.open()
    finally:
        first.close()
    third = Journal(tmp_path / "j.db", boot_id="c")
    third.open()
    third.close()


def test_zero_byte_journal_with_history_is_an_incident(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path, boot_id="a")
    j.open()
    last = 0
    for i in range(5):
        last = j.append(
            NewEvent(
                kind="scan", wall_ns=i, clock_synced=False, mono_ns=i, door="d", direction="in"
            )
        ).seq
    j.close()
    for side in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if side.exists():
            side.write_bytes(b"")
    j = Journal(path, boot_id="b")
    j.open()
    try:
        rows = [s for s in JournalReader(path).tail(10)]
        assert [r.event.reason for r in rows] == ["journal_damaged"]
        assert rows[0].seq > last
        assert "0 bytes" in rows[0].event.detail["error"]
    finally:
        j.close()
    assert list(tmp_path.glob("j.db.damaged-*"))
