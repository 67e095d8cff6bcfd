"""Release folders of an install root laid out like ``/opt/qrgate``::

    root/releases/<version>/   one folder per installed release
    root/current  -> releases/<version>   the release the service runs
    root/previous -> releases/<version>   the release to roll back to

Links are relative so the root can be moved or mounted elsewhere. Every link change makes a
new link under a temporary name, renames it over the old one with ``os.replace`` (rename(2) is
atomic: a reader of ``current`` sees the old target or the new one, never no link) and then
fsyncs the root folder so the rename survives a power cut.

A release folder is complete once its stamp ``.qrgate-release`` (the version and a newline)
exists: the installer (``ota.install`` on the device, ``scripts/install.sh`` for the first
release) writes it last, after everything else is on disk. ``current`` is only ever switched
to a stamped release; a folder without a stamp is a killed install, removed by
:meth:`Releases.sweep_incomplete`.

Version strings are a simple subset of PEP 440: ``N(.N){0,3}`` with an optional ``aN``,
``bN`` or ``rcN`` pre-release, at most 32 characters; anything else (``..``, ``/``, spaces,
leading dots) is refused before it can name a path.
"""

from __future__ import annotations

import builtins
import os
import re
import secrets
import shutil
import stat
from pathlib import Path

from ota.exceptions import ReleaseError
from provisioning.files import NotRegularFileError, fsync_dir, read_regular, write_atomic

_VERSION = re.compile(
    r"(?P<release>[0-9]{1,9}(?:\.[0-9]{1,9}){0,3})(?:(?P<pre>a|b|rc)(?P<n>[0-9]{1,9}))?"
)
_PRE_ORDER = {"a": 0, "b": 1, "rc": 2}
_TMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
STAGING_PREFIX = ".staging-"
"""Hidden folders under ``releases/`` where an installer unpacks a bundle (swept when left)."""
STAMP = ".qrgate-release"
"""The file that marks a release folder complete (written last; content: version + newline)."""
_STAMP_CAP = 64


def check_version(version: str) -> str:
    """Return ``version`` when it is a valid release name; raise ReleaseError otherwise."""
    if len(version) > 32 or not _VERSION.fullmatch(version):
        raise ReleaseError(f"{version!r} is not a release version (like 1.4.2 or 2.0rc1)")
    return version


def version_key(version: str) -> tuple[tuple[int, ...], int, int]:
    """Sort key of a valid version: release numbers padded to 4, then pre-releases (a < b <
    rc) before the final release. Raises ReleaseError on an invalid version."""
    m = _VERSION.fullmatch(check_version(version))
    assert m is not None  # check_version matched it
    numbers = tuple(int(p) for p in m["release"].split("."))
    numbers += (0,) * (4 - len(numbers))
    if m["pre"] is None:
        return numbers, 3, 0
    return numbers, _PRE_ORDER[m["pre"]], int(m["n"])


class Releases:
    """The release folders and the ``current``/``previous`` links under ``root``.

    Methods raise ReleaseError (nothing changed) for invalid versions or missing releases,
    and OSError when the file system refuses; a kill at any moment leaves ``current`` in
    place, pointing at the old release or the new one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.releases_dir = root / "releases"

    def path(self, version: str) -> Path:
        """The folder of ``version`` (which need not exist). Raises ReleaseError when the
        version is invalid."""
        return self.releases_dir / check_version(version)

    def _read_link(self, name: str) -> str | None:
        try:
            target = os.readlink(self.root / name)
        except FileNotFoundError:
            return None
        except OSError as exc:  # EINVAL: a plain file or folder where the link should be
            raise ReleaseError(
                f"{self.root / name} is not a symlink: fix the install root"
            ) from exc
        parent, _, version = target.partition("/")
        if parent != "releases":
            raise ReleaseError(f"{self.root / name} points to {target!r}, outside releases/")
        return check_version(version)

    def current_version(self) -> str | None:
        """The version ``current`` points to, or None when there is no ``current`` link.
        Raises ReleaseError when the link is not ours (a plain file, a target outside
        ``releases/`` or an invalid version)."""
        return self._read_link("current")

    def previous_version(self) -> str | None:
        """The version ``previous`` points to (the rollback target), or None."""
        return self._read_link("previous")

    def list(self) -> builtins.list[str]:
        """The installed versions (real folders with valid names), oldest first by
        :func:`version_key`; temporary and half-removed folders are not listed."""
        try:
            entries = builtins.list(os.scandir(self.releases_dir))
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            valid = len(entry.name) <= 32 and _VERSION.fullmatch(entry.name)
            if valid and entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
        return sorted(names, key=version_key)

    def _require(self, version: str) -> None:
        folder = self.path(version)
        try:
            mode = os.lstat(folder).st_mode
        except FileNotFoundError:
            raise ReleaseError(f"release {version} is not installed ({folder} missing)") from None
        if not stat.S_ISDIR(mode):
            raise ReleaseError(f"{folder} is not a real folder: refusing to run it")

    def _link(self, name: str, version: str) -> None:
        # a fresh random temp name: a stale one left by a killed run cannot collide
        tmp = self.root / f"{_TMP_PREFIX}{name}-{secrets.token_hex(6)}"
        os.symlink(f"releases/{version}", tmp)
        try:
            os.replace(tmp, self.root / name)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.root)

    def is_complete(self, version: str) -> bool:
        """True when the folder of ``version`` is a real folder holding the stamp
        :data:`STAMP` (a regular file, not a link) that names ``version``. Raises
        ReleaseError on an invalid version."""
        folder = self.path(version)
        try:
            if not stat.S_ISDIR(os.lstat(folder).st_mode):
                return False
            data, _mode = read_regular(folder / STAMP, _STAMP_CAP, follow_symlinks=False)
        except (OSError, NotRegularFileError):
            return False
        return data.decode(errors="replace").strip() == version

    def complete(self, version: str) -> None:
        """Mark the installed folder of ``version`` complete: flush every file written into
        it to disk (``os.sync``: the venv's files were written without fsync), then write the
        stamp atomically. Call it last. Raises ReleaseError when the folder is missing."""
        self._require(version)
        # without this a power cut could leave a stamp next to files the disk never got
        os.sync()
        write_atomic(self.path(version) / STAMP, f"{version}\n".encode(), 0o644, overwrite=True)

    def discard(self, version: str) -> None:
        """Remove the folder of ``version`` (renamed to a hidden trash name first, so a kill
        leaves no half-removed release under its name). Raises ReleaseError when it is
        ``current`` or ``previous``; no error when it does not exist."""
        if version in (self.current_version(), self.previous_version()):
            raise ReleaseError(f"release {version} is current or previous: not removed")
        self._trash(self.path(version))

    def _trash(self, folder: Path) -> None:
        trash = self.releases_dir / f"{_TRASH_PREFIX}{folder.name}-{secrets.token_hex(4)}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        fsync_dir(self.releases_dir)
        shutil.rmtree(trash)

    def sweep_incomplete(self) -> builtins.list[str]:
        """Remove release folders without a stamp (installs cut short by a kill -9 or power
        cut) unless ``current`` or ``previous`` points at them, and leftover staging folders;
        returns the removed versions, oldest first. Not safe while an install runs: the
        updater calls it before it starts one."""
        self._sweep()
        spare = {self.current_version(), self.previous_version()}
        removed = [v for v in self.list() if v not in spare and not self.is_complete(v)]
        for version in removed:
            self._trash(self.path(version))
        try:
            entries = builtins.list(os.scandir(self.releases_dir))
        except FileNotFoundError:
            return removed
        for entry in entries:
            if entry.name.startswith(STAGING_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
        return removed

    def switch(self, version: str) -> None:
        """Point ``current`` at ``version`` atomically; the release it pointed to becomes
        ``previous`` first (written the same way), unless it was ``version`` already.
        Raises ReleaseError when ``version`` is invalid, not installed as a real folder, or
        not complete (no stamp: an install that did not finish)."""
        self._require(version)
        if not self.is_complete(version):
            raise ReleaseError(
                f"release {version} is incomplete (no {STAMP} stamp): not switched to; "
                "install it again"
            )
        old = self.current_version()
        if old is not None and old != version:
            self._link("previous", old)
        self._link("current", version)

    def rollback(self) -> str:
        """Point ``current`` back at ``previous`` and drop the ``previous`` link (there is
        nothing further back to roll to); returns the version now current. Raises
        ReleaseError when there is no ``previous`` or its folder is gone."""
        target = self.previous_version()
        if target is None:
            raise ReleaseError(f"{self.root}: no previous release to roll back to")
        self._require(target)
        self._link("current", target)
        # a kill here leaves previous == current: harmless, the next switch rewrites it
        (self.root / "previous").unlink(missing_ok=True)
        fsync_dir(self.root)
        return target

    def prune(self, keep: int = 3) -> builtins.list[str]:
        """Remove all but the ``keep`` newest releases, never the current or previous one;
        also removes leftovers of killed runs (temporary links, half-removed folders).
        Returns the removed versions, oldest first. Raises ReleaseError when ``keep`` < 1.

        A folder is first renamed to a hidden trash name, then deleted: a kill midway leaves
        a hidden folder (removed next time), never a half-deleted release under its name."""
        if keep < 1:
            raise ReleaseError(f"keep must be at least 1, not {keep}")
        self._sweep()
        versions = self.list()
        spare = {self.current_version(), self.previous_version()}
        doomed = [v for v in versions[:-keep] if v not in spare]
        for version in doomed:
            self._trash(self.path(version))
        return doomed

    def _sweep(self) -> None:
        if not self.root.is_dir():
            return
        for entry in os.scandir(self.root):
            if entry.name.startswith(_TMP_PREFIX) and entry.is_symlink():
                os.unlink(entry.path)
        try:
            entries = builtins.list(os.scandir(self.releases_dir))
        except FileNotFoundError:
            return
        for entry in entries:
            if entry.name.startswith(_TRASH_PREFIX) and entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
