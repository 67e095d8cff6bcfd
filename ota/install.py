"""Installing a verified release bundle into a new release folder, from its wheelhouse only.

The folder ``releases/<version>`` is a venv made where it will stay (venvs are not
relocatable), with the system site packages on the Pi (Debian's numpy, picamera2, lgpio and
systemd bindings). pip installs from the bundle's wheels alone: ``--no-index`` (nothing from
the network), ``--no-deps`` and ``--require-hashes`` (every wheel pinned by the SHA-256 that
TUF-verified bundle lists). The stamp :data:`ota.releases.STAMP` is written last, after a
check that the entry point exists and the system packages import; ``current`` is never
switched to a folder without it, and :meth:`ota.releases.Releases.sweep_incomplete` removes a
folder a kill -9 left unstamped.
"""

from __future__ import annotations

import logging
import re
import secrets
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from ota.bundle import Manifest, open_bundle
from ota.exceptions import BundleError, InstallError
from ota.releases import STAGING_PREFIX, Releases

log = logging.getLogger(__name__)

DETAIL_LINES = 5
"""Last lines of a failed tool's output kept in InstallError.detail."""
DETAIL_CHARS = 240
"""Longest InstallError.detail (characters)."""
TOOL_TIMEOUT_S = 900.0
"""Longest run of one venv or pip command, seconds (a Pi 4 installs qrgate in about one)."""

#: import names of system packages whose distribution name differs
IMPORT_NAMES = {"systemd-python": "systemd", "opencv-python-headless": "cv2", "pillow": "PIL"}


def import_name(distribution: str) -> str:
    """The module a distribution is imported as (``systemd-python`` -> ``systemd``)."""
    name = distribution.lower()
    return IMPORT_NAMES.get(name, re.sub(r"[-.]+", "_", name))


def _tail(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-DETAIL_LINES:])[-DETAIL_CHARS:]


def _run(cmd: Sequence[str | Path], what: str, timeout_s: float) -> None:
    try:
        proc = subprocess.run(
            [str(c) for c in cmd],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise InstallError("install_failed", f"{what} timed out after {timeout_s:.0f} s") from None
    except OSError as e:
        raise InstallError("install_failed", f"{what}: {e}") from None
    if proc.returncode != 0:
        detail = _tail(proc.stderr) or _tail(proc.stdout) or f"exit code {proc.returncode}"
        raise InstallError("install_failed", f"{what}: {detail}")


def install_release(
    bundle_tar: Path,
    releases: Releases,
    version: str,
    *,
    python: str,
    pip: Sequence[str] | None = None,
    system_site_packages: bool = True,
    max_bytes: int,
    timeout_s: float = TOOL_TIMEOUT_S,
    compile_bytecode: bool = True,
) -> Path:
    """Install the bundle at ``bundle_tar`` (TUF-verified already) as release ``version``
    under ``releases``; return the complete release folder.

    ``python``: the base interpreter the venv is made from (production ``/usr/bin/python3``,
    Debian's, for its system packages; tests ``sys._base_executable``). ``pip``: a pip command
    that supports ``--python`` (pip >= 22.3, e.g. ``[sys.executable, "-m", "pip"]``); the
    venv then gets no pip of its own. None (the default): the venv is made with its own pip
    (ensurepip, a few seconds more) and that installs: every release can install the next
    one without a pip elsewhere on the system. ``max_bytes``: cap on the bundle's size and
    its unpacked size. ``timeout_s``: cap on each tool run, seconds. ``compile_bytecode``:
    pip writes .pyc files (the default, and what a reader needs: the service's user cannot
    write into the root-owned release, so without them every start compiles again); tests
    that never start a release may skip it.

    Steps: unpack into a hidden staging folder under ``releases/`` (ota.bundle.open_bundle:
    member names, sizes and wheel hashes checked), ``python -m venv [--without-pip]
    [--system-site-packages] releases/<version>``, ``pip [--python <venv>] install
    --no-index --no-deps --require-hashes --find-links wheels -r requirements.txt``, then
    check that ``bin/qrgate`` exists and qrgate and the manifest's system packages import in
    the venv, then stamp the folder (:meth:`Releases.complete`). A release folder already
    stamped is kept as it is (same version, same bits: TUF names one bundle per version) and
    returned.

    Raises InstallError: reason ``bad_bundle`` (the bundle does not open, or is not
    ``version``) or ``install_failed`` (venv, pip or a check failed; detail: the last lines
    of its error output, at most :data:`DETAIL_CHARS` characters). On any failure the new
    folder and the staging folder are removed: nothing half-made keeps the version's name,
    and ``current`` is untouched. Raises ReleaseError on an invalid version."""
    dest = releases.path(version)
    if releases.is_complete(version):
        log.info("release %s is installed already (%s): kept", version, dest)
        return dest
    releases.releases_dir.mkdir(parents=True, exist_ok=True)
    if dest.exists() or dest.is_symlink():
        releases.discard(version)  # unstamped leftover of a killed install
    staging = releases.releases_dir / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    try:
        manifest = _unpack(bundle_tar, staging, version, max_bytes)
        _build(
            staging,
            dest=dest,
            manifest=manifest,
            python=python,
            pip=pip,
            system_site_packages=system_site_packages,
            timeout_s=timeout_s,
            compile_bytecode=compile_bytecode,
        )
        releases.complete(version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if dest.exists():
            releases.discard(version)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    log.info("release %s installed in %s", version, dest)
    return dest


def _unpack(bundle_tar: Path, staging: Path, version: str, max_bytes: int) -> Manifest:
    try:
        manifest = open_bundle(bundle_tar, staging, max_bytes=max_bytes)
    except BundleError as e:
        raise InstallError("bad_bundle", str(e)[:DETAIL_CHARS]) from e
    if manifest.version != version:
        raise InstallError("bad_bundle", f"bundle holds {manifest.version}, not {version}")
    return manifest


def _build(
    staging: Path,
    *,
    dest: Path,
    manifest: Manifest,
    python: str,
    pip: Sequence[str] | None,
    system_site_packages: bool,
    timeout_s: float,
    compile_bytecode: bool,
) -> None:
    venv: list[str | Path] = [python, "-m", "venv"]
    if pip is not None:
        venv.append("--without-pip")
    if system_site_packages:
        venv.append("--system-site-packages")
    _run([*venv, dest], "venv", timeout_s)
    venv_python = dest / "bin" / "python"
    installer: list[str | Path] = (
        [venv_python, "-m", "pip"] if pip is None else [*pip, "--python", venv_python]
    )
    _run(
        [
            *installer,
            "install",
            "--no-index",
            "--no-deps",
            "--require-hashes",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            "--compile" if compile_bytecode else "--no-compile",
            "--find-links",
            staging / "wheels",
            "-r",
            staging / "requirements.txt",
        ],
        "pip install",
        timeout_s,
    )
    if not (dest / "bin" / "qrgate").is_file():
        raise InstallError("install_failed", f"pip did not install {dest / 'bin' / 'qrgate'}")
    # the modules Debian must provide (system site packages) and qrgate itself must import
    # with this venv's interpreter, or the service would crash at start after the switch
    modules = ["firmware", *(import_name(p) for p in manifest.system_packages)]
    # -I: only the venv's own paths (not the working folder, not PYTHONPATH)
    _run([venv_python, "-I", "-c", "import " + ", ".join(modules)], "import check", timeout_s)
