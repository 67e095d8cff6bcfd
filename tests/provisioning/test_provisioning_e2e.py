"""Provisioning end to end, every part real: a fleet CA, a mosquitto running the generated
config (the certificate listener and the enrollment listener), the enrollment server with its
token store, a signed provisioning code rendered as a PNG and read by the replay camera and
the zxing-cpp decoder in provisioning mode, enrollment over MQTT with the real client, and the
reader started from the provisioned settings publishing with its own certificate."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import segno
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from drivers.pins import make_pin_factory
from drivers.replay import ReplaySource
from firmware.admin.provision import key_ring, signer, token_json
from firmware.config import load_config
from firmware.daemon import build_reader, make_feedback
from firmware.decoding.registry import make_decoder
from firmware.policy.cose import kid_of
from firmware.policy.keys import generate_key
from firmware.provisioning_mode import ProvisioningSession, load_provisioned
from firmware.tools.provision_mode import make_enroller
from provisioning.qr import issue_provisioning, new_claims
from tests.provisioning.test_enroll import HOST, PASSWORD, WAIT_S, Fleet

pytestmark = pytest.mark.usefixtures("no_leaks", "need_mosquitto")

DEVICE = "reader-e2e1"


def test_a_reader_is_provisioned_from_a_code_it_reads_and_talks_with_its_own_certificate(
    fleet: Fleet, stack: ExitStack, tmp_path: Path
) -> None:
    # the administrator: a provisioning key, a code for door "lobby" at site "lab", its token
    # given to the enrollment server
    prov_key = generate_key("EdDSA")
    root = x509.load_pem_x509_certificate((fleet.ca_dir / "root.crt").read_bytes())
    now = int(time.time())
    claims = new_claims(
        "acme",
        "lab",
        "lobby",
        "out",
        f"mqtts://{HOST}:{fleet.port}",
        root.fingerprint(hashes.SHA256()),
        now - 5,
        now + 3600,
    )
    text = issue_provisioning(claims, signer(prov_key))
    fleet.tokens.add(token_json(claims, kid_of(prov_key.public_key())))
    png = tmp_path / "code.png"
    segno.make_qr(text, error="m", mode="alphanumeric", boost_error=False).save(
        str(png), scale=6, border=4
    )

    # the reader: firmware with the fleet's provisioning public key and root CA installed
    state = tmp_path / "reader" / "state"
    state.mkdir(parents=True)
    (tmp_path / "reader" / "fleet-root.crt").write_bytes((fleet.ca_dir / "root.crt").read_bytes())
    cfg_path = tmp_path / "reader" / "qrgate.toml"
    cfg_path.write_text(f"""
[reader]
door = "unprovisioned"
state_dir = "{state}"
[camera]
source = "replay"
path = "{png}"
[gpio]
pin_factory = "mock"
pulse_s = 0.2
""")
    config = load_config(cfg_path)
    factory = make_pin_factory("mock")
    feedback = make_feedback(config, factory)
    stack.callback(feedback.close)
    enroll = make_enroller(
        fleet.enroll_port, tmp_path / "reader" / "fleet-root.crt", "enroll", PASSWORD, WAIT_S
    )
    assert enroll is not None
    session = ProvisioningSession(
        source=ReplaySource([png] * 30, fps=30),
        decoder=make_decoder("zxing-cpp"),
        signals=feedback,
        enroll=enroll,
        public_keys=key_ring([prov_key.public_key()]),
        fleet="acme",
        ca_file=tmp_path / "reader" / "fleet-root.crt",
        state_dir=state,
        device_id=DEVICE,
        clock_trusted=lambda: True,
    )
    session.source.open()  # type: ignore[attr-defined]
    done = session.run()
    assert done is not None and session.provisioned.is_set()
    assert feedback.relay.pulse_count == 0  # provisioning never opens the door
    prov = load_provisioned(state)
    assert prov is not None and prov.device == DEVICE
    assert (prov.reader["door"], prov.uplink["site"], prov.uplink["port"]) == (
        "lobby",
        "lab",
        fleet.port,
    )
    assert fleet.tokens.get(claims.token_id.hex()).used_by == DEVICE  # type: ignore[union-attr]
    feedback.close()

    # the reader restarts as a door reader: provisioned door, broker and certificate
    office = fleet.connect_cert(stack, *fleet.backoffice, "office")
    office.subscribe(f"qrgate/v1/lab/{DEVICE}/status")
    reader = build_reader(
        config,
        pin_factory=make_pin_factory("mock"),
        source=ReplaySource([png], fps=30, loop=True),
        clock_synced=lambda: True,
        device_id=DEVICE,
    )
    stack.callback(reader.stop)
    assert reader.config.reader.door == "lobby"
    assert reader.uplink is not None
    reader.start()
    topic, payload = office.next_message(WAIT_S)
    assert topic == f"qrgate/v1/lab/{DEVICE}/status"
    status = json.loads(payload)
    assert status["online"] is True and status["door"] == "lobby"
    reader.stop()

    # a device key others can read never reaches the broker: the door works, MQTT stays off
    key = state / "identity" / "device.key"
    key.chmod(0o644)
    offline = build_reader(
        config,
        pin_factory=make_pin_factory("mock"),
        source=ReplaySource([png], fps=30),
        clock_synced=lambda: True,
        device_id=DEVICE,
    )
    stack.callback(offline.stop)
    assert offline.config.reader.door == "lobby" and offline.uplink is None


def test_the_same_code_cannot_provision_a_second_reader(
    fleet: Fleet, stack: ExitStack, tmp_path: Path
) -> None:
    prov_key = generate_key("EdDSA")
    root = x509.load_pem_x509_certificate((fleet.ca_dir / "root.crt").read_bytes())
    now = int(time.time())
    claims = new_claims(
        "acme",
        "lab",
        "lobby",
        "in",
        f"mqtts://{HOST}:{fleet.port}",
        root.fingerprint(hashes.SHA256()),
        now - 5,
        now + 3600,
    )
    text = issue_provisioning(claims, signer(prov_key))
    fleet.tokens.add(token_json(claims, kid_of(prov_key.public_key())))
    (tmp_path / "root.crt").write_bytes((fleet.ca_dir / "root.crt").read_bytes())
    enroll = make_enroller(fleet.enroll_port, tmp_path / "root.crt", "enroll", PASSWORD, WAIT_S)
    assert enroll is not None
    outcomes = []
    for device in ("reader-one1", "reader-two2"):
        state = tmp_path / device
        state.mkdir()
        session = ProvisioningSession(
            source=ReplaySource([], fps=0),
            decoder=make_decoder("zxing-cpp"),
            signals=_Quiet(),
            enroll=enroll,
            public_keys=key_ring([prov_key.public_key()]),
            fleet="acme",
            ca_file=tmp_path / "root.crt",
            state_dir=state,
            device_id=device,
            clock_trusted=lambda: True,
        )
        outcomes.append(session.offer(text.encode()))
    first, second = outcomes
    assert first is not None and first.accepted
    assert second is not None and not second.accepted
    assert (second.reason, second.why) == ("enrollment", "token_used")
    assert load_provisioned(tmp_path / "reader-two2") is None


class _Quiet:
    """Feedback without pins for the second test (the patterns are tested elsewhere)."""

    def __init__(self) -> None:
        self.shown: list[str] = []

    def confirmed(self) -> None:
        self.shown.append("confirmed")

    def denied(self) -> None:
        self.shown.append("denied")


def test_the_service_waits_for_its_code_tells_systemd_and_exits_provisioned(
    fleet: Fleet, stack: ExitStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from drivers.systemd import ServiceNotifier
    from firmware.policy.keys import save_public_key
    from firmware.provisioning_mode import needs_provisioning
    from firmware.tools.provision_mode import run_provisioning
    from tests.firmware.notify import NotifySocket

    prov_key = generate_key("EdDSA")
    root = x509.load_pem_x509_certificate((fleet.ca_dir / "root.crt").read_bytes())
    now = int(time.time())
    claims = new_claims(
        "acme",
        "lab",
        "lobby",
        "in",
        f"mqtts://{HOST}:{fleet.port}",
        root.fingerprint(hashes.SHA256()),
        now - 5,
        now + 3600,
    )
    fleet.tokens.add(token_json(claims, kid_of(prov_key.public_key())))
    png = tmp_path / "code.png"
    segno.make_qr(
        issue_provisioning(claims, signer(prov_key)), error="m", mode="alphanumeric"
    ).save(str(png), scale=6, border=4)
    # what the firmware image carries for this fleet
    fw = tmp_path / "firmware"
    fw.mkdir()
    (fw / "root.crt").write_bytes((fleet.ca_dir / "root.crt").read_bytes())
    save_public_key(fw / "provisioning.pub.pem", prov_key.public_key())
    (fw / "enroll.password").write_text(PASSWORD + "\n")
    state = tmp_path / "state"
    cfg = tmp_path / "qrgate.toml"
    cfg.write_text(f"""
[reader]
state_dir = "{state}"
[camera]
source = "replay"
path = "{png}"
loop = true
fps = 10
[gpio]
pin_factory = "mock"
[provisioning]
public_key = "{fw / "provisioning.pub.pem"}"
ca = "{fw / "root.crt"}"
fleet = "acme"
enroll_port = {fleet.enroll_port}
enroll_password_file = "{fw / "enroll.password"}"
""")
    config = load_config(cfg)
    assert needs_provisioning(config, DEVICE)
    sock = NotifySocket(tmp_path / "notify")
    stack.callback(sock.close)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock.path))
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert run_provisioning(config, ServiceNotifier.from_env(), device=DEVICE) == 0
    assert sock.wait_for("STOPPING", "1", WAIT_S)
    assert len(sock.times("READY")) == 1
    assert any("show this reader its provisioning code" in x for x in sock.statuses())
    assert any("provisioned" in x for x in sock.statuses())
    assert not needs_provisioning(config, DEVICE)
    assert needs_provisioning(config, "reader-other9")  # a copied SD card: provision anew
