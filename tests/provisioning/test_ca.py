"""The fleet CA (provisioning.ca) and ``qrgate ca``: real keys, certificates, CRLs and files."""

from __future__ import annotations

import datetime
import ipaddress
import json
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.admin.ca import ca as ca_cli
from provisioning import ca
from provisioning.exceptions import CaError, CsrError, ProvisioningError

DEVICE = "10000000abcdef01"


def make_csr(
    cn: str | None = DEVICE,
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None,
    *,
    extra: Sequence[x509.NameAttribute[str]] = (),
) -> tuple[ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, bytes]:
    """A key (P-256 unless given) and a PEM CSR signed with it naming ``cn``."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    attrs = [] if cn is None else [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs + list(extra)))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def ext(cert: x509.Certificate | x509.CertificateRevocationList, cls: type) -> x509.Extension:  # type: ignore[type-arg]
    return cert.extensions.get_extension_for_class(cls)


def ski(cert: x509.Certificate) -> bytes:
    return ext(cert, x509.SubjectKeyIdentifier).value.digest  # type: ignore[no-any-return]


def aki(cert: x509.Certificate | x509.CertificateRevocationList) -> bytes:
    return ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier  # type: ignore[no-any-return]


@pytest.fixture
def fleet(tmp_path: Path) -> Path:
    folder = tmp_path / "fleet-ca"
    ca.init_ca(folder, name="lab fleet")
    return folder


def test_init_makes_a_root_and_an_issuing_ca(fleet: Path) -> None:
    assert stat.S_IMODE(fleet.stat().st_mode) == 0o700
    for name in ("root.key", "issuing.key", "issued.json"):
        assert stat.S_IMODE((fleet / name).stat().st_mode) == 0o600, name
    root, issuing = load(fleet / "root.crt"), load(fleet / "issuing.crt")
    assert root.subject.rfc4514_string() == "CN=lab fleet root CA"
    assert root.issuer == root.subject
    assert issuing.subject.rfc4514_string() == "CN=lab fleet issuing CA"
    assert issuing.issuer == root.subject
    for cert, path_length in ((root, 1), (issuing, 0)):
        assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
        assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
        bc = ext(cert, x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == path_length
        ku = ext(cert, x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
        assert not ku.value.digital_signature
        assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest
    assert aki(root) == ski(root)
    assert aki(issuing) == ski(root)
    root.verify_directly_issued_by(root)
    issuing.verify_directly_issued_by(root)
    days = (root.not_valid_after_utc - root.not_valid_before_utc).days
    assert days == 7300  # plus the hour of backdating
    assert (issuing.not_valid_after_utc - issuing.not_valid_before_utc).days == 3650
    key = serialization.load_pem_private_key((fleet / "issuing.key").read_bytes(), None)
    assert key.public_key() == issuing.public_key()
    assert ca.list_issued(fleet) == []
    crl = x509.load_pem_x509_crl((fleet / "crl.pem").read_bytes())
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert list(crl) == []


def test_init_refuses_to_overwrite_a_ca(fleet: Path) -> None:
    before = {p.name: p.read_bytes() for p in fleet.iterdir()}
    with pytest.raises(CaError, match="already there"):
        ca.init_ca(fleet, name="another")
    assert {p.name: p.read_bytes() for p in fleet.iterdir()} == before


def test_init_refuses_a_bad_name(tmp_path: Path) -> None:
    for name in ("", "a\nb", "x" * 60):
        with pytest.raises(ValueError, match="CA name"):
            ca.init_ca(tmp_path / "x", name=name)
    assert not (tmp_path / "x" / "root.key").exists()


def verify_client(fleet: Path, pem: bytes) -> verification.VerifiedClient:
    """The chain check a TLS server does (RFC 5280 path validation, clientAuth), done by
    cryptography's verifier with the root as the only trust anchor."""
    store = verification.Store([load(fleet / "root.crt")])
    # the Web PKI profile wants a SubjectAltName in client certificates too; a reader's
    # identity is its CN (mosquitto's use_identity_as_username), so it carries none
    ee = verification.ExtensionPolicy.webpki_defaults_ee().may_be_present(
        x509.SubjectAlternativeName, verification.Criticality.AGNOSTIC, None
    )
    verifier = (
        verification.PolicyBuilder()
        .store(store)
        .extension_policies(
            ca_policy=verification.ExtensionPolicy.webpki_defaults_ca(), ee_policy=ee
        )
        .build_client_verifier()
    )
    leaf = x509.load_pem_x509_certificate(pem)
    return verifier.verify(leaf, [load(fleet / "issuing.crt")])


def test_sign_csr_issues_a_device_certificate(fleet: Path) -> None:
    key, csr = make_csr(DEVICE, extra=[x509.NameAttribute(NameOID.ORGANIZATION_NAME, "evil")])
    before = datetime.datetime.now(datetime.UTC)
    pem = ca.sign_csr(fleet, csr)
    cert = x509.load_pem_x509_certificate(pem)
    issuing = load(fleet / "issuing.crt")
    # only the CN is taken from the CSR
    assert cert.subject.rfc4514_string() == f"CN={DEVICE}"
    assert cert.issuer == issuing.subject
    assert cert.public_key() == key.public_key()
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_cert_sign
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert ski(cert) == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest
    assert aki(cert) == ski(issuing)
    assert cert.serial_number.bit_length() > 64
    assert cert.not_valid_before_utc <= before - datetime.timedelta(minutes=59)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(
        days=730, hours=1
    )
    cert.verify_directly_issued_by(issuing)
    verified = verify_client(fleet, pem)
    assert [c.subject for c in verified.chain] == [
        cert.subject,
        issuing.subject,
        load(fleet / "root.crt").subject,
    ]
    (entry,) = ca.list_issued(fleet)
    assert (entry.serial, entry.cn, entry.kind, entry.revoked) == (
        cert.serial_number,
        DEVICE,
        "device",
        False,
    )
    assert entry.not_after == cert.not_valid_after_utc
    doc = json.loads((fleet / "issued.json").read_text())
    assert doc["certs"][0]["serial"] == f"{cert.serial_number:x}"
    assert doc["certs"][0]["revoked"] is False


def test_two_signatures_get_different_serials(fleet: Path) -> None:
    a = x509.load_pem_x509_certificate(ca.sign_csr(fleet, make_csr()[1], days=10))
    b = x509.load_pem_x509_certificate(ca.sign_csr(fleet, make_csr()[1], days=10))
    assert a.serial_number != b.serial_number
    assert [e.serial for e in ca.list_issued(fleet)] == [a.serial_number, b.serial_number]


@pytest.mark.parametrize(
    ("csr", "message"),
    [
        pytest.param(make_csr("Reader-1")[1], "not a device id", id="upper-case"),
        pytest.param(make_csr("ab1")[1], "not a device id", id="too-short"),
        pytest.param(make_csr("a/b/c/d")[1], "not a device id", id="slash"),
        pytest.param(make_csr("reader+1")[1], "not a device id", id="plus"),
        pytest.param(make_csr("reader-1\n")[1], "not a device id", id="newline"),
        pytest.param(make_csr("-reader1")[1], "not a device id", id="dash-first"),
        pytest.param(make_csr(None)[1], "0 CNs", id="no-cn"),
        pytest.param(
            make_csr(DEVICE, extra=[x509.NameAttribute(NameOID.COMMON_NAME, "other-1")])[1],
            "2 CNs",
            id="two-cns",
        ),
        pytest.param(
            make_csr(DEVICE, rsa.generate_private_key(65537, 2048))[1], "only ECDSA P-256", id="rsa"
        ),
        pytest.param(
            make_csr(DEVICE, ec.generate_private_key(ec.SECP384R1()))[1],
            "secp384r1",
            id="p384",
        ),
        pytest.param(b"not a csr", "not a PEM", id="garbage"),
        pytest.param(make_csr("backoffice")[1], "reserved", id="backoffice"),
    ],
)
def test_refused_csrs_issue_nothing(fleet: Path, csr: bytes, message: str) -> None:
    with pytest.raises(CsrError, match=message):
        ca.sign_csr(fleet, csr)
    assert ca.list_issued(fleet) == []


def test_a_csr_whose_signature_does_not_verify_is_refused(fleet: Path) -> None:
    _, good = make_csr(DEVICE)
    der = x509.load_pem_x509_csr(good).public_bytes(serialization.Encoding.DER)
    # flip a bit in the signature (the DER ends with it)
    bad = der[:-3] + bytes([der[-3] ^ 0x01]) + der[-2:]
    pem = x509.load_der_x509_csr(bad).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(CsrError, match="signature does not verify"):
        ca.sign_csr(fleet, pem)
    # another key's signature over the same subject: the CSR's own key must have signed it
    with pytest.raises(CsrError, match="expected device"):
        ca.sign_csr(fleet, good, expect_cn="10000000abcdef02")
    assert ca.list_issued(fleet) == []


def test_revoked_serial_is_in_the_crl(fleet: Path) -> None:
    first = x509.load_pem_x509_certificate(ca.sign_csr(fleet, make_csr()[1]))
    second = x509.load_pem_x509_certificate(ca.sign_csr(fleet, make_csr("reader-b")[1]))
    (done,) = ca.revoke(fleet, serial=f"{first.serial_number:x}")
    assert (done.serial, done.cn, done.revoked) == (first.serial_number, DEVICE, True)
    crl = x509.load_pem_x509_crl(ca.make_crl(fleet, days=7))
    issuing = load(fleet / "issuing.crt")
    assert crl.issuer == issuing.subject
    assert crl.is_signature_valid(issuing.public_key())  # type: ignore[arg-type]
    assert aki(crl) == ski(issuing)
    entry = crl.get_revoked_certificate_by_serial_number(first.serial_number)
    assert entry is not None and entry.revocation_date_utc == done.revoked_at.replace(  # type: ignore[union-attr]
        microsecond=0
    )
    assert crl.get_revoked_certificate_by_serial_number(second.serial_number) is None
    assert crl.next_update_utc - crl.last_update_utc == datetime.timedelta(days=7, minutes=5)  # type: ignore[operator]
    number = ext(crl, x509.CRLNumber).value.crl_number
    again = x509.load_pem_x509_crl(ca.make_crl(fleet))
    assert ext(again, x509.CRLNumber).value.crl_number == number + 1
    assert (fleet / "crl.pem").read_bytes() == again.public_bytes(serialization.Encoding.PEM)
    assert [e.revoked for e in ca.list_issued(fleet)] == [True, False]
    with pytest.raises(CaError, match="no unrevoked certificate"):
        ca.revoke(fleet, serial=first.serial_number)


def test_revoke_by_device_id_takes_every_certificate_of_it(fleet: Path) -> None:
    serials = {
        x509.load_pem_x509_certificate(ca.sign_csr(fleet, make_csr()[1])).serial_number
        for _ in range(2)
    }
    ca.sign_csr(fleet, make_csr("reader-b")[1])
    assert {e.serial for e in ca.revoke(fleet, cn=DEVICE)} == serials
    crl = x509.load_pem_x509_crl(ca.make_crl(fleet))
    assert {r.serial_number for r in crl} == serials
    with pytest.raises(CaError, match="no unrevoked"):
        ca.revoke(fleet, cn=DEVICE)
    with pytest.raises(ValueError, match="not both"):
        ca.revoke(fleet, serial=1, cn=DEVICE)
    with pytest.raises(ValueError, match="not hexadecimal"):
        ca.revoke(fleet, serial="xyz")


def test_openssl_agrees_on_chain_and_revocation(fleet: Path, tmp_path: Path) -> None:
    """An independent implementation (OpenSSL, which mosquitto uses) checks the same files."""
    assert shutil.which("openssl"), "the openssl CLI is missing: apt install openssl"
    files = ca.broker_config(fleet, tmp_path / "broker", host="127.0.0.1")
    good = tmp_path / "good.crt"
    bad = tmp_path / "bad.crt"
    good.write_bytes(ca.sign_csr(fleet, make_csr()[1]))
    bad.write_bytes(ca.sign_csr(fleet, make_csr("reader-b")[1]))
    ca.revoke(fleet, cn="reader-b")
    files.crl.write_bytes(ca.make_crl(fleet))

    def verify(cert: Path, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", str(files.ca_chain), *extra, str(cert)],
            capture_output=True,
            text=True,
            check=False,
        )

    crl_check = ("-crl_check", "-CRLfile", str(files.crl), "-purpose", "sslclient")
    assert verify(good, *crl_check).returncode == 0
    refused = verify(bad, *crl_check)
    assert refused.returncode != 0
    assert "certificate revoked" in refused.stdout + refused.stderr
    # the broker's certificate file carries the issuing CA: root alone is enough to trust it
    server = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(fleet / "root.crt"),
            "-untrusted",
            str(files.server_cert),
            "-purpose",
            "sslserver",
            str(files.server_cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert server.returncode == 0, server.stdout + server.stderr
    # a reader's certificate is no server certificate
    assert verify(good, "-purpose", "sslserver").returncode != 0


def test_sign_server_names_the_hosts(fleet: Path) -> None:
    cert_pem, key_pem_ = ca.sign_server(fleet, ["mqtt.example.org", "192.0.2.7"])
    leaf, issuing = x509.load_pem_x509_certificates(cert_pem)
    assert issuing == load(fleet / "issuing.crt")
    key = serialization.load_pem_private_key(key_pem_, None)
    assert key.public_key() == leaf.public_key()
    assert list(ext(leaf, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["mqtt.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("192.0.2.7")]
    store = verification.Store([load(fleet / "root.crt")])
    for subject in (
        x509.DNSName("mqtt.example.org"),
        x509.IPAddress(ipaddress.ip_address("192.0.2.7")),
    ):
        verifier = verification.PolicyBuilder().store(store).build_server_verifier(subject)
        assert verifier.verify(leaf, [issuing])[-1] == load(fleet / "root.crt")
    (entry,) = ca.list_issued(fleet)
    assert (entry.kind, entry.cn) == ("server", "mqtt.example.org")
    for hosts in ([], ["bad host"], ["-x.example"]):
        with pytest.raises(ValueError, match=r"host|IP"):
            ca.sign_server(fleet, hosts)


def test_broker_config_writes_the_mosquitto_files(fleet: Path, tmp_path: Path) -> None:
    out = tmp_path / "broker"
    files = ca.broker_config(fleet, out, host="mqtt.example.org", port=8884)
    assert sorted(p.name for p in out.iterdir()) == [
        "acl",
        "ca-chain.crt",
        "crl.pem",
        "mosquitto.conf",
        "server.crt",
        "server.key",
    ]
    assert stat.S_IMODE(files.server_key.stat().st_mode) == 0o600
    assert x509.load_pem_x509_certificates(files.ca_chain.read_bytes()) == [
        load(fleet / "issuing.crt"),
        load(fleet / "root.crt"),
    ]
    conf = files.conf.read_text()
    lines = [line for line in conf.splitlines() if line and not line.startswith("#")]
    d = out.resolve()
    assert lines == [
        "listener 8884",
        "tls_version tlsv1.2",
        f"cafile {d}/ca-chain.crt",
        f"certfile {d}/server.crt",
        f"keyfile {d}/server.key",
        f"crlfile {d}/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        f"acl_file {d}/acl",
    ]
    acl = [line for line in files.acl.read_text().splitlines() if line and not line.startswith("#")]
    assert acl == [
        "pattern readwrite qrgate/v1/+/%u/#",
        "pattern read qrgate/v1/+/_site/#",
        "user backoffice",
        "topic readwrite qrgate/#",
    ]
    assert files.crl.read_bytes() == (fleet / "crl.pem").read_bytes()
    # the back office's name is reserved: no reader can get its ACL entry
    with pytest.raises(CsrError, match="reserved"):
        ca.sign_csr(fleet, make_csr("backoffice")[1])
    other = ca.broker_config(
        fleet,
        tmp_path / "b2",
        host="10.0.0.2",
        site_wildcard=False,
        site="lab",
        install_dir="/etc/mosquitto/qrgate",
        bind_address="10.0.0.2",
        backoffice_cn="office-1",
    )
    text = other.conf.read_text()
    assert "listener 8883 10.0.0.2\n" in text
    assert "acl_file /etc/mosquitto/qrgate/acl\n" in text
    acl_text = other.acl.read_text()
    assert "pattern readwrite qrgate/v1/lab/%u/#\n" in acl_text
    assert "pattern read qrgate/v1/lab/_site/#\n" in acl_text
    assert "user office-1\n" in acl_text
    with pytest.raises(CsrError, match="reserved"):
        ca.sign_csr(fleet, make_csr("office-1")[1])


def test_a_service_name_held_by_a_reader_is_refused(fleet: Path, tmp_path: Path) -> None:
    ca.sign_csr(fleet, make_csr("office-2")[1])
    with pytest.raises(CaError, match="unrevoked device certificate"):
        ca.sign_service(fleet, "office-2")
    with pytest.raises(CaError, match="unrevoked device certificate"):
        ca.broker_config(fleet, tmp_path / "b", host="h.example", backoffice_cn="office-2")
    ca.revoke(fleet, cn="office-2")
    cert, _ = ca.sign_service(fleet, "office-2")
    assert x509.load_pem_x509_certificate(cert).subject.rfc4514_string() == "CN=office-2"


def test_damaged_or_missing_ca_folder(fleet: Path, tmp_path: Path) -> None:
    with pytest.raises(CaError, match="qrgate ca init"):
        ca.sign_csr(tmp_path / "nothing", make_csr()[1])
    (fleet / "issued.json").write_text('{"format": 1, "certs": [{"serial": "zz"}]}')
    with pytest.raises(CaError, match="damaged issued list"):
        ca.sign_csr(fleet, make_csr()[1])
    assert issubclass(CaError, ProvisioningError)


# --- the command line ------------------------------------------------------------------------


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(ca_cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def test_cli_round_trip(tmp_path: Path) -> None:
    d = str(tmp_path / "ca")
    assert run("init", "--dir", d, "--name", "lab")[0] == 0
    code, _, err = run("init", "--dir", d, "--name", "lab")
    assert code == 1 and "already there" in err
    csr = tmp_path / "r.csr"
    csr.write_bytes(make_csr()[1])
    code, out, _ = run("sign", "--dir", d, str(csr), "--days", "30")
    assert code == 0
    cert = x509.load_pem_x509_certificate(out.encode())
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == datetime.timedelta(
        days=30, hours=1
    )
    assert run("sign", "--dir", d, str(csr), "--out", str(tmp_path / "r.crt"))[0] == 0
    assert load(tmp_path / "r.crt").subject == cert.subject
    bad = tmp_path / "bad.csr"
    bad.write_bytes(make_csr("Bad Name")[1])
    code, _, err = run("sign", "--dir", d, str(bad))
    assert code == 2 and "not a device id" in err
    code, _, err = run("sign", "--dir", d, str(tmp_path / "missing.csr"))
    assert code == 2
    code, out, _ = run("list", "--dir", d)
    assert code == 0 and out.count(DEVICE) == 2 and "REVOKED" not in out
    (tmp_path / "c.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    code, out, _ = run("revoke", "--dir", d, "--cert", str(tmp_path / "c.crt"))
    assert code == 0 and out == f"revoked {cert.serial_number:x} {DEVICE}\n"
    code, _, err = run("revoke", "--dir", d, "--serial", f"{cert.serial_number:x}")
    assert code == 1 and "no unrevoked certificate" in err
    crl = x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    code, out, _ = run("list", "--dir", d)
    assert out.count("REVOKED") == 1
    assert run("revoke", "--dir", d, "--device", DEVICE)[0] == 0
    assert len(list(x509.load_pem_x509_crl((tmp_path / "ca" / "crl.pem").read_bytes()))) == 2
    code, _, err = run("revoke", "--dir", d, "--device", DEVICE)
    assert code == 1 and "no unrevoked" in err
    assert run("revoke", "--dir", d, "--serial", "nothex")[0] == 2
    assert run("revoke", "--dir", d)[0] == 2
    assert run("revoke", "--dir", d, "--cert", str(csr))[0] == 2
    assert run("revoke", "--dir", d, "--device", "No Such")[0] == 2
    assert run("crl", "--dir", d, "--out", str(tmp_path / "copy.pem"))[0] == 0
    assert (tmp_path / "copy.pem").read_bytes() == (tmp_path / "ca" / "crl.pem").read_bytes()
    out_dir = tmp_path / "broker"
    code, _, _ = run(
        "broker-config",
        "--dir",
        d,
        "--host",
        "mqtt.example.org",
        "--host",
        "127.0.0.1",
        "--out",
        str(out_dir),
    )
    assert code == 0 and (out_dir / "mosquitto.conf").is_file()
    code, _, err = run("broker-config", "--dir", d, "--host", "bad host", "--out", str(out_dir))
    assert code == 2
    code, _, _ = run("service", "--dir", d, "--out", str(tmp_path / "bo"))
    assert code == 0
    assert stat.S_IMODE((tmp_path / "bo" / "backoffice.key").stat().st_mode) == 0o600
    assert run("list", "--dir", str(tmp_path / "none"))[0] == 1
