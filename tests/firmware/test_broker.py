"""The loopback mosquitto harness (firmware.demo.broker) against a real broker and paho-mqtt 2.x:
round trip, persistence across kill -9, kill really kills, TLS client certificates, errors."""

from __future__ import annotations

import os
import queue
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from firmware.demo.broker import LocalBroker, TlsFiles, make_test_pki
from firmware.exceptions import BrokerError

WAIT_S = 10.0  # generous upper bound for a loopback event; never an expected duration


pytestmark = pytest.mark.usefixtures("need_mosquitto")


class Client:
    """A paho client (callback API 2) whose events land in queues; loop thread stopped on exit."""

    def __init__(self, client_id: str, *, clean_session: bool = True) -> None:
        self.paho = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
        )
        self.connects: queue.Queue[ReasonCode] = queue.Queue()
        self.disconnects: queue.Queue[ReasonCode] = queue.Queue()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.subscribed = threading.Event()
        self.paho.on_connect = lambda _c, _u, _f, rc, _p: self.connects.put(rc)
        self.paho.on_disconnect = lambda _c, _u, _f, rc, _p: self.disconnects.put(rc)
        self.paho.on_message = lambda _c, _u, msg: self.messages.put(msg)
        self.paho.on_subscribe = lambda _c, _u, _m, _rcs, _p: self.subscribed.set()

    def subscribe(self, topic: str) -> None:
        self.subscribed.clear()
        self.paho.subscribe(topic, qos=1)
        assert self.subscribed.wait(WAIT_S)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1; returns once the broker's PUBACK is in."""
        info = self.paho.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def sync(self) -> None:
        """One more QoS 1 round trip. mosquitto is single-threaded and saves its database at
        the end of the loop pass that handled a change, so once a later packet is answered,
        everything acknowledged before it is on disk and survives kill()."""
        self.publish("qrgate/test/sync", b"")

    def receive(self) -> mqtt.MQTTMessage:
        return self.messages.get(timeout=WAIT_S)


def tls_context(tls: TlsFiles, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    """Verifies the broker against the test CA and its 127.0.0.1 SAN. TLS 1.3 only, so a
    broker that wants a certificate refuses after the client's handshake, never inside paho's
    connect() (which would leave its socket unclosed)."""
    ctx = ssl.create_default_context(cafile=str(tls.ca_cert))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(certfile=str(cert[0]), keyfile=str(cert[1]))
    return ctx


@contextmanager
def connected(
    broker: LocalBroker,
    client_id: str,
    *,
    clean_session: bool = True,
    tls: TlsFiles | None = None,
    cert: tuple[Path, Path] | None = None,
) -> Iterator[Client]:
    """A client connected to ``broker`` (CONNACK success asserted), disconnected afterwards."""
    c = Client(client_id, clean_session=clean_session)
    if tls is not None:
        c.paho.tls_set_context(tls_context(tls, cert))
    c.paho.connect(broker.host, broker.port)
    c.paho.loop_start()
    try:
        rc = c.connects.get(timeout=WAIT_S)
        assert not rc.is_failure, rc
        yield c
    finally:
        c.paho.disconnect()
        c.paho.loop_stop()


def refuses(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_round_trip_and_config(tmp_path: Path) -> None:
    with LocalBroker(tmp_path / "b") as broker:
        assert broker.running
        assert broker.host == "127.0.0.1"
        assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
        conf = broker.config_path.read_text().splitlines()
        assert f"listener {broker.port} 127.0.0.1" in conf
        assert "max_queued_messages 100000" in conf
        assert f"persistence_location {tmp_path / 'b'}/" in conf
        with connected(broker, "backend") as sub, connected(broker, "reader-1") as pub:
            sub.subscribe("qrgate/test/#")
            pub.publish("qrgate/test/scan", b'{"seq": 1, "result": "granted"}')
            msg = sub.receive()
            assert (msg.topic, msg.payload, msg.qos) == (
                "qrgate/test/scan",
                b'{"seq": 1, "result": "granted"}',
                1,
            )
        pid, port = broker.pid, broker.port
    assert not broker.running
    assert pid is not None and pid_gone(pid)
    assert refuses(port)
    assert "mosquitto version" in broker.log_path.read_text()
    broker.stop()  # idempotent
    assert not broker.running


def test_kill_really_kills_and_restart_keeps_retained_message(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path / "b")
    try:
        broker.start()
        port = broker.port
        with connected(broker, "reader-1") as pub:
            pub.publish("qrgate/door-1/status", b"online", retain=True)
            pub.sync()
        first_pid = broker.pid
        broker.kill()
        assert first_pid is not None and pid_gone(first_pid)
        assert not broker.running
        assert refuses(port)
        assert (tmp_path / "b" / "mosquitto.db").is_file()
        broker.kill()  # idempotent too

        broker.restart()
        assert broker.running
        assert broker.port == port
        assert broker.pid != first_pid
        with connected(broker, "backend") as sub:
            sub.subscribe("qrgate/+/status")
            msg = sub.receive()
            assert (msg.topic, msg.payload, msg.retain) == ("qrgate/door-1/status", b"online", True)
    finally:
        broker.stop()
    assert not broker.running


def test_queued_qos1_for_absent_backend_survives_kill(tmp_path: Path) -> None:
    with LocalBroker(tmp_path / "b") as broker:
        with connected(broker, "backend", clean_session=False) as backend:
            backend.subscribe("qrgate/door-1/scans")
        payloads = [f"scan {i}".encode() for i in range(5)]
        with connected(broker, "reader-1") as pub:
            for p in payloads:
                pub.publish("qrgate/door-1/scans", p)
            pub.sync()
        broker.kill()
        broker.start()
        with connected(broker, "backend", clean_session=False) as backend:
            got = [backend.receive().payload for _ in payloads]
        assert got == payloads


def test_stop_then_start_keeps_retained_message_without_sync(tmp_path: Path) -> None:
    # SIGTERM makes mosquitto write its database on the way out, whatever autosave did.
    with LocalBroker(tmp_path / "b") as broker:
        with connected(broker, "reader-1") as pub:
            pub.publish("qrgate/door-1/status", b"online", retain=True)
        broker.restart()
        with connected(broker, "backend") as sub:
            sub.subscribe("qrgate/door-1/status")
            assert sub.receive().payload == b"online"


def test_without_persistence_kill_forgets(tmp_path: Path) -> None:
    with LocalBroker(tmp_path / "b", persistence=False) as broker:
        with connected(broker, "reader-1") as pub:
            pub.publish("qrgate/door-1/status", b"online", retain=True)
            pub.sync()
        broker.kill()
        broker.start()
        with connected(broker, "backend") as sub:
            sub.subscribe("qrgate/door-1/status")
            # The broker answers a later publish, so a retained message would have come first.
            sub.subscribe("qrgate/test/sync")
            sub.sync()
            msg = sub.receive()
            assert (msg.topic, msg.payload) == ("qrgate/test/sync", b"")
    assert not (tmp_path / "b" / "mosquitto.db").exists()


def test_pki_files(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", clients=("reader-1", "backend"))
    assert pki.client_cert == tmp_path / "pki" / "client-reader-1.crt"
    assert pki.client_key == tmp_path / "pki" / "client-reader-1.key"
    assert set(pki.clients) == {"reader-1", "backend"}
    for key in [pki.server_key, tmp_path / "pki" / "ca.key", *(k for _, k in pki.clients.values())]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    server = x509.load_pem_x509_certificate(pki.server_cert.read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    client = x509.load_pem_x509_certificate(pki.clients["backend"][0].read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "backend"
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    assert client.issuer == ca.subject
    client.verify_directly_issued_by(ca)
    with pytest.raises(ValueError, match="client name"):
        make_test_pki(tmp_path / "bad", clients=("../evil",))


def test_tls_client_certificate_required(tmp_path: Path) -> None:
    pki = make_test_pki(tmp_path / "pki", clients=("reader-1",))
    with LocalBroker(tmp_path / "b", tls=pki, require_certificate=True) as broker:
        assert broker.url == f"mqtts://127.0.0.1:{broker.port}"
        with connected(broker, "reader-1", tls=pki, cert=pki.clients["reader-1"]) as c:
            c.subscribe("qrgate/test/tls")
            c.publish("qrgate/test/tls", b"over tls")
            assert c.receive().payload == b"over tls"
        # The certificate's CN became the MQTT username.
        assert "u'reader-1'" in broker.log_path.read_text()

        anon = Client("no-cert")
        anon.paho.tls_set_context(tls_context(pki, None))
        try:
            anon.paho.connect(broker.host, broker.port)
            anon.paho.loop_start()
            rc = anon.disconnects.get(timeout=WAIT_S)
            assert rc.is_failure
            assert anon.connects.empty()
        finally:
            anon.paho.disconnect()
            anon.paho.loop_stop()
        assert "peer did not return a certificate" in broker.log_path.read_text()


def test_require_certificate_needs_tls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="tls"):
        LocalBroker(tmp_path, require_certificate=True)


def test_missing_binary(tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        LocalBroker(tmp_path, binary=str(tmp_path / "no-such-mosquitto"))
    assert not (tmp_path / "mosquitto.conf").exists()


def test_bad_config_fails_with_log_tail_and_no_process(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path, extra_config="no_such_option 1")
    with pytest.raises(BrokerError, match="no_such_option") as err:
        broker.start()
    assert "exited with code" in str(err.value)
    assert not broker.running
    assert broker.pid is not None and pid_gone(broker.pid)


def test_taken_port_fails_with_log_tail(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        broker = LocalBroker(tmp_path, port=port)
        with pytest.raises(BrokerError, match="Address already in use"):
            broker.start()
        assert not broker.running
        assert broker.port == port


def test_exception_inside_with_still_stops(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path)
    with pytest.raises(KeyError), broker:
        pid = broker.pid
        raise KeyError("boom")
    assert pid is not None and pid_gone(pid)
    assert not broker.running
