"""The release engineer's TUF repository (TUF specification 1.0, python-tuf's metadata API):
signed metadata and release bundles that any static HTTP(S) server can serve.

Layout (``consistent_snapshot`` on, TUF spec §5 "consistent snapshots")::

    repo/metadata/1.root.json, 2.root.json ...   every root version (clients walk them)
    repo/metadata/root.json                      a copy of the newest root
    repo/metadata/<N>.targets.json               signed by the targets key
    repo/metadata/<N>.snapshot.json              signed by the online snapshot key
    repo/metadata/timestamp.json                 signed by the online timestamp key
    repo/targets/<sha256>.qrgate-<version>.tar   the bundles

    keys/offline/root-<i>.pem   root keys (Ed25519, PKCS#8 PEM, mode 0600): keep them off the
                                server, e.g. on separate USB sticks; ``threshold`` of them
                                sign each root
    keys/online/targets.pem, snapshot.pem, timestamp.pem   the keys publish and the
                                timestamp cron job use

Readers trust ``1.root.json`` (installed with the firmware, :func:`trusted_root`) and learn
newer roots from the repository. Every metadata file is written atomically (temp file,
fsync, rename) and ``timestamp.json``, the one file clients read first, is written last: a
crash mid-publish leaves clients on the previous complete state.

Errors: :class:`ota.exceptions.RepositoryError` (nothing served was changed).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner
from tuf.api.exceptions import UnsignedMetadataError
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from ota.bundle import bundle_name, open_bundle, sha256_file
from ota.exceptions import RepositoryError as RepoError
from provisioning.files import NotRegularFileError, read_regular, write_atomic

ONLINE_ROLES = (Targets.type, Snapshot.type, Timestamp.type)
METADATA_CAP = 16 * 1024 * 1024
"""Largest metadata file read back (bytes)."""
KEY_CAP = 64 * 1024
"""Largest key file read (bytes)."""

_VERSIONED = re.compile(r"([1-9][0-9]{0,9})\.(root|targets|snapshot)\.json")


@dataclass(frozen=True)
class Expiry:
    """How long each role's metadata stays valid after signing, in days. The timestamp is
    short: a reader that sees no fresh timestamp refuses updates (a freeze attack shows)."""

    root_days: float = 365
    targets_days: float = 90
    snapshot_days: float = 7
    timestamp_days: float = 1


def utc_now() -> datetime:
    """The wall clock, as an aware UTC datetime."""
    return datetime.now(UTC)


def metadata_dir(repo_dir: Path) -> Path:
    """Where the metadata files are: served at ``<base URL>/metadata/``."""
    return repo_dir / "metadata"


def targets_dir(repo_dir: Path) -> Path:
    """Where the bundles are: served at ``<base URL>/targets/``."""
    return repo_dir / "targets"


def _key_path(keys_dir: Path, role: str, index: int = 0) -> Path:
    if role == Root.type:
        return keys_dir / "offline" / f"root-{index}.pem"
    return keys_dir / "online" / f"{role}.pem"


def _new_signer(path: Path) -> CryptoSigner:
    """A new Ed25519 key written to ``path`` (0600, never over an existing file)."""
    signer = CryptoSigner(Ed25519PrivateKey.generate())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)
    try:
        write_atomic(path, signer.private_bytes, 0o600, overwrite=False)
    except FileExistsError:
        raise RepoError(f"{path} exists: refusing to replace a signing key") from None
    return signer


def load_signer(path: Path) -> CryptoSigner:
    """The signer of the PKCS#8 PEM private key at ``path``. Raises RepositoryError when the
    file is missing, unreadable or not an unencrypted Ed25519 key."""
    try:
        data, _mode = read_regular(path, KEY_CAP)
        key = load_pem_private_key(data, password=None)
    except (OSError, NotRegularFileError, ValueError, TypeError) as e:
        raise RepoError(f"cannot load signing key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise RepoError(f"{path} is not an Ed25519 key")
    return CryptoSigner(key)


def _sign(md: Metadata[Any], signers: list[CryptoSigner]) -> bytes:
    md.signatures.clear()
    try:
        for s in signers:
            md.sign(s, append=True)
    except UnsignedMetadataError as e:
        raise RepoError(f"signing {md.signed.type} failed: {e}") from None
    return md.to_bytes()


def _write(path: Path, data: bytes) -> None:
    write_atomic(path, data, 0o644, overwrite=True)


def _latest(repo_dir: Path, role: str) -> tuple[int, Path]:
    """Newest version and file of a versioned role; RepositoryError when none."""
    found = [
        (int(m[1]), p)
        for p in metadata_dir(repo_dir).glob(f"*.{role}.json")
        if (m := _VERSIONED.fullmatch(p.name)) and m[2] == role
    ]
    if not found:
        raise RepoError(f"no {role} metadata in {metadata_dir(repo_dir)}: run `qrgate ota init`")
    return max(found)


def _load(path: Path, kind: type[Signed]) -> Metadata[Any]:
    try:
        data, _mode = read_regular(path, METADATA_CAP)
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (OSError, NotRegularFileError, DeserializationError) as e:
        raise RepoError(f"cannot read {path}: {e}") from None
    if not isinstance(md.signed, kind):
        raise RepoError(f"{path} holds {md.signed.type} metadata, not {kind.type}")
    return md


def init_repository(
    repo_dir: Path,
    keys_dir: Path,
    *,
    root_threshold: int = 2,
    root_keys: int = 3,
    expiry: Expiry = Expiry(),
    now: Callable[[], datetime] = utc_now,
) -> Path:
    """Create a repository: Ed25519 keys (``root_keys`` offline root keys of which
    ``root_threshold`` must sign a root; one key each for targets, snapshot and timestamp),
    ``1.root.json`` (signed by every root key) and version 1 of targets (no bundles),
    snapshot and timestamp. Returns the path of ``1.root.json``, the file to install on
    readers as their trusted root.

    Raises RepositoryError when ``repo_dir/metadata`` or a key file exists already, or for a
    threshold outside 1..root_keys."""
    if not 1 <= root_threshold <= root_keys:
        raise RepoError(f"threshold {root_threshold} must be between 1 and {root_keys} keys")
    meta = metadata_dir(repo_dir)
    if meta.exists() and any(meta.iterdir()):
        raise RepoError(f"{meta} is not empty: a repository exists there")
    for role in ONLINE_ROLES:
        if _key_path(keys_dir, role).exists():
            raise RepoError(f"{_key_path(keys_dir, role)} exists: use other keys folder")
    meta.mkdir(parents=True, exist_ok=True)
    targets_dir(repo_dir).mkdir(parents=True, exist_ok=True)

    t = now()
    root = Root(expires=t + timedelta(days=expiry.root_days), consistent_snapshot=True)
    root_signers = [_new_signer(_key_path(keys_dir, Root.type, i + 1)) for i in range(root_keys)]
    for s in root_signers:
        root.add_key(s.public_key, Root.type)
    root.roles[Root.type].threshold = root_threshold
    online = {role: _new_signer(_key_path(keys_dir, role)) for role in ONLINE_ROLES}
    for role, s in online.items():
        root.add_key(s.public_key, role)
    root_bytes = _sign(Metadata(root), root_signers)
    _write(meta / "1.root.json", root_bytes)
    _write(meta / "root.json", root_bytes)

    targets = Targets(expires=t + timedelta(days=expiry.targets_days))
    _write(meta / "1.targets.json", _sign(Metadata(targets), [online[Targets.type]]))
    _snapshot_and_timestamp(repo_dir, online, expiry, t)
    return meta / "1.root.json"


def _online_signers(
    repo_dir: Path, keys_dir: Path, roles: tuple[str, ...]
) -> dict[str, CryptoSigner]:
    """The online signers of ``roles``, each checked against the newest root."""
    root = _load(_latest(repo_dir, Root.type)[1], Root).signed
    signers: dict[str, CryptoSigner] = {}
    for role in roles:
        s = load_signer(_key_path(keys_dir, role))
        if s.public_key.keyid not in root.roles[role].keyids:
            raise RepoError(f"{_key_path(keys_dir, role)} is not a {role} key of this repository")
        signers[role] = s
    return signers


def _snapshot_and_timestamp(
    repo_dir: Path, signers: dict[str, CryptoSigner], expiry: Expiry, t: datetime
) -> int:
    """Sign a new snapshot (naming the newest targets) and then a new timestamp naming it;
    returns the timestamp version."""
    meta = metadata_dir(repo_dir)
    targets_version = _latest(repo_dir, Targets.type)[0]
    try:
        snap_version = _latest(repo_dir, Snapshot.type)[0] + 1
    except RepoError:
        snap_version = 1
    snapshot = Snapshot(
        version=snap_version,
        expires=t + timedelta(days=expiry.snapshot_days),
        meta={"targets.json": MetaFile(version=targets_version)},
    )
    snap_bytes = _sign(Metadata(snapshot), [signers[Snapshot.type]])
    _write(meta / f"{snap_version}.snapshot.json", snap_bytes)

    ts_path = meta / "timestamp.json"
    ts_version = _load(ts_path, Timestamp).signed.version + 1 if ts_path.exists() else 1
    timestamp = Timestamp(
        version=ts_version,
        expires=t + timedelta(days=expiry.timestamp_days),
        snapshot_meta=MetaFile(
            version=snap_version,
            length=len(snap_bytes),
            hashes={"sha256": hashlib.sha256(snap_bytes).hexdigest()},
        ),
    )
    _write(ts_path, _sign(Metadata(timestamp), [signers[Timestamp.type]]))
    return ts_version


def publish(
    repo_dir: Path,
    keys_dir: Path,
    bundle_path: Path,
    *,
    max_bundle_bytes: int = 1024 * 1024 * 1024,
    expiry: Expiry = Expiry(),
    now: Callable[[], datetime] = utc_now,
) -> TargetFile:
    """Add the bundle at ``bundle_path`` as target ``qrgate-<version>.tar`` and return its
    TargetFile.

    The bundle is first opened and checked whole (:func:`ota.bundle.open_bundle`, in a
    temporary folder, at most ``max_bundle_bytes``). Its custom target fields, read from the
    manifest: ``{"version", "device_types", "min_version", "build_time_ns", "python", "platform"}``.
    The file is copied to ``targets/<sha256>.qrgate-<version>.tar``, then a new targets,
    snapshot and timestamp are signed with the online keys (each ``expiry`` from ``now()``).
    Publishing the same bytes again only re-signs; other bytes under a published version are
    refused. Raises RepositoryError (and BundleError for a bad bundle)."""
    with tempfile.TemporaryDirectory(prefix="qrgate-publish-") as tmp:
        manifest = open_bundle(bundle_path, Path(tmp) / "b", max_bytes=max_bundle_bytes)
    name = bundle_name(manifest.version)
    signers = _online_signers(repo_dir, keys_dir, ONLINE_ROLES)
    targets_version, targets_path = _latest(repo_dir, Targets.type)
    md = _load(targets_path, Targets)
    digest = sha256_file(bundle_path)
    old = md.signed.targets.get(name)
    if old is not None and old.hashes.get("sha256") != digest:
        raise RepoError(
            f"{name} is published already with other contents: give the new build a new "
            "version (a published version's bytes never change)"
        )
    info = TargetFile(
        length=bundle_path.stat().st_size,
        hashes={"sha256": digest},
        path=name,
        unrecognized_fields={
            "custom": {
                "version": manifest.version,
                "device_types": list(manifest.device_types),
                "min_version": manifest.min_version,
                "build_time_ns": manifest.build_time_ns,
                "python": manifest.python,
                "platform": manifest.platform,
            }
        },
    )
    dest = targets_dir(repo_dir) / f"{digest}.{name}"
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = dest.with_name(f".{dest.name}.part")
        shutil.copyfile(bundle_path, part)
        if sha256_file(part) != digest:
            part.unlink()
            raise RepoError(f"{bundle_path} changed while it was copied: publish it again")
        part.replace(dest)
    t = now()
    md.signed.targets[name] = info
    md.signed.version = targets_version + 1
    md.signed.expires = t + timedelta(days=expiry.targets_days)
    _write(
        metadata_dir(repo_dir) / f"{targets_version + 1}.targets.json",
        _sign(md, [signers[Targets.type]]),
    )
    _snapshot_and_timestamp(repo_dir, signers, expiry, t)
    return info


def refresh_timestamp(
    repo_dir: Path,
    keys_dir: Path,
    *,
    expiry: Expiry = Expiry(),
    now: Callable[[], datetime] = utc_now,
) -> int:
    """Re-sign snapshot and timestamp with new versions and expiry dates (run daily from
    cron on the server, well inside ``expiry.timestamp_days``); returns the timestamp
    version. Needs only the snapshot and timestamp keys. Raises RepositoryError."""
    signers = _online_signers(repo_dir, keys_dir, (Snapshot.type, Timestamp.type))
    return _snapshot_and_timestamp(repo_dir, signers, expiry, now())


def trusted_root(repo_dir: Path) -> bytes:
    """The bytes of ``1.root.json``: what a reader's firmware ships as its trust anchor.
    Raises RepositoryError when missing."""
    path = metadata_dir(repo_dir) / "1.root.json"
    try:
        return read_regular(path, METADATA_CAP)[0]
    except (OSError, NotRegularFileError) as e:
        raise RepoError(f"cannot read {path}: {e}") from None


def _root_signers(keys_dir: Path, root: Root) -> list[CryptoSigner]:
    """The offline root keys present in ``keys_dir/offline`` that ``root`` names."""
    found = [load_signer(p) for p in sorted((keys_dir / "offline").glob("root-*.pem"))]
    return [s for s in found if s.public_key.keyid in root.roles[Root.type].keyids]


def rotate_root(
    repo_dir: Path,
    keys_dir: Path,
    *,
    replace: Sequence[str] = (),
    expiry: Expiry = Expiry(),
    now: Callable[[], datetime] = utc_now,
) -> Path:
    """Sign the next root version: a new expiry (do it well before the root expires, or
    readers refuse every update) and, for each role named in ``replace`` (``root``,
    ``targets``, ``snapshot``, ``timestamp``), new keys in place of the old (every root key
    for ``root``). Returns the path of ``<N+1>.root.json``.

    The new root is signed by the old root's threshold of old root keys and by every new
    root key (TUF spec §5.3.4: readers check both), so the offline keys must be in
    ``keys_dir/offline``. Replaced key files are kept as ``<name>.retired-<N>``; new ones are
    written as ``<name>.new`` first and renamed once the root is out. Then targets (when its
    key changed), snapshot and timestamp are re-signed with the current keys.

    Raises RepositoryError (fewer old root keys than the threshold, an unknown role, a
    leftover ``.new`` key file from an interrupted rotation); nothing is changed then."""
    unknown = set(replace) - {Root.type, *ONLINE_ROLES}
    if unknown:
        raise RepoError(f"no role {sorted(unknown)}: use root, targets, snapshot or timestamp")
    version, root_path = _latest(repo_dir, Root.type)
    old_md = _load(root_path, Root)
    root: Root = old_md.signed
    old_signers = _root_signers(keys_dir, root)
    threshold = root.roles[Root.type].threshold
    if len(old_signers) < threshold:
        raise RepoError(
            f"{len(old_signers)} of the root keys are in {keys_dir / 'offline'}, "
            f"{threshold} are needed: bring the offline keys"
        )
    leftovers = sorted(keys_dir.rglob("*.pem.new"))
    if leftovers:
        raise RepoError(f"{leftovers[0]} is left from an interrupted rotation: remove it")

    # every key file to put in place once the new root is written: (new file, final name)
    moves: list[tuple[Path, Path]] = []
    new_signers: dict[str, list[CryptoSigner]] = {}
    for role in replace:
        if role == Root.type:
            finals = [
                _key_path(keys_dir, Root.type, i + 1) for i in range(len(root.roles[role].keyids))
            ]
        else:
            finals = [_key_path(keys_dir, role)]
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        new_signers[role] = []
        for final in finals:
            staged = final.with_name(final.name + ".new")
            signer = _new_signer(staged)
            root.add_key(signer.public_key, role)
            new_signers[role].append(signer)
            moves.append((staged, final))

    t = now()
    root.version = version + 1
    root.expires = t + timedelta(days=expiry.root_days)
    signers = old_signers + new_signers.get(Root.type, [])
    root_bytes = _sign(Metadata(root), signers)
    new_path = metadata_dir(repo_dir) / f"{version + 1}.root.json"
    _write(new_path, root_bytes)
    _write(metadata_dir(repo_dir) / "root.json", root_bytes)
    for staged, final in moves:
        if final.exists():
            final.replace(final.with_name(f"{final.name}.retired-{version}"))
        staged.replace(final)

    online = _online_signers(repo_dir, keys_dir, ONLINE_ROLES)
    if Targets.type in replace:
        targets_version, targets_path = _latest(repo_dir, Targets.type)
        md = _load(targets_path, Targets)
        md.signed.version = targets_version + 1
        md.signed.expires = t + timedelta(days=expiry.targets_days)
        _write(
            metadata_dir(repo_dir) / f"{targets_version + 1}.targets.json",
            _sign(md, [online[Targets.type]]),
        )
    _snapshot_and_timestamp(repo_dir, online, expiry, t)
    return new_path
