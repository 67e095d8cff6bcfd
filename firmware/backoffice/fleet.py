"""The fleet at a glance: every reader's retained ``status`` topic, read from the broker.

The broker sends the retained statuses as soon as the subscription is granted. To know when
they are all in without guessing, :func:`collect_status` then publishes one message to a
probe topic of its own, also subscribed: the broker delivers in order, so the probe comes
back after the last retained status. Where an ACL forbids that topic the probe never comes
back and collection ends after ``settle_s``.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions
from rich.table import Table

from firmware.backoffice.mqtt import MqttSettings
from firmware.backoffice.records import StatusRecord, parse_status
from firmware.exceptions import BadMessageError, BrokerConnectError
from firmware.uplink.topics import ALL_STATUS, parse_topic
from ota.exceptions import JobPayloadError
from ota.jobs import StatePayload, all_states, parse_ota_topic

DEFAULT_SETTLE_S = 2.0
CONNECT_TIMEOUT_S = 10.0
PROBE_PREFIX = "qrgate/fleet-probe"
COLUMNS = ("Device", "Site", "Door", "Version", "Online", "Backlog", "Clock synced",
           "Last scan", "Last job")  # fmt: skip


@dataclass(frozen=True, slots=True)
class FleetSnapshot:
    """What the broker held: ``readers`` (one status per device, by site, door, device),
    ``malformed`` (one log-ready reason per status that failed the contract) and
    ``complete`` (True when the probe proved every retained status was in) and ``jobs``."""

    readers: tuple[StatusRecord, ...]
    malformed: tuple[str, ...]
    complete: bool
    #: each reader's last update job by (site, device), from its retained ``ota/state``
    jobs: Mapping[tuple[str, str], StatePayload] = field(default_factory=dict)


def collect_status(
    settings: MqttSettings, *, settle_s: float = DEFAULT_SETTLE_S, client_id: str | None = None
) -> FleetSnapshot:
    """Subscribe to every reader's retained status and return it, after at most ``settle_s``
    seconds once the subscription is granted (less when the probe comes back).

    Raises BrokerConnectError when the broker cannot be reached, refuses the login or the
    subscription, or does not answer within ``CONNECT_TIMEOUT_S``.
    """
    probe = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    client = settings.client(client_id or f"qrgate-fleet-{uuid.uuid4().hex[:12]}")
    connacks: queue.Queue[ReasonCode | None] = queue.Queue()
    subacks: queue.Queue[list[ReasonCode]] = queue.Queue()
    messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    client.on_connect = lambda _c, _u, _f, rc, _p: connacks.put(rc)
    # A broker that drops the connection before its CONNACK (a TLS client certificate it
    # refuses) must not leave us waiting for the timeout.
    client.on_disconnect = lambda _c, _u, _f, rc, _p: connacks.put(None)
    client.on_subscribe = lambda _c, _u, _m, rcs, _p: subacks.put(rcs)
    client.on_message = lambda _c, _u, msg: messages.put(msg)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    try:
        client.connect(
            settings.host, settings.port, settings.keepalive_s, clean_start=True, properties=props
        )
    except (OSError, ValueError) as e:
        raise BrokerConnectError(f"cannot reach broker {settings.address}: {e}") from e
    client.loop_start()
    try:
        rc = _get(connacks, CONNECT_TIMEOUT_S, settings, "CONNACK")
        if rc is None:
            raise BrokerConnectError(
                f"broker {settings.address} closed the connection before accepting it "
                "(client certificate or TLS settings refused?)"
            )
        if rc.is_failure:
            raise BrokerConnectError(f"broker {settings.address} refused the login: {rc}")
        client.subscribe([
            (ALL_STATUS, SubscribeOptions(qos=1)),
            (all_states(), SubscribeOptions(qos=1)),
            (probe, SubscribeOptions(qos=1)),
        ])  # fmt: skip
        rcs = _get(subacks, CONNECT_TIMEOUT_S, settings, "SUBACK")
        if rcs[0].is_failure:
            raise BrokerConnectError(
                f"broker {settings.address} refused the status subscription: {rcs[0]}"
            )
        client.publish(probe, b"probe", qos=1)
        return _gather(messages, probe, settle_s)
    finally:
        # paho's loop thread may take one more turn on the socket our clean disconnect
        # closed, and logs that as an error ("Client is not connected"): it is not one here
        quiet = logging.getLogger("qrgate.backoffice.paho.fleet")
        quiet.addFilter(_after_disconnect)
        client.enable_logger(quiet)
        client.disconnect()
        client.loop_stop()


def _after_disconnect(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Client is not connected")


def _get(q: queue.Queue[Any], timeout_s: float, settings: MqttSettings, what: str) -> Any:
    try:
        return q.get(timeout=timeout_s)
    except queue.Empty:
        raise BrokerConnectError(
            f"broker {settings.address} sent no {what} within {timeout_s:.0f} s"
        ) from None


def _gather(messages: queue.Queue[mqtt.MQTTMessage], probe: str, settle_s: float) -> FleetSnapshot:
    deadline = time.monotonic() + settle_s
    latest: dict[str, StatusRecord] = {}
    jobs: dict[tuple[str, str], StatePayload] = {}
    malformed: list[str] = []
    complete = False
    while not complete:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            msg = messages.get(timeout=left)
        except queue.Empty:
            break
        if msg.topic == probe:
            complete = True
            continue
        ota = parse_ota_topic(msg.topic)
        if ota is not None and ota[2] == "state" and msg.payload:
            try:
                jobs[ota[:2]] = StatePayload.parse(bytes(msg.payload), site=ota[0], device=ota[1])
            except JobPayloadError as e:
                malformed.append(f"{msg.topic}: {e}")
            continue
        parsed = parse_topic(msg.topic)
        if parsed is None or parsed[2] != "status" or not msg.payload:
            continue
        site, device, _ = parsed
        try:
            latest[device] = parse_status(site, device, bytes(msg.payload))
        except BadMessageError as e:
            malformed.append(f"{msg.topic}: {e}")
    readers = sorted(latest.values(), key=lambda s: (s.site, s.door or "", s.device))
    return FleetSnapshot(tuple(readers), tuple(malformed), complete, jobs)


def fleet_rows(snapshot: FleetSnapshot, tz: dt.tzinfo) -> list[tuple[str, ...]]:
    """One tuple of cell texts per reader, in ``COLUMNS`` order: unknown values are "-",
    flags "yes"/"no", the last scan as local ``YYYY-MM-DD HH:MM:SS`` in ``tz``, the last
    job as ``STATE reason from→to``."""
    rows: list[tuple[str, ...]] = []
    for s in snapshot.readers:
        rows.append((
            s.device, s.site, _text(s.door), _text(s.version), _yes(s.online),
            _text(s.backlog), _yes(s.clock_synced), _when(s.last_scan_wall_ns, tz),
            _job(snapshot.jobs.get((s.site, s.device))),
        ))  # fmt: skip
    return rows


def fleet_table(snapshot: FleetSnapshot, tz: dt.tzinfo) -> Table:
    """A rich table of :func:`fleet_rows`, offline readers in red."""
    online = sum(1 for s in snapshot.readers if s.online)
    table = Table(title=f"{len(snapshot.readers)} readers, {online} online")
    for name in COLUMNS:
        table.add_column(name, justify="right" if name == "Backlog" else "left")
    for status, row in zip(snapshot.readers, fleet_rows(snapshot, tz), strict=True):
        table.add_row(*row, style=None if status.online else "red")
    return table


def _job(report: StatePayload | None) -> str:
    if report is None:
        return "-"
    return f"{report.state.value} {report.reason} {report.from_version}→{report.to_version}"


def _text(value: object) -> str:
    return "-" if value is None else str(value)


def _yes(flag: bool | None) -> str:
    return "-" if flag is None else "yes" if flag else "no"


def _when(wall_ns: int | None, tz: dt.tzinfo) -> str:
    if wall_ns is None:
        return "-"
    when = dt.datetime.fromtimestamp(wall_ns / 1e9, tz)
    return when.strftime("%Y-%m-%d %H:%M:%S")
