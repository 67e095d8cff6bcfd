"""Installing real bundles built from this project into release folders: refusals and
failures leave nothing under the version's name. The successful install (venv, pip from the
wheelhouse only, the stamp last, a leftover replaced) is in test_end_to_end.py, which runs
what it installs."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from ota.bundle import build_bundle
from ota.exceptions import InstallError, OtaError, ReleaseError
from ota.install import import_name, install_release
from ota.releases import Releases
from tests.ota.conftest import BundleFactory, copy_tree

PIP = [sys.executable, "-m", "pip"]
BASE_PYTHON: str = getattr(sys, "_base_executable", sys.executable)
MAX = 1024**3


def install(bundle: Path, releases: Releases, version: str, **kw: object) -> Path:
    opts: dict[str, object] = {
        "python": BASE_PYTHON,
        "pip": PIP,
        "system_site_packages": False,  # wheelhouse only: nothing from this machine
        "max_bytes": MAX,
    }
    opts.update(kw)
    return install_release(bundle, releases, version, **opts)  # type: ignore[arg-type]


def leftovers(releases: Releases) -> list[str]:
    return sorted(p.name for p in releases.releases_dir.iterdir())


def test_wrong_version_and_damaged_bundle_are_refused(
    native_bundle_factory: BundleFactory, tmp_path: Path
) -> None:
    bundle = native_bundle_factory("7.1.0")
    releases = Releases(tmp_path / "opt")
    with pytest.raises(InstallError, match=r"holds 7\.1\.0, not 7\.2") as info:
        install(bundle, releases, "7.2")
    assert info.value.reason == "bad_bundle"
    assert leftovers(releases) == []
    damaged = tmp_path / "damaged.tar"
    shutil.copyfile(bundle, damaged)
    with tarfile.open(damaged) as tar:
        wheel = next(m for m in tar.getmembers() if m.name.startswith("wheels/qrgate-"))
    with damaged.open("r+b") as f:
        f.seek(wheel.offset_data + wheel.size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(InstallError) as info:
        install(damaged, releases, "7.1.0")
    assert info.value.reason == "bad_bundle"
    assert "sha256" in info.value.detail.lower() or "SHA-256" in info.value.detail
    assert leftovers(releases) == []
    assert issubclass(InstallError, OtaError)


def test_venv_failure_leaves_nothing(native_bundle_factory: BundleFactory, tmp_path: Path) -> None:
    releases = Releases(tmp_path / "opt")
    with pytest.raises(InstallError) as info:
        install(native_bundle_factory("7.1.0"), releases, "7.1.0", python=str(tmp_path / "nope"))
    assert info.value.reason == "install_failed"
    assert info.value.detail.startswith("venv:")
    assert leftovers(releases) == []


def foreign_wheelhouse(tmp_path: Path) -> Path:
    """A wheelhouse holding one real wheel tagged for Windows: pip must refuse it here."""
    project = tmp_path / "tiny"
    (project / "tiny").mkdir(parents=True)
    (project / "tiny" / "__init__.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "tiny"\nversion = "1.0"\n'
    )
    built = tmp_path / "built"
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", built, project],
        check=True,
    )
    (wheel,) = built.glob("tiny-1.0-*.whl")
    house = tmp_path / "house"
    house.mkdir()
    wheel.rename(house / "tiny-1.0-py3-none-win_amd64.whl")
    return house


def test_failing_pip_leaves_no_folder_and_reports_its_error(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "tree", "7.3.0")
    bundle = build_bundle(
        tree, tmp_path / "out", platform="native", wheelhouse=foreign_wheelhouse(tmp_path)
    )
    releases = Releases(tmp_path / "opt")
    with pytest.raises(InstallError) as info:
        install(bundle, releases, "7.3.0")
    assert info.value.reason == "install_failed"
    assert info.value.detail.startswith("pip install:")
    assert "tiny" in info.value.detail
    assert len(info.value.detail) <= 260
    assert leftovers(releases) == []
    with pytest.raises(ReleaseError, match="not installed"):
        releases.switch("7.3.0")


def test_import_names() -> None:
    assert import_name("systemd-python") == "systemd"
    assert import_name("numpy") == "numpy"
    assert import_name("Foo.Bar-baz") == "foo_bar_baz"
