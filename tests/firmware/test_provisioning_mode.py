"""Provisioning mode: signed codes as PNGs through the replay camera and the real zxing-cpp
decoder, real Ed25519 signatures, the real feedback on mock pins, real files.

The enrollment here is a test double that records its calls and stores a certificate signed
by a test fleet CA (what :func:`provisioning.enroll.enroll` does after the server answered);
the end-to-end run against the real enrollment server and mosquitto is the integration step.
"""

from __future__ import annotations

import datetime
import json
import logging
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import segno
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from drivers.pins import make_pin_factory
from drivers.replay import ReplaySource
from firmware.admin.provision import ca_fingerprint_of, key_ring, signer
from firmware.config import Config, load_config
from firmware.daemon import link_settings, make_feedback
from firmware.decoding.registry import make_decoder
from firmware.exceptions import ConfigError
from firmware.policy.cose import kid_of
from firmware.policy.keys import generate_key
from firmware.provisioning_mode import (
    OVERLAY_FILE,
    USED_FILE,
    Outcome,
    ProvisioningModeError,
    ProvisioningSession,
    UsedCodes,
    apply_provisioned,
    load_provisioned,
)
from firmware.tools.provision_mode import NOT_AVAILABLE, provision_mode
from provisioning.device import DeviceKeys, identity_dir
from provisioning.exceptions import EnrollmentError
from provisioning.qr import ProvisioningClaims, issue_provisioning, new_claims

DEVICE = "10000000a1b2c3d4"
KEY = generate_key("EdDSA")
OTHER = generate_key("EdDSA")
KEYS = key_ring([KEY.public_key()])
BROKER = "mqtts://mqtt.acme.example:8883"


def _ca(name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


CA_KEY, CA_CERT = _ca("acme fleet CA")
_, OTHER_CA = _ca("globex fleet CA")
CA_PEM = CA_CERT.public_bytes(serialization.Encoding.PEM)
FP = CA_CERT.fingerprint(hashes.SHA256())
OTHER_FP = OTHER_CA.fingerprint(hashes.SHA256())
NOW = int(datetime.datetime.now(datetime.UTC).timestamp())


@dataclass
class Enroller:
    """Records ``enroll(claims, keys, device)`` calls; raises the queued errors in turn, else
    stores a certificate for the device key signed by the test fleet CA."""

    errors: list[Exception] = field(default_factory=list)
    calls: list[tuple[ProvisioningClaims, Path, str]] = field(default_factory=list)

    def __call__(self, claims: ProvisioningClaims, keys: DeviceKeys, device: str) -> None:
        self.calls.append((claims, keys.folder, device))
        if self.errors:
            raise self.errors.pop(0)
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device)]))
            .issuer_name(CA_CERT.subject)
            .public_key(keys.load_key().public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=730))
            .sign(CA_KEY, hashes.SHA256())
        )
        keys.store_certificate(
            cert.public_bytes(serialization.Encoding.PEM), CA_PEM, device_id=device
        )


class Spy:
    """The real feedback, with the patterns the session asked for counted."""

    def __init__(self, feedback: Any) -> None:
        self.feedback = feedback
        self.shown: list[str] = []

    def confirmed(self) -> None:
        self.shown.append("confirmed")
        self.feedback.confirmed()

    def denied(self) -> None:
        self.shown.append("denied")
        self.feedback.denied()


def claims(**kw: Any) -> ProvisioningClaims:
    base: dict[str, Any] = {
        "fleet": "acme",
        "site": "hq",
        "door": "lobby",
        "direction": "out",
        "broker": BROKER,
        "ca_fingerprint": FP,
        "iat": NOW - 60,
        "exp": NOW + 3600,
    }
    base.update(kw)
    return new_claims(**base)


def code(c: ProvisioningClaims, key: Any = KEY, kid: bytes | None = None) -> str:
    return issue_provisioning(c, signer(key, kid))


def png(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.png"
    segno.make_qr(text, error="m", mode="alphanumeric", boost_error=False).save(
        str(path), scale=4, border=4
    )
    return path


@dataclass
class Rig:
    state: Path
    ca_file: Path
    feedback: Any
    spy: Spy
    enroller: Enroller
    outcomes: list[Outcome]
    tmp: Path

    def session(
        self, images: list[Path], *, trusted: bool = True, repeat: int = 1, **kw: Any
    ) -> ProvisioningSession:
        source = ReplaySource(images, fps=0, repeat=repeat)
        if images:  # offer()-only tests read no frames
            source.open()
        ticks = iter(range(0, 10**15, 100_000_000))  # 0.1 s between frames' decodes
        kw.setdefault("monotonic_ns", lambda: next(ticks))
        kw.setdefault("enroll", self.enroller)
        return ProvisioningSession(
            source=source,
            decoder=make_decoder("zxing-cpp"),
            signals=self.spy,
            public_keys=KEYS,
            fleet="acme",
            ca_file=self.ca_file,
            state_dir=self.state,
            device_id=DEVICE,
            clock_trusted=lambda: trusted,
            on_outcome=self.outcomes.append,
            **kw,
        )

    @property
    def keys(self) -> DeviceKeys:
        return DeviceKeys(identity_dir(self.state))


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    ca_file = tmp_path / "firmware" / "fleet-ca.crt"
    ca_file.parent.mkdir()
    ca_file.write_bytes(CA_PEM)
    feedback = make_feedback(Config(), make_pin_factory("mock"))
    try:
        yield Rig(tmp_path / "state", ca_file, feedback, Spy(feedback), Enroller(), [], tmp_path)
    finally:
        feedback.close()


def settle(rig: Rig) -> None:
    assert rig.feedback.wait_settled(10)
    assert rig.feedback.relay.pulse_count == 0
    assert not rig.feedback.relay.is_energised


def test_valid_code_provisions_the_reader(rig: Rig) -> None:
    c = claims()
    text = code(c)
    other_qr = png(rig.tmp, "hello", "HELLO")  # not a provisioning code: ignored
    s = rig.session([other_qr, png(rig.tmp, "good", text)], repeat=3)
    got = s.run()
    settle(rig)
    assert got == c and s.claims == c and s.provisioned.is_set()
    assert [o.accepted for o in rig.outcomes] == [True]
    assert rig.spy.shown == ["confirmed"]
    assert rig.enroller.calls == [(c, identity_dir(rig.state), DEVICE)]
    key_mode = stat.S_IMODE(rig.keys.key_path.stat().st_mode)
    assert key_mode == 0o600
    assert stat.S_IMODE(rig.keys.folder.stat().st_mode) == 0o700
    assert c.token_id in UsedCodes(rig.state / USED_FILE)

    doc = json.loads((rig.state / OVERLAY_FILE).read_text())
    assert doc["reader"] == {"door": "lobby", "direction": "out"}
    assert doc["uplink"] == {
        "enabled": True,
        "site": "hq",
        "host": "mqtt.acme.example",
        "port": 8883,
        "transport": "tls",
        "ca": str(rig.ca_file),
        "cert": str(rig.keys.cert_path),
        "key": str(rig.keys.key_path),
        "username": None,
        "password_file": None,
    }
    assert doc["device"] == DEVICE and doc["token_id"] == c.token_id.hex()
    assert doc["clock_checked"] is True and doc["ca_fingerprint"] == FP.hex()

    # what the daemon makes of it: the file's config with the provisioned settings laid over
    base = Config()
    prov = load_provisioned(rig.state)
    assert prov is not None
    config = apply_provisioned(base, prov)
    assert (config.reader.door, config.reader.direction) == ("lobby", "out")
    assert config.reader.state_dir == base.reader.state_dir
    u = config.uplink
    assert (u.enabled, u.site, u.host, u.port, u.transport) == (
        True,
        "hq",
        "mqtt.acme.example",
        8883,
        "tls",
    )
    assert (u.ca, u.cert, u.key) == (rig.ca_file, rig.keys.cert_path, rig.keys.key_path)
    # the TLS files load as the uplink will load them (CA, certificate and its key)
    link = link_settings(config, DEVICE)
    assert (link.host, link.port, link.transport, link.username) == (
        "mqtt.acme.example",
        8883,
        "tls",
        None,
    )


def test_untrusted_clock_accepts_a_code_the_server_will_judge(rig: Rig) -> None:
    c = claims(iat=NOW - 7200, exp=NOW - 3600)
    s = rig.session([png(rig.tmp, "old", code(c))], trusted=False)
    assert s.run() == c
    settle(rig)
    doc = json.loads((rig.state / OVERLAY_FILE).read_text())
    assert doc["clock_checked"] is False
    # ...but not when the reader knows a later time has passed
    rig.outcomes.clear()
    (rig.state / OVERLAY_FILE).unlink()
    c2 = claims(iat=NOW - 7200, exp=NOW - 3600)
    s2 = rig.session(
        [png(rig.tmp, "old2", code(c2))], trusted=False, clock_floor=lambda: float(NOW)
    )
    assert s2.run() is None
    assert [o.reason for o in rig.outcomes] == ["expired"]


BAD: dict[str, tuple[Callable[[], str], str]] = {
    "forged": (lambda: code(claims(), key=OTHER, kid=kid_of(KEY.public_key())), "bad_signature"),
    "unknown_key": (lambda: code(claims(), key=OTHER), "unknown_key"),
    "expired": (lambda: code(claims(iat=NOW - 7200, exp=NOW - 3600)), "expired"),
    "other_fleet": (lambda: code(claims(fleet="globex")), "wrong_fleet"),
    "wrong_ca": (lambda: code(claims(ca_fingerprint=OTHER_FP)), "wrong_ca"),
}


@pytest.mark.parametrize("name", [*BAD, "replayed"])
def test_bad_codes_are_refused_once_with_their_reason(rig: Rig, name: str) -> None:
    if name == "replayed":
        c = claims()
        text = code(c)
        rig.state.mkdir()
        UsedCodes(rig.state / USED_FILE).add(c.token_id)
        reason = "replayed"
    else:
        make, reason = BAD[name]
        text = make()
    # held in view for five frames: answered once
    s = rig.session([png(rig.tmp, name, text)], repeat=5)
    assert s.run() is None
    settle(rig)
    assert [(o.accepted, o.reason) for o in rig.outcomes] == [(False, reason)]
    assert reason in rig.outcomes[0].message
    assert rig.spy.shown == ["denied"]
    assert rig.enroller.calls == []
    assert not (rig.state / OVERLAY_FILE).exists()
    assert not rig.keys.has_key()
    assert not s.provisioned.is_set()


def test_enrollment_refusal_then_a_good_code(rig: Rig) -> None:
    spent, good = claims(door="lobby"), claims(door="lobby")
    rig.enroller.errors.append(EnrollmentError("token_used", "already redeemed"))
    s = rig.session(
        [png(rig.tmp, "spent", code(spent)), png(rig.tmp, "good", code(good))], repeat=2
    )
    assert s.run() == good
    settle(rig)
    assert [(o.accepted, o.reason, o.why) for o in rig.outcomes] == [
        (False, "enrollment", "token_used"),
        (True, None, None),
    ]
    assert "token_used" in rig.outcomes[0].message
    assert rig.spy.shown == ["denied", "confirmed"]
    assert [call[0] for call in rig.enroller.calls] == [spent, good]
    used = UsedCodes(rig.state / USED_FILE)
    assert spent.token_id in used and good.token_id in used  # the server spent both
    prov = load_provisioned(rig.state)
    assert prov is not None and prov.token_id == good.token_id.hex()


def test_retryable_enrollment_failure_leaves_the_code_usable(rig: Rig) -> None:
    c = claims()
    text = code(c)
    rig.enroller.errors.append(EnrollmentError("timeout", "no answer within 30 s"))
    s = rig.session([png(rig.tmp, "c", text)])
    assert s.run() is None
    assert [(o.reason, o.why) for o in rig.outcomes] == [("enrollment", "timeout")]
    assert c.token_id not in UsedCodes(rig.state / USED_FILE)
    assert rig.keys.has_key() and not (rig.state / OVERLAY_FILE).exists()
    # the same code shown again later (a new session after the network is fixed) succeeds
    # with the key made the first time
    fingerprint = rig.keys.status()["key_fingerprint"]
    s2 = rig.session([png(rig.tmp, "c2", text)])
    assert s2.run() == c
    settle(rig)
    assert rig.keys.status(DEVICE)["key_fingerprint"] == fingerprint
    assert rig.keys.status(DEVICE)["state"] == "enrolled"
    assert rig.spy.shown == ["denied", "confirmed"]


def test_enroller_that_stores_nothing_is_a_refusal(rig: Rig) -> None:
    calls: list[str] = []
    s = rig.session([], enroll=lambda c, k, d: calls.append(d))
    outcome = s.offer(code(claims()).encode("ascii"))
    assert outcome is not None and (outcome.reason, outcome.why) == (
        "enrollment",
        "no_certificate",
    )
    assert calls == [DEVICE] and not (rig.state / OVERLAY_FILE).exists()


def test_repeat_window_is_per_payload_and_slides_while_held(rig: Rig) -> None:
    clock = [0]
    s = rig.session([], monotonic_ns=lambda: clock[0], repeat_s=3.0)
    bad = code(claims(fleet="globex")).encode("ascii")
    worse = code(claims(), key=OTHER).encode("ascii")
    answered = []
    for t_s, payload in [(0, bad), (2, bad), (4, bad), (4.5, worse), (5, bad), (9, bad)]:
        clock[0] = int(t_s * 1e9)
        o = s.offer(payload)
        answered.append(o.reason if o is not None else None)
    # held from 0 to 4 s (each sighting within 3 s of the last): once; another code in
    # between makes the first one new again; seen again after 4 s away: answered again
    assert answered == ["wrong_fleet", None, None, "unknown_key", "wrong_fleet", "wrong_fleet"]
    assert s.offer(b"https://example.com/not-a-provisioning-code") is None


def test_stop_event_ends_the_session(rig: Rig) -> None:
    stop = threading.Event()
    stop.set()
    s = rig.session([png(rig.tmp, "good", code(claims()))])
    assert s.run(stop) is None and rig.outcomes == []


def test_unusable_ca_or_used_file_stops_before_anything(rig: Rig) -> None:
    rig.ca_file.write_text("not a certificate")
    with pytest.raises(ProvisioningModeError, match="fleet CA"):
        rig.session([])
    rig.ca_file.write_bytes(CA_PEM)
    rig.state.mkdir()
    (rig.state / USED_FILE).write_text("{")
    with pytest.raises(ProvisioningModeError, match="used-codes"):
        rig.session([])


def test_damaged_overlay_is_a_config_error(tmp_path: Path) -> None:
    assert load_provisioned(tmp_path) is None
    (tmp_path / OVERLAY_FILE).write_text('{"format": "qrgate-provisioned-1", "reader": {}}')
    with pytest.raises(ConfigError) as e:
        load_provisioned(tmp_path)
    assert e.value.file == str(tmp_path / OVERLAY_FILE) and e.value.key == "reader"


# --- the command ------------------------------------------------------------------------------


def _config(tmp_path: Path, provisioning: str) -> Path:
    f = tmp_path / "qrgate.toml"
    f.write_text(
        f"""
[reader]
state_dir = "state"
[camera]
source = "replay"
path = "reel"
[gpio]
pin_factory = "mock"
{provisioning}
"""
    )
    (tmp_path / "reel").mkdir(exist_ok=True)
    return f


def test_command_needs_the_installed_files(tmp_path: Path) -> None:
    r = CliRunner().invoke(provision_mode, ["--config", str(_config(tmp_path, ""))])
    assert r.exit_code == 2 and "[provisioning] expected public_key and ca" in r.output


def test_command_without_enrollment_in_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "enroll.password").write_text("s3cret\n")
    f = _config(
        tmp_path,
        '[provisioning]\npublic_key = "p.pub.pem"\nca = "ca.crt"\n'
        'enroll_password_file = "enroll.password"\n',
    )
    assert load_config(f).provisioning.enroll_password_file == tmp_path / "enroll.password"
    monkeypatch.setitem(sys.modules, "provisioning.enroll", None)  # import raises ImportError
    r = CliRunner().invoke(provision_mode, ["--config", str(f)])
    assert r.exit_code == 1 and NOT_AVAILABLE in r.output


def test_fingerprint_matches_the_admin_tool(rig: Rig) -> None:
    assert ca_fingerprint_of(rig.ca_file) == FP


def test_a_local_error_in_enrollment_leaves_the_code_unused(rig: Rig) -> None:
    c = claims()
    rig.enroller.errors.append(OSError("disk full"))
    s = rig.session([])
    outcome = s.offer(code(c).encode("ascii"))
    assert outcome is not None and (outcome.reason, outcome.why) == ("enrollment", "OSError")
    assert c.token_id not in UsedCodes(rig.state / USED_FILE)
    assert rig.spy.shown == ["denied"]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_command_runs_the_real_enrollment_client_and_refuses_when_unreachable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The command's wiring: configured replay camera, decoder and mock-pin feedback, and the
    real provisioning.enroll client; with nobody listening on the enrollment port the code is
    refused ("transport", retryable: the code stays usable) and the reel's end ends the
    command with status 1. The run against a real broker is the integration step."""
    from firmware.policy.keys import save_public_key

    save_public_key(tmp_path / "p.pub.pem", KEY.public_key())
    (tmp_path / "ca.crt").write_bytes(CA_PEM)
    (tmp_path / "enroll.password").write_text("s3cret\n")
    c = claims(broker="mqtts://127.0.0.1:8883")
    (tmp_path / "reel").mkdir()
    png(tmp_path / "reel", "code", code(c))
    f = _config(
        tmp_path,
        f'[provisioning]\npublic_key = "p.pub.pem"\nca = "ca.crt"\nfleet = "acme"\n'
        f'enroll_port = {_closed_port()}\nenroll_password_file = "enroll.password"\n',
    )
    monkeypatch.setattr("provisioning.identity.device_id", lambda: DEVICE)
    caplog.set_level(logging.INFO, logger="firmware.provisioning_mode")
    r = CliRunner().invoke(provision_mode, ["--config", str(f)])
    assert r.exit_code == 1, r.output
    assert "ended without a code accepted" in r.output
    refusals = [m for m in caplog.messages if "refused, enrollment" in m]
    assert len(refusals) == 1 and "transport" in refusals[0]
    state = tmp_path / "state"
    assert not (state / OVERLAY_FILE).exists()
    assert c.token_id not in UsedCodes(state / USED_FILE)
    assert DeviceKeys(identity_dir(state)).has_key()  # made before enrolling; kept for a retry
