"""The uplink's read-only view of the journal's outbox: unsent rows after a cursor, sent rows
the back office has not acknowledged, gap records, the backlog count.

:class:`firmware.journal.store.Journal` writes; this reads on a connection of its own opened
read-only (SQLite URI ``mode=ro``), so the uplink's reads never wait on the journal's writer
mutex and never take the write lock. In WAL mode a reader sees the last committed state and
does not block the writer; every query here runs in autocommit, so no snapshot is held between
calls (a held snapshot would keep the WAL from restarting).

Rows a spill episode moves into the database late can carry seqs lower than rows already
read: callers that read after a cursor must start again from 0 now and then (the forwarder
does at the end of every sweep).
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.exceptions import JournalError
from firmware.journal.events import StoredEvent
from firmware.journal.store import SELECT_EVENTS, read_rows

log = logging.getLogger(__name__)

BUSY_TIMEOUT_S = 1.0


@dataclass(frozen=True, slots=True)
class GapRecord:
    """One row of the journal's ``gaps`` table: seqs ``from_seq``..``to_seq`` (``count`` rows)
    were dropped for ``reason`` ("cap_rows", "cap_bytes", "disk_full") at ``wall_ns``. ``id``
    grows with every record."""

    id: int
    from_seq: int
    to_seq: int
    count: int
    reason: str
    wall_ns: int


class OutboxReader:
    """Read-only queries on the journal file at ``path``, for one thread (the uplink worker).

    The connection opens on first use (the journal must have created the file by then) and
    again after :meth:`close`. Every method raises JournalError when the file cannot be opened
    or read; the caller retries later.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path = Path(path)
        self._busy_timeout_s = busy_timeout_s
        self._conn: sqlite3.Connection | None = None

    def close(self) -> None:
        """Close the connection (idempotent)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def unsent_after(self, seq: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events not yet published and not acknowledged, with seq > ``seq``,
        in seq order."""
        rows = self._query(
            f"{SELECT_EVENTS} WHERE acked = 0 AND published = 0 AND seq > ? ORDER BY seq LIMIT ?",
            (int(seq), max(0, int(limit))),
        )
        return self._stored(rows)

    def sent_unacked_after(self, seq: int, limit: int) -> list[StoredEvent]:
        """Up to ``limit`` events published (PUBACK seen) but not acknowledged by the back
        office, with seq > ``seq``, in seq order."""
        rows = self._query(
            f"{SELECT_EVENTS} WHERE acked = 0 AND published = 1 AND seq > ? ORDER BY seq LIMIT ?",
            (int(seq), max(0, int(limit))),
        )
        return self._stored(rows)

    def has_sent_unacked_after(self, seq: int) -> bool:
        """True when some published event with seq > ``seq`` is not acknowledged yet."""
        rows = self._query(
            "SELECT 1 FROM events WHERE acked = 0 AND published = 1 AND seq > ? LIMIT 1",
            (int(seq),),
        )
        return bool(rows)

    def max_published(self) -> int:
        """The highest seq marked published or acknowledged (0 when none)."""
        # two lookups on the outbox index (acked, published, seq), not a table scan
        rows = self._query(
            "SELECT max(coalesce((SELECT max(seq) FROM events WHERE acked = 0 AND published = 1),"
            " 0), coalesce((SELECT max(seq) FROM events WHERE acked = 1 AND published = 1), 0))",
            (),
        )
        return int(rows[0][0])

    def backlog(self) -> int:
        """Events not yet published (the number the status message reports)."""
        rows = self._query("SELECT count(*) FROM events WHERE acked = 0 AND published = 0", ())
        return int(rows[0][0])

    def gaps_after(self, gap_id: int, limit: int) -> list[GapRecord]:
        """Up to ``limit`` gap records with id > ``gap_id``, in id order."""
        rows = self._query(
            "SELECT id, from_seq, to_seq, count, reason, wall_ns FROM gaps WHERE id > ? "
            "ORDER BY id LIMIT ?",
            (int(gap_id), max(0, int(limit))),
        )
        return [_gap(r) for r in rows]

    def gap(self, gap_id: int) -> GapRecord | None:
        """The gap record ``gap_id``, or None."""
        rows = self._query(
            "SELECT id, from_seq, to_seq, count, reason, wall_ns FROM gaps WHERE id = ?",
            (int(gap_id),),
        )
        return _gap(rows[0]) if rows else None

    def _connect(self) -> sqlite3.Connection:
        if self._conn is None:
            if not self.path.is_file():
                raise JournalError(f"no journal at {self.path}")
            uri = f"{self.path.resolve().as_uri()}?mode=ro"
            try:
                self._conn = sqlite3.connect(
                    uri, uri=True, timeout=self._busy_timeout_s, isolation_level=None
                )
            except sqlite3.Error as e:
                raise JournalError(f"cannot open journal {self.path} read-only: {e}") from e
        return self._conn

    def _query(self, sql: str, params: tuple[Any, ...]) -> list[Any]:
        conn = self._connect()
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            # a journal moved aside and recreated (damage) is a new file: reopen next time
            self.close()
            raise JournalError(f"cannot read the outbox of {self.path}: {e}") from e

    def _stored(self, rows: list[Any]) -> list[StoredEvent]:
        events, salvaged = read_rows(rows)
        if salvaged:
            # sent as "row_unreadable" incidents in their seqs' places: the outbox goes on
            log.error(
                "journal %s: %d unreadable row(s) among seq %d..%d; sending them as "
                "row_unreadable incidents",
                self.path, salvaged, events[0].seq, events[-1].seq,
            )  # fmt: skip
        return events


def _gap(row: Any) -> GapRecord:
    gap_id, first, last, count, reason, wall_ns = row
    return GapRecord(int(gap_id), int(first), int(last), int(count), str(reason), int(wall_ns))
