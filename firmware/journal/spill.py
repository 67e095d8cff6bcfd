"""The spill log: where an event goes when the database cannot take it in time.

One line per event: 8 hex digits of CRC-32 over the JSON text, a space, the JSON text
(ASCII only, so a line never contains a raw newline), ``\\n``. Each line is written with a
single ``os.write`` on an ``O_APPEND`` descriptor: once ``append`` returns the line is in the
kernel's page cache and survives kill -9 of the process; it is on stable storage after the
journal's next group fsync. A power cut or a full disk can leave a torn last line: reading
skips any line whose checksum or JSON does not match, so a torn tail costs only that line.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import zlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from firmware.journal.events import NewEvent, StoredEvent

_EVENT_FIELDS = tuple(f.name for f in fields(NewEvent))


# One encoder for every call: json.dumps with options builds a new JSONEncoder each time,
# which doubled the cost of encoding a scan's codes on the append path. Same output; encode()
# keeps its state per call, so sharing it between threads is safe.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True, default=str)


def dumps_json(value: Any) -> str:
    """Compact JSON for journal columns and spill lines; never raises.

    Values JSON cannot express are stored as their ``str()``; an unencodable structure (a
    cycle) becomes ``{"unencodable": repr}``, so a bad ``detail`` never loses the scan.
    """
    try:
        return _ENCODER.encode(value)
    except (ValueError, TypeError, RecursionError):
        return json.dumps({"unencodable": repr(value)[:1000]}, separators=(",", ":"))


def encode_line(stored: StoredEvent) -> bytes:
    """The spill line for ``stored`` (bytes, ends with ``\\n``)."""
    record: dict[str, Any] = {
        "seq": stored.seq,
        "event_id": stored.event_id,
        "boot_id": stored.boot_id,
    }
    for name in _EVENT_FIELDS:
        record[name] = getattr(stored.event, name)
    body = dumps_json(record).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def decode_line(line: bytes) -> StoredEvent | None:
    """The event in one spill line (without its newline), or None if the line is damaged."""
    if len(line) < 10 or line[8:9] != b" ":
        return None
    body = line[9:]
    try:
        if int(line[:8], 16) != zlib.crc32(body):
            return None
        record = json.loads(body)
        values = {name: record[name] for name in _EVENT_FIELDS if name in record}
        values["codes"] = tuple(values.get("codes") or ())
        values["detail"] = dict(values.get("detail") or {})
        event = NewEvent(**values)
        return StoredEvent(
            seq=int(record["seq"]),
            event_id=str(record["event_id"]),
            boot_id=str(record["boot_id"]),
            event=event,
        )
    except (ValueError, TypeError, KeyError):
        return None


@dataclass(frozen=True, slots=True)
class SpillContents:
    """What a spill log holds: ``events`` in file order, ``bad_lines`` skipped (torn or
    damaged lines), ``size`` bytes read."""

    events: tuple[StoredEvent, ...]
    bad_lines: int
    size: int

    @property
    def max_seq(self) -> int:
        """The highest seq in the log, 0 if it holds none."""
        return max((e.seq for e in self.events), default=0)


def read_spill(path: Path) -> SpillContents:
    """Read the spill log at ``path``; a missing file reads as empty. Raises OSError only
    when the file exists but cannot be read."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return SpillContents((), 0, 0)
    events: list[StoredEvent] = []
    bad = 0
    for line in data.split(b"\n"):
        if not line:
            continue
        stored = decode_line(line)
        if stored is None:
            bad += 1
        else:
            events.append(stored)
    return SpillContents(tuple(events), bad, len(data))


class SpillLog:
    """The append-only spill file at ``path``. Not thread-safe: the journal serialises use.

    ``open()`` creates it if needed; ``append`` / ``fsync`` / ``truncate`` raise OSError
    (ENOSPC on a full disk, EIO, ...) and leave the log usable for the next line.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        self._size = 0

    @property
    def is_open(self) -> bool:
        """True between ``open()`` and ``close()``."""
        return self._fd is not None

    @property
    def size(self) -> int:
        """Bytes in the log as this process last knew them (0 after ``truncate``)."""
        return self._size

    def open(self) -> None:
        """Open (create) the log for appending. Raises OSError."""
        if self._fd is not None:
            return
        existed = self.path.exists()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._size = os.fstat(fd).st_size
            if self._size and _last_byte(self.path, self._size) != b"\n":
                # end a torn tail, so the next record does not glue onto it and die with it
                self._size += os.write(fd, b"\n")
            if not existed:
                fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        self._fd = fd

    def append(self, stored: StoredEvent) -> None:
        """Append one event line with one ``os.write``. Raises OSError (e.g. ENOSPC)."""
        fd = self._require_fd()
        line = encode_line(stored)
        written = os.write(fd, line)
        if written != len(line):
            # a short write means the disk filled mid-line: terminate the torn line so the
            # next append starts clean, and report this one as not written
            self._size += written
            with contextlib.suppress(OSError):
                self._size += os.write(fd, b"\n")
            raise OSError(errno.ENOSPC, "short write to spill log", str(self.path))
        self._size += written

    def fsync(self) -> None:
        """Flush the log to stable storage. Raises OSError."""
        if self._fd is not None:
            os.fsync(self._fd)

    def truncate(self) -> None:
        """Empty the log (every event in it is in the database). Raises OSError."""
        fd = self._require_fd()
        os.ftruncate(fd, 0)
        self._size = 0

    def close(self) -> None:
        """Close the descriptor; idempotent."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def _require_fd(self) -> int:
        if self._fd is None:
            raise OSError(errno.EBADF, "spill log is not open", str(self.path))
        return self._fd


def _last_byte(path: Path, size: int) -> bytes:
    with path.open("rb") as f:
        f.seek(size - 1)
        return f.read(1)


def fsync_dir(folder: Path) -> None:
    """fsync a folder so a file created or renamed in it survives a power cut."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
