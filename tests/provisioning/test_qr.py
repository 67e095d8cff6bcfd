"""The signed provisioning code: round trip, every refusal, hostile input, the camera's decoder
and the ``qrgate provision`` commands.

Real Ed25519 keys and signatures (firmware.policy.cose through firmware.admin.provision's
wiring), real PNGs decoded by zxing-cpp, real files.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import stat
import time
from pathlib import Path

import base45
import cbor2
import numpy as np
import pytest
import segno
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from firmware.admin.provision import (
    OPENER,
    ca_fingerprint_of,
    key_ring,
    parse_expiry,
    parse_fingerprint,
    provision,
    qr_version,
    signer,
    verify_code,
)
from firmware.decoding.registry import make_decoder
from firmware.policy import cose
from firmware.policy.cose import kid_of
from firmware.policy.keys import generate_key, load_public_key
from provisioning.exceptions import ProvisioningCodeError, ProvisioningError
from provisioning.qr import (
    MAX_TEXT_CHARS,
    MAX_V10_CHARS,
    PREFIX,
    ProvisioningClaims,
    issue_provisioning,
    new_claims,
    normalize_broker,
    read_text,
    token_secret_hash,
    verify_provisioning,
)

NOW = 1_790_000_000  # 2026-09-21
FP = hashlib.sha256(b"the fleet CA certificate").digest()
KEY = generate_key("EdDSA")
OTHER = generate_key("EdDSA")
KEYS = key_ring([KEY.public_key()])
BROKER = "mqtts://mqtt.acme.example:8883"


def claims(**kw: object) -> ProvisioningClaims:
    base: dict[str, object] = {
        "fleet": "acme",
        "site": "hq",
        "door": "lobby",
        "direction": "in",
        "broker": BROKER,
        "ca_fingerprint": FP,
        "iat": NOW - 60,
        "exp": NOW + 7200,
    }
    base.update(kw)
    return new_claims(**base)  # type: ignore[arg-type]


def code(c: ProvisioningClaims | None = None, key: object = KEY, kid: bytes | None = None) -> str:
    return issue_provisioning(c or claims(), signer(key, kid))  # type: ignore[arg-type]


def check(text: str | bytes, **kw: object) -> ProvisioningClaims:
    args: dict[str, object] = {"public_keys": KEYS, "fleet": "acme", "now": NOW}
    args.update(kw)
    return verify_code(text, **args)  # type: ignore[arg-type]


def refusal(text: str | bytes, **kw: object) -> tuple[str, str | None]:
    with pytest.raises(ProvisioningCodeError) as e:
        check(text, **kw)
    return e.value.reason, e.value.why


def cose_of(text: str) -> bytes:
    return bytes(base45.b45decode(text[len(PREFIX) :]))


def text_of(cose_bytes: bytes) -> str:
    return PREFIX + str(base45.b45encode(cose_bytes).decode("ascii"))


def signed_payload(payload: object) -> str:
    """A code whose payload is ``payload`` (CBOR-encoded), properly signed by KEY."""
    return text_of(cose.sign1(cbor2.dumps(payload), KEY, kid_of(KEY.public_key())))


# --- round trip -----------------------------------------------------------------------------


def test_round_trip_with_a_trusted_clock() -> None:
    c = claims(direction="both")
    got = check(code(c))
    assert got == c
    assert got.clock_checked is True
    assert (got.fleet, got.site, got.door, got.direction) == ("acme", "hq", "lobby", "both")
    assert got.broker == BROKER
    assert (got.broker_tls, got.broker_host, got.broker_port) == (True, "mqtt.acme.example", 8883)
    assert got.ca_fingerprint == FP
    assert len(got.token_id) == 8 and len(got.token_secret) == 8
    assert got.cti == got.token_id
    assert token_secret_hash(got.token_secret) == hashlib.sha256(got.token_secret).digest()


def test_tokens_are_fresh_per_code() -> None:
    a, b = claims(), claims()
    assert a.token_id != b.token_id and a.token_secret != b.token_secret


def test_clock_untrusted_accepts_but_says_so() -> None:
    c = claims(iat=NOW - 10 * 86400, exp=NOW - 9 * 86400)
    got = check(code(c), now=None)
    assert got == c and got.clock_checked is False
    # a floor the reader knows has passed still shows a long-expired code
    assert refusal(code(c), now=None, clock_floor=NOW) == ("expired", None)
    assert check(code(c), now=None, clock_floor=c.exp - 3600).clock_checked is False


def test_bytes_from_a_decoder_are_accepted() -> None:
    text = code()
    assert check(text.encode("ascii")) == check(text)


def test_compact_broker_forms_round_trip() -> None:
    for url, canonical in [
        ("mqtts://MQTT.Acme.Example", BROKER),
        ("mqtts://mqtt.acme.example:18883/", "mqtts://mqtt.acme.example:18883"),
        ("mqtts://10.0.0.5", "mqtts://10.0.0.5:8883"),
        ("mqtts://[2001:DB8:0:0::1]:9883", "mqtts://[2001:db8::1]:9883"),
    ]:
        c = claims(broker=url)
        assert c.broker == canonical
        assert check(code(c)).broker == canonical
    lab = claims(broker="mqtt://lab-broker", allow_plain_mqtt=True)
    assert lab.broker == "mqtt://lab-broker:1883"
    got = check(code(lab), allow_plain_mqtt=True)
    assert (got.broker_tls, got.broker_port) == (False, 1883)


def test_example_fits_version_10_at_level_m() -> None:
    text = code()
    assert len(text) <= MAX_V10_CHARS
    qr = segno.make_qr(text, error="m", mode="alphanumeric", boost_error=False)
    assert (
        isinstance(qr.version, int)
        and qr.version <= 10
        and qr.error == "M"
        and qr.mode == "alphanumeric"
    )
    assert qr_version(text) == qr.version


# --- refusals -------------------------------------------------------------------------------


def test_bad_signature() -> None:
    raw = bytearray(cose_of(code()))
    raw[-1] ^= 1  # one bit of the signature
    assert refusal(text_of(bytes(raw))) == ("bad_signature", None)
    # another key claiming the fleet key's kid
    assert refusal(code(key=OTHER, kid=kid_of(KEY.public_key()))) == ("bad_signature", None)


def test_es256_header_pointed_at_the_ed25519_key_is_a_bad_signature() -> None:
    es = generate_key("ES256")
    assert refusal(code(key=es, kid=kid_of(KEY.public_key()))) == ("bad_signature", None)


def test_unknown_key() -> None:
    assert refusal(code(key=OTHER)) == ("unknown_key", None)
    assert check(code(key=OTHER), public_keys=key_ring([KEY.public_key(), OTHER.public_key()]))


def test_expiry_and_not_yet_valid_with_leeway() -> None:
    c = claims(iat=NOW - 7200, exp=NOW - 60)
    assert refusal(code(c)) == ("expired", None)  # exactly at exp + leeway
    assert check(code(c), now=NOW - 1).clock_checked
    assert refusal(code(c), now=NOW + 10, leeway_s=0) == ("expired", None)
    future = claims(iat=NOW + 61, exp=NOW + 7200)
    assert refusal(code(future)) == ("not_yet_valid", None)
    assert check(code(claims(iat=NOW + 60, exp=NOW + 7200))).iat == NOW + 60


def test_wrong_fleet() -> None:
    assert refusal(code(claims(fleet="globex"))) == ("wrong_fleet", None)
    assert check(code(claims(fleet="globex")), fleet="globex").fleet == "globex"


def test_replayed() -> None:
    c = claims()
    text = code(c)
    assert refusal(text, seen={c.token_id}) == ("replayed", None)
    assert check(text, seen={b"\x00" * 8}) == c


@pytest.mark.parametrize(
    "text, why",
    [
        (PREFIX + "0" * (MAX_TEXT_CHARS - len(PREFIX) + 1), "too_large"),
        ("QGP1:Ä", "not_ascii"),
        (b"QGP1:\xff", "not_ascii"),
        ("QG1:6BFOXN*TS0BI$ZD4N9:9S6RCVN5+O30K3/XIV0W23NTDEMQD", "prefix"),
        ("", "prefix"),
        ("QGP1:abc", "base45"),
        ("QGP1:ZZZ", "base45"),
        (PREFIX + base45.b45encode(b"\xd2\x84").decode(), "cose"),
        (PREFIX, "cose"),
    ],
)
def test_malformed_text(text: str | bytes, why: str) -> None:
    assert refusal(text) == ("malformed", why)


DROP = object()


def _payload(change: dict[int, object] | None = None) -> dict[int, object]:
    """A good claims map (the wire form) with ``change`` applied (DROP removes a claim)."""
    c = claims()
    p: dict[int, object] = {
        1: "acme",
        2: "hq",
        3: "lobby",
        4: 0,
        5: "mqtt.acme.example",
        6: FP,
        7: c.token_id + c.token_secret,
        8: c.iat,
        9: c.exp,
    }
    for key, value in (change or {}).items():
        if value is DROP:
            del p[key]
        else:
            p[key] = value
    return p


@pytest.mark.parametrize(
    "payload, why",
    [
        ([1, 2], "claims"),
        (_payload({1: DROP}), "claims"),
        ({**_payload(), 10: 1}, "claims"),
        (_payload({1: 7}), "claims"),
        (_payload({1: "acme corp"}), "claims"),
        (_payload({2: "hq/+"}), "claims"),
        (_payload({2: "_enroll"}), "claims"),
        (_payload({3: ""}), "claims"),
        (_payload({3: "lob\nby"}), "claims"),
        (_payload({4: 3}), "claims"),
        (_payload({4: True}), "claims"),
        (_payload({5: b"host"}), "claims"),
        (_payload({5: "mqtts://mqtt.acme.example"}), "broker"),
        (_payload({5: "user@host"}), "broker"),
        (_payload({5: "host:0"}), "broker"),
        (_payload({5: "[::zz]"}), "broker"),
        (_payload({5: "mqtt://lab:1883"}), "plain_mqtt"),
        (_payload({6: FP[:31]}), "claims"),
        (_payload({7: b"\x00" * 15}), "claims"),
        (_payload({8: -1}), "claims"),
        (_payload({8: 1.5}), "claims"),
        (_payload({9: NOW - 120}), "claims"),  # exp before iat
    ],
)
def test_malformed_claims_even_when_signed(payload: object, why: str) -> None:
    assert refusal(signed_payload(payload)) == ("malformed", why)


def test_payload_that_is_not_cbor_even_when_signed() -> None:
    assert check(signed_payload(_payload())).door == "lobby"  # the helper's map is good
    text = text_of(cose.sign1(b"\xff\x00", KEY, kid_of(KEY.public_key())))
    assert refusal(text) == ("malformed", "claims")


def test_plain_mqtt_only_when_allowed() -> None:
    with pytest.raises(ValueError, match="mqtts"):
        normalize_broker("mqtt://lab")
    assert refusal(signed_payload(_payload({5: "mqtt://lab:1883"}))) == ("malformed", "plain_mqtt")


def test_error_messages_say_what_next() -> None:
    with pytest.raises(ProvisioningCodeError) as e:
        check(code(claims(fleet="globex")))
    assert isinstance(e.value, ProvisioningError)
    assert "globex" in str(e.value) and "ask this fleet's administrator" in str(e.value)


@pytest.mark.parametrize(
    "kw",
    [
        {"fleet": "a b"},
        {"site": "a/b"},
        {"door": "x" * 65},
        {"direction": "sideways"},
        {"broker": "https://acme.example"},
        {"broker": "mqtts://u:p@acme.example"},
        {"broker": "mqtts://acme.example/path"},
        {"broker": "mqtts://acme.example:70000"},
        {"ca_fingerprint": b"\x00" * 20},
        {"exp": NOW - 60},
        {"exp": NOW + 31 * 86400},
    ],
)
def test_issuing_refuses_bad_claims(kw: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        claims(**kw)


# --- hostile input --------------------------------------------------------------------------

GOOD = code()
B45 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"


def _never_accepted_or_crashes(text: str | bytes) -> None:
    try:
        check(text)
    except ProvisioningCodeError as e:
        assert e.reason in {"malformed", "bad_signature", "unknown_key"}
    else:
        raise AssertionError("a damaged code verified")


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=B45, max_size=600) | st.text(max_size=300))
def test_fuzz_random_text_after_the_prefix(tail: str) -> None:
    _never_accepted_or_crashes(PREFIX + tail)


@settings(max_examples=200)
@given(st.binary(max_size=400))
def test_fuzz_random_cose_bytes(data: bytes) -> None:
    _never_accepted_or_crashes(text_of(data))
    _never_accepted_or_crashes(text_of(b"\xd2" + data))
    _never_accepted_or_crashes(PREFIX.encode() + data)


@settings(max_examples=200)
@given(st.integers(min_value=0, max_value=len(GOOD) - 1))
def test_fuzz_truncated_codes(n: int) -> None:
    _never_accepted_or_crashes(GOOD[:n])


@settings(max_examples=400)
@given(st.data())
def test_fuzz_bit_flips(data: st.DataObject) -> None:
    raw = bytearray(cose_of(GOOD))
    flips = data.draw(st.lists(st.integers(0, len(raw) * 8 - 1), min_size=1, max_size=4))
    for bit in flips:
        raw[bit // 8] ^= 1 << (bit % 8)
    if bytes(raw) == cose_of(GOOD):
        return  # flips that cancel out
    _never_accepted_or_crashes(text_of(bytes(raw)))


def test_read_text_caps_before_decoding() -> None:
    with pytest.raises(ProvisioningCodeError) as e:
        read_text(PREFIX + "A" * 10**6)
    assert e.value.why == "too_large"


def test_opener_contract_with_a_fake_codec() -> None:
    """provisioning.qr takes COSE as callables: a parse that refuses is "malformed"."""

    def parse(data: bytes) -> cose.Sign1:
        raise ValueError("nope")

    with pytest.raises(ProvisioningCodeError) as e:
        verify_provisioning(
            GOOD,
            opener=type(OPENER)(parse=parse, verify=OPENER.verify),
            public_keys=KEYS,
            fleet="acme",
            now=NOW,
        )
    assert (e.value.reason, e.value.why) == ("malformed", "cose")


# --- through the camera's decoder -----------------------------------------------------------


def _gray(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"), dtype=np.uint8)


def _scan(path: Path) -> bytes:
    found = make_decoder("zxing-cpp").decode(_gray(path))
    assert len(found) == 1
    return found[0].payload


@pytest.mark.parametrize("scale", [4, 6, 8])
def test_png_through_the_real_decoder(tmp_path: Path, scale: int) -> None:
    now = int(time.time())
    c = claims(iat=now, exp=now + 3600)
    good = code(c)
    forged = code(claims(iat=now, exp=now + 3600), key=OTHER)
    impostor = code(claims(iat=now, exp=now + 3600), key=OTHER, kid=kid_of(KEY.public_key()))
    expired = code(claims(iat=now - 7200, exp=now - 3600))
    results: dict[str, object] = {}
    for name, text in [
        ("good", good),
        ("forged", forged),
        ("impostor", impostor),
        ("expired", expired),
    ]:
        path = tmp_path / f"{name}.png"
        segno.make_qr(text, error="m", mode="alphanumeric", boost_error=False).save(
            str(path), scale=scale, border=4
        )
        payload = _scan(path)
        assert payload == text.encode("ascii")
        try:
            results[name] = check(payload, now=now)
        except ProvisioningCodeError as e:
            results[name] = e.reason
    assert results == {
        "good": c,
        "forged": "unknown_key",
        "impostor": "bad_signature",
        "expired": "expired",
    }


# --- the commands ---------------------------------------------------------------------------


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _ca_cert(path: Path) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "acme fleet root")])
    t = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(t)
        .not_valid_after(t + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert.fingerprint(hashes.SHA256())


def test_keygen_writes_0600_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "keys"
    r = runner.invoke(provision, ["keygen", "--out", str(out)])
    assert r.exit_code == 0, r.output
    key, pub = out / "provisioning.key", out / "provisioning.pub.pem"
    assert _mode(key) == 0o600 and _mode(out) == 0o700
    assert r.stdout.strip() == kid_of(load_public_key(pub)).hex()
    before = key.read_bytes()
    r = runner.invoke(provision, ["keygen", "--out", str(out)])
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert key.read_bytes() == before
    r = runner.invoke(provision, ["keygen", "--out", str(out), "--name", "../x"])
    assert r.exit_code == 2 and not (tmp_path / "x.key").exists()


def test_qr_png_and_token_file_decode_and_verify(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(provision, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    ca_fp = _ca_cert(tmp_path / "root.crt")
    assert ca_fingerprint_of(tmp_path / "root.crt") == ca_fp
    png, token = tmp_path / "lobby.png", tmp_path / "lobby.token.json"
    args = ["qr", "--key", str(tmp_path / "provisioning.key"), "--fleet", "acme"]
    args += ["--site", "hq", "--door", "lobby", "--direction", "out"]
    args += ["--broker", "mqtts://mqtt.acme.example", "--ca", str(tmp_path / "root.crt")]
    args += ["--expires", "2h", "--token-out", str(token), "--png", str(png)]
    before = int(time.time())
    r = runner.invoke(provision, args)
    assert r.exit_code == 0, r.output
    text = r.stdout.strip()
    assert text.startswith(PREFIX) and "QR version 10" in r.stderr
    assert _scan(png) == text.encode("ascii")
    keys = key_ring([load_public_key(tmp_path / "provisioning.pub.pem")])
    got = verify_code(_scan(png), public_keys=keys, fleet="acme", now=int(time.time()))
    assert (got.site, got.door, got.direction, got.broker) == ("hq", "lobby", "out", BROKER)
    assert got.ca_fingerprint == ca_fp
    assert before + 7200 <= got.exp <= int(time.time()) + 7200
    assert _mode(token) == 0o600
    doc = json.loads(token.read_text())
    assert doc["format"] == "qrgate-enroll-token-1"
    assert bytes.fromhex(doc["token_id"]) == got.token_id == got.cti
    assert bytes.fromhex(doc["secret"]) == got.token_secret
    assert doc["secret_sha256"] == hashlib.sha256(got.token_secret).hexdigest()
    assert (doc["site"], doc["door"], doc["exp"], doc["fleet"]) == ("hq", "lobby", got.exp, "acme")
    # the token file is never overwritten: its token would be lost to the server
    r = runner.invoke(provision, args)
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert json.loads(token.read_text()) == doc


def test_qr_svg_and_terminal(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(provision, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    base = ["qr", "--key", str(tmp_path / "provisioning.key"), "--site", "hq", "--door", "d1"]
    base += ["--broker", "mqtts://10.1.2.3:8883", "--ca-fingerprint", FP.hex(":")]
    exp = (int(time.time()) // 3600 + 24) * 3600  # a whole hour, a day or so ahead
    iso = datetime.datetime.fromtimestamp(exp, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    base += ["--expires", iso]
    svg = tmp_path / "d1.svg"
    r = runner.invoke(provision, [*base, "--svg", str(svg)])
    assert r.exit_code == 0, r.output
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()
    keys = key_ring([load_public_key(tmp_path / "provisioning.pub.pem")])
    got = verify_code(r.stdout.strip(), public_keys=keys, fleet="default", now=int(time.time()))
    assert (got.fleet, got.ca_fingerprint, got.exp) == ("default", FP, exp)
    r = runner.invoke(provision, base)
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[0].startswith(PREFIX)
    assert len(lines) > 20 and "\x1b[" in r.stdout  # the drawing, ANSI colours


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--broker", "mqtt://lab"], "mqtts"),
        (["--broker", "mqtts://x", "--ca", "c.pem"], "exactly one"),
        (["--broker", "mqtts://x", "--expires", "-1h"], "future"),
        (["--broker", "mqtts://x", "--site", "a/b"], "topic level"),
        (["--broker", "mqtts://x", "--png", "a.png", "--svg", "a.svg"], "at most one"),
    ],
)
def test_qr_usage_errors(tmp_path: Path, extra: list[str], message: str) -> None:
    runner = CliRunner()
    assert runner.invoke(provision, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    args = ["qr", "--key", str(tmp_path / "provisioning.key"), "--site", "hq", "--door", "d"]
    args += ["--ca-fingerprint", FP.hex(), "--expires", "1h", *extra]
    r = runner.invoke(provision, args)
    assert r.exit_code == 2 and message in r.stderr, r.output


def test_qr_lab_broker_with_flag(tmp_path: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(provision, ["keygen", "--out", str(tmp_path)]).exit_code == 0
    args = ["qr", "--key", str(tmp_path / "provisioning.key"), "--site", "lab", "--door", "d"]
    args += ["--ca-fingerprint", FP.hex(), "--expires", "30m", "--broker", "mqtt://127.0.0.1"]
    args += ["--allow-plain-mqtt", "--png", str(tmp_path / "lab.png")]
    r = runner.invoke(provision, args)
    assert r.exit_code == 0, r.output
    keys = key_ring([load_public_key(tmp_path / "provisioning.pub.pem")])
    text = r.stdout.strip()
    with pytest.raises(ProvisioningCodeError) as e:
        verify_code(text, public_keys=keys, fleet="default", now=None)
    assert e.value.why == "plain_mqtt"
    got = verify_code(text, public_keys=keys, fleet="default", now=None, allow_plain_mqtt=True)
    assert got.broker == "mqtt://127.0.0.1:1883"


def test_input_helpers() -> None:
    assert parse_fingerprint(FP.hex(":").upper()) == FP
    with pytest.raises(ValueError):
        parse_fingerprint("abcd")
    assert parse_expiry("2h", NOW) == NOW + 7200
    assert parse_expiry("+15m", NOW) == NOW + 900
    assert parse_expiry("2026-09-22T00:00:00Z", NOW) == 1_790_035_200
    with pytest.raises(ValueError):
        parse_expiry("now", NOW)
    with pytest.raises(ValueError):
        parse_expiry("soon", NOW)
