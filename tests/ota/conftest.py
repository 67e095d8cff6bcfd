"""Fixtures shared by the OTA tests: real release bundles built from this project tree.

``native_bundle_factory(version, ...)`` builds ``qrgate-<version>.tar`` for this machine
(platform ``native``: every dependency in the wheelhouse, none left to Debian) from a copy
of the working tree whose ``firmware/__init__.py`` says ``__version__ = version``. The
dependency wheelhouse is made once per session; each call then only builds the qrgate
wheel (a few seconds), and identical calls return the same file. The returned bundle is
shared: copy it before changing it.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import pytest

from ota.bundle import build_bundle, build_wheelhouse, native_platform

BUILD_NS = 1_790_000_000 * 10**9
"""A build time (wall clock, ns) for bundles whose build time a test checks: 2026-09-21."""

PROJECT = Path(__file__).resolve().parents[2]
TREE = ("firmware", "drivers", "provisioning", "ota", "pyproject.toml", "README.md")
"""What a bundle is built from: the packages, the build configuration and the readme
pyproject.toml names."""


class BundleFactory(Protocol):
    def __call__(
        self,
        version: str,
        *,
        patch: Callable[[Path], None] | None = None,
        min_version: str | None = None,
        device_types: Sequence[str] = ("rpi4", "rpi5"),
        build_time_ns: int | None = None,
    ) -> Path:
        """Path of ``qrgate-<version>.tar`` built from a copy of the project tree.

        ``patch(tree)`` may change the copy (at ``tree``) before the build, e.g. make the
        daemon crash at start; ``build_time_ns`` fixes the manifest's build time (default:
        the wall clock at build)."""
        ...


def copy_tree(dest: Path, version: str) -> Path:
    """Copy the project's packages and build files to ``dest`` and set ``__version__``
    there; return ``dest``."""
    dest.mkdir(parents=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
    for name in TREE:
        src = PROJECT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=ignore)
        else:
            shutil.copyfile(src, dest / name)
    init = dest / "firmware" / "__init__.py"
    text, n = re.subn(
        r"^__version__\s*=.*$",
        f'__version__ = "{version}"',
        init.read_text(encoding="utf-8"),
        flags=re.MULTILINE,
    )
    assert n == 1, "firmware/__init__.py has no __version__ line"
    init.write_text(text, encoding="utf-8")
    return dest


@pytest.fixture(scope="session")
def native_wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Wheels of every dependency of this project for this machine, made once a session."""
    return build_wheelhouse(
        PROJECT, tmp_path_factory.mktemp("wheelhouse"), platform="native", pip=_pip()
    )


def _pip() -> list[str]:
    return [sys.executable, "-m", "pip"]


@pytest.fixture(scope="session")
def native_bundle_factory(
    tmp_path_factory: pytest.TempPathFactory, native_wheelhouse: Path
) -> BundleFactory:
    """See the module docstring."""
    built: dict[tuple[object, ...], Path] = {}

    def factory(
        version: str,
        *,
        patch: Callable[[Path], None] | None = None,
        min_version: str | None = None,
        device_types: Sequence[str] = ("rpi4", "rpi5"),
        build_time_ns: int | None = None,
    ) -> Path:
        key = (version, patch, min_version, tuple(device_types), build_time_ns)
        if key in built:
            return built[key]
        work = tmp_path_factory.mktemp(f"bundle-{version}")
        tree = copy_tree(work / "tree", version)
        if patch is not None:
            patch(tree)
        fixed = build_time_ns
        path = build_bundle(
            tree,
            work / "out",
            platform="native",
            python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
            device_types=device_types,
            min_version=min_version,
            wheelhouse=native_wheelhouse,
            pip=_pip(),
            now_wall_ns=time.time_ns if fixed is None else (lambda: fixed),
        )
        shutil.rmtree(tree)
        built[key] = path
        return path

    return factory


def small_bundle(
    out_dir: Path,
    version: str,
    *,
    wheel_bytes: int = 200_000,
    min_version: str | None = None,
    device_types: Sequence[str] = ("rpi4", "rpi5"),
    build_time_ns: int = 1_700_000_000_000_000_000,
    python: str = "cp311",
) -> Path:
    """A bundle in the real format whose only wheel is ``wheel_bytes`` of random bytes under
    a qrgate wheel's name: fine for publishing and fetching, not for installing. Written
    here with tarfile and json, independently of ota.bundle."""
    import hashlib
    import io
    import json
    import random
    import tarfile

    data = random.Random(version).randbytes(wheel_bytes)
    wheel = f"qrgate-{version}-py3-none-any.whl"
    digest = hashlib.sha256(data).hexdigest()
    manifest = {
        "format": 1,
        "name": "qrgate",
        "version": version,
        "min_version": min_version,
        "device_types": list(device_types),
        "python": python,
        "platform": native_platform(),
        "build_time_ns": build_time_ns,
        "wheels": {wheel: digest},
        "system_packages": [],
    }
    files = {
        "manifest.json": json.dumps(manifest).encode(),
        "requirements.txt": f"qrgate=={version} --hash=sha256:{digest}\n".encode(),
        f"wheels/{wheel}": data,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"qrgate-{version}.tar"
    with tarfile.open(path, "w") as tar:
        for name, body in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    return path
