"""The device key, CSR and certificate in ``<state_dir>/identity`` (provisioning.device):
real files and modes, real ECDSA signatures, certificates signed here with cryptography."""

from __future__ import annotations

import datetime as dt
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.device import DeviceKeys, identity_dir, spki_fingerprint
from provisioning.exceptions import DeviceCertificateError, DeviceKeyError, ProvisioningError

DEVICE = "10000000a1b2c3d4"


@pytest.fixture(autouse=True)
def usual_umask() -> Iterator[None]:
    """The umask a service usually runs with: modes below must not depend on it."""
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


class SmallCa:
    """A one-level CA for the tests: signs device certificates from CSRs."""

    def __init__(self, cn: str = "qrgate test issuing CA") -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name(cn))
            .issuer_name(name(cn))
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def sign(
        self,
        csr_pem: bytes,
        *,
        cn: str | None = None,
        public_key: ec.EllipticCurvePublicKey | None = None,
        days: int = 730,
    ) -> bytes:
        csr = x509.load_pem_x509_csr(csr_pem)
        assert csr.is_signature_valid
        now = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
        subject = name(cn) if cn is not None else csr.subject
        key = public_key if public_key is not None else csr.public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(key)
            .serial_number(0x1234ABCD)
            .not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM)


def enrolled(tmp_path: Path, ca: SmallCa) -> DeviceKeys:
    keys = DeviceKeys(identity_dir(tmp_path / "state"))
    keys.create_key()
    keys.store_certificate(ca.sign(keys.make_csr(DEVICE)), ca.pem, device_id=DEVICE)
    return keys


def test_create_key_writes_a_p256_pkcs8_key_0600_in_a_0700_folder(tmp_path: Path) -> None:
    keys = DeviceKeys(identity_dir(tmp_path / "state"))
    assert keys.folder == tmp_path / "state" / "identity"
    fingerprint = keys.create_key()
    assert mode(keys.folder) == 0o700
    assert mode(keys.key_path) == 0o600
    assert stat.S_ISREG(os.lstat(keys.key_path).st_mode)
    data = keys.key_path.read_bytes()
    assert data.startswith(b"-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, unencrypted
    key = serialization.load_pem_private_key(data, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert isinstance(key.curve, ec.SECP256R1)
    assert fingerprint == spki_fingerprint(key.public_key())
    assert len(fingerprint) == 64 and int(fingerprint, 16) >= 0
    # no temp file left behind
    assert sorted(p.name for p in keys.folder.iterdir()) == ["device.key"]


def test_create_key_tightens_an_existing_open_folder(tmp_path: Path) -> None:
    folder = tmp_path / "identity"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)
    DeviceKeys(folder).create_key()
    assert mode(folder) == 0o700


def test_create_key_never_replaces_a_key(tmp_path: Path) -> None:
    keys = DeviceKeys(tmp_path / "identity")
    first = keys.create_key()
    before = keys.key_path.read_bytes()
    with pytest.raises(DeviceKeyError, match="already exists; not replacing it"):
        keys.create_key()
    assert keys.key_path.read_bytes() == before
    assert spki_fingerprint(keys.load_key().public_key()) == first
    assert sorted(p.name for p in keys.folder.iterdir()) == ["device.key"]


@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o660])
def test_load_key_refuses_a_key_others_can_read(tmp_path: Path, bad_mode: int) -> None:
    keys = DeviceKeys(tmp_path / "identity")
    keys.create_key()
    os.chmod(keys.key_path, bad_mode)
    with pytest.raises(DeviceKeyError) as e:
        keys.load_key()
    assert f"mode {bad_mode:04o}" in str(e.value)
    assert f"chmod 600 {keys.key_path}" in str(e.value)
    assert "factory-reset" in str(e.value)
    with pytest.raises(DeviceKeyError):
        keys.make_csr(DEVICE)  # nothing is signed with a key that may have leaked
    assert not keys.csr_path.exists()
    os.chmod(keys.key_path, 0o400)
    assert isinstance(keys.load_key(), ec.EllipticCurvePrivateKey)


def test_load_key_refuses_missing_symlinked_and_foreign_keys(tmp_path: Path) -> None:
    keys = DeviceKeys(tmp_path / "identity")
    with pytest.raises(DeviceKeyError, match="missing"):
        keys.load_key()
    keys.folder.mkdir()
    real = tmp_path / "elsewhere.key"
    real.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    os.chmod(real, 0o600)
    keys.key_path.symlink_to(real)
    with pytest.raises(DeviceKeyError, match="cannot read"):
        keys.load_key()
    keys.key_path.unlink()
    p384 = ec.generate_private_key(ec.SECP384R1())
    fd = os.open(keys.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            p384.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    with pytest.raises(DeviceKeyError, match="not an ECDSA P-256 key"):
        keys.load_key()
    keys.key_path.write_bytes(b"not a key")
    with pytest.raises(DeviceKeyError, match="not an unencrypted PEM private key"):
        keys.load_key()


def test_csr_names_the_device_and_verifies_with_the_device_key(tmp_path: Path) -> None:
    keys = DeviceKeys(tmp_path / "identity")
    fingerprint = keys.create_key()
    pem = keys.make_csr(DEVICE)
    assert pem.startswith(b"-----BEGIN CERTIFICATE REQUEST-----\n")
    assert keys.csr_path.read_bytes() == pem
    assert mode(keys.csr_path) == 0o644
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid
    assert csr.subject.rfc4514_string() == f"CN={DEVICE}"
    assert isinstance(csr.signature_hash_algorithm, hashes.SHA256)
    public = csr.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert spki_fingerprint(public) == fingerprint
    # the CSR carries the public key only
    assert b"PRIVATE" not in pem
    assert keys.key_path.read_bytes() not in pem
    with pytest.raises(ValueError, match="not a device id"):
        keys.make_csr("Door/1 #")


def test_no_public_api_returns_the_private_key() -> None:
    public = {n for n in dir(DeviceKeys) if not n.startswith("_")}
    assert public == {
        "cert_path",
        "chain_path",
        "create_key",
        "csr_path",
        "has_key",
        "key_path",
        "load_certificate",
        "load_key",
        "make_csr",
        "status",
        "store_certificate",
        "wipe",
    }


def test_store_certificate_and_status_before_and_after(tmp_path: Path) -> None:
    ca = SmallCa()
    keys = DeviceKeys(tmp_path / "state" / "identity")
    before = keys.status(DEVICE)
    assert before["state"] == "not enrolled"
    assert before["device_id"] == DEVICE
    assert before["key_fingerprint"] is None
    assert before["certificate"] is None
    assert before["csr"] is False

    fingerprint = keys.create_key()
    made = keys.status(DEVICE)
    assert made["state"] == "key made, not enrolled"
    assert made["key_fingerprint"] == fingerprint

    csr = keys.make_csr(DEVICE)
    cert = keys.store_certificate(ca.sign(csr), ca.pem, device_id=DEVICE)
    assert cert.serial_number == 0x1234ABCD
    assert x509.load_pem_x509_certificate(keys.cert_path.read_bytes()) == cert
    assert x509.load_pem_x509_certificates(keys.chain_path.read_bytes()) == [ca.cert]
    assert mode(keys.cert_path) == 0o644 and mode(keys.key_path) == 0o600
    after = keys.status(DEVICE)
    assert after == {
        "device_id": DEVICE,
        "state": "enrolled",
        "folder": str(keys.folder),
        "key_fingerprint": fingerprint,
        "key_error": None,
        "csr": True,
        "certificate": {
            "subject": f"CN={DEVICE}",
            "issuer": "CN=qrgate test issuing CA",
            "serial": "1234abcd",
            "not_before": "2026-12-01T00:00:00+00:00",
            "not_after": "2028-11-30T00:00:00+00:00",
            "matches_key": True,
            "matches_device": True,
        },
        "certificate_error": None,
    }
    assert keys.status("20000000ffffffff")["certificate"]["matches_device"] is False


def test_a_certificate_for_another_key_is_refused(tmp_path: Path) -> None:
    ca = SmallCa()
    keys = DeviceKeys(tmp_path / "identity")
    keys.create_key()
    csr = keys.make_csr(DEVICE)
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    with pytest.raises(DeviceCertificateError, match="for another key"):
        keys.store_certificate(ca.sign(csr, public_key=other), ca.pem, device_id=DEVICE)
    assert not keys.cert_path.exists() and not keys.chain_path.exists()
    assert keys.status(DEVICE)["state"] == "key made, not enrolled"


def test_a_certificate_naming_another_device_is_refused(tmp_path: Path) -> None:
    ca = SmallCa()
    keys = DeviceKeys(tmp_path / "identity")
    keys.create_key()
    csr = keys.make_csr(DEVICE)
    with pytest.raises(DeviceCertificateError, match="CN=20000000ffffffff, this reader is"):
        keys.store_certificate(ca.sign(csr, cn="20000000ffffffff"), ca.pem, device_id=DEVICE)
    assert not keys.cert_path.exists() and not keys.chain_path.exists()


def test_a_certificate_not_signed_by_its_issuer_in_the_chain_is_refused(tmp_path: Path) -> None:
    keys = DeviceKeys(tmp_path / "identity")
    keys.create_key()
    csr = keys.make_csr(DEVICE)
    real, impostor = SmallCa(), SmallCa()  # same name, different keys
    with pytest.raises(DeviceCertificateError, match="does not verify against its issuer"):
        keys.store_certificate(impostor.sign(csr), real.pem, device_id=DEVICE)
    with pytest.raises(DeviceCertificateError, match="not a PEM certificate"):
        keys.store_certificate(b"garbage", real.pem, device_id=DEVICE)
    with pytest.raises(DeviceCertificateError, match="CA chain is not PEM"):
        keys.store_certificate(real.sign(csr), b"", device_id=DEVICE)
    assert not keys.cert_path.exists() and not keys.chain_path.exists()


def test_re_enrollment_replaces_the_certificate(tmp_path: Path) -> None:
    ca = SmallCa()
    keys = enrolled(tmp_path, ca)
    second = keys.store_certificate(
        ca.sign(keys.make_csr(DEVICE), days=30), ca.pem, device_id=DEVICE
    )
    assert keys.load_certificate() == second
    assert keys.status(DEVICE)["certificate"]["not_after"] == "2026-12-31T00:00:00+00:00"


def test_status_reports_a_too_open_key_and_a_damaged_certificate(tmp_path: Path) -> None:
    keys = enrolled(tmp_path, SmallCa())
    os.chmod(keys.key_path, 0o644)
    s = keys.status(DEVICE)
    assert s["state"] == "damaged"
    assert "chmod 600" in s["key_error"]
    assert s["key_fingerprint"] is None
    assert s["certificate"]["matches_key"] is None
    os.chmod(keys.key_path, 0o600)
    keys.cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    s = keys.status(DEVICE)
    assert s["state"] == "damaged"
    assert s["certificate"] is None
    assert "not a PEM certificate" in s["certificate_error"]


def test_wipe_removes_key_csr_certificate_and_chain(tmp_path: Path) -> None:
    keys = enrolled(tmp_path, SmallCa())
    (keys.folder / ".device.key.abc123.tmp").write_bytes(b"half a key")
    removed = keys.wipe()
    assert removed == [
        keys.key_path,
        keys.csr_path,
        keys.cert_path,
        keys.chain_path,
        keys.folder / ".device.key.abc123.tmp",
        keys.folder,
    ]
    assert not keys.folder.exists()
    assert keys.status(DEVICE)["state"] == "not enrolled"
    assert keys.wipe() == []
    # a new key can be made afterwards (provisioning again)
    assert len(keys.create_key()) == 64


def test_wipe_leaves_files_it_does_not_own(tmp_path: Path) -> None:
    keys = enrolled(tmp_path, SmallCa())
    (keys.folder / "notes.txt").write_text("installer's note")
    assert keys.folder not in keys.wipe()
    assert sorted(p.name for p in keys.folder.iterdir()) == ["notes.txt"]


def test_errors_say_what_happens_next_and_share_a_root() -> None:
    assert issubclass(DeviceKeyError, ProvisioningError)
    assert issubclass(DeviceCertificateError, ProvisioningError)
