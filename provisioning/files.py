"""Writing secrets and records to disk: whole or not at all, private from the first byte.

The one atomic writer of the project (firmware imports it too): a power cut or a crash
leaves either the old file or the new one, never a torn key, CA record or badge list.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def write_atomic(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    """Write ``data`` to ``path`` whole or not at all: a temp file in the same folder with
    ``mode`` set before any byte (mkstemp makes it 0600), fsynced, then renamed into place and
    the folder fsynced (the rename itself must survive a power cut).

    Without ``overwrite`` the file is put in place with ``os.link``, which raises
    FileExistsError rather than replace an existing file: two writers racing for one name
    cannot replace each other's key. Raises OSError (FileExistsError included)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
        fsync_dir(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def fsync_dir(folder: Path) -> None:
    """fsync a folder: a rename or unlink in it survives a power cut only after this."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class NotRegularFileError(ValueError):
    """The path is not a regular file, or larger than the cap: not what the caller asked
    for; give up on it (the message names the path)."""


def read_regular(path: Path, cap: int, *, follow_symlinks: bool = True) -> tuple[bytes, int]:
    """The bytes (at most ``cap``) and mode of the regular file at ``path``.

    O_NONBLOCK so a FIFO in its place cannot hang the caller; fstat on the open file so the
    mode checked is the mode of the bytes read; without ``follow_symlinks`` a symlink planted
    in the folder is refused (O_NOFOLLOW). Raises OSError (FileNotFoundError included) and
    NotRegularFileError (not a regular file, or larger than ``cap`` bytes)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC
    if not follow_symlinks:
        flags |= os.O_NOFOLLOW
    fd = os.open(path, flags)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFileError(f"{path}: not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(cap + 1)
    finally:
        os.close(fd)
    if len(data) > cap:
        raise NotRegularFileError(f"{path}: larger than {cap} bytes")
    return data, st.st_mode
