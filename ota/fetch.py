"""The reader's view of the TUF repository: find the bundle a job names, download it
resumably, and accept it only if the signed metadata vouches for its bytes.

Trust starts from the root installed with the firmware (``bootstrap``, TUF spec §5.2);
python-tuf's ``Updater`` walks newer roots and checks timestamp, snapshot and targets
(signatures, thresholds, versions never going back, expiry: §5.3-5.6). The bundle itself is
fetched with :func:`ota.download.download` (HTTP Range resume; python-tuf's downloader starts
over after every drop) into the file ``Updater.find_cached_target`` checks, which then
compares length and SHA-256 with the signed targets metadata (§5.7).

The pure checks (:func:`check_target`, :func:`check_clock`, :func:`check_space`) decide
before any download whether a found target may be installed on this reader.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import quote

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import Metadata, Root, TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from ota import download as _download
from ota.bundle import bundle_name
from ota.exceptions import (
    ClockNotReadyError,
    DownloadFailedError,
    MetadataExpiredError,
    MetadataRejectedError,
    RejectedError,
    ReleaseError,
    TamperedError,
    TargetUnknownError,
)
from ota.releases import check_version, version_key

MAX_BUNDLE_BYTES = 512 * 1024 * 1024
"""Default cap on a bundle's size (bytes), whatever the metadata says."""

METADATA_TIMEOUT_S = 10
"""Socket timeout for metadata requests (seconds, connect and each read)."""

_TAMPERED_REASONS = frozenset({"hash_mismatch", "size_mismatch", "too_large"})


@dataclass(frozen=True)
class Target:
    """A bundle as the signed targets metadata describes it. ``length`` in bytes,
    ``sha256`` lower-case hex, ``build_time_ns`` the build machine's wall clock (ns since the
    epoch), ``python`` an ABI tag such as ``cp311``, ``platform`` what its wheels run on
    (``linux_aarch64``)."""

    name: str
    version: str
    length: int
    sha256: str
    device_types: tuple[str, ...]
    min_version: str | None
    build_time_ns: int
    python: str
    platform: str


class DownloadFunction(Protocol):
    """:func:`ota.download.download`'s signature, as far as the fetcher uses it."""

    def __call__(
        self,
        url: str,
        dest: Path,
        *,
        expected_size: int,
        max_size: int,
        sha256: bytes | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> Path: ...


def target_from_info(info: TargetFile, version: str) -> Target:
    """A :class:`Target` from python-tuf's TargetFile and its custom fields. Raises
    MetadataRejectedError when the custom fields are missing, ill-typed or name another
    version (signed, so the release itself is broken)."""
    custom: Any = info.custom
    sha256 = info.hashes.get("sha256")
    try:
        if not isinstance(custom, dict) or not isinstance(sha256, str):
            raise TypeError("no custom fields or no sha256 hash")
        device_types = custom["device_types"]
        min_version = custom["min_version"]
        build_time_ns = custom["build_time_ns"]
        python = custom["python"]
        platform = custom["platform"]
        if custom["version"] != version:
            raise ValueError(f"custom version {custom['version']!r}")
        if not (isinstance(device_types, list) and all(isinstance(d, str) for d in device_types)):
            raise TypeError("device_types")
        if min_version is not None:
            check_version(min_version)
        if type(build_time_ns) is not int or not isinstance(python, str):
            raise TypeError("build_time_ns or python")
        if not isinstance(platform, str):
            raise TypeError("platform")
    except (KeyError, TypeError, ValueError, ReleaseError) as e:
        raise MetadataRejectedError(f"target {info.path}: unusable custom fields: {e}") from None
    return Target(
        name=info.path,
        version=version,
        length=info.length,
        sha256=sha256,
        device_types=tuple(device_types),
        min_version=min_version,
        build_time_ns=build_time_ns,
        python=python,
        platform=platform,
    )


class Fetcher:
    """TUF client of one reader.

    ``metadata_dir``: trusted metadata kept between runs (the rollback protection: a
    timestamp or snapshot older than the one kept here is refused). ``cache_dir``: where
    bundles are downloaded (``<name>`` plus ``.part`` while unfinished). ``base_url``: the
    repository, serving ``metadata/`` and ``targets/`` (see :mod:`ota.repository`).
    ``trusted_root``: the bytes of the root shipped with the firmware. ``max_bundle_bytes``
    caps any bundle download."""

    def __init__(
        self,
        metadata_dir: Path,
        cache_dir: Path,
        base_url: str,
        trusted_root: bytes,
        *,
        download: DownloadFunction = _download.download,
        max_bundle_bytes: int = MAX_BUNDLE_BYTES,
        metadata_timeout_s: int = METADATA_TIMEOUT_S,
    ) -> None:
        self.metadata_dir = metadata_dir
        self.cache_dir = cache_dir
        self.base_url = base_url.rstrip("/") + "/"
        self._trusted_root = trusted_root
        self._download = download
        self.max_bundle_bytes = max_bundle_bytes
        self._timeout_s = metadata_timeout_s
        self._updater: Updater | None = None
        self._infos: dict[str, TargetFile] = {}

    def _new_updater(self) -> Updater:
        self.metadata_dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        return Updater(
            str(self.metadata_dir),
            self.base_url + "metadata/",
            target_dir=str(self.cache_dir),
            target_base_url=self.base_url + "targets/",
            fetcher=Urllib3Fetcher(socket_timeout=self._timeout_s),
            config=UpdaterConfig(),
            bootstrap=self._trusted_root,
        )

    def refresh_and_find(self, version: str) -> Target:
        """Refresh the metadata (a new python-tuf Updater, root → timestamp → snapshot →
        targets) and return the target ``qrgate-<version>.tar``.

        Raises MetadataExpiredError (``metadata_expired``), MetadataRejectedError
        (``metadata_rejected``: bad signatures, rollback or freeze, mismatched files, a bad
        trusted root), TargetUnknownError (``target_unknown``), DownloadFailedError
        (reason ``metadata_unreachable``: the server could not be reached or answered an
        error; retry later), ReleaseError (``version`` is not a version) and OSError (local
        disk)."""
        name = bundle_name(version)
        try:
            updater = self._new_updater()
            updater.refresh()
            info = updater.get_targetinfo(name)
        except tuf_errors.ExpiredMetadataError as e:
            raise MetadataExpiredError(str(e)) from None
        except tuf_errors.RepositoryError as e:
            raise MetadataRejectedError(f"{type(e).__name__}: {e}") from None
        except tuf_errors.DownloadError as e:
            raise DownloadFailedError("metadata_unreachable", f"{type(e).__name__}: {e}") from None
        if info is None:
            raise TargetUnknownError(f"the repository signs no {name}")
        target = target_from_info(info, version)
        self._updater = updater
        self._infos[name] = info
        return target

    def bundle_path(self, target: Target) -> Path:
        """Where :meth:`fetch` puts the bundle: python-tuf's file name for the target (the
        URL-quoted target name) in ``cache_dir``, the file ``find_cached_target`` checks."""
        return self.cache_dir / quote(target.name, "")

    def fetch(self, target: Target, progress: Callable[[int, int], None] | None = None) -> Path:
        """Download ``target`` (resuming a partial file) and return its path once its length
        and SHA-256 match the signed targets metadata.

        Refreshes the metadata first if this Fetcher has not found ``target`` itself (e.g.
        after a restart). ``progress(done, total)`` in bytes, as in
        :func:`ota.download.download`. Raises TamperedError (``tampered``: wrong size or
        hash; the file is deleted), RejectedError (``bundle_too_large``: over
        ``max_bundle_bytes``), MetadataRejectedError (the metadata now describes other
        bytes), DownloadFailedError (the download gave up; a partial file is kept for a
        resume), the errors of :meth:`refresh_and_find`, and OSError (local disk)."""
        if target.length > self.max_bundle_bytes:
            raise RejectedError(
                "bundle_too_large", f"{target.length} bytes, cap {self.max_bundle_bytes}"
            )
        info = self._infos.get(target.name)
        if info is None or self._updater is None:
            found = self.refresh_and_find(target.version)
            if (found.length, found.sha256) != (target.length, target.sha256):
                raise MetadataRejectedError(f"{target.name} changed since the job found it")
            info = self._infos[target.name]
        updater = self._updater
        assert updater is not None  # set by refresh_and_find
        cached = updater.find_cached_target(info)
        if cached is not None:
            return Path(cached)
        dest = self.bundle_path(target)
        url = f"{self.base_url}targets/{target.sha256}.{target.name}"
        try:
            self._download(
                url,
                dest,
                expected_size=target.length,
                max_size=self.max_bundle_bytes,
                sha256=bytes.fromhex(target.sha256),
                progress=progress,
            )
        except DownloadFailedError as e:
            if e.reason in _TAMPERED_REASONS:
                raise TamperedError(f"{e.reason}: {e.detail}") from None
            raise
        if updater.find_cached_target(info, str(dest)) is None:
            dest.unlink(missing_ok=True)
            raise TamperedError(f"{target.name} does not match the signed length and sha256")
        return dest


def check_trusted_root(data: bytes) -> int:
    """Parse ``data`` as TUF root metadata (TUF spec §4.3; signatures are checked by the
    first refresh, against the root's own keys) and return its version. Raises
    MetadataRejectedError when it is not a root.json: the updater cannot trust anything
    then; install the release engineer's ``1.root.json``."""
    try:
        root = Metadata[Root].from_bytes(data)
    except Exception as e:  # python-tuf raises DeserializationError and plain errors alike
        raise MetadataRejectedError(f"not a TUF root.json: {e}") from None
    if not isinstance(root.signed, Root):
        raise MetadataRejectedError(f"not a TUF root.json but {root.signed.type} metadata")
    return root.signed.version


def check_target(
    target: Target,
    *,
    running: str,
    device_type: str,
    python: str,
    platform: str,
    allow_downgrade: bool,
) -> None:
    """Refuse a target this reader must not install (pure; no I/O). Raises RejectedError
    with reason ``wrong_platform`` (built for another ``platform``, e.g. a test bundle for
    ``linux_x86_64`` on a ``linux_aarch64`` reader), ``python_mismatch`` (ABI tag differs from
    ``python``, e.g. ``cp311``),
    ``wrong_device_type`` (``device_type`` not listed), ``same_version`` (already running),
    ``downgrade`` (older than ``running`` and not ``allow_downgrade``) or
    ``below_min_version`` (``running`` is older than the target's ``min_version``: update
    through an intermediate release first). ReleaseError when ``running`` is not a
    version."""
    if target.platform != platform:
        raise RejectedError("wrong_platform", f"bundle {target.platform}, reader {platform}")
    if target.python != python:
        raise RejectedError("python_mismatch", f"bundle {target.python}, reader {python}")
    if device_type not in target.device_types:
        raise RejectedError(
            "wrong_device_type", f"{device_type} not in {', '.join(target.device_types)}"
        )
    new, old = version_key(target.version), version_key(running)
    if new == old:
        raise RejectedError("same_version", f"{running} is running already")
    if new < old and not allow_downgrade:
        raise RejectedError("downgrade", f"{target.version} is older than {running}")
    if target.min_version is not None and old < version_key(target.min_version):
        raise RejectedError("below_min_version", f"{running} is older than {target.min_version}")


def check_clock(build_time_ns: int, wall_ns: int, synced: bool) -> None:
    """Refuse to judge metadata expiry with a clock that cannot be trusted (pure). Raises
    ClockNotReadyError ``clock_unsynced`` when not ``synced``, ``clock_behind_build`` when
    ``wall_ns`` (ns since the epoch) is earlier than the bundle's ``build_time_ns``."""
    if not synced:
        raise ClockNotReadyError("clock_unsynced", "the wall clock is not synchronised yet")
    if wall_ns < build_time_ns:
        raise ClockNotReadyError(
            "clock_behind_build",
            f"wall clock {wall_ns} ns is {(build_time_ns - wall_ns) / 1e9:.0f} s before the build",
        )


def check_space(free_bytes: int, bundle_bytes: int) -> None:
    """Refuse an update without room for the bundle and its installed release (pure): raises
    RejectedError ``insufficient_disk`` unless ``free_bytes >= 2 * bundle_bytes``."""
    if free_bytes < 2 * bundle_bytes:
        raise RejectedError(
            "insufficient_disk", f"{free_bytes} bytes free, {2 * bundle_bytes} needed"
        )


def free_bytes(path: Path) -> int:
    """Bytes available to unprivileged users on the file system holding ``path`` (statvfs:
    ``f_bavail * f_frsize``); raises OSError."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize
