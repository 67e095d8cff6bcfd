"""The rows of the journal: what one scan (or one incident) looks like when stored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event before the journal gives it an identity.

    ``kind``: "scan" for a decided scan, "incident" for reader incidents (journal damaged,
    camera stalled, ...). ``wall_ns``: wall-clock time (``time.time_ns()``), trustworthy only
    when ``clock_synced``. ``mono_ns``: ``time.monotonic_ns()`` when the event was decided.
    ``decision``: "granted" / "denied" for scans, None for incidents. ``reason``: a
    :class:`firmware.policy.verdict.Reason` value or an incident code. ``subject``: keyed HMAC
    hex of the deciding credential, never the raw payload. ``codes``: one dict per code in view
    (subject, kind, reason, length, backend). Timings in milliseconds. ``detail``: extra JSON.
    """

    kind: str
    wall_ns: int
    clock_synced: bool
    mono_ns: int
    door: str
    direction: str
    decision: str | None = None
    reason: str = ""
    credential_kind: str | None = None
    subject: str | None = None
    codes: tuple[dict[str, Any], ...] = ()
    decode_ms: float | None = None
    verdict_ms: float | None = None
    frame_to_relay_ms: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An event as the journal holds it: ``seq`` (per-device, never reused, survives
    restarts), ``event_id`` (UUIDv7 text), ``boot_id`` (this boot's id), plus the fields of
    :class:`NewEvent`, ``published``/``acked`` outbox flags for the uplink."""

    seq: int
    event_id: str
    boot_id: str
    event: NewEvent
    published: bool = False
    acked: bool = False


@dataclass(frozen=True, slots=True)
class Receipt:
    """What :meth:`Journal.append` promises: ``seq`` and ``event_id`` of the stored event and
    ``durability``: "committed" (in the SQLite WAL: survives kill -9; survives a power cut once
    the group fsync ran, ≤ ``fsync_interval`` later), "spilled" (the database was locked past
    the deadline: written to the spill log, survives kill -9, moved into the database later),
    or "lost" (disk full and nothing could be written: counted and reported)."""

    seq: int
    event_id: str
    durability: str
