"""The journal: every scan lands here, in a SQLite (WAL) outbox on local storage.

:meth:`Journal.append` commits in the caller's thread on the one writer connection, guarded
by a mutex taken with a deadline; a writer thread does everything else (outbox and timing
updates, moving the spill log in, the size cap, WAL checkpoints). What the database cannot
take in time goes to the spill log (``<name>.spill``) and is moved into the database later,
so a locked, full or failing database never holds the door decision up. See :class:`Journal`.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from firmware.exceptions import JournalError
from firmware.journal.events import NewEvent, Receipt, StoredEvent
from firmware.journal.ids import uuid7
from firmware.journal.spill import SpillLog, dumps_json, fsync_dir, read_spill

log = logging.getLogger(__name__)

Report = Callable[[str, dict[str, Any]], None]

SCHEMA_VERSION = 1
MIB = 1024 * 1024

# After damage the seq restarts this far above the last known high-water mark: the sidecar
# lags the real seq by at most HWM_STEP seqs or HWM_PERIOD_S seconds of scans.
HWM_MARGIN = 10_000
HWM_STEP = 1_000
HWM_PERIOD_S = 2.0

# Rows dropped by the size cap in one transaction at most; the cap drops down to 10 % below
# the limit (at most this many), so it runs once per that many appends, not on every one.
# Deleting 5,000 rows took 23 ms here (a Pi is several times slower, and appends spill while
# it runs); 1,000 keeps the drop transaction short.
DROP_CHUNK = 1_000

# The writer's busy timeout is short: a locked database must not keep it from noticing new
# work, the close request or a released lock; appends spill meanwhile. An append waits for
# the database lock at most what is left of its deadline, minus this share of the deadline
# kept for the Python work around the commit.
WRITER_BUSY_TIMEOUT_MS = 20
APPEND_BUSY_SHARE = 0.9
# Opening waits longer for a lock held by someone else (a read of a large file, a CLI).
OPEN_BUSY_TIMEOUT_S = 5.0
RETRY_MIN_S = 0.01
RETRY_MAX_S = 0.5
CLOSE_GRACE_S = 2.0
READ_TIMEOUT_S = 5.0
WAL_SIZE_LIMIT = 4 * MIB

# Appends the caller commits itself before it wakes the writer for the byte cap and the WAL
# checkpoint. The daemon's update_timing wakes the writer after every scan anyway; this bounds
# the lag for a caller that never calls it (the benchmark) to a few rows.
HOUSEKEEPING_EVERY = 16
SYNC_COALESCE_S = 0.005
SYNC_MIN_GAP_S = 0.02
# ... and the longest the writer leaves such appends unchecked when no more come.
HOUSEKEEPING_IDLE_S = 1.0
# How often the writer looks for rows past the age limit, seconds, and how many pages of
# DROP_CHUNK rows it looks at per look (so one look never holds the mutex for long).
AGE_CHECK_S = 60.0
AGE_PAGES = 8
# An append that finds this many appends the size cap has not seen yet (the writer starved of
# CPU, or appends at full speed) goes through the writer, whose transaction applies the cap
# with the insert: the cap then never lags more rows than this, whatever the scheduling.
CAP_LAG_MAX = 2 * HOUSEKEEPING_EVERY
# The writer checkpoints (PASSIVE, on its second connection, without the writer mutex) once
# the WAL holds this many frames: SQLite's own autocheckpoint default, which it can no longer
# use because that would run the checkpoint and its two fsyncs inside an append's COMMIT.
CHECKPOINT_FRAMES = 1000
# A commit that lands while that checkpoint runs leaves the WAL one short of fully
# checkpointed, so it cannot restart from the beginning; the writer checkpoints that remainder
# at most this often.
CHECKPOINT_RETRY_S = 1.0
# Appends at full speed can outrun the unlocked checkpoint for ever; past this size the writer
# checkpoints holding the mutex (appends wait or spill for that one checkpoint), so the WAL
# stays bounded whatever the load.
CHECKPOINT_HARD_FRAMES = 2 * CHECKPOINT_FRAMES
# Without the wal-index to read the WAL size from, checkpoint after this many transactions.
CHECKPOINT_FALLBACK_TXNS = 250
# Where the wal-index (the -shm file) keeps mxFrame (the WAL's last valid frame) and
# nBackfill (frames already copied into the database); native byte order
# (https://www.sqlite.org/walformat.html).
_SHM_U32 = struct.Struct("=I")
_SHM_MXFRAME_AT = 16
_SHM_NBACKFILL_AT = 96
# Cap transactions in one writer round for appends committed in their callers' threads; each
# drops as _enforce_cap does, so a few hold the mutex only briefly.
CAP_TXNS = 4
# Events the writer moves into the database in one transaction, so draining a long spill
# episode does not hold the writer mutex in one long transaction.
DRAIN_CHUNK = 1_000

# primary result codes (sqlite3.h)
_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_CANTOPEN = 14
_SQLITE_NOTADB = 26

# The NewEvent fields, in declaration order (a test checks they match NewEvent).
EVENT_FIELDS = (
    "kind",
    "wall_ns",
    "clock_synced",
    "mono_ns",
    "door",
    "direction",
    "decision",
    "reason",
    "credential_kind",
    "subject",
    "codes",
    "decode_ms",
    "verdict_ms",
    "frame_to_relay_ms",
    "detail",
)
EVENT_COLUMNS = ("seq", "event_id", "boot_id", *EVENT_FIELDS, "published", "acked")
SELECT_EVENTS = f"SELECT {', '.join(EVENT_COLUMNS)} FROM events"
# The writer's first commit after a complete checkpoint, so that the WAL restart and its
# header fsync happen in the writer thread, not in an append (see Journal._prime_wal).
_WAL_RESET = "INSERT OR REPLACE INTO meta (key, value) VALUES ('wal_reset_wall_ns', ?)"
_INSERT = (
    f"INSERT OR IGNORE INTO events ({', '.join(EVENT_COLUMNS[:-2])}) "
    f"VALUES ({', '.join('?' * (len(EVENT_COLUMNS) - 2))})"
)

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    event_id TEXT UNIQUE NOT NULL,
    kind TEXT NOT NULL,
    wall_ns INTEGER NOT NULL,
    clock_synced INTEGER NOT NULL,
    boot_id TEXT NOT NULL,
    mono_ns INTEGER NOT NULL,
    door TEXT NOT NULL,
    direction TEXT NOT NULL,
    decision TEXT,
    reason TEXT NOT NULL,
    credential_kind TEXT,
    subject TEXT,
    codes TEXT NOT NULL DEFAULT '[]',
    decode_ms REAL,
    verdict_ms REAL,
    frame_to_relay_ms REAL,
    detail TEXT NOT NULL DEFAULT '{{}}',
    published INTEGER NOT NULL DEFAULT 0,
    acked INTEGER NOT NULL DEFAULT 0
);
-- the outbox: (0, 0) unsent, (0, 1) sent, (1, 1) acked by the backend, each in seq order
CREATE INDEX IF NOT EXISTS events_outbox ON events (acked, published, seq);
CREATE TABLE IF NOT EXISTS gaps (
    id INTEGER PRIMARY KEY,
    from_seq INTEGER NOT NULL,
    to_seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    reason TEXT NOT NULL,
    wall_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""


def _opt_str(v: Any) -> str | None:
    return None if v is None else str(v)


def _opt_float(v: Any) -> float | None:
    return None if v is None else float(v)


def row_params(stored: StoredEvent) -> tuple[Any, ...]:
    """The INSERT parameters for ``stored`` (EVENT_COLUMNS but the two flags). Raises
    TypeError/ValueError as :func:`event_values`."""
    return (stored.seq, stored.event_id, stored.boot_id, *event_values(stored.event))


def event_values(e: NewEvent) -> tuple[Any, ...]:
    """The EVENT_FIELDS columns of ``e``, coerced to the column types.

    Coerced here, in the caller's thread, so a numpy integer or an enum can never make the
    INSERT fail. Raises TypeError/ValueError for a value that is no number where a number
    belongs.
    """
    return (
        str(e.kind),
        int(e.wall_ns),
        int(bool(e.clock_synced)),
        int(e.mono_ns),
        str(e.door),
        str(e.direction),
        _opt_str(e.decision),
        str(e.reason),
        _opt_str(e.credential_kind),
        _opt_str(e.subject),
        dumps_json(list(e.codes)),
        _opt_float(e.decode_ms),
        _opt_float(e.verdict_ms),
        _opt_float(e.frame_to_relay_ms),
        dumps_json(e.detail),
    )


def row_to_stored(row: Sequence[Any]) -> StoredEvent:
    """A row selected with SELECT_EVENTS (columns in EVENT_COLUMNS order) as a StoredEvent.
    Raises ValueError when a JSON column is damaged."""
    values = dict(zip(EVENT_COLUMNS, row, strict=True))
    ev: dict[str, Any] = {name: values[name] for name in EVENT_FIELDS}
    ev["clock_synced"] = bool(ev["clock_synced"])
    ev["codes"] = tuple(json.loads(ev["codes"] or "[]"))
    ev["detail"] = dict(json.loads(ev["detail"] or "{}"))
    return StoredEvent(
        seq=int(values["seq"]),
        event_id=str(values["event_id"]),
        boot_id=str(values["boot_id"]),
        event=NewEvent(**ev),
        published=bool(values["published"]),
        acked=bool(values["acked"]),
    )


def salvage_row(row: Sequence[Any], error: str) -> StoredEvent:
    """A row :func:`row_to_stored` cannot read, as an "incident" event with reason
    ``row_unreadable`` that keeps the row's seq, event id, wall time and outbox flags, and
    ``error`` in its detail.

    Why not skip it: the uplink sends rows in seq order and the back office acknowledges the
    highest contiguous seq, so a row that can never be read would stall the outbox forever
    (or leave a hole nobody explains). Sent in its place, the back office stores what is
    known and sees why the rest is missing."""
    values = dict(zip(EVENT_COLUMNS, row, strict=True))

    def as_int(name: str) -> int:
        try:
            return int(values[name])
        except (TypeError, ValueError):
            return 0

    seq = as_int("seq")
    event_id = values["event_id"]
    if not isinstance(event_id, str) or not event_id:
        event_id = f"unreadable-seq-{seq}"
    return StoredEvent(
        seq=seq,
        event_id=event_id,
        boot_id=str(values["boot_id"]),
        event=NewEvent(
            kind="incident",
            wall_ns=as_int("wall_ns"),
            clock_synced=bool(as_int("clock_synced")),
            mono_ns=as_int("mono_ns"),
            door=str(values["door"]),
            direction=str(values["direction"]),
            reason="row_unreadable",
            detail={"error": error, "kind": str(values["kind"])},
        ),
        published=bool(as_int("published")),
        acked=bool(as_int("acked")),
    )


def read_rows(rows: Sequence[Sequence[Any]]) -> tuple[list[StoredEvent], int]:
    """``rows`` (SELECT_EVENTS order) as StoredEvents, unreadable ones salvaged (see
    :func:`salvage_row`); also how many were salvaged."""
    out: list[StoredEvent] = []
    salvaged = 0
    for r in rows:
        try:
            out.append(row_to_stored(r))
        except (ValueError, TypeError) as e:
            out.append(salvage_row(r, f"{type(e).__name__}: {e}"))
            salvaged += 1
    return out, salvaged


def errcode(e: BaseException) -> int:
    """The primary SQLite result code of ``e`` (0 when it carries none)."""
    return int(getattr(e, "sqlite_errorcode", 0) or 0) & 0xFF


@dataclass(frozen=True, slots=True)
class JournalStats:
    """Counters since ``open()``.

    ``appended``: append calls. ``committed``: rows inserted (spilled events moved in count
    once). ``transactions``: write transactions committed (group commit: one may carry many
    appends). ``spilled``/``lost``: appends answered so. ``dropped_by_cap`` /
    ``dropped_disk_full`` / ``dropped_by_age``: rows deleted by the size cap / to make room on
    a full disk / past the age limit. ``fsyncs``: group fsyncs done.
    ``last_fsync_age_ms``: since the last one (None before the first). ``fsync_max_ms``: the
    slowest one. ``rows``: rows in the database now. ``pending``: events not yet committed.
    """

    appended: int
    committed: int
    transactions: int
    spilled: int
    lost: int
    dropped_by_cap: int
    dropped_disk_full: int
    dropped_by_age: int
    fsyncs: int
    last_fsync_age_ms: float | None
    fsync_max_ms: float
    rows: int
    pending: int


# --- work items handed to the writer -----------------------------------------------------

_PENDING, _COMMITTED, _LOST = "pending", "committed", "lost"


class _Item:
    """One appended event on its way into the database."""

    __slots__ = ("failed", "full_strikes", "params", "spilled", "state", "stored")

    def __init__(self, stored: StoredEvent, params: tuple[Any, ...]) -> None:
        self.stored = stored
        self.params = params
        self.state = _PENDING
        self.spilled = False  # a copy is in the spill log
        self.failed = False  # the writer tried and failed for a reason other than a lock
        self.full_strikes = 0  # commits that failed with SQLITE_FULL (writer-owned)


@dataclass(slots=True)
class _Timing:
    op_id: int
    seq: int
    ms: float


@dataclass(slots=True)
class _Publish:
    op_id: int
    seqs: tuple[int, ...]


@dataclass(slots=True)
class _AckThrough:
    op_id: int
    seq: int


@dataclass(slots=True)
class _ReadUnpublished:
    limit: int
    done: threading.Event = field(default_factory=threading.Event)
    result: list[StoredEvent] = field(default_factory=list)
    error: str | None = None


_WriteOp = _Timing | _Publish | _AckThrough
_Op = _WriteOp | _ReadUnpublished


@dataclass(slots=True)
class _Tx:
    """What one committed transaction did."""

    inserted: int = 0
    deleted_cap: int = 0
    deleted_full: int = 0
    deferred: list[_Timing] = field(default_factory=list)
    drops: list[dict[str, Any]] = field(default_factory=list)
    deleted_age: int = 0
    age_last: int | None = None  # _drop_old: the last seq looked at, None: past the limit


@dataclass(slots=True)
class _Outcome:
    """What one writer round did, applied to shared state under the lock afterwards."""

    committed: list[_Item] = field(default_factory=list)
    failed: list[_Item] = field(default_factory=list)
    done_ops: list[_WriteOp] = field(default_factory=list)
    retry_ops: list[_WriteOp] = field(default_factory=list)
    deferred: list[_Timing] = field(default_factory=list)
    commits: int = 0
    ok: bool = True
    busy: bool = False  # failed only because another connection holds the lock
    capped: bool = False  # a committed transaction saw the size cap hold
    reports: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


@dataclass(slots=True)
class _Opened:
    """What the writer found when it opened the database, for ``open()`` to report."""

    incident: tuple[str, dict[str, Any]] | None
    spill_bad_lines: int


class Journal:
    """The durable outbox of scan events (one SQLite file in WAL mode plus two small files).

    Files: ``path`` (with SQLite's ``-wal``/``-shm``), ``<name>.spill`` (the spill log) and
    ``<name>.seq`` (the seq high-water mark). ``boot_id``: this boot's id, stored on every row.
    ``fsync_interval_s``: the group fsync period. ``append_deadline_s``: the longest
    :meth:`append` waits, for the writer mutex and the database lock together, before it
    spills. ``max_rows`` / ``max_bytes``: the size cap. ``report(code, detail)``: called on
    incidents (``journal_damaged``, ``journal_missing``, ``journal_spilling``,
    ``journal_full``, ``journal_dropped``, ``journal_lost``, ``journal_error``,
    ``journal_spill_damaged``, ``journal_writer_failed``) from the thread that saw them; it
    must be quick and must not call back into the journal. ``wall_clock``: ns since the epoch,
    for gap records, incident events, the names of damaged files and the WAL restart commit.
    ``on_connect``: called in the writer thread with the writer connection once it is set up
    (tests use it to set ``PRAGMA max_page_count``, which fails writes exactly like a full
    disk); appends use that connection from their own threads afterwards.

    Appending. :meth:`append` builds the row, takes the writer mutex (waiting at most the
    deadline), takes the next seq and commits one INSERT in the calling thread on the one
    writer connection, its busy timeout cut to what is left of the deadline. It spills (see
    below) when the mutex is not free in time (the writer holds it in a long operation) or
    another process holds the database lock until the deadline (C19: the door decision never
    waits on the database lock beyond ``append_deadline_s``). It hands the event to the writer
    thread instead, waiting for that commit until the deadline and then spilling, when events
    are queued for the writer (spilled or failed ones not yet moved in: they go first, which
    keeps seq order commit order), at the row cap or when the byte cap lags (see Drop
    policy), and when its own commit failed for a reason other than a lock (a full disk, a
    damaged file: the writer's handling below). The writer thread does everything else on
    the same connection under the same mutex, in short transactions: outbox and timing
    updates, moving spilled events in (``DRAIN_CHUNK`` per transaction), the size cap, the
    WAL restart commit. It reads the outbox and checkpoints on a second connection, without
    the mutex. The sync thread's fsyncs use their own file descriptors and never take the
    mutex.

    Durability. :meth:`append` returns "committed" once the row is in the WAL: it survives
    kill -9. SQLite runs ``synchronous=NORMAL``, which does not fsync on commit; a sync thread
    woken by commits (and spills) fsyncs the WAL (and the spill log) ``SYNC_COALESCE_S`` (5 ms)
    after the first of them, at most once per ``SYNC_MIN_GAP_S`` (20 ms), so a committed row is
    on stable storage at most 20 ms + two fsyncs (one may be running) after its commit, and
    never later than ``fsync_interval_s`` + two fsyncs. Woken rather than ticking: an fsync
    stalls a concurrent ``write()`` into the WAL by milliseconds, and right after a scan's
    commits the next scan is far away (measured here: pipeline p99 overhead 3.4 ms on a 100 ms
    tick, 1.2 ms woken).
    One fsync of the WAL takes at most 2 ms idle and 6 ms under a flat-out append load here;
    an SD card takes 5-50 ms. A row that got "spilled" is in the spill log (one ``os.write``:
    survives kill -9) and reaches stable storage on the same schedule; the spill log is
    emptied only once every event in it is committed *and* that commit has been fsynced.
    :meth:`wait_durable` waits for the next fsync.

    Checkpoints. SQLite's automatic checkpoint is off on the writer connection: it would run
    inside an append's COMMIT, with its fsyncs. Once the WAL holds ``CHECKPOINT_FRAMES``
    (1,000, SQLite's own default) frames, the writer thread runs a PASSIVE checkpoint on its
    second connection without the mutex (SQLite fsyncs the WAL before and the database after
    it; appends go on meanwhile), then makes the first commit into the checkpointed WAL itself
    (it sets ``wal_reset_wall_ns`` in ``meta``), which restarts the WAL and fsyncs its new
    header. So no append checkpoints or fsyncs, except one that lands in the microseconds
    between the checkpoint's end and that commit. A commit that lands while the checkpoint
    runs leaves a few frames behind; the writer checkpoints them at most every
    ``CHECKPOINT_RETRY_S`` (1 s). At a door's pace the WAL so stays near 4 MiB
    (``journal_size_limit`` truncates it to 4 MiB at each restart). Appends at full speed
    outrun an unlocked checkpoint, so past ``CHECKPOINT_HARD_FRAMES`` (2,000 frames, 8 MiB)
    the writer finishes it holding the mutex (appends wait, or spill, for that checkpoint):
    8-11 MB at most over 30,000 appends at full speed here. A reader holding an old snapshot
    (a long CLI query) keeps the WAL from restarting until it ends, as with any SQLite WAL.

    Seq. Per device, strictly increasing in commit order, continued across restarts from the
    highest seq in the database, the spill log, the gaps table and the ``<name>.seq`` sidecar.
    A seq handed out but never committed nor spilled (the process died inside append) may be
    handed out again: no feedback was given for it, so nobody can tell. After the database was
    found damaged or missing, seq continues ``HWM_MARGIN`` (10,000) above the highest seq still
    readable or remembered in the sidecar, which the sync thread rewrites at most every
    ``HWM_PERIOD_S`` (2 s) or ``HWM_STEP`` (1,000) seqs, and at close.

    Drop policy. The cap never blocks an append and never refuses one. When a commit would
    leave more than ``max_rows`` rows, the same transaction deletes the oldest rows (an
    append at the row limit goes through the writer for that). When there are more than
    ``max_bytes`` bytes of used pages (the file reuses freed pages, so the file stays near
    ``max_bytes``), the oldest rows go in the same transaction for the writer's own commits,
    and in the writer's next round for appends that committed themselves: it is woken after
    ``HOUSEKEEPING_EVERY`` (16) of them, runs at its next outbox or timing update (the daemon
    sends one after every granted scan) and at the latest ``HOUSEKEEPING_IDLE_S`` (1 s) after
    the first one; an append that finds ``CAP_LAG_MAX`` (32) of them unseen goes through the
    writer; :meth:`flush` waits for it. So the used pages may pass ``max_bytes`` by what at
    most 32 rows hold. Rows go in this order: first rows the backend acknowledged (acked=1),
    then rows sent but not acknowledged (published=1), then unsent rows, going 10 % below the
    limit (at most ``DROP_CHUNK`` rows) so the cap runs rarely. Each dropped run of
    unacknowledged seqs is a ``gaps`` row (from_seq, to_seq, count, reason
    "cap_rows"/"cap_bytes"/"disk_full"/"max_age", wall_ns) for the uplink to send (rows the
    back office acknowledged need none: it holds them); dropping unacknowledged rows is
    reported as ``journal_dropped``. On SQLITE_FULL (disk or page limit; an append that meets
    it in its own commit hands the event to the writer) the writer drops 10 % of the oldest rows (at
    most ``DROP_CHUNK``) by the same order, reason "disk_full", and retries once; it drops
    only when the file has no free page left (else dropping would not help) and never for an
    event that already failed with SQLITE_FULL (likely too big to ever fit: one such event
    must not empty the journal). Then it commits the batch event by event, so one event that
    cannot fit does not hold back the others (the one exception to seq order being commit
    order). What still fails goes to the spill log (moved in later, e.g. after a restart with
    room); when that write fails too, append returns "lost" (counted, reported). ``append``
    never raises for a full, locked or failing disk.

    Age limit. With ``max_age_s``, the writer looks every ``AGE_CHECK_S`` (60 s, and once
    right after open) for rows older than that and deletes them, oldest first, acknowledged
    or not (a gap record for the unacknowledged ones, reason "max_age"): personal data is not
    kept longer than the site's retention period. Only rows stamped by a synced clock, and
    only while ``trusted_wall()`` returns a time (None: the clock is not trusted now, skip the
    look): a wrong clock must never empty the journal.

    Damage. ``open()`` runs ``PRAGMA quick_check``; a file that fails it or cannot be read as
    a database (zeroed page, truncated, garbage, "file is not a database"), or holds another
    schema or a newer schema version, is moved aside with its ``-wal``/``-shm`` to
    ``<name>.damaged-<UTC YYYYmmddTHHMMSSZ>``, a fresh journal is created, the spill log is
    replayed into it, a gap record (1..the last seq before the new start, count 0 for
    unknown, reason "journal_damaged"; "journal_missing" for a deleted file) is written, an
    incident event (kind "incident", reason "journal_damaged") is appended and
    ``report("journal_damaged", ...)`` is called. quick_check reads the whole file: 1.6 s
    for 100 MB from a cold cache here (0.1 s warm); on a Pi with an SD card a full 512 MiB
    journal may take tens of seconds. Damage that appears while running is not repaired in
    place: writes fail over to the spill log and ``journal_error`` is reported; the next start
    repairs it.

    Threads: :meth:`append`, :meth:`update_timing` and the outbox methods are thread-safe. The
    writer ("qrgate-journal-writer") and sync ("qrgate-journal-sync") threads run from
    ``open()`` to ``close()``.
    """

    def __init__(
        self,
        path: Path,
        *,
        boot_id: str,
        fsync_interval_s: float = 0.1,
        append_deadline_s: float = 0.05,
        max_rows: int = 1_000_000,
        max_bytes: int = 512 * MIB,
        max_age_s: float | None = None,
        trusted_wall: Callable[[], int | None] | None = None,
        report: Report | None = None,
        wall_clock: Callable[[], int] = time.time_ns,
        on_connect: Callable[[sqlite3.Connection], None] | None = None,
    ) -> None:
        if fsync_interval_s <= 0 or append_deadline_s <= 0:
            raise ValueError("fsync_interval_s and append_deadline_s must be > 0")
        if max_rows < 1 or max_bytes < 64 * 1024:
            raise ValueError("max_rows must be >= 1 and max_bytes >= 64 KiB")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError("max_age_s must be > 0 (or None: no age limit)")
        self.path = Path(path)
        self.spill_path = self.path.with_name(self.path.name + ".spill")
        self.hwm_path = self.path.with_name(self.path.name + ".seq")
        self._boot_id = boot_id
        self._fsync_interval = fsync_interval_s
        self._deadline = append_deadline_s
        self._max_rows = max_rows
        self._max_bytes = max_bytes
        self._max_age_ns = None if max_age_s is None else int(max_age_s * 1e9)
        self._trusted_wall = trusted_wall
        self._age_at = 0.0  # monotonic time of the next age look
        self._dropped_age = 0
        self._report = report
        self._wall = wall_clock
        self._on_connect = on_connect

        # Lock order: _wlock before _lock before nothing; _sync_lock before _lock.
        # _wlock: whoever holds it may use the writer connection (append, the writer thread).
        self._wlock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._cursor: sqlite3.Cursor | None = None  # append's cursor on _conn
        self._busy_ms = int(append_deadline_s * 1000 * APPEND_BUSY_SHARE)
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)  # the writer waits here for work
        self._done = threading.Condition(self._lock)  # appends, flush and wait_durable wait here
        self._state = "new"  # new -> open -> closing -> closed
        self._pending: dict[int, _Item] = {}  # seq -> item; insertion order is seq order
        self._ops: list[_Op] = []
        self._open_ops: set[int] = set()
        self._op_seq = 0
        self._work_gen = 0
        self._next_seq = 1
        self._writer_dead = False
        self._spill = SpillLog(self.spill_path)
        self._spill_outstanding = 0  # spilled items not yet committed
        self._spill_clear_gen: int | None = None  # commit gen after which the log may go
        self._spilling = False

        # counters; _committed, _rows, _dropped_*, _commit_gen, _fast_total and _kept_total
        # change only under _wlock
        self._appended = self._committed = self._spilled = self._lost = 0
        self._dropped_cap = self._dropped_full = 0
        self._rows = 0
        self._fast_total = 0  # appends committed in the caller's thread
        self._kept_total = 0  # ... of which the size cap has seen the effect
        self._keep_requested = False  # flush wants the size cap checked now

        # WAL upkeep (writer thread)
        self._shm_fd: int | None = None
        self._ckpt_retry_at = 0.0
        self._ckpt_gen = 0
        self._page_size = 4096
        self._error_episode = False
        self._full_episode = False

        # sync state
        self._commit_gen = 0
        self._synced_gen = 0
        self._spill_gen = 0
        self._spill_synced_gen = 0
        self._fsyncs = 0
        self._fsync_max_ms = 0.0
        self._last_fsync: float | None = None
        self._sync_lock = threading.Lock()
        self._sync_stop = threading.Event()
        self._sync_wake = threading.Event()
        self._wal_fd: int | None = None
        self._writer_lock_fd: int | None = None
        self._wal_ident: tuple[int, int] | None = None
        self._sync_error_reported = False
        self._hwm_written = 0
        self._hwm_at = 0.0

        self._ready = threading.Event()
        self._opened: _Opened | None = None
        self._open_error: BaseException | None = None
        self._writer: threading.Thread | None = None
        self._syncer: threading.Thread | None = None

    # --- life cycle ----------------------------------------------------------------------

    def open(self) -> None:
        """Open (create, repair) the journal and start its threads; idempotent.

        Replays the spill log; on a damaged file, moves it aside and starts fresh (see the
        class docstring). Raises JournalError when no journal can be created at ``path`` (the
        folder is missing or not writable, the database stays locked by another process for
        5 s), or when the journal was closed already.
        """
        with self._lock:
            if self._state == "open":
                return
            if self._state != "new":
                raise JournalError(f"journal {self.path} was closed; make a new Journal")
        self._take_writer_lock()
        writer = threading.Thread(
            target=self._writer_main, name="qrgate-journal-writer", daemon=True
        )
        writer.start()
        self._ready.wait()
        if self._open_error is not None or self._opened is None:
            writer.join()
            self._drop_writer_lock()
            with self._lock:
                self._state = "closed"
            err = self._open_error
            if isinstance(err, JournalError):
                raise err
            raise JournalError(f"cannot open journal {self.path}: {err}") from err
        opened = self._opened
        self._writer = writer
        self._syncer = threading.Thread(
            target=self._syncer_main, name="qrgate-journal-sync", daemon=True
        )
        with self._lock:
            self._state = "open"
        self._syncer.start()
        if opened.spill_bad_lines:
            self._emit(
                "journal_spill_damaged",
                {"path": str(self.spill_path), "bad_lines": opened.spill_bad_lines},
            )
        if opened.incident is not None:
            code, detail = opened.incident
            receipt = self.append(
                NewEvent(
                    kind="incident",
                    wall_ns=self._wall(),
                    clock_synced=False,
                    mono_ns=time.monotonic_ns(),
                    door="",
                    direction="",
                    reason=code,
                    detail=detail,
                )
            )
            self._emit(code, {**detail, "incident_seq": receipt.seq})

    def close(self) -> None:
        """Commit what is pending (for up to 2 s if the database is locked; the rest stays in
        the spill log), fsync, write the seq high-water mark, stop the threads; idempotent.

        Call it after the last append returned: an append after close raises JournalError.
        """
        with self._lock:
            if self._state == "new":
                self._state = "closed"
                return
            if self._state == "open":
                self._state = "closing"
                self._work.notify_all()
        if self._writer is not None:
            self._writer.join()
        self._sync_stop.set()
        self._sync_wake.set()
        if self._syncer is not None:
            self._syncer.join()
        with self._sync_lock:
            self._write_hwm(force=True)
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
        with self._lock:
            self._spill.close()
            self._state = "closed"
        self._drop_writer_lock()

    def _take_writer_lock(self) -> None:
        # One writer per journal file, whichever config pointed two daemons at it: two
        # processes each counting seqs would hand out the same seq twice.
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise JournalError(f"cannot create {lock_path}: {e.strerror or e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"another process is writing the journal {self.path}: stop it, or give this "
                "reader its own journal.path; giving up"
            ) from None
        self._writer_lock_fd = fd

    def _drop_writer_lock(self) -> None:
        fd, self._writer_lock_fd = self._writer_lock_fd, None
        if fd is not None:
            os.close(fd)

    def __enter__(self) -> Journal:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- the scan thread's calls -------------------------------------------------------------

    def append(self, event: NewEvent) -> Receipt:
        """Store ``event``; return once it is committed (or spilled, or known lost).

        Assigns ``seq`` and a UUIDv7 ``event_id``. Commits in the calling thread; waits at most
        ``append_deadline_s`` in all for the writer mutex and the database lock (plus one
        ``os.write`` to the spill log when the deadline passes). Durability "committed",
        "spilled" or "lost" as in :class:`Receipt`. Never raises for a locked, full or failing
        disk. Raises JournalError when the journal is not open, and TypeError/ValueError when a
        numeric field holds no number (a bug in the caller).
        """
        deadline = time.monotonic() + self._deadline
        event_id = uuid7()
        # build the row before taking any lock: JSON encoding is the costly part of an append
        values = event_values(event)
        if self._pending:
            # a backlog (spilled or failing events) goes in first, through the writer, so seq
            # order stays commit order; the unlocked peek is re-checked under the lock
            return self._via_writer(self._enqueue_item(event_id, event, values), deadline)
        wlock = self._wlock
        if not wlock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            # the writer holds the mutex in a long operation: spill rather than wait on
            return self._spill_new(event_id, event, values)
        item: _Item | None = None
        spilled: tuple[Receipt, tuple[str, dict[str, Any]] | None] | None = None
        try:
            with self._lock:
                if self._state != "open":
                    raise JournalError(f"journal {self.path} is not open")
                if (
                    self._pending
                    or self._writer_dead
                    or self._rows >= self._max_rows
                    or self._fast_total - self._kept_total >= CAP_LAG_MAX
                ):
                    # the writer's transaction applies the size cap with the insert: at the
                    # row limit (never exceeded then), or when the cap lags too far behind
                    item = self._enqueue_locked(event_id, event, values)
                    seq = 0
                else:
                    seq = self._next_seq
                    self._next_seq = seq + 1
                    self._appended += 1
            if item is None:
                params = (seq, event_id, self._boot_id, *values)
                done = self._commit_here(params, deadline)
                if done is True:
                    return Receipt(seq, event_id, "committed")
                item = _Item(StoredEvent(seq, event_id, self._boot_id, event), params)
                with self._lock:
                    self._add_pending(item)
                    if done is None:
                        spilled = self._spill_locked(item, "deadline")
        finally:
            wlock.release()
        if spilled is not None:
            receipt, report = spilled
            if report is not None:
                self._emit(*report)
            return receipt
        return self._via_writer(item, deadline)

    def _commit_here(self, params: tuple[Any, ...], deadline: float) -> bool | None:
        """INSERT ``params`` in autocommit on the writer connection (caller holds _wlock).

        True: committed. None: the database lock stayed taken past the deadline (spill).
        False: any other failure (a full disk, an error): the writer's transaction handles it
        as it always did.
        """
        cur = self._cursor
        if cur is None:
            return False
        left_ms = int((deadline - time.monotonic()) * 1000)
        shortened = left_ms < self._busy_ms
        try:
            if shortened:
                # time went on waiting for the mutex: wait for the lock only what is left
                cur.execute(f"PRAGMA busy_timeout={max(0, left_ms)}")
            cur.execute(_INSERT, params)
            n = cur.rowcount
        except sqlite3.Error as e:
            conn = self._conn
            if conn is not None:
                self._rollback(conn)
            if errcode(e) in (_SQLITE_BUSY, _SQLITE_LOCKED):
                return None
            log.debug("append commit failed (%s); the writer takes it over", e)
            return False
        finally:
            if shortened:
                with contextlib.suppress(sqlite3.Error):
                    cur.execute(f"PRAGMA busy_timeout={self._busy_ms}")
        self._rows += n
        self._committed += n
        self._commit_gen += 1
        self._sync_wake.set()
        self._fast_total += 1
        unkept = self._fast_total - self._kept_total
        if unkept in (1, HOUSEKEEPING_EVERY):
            # the first one arms the writer's idle timer, the last one is due at once
            with self._lock:
                self._work.notify()
        return True

    def _enqueue_item(self, event_id: str, event: NewEvent, values: tuple[Any, ...]) -> _Item:
        with self._lock:
            if self._state != "open":
                raise JournalError(f"journal {self.path} is not open")
            return self._enqueue_locked(event_id, event, values)

    def _enqueue_locked(self, event_id: str, event: NewEvent, values: tuple[Any, ...]) -> _Item:
        """Give the event its seq and queue it for the writer (caller holds _lock)."""
        seq = self._next_seq
        self._next_seq = seq + 1
        params = (seq, event_id, self._boot_id, *values)
        item = _Item(StoredEvent(seq, event_id, self._boot_id, event), params)
        self._appended += 1
        self._add_pending(item)
        return item

    def _add_pending(self, item: _Item) -> None:
        """Queue ``item`` for the writer in seq order and wake it (caller holds _lock)."""
        seq = item.stored.seq
        pending = self._pending
        later = bool(pending) and next(reversed(pending)) > seq
        pending[seq] = item
        if later:
            # a commit that failed in the caller's thread comes back after another thread
            # spilled a later seq meanwhile; flush and the writer rely on seq order
            ordered = sorted(pending.items())
            pending.clear()
            pending.update(ordered)
        self._work_gen += 1
        self._work.notify()

    def _via_writer(self, item: _Item, deadline: float) -> Receipt:
        """Wait for the writer to commit ``item`` until the deadline, then spill it."""
        seq, event_id = item.stored.seq, item.stored.event_id
        with self._lock:
            while item.state is _PENDING and not item.failed and not self._writer_dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._done.wait(remaining)
            if item.state is _COMMITTED:
                return Receipt(seq, event_id, "committed")
            receipt, report = self._spill_locked(
                item, "deadline" if not item.failed else "write failed"
            )
        if report is not None:
            self._emit(*report)
        return receipt

    def _spill_new(self, event_id: str, event: NewEvent, values: tuple[Any, ...]) -> Receipt:
        """Spill an event that never reached the database: the mutex stayed taken."""
        with self._lock:
            if self._state != "open":
                raise JournalError(f"journal {self.path} is not open")
            item = self._enqueue_locked(event_id, event, values)
            receipt, report = self._spill_locked(item, "deadline")
        if report is not None:
            self._emit(*report)
        return receipt

    def _spill_locked(
        self, item: _Item, why: str
    ) -> tuple[Receipt, tuple[str, dict[str, Any]] | None]:
        seq, event_id = item.stored.seq, item.stored.event_id
        if item.spilled:
            return Receipt(seq, event_id, "spilled"), None
        try:
            self._spill.append(item.stored)
        except OSError as e:
            item.state = _LOST
            self._pending.pop(seq, None)
            self._lost += 1
            return Receipt(seq, event_id, "lost"), (
                "journal_lost",
                {"seq": seq, "event_id": event_id, "error": str(e)},
            )
        item.spilled = True
        self._spill_outstanding += 1
        self._spill_clear_gen = None
        self._spilled += 1
        self._spill_gen += 1
        self._sync_wake.set()
        if self._spilling:
            return Receipt(seq, event_id, "spilled"), None
        self._spilling = True
        return Receipt(seq, event_id, "spilled"), (
            "journal_spilling",
            {"seq": seq, "why": why, "spill": str(self.spill_path)},
        )

    def update_timing(self, seq: int, frame_to_relay_ms: float) -> None:
        """Record ``frame_to_relay_ms`` (ms) for event ``seq``; returns at once.

        The writer applies it in its next transaction. Dropped silently when the event was
        never stored or the journal is closed (it is a measurement, not a scan).
        """
        self._enqueue(lambda op_id: _Timing(op_id, seq, float(frame_to_relay_ms)))

    # --- the uplink's calls ---------------------------------------------------------------

    def unpublished(self, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` committed events not yet published, in seq order.

        Served by the writer between transactions. Raises JournalError when the journal is
        not open or the writer cannot answer within 5 s.
        """
        op = _ReadUnpublished(max(0, int(limit)))
        with self._lock:
            if self._state != "open" or self._writer_dead:
                raise JournalError(f"journal {self.path} is not open")
            self._ops.append(op)
            self._work_gen += 1
            self._work.notify()
        if not op.done.wait(READ_TIMEOUT_S):
            raise JournalError("journal writer did not answer within 5 s")
        if op.error is not None:
            raise JournalError(f"cannot read unpublished events: {op.error}")
        return op.result

    def mark_published(self, seqs: Iterable[int]) -> int:
        """Mark events ``seqs`` as published (PUBACK received); returns at once, applied by
        the writer in its next transaction. A crash before that re-sends them (the backend
        deduplicates by event_id). Returns the write's id for :meth:`applied` (0: nothing to
        do, or the journal is not open)."""
        batch = tuple(int(s) for s in seqs)
        if not batch:
            return 0
        return self._enqueue(lambda op_id: _Publish(op_id, batch))

    def applied(self, op_id: int) -> bool:
        """True once the write ``op_id`` (from :meth:`mark_published`) is committed, or will
        never be (the journal closed): reads of the outbox show it from then on."""
        with self._lock:
            return op_id not in self._open_ops or self._state == "closed"

    def mark_acked_through(self, seq: int) -> None:
        """The backend stored every event up to ``seq``: mark them acked (and published), so
        the size cap drops them first. Returns at once; applied by the writer."""
        self._enqueue(lambda op_id: _AckThrough(op_id, int(seq)))

    def _enqueue(self, make: Callable[[int], _WriteOp]) -> int:
        with self._lock:
            if self._state != "open":
                log.debug("journal not open; dropping a write op")
                return 0
            self._op_seq += 1
            self._ops.append(make(self._op_seq))
            self._open_ops.add(self._op_seq)
            self._work_gen += 1
            self._work.notify()
            return self._op_seq

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every event appended and every outbox/timing change made before this
        call is committed (or lost), and the size cap has seen those appends. True if so
        within ``timeout_s`` seconds."""
        end = time.monotonic() + timeout_s
        with self._lock:
            target_seq, target_op = self._next_seq - 1, self._op_seq
            target_kept = self._fast_total
            if self._kept_total < target_kept:
                self._keep_requested = True
                self._work_gen += 1
                self._work.notify()

            def done() -> bool:
                first = next(iter(self._pending), None)
                waiting_op = any(i <= target_op for i in self._open_ops)
                return (
                    (first is None or first > target_seq)
                    and not waiting_op
                    and self._kept_total >= target_kept
                )

            while not done():
                remaining = end - time.monotonic()
                if remaining <= 0 or self._state == "closed":
                    return False
                self._done.wait(remaining)
            return True

    def wait_durable(self, timeout_s: float = 5.0) -> bool:
        """Wait until every commit and spill made before this call has been fsynced. True if
        so within ``timeout_s`` seconds."""
        end = time.monotonic() + timeout_s
        with self._lock:
            cgen, sgen = self._commit_gen, self._spill_gen
            while self._synced_gen < cgen or self._spill_synced_gen < sgen:
                remaining = end - time.monotonic()
                if remaining <= 0 or self._state == "closed":
                    return False
                self._done.wait(remaining)
            return True

    @property
    def stats(self) -> JournalStats:
        """A snapshot of the counters (see :class:`JournalStats`)."""
        with self._lock:
            age = None
            if self._last_fsync is not None:
                age = (time.monotonic() - self._last_fsync) * 1000.0
            return JournalStats(
                appended=self._appended,
                committed=self._committed,
                transactions=self._commit_gen,
                spilled=self._spilled,
                lost=self._lost,
                dropped_by_cap=self._dropped_cap,
                dropped_disk_full=self._dropped_full,
                dropped_by_age=self._dropped_age,
                fsyncs=self._fsyncs,
                last_fsync_age_ms=age,
                fsync_max_ms=self._fsync_max_ms,
                rows=self._rows,
                pending=len(self._pending),
            )

    def _emit(self, code: str, detail: dict[str, Any]) -> None:
        if self._report is None:
            log.warning("journal %s: %s", code, detail)
            return
        log.debug("journal %s: %s", code, detail)
        try:
            self._report(code, detail)
        except Exception:
            # a failing reporter must not take the journal down with it
            log.exception("journal report callback failed for %s", code)

    # --- opening (runs in the writer thread) ------------------------------------------------

    def _writer_main(self) -> None:
        conns: tuple[sqlite3.Connection, sqlite3.Connection] | None = None
        try:
            try:
                conn, rconn, self._opened = self._open_database()
                conns = (conn, rconn)
            except BaseException as e:
                self._open_error = e
                return
            finally:
                self._ready.set()
            self._serve(conn, rconn)
        except BaseException as e:
            # never die silently: appends now spill at once, and the daemon hears of it
            log.critical("journal writer failed", exc_info=True)
            self._emit("journal_writer_failed", {"error": repr(e)})
        finally:
            self._writer_exit(conns)

    def _open_database(self) -> tuple[sqlite3.Connection, sqlite3.Connection, _Opened]:
        folder = self.path.parent
        if not folder.is_dir():
            raise JournalError(f"journal folder {folder} does not exist")
        hwm = self._read_hwm()
        try:
            spill = read_spill(self.spill_path)
        except OSError as e:
            raise JournalError(f"cannot read spill log {self.spill_path}: {e}") from e

        incident: tuple[str, dict[str, Any]] | None = None
        readable_max = 0
        if self.path.exists() and not self.path.is_dir():
            problem, readable_max = self._inspect()
            if problem is None and hwm and self.path.stat().st_size == 0:
                # SQLite takes a 0-byte file for a new empty database; the sidecar says rows
                # lived here, so rows were lost: report it and keep seq above the old ones
                problem = "empty file (0 bytes) where a journal with rows was"
            if problem is not None:
                moved = self._move_aside("damaged")
                incident = (
                    "journal_damaged",
                    {
                        "path": str(self.path),
                        "moved_to": str(moved),
                        "error": problem,
                        "readable_max_seq": readable_max,
                        "hwm": hwm,
                    },
                )
        elif hwm is not None:
            # the sidecar says a journal lived here: someone deleted it, or a card was swapped
            orphan = self._move_aside("orphan") if self._wal_leftovers() else None
            incident = (
                "journal_missing",
                {"path": str(self.path), "hwm": hwm, "moved_to": str(orphan) if orphan else None},
            )

        conn = self._connect()
        rconn: sqlite3.Connection | None = None
        try:
            db_max = conn.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM events), 0),"
                " coalesce((SELECT max(to_seq) FROM gaps), 0))"
            ).fetchone()[0]
            rows = conn.execute("SELECT count(*) FROM events").fetchone()[0]
            base = max(int(db_max), spill.max_seq, hwm or 0)
            if incident is not None:
                base = max(max(readable_max, hwm or 0, int(db_max)) + HWM_MARGIN, spill.max_seq)
                incident[1]["next_seq"] = base + 1
                # What the lost file held is gone with it, and which of its seqs the back
                # office stored is not known here: one gap record over every seq up to the new
                # start (count 0: unknown) lets the back office's contiguous ack move on; the
                # seqs it holds stay stored, the others show as lost to this incident.
                conn.execute(
                    "INSERT INTO gaps (from_seq, to_seq, count, reason, wall_ns) "
                    "VALUES (1, ?, 0, ?, ?)",
                    (base, incident[0], self._wall()),
                )
            self._next_seq = base + 1
            self._rows = int(rows)
            if incident is not None:
                self._write_hwm(force=True)
            try:
                self._spill.open()
            except OSError as e:
                # without a spill log the journal still works; only the fallback is gone
                log.error("spill log %s unavailable: %s", self.spill_path, e)
                self._emit("journal_error", {"error": f"spill log unavailable: {e}"})
            rconn = self._connect_reader()
            self._shm_fd = self._open_shm()
            # a fresh WAL's first commit writes and fsyncs its header: let it be this one
            self._prime_wal(conn)
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")
            cursor = conn.cursor()
        except BaseException:
            if rconn is not None:
                rconn.close()
            conn.close()
            if self._shm_fd is not None:
                # after the connections, see _writer_exit
                os.close(self._shm_fd)
                self._shm_fd = None
            raise
        for stored in spill.events:
            item = _Item(stored, row_params(stored))
            item.spilled = True
            self._pending[stored.seq] = item
        self._spill_outstanding = len(self._pending)  # a seq twice in the log counts once
        if spill.events:
            self._spilling = True
        elif spill.size:
            # only torn or damaged lines: nothing to move, the log may go at the next fsync
            self._spill_clear_gen = 0
        self._conn, self._cursor = conn, cursor
        return conn, rconn, _Opened(incident, spill.bad_lines)

    def _inspect(self) -> tuple[str | None, int]:
        """(what is wrong with the existing file or None, highest seq still readable)."""
        try:
            conn = sqlite3.connect(self.path, timeout=OPEN_BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        try:
            try:
                rows = conn.execute("PRAGMA quick_check").fetchall()
                if rows != [("ok",)]:
                    problem: str | None = "quick_check: " + "; ".join(str(r[0]) for r in rows[:5])
                else:
                    problem = self._schema_problem(conn)
            except sqlite3.DatabaseError as e:
                code = errcode(e)
                if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise JournalError(
                        f"journal {self.path} is locked by another process: {e}"
                    ) from e
                if code == _SQLITE_CANTOPEN:
                    raise JournalError(f"cannot open journal {self.path}: {e}") from e
                problem = f"{getattr(e, 'sqlite_errorname', type(e).__name__)}: {e}"
            if problem is None:
                return None, 0
            readable = 0
            for query in ("SELECT max(seq) FROM events", "SELECT max(to_seq) FROM gaps"):
                with contextlib.suppress(sqlite3.Error, TypeError, ValueError):
                    readable = max(readable, int(conn.execute(query).fetchone()[0] or 0))
            return problem, readable
        finally:
            conn.close()

    @staticmethod
    def _schema_problem(conn: sqlite3.Connection) -> str | None:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return None  # an empty database: the schema is created next
        if not {"events", "gaps", "meta"} <= tables:
            return f"not a qrgate journal (tables: {', '.join(sorted(tables))})"
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None or str(row[0]) != str(SCHEMA_VERSION):
            # a newer firmware's journal after a rollback: this build cannot write it safely
            return f"schema version {row[0] if row else None}, this build knows {SCHEMA_VERSION}"
        return None

    def _wal_leftovers(self) -> bool:
        return any(Path(f"{self.path}{s}").exists() for s in ("-wal", "-shm"))

    def _move_aside(self, kind: str) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall() / 1e9))
        target = self.path.with_name(f"{self.path.name}.{kind}-{stamp}")
        n = 1
        while any(Path(f"{target}{s}").exists() for s in ("", "-wal", "-shm")):
            n += 1
            target = self.path.with_name(f"{self.path.name}.{kind}-{stamp}-{n}")
        try:
            for suffix in ("", "-wal", "-shm"):
                src = Path(f"{self.path}{suffix}")
                if src.exists():
                    os.replace(src, f"{target}{suffix}")
            fsync_dir(self.path.parent)
        except OSError as e:
            raise JournalError(f"cannot move damaged journal {self.path} aside: {e}") from e
        return target

    def _connect(self) -> sqlite3.Connection:
        try:
            # appends use it from their own threads, always holding _wlock
            conn = sqlite3.connect(
                self.path,
                timeout=OPEN_BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as e:
            raise JournalError(f"cannot create journal {self.path}: {e}") from e
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise JournalError(f"journal {self.path} refuses WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            # an automatic checkpoint would run inside an append's COMMIT, with its fsyncs:
            # the writer thread checkpoints instead (_maintain_wal)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            has_schema = conn.execute(
                "SELECT count(*) FROM sqlite_master WHERE name = 'meta'"
            ).fetchone()[0]
            if not has_schema:
                conn.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
                fsync_dir(self.path.parent)
            self._page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
            conn.execute(f"PRAGMA busy_timeout={WRITER_BUSY_TIMEOUT_MS}")
            if self._on_connect is not None:
                self._on_connect(conn)
        except sqlite3.Error as e:
            conn.close()
            raise JournalError(f"cannot create journal {self.path}: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn

    def _connect_reader(self) -> sqlite3.Connection:
        """The writer thread's second connection, for outbox reads and checkpoints: in WAL
        mode both run beside the writer connection without its lock or the writer mutex.
        It never writes rows."""
        try:
            conn = sqlite3.connect(self.path, timeout=READ_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        try:
            # a checkpoint fsyncs the WAL before and the database after it
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            conn.close()
            raise JournalError(f"cannot open journal {self.path}: {e}") from e
        return conn

    def _open_shm(self) -> int | None:
        try:
            return os.open(f"{self.path}-shm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.info("no wal-index to read (%s): checkpoints go by transaction count", e)
            return None

    # --- the writer loop ----------------------------------------------------------------

    def _serve(self, conn: sqlite3.Connection, rconn: sqlite3.Connection) -> None:
        backoff = 0.0
        retry_at = 0.0
        last_gen = -1
        closing_deadline: float | None = None
        kept_at = time.monotonic()
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    if self._state == "closing" and closing_deadline is None:
                        closing_deadline = now + CLOSE_GRACE_S
                    has_work = bool(self._pending) or bool(self._ops)
                    unkept = self._fast_total - self._kept_total
                    if closing_deadline is not None and (
                        now >= closing_deadline or not (has_work or unkept)
                    ):
                        return
                    ready = backoff == 0.0 or self._work_gen != last_gen or now >= retry_at
                    keep_due = unkept > 0 and (
                        unkept >= HOUSEKEEPING_EVERY
                        or self._keep_requested
                        or closing_deadline is not None
                        or now >= kept_at + HOUSEKEEPING_IDLE_S
                    )
                    age_due = (
                        self._max_age_ns is not None
                        and closing_deadline is None
                        and now >= self._age_at
                    )
                    if ready and (has_work or keep_due or age_due):
                        break
                    timeout: float | None = None
                    if not ready:
                        timeout = retry_at - now
                    elif unkept:
                        timeout = kept_at + HOUSEKEEPING_IDLE_S - now
                    if self._max_age_ns is not None and ready:
                        left = max(0.0, self._age_at - now)
                        timeout = left if timeout is None else min(timeout, left)
                    if closing_deadline is not None:
                        left = closing_deadline - now
                        timeout = left if timeout is None else min(timeout, left)
                    self._work.wait(timeout)
                last_gen = self._work_gen
            outcome = self._round(conn, rconn)
            kept_at = time.monotonic()
            for code, detail in outcome.reports:
                self._emit(code, detail)
            if outcome.ok:
                backoff = 0.0
                self._error_episode = self._full_episode = False
            elif closing_deadline is not None and not outcome.busy:
                return  # a full or failing disk will not heal within the close grace
            else:
                backoff = min(max(backoff * 2, RETRY_MIN_S), RETRY_MAX_S)
                retry_at = time.monotonic() + backoff

    def _round(self, conn: sqlite3.Connection, rconn: sqlite3.Connection) -> _Outcome:
        """One writer round: queued events and outbox/timing changes in one transaction, the
        size cap for the appends committed in their callers' threads, then (without the
        mutex) the outbox reads and WAL upkeep."""
        with self._wlock, self._writer_busy(conn):
            with self._lock:
                items = list(itertools.islice(self._pending.values(), DRAIN_CHUNK))
                ops, self._ops = self._ops, []
                self._keep_requested = False
            # every append so far committed before this point: the cap below covers them
            fast_total = self._fast_total
            write_ops = [o for o in ops if not isinstance(o, _ReadUnpublished)]
            out = self._attempt(conn, items, write_ops)
            if (
                fast_total != self._kept_total
                and out.ok
                and (out.capped or self._cap_bytes(conn, out))
            ):
                self._kept_total = fast_total
            if out.ok and self._max_age_ns is not None and time.monotonic() >= self._age_at:
                self._age_at = time.monotonic() + AGE_CHECK_S
                self._enforce_age(conn, out)
            self._apply(out)
        for op in ops:
            if isinstance(op, _ReadUnpublished):
                self._serve_read(rconn, op)
        self._maintain_wal(conn, rconn)
        return out

    @contextlib.contextmanager
    def _writer_busy(self, conn: sqlite3.Connection) -> Iterator[None]:
        """The writer's short busy timeout while it holds _wlock; appends' on release."""
        conn.execute(f"PRAGMA busy_timeout={WRITER_BUSY_TIMEOUT_MS}")
        try:
            yield
        finally:
            conn.execute(f"PRAGMA busy_timeout={self._busy_ms}")

    def _cap_bytes(self, conn: sqlite3.Connection, out: _Outcome) -> bool:
        """Apply the byte cap after appends committed in their callers' threads (the row cap
        never needs it: an append at the row limit goes through the writer). True once the
        cap holds; False when it still does not after CAP_TXNS transactions (the idle round
        goes on) or the database refused (``out`` marked failed)."""
        try:
            for _ in range(CAP_TXNS):
                pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
                if pages * self._page_size <= self._max_bytes:
                    return True
                # the file keeps freed pages: only the used ones count
                free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if (pages - free) * self._page_size <= self._max_bytes:
                    return True
                rows = self._rows
                self._txn(conn, [], [], out)
                if self._rows == rows:
                    return True  # nothing left that the cap may drop
        except sqlite3.Error as e:
            self._rollback(conn)
            out.ok = False
            out.busy = errcode(e) in (_SQLITE_BUSY, _SQLITE_LOCKED)
            log.debug("size cap deferred: %s", e)
        return False

    def _attempt(
        self, conn: sqlite3.Connection, items: list[_Item], write_ops: list[_WriteOp]
    ) -> _Outcome:
        out = _Outcome()
        if items or write_ops:
            try:
                out.deferred += self._txn(conn, items, write_ops, out).deferred
                out.committed += items
                out.done_ops += write_ops
            except sqlite3.Error as e:
                self._rollback(conn)
                code = errcode(e)
                if code in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    out.ok = False
                    out.busy = True
                    out.retry_ops += write_ops
                elif code == _SQLITE_FULL:
                    self._on_full(conn, items, write_ops, e, out)
                else:
                    out.ok = False
                    out.failed += items
                    out.retry_ops += write_ops
                    if not self._error_episode:
                        # once per episode: the writer retries every 0.5 s at most
                        self._error_episode = True
                        out.reports.append(
                            ("journal_error", {"error": str(e), "code": code, "events": len(items)})
                        )
        return out

    # --- WAL upkeep (writer thread) ------------------------------------------------------

    def _wal_frames(self) -> tuple[int, int] | None:
        """(frames in the WAL, frames of them already in the database) from the wal-index
        header, or None when it cannot be read. A lock-free read: good for deciding when to
        checkpoint, not for anything that must be exact."""
        fd = self._shm_fd
        if fd is None:
            return None
        try:
            head = os.pread(fd, _SHM_NBACKFILL_AT + 4, 0)
        except OSError:
            return None
        if len(head) < _SHM_NBACKFILL_AT + 4:
            return None
        mx = _SHM_U32.unpack_from(head, _SHM_MXFRAME_AT)[0]
        return int(mx), int(_SHM_U32.unpack_from(head, _SHM_NBACKFILL_AT)[0])

    def _maintain_wal(self, conn: sqlite3.Connection, rconn: sqlite3.Connection) -> None:
        """Checkpoint once the WAL has grown, off the append path, and restart it."""
        frames = self._wal_frames()
        if frames is None:
            if self._commit_gen - self._ckpt_gen >= CHECKPOINT_FALLBACK_TXNS:
                self._ckpt_gen = self._commit_gen
                if self._checkpoint(rconn):
                    with self._wlock:
                        self._prime_wal(conn)
            return
        mx, backfill = frames
        if mx < CHECKPOINT_FRAMES:
            return
        now = time.monotonic()
        if backfill >= mx:
            # checkpointed, yet not restarted: the restart commit failed (a lock, a full disk)
            if now >= self._ckpt_retry_at:
                self._ckpt_retry_at = now + CHECKPOINT_RETRY_S
                with self._wlock:
                    self._prime_wal(conn)
            return
        if mx - backfill < CHECKPOINT_FRAMES and now < self._ckpt_retry_at:
            return  # only what a commit racing the last checkpoint left: not every round
        self._ckpt_retry_at = now + CHECKPOINT_RETRY_S
        if not self._checkpoint(rconn):
            return  # a reader's snapshot holds part of the WAL: later
        with self._wlock:
            mx, backfill = self._wal_frames() or (mx, backfill)
            if backfill < mx and mx >= CHECKPOINT_HARD_FRAMES:
                # commits keep outrunning the checkpoint: finish the few frames they added
                # holding the mutex, so the WAL stays bounded
                self._checkpoint(rconn)
            self._prime_wal(conn)

    @staticmethod
    def _checkpoint(rconn: sqlite3.Connection) -> bool:
        """A PASSIVE checkpoint: copies what it can, waits for no lock, and lets commits go
        on meanwhile. True when it copied every frame it saw (commits made while it ran may
        remain); False when a reader's snapshot or another checkpoint held some back, or on
        an error."""
        try:
            busy, wal_frames, done = rconn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as e:
            log.warning("journal checkpoint failed: %s", e)
            return False
        return bool(busy == 0 and wal_frames == done)

    def _prime_wal(self, conn: sqlite3.Connection) -> None:
        """Make the first commit into an empty or fully checkpointed WAL (caller holds _wlock
        or is alone on the connection).

        That commit restarts the WAL from its beginning and, with synchronous=NORMAL, fsyncs
        the new WAL header: one fsync that would otherwise land in the next append. Skipped
        when a commit already did it; a failure (a locked or full database) only means the
        next append pays that fsync.
        """
        frames = self._wal_frames()
        if frames is not None and frames[0] != frames[1]:
            return
        try:
            with self._writer_busy(conn):
                conn.execute(_WAL_RESET, (str(self._wall()),))
        except sqlite3.Error as e:
            self._rollback(conn)
            log.debug("WAL restart commit skipped: %s", e)

    def _on_full(
        self,
        conn: sqlite3.Connection,
        items: list[_Item],
        write_ops: list[_WriteOp],
        error: sqlite3.Error,
        out: _Outcome,
    ) -> None:
        """The batch failed with SQLITE_FULL: make room by the drop policy and retry, but never
        drop rows for an event that already failed this way (it is likely too big to fit)."""
        detail: dict[str, Any] = {"error": str(error), "events": len(items), "dropped": 0}
        fresh = [it for it in items if not it.full_strikes]
        struck = [it for it in items if it.full_strikes]
        done = False
        if struck and (fresh or write_ops):
            done = self._try(conn, fresh, write_ops, out)  # maybe only the struck ones were big
        if not done and (fresh or write_ops):
            try:
                free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
                if free == 0 and self._rows > 0:
                    n = max(1, min(self._rows // 10, DROP_CHUNK))
                    tx = self._txn(conn, [], [], out, drop=(n, "disk_full"))
                    detail["dropped"] = tx.deleted_full
                    detail["drops"] = tx.drops
            except sqlite3.Error as e:
                self._rollback(conn)
                detail["drop_error"] = str(e)
            done = self._try(conn, fresh, write_ops, out)
            if not done:
                # one by one, so one event that cannot fit does not hold back the others
                for item in fresh:
                    self._try(conn, [item], [], out)
                if write_ops and not self._try(conn, [], write_ops, out):
                    out.retry_ops += write_ops
        for item in struck:
            self._try(conn, [item], [], out)
        landed = {id(it) for it in out.committed}
        stuck = [it for it in items if id(it) not in landed]
        for item in stuck:
            item.full_strikes += 1
        out.failed += stuck
        out.ok = not stuck
        detail["failed_events"] = len(stuck)
        self._report_full(detail, out)

    def _try(
        self, conn: sqlite3.Connection, items: list[_Item], write_ops: list[_WriteOp], out: _Outcome
    ) -> bool:
        """One transaction; on success record it in ``out``; False (rolled back) on error."""
        try:
            out.deferred += self._txn(conn, items, write_ops, out).deferred
        except sqlite3.Error:
            self._rollback(conn)
            return False
        out.committed += items
        out.done_ops += write_ops
        return True

    def _report_full(self, detail: dict[str, Any], out: _Outcome) -> None:
        # every drop is news; a disk that stays full is reported once, not on every retry
        if detail["dropped"] or not self._full_episode:
            out.reports.append(("journal_full", detail))
        self._full_episode = True

    def _txn(
        self,
        conn: sqlite3.Connection,
        items: list[_Item],
        write_ops: list[_WriteOp],
        out: _Outcome,
        *,
        drop: tuple[int, str] | None = None,
        drop_old: tuple[int, int] | None = None,
    ) -> _Tx:
        """One write transaction: optional drop, inserts, outbox/timing updates, size cap.
        Raises sqlite3.Error (the caller rolls back); counters move only on commit."""
        tx = _Tx()
        conn.execute("BEGIN IMMEDIATE")
        if drop is not None:
            self._drop_oldest(conn, drop[0], drop[1], tx)
        if drop_old is not None:
            tx.age_last = self._drop_old(conn, drop_old[0], drop_old[1], tx)
        if items:
            tx.inserted = conn.executemany(_INSERT, [it.params for it in items]).rowcount
        for op in write_ops:
            if isinstance(op, _Timing):
                cur = conn.execute(
                    "UPDATE events SET frame_to_relay_ms = ? WHERE seq = ?", (op.ms, op.seq)
                )
                if cur.rowcount == 0:
                    tx.deferred.append(op)
            elif isinstance(op, _Publish):
                conn.executemany(
                    "UPDATE events SET published = 1 WHERE seq = ? AND published = 0",
                    [(s,) for s in op.seqs],
                )
            else:
                conn.execute(
                    "UPDATE events SET acked = 1, published = 1 WHERE acked = 0 AND seq <= ?",
                    (op.seq,),
                )
        capped = drop is None and self._enforce_cap(conn, tx)
        conn.execute("COMMIT")
        out.capped = capped
        self._rows += tx.inserted - tx.deleted_cap - tx.deleted_full - tx.deleted_age
        self._dropped_age += tx.deleted_age
        self._committed += tx.inserted
        self._dropped_cap += tx.deleted_cap
        self._dropped_full += tx.deleted_full
        out.commits += 1
        for d in tx.drops:
            if d["unacked"]:
                out.reports.append(("journal_dropped", d))
        return tx

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("journal rollback failed")

    def _enforce_cap(self, conn: sqlite3.Connection, tx: _Tx) -> bool:
        """Drop rows for the size cap in ``tx``; True when the byte cap is seen to hold (False
        after four drops: the writer goes on in further transactions)."""
        rows = self._rows + tx.inserted - tx.deleted_cap
        if rows > self._max_rows:
            slack = max(1, min(self._max_rows // 10, DROP_CHUNK))
            self._drop_oldest(conn, rows - self._max_rows + slack, "cap_rows", tx)
        for _ in range(4):
            pages = int(conn.execute("PRAGMA page_count").fetchone()[0])
            if pages * self._page_size <= self._max_bytes:
                return True  # the common case: one cheap header read
            free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
            rows = self._rows + tx.inserted - tx.deleted_cap
            if (pages - free) * self._page_size <= self._max_bytes or rows <= 0:
                return True
            self._drop_oldest(conn, max(1, min(rows // 10, DROP_CHUNK)), "cap_bytes", tx)
        return False

    def _drop_oldest(self, conn: sqlite3.Connection, n: int, reason: str, tx: _Tx) -> None:
        """Delete the ``n`` oldest rows, acked first, then published, then unsent (see
        :meth:`_drop`)."""
        victims: list[int] = []
        unacked: list[int] = []
        for acked, published in ((1, 1), (0, 1), (0, 0)):
            need = n - len(victims)
            if need <= 0:
                break
            got = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM events WHERE acked = ? AND published = ? ORDER BY seq LIMIT ?",
                    (acked, published, need),
                )
            ]
            victims += got
            if not acked:
                unacked += got
        if len(victims) < n:
            # rows outside the three states (acked but never published: not made by this
            # code) go last
            chosen = set(victims)
            extra = [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM events ORDER BY seq LIMIT ?", (n + len(victims),)
                )
                if r[0] not in chosen
            ]
            victims += extra[: n - len(victims)]
        self._drop(conn, victims, unacked, reason, tx)

    def _drop(
        self,
        conn: sqlite3.Connection,
        victims: list[int],
        unacked: list[int],
        reason: str,
        tx: _Tx,
    ) -> None:
        """Delete rows ``victims`` in ``tx``; record each run of the ``unacked`` ones (a
        subset: rows the back office has not acknowledged) in ``gaps``. Rows the back office
        acknowledged need no gap record: it holds them."""
        if not victims:
            return
        conn.executemany("DELETE FROM events WHERE seq = ?", [(s,) for s in sorted(victims)])
        runs = self._runs(conn, sorted(unacked)) if unacked else []
        wall = self._wall()
        conn.executemany(
            "INSERT INTO gaps (from_seq, to_seq, count, reason, wall_ns) VALUES (?, ?, ?, ?, ?)",
            [(first, last, count, reason, wall) for first, last, count in runs],
        )
        tx.drops.append(
            {"reason": reason, "count": len(victims), "unacked": len(unacked), "runs": runs}
        )
        if reason == "disk_full":
            tx.deleted_full += len(victims)
        elif reason == "max_age":
            tx.deleted_age += len(victims)
        else:
            tx.deleted_cap += len(victims)

    def _enforce_age(self, conn: sqlite3.Connection, out: _Outcome) -> None:
        """Delete rows older than the age limit, oldest first, at most AGE_PAGES pages of
        DROP_CHUNK rows per call (the next look goes on). Only rows stamped by a synced clock
        count, and only while the clock is trusted now: a Pi without a real-time clock boots
        in the past and may jump years ahead, and an age limit must never empty the journal
        because of that. Unacknowledged rows that go leave a gap record (reason "max_age").
        A failed transaction is rolled back and left to the next look."""
        wall = self._trusted_wall() if self._trusted_wall is not None else self._wall()
        if wall is None or self._max_age_ns is None:
            return
        cutoff = wall - self._max_age_ns
        after = 0
        for _ in range(AGE_PAGES):
            try:
                tx = self._txn(conn, [], [], out, drop_old=(after, cutoff))
            except sqlite3.Error as e:
                self._rollback(conn)
                log.debug("age limit deferred: %s", e)
                return
            if tx.age_last is None:
                return
            after = tx.age_last

    def _drop_old(
        self, conn: sqlite3.Connection, after: int, cutoff_ns: int, tx: _Tx
    ) -> int | None:
        """Delete the rows of the page of DROP_CHUNK rows after seq ``after`` stamped by a
        synced clock before ``cutoff_ns``; the page's last seq, or None when the page reached
        a young row (or the end): nothing past it is old enough."""
        page = conn.execute(
            "SELECT seq, wall_ns, clock_synced, acked FROM events WHERE seq > ? ORDER BY seq "
            "LIMIT ?",
            (after, DROP_CHUNK),
        ).fetchall()
        victims: list[int] = []
        unacked: list[int] = []
        young = len(page) < DROP_CHUNK
        for seq, wall_ns, synced, acked in page:
            if not synced:
                continue  # no trustworthy age: the size cap takes it in its turn
            if wall_ns >= cutoff_ns:
                young = True  # seq order is time order for synced rows, near enough
                break
            victims.append(seq)
            if not acked:
                unacked.append(seq)
        self._drop(conn, victims, unacked, "max_age", tx)
        return None if young or not page else int(page[-1][0])

    @staticmethod
    def _runs(conn: sqlite3.Connection, victims: list[int]) -> list[tuple[int, int, int]]:
        """Split sorted deleted seqs into runs no surviving row lies inside."""
        runs: list[tuple[int, int, int]] = []
        first = prev = victims[0]
        count = 1
        for s in victims[1:]:
            if (
                s != prev + 1
                and conn.execute(
                    "SELECT 1 FROM events WHERE seq > ? AND seq < ? LIMIT 1", (prev, s)
                ).fetchone()
            ):
                runs.append((first, prev, count))
                first, count = s, 0
            prev = s
            count += 1
        runs.append((first, prev, count))
        return runs

    def _serve_read(self, conn: sqlite3.Connection, op: _ReadUnpublished) -> None:
        try:
            rows = conn.execute(
                f"{SELECT_EVENTS} WHERE acked = 0 AND published = 0 ORDER BY seq LIMIT ?",
                (op.limit,),
            ).fetchall()
            op.result = read_rows(rows)[0]
        except sqlite3.Error as e:
            op.error = str(e)
        op.done.set()

    def _apply(self, out: _Outcome) -> None:
        """Publish a writer round's outcome to the waiting threads."""
        with self._lock:
            for item in out.committed:
                if item.state is _PENDING:
                    item.state = _COMMITTED
                    if item.spilled:
                        self._spill_outstanding -= 1
                self._pending.pop(item.stored.seq, None)
            for item in out.failed:
                item.failed = True
            for op in out.done_ops:
                self._open_ops.discard(op.op_id)
            keep: list[_Op] = list(out.retry_ops)
            for t in out.deferred:
                if t.seq in self._pending:
                    keep.append(t)  # its event is not in yet: apply after it lands
                else:
                    self._open_ops.discard(t.op_id)
            if keep:
                self._ops[:0] = keep
            if out.commits:
                self._commit_gen += out.commits
                self._sync_wake.set()
                if self._spill_outstanding == 0 and self._spill.size:
                    self._spill_clear_gen = self._commit_gen
            self._done.notify_all()

    def _writer_exit(self, conns: tuple[sqlite3.Connection, sqlite3.Connection] | None) -> None:
        reports: list[tuple[str, dict[str, Any]]] = []
        with self._wlock:  # an append in the middle of its commit finishes first
            with self._lock:
                self._writer_dead = True
                if conns is not None:
                    # still pending after the close grace (a lock held through it): keep them
                    # in the spill log for the next start
                    for item in list(self._pending.values()):
                        if item.state is _PENDING and not item.spilled:
                            _, report = self._spill_locked(item, "closing")
                            if report is not None:
                                reports.append(report)
                        item.failed = True
                for op in self._ops:
                    if isinstance(op, _ReadUnpublished):
                        op.error = "journal closed"
                        op.done.set()
                self._done.notify_all()
            self._conn = self._cursor = None
        for report in reports:
            self._emit(*report)
        if conns is not None:
            self._sync_once()
            for conn in conns:
                try:
                    conn.close()
                except sqlite3.Error:
                    log.exception("closing a journal connection failed")
        if self._shm_fd is not None:
            # only now: closing any descriptor of the -shm file drops every POSIX lock this
            # process holds on it, SQLite's included, while a connection is open
            os.close(self._shm_fd)
            self._shm_fd = None

    # --- group fsync and the seq high-water mark (sync thread) -------------------------------

    def _syncer_main(self) -> None:
        # Woken by commits rather than run on a fixed tick: an fsync of the WAL stalls a
        # concurrent write() into it for milliseconds (the filesystem's journal), and on a fixed
        # tick that lands on the next scan's commit, on the door's critical path. Right after a
        # scan's commits the next scan is far away. SYNC_COALESCE_S gathers a scan's rows (the
        # event, then its timing) into one fsync; SYNC_MIN_GAP_S bounds the fsync rate under
        # load. A commit is on disk within coalesce + gap + one fsync, below fsync_interval.
        last = 0.0
        while not self._sync_stop.is_set():
            woke = self._sync_wake.wait(self._fsync_interval)
            if self._sync_stop.is_set():
                break
            if woke:
                gap = max(SYNC_COALESCE_S, last + SYNC_MIN_GAP_S - time.monotonic())
                if self._sync_stop.wait(min(gap, self._fsync_interval)):
                    break
                self._sync_wake.clear()
            last = time.monotonic()
            try:
                self._sync_once()
                with self._sync_lock:
                    self._write_hwm(force=False)
            except Exception:
                log.exception("journal sync failed")

    def _sync_once(self) -> bool:
        """fsync the WAL and the spill log if anything was written since the last time."""
        with self._sync_lock:
            with self._lock:
                cgen, sgen = self._commit_gen, self._spill_gen
                wal_due = cgen != self._synced_gen
                spill_due = sgen != self._spill_synced_gen
            if not wal_due and not spill_due:
                return False
            t0 = time.monotonic()
            try:
                if wal_due:
                    self._fsync_wal()
                if spill_due:
                    self._spill.fsync()
            except OSError as e:
                if not self._sync_error_reported:
                    self._sync_error_reported = True
                    self._emit("journal_error", {"error": f"fsync failed: {e}"})
                return False
            t1 = time.monotonic()
            with self._lock:
                self._synced_gen, self._spill_synced_gen = cgen, sgen
                self._fsyncs += 1
                self._last_fsync = t1
                self._fsync_max_ms = max(self._fsync_max_ms, (t1 - t0) * 1000.0)
                clear = self._spill_clear_gen
                if (
                    clear is not None
                    and cgen >= clear
                    and self._spill_outstanding == 0
                    and self._spill.is_open
                ):
                    try:
                        self._spill.truncate()
                        self._spill_clear_gen = None
                        self._spilling = False
                    except OSError as e:
                        log.error("cannot empty spill log %s: %s", self.spill_path, e)
                self._done.notify_all()
            return True

    def _fsync_wal(self) -> None:
        wal = f"{self.path}-wal"
        try:
            st = os.stat(wal)
        except FileNotFoundError:
            return
        ident = (st.st_dev, st.st_ino)
        if self._wal_fd is None or ident != self._wal_ident:
            if self._wal_fd is not None:
                os.close(self._wal_fd)
                self._wal_fd = None
            try:
                self._wal_fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return
            self._wal_ident = ident
            # a new WAL file also needs its directory entry on disk
            fsync_dir(self.path.parent)
        os.fsync(self._wal_fd)

    def _read_hwm(self) -> int | None:
        try:
            return int(self.hwm_path.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None

    def _write_hwm(self, *, force: bool) -> None:
        """Persist the highest seq handed out (caller holds ``_sync_lock`` or is alone)."""
        with self._lock:
            value = self._next_seq - 1
        now = time.monotonic()
        if value <= self._hwm_written and not force:
            return
        if not force and value - self._hwm_written < HWM_STEP and now - self._hwm_at < HWM_PERIOD_S:
            return
        tmp = self.hwm_path.with_name(self.hwm_path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{value}\n".encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.hwm_path)
            fsync_dir(self.hwm_path.parent)
        except OSError as e:
            log.error("cannot write seq high-water mark %s: %s", self.hwm_path, e)
            return
        self._hwm_written, self._hwm_at = value, now
