"""Enrollment over MQTT on a real mosquitto running the generated configuration (certificate
listener and enrollment listener), with the real CA, token store and paho transport.

mosquitto drops a publish the ACL denies without telling the client, so "not delivered" is
shown by ordering: a control message sent after it on the same connection arrives, and
nothing came before it.
"""

from __future__ import annotations

import itertools
import json
import logging
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509

from firmware.admin.enroll import enroll as enroll_cli
from firmware.admin.provision import token_json
from firmware.demo.broker import HOST, LocalBroker, free_port
from provisioning import ca
from provisioning.device import DeviceKeys
from provisioning.enroll import (
    EnrollmentServer,
    EnrollRequest,
    TokenStore,
    cert_topic,
    csr_topic,
    enroll,
)
from provisioning.exceptions import CaError, CsrError, EnrollmentError, TokenStoreError
from provisioning.mqtt_transport import PahoTransport
from provisioning.qr import new_claims
from tests.polling import wait_until

SITE, DOOR = "lab", "lobby"
WAIT_S = 10.0
PASSWORD = "enroll-pass-for-tests"
_client_ids = itertools.count()


def token_record(site: str = SITE, door: str = DOOR, *, expired: bool = False) -> dict[str, object]:
    """A token record exactly as `qrgate provision qr --token-out` writes it."""
    now = int(time.time())
    iat, exp = (now - 7200, now - 3600) if expired else (now, now + 3600)
    claims = new_claims("default", site, door, "in", "mqtts://127.0.0.1", b"\x01" * 32, iat, exp)
    return token_json(claims, b"\x02" * 8)


def secret_of(record: dict[str, object]) -> tuple[bytes, bytes]:
    return bytes.fromhex(str(record["token_id"])), bytes.fromhex(str(record["secret"]))


# --- the token store alone -------------------------------------------------------------------


def test_token_store_adds_lists_and_keeps_only_the_hash(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    store = TokenStore(db)
    assert (db.stat().st_mode & 0o777) == 0o600
    record = token_record()
    f = tmp_path / "t.json"
    f.write_text(json.dumps(record))
    token = store.add_file(f)
    assert token.token_id == record["token_id"]
    assert (token.site, token.door, token.used_at) == (SITE, DOOR, None)
    assert store.add(record) == token  # the same record again: no change
    assert store.list() == [token]
    assert str(record["secret"]).encode() not in db.read_bytes()
    assert str(record["secret_sha256"]).encode() in db.read_bytes()
    with pytest.raises(TokenStoreError, match="another secret"):
        store.add({k: v for k, v in record.items() if k != "secret"} | {"door": "x"})
    with pytest.raises(TokenStoreError, match="not the SHA-256"):
        store.add({**record, "secret": "00" * 8})
    with pytest.raises(TokenStoreError, match="format"):
        store.add({**record, "format": "other"})
    tid, secret = secret_of(record)
    now = time.time()
    with pytest.raises(EnrollmentError) as e:
        store.redeem(tid, b"\0" * 8, site=SITE, door=DOOR, device="reader-x1", now=now)
    assert e.value.reason == "token_unknown"
    with pytest.raises(EnrollmentError) as e:
        store.redeem(b"\0" * 8, secret, site=SITE, door=DOOR, device="reader-x1", now=now)
    assert e.value.reason == "token_unknown"
    with pytest.raises(EnrollmentError) as e:
        store.redeem(tid, secret, site=SITE, door="side", device="reader-x1", now=now)
    assert e.value.reason == "scope"
    with pytest.raises(EnrollmentError) as e:
        store.redeem(tid, secret, site=SITE, door=DOOR, device="reader-x1", now=now + 3600)
    assert e.value.reason == "token_expired"
    assert store.list()[0].used_at is None  # none of those spent it
    store.redeem(tid, secret, site=SITE, door=DOOR, device="reader-x1", now=now)
    used = store.list()[0]
    assert (used.used_at, used.used_by) == (int(now), "reader-x1")
    with pytest.raises(EnrollmentError) as e:
        store.redeem(tid, secret, site=SITE, door=DOOR, device="reader-x2", now=now)
    assert e.value.reason == "token_used"


def race(db: Path, tid: bytes, secret: bytes) -> list[str]:
    """Two threads, each with its own store (as two server processes), redeem one token at
    once: what each got ("won:<device>" or the refusal reason)."""
    barrier = threading.Barrier(2)
    results: list[str] = []

    def consume(device: str) -> None:
        store = TokenStore(db)
        barrier.wait()
        try:
            store.redeem(tid, secret, site=SITE, door=DOOR, device=device, now=time.time())
            results.append(f"won:{device}")
        except EnrollmentError as e:
            results.append(e.reason)

    threads = [threading.Thread(target=consume, args=(d,)) for d in ("reader-r1", "reader-r2")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_two_racing_requests_spend_a_token_once(tmp_path: Path) -> None:
    db = tmp_path / "tokens.db"
    records = [token_record() for _ in range(20)]
    for r in records:
        TokenStore(db).add(r)
    for record in records:
        tid, secret = secret_of(record)
        results = race(db, tid, secret)
        assert sorted(r.split(":")[0] for r in results) == ["token_used", "won"]
        (winner,) = [r.removeprefix("won:") for r in results if r.startswith("won:")]
        token = TokenStore(db).get(tid.hex())
        assert token is not None and token.used_by == winner


# --- the whole exchange on a real broker -----------------------------------------------------


@dataclass
class Fleet:
    ca_dir: Path
    files: ca.BrokerFiles
    port: int
    enroll_port: int
    tokens: TokenStore
    backoffice: tuple[Path, Path]
    clock: list[float]
    broker: LocalBroker

    def connect_enroll(self, stack: ExitStack, password: str = PASSWORD) -> PahoTransport:
        t = PahoTransport(f"enroll-{next(_client_ids)}")
        t.connect(HOST, self.enroll_port, str(self.files.ca_chain), "enroll", password)
        stack.callback(t.close)
        return t

    def connect_cert(self, stack: ExitStack, cert: Path, key: Path, name: str) -> PahoTransport:
        t = PahoTransport(name)
        t.connect(HOST, self.port, str(self.files.ca_chain), cert_file=str(cert), key_file=str(key))
        stack.callback(t.close)
        return t


@pytest.fixture
def bare_fleet(tmp_path: Path, stack: ExitStack) -> Fleet:
    """CA, broker files, a running broker, an empty token store: no enrollment server."""
    ca_dir = tmp_path / "ca"
    ca.init_ca(ca_dir, name="test fleet")
    port, enroll_port = free_port(), free_port()
    files = ca.broker_config(
        ca_dir,
        tmp_path / "broker",
        host=[HOST],
        port=port,
        bind_address=HOST,
        enroll_port=enroll_port,
        enroll_password=PASSWORD,
    )
    bo_cert, bo_key = ca.sign_service(ca_dir, "backoffice")
    bo = (tmp_path / "backoffice.crt", tmp_path / "backoffice.key")
    bo[0].write_bytes(bo_cert)
    bo[1].write_bytes(bo_key)
    broker = LocalBroker(
        tmp_path / "mosquitto",
        allow_anonymous=False,
        persistence=False,
        extra_config=files.conf.read_text(),
    )
    stack.callback(broker.stop)
    broker.start()
    clock = [time.time()]
    return Fleet(
        ca_dir, files, port, enroll_port, TokenStore(tmp_path / "tokens.db"), bo, clock, broker
    )


@pytest.fixture
def fleet(bare_fleet: Fleet, stack: ExitStack) -> Iterator[Fleet]:
    """The fleet with an enrollment server in a thread, on the fleet's clock."""
    f, clock = bare_fleet, bare_fleet.clock
    server_link = f.connect_cert(stack, *f.backoffice, "enroll-server")
    server = EnrollmentServer(f.ca_dir, f.tokens, server_link, clock=lambda: clock[0])
    stop = threading.Event()
    server.start()
    thread = threading.Thread(target=server.serve, args=(stop, 0.05), name="enroll-server")
    thread.start()

    def halt() -> None:
        stop.set()
        thread.join()

    stack.callback(halt)
    yield f


def new_reader(tmp_path: Path, device: str) -> DeviceKeys:
    return DeviceKeys(tmp_path / device / "identity")


def refusal(
    fleet: Fleet,
    stack: ExitStack,
    tmp_path: Path,
    device: str,
    record: dict[str, object],
    **kw: str,
) -> str:
    tid, secret = secret_of(record)
    link = fleet.connect_enroll(stack)
    keys = new_reader(tmp_path, device)
    with pytest.raises(EnrollmentError) as e:
        enroll(
            link,
            keys,
            device,
            tid,
            secret,
            site=kw.get("site", SITE),
            door=kw.get("door", DOOR),
            timeout_s=WAIT_S,
        )
    assert keys.load_certificate() is None
    return e.value.reason


pytestmark_broker = pytest.mark.usefixtures("no_leaks", "need_mosquitto")


@pytestmark_broker
def test_a_new_reader_enrolls_then_talks_with_its_own_certificate(
    fleet: Fleet, stack: ExitStack, tmp_path: Path
) -> None:
    record = token_record()
    fleet.tokens.add(record)
    tid, secret = secret_of(record)
    keys = new_reader(tmp_path, "reader-a1")
    link = fleet.connect_enroll(stack)
    status = enroll(link, keys, "reader-a1", tid, secret, site=SITE, door=DOOR, timeout_s=WAIT_S)
    link.close()
    assert status["state"] == "enrolled"
    cert = keys.load_certificate()
    assert cert is not None
    assert cert.subject.rfc4514_string() == "CN=reader-a1"
    assert (
        cert.issuer
        == x509.load_pem_x509_certificate((fleet.ca_dir / "issuing.crt").read_bytes()).subject
    )
    assert [i.cn for i in ca.list_issued(fleet.ca_dir) if i.kind == "device"] == ["reader-a1"]
    assert fleet.tokens.get(tid.hex()).used_by == "reader-a1"  # type: ignore[union-attr]
    # the reader drops the enrollment login and uses its certificate on the fleet listener
    office = fleet.connect_cert(stack, *fleet.backoffice, "office")
    office.subscribe("qrgate/v1/+/reader-a1/#")
    reader = PahoTransport("reader-a1")
    reader.connect(
        HOST,
        fleet.port,
        str(keys.chain_path),
        cert_file=str(keys.cert_path),
        key_file=str(keys.key_path),
    )
    stack.callback(reader.close)
    reader.publish(f"qrgate/v1/{SITE}/reader-a1/status", b"online")
    assert office.next_message(WAIT_S) == (f"qrgate/v1/{SITE}/reader-a1/status", b"online")
    # the same code again, by another reader: refused, nothing issued
    assert refusal(fleet, stack, tmp_path, "reader-b2", record) == "token_used"
    assert [i.cn for i in ca.list_issued(fleet.ca_dir) if i.kind == "device"] == ["reader-a1"]


@pytestmark_broker
def test_enrollment_refusals(
    fleet: Fleet, stack: ExitStack, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "qrgate.enroll")
    expired = token_record(expired=True)
    good = token_record()
    for r in (expired, good):
        fleet.tokens.add(r)
    # unreadable requests get no answer and do not stop the server (it answers below)
    junk = fleet.connect_enroll(stack)
    for payload in (b"[" * 30_000, b"x" * 40_000, b"\xff", b'{"v": 1}', b"[]"):
        junk.publish(csr_topic("reader-j1"), payload)
    assert refusal(fleet, stack, tmp_path, "reader-e1", expired) == "token_expired"
    # answered in order: the junk before it was dropped, each logged
    dropped = [r for r in caplog.records if "dropped unreadable request" in r.getMessage()]
    assert len(dropped) == 5
    assert refusal(fleet, stack, tmp_path, "reader-s1", good, site="other") == "scope"
    assert refusal(fleet, stack, tmp_path, "reader-s2", good, door="side") == "scope"
    wrong = {**good, "secret": "00" * 8}
    assert refusal(fleet, stack, tmp_path, "reader-w1", wrong) == "token_unknown"
    assert fleet.tokens.get(str(good["token_id"])).used_at is None  # type: ignore[union-attr]
    # the server's clock decides expiry: a reader cannot claim another time
    fleet.clock[0] += 7200
    assert refusal(fleet, stack, tmp_path, "reader-e2", good) == "token_expired"
    fleet.clock[0] -= 7200
    # a CSR naming another device than the topic and the request: refused, token spent
    mismatch = token_record()
    fleet.tokens.add(mismatch)
    tid, secret = secret_of(mismatch)
    keys = new_reader(tmp_path, "reader-m1")
    keys.create_key()
    csr = keys.make_csr("reader-zz").decode()
    link = fleet.connect_enroll(stack)
    link.subscribe(cert_topic("reader-m1"))
    req = EnrollRequest("reader-m1", csr, tid, secret, SITE, DOOR, "req-m1")
    link.publish(csr_topic("reader-m1"), req.to_bytes())
    got = link.next_message(WAIT_S)
    assert got is not None and got[0] == cert_topic("reader-m1")
    answer = json.loads(got[1])
    assert (answer["ok"], answer["reason"], answer["request_id"]) == (
        False,
        "device_mismatch",
        "req-m1",
    )
    assert fleet.tokens.get(tid.hex()).used_by == "reader-m1"  # type: ignore[union-attr]
    assert [i for i in ca.list_issued(fleet.ca_dir) if i.kind == "device"] == []
    # the good token is still good after all those refusals
    keys = new_reader(tmp_path, "reader-g1")
    tid, secret = secret_of(good)
    link = fleet.connect_enroll(stack)
    status = enroll(link, keys, "reader-g1", tid, secret, site=SITE, door=DOOR, timeout_s=WAIT_S)
    assert status["state"] == "enrolled"


@pytestmark_broker
def test_enrollment_login_reaches_only_the_enrollment_topics(
    fleet: Fleet, stack: ExitStack
) -> None:
    office = fleet.connect_cert(stack, *fleet.backoffice, "office")
    office.subscribe("qrgate/#")
    office.publish(f"qrgate/v1/{SITE}/_site/config", b"site secret")  # not retained: flushed
    assert office.next_message(WAIT_S) == (f"qrgate/v1/{SITE}/_site/config", b"site secret")
    link = fleet.connect_enroll(stack)
    # reading the site's settings: subscription granted or not, nothing delivered
    try:
        link.subscribe(f"qrgate/v1/{SITE}/_site/#")
    except EnrollmentError as err:
        assert err.reason == "transport"
    link.subscribe(cert_topic("reader-q1"))
    for topic in (
        f"qrgate/v1/{SITE}/reader-a1/status",
        f"qrgate/v1/{SITE}/_site/config",
        f"qrgate/v1/{SITE}/enroll/status",
        cert_topic("reader-q1"),  # read-only for the enrollment user
        "qrgate/other",
    ):
        link.publish(topic, b"forged by the enrollment login")
    # positive control: its one writable topic, on the same connection, after the others
    link.publish(csr_topic("reader-q1"), b"control")
    assert office.next_message(WAIT_S) == (csr_topic("reader-q1"), b"control")
    office.publish(f"qrgate/v1/{SITE}/_site/config", b"site secret again")
    office.publish(cert_topic("reader-q1"), b"answer")
    assert office.next_message(WAIT_S) == (f"qrgate/v1/{SITE}/_site/config", b"site secret again")
    assert office.next_message(WAIT_S) == (cert_topic("reader-q1"), b"answer")
    assert link.next_message(WAIT_S) == (cert_topic("reader-q1"), b"answer")
    assert link.next_message(0) is None
    assert office.next_message(0) is None
    # the password works on the enrollment listener only; the fleet listener wants a certificate
    with pytest.raises(EnrollmentError) as e:
        fleet.connect_enroll(stack, password="wrong")
    assert e.value.reason == "transport"
    assert e.value.detail.endswith("refused the login: Not authorized")
    password_on_fleet = PahoTransport("pw-on-fleet")
    stack.callback(password_on_fleet.close)
    with pytest.raises(EnrollmentError) as e:
        password_on_fleet.connect(HOST, fleet.port, str(fleet.files.ca_chain), "enroll", PASSWORD)
    assert e.value.reason == "transport"
    assert e.value.detail.endswith("connection closed before CONNACK (Unspecified error)")
    assert wait_until(lambda: "peer did not return a certificate" in fleet.broker.log_tail(50))
    # a name no reader can get: the CA refuses to sign a reader as "enroll"
    keys = DeviceKeys(fleet.ca_dir.parent / "impostor")
    keys.create_key()
    with pytest.raises(Exception, match="reserved"):
        ca.sign_csr(fleet.ca_dir, keys.make_csr("enroll"))


@pytestmark_broker
def test_the_enroll_commands_add_tokens_and_serve_until_sigterm(
    bare_fleet: Fleet, stack: ExitStack, tmp_path: Path
) -> None:
    fleet = bare_fleet
    record = token_record()
    token_file = tmp_path / "lobby.json"
    token_file.write_text(json.dumps(record))
    db = tmp_path / "cli-tokens.db"
    runner = CliRunner()
    added = runner.invoke(enroll_cli, ["tokens", "add", "--db", str(db), str(token_file)])
    assert added.exit_code == 0, added.output
    assert f"added {record['token_id']} ({SITE}/{DOOR}" in added.output
    listed = runner.invoke(enroll_cli, ["tokens", "list", "--db", str(db)])
    assert f"{record['token_id']}  {SITE}/{DOOR}" in listed.output
    assert listed.output.rstrip().endswith("unused")
    bad = runner.invoke(enroll_cli, ["tokens", "add", "--db", str(db), str(tmp_path)])
    assert bad.exit_code == 1 and "cannot read" in bad.output

    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "from firmware.admin.enroll import enroll; enroll()",
                "serve",
                "--ca",
                str(fleet.ca_dir),
                "--db",
                str(db),
                "--broker",
                f"{HOST}:{fleet.port}",
                "--cert",
                str(fleet.backoffice[0]),
                "--key",
                str(fleet.backoffice[1]),
                "--ca-file",
                str(fleet.files.ca_chain),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    stack.callback(proc.kill)  # no-op once it has exited
    assert wait_until(lambda: "enroll: serving on" in log.read_text(), timeout_s=WAIT_S)
    # serving is logged after the subscription's SUBACK
    tid, secret = secret_of(record)
    keys = new_reader(tmp_path, "reader-c1")
    link = fleet.connect_enroll(stack)
    status = enroll(link, keys, "reader-c1", tid, secret, site=SITE, door=DOOR, timeout_s=WAIT_S)
    assert status["state"] == "enrolled"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(WAIT_S) == 0
    text = log.read_text()
    assert f"issued reader-c1 a certificate (token {record['token_id']}" in text
    listed = runner.invoke(enroll_cli, ["tokens", "list", "--db", str(db)])
    assert "used by reader-c1" in listed.output


def test_broker_config_writes_the_enrollment_listener(tmp_path: Path) -> None:
    ca_dir, out = tmp_path / "ca", tmp_path / "broker"
    ca.init_ca(ca_dir, name="test fleet")
    files = ca.broker_config(ca_dir, out, host="mqtt.example.org", enroll_port=8884)
    assert files.enroll_passwd == out / "enroll.passwd"
    assert files.enroll_password == out / "enroll.password"
    for f in (files.enroll_passwd, files.enroll_password, files.server_key):
        assert (f.stat().st_mode & 0o777) == 0o600
    password = files.enroll_password.read_text().strip()
    assert len(password) == 32  # 24 random bytes in base64url
    user, _, digest = files.enroll_passwd.read_text().strip().partition(":")
    assert user == "enroll" and digest.startswith("$7$")  # mosquitto 2: PBKDF2-SHA512
    assert password not in files.enroll_passwd.read_text()
    conf = [x for x in files.conf.read_text().splitlines() if x and not x.startswith("#")]
    d = out.resolve()
    assert conf[conf.index("listener 8884") :] == [
        "listener 8884",
        "tls_version tlsv1.2",
        f"certfile {d}/server.crt",
        f"keyfile {d}/server.key",
        "require_certificate false",
        f"password_file {d}/enroll.passwd",
    ]
    acl = [x for x in files.acl.read_text().splitlines() if x and not x.startswith("#")]
    assert acl[acl.index("user enroll") :] == [
        "user enroll",
        "topic write qrgate/v1/_enroll/+/csr",
        "topic read qrgate/v1/_enroll/+/cert",
        "topic deny qrgate/v1/+/_site/#",
        "topic deny qrgate/v1/+/enroll/#",
    ]
    keys = DeviceKeys(tmp_path / "impostor")
    keys.create_key()
    with pytest.raises(CsrError, match="reserved"):
        ca.sign_csr(ca_dir, keys.make_csr("enroll"))
    with pytest.raises(ValueError, match="other than 8883"):
        ca.broker_config(ca_dir, tmp_path / "b2", host="h.example", enroll_port=8883)


def test_broker_config_names_the_package_when_mosquitto_passwd_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_dir = tmp_path / "ca"
    ca.init_ca(ca_dir, name="test fleet")
    monkeypatch.setattr(ca, "MOSQUITTO_PASSWD", "no-such-mosquitto_passwd")
    with pytest.raises(CaError, match=r"install the mosquitto package"):
        ca.broker_config(ca_dir, tmp_path / "b", host="h.example", enroll_port=8884)
    assert not (tmp_path / "b").exists()
