"""The MQTT contract between a reader and the back office (version 1).

Every topic is under ``qrgate/v1/<site>/<device>/``; ``<device>`` is the reader's device id
(board serial or machine-id), ``<site>`` the site name from config. Payloads are UTF-8 JSON
objects. Topic names and payload shapes here are the contract: the reader (``uplink``) and the
reference back office (``qrgate ingest``, ``qrgate fleet status``) both build on this module.

========================  ===========  =====  ========  =========================================
topic (after the prefix)  direction    QoS    retained  payload
========================  ===========  =====  ========  =========================================
``status``                reader →     1      yes       birth: ``{"online": true, "device",
                                                        "site", "door", "version", "boot_id",
                                                        "backlog", "clock_synced", "camera",
                                                        "last_scan_wall_ns", "wall_ns"}``; the
                                                        last will on the same topic:
                                                        ``{"online": false, "device", "site",
                                                        "door", "boot_id"}``
``events``                reader →     1      no        ``{"device", "events": [event, ...]}``,
                                                        events in seq order (one, or a batch
                                                        when draining a backlog); an event is
                                                        the journal row (:func:`event_json`)
                                                        or a gap record ``{"kind": "gap",
                                                        "seq", "from_seq", "to_seq", "count",
                                                        "reason"}``
``events/ack``            → reader     1      yes       ``{"seq": N}``: the highest seq the
                                                        back office has stored with every seq
                                                        below it (contiguous); the reader may
                                                        forget rows up to N
``telemetry``             reader →     0      no        ``{"wall_ns", "fps", "decode_ms_p50",
                                                        "decode_ms_p99", "frames_decoded",
                                                        "frames_dropped", "cpu_percent",
                                                        "temperature_c", "disk_free_bytes", ...}``
``cmd/<name>``            → reader     1      no        ``{"request_id": str, "args": {...}}``;
                                                        names: ``unlock``, ``reload_config``,
                                                        ``report_status``
``cmd/<name>/result``     reader →     1      no        ``{"request_id", "ok": bool,
                                                        "result" | "error"}``
``last_verdict``          reader →     1      yes       the newest decided scan: ``{"seq",
                                                        "event_id", "decision", "reason",
                                                        "credential_kind", "door",
                                                        "wall_ns", "clock_synced"}`` (for
                                                        dashboards; never the subject)
``config/desired``        → reader     1      yes       ``{"version": N, "settings": {section:
                                                        {key: value}}}``: the settings the back
                                                        office wants (:mod:`firmware.uplink.
                                                        desired`); the outcome is the status's
                                                        ``"config"``
``credentials/snapshot``  → reader     1      yes       the signed credential snapshot or
                                                        delta (COSE_Sign1 bytes, not JSON), or
                                                        a pointer ``{"version", "url",
                                                        "sha256", "size"}`` to fetch it from
                                                        (:mod:`firmware.uplink.credentials`);
                                                        also site-wide, see below; the outcome
                                                        is the status's ``"credentials"``
``ota/job``               → reader     1      yes       ``{"job_id", "version",
                                                        "allow_downgrade": bool, "rollout",
                                                        "issued_wall_ns"}``: an update job
                                                        (:class:`ota.jobs.JobRequest`); the same
                                                        ``job_id`` again is the same job (ignored
                                                        once known); an empty payload cancels a
                                                        job that has not started downloading
``ota/state``             reader →     1      yes       ``{"device", "site", "job_id", "state",
                                                        "reason", "from_version", "to_version",
                                                        "step", "bytes_done", "bytes_total",
                                                        "current_version", "detail",
                                                        "wall_ns"}``: the reader's last job
                                                        report (:class:`ota.jobs.StatePayload`;
                                                        states and reason codes in
                                                        :mod:`ota.job`)
========================  ===========  =====  ========  =========================================

Delivery contract: a reader publishes unsent journal rows in seq order, at most a window of
unacknowledged QoS 1 publishes at a time; a row is marked published on its PUBACK and is
forgotten only after ``events/ack`` covers it. Delivery is at least once: the back office
stores events idempotently by (device, event_id) and acknowledges the highest contiguous seq.
A gap record stands for seqs the reader dropped before they were acknowledged, so contiguity
can continue past them: ``reason`` "cap_rows"/"cap_bytes" (the journal's size cap),
"disk_full", "max_age" (the retention period), with ``count`` the rows dropped; or
"journal_damaged"/"journal_missing" (the journal file was lost; seq restarts 10,000 above the
last known), from seq 1 to the seq before the new start, ``count`` 0 (unknown: the back office
keeps what it stored and counts the rest as lost). A row the reader can no longer read is sent
in its place as an incident event with reason ``row_unreadable``, same seq and event id.

Additions (version 1 still; readers of the table above need not know them):

* ``status`` also carries ``"uplink": {"reconnects", "takeovers", "auth_refusals",
  "loop_failures", "inbound_dropped", "published", "resent", "refused"}`` (counters since
  the daemon started).
* ``telemetry`` also carries ``"backlog"`` (unpublished rows) and ``"in_flight"``.
* A gap record's ``"seq"`` is its ``to_seq`` (it stands where the last dropped seq stood) and
  it also carries ``"wall_ns"`` (when the rows were dropped).
* Credential snapshots for a whole site: ``qrgate/v1/<site>/_site/credentials/snapshot``
  (:data:`SITE_WIDE`; device ids never start with ``_``), retained, QoS 1, the same payloads
  as a reader's own ``credentials/snapshot``. A reader subscribes to both; the higher version
  wins, and a lower one on the other topic is reported as ``"superseded"``, not refused.
* ``status`` also carries ``"credentials": {"version", "issued_at", "applied_at", "source",
  "deltas", "counts", "refused": {"version", "why", "reason", "at"} | null, "sources":
  {"device" | "site": {"version", "state", "reason"?}}}`` (:mod:`firmware.uplink.credentials`).
* Home Assistant MQTT discovery (opt-in), retained, under
  ``homeassistant/<component>/<node>/<object>/config`` with ``<node>`` = ``qrgate_<device>``:
  ``binary_sensor/<node>/online`` (from ``status``), ``sensor/<node>/last_verdict`` (from
  ``last_verdict``), ``button/<node>/unlock`` (publishes to ``cmd/unlock``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from firmware.exceptions import BadMessageError
from firmware.journal.events import StoredEvent
from firmware.journal.outbox import GapRecord

PREFIX = "qrgate/v1"
HA_PREFIX = "homeassistant"
MAX_MESSAGE_BYTES = 256 * 1024
"""Inbound messages larger than this are refused unread (a 1 MB command is hostile)."""

COMMANDS = ("unlock", "reload_config", "report_status")
SITE_WIDE = "_site"
"""The device part of site-wide topics (``qrgate/v1/<site>/_site/...``)."""


@dataclass(frozen=True, slots=True)
class Topics:
    """The topics of one reader. ``site`` and ``device`` must not contain ``/``, ``+``, ``#``."""

    site: str
    device: str

    def __post_init__(self) -> None:
        for name, value in (("site", self.site), ("device", self.device)):
            if not value or any(c in value for c in "/+#\x00"):
                raise ValueError(f"{name} {value!r} cannot be part of an MQTT topic")

    @property
    def base(self) -> str:
        """``qrgate/v1/<site>/<device>``."""
        return f"{PREFIX}/{self.site}/{self.device}"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def events(self) -> str:
        return f"{self.base}/events"

    @property
    def events_ack(self) -> str:
        return f"{self.base}/events/ack"

    @property
    def telemetry(self) -> str:
        return f"{self.base}/telemetry"

    def command(self, name: str) -> str:
        """``.../cmd/<name>``; ``name`` may be ``+`` for a subscription."""
        return f"{self.base}/cmd/{name}"

    def command_result(self, name: str) -> str:
        return f"{self.base}/cmd/{name}/result"

    @property
    def config_desired(self) -> str:
        return f"{self.base}/config/desired"

    @property
    def last_verdict(self) -> str:
        return f"{self.base}/last_verdict"

    @property
    def credentials_snapshot(self) -> str:
        """``.../credentials/snapshot``: this reader's own snapshot."""
        return f"{self.base}/credentials/snapshot"

    @property
    def site_credentials_snapshot(self) -> str:
        """``qrgate/v1/<site>/_site/credentials/snapshot``: the site's snapshot."""
        return site_credentials_topic(self.site)


def site_credentials_topic(site: str) -> str:
    """``qrgate/v1/<site>/_site/credentials/snapshot``: the snapshot every reader of ``site``
    takes (see the module docstring)."""
    return f"{PREFIX}/{site}/{SITE_WIDE}/credentials/snapshot"


def ha_node(device: str) -> str:
    """The Home Assistant node id of a reader: ``qrgate_<device>``."""
    return f"qrgate_{device}"


def ha_discovery_topic(component: str, node: str, obj: str) -> str:
    """``homeassistant/<component>/<node>/<object>/config``."""
    return f"{HA_PREFIX}/{component}/{node}/{obj}/config"


def parse_topic(topic: str) -> tuple[str, str, str] | None:
    """(site, device, rest) of a contract topic, or None when it is not one of ours."""
    parts = topic.split("/", 4)
    if len(parts) < 5 or f"{parts[0]}/{parts[1]}" != PREFIX:
        return None
    return parts[2], parts[3], parts[4]


# Subscriptions of the back office (shared subscriptions spread them over ingest workers).
ALL_EVENTS = f"{PREFIX}/+/+/events"
ALL_STATUS = f"{PREFIX}/+/+/status"


def event_json(stored: StoredEvent) -> dict[str, Any]:
    """A journal row as it travels in ``events`` (never the raw payload: subjects are HMACs)."""
    e = stored.event
    return {
        "kind": e.kind,
        "seq": stored.seq,
        "event_id": stored.event_id,
        "boot_id": stored.boot_id,
        "wall_ns": e.wall_ns,
        "clock_synced": e.clock_synced,
        "mono_ns": e.mono_ns,
        "door": e.door,
        "direction": e.direction,
        "decision": e.decision,
        "reason": e.reason,
        "credential_kind": e.credential_kind,
        "subject": e.subject,
        "codes": list(e.codes),
        "decode_ms": e.decode_ms,
        "verdict_ms": e.verdict_ms,
        "frame_to_relay_ms": e.frame_to_relay_ms,
        "detail": e.detail,
    }


def gap_json(gap: GapRecord) -> dict[str, Any]:
    """A gap record as it travels in ``events``: seqs ``from_seq``..``to_seq`` (``count`` rows)
    were dropped for ``reason``; ``seq`` is ``to_seq``."""
    return {
        "kind": "gap",
        "seq": gap.to_seq,
        "from_seq": gap.from_seq,
        "to_seq": gap.to_seq,
        "count": gap.count,
        "reason": gap.reason,
        "wall_ns": gap.wall_ns,
    }


def dumps(obj: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def loads(payload: bytes) -> dict[str, Any]:
    """Parse an inbound payload. Raises BadMessageError (oversized, not UTF-8 JSON, not an
    object) with a reason fit for a log line."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise BadMessageError(f"{len(payload)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise BadMessageError(f"not UTF-8 (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise BadMessageError(f"not JSON ({e.msg} at {e.pos})") from None
    except RecursionError:
        raise BadMessageError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
        raise BadMessageError(f"a JSON {type(obj).__name__}, not an object")
    return obj
