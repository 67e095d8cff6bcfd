"""Issuer and holder key files: PEM on disk, private keys readable by their owner only.

A private key file is PKCS#8 PEM without a passphrase (a reader or an issuing tool must use it
unattended), mode 0600. A public key file is SubjectPublicKeyInfo PEM. Keys are Ed25519
("EdDSA") or P-256 ("ES256"): see :mod:`firmware.policy.cose`.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from firmware.exceptions import KeyFileError
from firmware.policy.cose import ALG_IDS, PrivateKey, PublicKey, alg_of
from provisioning import files
from provisioning.files import write_atomic

MAX_KEY_FILE_BYTES = 64 * 1024


def generate_key(alg: str = "EdDSA") -> PrivateKey:
    """A new private key for ``alg``: "EdDSA" (Ed25519) or "ES256" (P-256).

    Raises ValueError for another name."""
    if alg == "EdDSA":
        return Ed25519PrivateKey.generate()
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown algorithm {alg!r}: expected one of {sorted(ALG_IDS)}")


def public_key_pem(key: PrivateKey | PublicKey) -> bytes:
    """The SubjectPublicKeyInfo PEM of ``key`` (or of a private key's public half)."""
    public = (
        key.public_key() if isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey) else key
    )
    return public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_file_atomic(path: Path | str, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` whole or not at all, with ``mode`` from the start (mkstemp
    creates 0600; chmod before any byte), fsynced, the folder fsynced after the rename.

    Without ``overwrite`` the file is put in place with a hard link, which fails if the path
    exists, so two writers racing for one name cannot replace each other's key. Raises
    KeyFileError (the path exists without ``overwrite``, or an OS error)."""
    path = Path(path)
    if not overwrite and os.path.lexists(path):
        raise KeyFileError(f"{path}: already exists; not overwriting it")
    try:
        write_atomic(path, data, mode, overwrite=overwrite)
    except FileExistsError:
        raise KeyFileError(f"{path}: already exists; not overwriting it") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot write: {e.strerror or e}") from None


def save_private_key(path: Path | str, key: PrivateKey, *, overwrite: bool = False) -> None:
    """Write ``key`` as unencrypted PKCS#8 PEM, mode 0600, atomically (temp file, fsync,
    os.replace). Refuses to replace an existing file unless ``overwrite``: losing an issuer
    key invalidates every pass it signed. Raises KeyFileError; ValueError for an unsupported
    key type."""
    alg_of(key)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    write_file_atomic(path, pem, 0o600, overwrite=overwrite)


def save_public_key(
    path: Path | str, key: PrivateKey | PublicKey, *, overwrite: bool = True
) -> None:
    """Write the SubjectPublicKeyInfo PEM of ``key`` (mode 0644), atomically. Raises
    KeyFileError; ValueError for an unsupported key type."""
    alg_of(key)
    write_file_atomic(path, public_key_pem(key), 0o644, overwrite=overwrite)


def read_regular(path: Path, cap: int = MAX_KEY_FILE_BYTES) -> tuple[bytes, int]:
    """The bytes (at most ``cap``) and mode of the regular file at ``path``
    (:func:`provisioning.files.read_regular`: a FIFO cannot hang it, the mode is the mode of
    the bytes read). Raises KeyFileError."""
    try:
        return files.read_regular(path, cap)
    except files.NotRegularFileError as e:
        raise KeyFileError(f"{e}; not a key file") from None
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from None


def load_private_key(path: Path | str) -> PrivateKey:
    """Read an unencrypted PKCS#8 (or traditional) PEM private key: Ed25519 or P-256.

    Raises KeyFileError if the file is unreadable, not a regular file, readable or writable
    by group or others (must be 0600 or stricter), not a PEM private key, passphrase
    protected, or another kind of key."""
    path = Path(path)
    data, mode = read_regular(path)
    if mode & 0o077:
        raise KeyFileError(
            f"{path}: a private key must be readable by its owner only "
            f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 {path}"
        )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError(f"{path}: the key is passphrase protected; store it without") from None
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}; expected Ed25519 or P-256")
    try:
        alg_of(key)
    except ValueError as e:
        raise KeyFileError(f"{path}: {e}") from None
    return key


def load_public_key(path: Path | str) -> PublicKey:
    """Read a SubjectPublicKeyInfo PEM public key: Ed25519 or P-256.

    Raises KeyFileError if unreadable, not a PEM public key or another kind of key."""
    path = Path(path)
    data, _ = read_regular(path)
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"{path}: not a PEM public key (SubjectPublicKeyInfo)") from None
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise KeyFileError(f"{path}: a {type(key).__name__}; expected Ed25519 or P-256")
    try:
        alg_of(key)
    except ValueError as e:
        raise KeyFileError(f"{path}: {e}") from None
    return key
