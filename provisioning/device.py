"""The reader's own key and certificate, kept in ``<state_dir>/identity/``.

Files (:class:`DeviceKeys`), in a folder of mode 0700:

- ``device.key``: the device key, ECDSA P-256 (FIPS 186-4 curve secp256r1), unencrypted PKCS#8
  PEM (RFC 5208/5958), mode 0600. Made on the reader at provisioning and never exported: there
  is no function here that returns its bytes; the reader proves it holds it with a CSR and in
  TLS handshakes.
- ``device.csr``: the last certificate signing request (PKCS#10, RFC 2986), PEM: subject
  ``CN=<device id>``, signed with the device key (ECDSA with SHA-256).
- ``device.crt``: the reader's certificate (X.509, RFC 5280), PEM, once enrolled.
- ``ca.crt``: the CA certificates the reader trusts the broker with, PEM, one or more.

Every write goes to a temp file in the folder (created 0600 by ``mkstemp``, the final mode set
before any byte is written), is fsynced, and is put in place with ``os.link`` (the key: it
fails rather than overwrite one) or ``os.replace`` (the rest), then the folder is fsynced, so
a power cut leaves the old file or the new one, never half of one.

The folder holds no device id: that comes from the hardware (:mod:`provisioning.identity`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from datetime import UTC
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from provisioning.exceptions import DeviceCertificateError, DeviceKeyError
from provisioning.files import NotRegularFileError, fsync_dir, read_regular, write_atomic
from provisioning.identity import is_device_id

IDENTITY_DIR = "identity"
"""The identity folder's name inside ``reader.state_dir``."""
KEY_FILE = "device.key"
CSR_FILE = "device.csr"
CERT_FILE = "device.crt"
CHAIN_FILE = "ca.crt"

# A PEM key or certificate is a few kB; anything far bigger is not one (and must not be read
# whole into memory by a status command).
MAX_FILE_BYTES = 64 * 1024


def identity_dir(state_dir: Path) -> Path:
    """``<state_dir>/identity``: where :class:`DeviceKeys` keeps its files."""
    return Path(state_dir) / IDENTITY_DIR


def spki_fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo (RFC 5280 4.1.2.7), lowercase hex (64 chars):
    the same number for the key, its CSR and its certificate."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()


class DeviceKeys:
    """The device key, CSR, certificate and CA chain in ``folder`` (see the module docstring).

    Methods raise DeviceKeyError (key problems) and DeviceCertificateError (certificate
    problems); nothing is changed when they raise.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @property
    def key_path(self) -> Path:
        return self.folder / KEY_FILE

    @property
    def csr_path(self) -> Path:
        return self.folder / CSR_FILE

    @property
    def cert_path(self) -> Path:
        return self.folder / CERT_FILE

    @property
    def chain_path(self) -> Path:
        return self.folder / CHAIN_FILE

    def has_key(self) -> bool:
        """True when a key file (or anything else) stands at :attr:`key_path`."""
        return os.path.lexists(self.key_path)

    def create_key(self) -> str:
        """Make a new ECDSA P-256 key and write it to ``device.key`` (0600; folder 0700).

        Returns its SPKI fingerprint (:func:`spki_fingerprint`). Never replaces a key: raises
        DeviceKeyError when one exists (``qrgate factory-reset`` removes it) or the folder
        cannot be written.
        """
        self._make_folder()
        if self.has_key():
            raise DeviceKeyError(
                f"{self.key_path}: a device key already exists; not replacing it "
                "(`qrgate factory-reset` removes it before provisioning again)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_atomic(self.key_path, pem, 0o600, overwrite=False)
        except FileExistsError:
            raise DeviceKeyError(
                f"{self.key_path}: a device key appeared meanwhile; not replacing it"
            ) from None
        except OSError as e:
            raise DeviceKeyError(f"{self.key_path}: cannot write: {e.strerror or e}") from None
        return spki_fingerprint(key.public_key())

    def load_key(self) -> ec.EllipticCurvePrivateKey:
        """The device key. Raises DeviceKeyError when it is missing, not a regular file,
        readable or writable by group or others (the message says to chmod 600, or to reset
        and enroll again if others may have read it), not PEM, or not a P-256 key."""
        data, mode = _read_regular(self.key_path, DeviceKeyError)
        if mode & 0o077:
            raise DeviceKeyError(
                f"{self.key_path}: mode {stat.S_IMODE(mode):04o} lets group or others read it; "
                f"run `chmod 600 {self.key_path}` (if someone may have copied it, run "
                "`qrgate factory-reset` and enroll again: a copied key can impersonate this "
                "reader)"
            )
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as e:
            raise DeviceKeyError(
                f"{self.key_path}: not an unencrypted PEM private key ({e}); "
                "`qrgate factory-reset` and enroll again"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            raise DeviceKeyError(
                f"{self.key_path}: not an ECDSA P-256 key; `qrgate factory-reset` and enroll again"
            )
        return key

    def make_csr(self, device_id: str) -> bytes:
        """A PEM PKCS#10 request for ``CN=<device_id>`` signed with the device key (ECDSA
        with SHA-256), also written to ``device.csr`` (0644: it holds only public data).

        Raises ValueError when ``device_id`` is not shaped like one
        (:func:`provisioning.identity.is_device_id`), DeviceKeyError as :meth:`load_key` or
        when the file cannot be written.
        """
        if not is_device_id(device_id):
            raise ValueError(f"not a device id: {device_id!r}")
        key = self.load_key()
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
            .sign(key, hashes.SHA256())
        )
        pem = csr.public_bytes(serialization.Encoding.PEM)
        try:
            write_atomic(self.csr_path, pem, 0o644, overwrite=True)
        except OSError as e:
            raise DeviceKeyError(f"{self.csr_path}: cannot write: {e.strerror or e}") from None
        return pem

    def store_certificate(
        self, cert_pem: bytes, chain_pem: bytes, *, device_id: str
    ) -> x509.Certificate:
        """Check and keep the reader's certificate and the CA chain; returns the certificate.

        ``cert_pem``: one PEM certificate. ``chain_pem``: one or more PEM CA certificates.
        Refused (DeviceCertificateError, nothing written) when either does not parse, when
        the certificate's public key is not the device key's, when its subject CN is not
        ``device_id``, or when the chain holds the certificate's issuer (same subject name)
        and that issuer's signature on it does not verify. Validity dates are not checked: a
        reader being provisioned may not have the time yet. The chain is written first and
        the certificate last (each atomically, 0644), so a ``device.crt`` is only ever next
        to the chain it came with. Raises DeviceKeyError as :meth:`load_key`.
        """
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError as e:
            raise DeviceCertificateError(f"the certificate is not a PEM certificate: {e}") from None
        try:
            chain = x509.load_pem_x509_certificates(chain_pem)
        except ValueError as e:
            raise DeviceCertificateError(f"the CA chain is not PEM certificates: {e}") from None
        key = self.load_key()
        if spki_fingerprint(key.public_key()) != _cert_fingerprint(cert):
            raise DeviceCertificateError(
                "the certificate is for another key, not this reader's: not stored; enroll "
                "again with this reader's CSR"
            )
        names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = [str(n.value) for n in names]
        if cn != [device_id]:
            raise DeviceCertificateError(
                f"the certificate names CN={', '.join(cn) or '(none)'}, this reader is "
                f"{device_id}: not stored; enroll again with this reader's CSR"
            )
        for ca in chain:
            if ca.subject == cert.issuer:
                try:
                    cert.verify_directly_issued_by(ca)
                except (ValueError, TypeError, InvalidSignature) as e:
                    raise DeviceCertificateError(
                        f"the certificate does not verify against its issuer in the chain "
                        f"({ca.subject.rfc4514_string()}): {e or 'bad signature'}; not stored"
                    ) from None
                break
        pem = cert.public_bytes(serialization.Encoding.PEM)
        chain_out = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
        for path, data in ((self.chain_path, chain_out), (self.cert_path, pem)):
            try:
                write_atomic(path, data, 0o644, overwrite=True)
            except OSError as e:
                raise DeviceCertificateError(f"{path}: cannot write: {e.strerror or e}") from None
        return cert

    def load_certificate(self) -> x509.Certificate | None:
        """The stored certificate, or None when there is none. Raises DeviceCertificateError
        when the file is unreadable or not a PEM certificate."""
        if not os.path.lexists(self.cert_path):
            return None
        data, _ = _read_regular(self.cert_path, DeviceCertificateError)
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError as e:
            raise DeviceCertificateError(
                f"{self.cert_path}: not a PEM certificate ({e}); enroll again"
            ) from None

    def status(self, device_id: str | None = None) -> dict[str, Any]:
        """What the folder holds, JSON-ready; never raises for a bad file (it is reported).

        Keys: ``device_id`` (as given, or None); ``state``: ``"not enrolled"`` (no key),
        ``"key made, not enrolled"`` (key, no certificate), ``"enrolled"`` (key and a
        certificate for it) or ``"damaged"`` (a file that cannot be used, see the errors);
        ``folder``; ``key_fingerprint`` (:func:`spki_fingerprint`, or None); ``key_error``;
        ``csr`` (True when a CSR is kept); ``certificate``: None, or ``subject`` and
        ``issuer`` (RFC 4514 strings), ``serial`` (hex), ``not_before`` / ``not_after`` (ISO
        8601 UTC), ``matches_key`` and ``matches_device`` (None when unknown);
        ``certificate_error``.
        """
        out: dict[str, Any] = {
            "device_id": device_id,
            "state": "not enrolled",
            "folder": str(self.folder),
            "key_fingerprint": None,
            "key_error": None,
            "csr": os.path.lexists(self.csr_path),
            "certificate": None,
            "certificate_error": None,
        }
        fingerprint: str | None = None
        if self.has_key():
            try:
                fingerprint = spki_fingerprint(self.load_key().public_key())
            except DeviceKeyError as e:
                out["key_error"] = str(e)
            out["key_fingerprint"] = fingerprint
        try:
            cert = self.load_certificate()
        except DeviceCertificateError as e:
            cert = None
            out["certificate_error"] = str(e)
        if cert is not None:
            cn = [str(n.value) for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
            out["certificate"] = {
                "subject": cert.subject.rfc4514_string(),
                "issuer": cert.issuer.rfc4514_string(),
                "serial": format(cert.serial_number, "x"),
                "not_before": cert.not_valid_before_utc.astimezone(UTC).isoformat(),
                "not_after": cert.not_valid_after_utc.astimezone(UTC).isoformat(),
                "matches_key": (
                    _cert_fingerprint(cert) == fingerprint if fingerprint is not None else None
                ),
                "matches_device": cn == [device_id] if device_id is not None else None,
            }
        if out["key_error"] or out["certificate_error"]:
            out["state"] = "damaged"
        elif fingerprint is None:
            out["state"] = "not enrolled"
        elif cert is None:
            out["state"] = "key made, not enrolled"
        elif out["certificate"]["matches_key"]:
            out["state"] = "enrolled"
        else:
            out["state"] = "damaged"
            out["certificate_error"] = "the certificate is for another key; enroll again"
        return out

    def wipe(self) -> list[Path]:
        """Remove the key, CSR, certificate, chain and leftover temp files, then the folder
        if nothing else is in it; returns the paths removed (files first). Used by
        ``qrgate factory-reset``. The key's blocks are unlinked, not overwritten: on an SD
        card's flash translation layer overwriting in place is not possible anyway.
        Raises OSError when a file cannot be removed (the others may be gone already)."""
        removed: list[Path] = []
        if not self.folder.is_dir():
            return removed
        names = [KEY_FILE, CSR_FILE, CERT_FILE, CHAIN_FILE]
        candidates = [self.folder / n for n in names]
        candidates += sorted(
            p
            for n in names
            for p in self.folder.glob(f".{n}.*.tmp")  # left by a write cut short
        )
        for path in candidates:
            try:
                path.unlink()
            except FileNotFoundError:
                continue
            removed.append(path)
        fsync_dir(self.folder)
        with contextlib.suppress(OSError):
            # only when empty: something else put there is not ours to delete
            self.folder.rmdir()
            removed.append(self.folder)
        return removed

    def _make_folder(self) -> None:
        try:
            self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            # mkdir's mode goes through the umask, and an existing folder keeps its own
            os.chmod(self.folder, 0o700)
        except OSError as e:
            raise DeviceKeyError(f"{self.folder}: cannot create: {e.strerror or e}") from None


def _cert_fingerprint(cert: x509.Certificate) -> str | None:
    public = cert.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey):
        return None
    return spki_fingerprint(public)


def _read_regular(
    path: Path, error: type[DeviceKeyError] | type[DeviceCertificateError]
) -> tuple[bytes, int]:
    """The bytes (at most MAX_FILE_BYTES) and mode of the regular file at ``path``; a symlink
    planted in the folder is refused. Raises ``error``."""
    try:
        return read_regular(path, MAX_FILE_BYTES, follow_symlinks=False)
    except FileNotFoundError:
        raise error(f"{path}: missing (this reader is not provisioned)") from None
    except NotRegularFileError as e:
        raise error(f"{e}; not a key or certificate") from None
    except OSError as e:
        raise error(f"{path}: cannot read: {e.strerror or e}") from None
