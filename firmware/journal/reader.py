"""Read the journal without disturbing the daemon: ``qrgate journal tail`` / ``stats``.

The database is opened read-only (SQLite URI ``mode=ro``), one short connection per call. In
WAL mode readers never block the writer and the writer never blocks readers, so this is safe
while the daemon runs.
"""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path
from typing import Any

from firmware.exceptions import JournalDamagedError, JournalError
from firmware.journal.events import StoredEvent
from firmware.journal.store import SELECT_EVENTS, errcode, read_rows

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_BUSY_TIMEOUT_S = 2.0


class JournalReader:
    """Read-only view of the journal at ``path`` (the ``.db`` file the daemon writes).

    Every method raises JournalError when the file is missing or unreadable, and
    JournalDamagedError when SQLite finds it damaged (the daemon moves it aside at its next
    start).
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def tail(self, n: int) -> list[StoredEvent]:
        """The newest ``n`` events, oldest first (newest last)."""
        if n <= 0:
            return []
        with self._connect() as conn:
            rows = self._run(
                conn,
                f"SELECT * FROM ({SELECT_EVENTS} ORDER BY seq DESC LIMIT ?) ORDER BY seq",
                (n,),
            )
        return read_rows(rows)[0]  # an unreadable row shows as a row_unreadable incident

    def stats(self) -> dict[str, Any]:
        """Counts for people and the CLI (JSON-ready).

        Keys: ``rows``; ``first_seq`` / ``last_seq`` (None when empty); ``by_decision`` and
        ``by_reason`` (``{value: count}``; incidents count under decision "none");
        ``unpublished`` (not yet sent); ``unacked`` (not yet stored by the backend);
        ``gaps`` (gap records) and ``dropped`` (rows they cover); ``file_bytes`` (database plus
        WAL, bytes); ``last_wall_ns`` and ``last_clock_synced`` of the newest event;
        ``schema_version``.
        """
        with self._connect() as conn:
            rows, first, last = self._run(conn, "SELECT count(*), min(seq), max(seq) FROM events")[
                0
            ]
            by_decision = {
                str(k if k is not None else "none"): int(v)
                for k, v in self._run(
                    conn, "SELECT decision, count(*) FROM events GROUP BY decision ORDER BY 2 DESC"
                )
            }
            by_reason = {
                str(k): int(v)
                for k, v in self._run(
                    conn, "SELECT reason, count(*) FROM events GROUP BY reason ORDER BY 2 DESC"
                )
            }
            unpublished = self._run(
                conn, "SELECT count(*) FROM events WHERE acked = 0 AND published = 0"
            )[0][0]
            unacked = self._run(conn, "SELECT count(*) FROM events WHERE acked = 0")[0][0]
            gaps, dropped = self._run(conn, "SELECT count(*), coalesce(sum(count), 0) FROM gaps")[0]
            newest = self._run(
                conn, "SELECT wall_ns, clock_synced FROM events ORDER BY seq DESC LIMIT 1"
            )
            version = self._run(conn, "SELECT value FROM meta WHERE key = 'schema_version'")
        file_bytes = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                file_bytes += Path(f"{self.path}{suffix}").stat().st_size
        return {
            "rows": int(rows),
            "first_seq": first,
            "last_seq": last,
            "by_decision": by_decision,
            "by_reason": by_reason,
            "unpublished": int(unpublished),
            "unacked": int(unacked),
            "gaps": int(gaps),
            "dropped": int(dropped),
            "file_bytes": file_bytes,
            "last_wall_ns": newest[0][0] if newest else None,
            "last_clock_synced": bool(newest[0][1]) if newest else None,
            "schema_version": int(version[0][0]) if version else None,
        }

    def _connect(self) -> _Connection:
        if not self.path.is_file():
            raise JournalError(f"no journal at {self.path}")
        uri = f"{self.path.resolve().as_uri()}?mode=ro"
        try:
            conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S)
        except sqlite3.Error as e:
            raise JournalError(f"cannot open journal {self.path} read-only: {e}") from e
        return _Connection(conn)

    def _run(self, conn: _Connection, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return conn.conn.execute(sql, params).fetchall()
        except sqlite3.DatabaseError as e:
            if errcode(e) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
                raise JournalDamagedError(f"journal {self.path} is damaged: {e}") from e
            raise JournalError(f"cannot read journal {self.path}: {e}") from e


class _Connection:
    """A read-only connection closed on leaving the ``with`` block (sqlite3's own context
    manager only ends the transaction)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> _Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
