"""Inbound ``events`` and ``status`` payloads, checked against the contract
(:mod:`firmware.uplink.topics`) before anything is stored.

Checks are strict about types (a seq is an integer, not a float or a bool; times are integer
nanoseconds that fit a 64-bit column) and about text PostgreSQL and SQLite can both hold (no
NUL, valid UTF-8), so a message that passes here cannot make the store fail on its data.
An ``events`` message is refused whole when its envelope is wrong; inside a good envelope,
a bad event or gap record is refused alone and the others are kept.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from firmware.exceptions import BadMessageError
from firmware.uplink.topics import loads

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One journal row from an ``events`` message (see :func:`firmware.uplink.topics.event_json`).

    ``seq`` >= 1; ``wall_ns``/``mono_ns`` in ns (reader clocks); ``*_ms`` in milliseconds or
    None; ``codes_json``/``detail_json``: the ``codes`` list and ``detail`` object as JSON text.
    """

    seq: int
    event_id: str
    kind: str
    boot_id: str
    wall_ns: int
    clock_synced: bool
    mono_ns: int
    door: str
    direction: str
    decision: str | None
    reason: str
    credential_kind: str | None
    subject: str | None
    codes_json: str
    decode_ms: float | None
    verdict_ms: float | None
    frame_to_relay_ms: float | None
    detail_json: str


@dataclass(frozen=True, slots=True)
class GapRecord:
    """A reader's gap record: seqs ``from_seq``..``to_seq`` (inclusive, 1 <= from <= to) were
    dropped before they were acknowledged; ``count`` rows went (<= the span: some seqs may never
    have been used); ``seq`` is the record's place in the stream (the reader sends
    ``to_seq``); ``reason`` e.g. "cap_rows"; ``wall_ns`` when the rows were dropped (reader
    clock, ns) or None when not sent."""

    seq: int
    from_seq: int
    to_seq: int
    count: int
    reason: str
    wall_ns: int | None = None


@dataclass(frozen=True, slots=True)
class EventBatch:
    """A checked ``events`` message of one device: its events and gap records in message
    order, and ``rejected``: one log-ready reason per item that was refused."""

    site: str
    device: str
    events: tuple[EventRecord, ...]
    gaps: tuple[GapRecord, ...]
    rejected: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """A checked ``status`` message: a birth (``online`` True, the other fields as sent) or a
    last will (``online`` False; only ``door`` and ``boot_id`` besides the ids). Fields a
    payload lacks are None. ``payload_json``: the whole payload as JSON text (``camera`` and
    future fields live there)."""

    site: str
    device: str
    online: bool
    door: str | None
    version: str | None
    boot_id: str | None
    backlog: int | None
    clock_synced: bool | None
    last_scan_wall_ns: int | None
    wall_ns: int | None
    payload_json: str


def parse_events(site: str, device: str, payload: bytes) -> EventBatch:
    """Check an ``events`` payload received on ``qrgate/v1/<site>/<device>/events``.

    Raises BadMessageError (with a log-ready reason) when the payload is not a JSON object,
    names another device, has no ``events`` list, or none of its items is usable.
    """
    obj = loads(payload)
    sent_device = obj.get("device")
    if sent_device != device:
        raise BadMessageError(f"payload device {sent_device!r} is not the topic's {device!r}")
    items = obj.get("events")
    if not isinstance(items, list) or not items:
        raise BadMessageError("no 'events' list, or an empty one")
    events: list[EventRecord] = []
    gaps: list[GapRecord] = []
    rejected: list[str] = []
    for i, item in enumerate(items):
        try:
            if not isinstance(item, dict):
                raise BadMessageError(f"a JSON {type(item).__name__}, not an object")
            if item.get("kind") == "gap":
                gaps.append(_gap(item))
            else:
                events.append(_event(item))
        except BadMessageError as e:
            seq = item.get("seq") if isinstance(item, dict) else None
            rejected.append(f"item {i} (seq {seq!r}): {e}")
    if not events and not gaps:
        raise BadMessageError("no usable item: " + "; ".join(rejected))
    return EventBatch(site, device, tuple(events), tuple(gaps), tuple(rejected))


def parse_status(site: str, device: str, payload: bytes) -> StatusRecord:
    """Check a ``status`` payload received on ``qrgate/v1/<site>/<device>/status``.

    Raises BadMessageError when it is not a JSON object, names another device or site, lacks
    a boolean ``online``, or a field has the wrong type.
    """
    obj = loads(payload)
    if obj.get("device") != device:
        raise BadMessageError(f"payload device {obj.get('device')!r} is not the topic's {device!r}")
    if "site" in obj and obj["site"] != site:
        raise BadMessageError(f"payload site {obj['site']!r} is not the topic's {site!r}")
    online = obj.get("online")
    if not isinstance(online, bool):
        raise BadMessageError(f"'online' must be true or false, found {online!r}")
    return StatusRecord(
        site=site,
        device=device,
        online=online,
        door=_opt_str(obj, "door"),
        version=_opt_str(obj, "version"),
        boot_id=_opt_str(obj, "boot_id"),
        backlog=_opt_int(obj, "backlog", low=0),
        clock_synced=_opt_bool(obj, "clock_synced"),
        last_scan_wall_ns=_opt_int(obj, "last_scan_wall_ns"),
        wall_ns=_opt_int(obj, "wall_ns"),
        payload_json=_json_text(obj),
    )


def _event(item: dict[str, Any]) -> EventRecord:
    codes = item.get("codes", [])
    if not isinstance(codes, list):
        raise BadMessageError(f"'codes' must be a list, found {type(codes).__name__}")
    detail = item.get("detail", {})
    if detail is None:
        detail = {}
    if not isinstance(detail, dict):
        raise BadMessageError(f"'detail' must be an object, found {type(detail).__name__}")
    return EventRecord(
        seq=_int(item, "seq", low=1),
        event_id=_str(item, "event_id", nonempty=True),
        kind=_str(item, "kind", nonempty=True),
        boot_id=_str(item, "boot_id"),
        wall_ns=_int(item, "wall_ns"),
        clock_synced=_bool(item, "clock_synced"),
        mono_ns=_int(item, "mono_ns"),
        door=_str(item, "door"),
        direction=_str(item, "direction"),
        decision=_opt_str(item, "decision"),
        reason=_str(item, "reason"),
        credential_kind=_opt_str(item, "credential_kind"),
        subject=_opt_str(item, "subject"),
        codes_json=_json_text(codes),
        decode_ms=_opt_float(item, "decode_ms"),
        verdict_ms=_opt_float(item, "verdict_ms"),
        frame_to_relay_ms=_opt_float(item, "frame_to_relay_ms"),
        detail_json=_json_text(detail),
    )


def _gap(item: dict[str, Any]) -> GapRecord:
    from_seq = _int(item, "from_seq", low=1)
    to_seq = _int(item, "to_seq", low=from_seq)
    return GapRecord(
        seq=_int(item, "seq", low=1),
        from_seq=from_seq,
        to_seq=to_seq,
        count=_int(item, "count", low=0),
        reason=_str(item, "reason"),
        wall_ns=_opt_int(item, "wall_ns"),
    )


def _int(obj: dict[str, Any], key: str, *, low: int = INT64_MIN) -> int:
    if key not in obj:
        raise BadMessageError(f"'{key}' is missing")
    value = _opt_int(obj, key, low=low)
    if value is None:
        raise BadMessageError(f"'{key}' must be an integer, found null")
    return value


def _opt_int(obj: dict[str, Any], key: str, *, low: int = INT64_MIN) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int subclass in Python; JSON true is no sequence number.
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadMessageError(f"'{key}' must be an integer, found {type(value).__name__}")
    if not low <= value <= INT64_MAX:
        raise BadMessageError(f"'{key}' {value} is outside {low}..{INT64_MAX}")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = _opt_bool(obj, key)
    if value is None:
        raise BadMessageError(f"'{key}' must be true or false, found null or nothing")
    return value


def _opt_bool(obj: dict[str, Any], key: str) -> bool | None:
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise BadMessageError(f"'{key}' must be true or false, found {type(value).__name__}")


def _opt_float(obj: dict[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise BadMessageError(f"'{key}' must be a number, found {type(value).__name__}")
    try:
        result = float(value)
    except OverflowError:
        raise BadMessageError(f"'{key}' {value} is too large for a float") from None
    if not math.isfinite(result):
        raise BadMessageError(f"'{key}' must be finite, found {value!r}")
    return result


def _str(obj: dict[str, Any], key: str, *, nonempty: bool = False) -> str:
    if key not in obj:
        raise BadMessageError(f"'{key}' is missing")
    value = _opt_str(obj, key)
    if value is None:
        raise BadMessageError(f"'{key}' must be a string, found null")
    if nonempty and not value:
        raise BadMessageError(f"'{key}' is empty")
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise BadMessageError(f"'{key}' must be a string, found {type(value).__name__}")
    _check_text(key, value)
    return value


def _check_text(key: str, value: str) -> None:
    # PostgreSQL text cannot hold NUL; a lone surrogate (legal in JSON escapes) is no UTF-8.
    if "\x00" in value:
        raise BadMessageError(f"'{key}' contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadMessageError(f"'{key}' is not valid Unicode text") from None


def _json_text(value: Any) -> str:
    # ensure_ascii escapes NUL and lone surrogates as \u sequences, which both databases keep.
    return json.dumps(value, separators=(",", ":"), sort_keys=True)
