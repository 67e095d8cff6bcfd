"""The back office's event store: one schema in SQLite (embedded default) or PostgreSQL.

:func:`open_store` takes a file path (SQLite) or a ``postgresql://`` URL (psycopg 3). Several
ingest workers, in several processes or on several machines, may write one store at once: the
acknowledgement of a device is computed inside the transaction that stores its events, from
what the store holds, while that transaction holds the device's row lock (PostgreSQL: the
``devices`` upsert locks the row; SQLite: ``BEGIN IMMEDIATE`` takes the database write lock).
So the last of two concurrent transactions for a device sees the other's rows, and no ack
ever covers a seq that is not committed.

Schema (``SCHEMA_VERSION`` 1; integers are BIGINT, times are ns since the epoch):

- ``events``: one row per (device, event_id) — the journal row as sent, plus ``site`` and
  ``received_ns`` (the worker's clock); ``codes`` and ``detail`` as JSON text.
- ``reader_gaps``: gap records as sent, one per (device, from_seq, to_seq).
- ``coverage``: per device, merged runs ``lo..hi`` of seqs that are stored or covered by a gap
  record. The ack is ``hi`` of the run starting at seq 1 (0 when there is none).
- ``missing``: per device, the holes from seq 1 up to the highest seq covered (seqs neither
  stored nor covered by a gap record), with the time the hole was first seen
  (``detected_ns``, kept while the hole shrinks). Coverage and holes are updated in place
  with a few index lookups per new run, however many holes a device has.
- ``devices``: per device, ``site`` (where acks go), ``ack_seq``, ``ack_sent`` (the highest
  ack a worker saw the broker accept), ``max_seq``, ``events`` (rows stored), first/last seen.
- ``statuses``: the latest status per device (birth fields; a last will only flips
  ``online`` and keeps what the birth said), with the whole payload as JSON text.
- ``meta``: ``schema_version``.
"""

from __future__ import annotations

import random
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from firmware.backoffice.records import EventBatch, GapRecord, StatusRecord
from firmware.exceptions import BadMessageError, StoreError

SCHEMA_VERSION = 1
DEFAULT_BUSY_TIMEOUT_S = 30.0
POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_PG_CONNECT_TIMEOUT_S = 10
# Any constant works: it only has to be the same for every worker creating the schema.
_PG_SCHEMA_LOCK = 0x7172_6761_7465
_SQLITE_BUSY_CODES = (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
_BUSY_PAUSE_MIN_S = 0.0002
_BUSY_PAUSE_MAX_S = 0.002
_T = TypeVar("_T")

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS devices (
        device TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        ack_seq BIGINT NOT NULL DEFAULT 0,
        ack_sent BIGINT NOT NULL DEFAULT 0,
        max_seq BIGINT NOT NULL DEFAULT 0,
        events BIGINT NOT NULL DEFAULT 0,
        first_ns BIGINT NOT NULL,
        last_ns BIGINT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS events (
        device TEXT NOT NULL,
        event_id TEXT NOT NULL,
        site TEXT NOT NULL,
        seq BIGINT NOT NULL,
        kind TEXT NOT NULL,
        boot_id TEXT NOT NULL,
        wall_ns BIGINT NOT NULL,
        clock_synced BOOLEAN NOT NULL,
        mono_ns BIGINT NOT NULL,
        door TEXT NOT NULL,
        direction TEXT NOT NULL,
        decision TEXT,
        reason TEXT NOT NULL,
        credential_kind TEXT,
        subject TEXT,
        codes TEXT NOT NULL,
        decode_ms DOUBLE PRECISION,
        verdict_ms DOUBLE PRECISION,
        frame_to_relay_ms DOUBLE PRECISION,
        detail TEXT NOT NULL,
        received_ns BIGINT NOT NULL,
        PRIMARY KEY (device, event_id)
    )""",
    "CREATE INDEX IF NOT EXISTS events_device_seq ON events (device, seq)",
    "CREATE INDEX IF NOT EXISTS events_wall ON events (wall_ns)",
    """CREATE TABLE IF NOT EXISTS reader_gaps (
        device TEXT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        seq BIGINT NOT NULL,
        count BIGINT NOT NULL,
        reason TEXT NOT NULL,
        wall_ns BIGINT,
        received_ns BIGINT NOT NULL,
        PRIMARY KEY (device, from_seq, to_seq)
    )""",
    """CREATE TABLE IF NOT EXISTS coverage (
        device TEXT NOT NULL,
        lo BIGINT NOT NULL,
        hi BIGINT NOT NULL,
        PRIMARY KEY (device, lo)
    )""",
    """CREATE TABLE IF NOT EXISTS missing (
        device TEXT NOT NULL,
        from_seq BIGINT NOT NULL,
        to_seq BIGINT NOT NULL,
        detected_ns BIGINT NOT NULL,
        PRIMARY KEY (device, from_seq)
    )""",
    """CREATE TABLE IF NOT EXISTS statuses (
        device TEXT PRIMARY KEY,
        site TEXT NOT NULL,
        online BOOLEAN NOT NULL,
        door TEXT,
        version TEXT,
        boot_id TEXT,
        backlog BIGINT,
        clock_synced BOOLEAN,
        last_scan_wall_ns BIGINT,
        wall_ns BIGINT,
        payload TEXT NOT NULL,
        received_ns BIGINT NOT NULL
    )""",
)

_EVENT_COLUMNS = (
    "device", "event_id", "site", "seq", "kind", "boot_id", "wall_ns", "clock_synced",
    "mono_ns", "door", "direction", "decision", "reason", "credential_kind", "subject",
    "codes", "decode_ms", "verdict_ms", "frame_to_relay_ms", "detail", "received_ns",
)  # fmt: skip
_INSERT_HOLE = "INSERT INTO missing (device, from_seq, to_seq, detected_ns) VALUES (?, ?, ?, ?)"
_GAP_COLUMNS = (
    "device", "from_seq", "to_seq", "seq", "count", "reason", "wall_ns", "received_ns",
)  # fmt: skip
_ROWS_PER_INSERT = 500
"""Rows per multi-row INSERT: 500 x 21 parameters stays under SQLite's 32,766."""
# The DO UPDATE is what locks the device's row in PostgreSQL (an existing row is updated, a
# concurrent insert of a new one waits for the first): every later statement of the
# transaction then sees every commit for this device made before the lock was granted.
_LOCK_DEVICE = (
    "INSERT INTO devices (device, site, first_ns, last_ns) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (device) DO UPDATE SET site = excluded.site, last_ns = excluded.last_ns "
    "RETURNING ack_seq, max_seq"
)
_STATUS_COLUMNS = (
    "device", "site", "online", "door", "version", "boot_id", "backlog", "clock_synced",
    "last_scan_wall_ns", "wall_ns", "payload", "received_ns",
)  # fmt: skip
_STATUS_INSERT = (
    f"INSERT INTO statuses ({', '.join(_STATUS_COLUMNS)}) "
    f"VALUES ({', '.join('?' * len(_STATUS_COLUMNS))}) ON CONFLICT (device) DO UPDATE SET "
)
_KEEP_ON_WILL = ("door", "version", "boot_id", "backlog", "clock_synced", "last_scan_wall_ns",
                 "wall_ns")  # fmt: skip
# A birth replaces everything; a last will carries only the ids, so it keeps what it lacks.
_UPSERT_BIRTH = _STATUS_INSERT + ", ".join(f"{c} = excluded.{c}" for c in _STATUS_COLUMNS[1:])
_UPSERT_WILL = _STATUS_INSERT + ", ".join(
    f"{c} = COALESCE(excluded.{c}, statuses.{c})" if c in _KEEP_ON_WILL else f"{c} = excluded.{c}"
    for c in _STATUS_COLUMNS[1:]
)


@dataclass(frozen=True, slots=True)
class SeqRange:
    """Seqs ``first``..``last`` (inclusive) of one device."""

    first: int
    last: int


@dataclass(frozen=True, slots=True)
class StoreResult:
    """What :meth:`Store.store_events` did: ``inserted`` new event rows, ``duplicates`` already
    stored, ``gaps_inserted`` new gap records, ``ack_seq`` the device's contiguous seq after
    the commit, ``opened`` holes first seen now, ``filled`` holes that are now fully covered."""

    inserted: int
    duplicates: int
    gaps_inserted: int
    ack_seq: int
    opened: tuple[SeqRange, ...] = ()
    filled: tuple[SeqRange, ...] = ()


@dataclass(frozen=True, slots=True)
class MissingRange:
    """A hole in a device's seqs: ``from_seq``..``to_seq`` neither stored nor covered by a gap
    record, first seen at ``detected_ns`` (worker clock, ns since the epoch)."""

    device: str
    from_seq: int
    to_seq: int
    detected_ns: int


@dataclass(frozen=True, slots=True)
class DeviceState:
    """A device's row: ``ack_seq`` (contiguous seq stored), ``ack_sent`` (highest ack the
    broker accepted from a worker), ``max_seq`` (highest seq covered), ``events`` (rows
    stored), ``first_ns``/``last_ns`` (first/last message, worker clock)."""

    device: str
    site: str
    ack_seq: int
    ack_sent: int
    max_seq: int
    events: int
    first_ns: int
    last_ns: int


@dataclass(frozen=True, slots=True)
class StatusRow:
    """The stored status of a device (see :class:`~firmware.backoffice.records.StatusRecord`),
    received by a worker at ``received_ns``."""

    device: str
    site: str
    online: bool
    door: str | None
    version: str | None
    boot_id: str | None
    backlog: int | None
    clock_synced: bool | None
    last_scan_wall_ns: int | None
    wall_ns: int | None
    payload_json: str
    received_ns: int


@dataclass(frozen=True, slots=True)
class ScanCount:
    """Scan events of one group: ``bucket`` = ``wall_ns // bucket_ns`` (towards zero),
    ``site``, ``door``, ``direction`` ("in"/"out"/"both"), ``decision`` ("granted"/"denied"
    or None) and how many (``count``)."""

    bucket: int
    site: str
    door: str
    direction: str
    decision: str | None
    count: int


class Store(Protocol):
    """What the ingest worker, the report and the tests need from a store. One instance is
    for one thread at a time (a lock inside serialises callers). Every method raises
    StoreError when the database cannot be used; :meth:`store_events` and
    :meth:`store_status` raise BadMessageError when the database refuses the data itself."""

    kind: str
    """``"sqlite"`` or ``"postgresql"``."""

    def store_events(self, batch: EventBatch, received_ns: int) -> StoreResult:
        """Store ``batch`` in one transaction (idempotent by (device, event_id) and by gap
        range) and recompute the device's coverage, holes and ack from the store."""
        ...

    def store_status(self, status: StatusRecord, received_ns: int) -> None:
        """Upsert the device's latest status in one transaction."""
        ...

    def ack_state(self, device: str) -> tuple[str, int] | None:
        """(site, ack_seq) of ``device``, or None for a device never seen."""
        ...

    def confirm_ack(self, device: str, seq: int) -> int:
        """Record that the broker accepted ack ``seq`` for ``device``; returns the device's
        ack_seq now (0 for a device never seen), to tell whether to publish again."""
        ...

    def unsent_acks(self) -> list[str]:
        """Devices whose ack_seq is above the highest ack confirmed sent (a worker stopped
        between commit and publish), in device order."""
        ...

    def devices(self) -> list[DeviceState]:
        """Every device, in device order."""
        ...

    def missing(self, device: str | None = None) -> list[MissingRange]:
        """Holes of ``device`` (all devices when None), by device then from_seq."""
        ...

    def seqs(self, device: str) -> list[int]:
        """The seq of every event row stored for ``device``, ascending (a seq appears twice
        only if the reader sent two event ids with one seq)."""
        ...

    def reader_gaps(self, device: str) -> list[GapRecord]:
        """The gap records stored for ``device``, by from_seq."""
        ...

    def statuses(self) -> list[StatusRow]:
        """The latest status of every device, in device order."""
        ...

    def scan_counts(self, since_ns: int, until_ns: int, bucket_ns: int) -> list[ScanCount]:
        """Scan events with ``since_ns <= wall_ns < until_ns``, counted per time bucket of
        ``bucket_ns`` ns (> 0), site, door, direction and decision; in no particular order."""
        ...

    def close(self) -> None:
        """Close the connection; idempotent."""
        ...


class _Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


_Exec = Callable[[str, Sequence[Any]], _Cursor]


def open_store(
    db: str | Path, *, create: bool = True, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
) -> Store:
    """The store at ``db``: a ``postgresql://`` (or ``postgres://``) URL, else a SQLite file
    path. ``create``: make the file and the schema when missing (the ingest worker); False
    (reports) raises StoreError for a store that does not exist yet. ``busy_timeout_s``: how
    long a SQLite writer waits for another one. Raises StoreError when it cannot be opened
    or holds a newer schema version."""
    text = str(db)
    if text.startswith(POSTGRES_SCHEMES):
        return PostgresStore(text, create=create)
    return SqliteStore(Path(text), create=create, busy_timeout_s=busy_timeout_s)


def merge_ranges(ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint, non-adjacent runs covering exactly the seqs of ``ranges`` ((lo, hi)
    pairs, inclusive, lo <= hi): ``[(1, 2), (3, 3), (5, 6)]`` -> ``[(1, 3), (5, 6)]``."""
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def holes(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The seqs from 1 up to the last run that no run of ``runs`` (as from
    :func:`merge_ranges`) covers: ``[(3, 4), (7, 9)]`` -> ``[(1, 2), (5, 6)]``."""
    result: list[tuple[int, int]] = []
    expected = 1
    for lo, hi in runs:
        if lo > expected:
            result.append((expected, lo - 1))
        expected = max(expected, hi + 1)
    return result


class _SqlStore(ABC):
    """The SQL both databases share, written with ``?`` placeholders."""

    kind = "sql"

    def __init__(self) -> None:
        self._lock = threading.Lock()

    # -- what a database adds -------------------------------------------------------------

    @abstractmethod
    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[_Exec]:
        """A write transaction holding the locks described in the module docstring;
        ``durable`` False lets the commit return before it is on disk (for bookkeeping that
        a power cut may lose)."""
        yield  # type: ignore[misc]  # abstract: each database supplies its transaction

    @abstractmethod
    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a read-only query; its rows."""

    # -- the Store protocol ----------------------------------------------------------------

    def store_events(self, batch: EventBatch, received_ns: int) -> StoreResult:
        with self._lock, self._write() as x:
            old_ack, old_max = x(
                _LOCK_DEVICE, (batch.device, batch.site, received_ns, received_ns)
            ).fetchone()
            rows = [
                (
                    batch.device, e.event_id, batch.site, e.seq, e.kind, e.boot_id, e.wall_ns,
                    e.clock_synced, e.mono_ns, e.door, e.direction, e.decision, e.reason,
                    e.credential_kind, e.subject, e.codes_json, e.decode_ms, e.verdict_ms,
                    e.frame_to_relay_ms, e.detail_json, received_ns,
                )
                for e in batch.events
            ]  # fmt: skip
            stored = _insert_new(
                x, "events", rows, columns=_EVENT_COLUMNS, key="device, event_id", returning="seq"
            )
            gap_rows = [
                (batch.device, g.from_seq, g.to_seq, g.seq, g.count, g.reason, g.wall_ns,
                 received_ns)
                for g in batch.gaps
            ]  # fmt: skip
            new_gaps = _insert_new(
                x, "reader_gaps", gap_rows, columns=_GAP_COLUMNS,
                key="device, from_seq, to_seq", returning="from_seq, to_seq",
            )  # fmt: skip
            new = [(int(r[0]), int(r[0])) for r in stored] + [
                (int(r[0]), int(r[1])) for r in new_gaps
            ]
            inserted, gaps_inserted = len(stored), len(new_gaps)
            duplicates = len(rows) - inserted
            if not new:
                # Nothing new: coverage, holes and ack are as the last writer left them.
                return StoreResult(0, duplicates, 0, int(old_ack))
            ack, max_seq, opened, filled = _cover(
                x, batch.device, new, old_ack=int(old_ack), old_max=int(old_max),
                now_ns=received_ns,
            )  # fmt: skip
            x(
                "UPDATE devices SET ack_seq = ?, max_seq = ?, events = events + ? WHERE device = ?",
                (ack, max_seq, inserted, batch.device),
            )
        return StoreResult(inserted, duplicates, gaps_inserted, ack, opened, filled)

    def store_status(self, status: StatusRecord, received_ns: int) -> None:
        s = status
        with self._lock, self._write() as x:
            x(_UPSERT_BIRTH if s.online else _UPSERT_WILL, (
                s.device, s.site, s.online, s.door, s.version, s.boot_id, s.backlog,
                s.clock_synced, s.last_scan_wall_ns, s.wall_ns, s.payload_json, received_ns,
            ))  # fmt: skip

    def ack_state(self, device: str) -> tuple[str, int] | None:
        with self._lock:
            rows = self._read("SELECT site, ack_seq FROM devices WHERE device = ?", (device,))
        return (str(rows[0][0]), int(rows[0][1])) if rows else None

    def confirm_ack(self, device: str, seq: int) -> int:
        with self._lock:
            rows = self._read("SELECT ack_seq, ack_sent FROM devices WHERE device = ?", (device,))
            if not rows:
                return 0
            if int(rows[0][1]) < seq:
                # Only a raise needs the write lock. Not durable: after a power cut the worker
                # at worst publishes an ack the broker already holds.
                with self._write(durable=False) as x:
                    x(
                        "UPDATE devices SET ack_sent = ? WHERE device = ? AND ack_sent < ?",
                        (seq, device, seq),
                    )
                rows = self._read(
                    "SELECT ack_seq, ack_sent FROM devices WHERE device = ?", (device,)
                )
        return int(rows[0][0])

    def unsent_acks(self) -> list[str]:
        with self._lock:
            rows = self._read("SELECT device FROM devices WHERE ack_sent < ack_seq ORDER BY device")
        return [str(r[0]) for r in rows]

    def devices(self) -> list[DeviceState]:
        with self._lock:
            rows = self._read(
                "SELECT device, site, ack_seq, ack_sent, max_seq, events, first_ns, last_ns "
                "FROM devices ORDER BY device"
            )
        return [DeviceState(str(r[0]), str(r[1]), *(int(v) for v in r[2:])) for r in rows]

    def missing(self, device: str | None = None) -> list[MissingRange]:
        sql = "SELECT device, from_seq, to_seq, detected_ns FROM missing"
        params: tuple[str, ...] = ()
        if device is not None:
            sql, params = sql + " WHERE device = ?", (device,)
        with self._lock:
            rows = self._read(sql + " ORDER BY device, from_seq", params)
        return [MissingRange(str(r[0]), int(r[1]), int(r[2]), int(r[3])) for r in rows]

    def seqs(self, device: str) -> list[int]:
        with self._lock:
            rows = self._read("SELECT seq FROM events WHERE device = ? ORDER BY seq", (device,))
        return [int(r[0]) for r in rows]

    def reader_gaps(self, device: str) -> list[GapRecord]:
        with self._lock:
            rows = self._read(
                "SELECT seq, from_seq, to_seq, count, reason, wall_ns FROM reader_gaps "
                "WHERE device = ? ORDER BY from_seq, to_seq",
                (device,),
            )
        return [
            GapRecord(int(r[0]), int(r[1]), int(r[2]), int(r[3]), str(r[4]), _opt(int, r[5]))
            for r in rows
        ]

    def statuses(self) -> list[StatusRow]:
        with self._lock:
            rows = self._read(f"SELECT {', '.join(_STATUS_COLUMNS)} FROM statuses ORDER BY device")
        return [
            StatusRow(
                device=str(r[0]),
                site=str(r[1]),
                online=bool(r[2]),
                door=_opt(str, r[3]),
                version=_opt(str, r[4]),
                boot_id=_opt(str, r[5]),
                backlog=_opt(int, r[6]),
                clock_synced=_opt(bool, r[7]),
                last_scan_wall_ns=_opt(int, r[8]),
                wall_ns=_opt(int, r[9]),
                payload_json=str(r[10]),
                received_ns=int(r[11]),
            )
            for r in rows
        ]

    def scan_counts(self, since_ns: int, until_ns: int, bucket_ns: int) -> list[ScanCount]:
        if bucket_ns <= 0:
            raise ValueError(f"bucket_ns must be positive, found {bucket_ns}")
        # Positional GROUP BY: PostgreSQL would not see two parameters as one expression.
        with self._lock:
            rows = self._read(
                "SELECT wall_ns / ?, site, door, direction, decision, count(*) FROM events "
                "WHERE kind = 'scan' AND wall_ns >= ? AND wall_ns < ? GROUP BY 1, 2, 3, 4, 5",
                (bucket_ns, since_ns, until_ns),
            )
        return [
            ScanCount(int(r[0]), str(r[1]), str(r[2]), str(r[3]), _opt(str, r[4]), int(r[5]))
            for r in rows
        ]


def _insert_new(
    x: _Exec,
    table: str,
    rows: Sequence[tuple[Any, ...]],
    *,
    columns: Sequence[str],
    key: str,
    returning: str,
) -> list[Any]:
    """INSERT ``rows`` into ``table``, skipping those whose ``key`` is there already; the
    ``returning`` columns of the rows inserted. One statement per ``_ROWS_PER_INSERT`` rows:
    a round trip per row would make PostgreSQL ten times slower."""
    inserted: list[Any] = []
    one = f"({', '.join('?' * len(columns))})"
    for i in range(0, len(rows), _ROWS_PER_INSERT):
        chunk = rows[i : i + _ROWS_PER_INSERT]
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES {', '.join([one] * len(chunk))} "
            f"ON CONFLICT ({key}) DO NOTHING RETURNING {returning}"
        )
        inserted += x(sql, [v for row in chunk for v in row]).fetchall()
    return inserted


def _cover(
    x: _Exec,
    device: str,
    new: list[tuple[int, int]],
    *,
    old_ack: int,
    old_max: int,
    now_ns: int,
) -> tuple[int, int, tuple[SeqRange, ...], tuple[SeqRange, ...]]:
    """Add the runs ``new`` to the device's coverage and carve them out of its holes; a run
    past the highest seq so far opens the hole below it. Returns (ack, max seq, holes opened,
    holes filled). Runs under the device's lock; each run costs a few index lookups, however
    many holes a device has (a lagging worker can leave thousands for a while)."""
    opened: list[SeqRange] = []
    filled: list[SeqRange] = []
    max_seq, ack = old_max, old_ack
    for lo, hi in merge_ranges(new):
        carved = _neighbours(
            x, "missing", device, lo, hi, columns="from_seq, to_seq, detected_ns", adjacent=False
        )
        for f, t, detected in carved:
            x("DELETE FROM missing WHERE device = ? AND from_seq = ?", (device, f))
            # What is left of a hole keeps the time the hole was first seen.
            rest = [(a, b) for a, b in ((f, lo - 1), (hi + 1, t)) if a <= b]
            for a, b in rest:
                x(_INSERT_HOLE, (device, a, b, detected))
            if not rest:
                filled.append(SeqRange(f, t))
        if lo > max_seq + 1:
            x(_INSERT_HOLE, (device, max_seq + 1, lo - 1, now_ns))
            opened.append(SeqRange(max_seq + 1, lo - 1))
        max_seq = max(max_seq, hi)
        touching = _neighbours(x, "coverage", device, lo, hi, columns="lo, hi", adjacent=True)
        run_lo = min([lo, *(r[0] for r in touching)])
        run_hi = max([hi, *(r[1] for r in touching)])
        for r in touching:
            if r[0] != run_lo:
                x("DELETE FROM coverage WHERE device = ? AND lo = ?", (device, r[0]))
        if any(r[0] == run_lo for r in touching):
            # The usual case: the run from seq 1 grows by the next seq.
            x("UPDATE coverage SET hi = ? WHERE device = ? AND lo = ?", (run_hi, device, run_lo))
        else:
            x("INSERT INTO coverage (device, lo, hi) VALUES (?, ?, ?)", (device, run_lo, run_hi))
        if run_lo == 1:
            ack = run_hi  # the ack is the end of the run from seq 1; other runs leave it
    return ack, max_seq, tuple(opened), tuple(filled)


def _neighbours(
    x: _Exec, table: str, device: str, lo: int, hi: int, *, columns: str, adjacent: bool
) -> list[tuple[int, ...]]:
    """The rows (``columns``, the first being the range's start, the second its end) of
    ``table`` — disjoint ranges keyed by (device, start) — that overlap ``lo..hi``, or also
    touch it when ``adjacent``: the last range starting at or before ``lo`` plus those
    starting inside. Two index lookups."""
    reach = 1 if adjacent else 0
    start = columns.split(",", maxsplit=1)[0]
    # One round trip: the range before (or at) lo, then those starting inside.
    found = x(
        f"SELECT 0, {columns} FROM (SELECT {columns} FROM {table} WHERE device = ? AND "
        f"{start} <= ? ORDER BY {start} DESC LIMIT 1) AS before UNION ALL "
        f"SELECT 1, {columns} FROM {table} WHERE device = ? AND {start} > ? AND {start} <= ?",
        (device, lo, device, lo, hi + reach),
    ).fetchall()  # fmt: skip
    rows = sorted(tuple(int(v) for v in r) for r in found)
    return [r[1:] for r in rows if r[0] == 1 or r[2] >= lo - reach]


def _opt(convert: Callable[[Any], Any], value: Any) -> Any:
    return None if value is None else convert(value)


class SqliteStore(_SqlStore):
    """The store in a SQLite file: WAL (readers never wait for the writer), ``synchronous``
    FULL (an ack is only ever published for a commit that survives a power cut); a writer
    waits up to ``busy_timeout_s`` for another, so several ingest processes on one machine
    can share the file (SQLite on a network file system is not safe: use PostgreSQL).

    Raises StoreError when the file cannot be opened (or, with ``create`` False, does not
    exist), is not a database, or holds a newer schema.
    """

    kind = "sqlite"

    def __init__(
        self, path: Path, *, create: bool = True, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    ) -> None:
        super().__init__()
        self.path = Path(path)
        if not create and not self.path.exists():
            raise StoreError(
                f"no store at {self.path}: run 'qrgate ingest --db {self.path}' "
                "first, or give the right path"
            )
        try:
            # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ones below. No
            # busy timeout in SQLite itself: its handler sleeps 5-100 ms steps once a wait
            # passes 3 ms, which starves a second writer whose peer commits every 2 ms;
            # _busy() waits in short steps instead.
            self._conn = sqlite3.connect(
                self.path, timeout=0, isolation_level=None, check_same_thread=False
            )
            self._busy_timeout_s = busy_timeout_s
        except sqlite3.Error as e:
            raise StoreError(f"cannot open SQLite store {self.path}: {e}") from e
        try:
            with self._errors():
                self._busy(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
                self._conn.execute("PRAGMA synchronous = FULL")
                columns = {r[1] for r in self._conn.execute("PRAGMA table_info(events)")}
                if columns and "device" not in columns:
                    raise StoreError(
                        f"{self.path} is a reader's journal, not a back-office store: give "
                        "the file 'qrgate ingest --db' writes"
                    )
                if create:
                    with self._write() as x:
                        _create_schema(x)
                _check_version(self._read, str(self.path))
        except BaseException:
            self._conn.close()
            raise

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except (sqlite3.IntegrityError, sqlite3.DataError, OverflowError) as e:
            raise BadMessageError(f"the store refused the data: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite store {self.path}: {e}") from e

    def _busy(self, call: Callable[[], _T]) -> _T:
        """``call()``, again while the database is locked, for up to the busy timeout."""
        deadline = time.monotonic() + self._busy_timeout_s
        pause = _BUSY_PAUSE_MIN_S
        while True:
            try:
                return call()
            except sqlite3.OperationalError as e:
                locked = getattr(e, "sqlite_errorcode", None) in _SQLITE_BUSY_CODES
                if not locked or time.monotonic() >= deadline:
                    raise
            # Jitter keeps two waiting workers from waking in step.
            time.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, _BUSY_PAUSE_MAX_S)

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[_Exec]:
        with self._errors():
            conn = self._conn
            if not durable:
                conn.execute("PRAGMA synchronous = NORMAL")  # in WAL: no fsync at commit
            try:
                # IMMEDIATE takes the write lock now, so the reads inside see every commit of
                # the other writers.
                self._busy(lambda: conn.execute("BEGIN IMMEDIATE"))
                try:
                    yield conn.execute
                    self._busy(lambda: conn.execute("COMMIT"))
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            finally:
                if not durable:
                    conn.execute("PRAGMA synchronous = FULL")

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._errors():
            rows: list[Any] = self._busy(lambda: self._conn.execute(sql, params).fetchall())
            return rows

    def close(self) -> None:
        with self._lock:
            self._conn.close()


class PostgresStore(_SqlStore):
    """The store in a PostgreSQL database (psycopg 3), shared by workers on many machines.

    Connects at once; a connection lost later is made again on the next call (that call
    raises StoreError, the one after reconnects). Raises StoreError when the server cannot be
    reached or refuses the login, the schema is missing (``create`` False) or newer; and
    ImportError's message as StoreError when psycopg is not installed.
    """

    kind = "postgresql"

    def __init__(self, url: str, *, create: bool = True) -> None:
        super().__init__()
        try:
            import psycopg
        except ImportError as e:
            raise StoreError(
                f"PostgreSQL needs psycopg 3: pip install 'psycopg[binary]' ({e})"
            ) from e
        self._psycopg = psycopg
        self.url = url
        self._conn: Any = None
        self._sql: dict[str, str] = {}
        self._shown = _redact(url)
        self._connection()
        try:
            if create:
                with self._write() as x:
                    # Two workers starting together must not both create the tables.
                    x("SELECT pg_advisory_xact_lock(?)", (_PG_SCHEMA_LOCK,))
                    _create_schema(x)
            _check_version(self._read, self._shown)
        except BaseException:
            self.close()
            raise

    def _connection(self) -> Any:
        conn = self._conn
        if conn is not None and not conn.closed and not conn.broken:
            return conn
        if conn is not None:
            conn.close()
            self._conn = None
        try:
            self._conn = self._psycopg.connect(
                self.url, autocommit=True, connect_timeout=_PG_CONNECT_TIMEOUT_S
            )
        except self._psycopg.Error as e:
            raise StoreError(f"cannot connect to PostgreSQL store {self._shown}: {e}") from e
        return self._conn

    def _pg(self, sql: str) -> str:
        converted = self._sql.get(sql)
        if converted is None:
            # No statement here holds a literal ? or %.
            converted = self._sql[sql] = sql.replace("?", "%s")
        return converted

    @contextmanager
    def _errors(self) -> Iterator[None]:
        pg = self._psycopg
        try:
            yield
        except (pg.DataError, pg.IntegrityError) as e:
            raise BadMessageError(f"the store refused the data: {e}") from e
        except pg.Error as e:
            raise StoreError(f"PostgreSQL store {self._shown}: {e}") from e

    @contextmanager
    def _write(self, *, durable: bool = True) -> Iterator[_Exec]:
        with self._errors():
            conn = self._connection()
            with conn.transaction():
                if not durable:
                    conn.execute("SET LOCAL synchronous_commit = off")
                yield lambda sql, params: conn.execute(self._pg(sql), params)

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        with self._errors():
            rows: list[Any] = self._connection().execute(self._pg(sql), params).fetchall()
            return rows

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _create_schema(x: _Exec) -> None:
    for statement in _SCHEMA:
        x(statement, ())
    x(
        "INSERT INTO meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) DO NOTHING",
        (str(SCHEMA_VERSION),),
    )


def _check_version(read: Callable[[str, Sequence[Any]], list[Any]], where: str) -> None:
    try:
        rows = read("SELECT value FROM meta WHERE key = 'schema_version'", ())
    except StoreError as e:
        raise StoreError(f"{where} is no qrgate store ({e})") from e
    if not rows:
        raise StoreError(f"{where} is no qrgate store (no schema_version)")
    found = int(rows[0][0])
    if found > SCHEMA_VERSION:
        raise StoreError(
            f"{where} has schema version {found}, newer than this qrgate's "
            f"{SCHEMA_VERSION}: upgrade qrgate"
        )


def _redact(url: str) -> str:
    # A password in the URL must not reach logs or error messages.
    head, sep, tail = url.partition("@")
    if not sep or ":" not in head.split("//", 1)[-1]:
        return url
    scheme, _, userinfo = head.partition("//")
    return f"{scheme}//{userinfo.split(':', 1)[0]}:***@{tail}"
