"""The MQTT seam of the fleet rollout and the simulator: a small :class:`Transport` protocol
and its paho-mqtt implementation.

:class:`PahoTransport` takes a ready-made, unconnected paho client, so the caller decides TLS,
login and MQTT version (``firmware.backoffice.mqtt.MqttSettings.client`` in the command line;
a plain client in tests): ``ota`` itself imports nothing from ``firmware``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ota.exceptions import FleetTransportError

__all__ = ["PahoTransport", "Transport", "collect_retained", "plain_client"]

CONNECT_TIMEOUT_S = 10.0
PUBLISH_TIMEOUT_S = 30.0
MAX_INFLIGHT = 200
"""Unacknowledged QoS 1 publishes on the wire at once (paho queues the rest in order)."""

PROBE_PREFIX = "qrgate/fleet-probe"

log = logging.getLogger(__name__)


def _after_disconnect(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Client is not connected")


_QUIET = logging.getLogger("ota.mqtt.paho")
_QUIET.addFilter(_after_disconnect)


class Transport(Protocol):
    """What the rollout needs from a broker connection. Every method raises
    FleetTransportError when the broker refuses or does not answer in time."""

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Send a message (it may still be in flight: :meth:`flush` waits for it)."""

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe (granted when this returns); retained messages follow in
        :meth:`next_message`."""

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        """The next received ``(topic, payload)``, or None after ``timeout_s`` seconds."""

    def flush(self, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        """Return once the broker acknowledged every publish so far."""


def plain_client(client_id: str) -> mqtt.Client:
    """An unconnected MQTT 5 paho client without TLS or login (tests, the simulator)."""
    return mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)


class PahoTransport:
    """:class:`Transport` on ``client`` (paho, callback API 2, not yet connected), to
    ``host``:``port``. :meth:`connect` starts paho's network thread; :meth:`close` (also on
    ``with`` exit) stops it. paho reconnects by itself; the subscriptions are then made again
    and retained messages arrive again, which readers of :meth:`next_message` must accept.
    ``published``/``received`` count messages (for the benchmark)."""

    def __init__(
        self,
        client: mqtt.Client,
        host: str,
        port: int,
        *,
        keepalive_s: int = 30,
        timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        self._client = client
        self._host, self._port = host, port
        self._keepalive_s = keepalive_s
        self._timeout_s = timeout_s
        self._messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connack: queue.Queue[Any] = queue.Queue()
        self._subacks: dict[int, list[Any]] = {}
        self._cond = threading.Condition()
        self._topics: dict[str, int] = {}
        self._pending: list[mqtt.MQTTMessageInfo] = []
        self._connected_once = False
        self._started = False
        self.published = 0
        self.received = 0
        client.max_inflight_messages_set(MAX_INFLIGHT)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if self._connected_once and not rc.is_failure:
            # a reconnect with a clean session: subscribe again (no waiting in this thread)
            for topic, qos in self._topics.items():
                client.subscribe(topic, qos=qos)
        self._connack.put(rc)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if not self._connected_once:
            # closed before CONNACK (a refused TLS client certificate): do not wait it out
            self._connack.put(None)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = list(codes)
            self._cond.notify_all()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self.received += 1
        self._messages.put((msg.topic, bytes(msg.payload)))

    def connect(self) -> None:
        """Connect and wait for the CONNACK. Raises FleetTransportError (unreachable,
        refused, no answer within the timeout)."""
        try:
            if self._client.protocol == mqtt.MQTTv5:
                self._client.connect(self._host, self._port, self._keepalive_s, clean_start=True)
            else:
                self._client.connect(self._host, self._port, self._keepalive_s)
        except (OSError, ValueError) as e:
            raise FleetTransportError(f"cannot reach broker {self.address}: {e}") from e
        self._client.loop_start()
        self._started = True
        try:
            rc = self._connack.get(timeout=self._timeout_s)
        except queue.Empty:
            self.close()
            raise FleetTransportError(
                f"broker {self.address} sent no CONNACK within {self._timeout_s:.0f} s"
            ) from None
        if rc is None or rc.is_failure:
            self.close()
            why = "closed the connection" if rc is None else f"refused the login: {rc}"
            raise FleetTransportError(f"broker {self.address} {why}")
        self._connected_once = True

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish; raises FleetTransportError when paho refuses it outright."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            # NO_CONN: paho keeps QoS 1 messages and sends them after its reconnect
            raise FleetTransportError(f"publish to {topic} failed: {mqtt.error_string(info.rc)}")
        self.published += 1
        if qos > 0:
            self._pending.append(info)
            if len(self._pending) >= 4 * MAX_INFLIGHT:
                # a long-lived publisher (the simulator) never flushes: forget acknowledged ones
                self._pending = [i for i in self._pending if not i.is_published()]

    def flush(self, timeout_s: float = PUBLISH_TIMEOUT_S) -> None:
        """Wait until every QoS 1 publish so far is acknowledged (at most ``timeout_s``
        seconds in all). Raises FleetTransportError when the broker does not take them."""
        deadline = time.monotonic() + timeout_s
        for info in self._pending:
            left = deadline - time.monotonic()
            try:
                info.wait_for_publish(max(left, 0.001))
            except (RuntimeError, ValueError) as e:
                raise FleetTransportError(f"broker {self.address} lost a publish: {e}") from None
            if not info.is_published():
                raise FleetTransportError(
                    f"broker {self.address} did not acknowledge publishes within {timeout_s:.0f} s"
                )
        self._pending.clear()

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK. Raises FleetTransportError when refused."""
        rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise FleetTransportError(f"cannot subscribe to {topic}: {mqtt.error_string(rc)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, self._timeout_s):
                raise FleetTransportError(f"broker {self.address} sent no SUBACK for {topic}")
            codes = self._subacks.pop(mid)
        if any(getattr(c, "is_failure", False) for c in codes):
            raise FleetTransportError(f"broker {self.address} refused the subscription {topic}")
        self._topics[topic] = qos

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        try:
            return self._messages.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def close(self) -> None:
        """Disconnect and stop the network thread; idempotent."""
        if self._started:
            self._started = False
            # paho's loop thread may take one more turn on the socket our clean disconnect
            # closed and log "Client is not connected" as an error: it is not one here
            self._client.enable_logger(_QUIET)
            self._client.disconnect()
            self._client.loop_stop()

    def __enter__(self) -> PahoTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def collect_retained(
    transport: Transport, topic_filter: str, *, settle_s: float = 2.0
) -> tuple[dict[str, bytes], bool]:
    """Every retained message under ``topic_filter`` (``{topic: payload}``, empty payloads
    left out) and whether the set is known complete.

    The broker sends retained messages right after the SUBACK; a probe message published to
    a topic of our own then comes back after the last of them (the broker keeps order), so
    there is no guessing. Where an ACL forbids the probe topic, collection ends after
    ``settle_s`` seconds and the second value is False. Raises FleetTransportError."""
    probe = f"{PROBE_PREFIX}/{uuid.uuid4().hex}"
    transport.subscribe(topic_filter)
    transport.subscribe(probe)
    transport.publish(probe, b"probe", qos=1)
    deadline = time.monotonic() + settle_s
    found: dict[str, bytes] = {}
    while (left := deadline - time.monotonic()) > 0:
        msg = transport.next_message(left)
        if msg is None:
            break
        topic, payload = msg
        if topic == probe:
            return found, True
        if payload:
            found[topic] = payload
        else:
            found.pop(topic, None)
    return found, False
