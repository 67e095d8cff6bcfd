"""The generated mosquitto configuration on a real mosquitto: TLS with client certificates
from the fleet CA, the CRL, and the ACL that keeps each reader to its own topics.

mosquitto drops a publish the ACL denies without telling the client (a QoS 1 publish still
gets its PUBACK in MQTT 3.1.1), so "not delivered" is shown by ordering: a control message
sent after the denied one on the same connection arrives, and nothing came before it.
"""

from __future__ import annotations

import os
import queue
import signal
import ssl
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from firmware.demo.broker import HOST, LocalBroker, free_port, make_test_pki
from provisioning import ca
from tests.polling import wait_until
from tests.provisioning.test_ca import key_pem, make_csr

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")

SITE = "lab"
A, B = "10000000aaaa0001", "10000000bbbb0002"
WAIT_S = 10.0


def own(device: str, rest: str) -> str:
    return f"qrgate/v1/{SITE}/{device}/{rest}"


@dataclass(frozen=True)
class Fleet:
    ca_dir: Path
    broker_dir: Path
    broker: LocalBroker
    port: int
    certs: Path

    def enroll(self, device: str) -> tuple[Path, Path]:
        """A reader's key made here, its CSR signed by the CA: (cert, key) files."""
        key = ec.generate_private_key(ec.SECP256R1())
        _, csr = make_csr(device, key)
        n = len(list(self.certs.glob(f"{device}-*.crt")))
        crt, kf = self.certs / f"{device}-{n}.crt", self.certs / f"{device}-{n}.key"
        crt.write_bytes(ca.sign_csr(self.ca_dir, csr, expect_cn=device))
        kf.write_bytes(key_pem(key))
        return crt, kf


@pytest.fixture
def fleet(tmp_path: Path, stack: ExitStack) -> Fleet:
    ca_dir, broker_dir, certs = tmp_path / "ca", tmp_path / "broker", tmp_path / "certs"
    ca.init_ca(ca_dir, name="test fleet")
    port = free_port()
    files = ca.broker_config(
        ca_dir, broker_dir, host=[HOST, "localhost"], port=port, bind_address=HOST
    )
    bo_cert, bo_key = ca.sign_service(ca_dir, "backoffice")
    certs.mkdir()
    (certs / "backoffice.crt").write_bytes(bo_cert)
    (certs / "backoffice.key").write_bytes(bo_key)
    # LocalBroker's own plain listener (which it polls to see the broker up) plus the
    # generated TLS listener, verbatim; its allow_anonymous false and ACL cover both.
    broker = LocalBroker(
        tmp_path / "mosquitto",
        allow_anonymous=False,
        persistence=False,
        extra_config=files.conf.read_text(),
    )
    stack.callback(broker.stop)
    broker.start()
    return Fleet(ca_dir, broker_dir, broker, port, certs)


def tls(fleet: Fleet, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    # A reader trusts the root only: the broker sends the issuing CA with its certificate.
    ctx = ssl.create_default_context(cafile=str(fleet.ca_dir / "root.crt"))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


class Peer:
    """A paho client on the fleet's TLS listener, with its received messages in a queue."""

    def __init__(
        self,
        fleet: Fleet,
        name: str,
        cert: tuple[Path, Path],
        *,
        client_id: str | None = None,
        clean: bool = True,
    ) -> None:
        self.messages: queue.Queue[tuple[str, bytes, bool]] = queue.Queue()
        self._subacks: dict[int, list[int]] = {}
        self._subacked = threading.Condition()
        self._connected = threading.Event()
        self._rc: object = None
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{name}",
            protocol=mqtt.MQTTv311,
            clean_session=clean,
        )
        c.tls_set_context(tls(fleet, cert))
        c.on_connect = self._on_connect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self.client = c
        c.connect(HOST, fleet.port)
        c.loop_start()
        assert self._connected.wait(WAIT_S), f"{name}: no CONNACK"
        assert not self._rc_failure, f"{name}: refused: {self._rc}"

    _rc_failure = False

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object
    ) -> None:
        self._rc = rc
        self._rc_failure = bool(getattr(rc, "is_failure", True))
        self._connected.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        self.messages.put((msg.topic, bytes(msg.payload), bool(msg.retain)))

    def _on_subscribe(
        self,
        client: mqtt.Client,
        userdata: object,
        mid: int,
        codes: list[ReasonCode],
        props: object,
    ) -> None:
        with self._subacked:
            self._subacks[mid] = [c.value for c in codes]
            self._subacked.notify_all()

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1; the SUBACK's return code (1 granted, 0x80 refused)."""
        rc, mid = self.client.subscribe(topic, qos=1)
        assert rc == mqtt.MQTT_ERR_SUCCESS and mid is not None
        with self._subacked:
            assert self._subacked.wait_for(lambda: mid in self._subacks, WAIT_S)
            (code,) = self._subacks.pop(mid)
        return code

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> None:
        """Publish and wait until the broker has it (PUBACK) or paho has sent it (QoS 0)."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(WAIT_S)
        assert info.is_published()

    def next(self) -> tuple[str, bytes, bool]:
        return self.messages.get(timeout=WAIT_S)

    def received_so_far(self) -> list[tuple[str, bytes, bool]]:
        out = []
        while True:
            try:
                out.append(self.messages.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def peers(fleet: Fleet, stack: ExitStack) -> Iterator[dict[str, Peer]]:
    made: dict[str, Peer] = {}
    certs = {
        "backoffice": (fleet.certs / "backoffice.crt", fleet.certs / "backoffice.key"),
        A: fleet.enroll(A),
        B: fleet.enroll(B),
    }
    for name, cert in certs.items():
        made[name] = Peer(fleet, name, cert)
        stack.callback(made[name].close)
    yield made


def connect_outcome(fleet: Fleet, cert: tuple[Path, Path] | None) -> str:
    """ "connected" when the broker answers CONNECT with success, else how it refused; no
    network thread (paho's loop is run here until CONNACK or the connection is lost)."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="probe", protocol=mqtt.MQTTv311)
    c.tls_set_context(tls(fleet, cert))
    result: list[object] = []
    c.on_connect = lambda client, userdata, flags, rc, props: result.append(rc)
    try:
        c.connect(HOST, fleet.port)
    except (ssl.SSLError, OSError) as e:
        return f"refused in the handshake: {e}"
    deadline = time.monotonic() + WAIT_S
    try:
        while not result:
            assert time.monotonic() < deadline, "neither CONNACK nor a refusal"
            try:
                rc = c.loop(timeout=0.5)
            except (ssl.SSLError, OSError) as e:
                return f"refused: {e}"
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return f"refused: connection lost ({mqtt.error_string(rc)})"
        return "connected" if not getattr(result[0], "is_failure", True) else f"CONNACK {result[0]}"
    finally:
        c.disconnect()
        c.loop(timeout=0.1)


def log_since(broker: LocalBroker, offset: int) -> str:
    with broker.log_path.open("rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def test_enrolled_reader_publishes_and_subscribes_on_its_own_topics(peers: dict[str, Peer]) -> None:
    bo, a = peers["backoffice"], peers[A]
    assert bo.subscribe("qrgate/#") == 1
    assert a.subscribe(own(A, "cmd/#")) == 1
    bo.publish(f"qrgate/v1/{SITE}/_site/config", b"site-config", retain=True)
    assert a.subscribe(f"qrgate/v1/{SITE}/_site/#") == 1
    assert a.next() == (f"qrgate/v1/{SITE}/_site/config", b"site-config", True)
    a.publish(own(A, "status"), b"online", retain=True)
    assert bo.next() == (f"qrgate/v1/{SITE}/_site/config", b"site-config", False)
    assert bo.next() == (own(A, "status"), b"online", False)
    bo.publish(own(A, "cmd/open"), b"open door")
    assert a.next() == (own(A, "cmd/open"), b"open door", False)
    assert bo.next() == (own(A, "cmd/open"), b"open door", False)
    # a site level is "+": the reader's own id under another site is still its own
    a.publish(f"qrgate/v1/other-site/{A}/status", b"moved")
    assert bo.next() == (f"qrgate/v1/other-site/{A}/status", b"moved", False)


def test_reader_cannot_publish_on_another_readers_topics(
    fleet: Fleet, peers: dict[str, Peer]
) -> None:
    bo, a, b = peers["backoffice"], peers[A], peers[B]
    assert bo.subscribe("qrgate/#") == 1
    assert b.subscribe(own(B, "#")) == 1
    assert b.subscribe(f"qrgate/v1/{SITE}/_site/#") == 1
    # each accepted by paho and acknowledged by the broker, and dropped there
    for topic, qos in [
        (own(B, "status"), 1),
        (own(B, "cmd/open"), 0),
        (f"qrgate/v1/{SITE}/_site/config", 1),  # read-only for readers
        ("qrgate/v1/_enroll/" + B + "/cert", 1),
        ("qrgate/other", 1),
        ("$SYS/broker/uptime", 1),
        ("elsewhere", 1),
    ]:
        a.publish(topic, b"forged by A", qos=qos)
    a.publish(own(A, "control"), b"control")
    # the control message went through the same connection after the forged ones
    assert bo.next() == (own(A, "control"), b"control", False)
    assert bo.received_so_far() == []
    bo.publish(own(B, "control"), b"control for B")
    assert b.next() == (own(B, "control"), b"control for B", False)
    assert b.received_so_far() == []


def test_reader_cannot_subscribe_to_another_readers_topics(peers: dict[str, Peer]) -> None:
    bo, a = peers["backoffice"], peers[A]
    bo.publish(own(B, "config"), b"B's secret", retain=True)
    bo.publish(own(A, "config"), b"A's own", retain=True)
    # mosquitto 2.0 grants these subscriptions and checks read access per message when it
    # delivers (newer releases may refuse with 0x80): either way nothing of B's arrives
    for f in (own(B, "#"), own(B, "config"), "qrgate/#", "#", "$SYS/#"):
        assert a.subscribe(f) in (1, 0x80)
    bo.publish(own(B, "live"), b"B's live")
    bo.publish(f"qrgate/v1/{SITE}/other-reader/live", b"someone else's")
    # then a subscription A may make: what was published before it has been routed by now
    assert a.subscribe(own(A, "control")) == 1
    bo.publish(own(A, "control"), b"control")
    got: list[tuple[str, bytes, bool]] = []
    while not got or got[-1][0] != own(A, "control"):
        got.append(a.next())
    assert {(t, p) for t, p, _ in got} == {
        (own(A, "config"), b"A's own"),
        (own(A, "control"), b"control"),
    }


def test_a_reader_taking_another_readers_client_id_gets_none_of_its_messages(
    fleet: Fleet, peers: dict[str, Peer], stack: ExitStack
) -> None:
    """Client ids are not bound to certificates: A may connect as B's client id. mosquitto
    must not hand it B's stored session (queued messages were checked against B's ACL)."""
    bo = peers["backoffice"]
    b_cert = fleet.enroll(B)
    b = Peer(fleet, "b-session", b_cert, client_id=f"qrgate-{B}", clean=False)
    stack.callback(b.close)  # no-op once closed
    assert b.subscribe(own(B, "#")) == 1

    def leave(peer: Peer) -> None:
        offset = fleet.broker.log_size
        peer.close()
        assert wait_until(
            lambda: f"Client qrgate-{B} disconnected." in log_since(fleet.broker, offset)
        )

    leave(b)
    # positive control: B's own return gets what was queued meanwhile
    bo.publish(own(B, "first"), b"queued for B")
    b = Peer(fleet, "b-back", b_cert, client_id=f"qrgate-{B}", clean=False)
    stack.callback(b.close)
    assert b.next() == (own(B, "first"), b"queued for B", False)
    leave(b)
    bo.publish(own(B, "secret"), b"queued for B again")
    a = Peer(fleet, "a-as-b", fleet.enroll(A), client_id=f"qrgate-{B}", clean=False)
    stack.callback(a.close)
    # a session's queued messages go out right after CONNACK, before anything A asks for
    assert a.subscribe(own(A, "control")) == 1
    bo.publish(own(A, "control"), b"control")
    assert a.next() == (own(A, "control"), b"control", False)
    assert a.received_so_far() == []


def test_revoked_certificate_is_refused_and_a_fresh_one_works(fleet: Fleet) -> None:
    old = fleet.enroll(A)
    assert connect_outcome(fleet, old) == "connected"
    serial = ca.list_issued(fleet.ca_dir)[-1].serial
    ca.revoke(fleet.ca_dir, serial=serial)
    (fleet.broker_dir / "crl.pem").write_bytes(ca.make_crl(fleet.ca_dir))
    offset = fleet.broker.log_size
    pid = fleet.broker.pid
    assert pid is not None
    os.kill(pid, signal.SIGHUP)  # what `systemctl reload mosquitto` does
    # mosquitto logs this, then reloads certificates and CRL before its next network event
    assert wait_until(lambda: "Reloading config." in log_since(fleet.broker, offset))
    offset = fleet.broker.log_size
    outcome = connect_outcome(fleet, old)
    assert outcome.startswith("refused"), outcome
    assert wait_until(lambda: "certificate verify failed" in log_since(fleet.broker, offset))
    # the same reader, enrolled again with a new key
    assert connect_outcome(fleet, fleet.enroll(A)) == "connected"
    assert connect_outcome(fleet, fleet.enroll(B)) == "connected"
    # and after a restart (the CRL file read at start)
    fleet.broker.restart()
    assert connect_outcome(fleet, old).startswith("refused")


def test_certificates_from_elsewhere_are_refused(fleet: Fleet, tmp_path: Path) -> None:
    other = tmp_path / "other-ca"
    ca.init_ca(other, name="test fleet")  # same name, different keys
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = (tmp_path / "foreign.crt", tmp_path / "foreign.key")
    foreign[0].write_bytes(ca.sign_csr(other, make_csr(A, key)[1]))
    foreign[1].write_bytes(key_pem(key))
    pki = make_test_pki(tmp_path / "pki", clients=[A])
    offset = fleet.broker.log_size
    for cert in (foreign, pki.clients[A], None):
        outcome = connect_outcome(fleet, cert)
        assert outcome.startswith("refused"), (cert, outcome)
    assert connect_outcome(fleet, fleet.enroll(A)) == "connected"
    # mosquitto logs in order: once the good connection is in, so are the refusals
    assert wait_until(lambda: f"u'{A}'" in log_since(fleet.broker, offset))
    log = log_since(fleet.broker, offset)
    assert log.count("certificate verify failed") == 2
    assert log.count("peer did not return a certificate") == 1
    assert log.count(f"u'{A}'") == 1
