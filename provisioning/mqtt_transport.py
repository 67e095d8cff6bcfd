"""A :class:`provisioning.enroll.Transport` on paho-mqtt (MQTT 3.1.1 over TLS).

It imports paho only (a library, not firmware), so :mod:`provisioning.enroll` stays free of
MQTT code and its tests can use any transport. Used by ``qrgate enroll serve`` and by the
reader's provisioning mode for its one enrollment connection (the long-running uplink has its
own client in :mod:`firmware.uplink`).
"""

from __future__ import annotations

import queue
import ssl
import threading
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from provisioning.exceptions import EnrollmentError

__all__ = ["PahoTransport"]

_WAIT_S = 15.0


class PahoTransport:
    """paho client with its network thread; received messages wait in a queue. paho
    reconnects by itself after a lost connection, and the subscriptions are made again. Every
    failure raises EnrollmentError with reason "transport" (retry later, or check the broker
    address, CA file and credentials)."""

    def __init__(self, client_id: str, *, wait_s: float = _WAIT_S) -> None:
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311
        )
        self._wait_s = wait_s
        self._messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._connected = threading.Event()
        self._refusal: str | None = None
        self._subacks: dict[int, list[int]] = {}
        self._cond = threading.Condition()
        self._started = False
        self._topics: dict[str, int] = {}
        c = self._client
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        c.on_disconnect = self._on_disconnect

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        if getattr(rc, "is_failure", True):
            self._refusal = str(rc)
        elif self._connected.is_set():
            # paho reconnected by itself with a clean session: subscribe again (no wait here,
            # in the network thread; the SUBACK lands in _subacks unread)
            for topic, qos in self._topics.items():
                client.subscribe(topic, qos=qos)
        self._connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        # before CONNACK: the broker closed the connection, e.g. a TLS 1.3 alert for a missing
        # client certificate, which arrives after the client's side of the handshake is done
        if not self._connected.is_set():
            self._refusal = f"connection closed before CONNACK ({rc})"
            self._connected.set()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        self._messages.put((msg.topic, bytes(msg.payload)))

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        with self._cond:
            self._subacks[mid] = [c.value for c in codes]
            self._cond.notify_all()

    def connect(
        self,
        host: str,
        port: int,
        ca_file: str,
        username: str | None = None,
        password: str | None = None,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """TLS 1.2+ to ``host``:``port`` checking the broker's certificate against ``ca_file``
        and its name; password login or a client certificate. Waits for CONNACK."""
        try:
            ctx = ssl.create_default_context(cafile=ca_file)
            if cert_file is not None:
                ctx.load_cert_chain(cert_file, key_file)
            self._client.tls_set_context(ctx)
            if username is not None:
                self._client.username_pw_set(username, password)
            self._client.connect(host, port)
        except (OSError, ssl.SSLError, ValueError) as e:
            raise EnrollmentError("transport", f"cannot connect to {host}:{port}: {e}") from None
        self._client.loop_start()
        self._started = True
        if not self._connected.wait(self._wait_s):
            self.close()
            raise EnrollmentError("transport", f"{host}:{port} did not answer CONNECT")
        if self._refusal is not None:
            self.close()
            raise EnrollmentError("transport", f"{host}:{port} refused the login: {self._refusal}")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        info = self._client.publish(topic, payload, qos=qos)
        try:
            info.wait_for_publish(self._wait_s)
        except (RuntimeError, ValueError) as e:
            raise EnrollmentError("transport", f"publish failed: {e}") from None
        if not info.is_published():
            raise EnrollmentError("transport", f"the broker did not take {topic}")

    def subscribe(self, topic: str, qos: int = 1) -> None:
        rc, mid = self._client.subscribe(topic, qos=qos)
        if rc != mqtt.MQTT_ERR_SUCCESS or mid is None:
            raise EnrollmentError("transport", f"cannot subscribe: {mqtt.error_string(rc)}")
        with self._cond:
            if not self._cond.wait_for(lambda: mid in self._subacks, self._wait_s):
                raise EnrollmentError("transport", f"no SUBACK for {topic}")
            codes = self._subacks.pop(mid)
        if any(c >= 0x80 for c in codes):
            raise EnrollmentError("transport", f"the broker refused the subscription {topic}")
        self._topics[topic] = qos

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        try:
            return self._messages.get(timeout=max(timeout_s, 0.0))
        except queue.Empty:
            return None

    def close(self) -> None:
        if self._started:
            self._started = False
            self._client.disconnect()
            self._client.loop_stop()
