"""Release bundles: one uncompressed tar holding everything a reader needs to install a
release without reaching any package index.

Layout of ``qrgate-<version>.tar`` (wheels are zip files already, so the tar is not
compressed)::

    manifest.json      {"format": 1, "name": "qrgate", "version", "min_version",
                        "device_types", "python": "cp311", "platform", "build_time_ns",
                        "wheels": {filename: sha256 hex}, "system_packages"}
    requirements.txt   "name==version --hash=sha256:<hex>" for every wheel, qrgate included
    wheels/*.whl       the qrgate wheel and a wheelhouse of its dependencies

The release venv is installed with ``pip install --no-index --no-deps --require-hashes
--find-links wheels -r requirements.txt``. On the Pi, the Debian packages named in
``system_packages`` (numpy, which python3-picamera2 is built against, and python3-systemd)
come from the venv's system site packages, so their wheels are left out of the bundle.

Authenticity comes from TUF (:mod:`ota.repository`, :mod:`ota.fetch`), not from the bundle:
:func:`open_bundle` only makes sure the tar is what it says and cannot write outside its
folder or fill the disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ota.exceptions import BundleError, ReleaseError
from ota.releases import check_version, version_key
from provisioning.files import NotRegularFileError, read_regular

FORMAT = 1
"""The manifest format this code writes and reads."""

NAME = "qrgate"

MANIFEST_CAP = 1024 * 1024
"""Largest manifest.json or requirements.txt read (bytes)."""

MAX_MEMBERS = 2000
"""Most tar members accepted (a wheelhouse is a few dozen wheels)."""

AARCH64_PLATFORMS = (
    "manylinux2014_aarch64",
    *(f"manylinux_2_{minor}_aarch64" for minor in range(17, 37)),
)
"""pip ``--platform`` tags a Raspberry Pi OS Bookworm reader can run (glibc 2.36)."""

PI_SYSTEM_PACKAGES = ("numpy", "systemd-python")
"""Dependencies the Pi gets from Debian (python3-numpy, python3-systemd), not the bundle."""

PI_CONSTRAINTS = ("numpy==1.24.2",)
"""Pins that make pip choose wheels built against Debian Bookworm's numpy."""

_WHEEL = re.compile(
    r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._]*[A-Za-z0-9])?)-(?P<version>[A-Za-z0-9_.!+]+)"
    r"(?:-[0-9][A-Za-z0-9_.]*)?-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+-[A-Za-z0-9_.]+\.whl"
)
_HEX64 = re.compile(r"[0-9a-f]{64}")
_REQ_LINE = re.compile(
    r"(?P<name>[A-Za-z0-9._-]+)==(?P<version>[A-Za-z0-9_.!+]+) --hash=sha256:(?P<hash>[0-9a-f]{64})"
)
_PYTHON_TAG = re.compile(r"cp3[0-9]{1,2}")
_VERSION_LINE = re.compile(r"^__version__\s*=\s*[\"']([^\"']+)[\"']\s*$", re.MULTILINE)
_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Manifest:
    """A bundle's manifest.json, checked. ``wheels`` maps wheel file names to SHA-256 hex
    digests; ``build_time_ns`` is the build machine's wall clock (ns since the epoch)."""

    version: str
    min_version: str | None
    device_types: tuple[str, ...]
    python: str
    platform: str
    build_time_ns: int
    wheels: Mapping[str, str]
    system_packages: tuple[str, ...]
    name: str = NAME
    format: int = FORMAT

    def to_dict(self) -> dict[str, Any]:
        """The JSON object written as manifest.json."""
        return {
            "format": self.format,
            "name": self.name,
            "version": self.version,
            "min_version": self.min_version,
            "device_types": list(self.device_types),
            "python": self.python,
            "platform": self.platform,
            "build_time_ns": self.build_time_ns,
            "wheels": dict(sorted(self.wheels.items())),
            "system_packages": list(self.system_packages),
        }

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        """Parse and check manifest.json. Raises BundleError naming the bad field."""
        try:
            obj = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BundleError(f"manifest.json is not JSON: {e}") from None
        if not isinstance(obj, dict):
            raise BundleError("manifest.json is not a JSON object")
        if obj.get("format") != FORMAT or obj.get("name") != NAME:
            raise BundleError(
                f"manifest.json: format {obj.get('format')!r} of {obj.get('name')!r}, "
                f"this updater reads format {FORMAT} of {NAME!r}"
            )
        version = _field(obj, "version", str)
        min_version = obj.get("min_version")
        try:
            check_version(version)
            if min_version is not None:
                check_version(_field(obj, "min_version", str))
        except ReleaseError as e:
            raise BundleError(f"manifest.json: {e}") from None
        device_types = _str_list(obj, "device_types")
        if not device_types:
            raise BundleError("manifest.json: device_types is empty")
        python = _field(obj, "python", str)
        if not _PYTHON_TAG.fullmatch(python):
            raise BundleError(f"manifest.json: python {python!r} is not a tag like cp311")
        build_time_ns = _field(obj, "build_time_ns", int)
        if isinstance(build_time_ns, bool) or build_time_ns < 0:
            raise BundleError("manifest.json: build_time_ns must be a non-negative integer")
        wheels = _field(obj, "wheels", dict)
        for name, digest in wheels.items():
            if not _WHEEL.fullmatch(name) or not isinstance(digest, str):
                raise BundleError(f"manifest.json: bad wheel entry {name!r}")
            if not _HEX64.fullmatch(digest):
                raise BundleError(f"manifest.json: {name}: {digest!r} is not a sha256 hex")
        return cls(
            version=version,
            min_version=min_version,
            device_types=tuple(device_types),
            python=python,
            platform=_field(obj, "platform", str),
            build_time_ns=build_time_ns,
            wheels=MappingProxyType(dict(wheels)),
            system_packages=tuple(_str_list(obj, "system_packages")),
        )


def _field(obj: dict[str, Any], name: str, kind: type) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind):
        raise BundleError(f"manifest.json: {name} must be a {kind.__name__}")
    return value


def _str_list(obj: dict[str, Any], name: str) -> list[str]:
    value = _field(obj, name, list)
    if not all(isinstance(v, str) and v for v in value):
        raise BundleError(f"manifest.json: {name} must be a list of non-empty strings")
    return list(value)


def python_tag(python_version: str) -> str:
    """``"3.11"`` → ``"cp311"``. Raises BundleError for anything else."""
    m = re.fullmatch(r"3\.([0-9]{1,2})", python_version)
    if not m:
        raise BundleError(f"python version {python_version!r} is not like 3.11")
    return f"cp3{m[1]}"


def bundle_name(version: str) -> str:
    """The bundle's file name and TUF target name: ``qrgate-<version>.tar``."""
    return f"{NAME}-{check_version(version)}.tar"


def read_version(source: Path) -> str:
    """The ``__version__`` of the project tree at ``source``, read from the text of
    ``firmware/__init__.py`` (not imported: the tree may be another release). Raises
    BundleError when missing or not a release version."""
    path = source / "firmware" / "__init__.py"
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BundleError(f"cannot read {path}: {e}") from None
    m = _VERSION_LINE.search(text)
    if not m:
        raise BundleError(f"no __version__ = '...' line in {path}")
    try:
        return check_version(m[1])
    except ReleaseError as e:
        raise BundleError(f"{path}: {e}") from None


def project_dependencies(source: Path) -> list[str]:
    """The ``[project] dependencies`` requirement strings of ``source/pyproject.toml``.
    Raises BundleError when unreadable."""
    try:
        with (source / "pyproject.toml").open("rb") as f:
            deps = tomllib.load(f)["project"]["dependencies"]
    except (OSError, KeyError, tomllib.TOMLDecodeError) as e:
        raise BundleError(f"cannot read dependencies from {source}/pyproject.toml: {e}") from None
    if not isinstance(deps, list) or not all(isinstance(d, str) for d in deps):
        raise BundleError(f"{source}/pyproject.toml: dependencies is not a list of strings")
    return list(deps)


def _normalize(name: str) -> str:
    """PEP 503 normalized project name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def _wheel_project(filename: str) -> str | None:
    """The normalized project name of a wheel file name, None if it is not one."""
    m = _WHEEL.fullmatch(filename)
    return None if m is None else _normalize(m["name"])


def _requirement_name(requirement: str) -> str:
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not m:
        raise BundleError(f"cannot read the project name of requirement {requirement!r}")
    return _normalize(m[1])


def _run_pip(pip: Sequence[str], args: list[str]) -> None:
    cmd = [*pip, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BundleError(f"{' '.join(cmd[:4])} ... exited with {proc.returncode}:\n{tail}")


def native_platform() -> str:
    """This machine's platform as a manifest names it (``linux_x86_64``, ``linux_aarch64``):
    what a native bundle's wheels run on."""
    return f"linux_{os.uname().machine}"


def default_system_packages(platform: str) -> tuple[str, ...]:
    """What the target gets from Debian: :data:`PI_SYSTEM_PACKAGES` for a Pi platform,
    nothing for ``"native"`` (a test machine's release venv has no Debian packages)."""
    return () if platform == "native" else PI_SYSTEM_PACKAGES


def build_wheelhouse(
    source: Path,
    dest: Path,
    *,
    platform: str = "linux_aarch64",
    python_version: str = "3.11",
    system_packages: Sequence[str] | None = None,
    constraints: Sequence[str] | None = None,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
) -> Path:
    """Put wheels of every dependency of the project at ``source`` (its pyproject.toml) into
    ``dest`` and return ``dest``; the qrgate wheel is not among them.

    ``platform="native"``: ``pip wheel`` for this machine (tests, the e2e). Otherwise ``pip
    download --only-binary=:all:`` for linux aarch64 (:data:`AARCH64_PLATFORMS`) and CPython
    ``python_version``, pinned by ``constraints`` (default :data:`PI_CONSTRAINTS`). Wheels of
    ``system_packages`` (default :func:`default_system_packages`) are left out, transitive
    ones included. Raises BundleError (pip's last lines in the message)."""
    if system_packages is None:
        system_packages = default_system_packages(platform)
    skip = {_normalize(p) for p in system_packages}
    deps = [d for d in project_dependencies(source) if _requirement_name(d) not in skip]
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qrgate-constraints-") as tmp:
        args: list[str] = []
        if platform == "native":
            args = ["wheel", "-q", "--disable-pip-version-check", "-w", str(dest)]
        else:
            if platform != "linux_aarch64":
                raise BundleError(f"platform {platform!r}: use linux_aarch64 or native")
            tag = python_tag(python_version)
            args = ["download", "-q", "--disable-pip-version-check", "-d", str(dest)]
            args += ["--only-binary=:all:", "--implementation", "cp"]
            args += ["--python-version", python_version, "--abi", tag, "--abi", "abi3"]
            args += ["--abi", "none"]
            for p in AARCH64_PLATFORMS:
                args += ["--platform", p]
            pins = PI_CONSTRAINTS if constraints is None else constraints
            if pins:
                cfile = Path(tmp) / "constraints.txt"
                cfile.write_text("".join(f"{c}\n" for c in pins), encoding="utf-8")
                args += ["--constraint", str(cfile)]
        if deps:
            _run_pip(pip, [*args, *deps])
    for wheel in dest.glob("*.whl"):
        if _wheel_project(wheel.name) in skip:
            wheel.unlink()
    return dest


def sha256_file(path: Path) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def build_bundle(
    source: Path,
    out_dir: Path,
    *,
    platform: str = "linux_aarch64",
    python_version: str = "3.11",
    device_types: Sequence[str] = ("rpi4", "rpi5"),
    min_version: str | None = None,
    system_packages: Sequence[str] | None = None,
    constraints: Sequence[str] | None = None,
    pip: Sequence[str] = (sys.executable, "-m", "pip"),
    wheelhouse: Path | None = None,
    now_wall_ns: Callable[[], int] = time.time_ns,
) -> Path:
    """Build ``out_dir/qrgate-<version>.tar`` from the project tree at ``source`` and return
    its path (an existing file of that name is replaced).

    The qrgate wheel is built with ``pip wheel --no-deps --no-build-isolation`` (the build
    backend, setuptools, comes from the running environment) from a clean copy of
    ``source`` (no dot folders, ``build``, ``dist``, ``*.egg-info`` or ``out_dir``).
    Dependency wheels come from ``wheelhouse`` when given (a folder made by
    :func:`build_wheelhouse`, reused across builds), else are made by
    :func:`build_wheelhouse` with ``platform``, ``python_version``, ``system_packages`` and
    ``constraints``. ``build_time_ns`` is ``now_wall_ns()`` (wall clock, ns). Raises
    BundleError (bad version, pip failure, a project with two wheels)."""
    version = read_version(source)
    if min_version is not None:
        try:
            check_version(min_version)
        except ReleaseError as e:
            raise BundleError(f"min_version: {e}") from None
        if version_key(min_version) > version_key(version):
            # no reader could ever take it: one running min_version would be downgrading
            raise BundleError(f"min_version {min_version} is newer than the bundle's {version}")
    if not device_types:
        raise BundleError("a bundle needs at least one device type")
    if system_packages is None:
        system_packages = default_system_packages(platform)
    tag = python_tag(python_version)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".qrgate-bundle-", dir=out_dir) as tmp:
        stage = Path(tmp)
        wheels = stage / "wheels"
        wheels.mkdir()
        clean = _clean_copy(source, stage / "source", skip=out_dir)
        _run_pip(
            pip,
            [
                *("wheel", "-q", "--disable-pip-version-check", "--no-deps"),
                *("--no-build-isolation", "-w", str(wheels), str(clean)),
            ],
        )
        shutil.rmtree(clean)
        if wheelhouse is None:
            wheelhouse = build_wheelhouse(
                source,
                stage / "deps",
                platform=platform,
                python_version=python_version,
                system_packages=system_packages,
                constraints=constraints,
                pip=pip,
            )
        for dep in sorted(wheelhouse.glob("*.whl")):
            if _wheel_project(dep.name) in (None, NAME):
                continue
            if not (wheels / dep.name).exists():
                shutil.copyfile(dep, wheels / dep.name)
        digests = {w.name: sha256_file(w) for w in sorted(wheels.glob("*.whl"))}
        requirements = _requirements(digests)
        manifest = Manifest(
            version=version,
            min_version=min_version,
            device_types=tuple(device_types),
            python=tag,
            # a native bundle names the machine it was built on, so a reader of another
            # architecture refuses it before downloading (reason wrong_platform)
            platform=native_platform() if platform == "native" else platform,
            build_time_ns=now_wall_ns(),
            wheels=MappingProxyType(digests),
            system_packages=tuple(system_packages),
        )
        (stage / "manifest.json").write_text(
            json.dumps(manifest.to_dict(), indent=2) + "\n", encoding="utf-8"
        )
        (stage / "requirements.txt").write_text(requirements, encoding="utf-8")
        part = stage / "bundle.tar"
        with tarfile.open(part, "w", format=tarfile.PAX_FORMAT) as tar:
            for name in ("manifest.json", "requirements.txt"):
                tar.add(stage / name, arcname=name, filter=_normalize_member)
            for wheel in sorted(digests):
                tar.add(wheels / wheel, arcname=f"wheels/{wheel}", filter=_normalize_member)
        target = out_dir / bundle_name(version)
        part.replace(target)
    return target


_NOT_SOURCE = shutil.ignore_patterns(
    ".*", "build", "dist", "*.egg-info", "__pycache__", "*.pyc", "var", "demo-state"
)


def _clean_copy(source: Path, dest: Path, *, skip: Path) -> Path:
    """Copy the project tree without venvs, caches and build leftovers: setuptools reuses
    ``build/lib``, so a module deleted from the tree would otherwise still ship."""
    skip = skip.resolve()

    def ignore(folder: str, names: list[str]) -> set[str]:
        ignored = set(_NOT_SOURCE(folder, names))
        return ignored | {n for n in names if (Path(folder) / n).resolve() == skip}

    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    return dest


def _normalize_member(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """Owner and mode of the build machine say nothing to a reader: fixed values."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode = 0o644
    return info


def _requirements(digests: Mapping[str, str]) -> str:
    """requirements.txt text for pip's hash-checking mode; BundleError if one project has
    two wheels (pip would refuse the file)."""
    lines: dict[str, str] = {}
    for filename, digest in sorted(digests.items()):
        m = _WHEEL.fullmatch(filename)
        if m is None:
            raise BundleError(f"{filename} is not a wheel file name")
        name = _normalize(m["name"])
        if name in lines:
            raise BundleError(f"two wheels of {name} in the wheelhouse: keep one")
        lines[name] = f"{name}=={m['version']} --hash=sha256:{digest}\n"
    return "".join(lines[n] for n in sorted(lines))


def open_bundle(tar_path: Path, dest_dir: Path, *, max_bytes: int) -> Manifest:
    """Extract the bundle at ``tar_path`` into ``dest_dir`` (created; must not exist or be
    empty) and return its checked manifest.

    Refused (BundleError) before anything is written: a file over ``max_bytes`` bytes, not an
    uncompressed tar, a member other than manifest.json, requirements.txt, the ``wheels``
    folder and regular files ``wheels/<name>.whl``, a duplicate member, more than
    :data:`MAX_MEMBERS` members or members adding up to more than ``max_bytes``. Extraction
    uses tarfile's ``"data"`` filter (no absolute paths, links or device files). Afterwards
    every wheel's SHA-256 must equal the manifest's and requirements.txt's, and the wheels
    present must be exactly those listed (BundleError otherwise; the extracted files are
    left for the caller to remove)."""
    try:
        size = tar_path.stat().st_size
    except OSError as e:
        raise BundleError(f"cannot read bundle {tar_path}: {e}") from None
    if size > max_bytes:
        raise BundleError(f"bundle {tar_path.name} is {size} bytes, over the {max_bytes} cap")
    dest_dir.mkdir(parents=True, exist_ok=True)
    if any(dest_dir.iterdir()):
        raise BundleError(f"{dest_dir} is not empty")
    try:
        with tarfile.open(tar_path, "r:") as tar:
            members = _checked_members(tar, max_bytes)
            tar.extractall(dest_dir, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"cannot extract bundle {tar_path.name}: {e}") from None
    manifest = Manifest.from_bytes(_read_capped(dest_dir / "manifest.json"))
    _check_wheels(dest_dir, manifest)
    return manifest


def _checked_members(tar: tarfile.TarFile, max_bytes: int) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for info in tar:
        if len(members) >= MAX_MEMBERS:
            raise BundleError(f"bundle has more than {MAX_MEMBERS} members")
        name = info.name
        if name in seen:
            raise BundleError(f"bundle member {name!r} appears twice")
        seen.add(name)
        if name == "wheels" and info.isdir():
            members.append(info)
            continue
        ok = name in ("manifest.json", "requirements.txt") or (
            name.startswith("wheels/") and _WHEEL.fullmatch(name[len("wheels/") :]) is not None
        )
        if not ok or not info.isfile():
            raise BundleError(f"unexpected bundle member {name!r}")
        total += info.size
        if total > max_bytes:
            raise BundleError(f"bundle members add up to more than {max_bytes} bytes")
        members.append(info)
    for needed in ("manifest.json", "requirements.txt"):
        if needed not in seen:
            raise BundleError(f"bundle has no {needed}")
    return members


def _read_capped(path: Path) -> bytes:
    try:
        data, _mode = read_regular(path, MANIFEST_CAP, follow_symlinks=False)
    except (OSError, NotRegularFileError) as e:
        raise BundleError(f"cannot read {path.name}: {e}") from None
    return data


def _check_wheels(dest_dir: Path, manifest: Manifest) -> None:
    wheels_dir = dest_dir / "wheels"
    present = {p.name for p in wheels_dir.iterdir()} if wheels_dir.is_dir() else set()
    listed = set(manifest.wheels)
    if present != listed:
        extra, missing = sorted(present - listed), sorted(listed - present)
        raise BundleError(f"wheels differ from the manifest: extra {extra}, missing {missing}")
    if NAME not in {_wheel_project(w) for w in listed}:
        raise BundleError("bundle has no qrgate wheel")
    try:
        text = _read_capped(dest_dir / "requirements.txt").decode("utf-8")
    except UnicodeDecodeError:
        raise BundleError("requirements.txt is not UTF-8") from None
    required: set[str] = set()
    for line in text.splitlines():
        if not line.strip():
            continue
        m = _REQ_LINE.fullmatch(line.strip())
        if not m:
            raise BundleError(f"requirements.txt: unexpected line {line[:80]!r}")
        required.add(m["hash"])
    if required != set(manifest.wheels.values()):
        raise BundleError("requirements.txt hashes differ from the manifest's wheels")
    for name, digest in manifest.wheels.items():
        actual = sha256_file(wheels_dir / name)
        if actual != digest:
            raise BundleError(f"wheel {name}: sha256 {actual}, manifest says {digest}")
