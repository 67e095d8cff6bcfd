"""The fleet CA: a root and an issuing CA on the administrator's machine, device and broker
certificates, revocation, and the mosquitto configuration that enforces them.

Folder layout (``folder``, mode 0700)::

    root.key, root.crt        root CA (ECDSA P-256, path length 1). Only needed to make a new
                              issuing CA: keep root.key offline once init is done.
    issuing.key, issuing.crt  issuing CA (path length 0): signs device, service and broker
                              certificates and the CRL.
    issued.json               every certificate issued: serial, CN, kind, not_after, revoked.
    crl.pem                   the issuing CA's CRL (RFC 5280 section 5), from :func:`make_crl`.
    .lock                     flock(2) taken by every call that changes the folder.

Device certificates name the device id as CN (the MQTT username through mosquitto's
``use_identity_as_username``), carry EKU clientAuth and are valid two years by default.
mosquitto checks client certificates against ``cafile`` (issuing + root) and ``crlfile``
(the issuing CA's CRL: OpenSSL's X509_V_FLAG_CRL_CHECK looks at the leaf's issuer only).

The certificate and ACL logic are pure functions (``build_*``, :func:`check_csr`,
:func:`acl_text`, :func:`mosquitto_conf_text`); the functions taking ``folder`` are the thin
file layer. This module has its own small atomic writer (provisioning imports nothing from
firmware). Errors: :class:`~provisioning.exceptions.CaError` (the folder's state refuses the
call; nothing changed), :class:`~provisioning.exceptions.CsrError` (a CSR is refused),
ValueError (a bad argument).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import ipaddress
import json
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.exceptions import CaError, CsrError
from provisioning.files import write_atomic
from provisioning.identity import is_device_id

__all__ = [
    "CA_FILES",
    "DEFAULT_BACKOFFICE_CN",
    "DEFAULT_ENROLL_PORT",
    "DEFAULT_ENROLL_USER",
    "BrokerFiles",
    "Issued",
    "acl_text",
    "broker_config",
    "build_ca_cert",
    "build_crl",
    "build_leaf",
    "check_csr",
    "init_ca",
    "is_device_id",
    "list_issued",
    "make_crl",
    "mosquitto_conf_text",
    "revoke",
    "sign_csr",
    "sign_server",
    "sign_service",
]

ROOT_KEY, ROOT_CRT = "root.key", "root.crt"
ISSUING_KEY, ISSUING_CRT = "issuing.key", "issuing.crt"
ISSUED_JSON, CRL_PEM, LOCK = "issued.json", "crl.pem", ".lock"
CA_FILES = (ROOT_KEY, ROOT_CRT, ISSUING_KEY, ISSUING_CRT, ISSUED_JSON)
"""Files :func:`init_ca` writes; it refuses a folder holding any of them."""

DEFAULT_BACKOFFICE_CN = "backoffice"
DEFAULT_ENROLL_USER = "enroll"
DEFAULT_ENROLL_PORT = 8884
ENROLL_LEVEL = "_enroll"
MOSQUITTO_PASSWD = "mosquitto_passwd"
TOPIC_PREFIX = "qrgate/v1"  # firmware.uplink.topics.PREFIX (provisioning imports no firmware)
SITE_LEVEL = "_site"
MAX_CSR_BYTES = 16_384
MAX_NAME_CHARS = 64  # RFC 5280 ub-common-name
_BACKDATE = datetime.timedelta(hours=1)  # readers without an RTC may lag the CA's clock
_FORMAT = 1

# A site name as the single-site ACL writes it: one topic level, nothing mosquitto expands.
_SITE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._-]{0,63}", re.ASCII)
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(\.{_LABEL})*", re.ASCII)

Kind = Literal["device", "service", "server"]
_KINDS = ("device", "service", "server")


# --- pure: certificates ---------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    # A CA signs certificates and CRLs only; an ECDSA TLS leaf signs the handshake only.
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def build_ca_cert(
    key: ec.EllipticCurvePrivateKey,
    cn: str,
    *,
    path_length: int,
    days: int,
    now: datetime.datetime,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A CA certificate for ``key``: CN ``cn``, basicConstraints CA with ``path_length``
    (critical), keyUsage keyCertSign + cRLSign (critical), SKI and AKI (RFC 5280 4.2.1).

    Self-signed (a root) when ``issuer`` is None, else signed by ``issuer`` = (certificate,
    key); valid from an hour before ``now`` (aware UTC) for ``days`` days, never past the
    issuer's own end. ECDSA with SHA-256."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    public = key.public_key()
    if issuer is None:
        issuer_name, signer = _name(cn), key
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(public)
        end = now + datetime.timedelta(days=days)
    else:
        issuer_name, signer = issuer[0].subject, issuer[1]
        aki = _aki(issuer[0])
        end = min(now + datetime.timedelta(days=days), issuer[0].not_valid_after_utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(aki, critical=False)
        .sign(signer, hashes.SHA256())
    )


def build_leaf(
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    *,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    usage: Literal["client", "server"],
    days: int,
    now: datetime.datetime,
    sans: Sequence[x509.GeneralName] = (),
) -> x509.Certificate:
    """An end-entity certificate for ``public_key``, signed by ``issuer`` = (CA certificate,
    key): subject CN ``cn`` only, a random 159-bit serial, basicConstraints CA false and
    keyUsage digitalSignature (both critical), EKU clientAuth or serverAuth (RFC 5280
    4.2.1.12), SKI, AKI, and a SubjectAltName when ``sans`` are given.

    Valid from an hour before ``now`` for ``days`` days, cut at the issuer's end."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    issuer_cert, issuer_key = issuer
    eku = ExtendedKeyUsageOID.CLIENT_AUTH if usage == "client" else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + datetime.timedelta(days=days), issuer_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer_cert), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(list(sans)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def check_csr(
    csr_pem: bytes | str, *, expect_cn: str | None = None
) -> tuple[x509.CertificateSigningRequest, str]:
    """The parsed CSR (PKCS#10, RFC 2986, PEM) and the device id it names, if it may be
    signed: its self-signature verifies, its subject has exactly one CN and that CN is a
    device id (equal to ``expect_cn`` when given), and its key is ECDSA P-256.

    Nothing else in the CSR is used: other subject attributes and requested extensions are
    ignored (the certificate's are set here). Raises CsrError saying what is wrong."""
    data = csr_pem.encode("ascii", "replace") if isinstance(csr_pem, str) else csr_pem
    if len(data) > MAX_CSR_BYTES:
        raise CsrError(f"the CSR is larger than {MAX_CSR_BYTES} bytes; make a new one")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError:
        raise CsrError("not a PEM certificate signing request; make a new one") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, InvalidSignature, x509.UnsupportedGeneralNameType):
        valid = False
    if not valid:
        raise CsrError("the CSR's signature does not verify; make a new one on the reader")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CsrError(
            f"the CSR's key is {type(key).__name__.removesuffix('PublicKey') or 'unknown'}"
            f"{'/' + key.curve.name if isinstance(key, ec.EllipticCurvePublicKey) else ''}; "
            "only ECDSA P-256 keys are signed: make a new key on the reader"
        )
    cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise CsrError(f"the CSR's subject has {len(cns)} CNs; it must name one device id")
    cn = cns[0].value
    if not isinstance(cn, str) or not is_device_id(cn):
        raise CsrError(
            f"the CSR's CN {cn!r:.80} is not a device id (4-64 of 0-9a-z_-, a letter or "
            "digit first)"
        )
    if expect_cn is not None and cn != expect_cn:
        raise CsrError(f"the CSR names {cn!r}, not the expected device {expect_cn!r}")
    return csr, cn


def build_crl(
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    revoked: Iterable[tuple[int, datetime.datetime]],
    *,
    number: int,
    now: datetime.datetime,
    days: int,
) -> x509.CertificateRevocationList:
    """The CRL of ``issuer`` (RFC 5280 section 5) listing ``revoked`` = (serial, when):
    thisUpdate a few minutes before ``now``, nextUpdate ``days`` later, CRL number
    ``number`` and the issuer's AKI. An expired CRL makes mosquitto refuse every client:
    make a new one well before nextUpdate."""
    if days < 1:
        raise ValueError(f"days must be at least 1, not {days}")
    cert, key = issuer
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(now - datetime.timedelta(minutes=5))
        .next_update(now + datetime.timedelta(days=days))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(cert), critical=False)
    )
    for serial, when in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
        )
    return builder.sign(key, hashes.SHA256())


def _sans(hosts: Sequence[str]) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            continue
        except ValueError:
            pass
        if not _HOSTNAME.fullmatch(h):
            raise ValueError(f"{h!r:.80} is neither an IP address nor a DNS name")
        sans.append(x509.DNSName(h.lower()))
    return sans


# --- pure: broker configuration --------------------------------------------------------------


def acl_text(
    *,
    backoffice_cn: str = DEFAULT_BACKOFFICE_CN,
    site_wildcard: bool = True,
    site: str | None = None,
    enroll_user: str | None = None,
) -> str:
    """mosquitto ``acl_file`` text: each reader (username = its certificate's CN) may read and
    write ``qrgate/v1/<site>/<its id>/#`` and read ``qrgate/v1/<site>/_site/#``; the user
    ``backoffice_cn`` may read and write ``qrgate/#``; nothing else (no ``$SYS``).

    ``enroll_user`` (the enrollment listener's password user, see :func:`broker_config`):
    may only write ``qrgate/v1/_enroll/+/csr`` and read ``qrgate/v1/_enroll/+/cert``, and is
    denied what the reader patterns would otherwise grant it (``deny`` lines: mosquitto 2
    checks denials first).

    ``site_wildcard``: any site (``+``); when False, only ``site``. Raises ValueError."""
    if not is_device_id(backoffice_cn):
        raise ValueError(f"back office CN {backoffice_cn!r:.80}: use 4-64 of 0-9a-z_-")
    if enroll_user is not None and (not is_device_id(enroll_user) or enroll_user == backoffice_cn):
        raise ValueError(f"enroll user {enroll_user!r:.80}: 4-64 of 0-9a-z_-, not the back office")
    if site_wildcard:
        level = "+"
    elif site is None or not _SITE.fullmatch(site) or site == SITE_LEVEL:
        raise ValueError(f"site {site!r:.80}: one topic level of A-Za-z0-9._- is needed")
    else:
        level = site
    site_note = (
        '"+": a reader may write under\n'
        "# any site name, but only to topics carrying its own id, so it can never read or write\n"
        "# another reader's topics. The back office must take a reader's site from its own\n"
        "# records, not from the topic (a reader may claim any site).\n"
        "# Enrollment topics qrgate/v1/_enroll/<id>/... match too: again only the reader's own."
        if site_wildcard
        else f"{level} only."
    )
    site_read = ". A reader can read every site's." if site_wildcard else "."
    return f"""\
# qrgate broker ACL (mosquitto acl_file), written by `qrgate ca broker-config`.
# Usernames are certificate CNs (use_identity_as_username): a reader's is its device id, which
# the CA only signs as 4-64 of 0-9a-z_- (no '/', '+', '#'), so %u is always one topic level.
# Whatever is not granted here is denied, $SYS included: no reader sees other clients.
#
# Every reader: its own topics only. Site level {site_note}
pattern readwrite {TOPIC_PREFIX}/{level}/%u/#
# Site-wide settings (retained), read-only{site_read}
# (mosquitto warns that this pattern has no %u or %c: it is meant for every client.)
pattern read {TOPIC_PREFIX}/{level}/{SITE_LEVEL}/#

# The back office (CA-reserved CN: never signed for a reader): everything under qrgate/.
user {backoffice_cn}
topic readwrite qrgate/#
""" + (_enroll_acl(enroll_user, level) if enroll_user is not None else "")


def _enroll_acl(user: str, level: str) -> str:
    return f"""
# The enrollment user (password login on the enrollment listener only; CA-reserved CN): a
# new reader sends its CSR and enrollment token and reads its certificate, nothing else.
# Patterns above apply to every user: deny it what they would grant (the site-wide settings
# and "reader topics" under its own name).
user {user}
topic write {TOPIC_PREFIX}/{ENROLL_LEVEL}/+/csr
topic read {TOPIC_PREFIX}/{ENROLL_LEVEL}/+/cert
topic deny {TOPIC_PREFIX}/{level}/{SITE_LEVEL}/#
topic deny {TOPIC_PREFIX}/{level}/{user}/#
"""


def _conf_value(path: str) -> str:
    # mosquitto reads one option per line and trims the value
    if "\n" in path or "\r" in path or path != path.strip() or not path:
        raise ValueError(f"path {path!r:.80} cannot be written into a mosquitto config")
    return path


def mosquitto_conf_text(
    *,
    files_dir: str,
    port: int = 8883,
    bind_address: str | None = None,
    ca_name: str = "",
    enroll_port: int | None = None,
) -> str:
    """A mosquitto 2 config snippet: one TLS listener on ``port`` (all addresses, or
    ``bind_address``) requiring client certificates signed by the fleet CA and not in its CRL,
    the CN as username, no anonymous clients, and the ACL file; the files are named in
    ``files_dir`` (where they will be on the broker host).

    ``enroll_port``: also an enrollment listener there: TLS with the same server certificate,
    no client certificate, password login (``password_file`` ``enroll.passwd``, which holds
    the enrollment user only). With per_listener_settings false the password file is global,
    but the certificate listener takes the username from the certificate and never asks it.
    Raises ValueError."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not a TCP port")
    if enroll_port is not None and (not 0 < enroll_port < 65536 or enroll_port == port):
        raise ValueError(f"enroll port {enroll_port}: a TCP port other than {port}")
    d = _conf_value(files_dir.rstrip("/") or "/")
    listen = f"listener {port}" + (f" {_conf_value(bind_address)}" if bind_address else "")
    ca_line = (
        f"\n# CA: {''.join(c if c.isprintable() else '?' for c in ca_name)}" if ca_name else ""
    )
    return f"""\
# qrgate fleet listener, written by `qrgate ca broker-config`.{ca_line}
# Put it where mosquitto includes it (Debian: /etc/mosquitto/conf.d/qrgate.conf), with the
# files in {d}. mosquitto 2 opens the key after dropping to
# user mosquitto: chown mosquitto {d}/server.key
# After a new CRL or ACL: systemctl reload mosquitto (SIGHUP).
# allow_anonymous and acl_file are global settings (per_listener_settings false): they also
# apply to any other listener of this broker.
{listen}
tls_version tlsv1.2
cafile {d}/ca-chain.crt
certfile {d}/server.crt
keyfile {d}/server.key
# The issuing CA's CRL; renew it before its nextUpdate (`qrgate ca crl`), or OpenSSL
# refuses every client certificate.
crlfile {d}/crl.pem
require_certificate true
use_identity_as_username true
allow_anonymous false
acl_file {d}/acl
""" + (_enroll_conf(d, enroll_port, bind_address) if enroll_port is not None else "")


def _enroll_conf(d: str, port: int, bind_address: str | None) -> str:
    listen = f"listener {port}" + (f" {_conf_value(bind_address)}" if bind_address else "")
    return f"""
# Enrollment listener: a new reader has no certificate yet. It logs in with the enrollment
# user's password (same for every reader: it only lets a reader post a CSR with a one-time
# token and read the answer, see the ACL) and checks the broker with the fleet CA.
# Like server.key: chown mosquitto {d}/enroll.passwd (it is 0600).
{listen}
tls_version tlsv1.2
certfile {d}/server.crt
keyfile {d}/server.key
require_certificate false
password_file {d}/enroll.passwd
"""


# --- the issued list ------------------------------------------------------------------------


def _utc(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).astimezone(datetime.UTC)


def _iso(t: datetime.datetime) -> str:
    return t.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Issued:
    """One certificate the CA issued. ``serial``: its serial number. ``cn``: its subject CN
    (device id, service name or broker host). ``kind``: "device", "service" or "server".
    ``not_after``: end of validity (aware UTC). ``revoked_at``: when it was revoked, or
    None."""

    serial: int
    cn: str
    kind: Kind
    not_after: datetime.datetime
    revoked_at: datetime.datetime | None = None

    @property
    def revoked(self) -> bool:
        """True once revoked."""
        return self.revoked_at is not None

    @property
    def serial_hex(self) -> str:
        """The serial in lower-case hex, as ``qrgate ca list`` prints and ``--serial`` takes."""
        return f"{self.serial:x}"

    def to_json(self) -> dict[str, Any]:
        """The JSON object stored in issued.json."""
        return {
            "serial": self.serial_hex,
            "cn": self.cn,
            "kind": self.kind,
            "not_after": _iso(self.not_after),
            "revoked": self.revoked,
            "revoked_at": None if self.revoked_at is None else _iso(self.revoked_at),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Issued:
        """Parse one issued.json entry; raises ValueError, KeyError or TypeError."""
        kind = obj["kind"]
        if kind not in _KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        revoked_at = obj.get("revoked_at")
        return cls(
            serial=int(obj["serial"], 16),
            cn=str(obj["cn"]),
            kind=kind,
            not_after=_utc(obj["not_after"]),
            revoked_at=None if revoked_at is None else _utc(revoked_at),
        )


@dataclass(frozen=True, slots=True)
class _Ledger:
    certs: tuple[Issued, ...]
    reserved: frozenset[str]
    crl_number: int

    def to_bytes(self) -> bytes:
        doc = {
            "format": _FORMAT,
            "crl_number": self.crl_number,
            # CNs only services may have: a reader enrolling as "backoffice" would get its ACL
            "reserved": sorted(self.reserved),
            "certs": [c.to_json() for c in self.certs],
        }
        return (json.dumps(doc, indent=1) + "\n").encode()


def _parse_ledger(path: Path, data: bytes) -> _Ledger:
    try:
        doc = json.loads(data)
        if doc.get("format") != _FORMAT:
            raise ValueError(f"format {doc.get('format')!r}, expected {_FORMAT}")
        return _Ledger(
            certs=tuple(Issued.from_json(c) for c in doc["certs"]),
            reserved=frozenset(str(r) for r in doc["reserved"]),
            crl_number=int(doc["crl_number"]),
        )
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CaError(
            f"{path}: damaged issued list ({e}); restore it from a backup before issuing more"
        ) from None


# --- file layer ------------------------------------------------------------------------------


def _write(path: Path, data: bytes, mode: int, *, overwrite: bool = True) -> None:
    """provisioning.files.write_atomic, its refusals as CaError."""
    try:
        write_atomic(path, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise CaError(f"{path}: already exists; not overwriting it") from None
    except OSError as e:
        raise CaError(f"{path}: cannot write: {e.strerror or e}") from None


def _read(path: Path, cap: int = 4_000_000) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(cap + 1)
    except FileNotFoundError:
        raise CaError(
            f"{path}: missing; is {path.parent} a fleet CA folder (qrgate ca init)?"
        ) from None
    except OSError as e:
        raise CaError(f"{path}: cannot read: {e.strerror or e}") from None
    if len(data) > cap:
        raise CaError(f"{path}: larger than {cap} bytes; not a CA file")
    return data


@contextlib.contextmanager
def _locked(folder: Path, *, new: bool = False) -> Iterator[None]:
    # `qrgate enroll serve` signs while an administrator may revoke: one writer at a time.
    if not new and not (folder / ISSUED_JSON).is_file():
        raise CaError(f"{folder} is not a fleet CA folder (no {ISSUED_JSON}); see qrgate ca init")
    try:
        fd = os.open(folder / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise CaError(f"{folder}: cannot lock the CA folder: {e.strerror or e}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(_read(path))
    except ValueError:
        raise CaError(f"{path}: not a PEM certificate; restore it from a backup") from None


def _load_issuing(folder: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = _load_cert(folder / ISSUING_CRT)
    path = folder / ISSUING_KEY
    try:
        key = serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError):
        raise CaError(f"{path}: not an unencrypted PEM private key; restore it") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise CaError(f"{path} does not belong to {folder / ISSUING_CRT}; restore both")
    return cert, key


def _load_ledger(folder: Path) -> _Ledger:
    path = folder / ISSUED_JSON
    return _parse_ledger(path, _read(path))


def _save_ledger(folder: Path, ledger: _Ledger) -> None:
    _write(folder / ISSUED_JSON, ledger.to_bytes(), 0o600)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def init_ca(
    folder: Path | str, *, name: str, days_root: int = 3650 * 2, days_issuing: int = 3650
) -> tuple[bytes, bytes]:
    """Make a fleet CA in ``folder`` (created 0700): root CA "``name`` root CA" (path length
    1, ``days_root`` days), issuing CA "``name`` issuing CA" signed by it (path length 0,
    ``days_issuing`` days), both ECDSA P-256, the keys 0600; an empty issued list and CRL.

    Returns (root certificate PEM, issuing certificate PEM). Raises ValueError (a bad name
    or days) and CaError (the folder already holds a CA or cannot be written: a CA is never
    overwritten; files written before a failure are removed)."""
    if not name or len(name) > MAX_NAME_CHARS - len(" issuing CA") or not name.isprintable():
        raise ValueError(f"CA name {name!r:.80}: 1-{MAX_NAME_CHARS - 11} printable characters")
    folder = Path(folder)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise CaError(f"{folder}: cannot create the folder: {e.strerror or e}") from None
    with _locked(folder, new=True):
        for f in CA_FILES:
            if os.path.lexists(folder / f):
                raise CaError(f"{folder / f}: a CA is already there; not overwriting it")
        now = _now()
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = build_ca_cert(root_key, f"{name} root CA", path_length=1, days=days_root, now=now)
        issuing_key = ec.generate_private_key(ec.SECP256R1())
        issuing = build_ca_cert(
            issuing_key,
            f"{name} issuing CA",
            path_length=0,
            days=days_issuing,
            now=now,
            issuer=(root, root_key),
        )
        crl = build_crl((issuing, issuing_key), [], number=1, now=now, days=30)
        written: list[Path] = []
        try:
            for fname, data, mode in (
                (ROOT_KEY, _key_pem(root_key), 0o600),
                (ROOT_CRT, _cert_pem(root), 0o644),
                (ISSUING_KEY, _key_pem(issuing_key), 0o600),
                (ISSUING_CRT, _cert_pem(issuing), 0o644),
                (ISSUED_JSON, _Ledger((), frozenset({DEFAULT_BACKOFFICE_CN}), 1).to_bytes(), 0o600),
                (CRL_PEM, crl.public_bytes(serialization.Encoding.PEM), 0o644),
            ):
                _write(folder / fname, data, mode, overwrite=fname == CRL_PEM)
                written.append(folder / fname)
        except BaseException:
            # half a CA is worse than none: the next init would refuse the folder
            for p in written:
                p.unlink(missing_ok=True)
            raise
    return _cert_pem(root), _cert_pem(issuing)


def _issue(
    folder: Path,
    public_key: ec.EllipticCurvePublicKey,
    cn: str,
    kind: Kind,
    *,
    days: int,
    sans: Sequence[x509.GeneralName] = (),
    reserve: bool = False,
) -> x509.Certificate:
    # caller holds the lock
    issuer = _load_issuing(folder)
    ledger = _load_ledger(folder)
    if kind == "device" and cn in ledger.reserved:
        raise CsrError(f"{cn!r} is reserved for a service (the back office); not a device id")
    if reserve and any(c.cn == cn and c.kind == "device" and not c.revoked for c in ledger.certs):
        raise CaError(f"{cn!r} has an unrevoked device certificate; revoke it first")
    cert = build_leaf(
        public_key,
        cn,
        issuer=issuer,
        usage="server" if kind == "server" else "client",
        days=days,
        now=_now(),
        sans=sans,
    )
    entry = Issued(cert.serial_number, cn, kind, cert.not_valid_after_utc)
    _save_ledger(
        folder,
        replace(
            ledger,
            certs=(*ledger.certs, entry),
            reserved=ledger.reserved | {cn} if reserve else ledger.reserved,
        ),
    )
    return cert


def sign_csr(
    folder: Path | str, csr_pem: bytes | str, *, days: int = 730, expect_cn: str | None = None
) -> bytes:
    """Issue a device certificate for the CSR ``csr_pem`` (see :func:`check_csr`): CN = the
    device id, EKU clientAuth, ``days`` days (cut at the issuing CA's end), recorded in
    issued.json. Returns the certificate PEM (leaf only; the broker holds the chain).

    Raises CsrError (the CSR is refused, or names a reserved CN), CaError (folder problem),
    ValueError (days)."""
    folder = Path(folder)
    csr, cn = check_csr(csr_pem, expect_cn=expect_cn)
    key = csr.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)  # check_csr made sure
    with _locked(folder):
        cert = _issue(folder, key, cn, "device", days=days)
    return _cert_pem(cert)


def sign_service(
    folder: Path | str, cn: str = DEFAULT_BACKOFFICE_CN, *, days: int = 730
) -> tuple[bytes, bytes]:
    """A client certificate and new P-256 key for a service such as the back office (CN
    ``cn``, EKU clientAuth); ``cn`` becomes reserved, so no reader can ever be signed under
    it. Returns (certificate PEM, key PEM): store the key 0600. Raises ValueError (a bad
    name), CaError (a reader holds an unrevoked certificate with that CN, or folder
    problems)."""
    if not is_device_id(cn):
        raise ValueError(f"service name {cn!r:.80}: use 4-64 of 0-9a-z_-, a letter or digit first")
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    with _locked(folder):
        cert = _issue(folder, key.public_key(), cn, "service", days=days, reserve=True)
    return _cert_pem(cert), _key_pem(key)


def sign_server(
    folder: Path | str, hosts: Sequence[str] | str, *, days: int = 730
) -> tuple[bytes, bytes]:
    """A broker certificate and new P-256 key: CN the first host, SubjectAltName a DNS name
    or IP address per host (clients check these, RFC 6125), EKU serverAuth. Returns
    (certificate PEM followed by the issuing CA's, so clients trusting only the root can
    build the chain; key PEM). Raises ValueError (no or bad hosts), CaError."""
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    if not hosts:
        raise ValueError("give at least one host name or IP address for the broker")
    sans = _sans(hosts)
    folder = Path(folder)
    key = ec.generate_private_key(ec.SECP256R1())
    with _locked(folder):
        cert = _issue(
            folder, key.public_key(), hosts[0][:MAX_NAME_CHARS], "server", days=days, sans=sans
        )
        issuing = _load_cert(folder / ISSUING_CRT)
    return _cert_pem(cert, issuing), _key_pem(key)


def list_issued(folder: Path | str) -> list[Issued]:
    """Every certificate issued so far, oldest first. Raises CaError."""
    return list(_load_ledger(Path(folder)).certs)


def revoke(
    folder: Path | str, *, serial: int | str | None = None, cn: str | None = None
) -> list[Issued]:
    """Mark as revoked the certificate with ``serial`` (int or hex), or every unrevoked
    certificate whose CN is ``cn``; give exactly one. The CRL changes only with
    :func:`make_crl`. Returns the entries revoked now. Raises ValueError (both or neither
    given, bad hex) and CaError (nothing unrevoked matches; folder problems)."""
    if (serial is None) == (cn is None):
        raise ValueError("give a serial or a CN to revoke, not both")
    if isinstance(serial, str):
        try:
            serial = int(serial.removeprefix("0x").replace(":", ""), 16)
        except ValueError:
            raise ValueError(f"serial {serial!r:.80} is not hexadecimal") from None
    folder = Path(folder)
    now = _now()
    with _locked(folder):
        ledger = _load_ledger(folder)
        done: list[Issued] = []
        certs: list[Issued] = []
        for c in ledger.certs:
            if not c.revoked and (c.serial == serial if serial is not None else c.cn == cn):
                done.append(replace(c, revoked_at=now))
                certs.append(done[-1])
            else:
                certs.append(c)
        if not done:
            what = f"serial {serial:x}" if serial is not None else f"CN {cn!r}"
            raise CaError(f"no unrevoked certificate with {what} in {folder / ISSUED_JSON}")
        _save_ledger(folder, replace(ledger, certs=tuple(certs)))
    return done


def make_crl(folder: Path | str, days: int = 30) -> bytes:
    """A new CRL of the issuing CA listing every revoked certificate, valid ``days`` days,
    with the next CRL number; written to ``folder``/crl.pem and returned (PEM). Copy it to
    the broker and reload mosquitto before the old one's nextUpdate. Raises CaError,
    ValueError."""
    folder = Path(folder)
    with _locked(folder):
        issuer = _load_issuing(folder)
        ledger = _load_ledger(folder)
        number = ledger.crl_number + 1
        crl = build_crl(
            issuer,
            [(c.serial, c.revoked_at) for c in ledger.certs if c.revoked_at is not None],
            number=number,
            now=_now(),
            days=days,
        )
        pem = crl.public_bytes(serialization.Encoding.PEM)
        _save_ledger(folder, replace(ledger, crl_number=number))
        _write(folder / CRL_PEM, pem, 0o644)
    return pem


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What :func:`broker_config` wrote, all in one folder."""

    conf: Path
    ca_chain: Path
    server_cert: Path
    server_key: Path
    crl: Path
    acl: Path
    enroll_passwd: Path | None = None
    """``enroll.passwd`` (mosquitto password file, 0600), when an enrollment listener was
    written."""
    enroll_password: Path | None = None
    """``enroll.password`` (0600): the enrollment user's password in clear, to install with the
    readers' firmware; not needed on the broker."""


def broker_config(
    folder: Path | str,
    out: Path | str,
    *,
    host: str | Sequence[str],
    port: int = 8883,
    backoffice_cn: str = DEFAULT_BACKOFFICE_CN,
    site_wildcard: bool = True,
    site: str | None = None,
    bind_address: str | None = None,
    install_dir: str | None = None,
    days: int = 730,
    enroll_port: int | None = None,
    enroll_user: str = DEFAULT_ENROLL_USER,
    enroll_password: str | None = None,
) -> BrokerFiles:
    """Write a broker's files into ``out`` (created): ``mosquitto.conf`` (see
    :func:`mosquitto_conf_text`), ``ca-chain.crt`` (issuing + root: what mosquitto checks
    client certificates with, and what readers trust), ``server.crt`` + ``server.key`` (0600,
    a new broker certificate for ``host``: names and addresses clients connect to),
    ``crl.pem`` (a new CRL) and ``acl`` (see :func:`acl_text`). ``backoffice_cn`` becomes a
    reserved CN. ``install_dir``: where the files will be on the broker (default ``out``).

    ``enroll_port`` (:data:`DEFAULT_ENROLL_PORT` is the usual one; None: no enrollment
    listener): also an enrollment listener (:func:`mosquitto_conf_text`), its user
    ``enroll_user`` (reserved like the back office) in ``enroll.passwd`` made with
    ``mosquitto_passwd -b -c`` (Debian package mosquitto; CaError naming it when missing),
    and its password (``enroll_password``, or 24 random bytes in base64url) in
    ``enroll.password``. ``mosquitto_passwd -b`` puts the password on its command line for a
    moment: make the files on the administrator's machine, not a shared host.

    Existing files in ``out`` are replaced. Raises ValueError, CaError."""
    folder, out = Path(folder), Path(out)
    enroll = enroll_user if enroll_port is not None else None
    acl = acl_text(
        backoffice_cn=backoffice_cn, site_wildcard=site_wildcard, site=site, enroll_user=enroll
    )
    if enroll is not None:
        if enroll_password is None:
            enroll_password = secrets.token_urlsafe(24)
        elif not enroll_password or not enroll_password.isprintable() or ":" in enroll_password:
            raise ValueError("enroll password: printable characters, no ':'")
        passwd_tool = shutil.which(MOSQUITTO_PASSWD)
        if passwd_tool is None:
            raise CaError(
                f"{MOSQUITTO_PASSWD} not found: install the mosquitto package "
                "(apt-get install mosquitto) to write the enrollment password file"
            )
    root = _load_cert(folder / ROOT_CRT)
    issuing = _load_cert(folder / ISSUING_CRT)
    conf = mosquitto_conf_text(
        files_dir=install_dir or str(out.resolve()),
        port=port,
        bind_address=bind_address,
        ca_name=root.subject.rfc4514_string(),
        enroll_port=enroll_port,
    )
    services = {backoffice_cn} | ({enroll} if enroll is not None else set())
    with _locked(folder):
        ledger = _load_ledger(folder)
        for cn in sorted(services):
            if any(c.cn == cn and c.kind == "device" and not c.revoked for c in ledger.certs):
                raise CaError(f"{cn!r} has an unrevoked device certificate; revoke it first")
        _save_ledger(folder, replace(ledger, reserved=ledger.reserved | services))
    server_cert, server_key = sign_server(folder, host, days=days)
    crl = make_crl(folder)
    try:
        out.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise CaError(f"{out}: cannot create the folder: {e.strerror or e}") from None
    files = BrokerFiles(
        conf=out / "mosquitto.conf",
        ca_chain=out / "ca-chain.crt",
        server_cert=out / "server.crt",
        server_key=out / "server.key",
        crl=out / "crl.pem",
        acl=out / "acl",
    )
    _write(files.server_key, server_key, 0o600)
    _write(files.server_cert, server_cert, 0o644)
    _write(files.ca_chain, _cert_pem(issuing, root), 0o644)
    _write(files.crl, crl, 0o644)
    _write(files.acl, acl.encode(), 0o644)
    if enroll is not None:
        assert enroll_password is not None and passwd_tool is not None  # set above
        files = replace(
            files, enroll_passwd=out / "enroll.passwd", enroll_password=out / "enroll.password"
        )
        assert files.enroll_passwd is not None and files.enroll_password is not None
        _write_passwd(passwd_tool, files.enroll_passwd, enroll, enroll_password)
        _write(files.enroll_password, enroll_password.encode() + b"\n", 0o600)
    _write(files.conf, conf.encode(), 0o644)
    return files


def _write_passwd(tool: str, path: Path, user: str, password: str) -> None:
    """``mosquitto_passwd -b -c`` into a temp file (0600) then renamed over ``path``: mosquitto
    2 writes PBKDF2-SHA512 hashes, a format not re-implemented here."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        os.close(fd)
        done = subprocess.run(
            [tool, "-b", "-c", str(tmp), user, password],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if done.returncode != 0:
            raise CaError(f"{tool} failed: {(done.stderr or done.stdout).strip()[:200]}")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as e:
        raise CaError(f"{path}: cannot write: {e.strerror or e}") from None
    finally:
        tmp.unlink(missing_ok=True)
