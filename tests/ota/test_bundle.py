"""ota.bundle: a real bundle built from this project (manifest, requirements, wheels, the
version inside the qrgate wheel), the wheelhouse for the Pi (aarch64 wheels, Debian's
packages left out), and open_bundle's refusals of damaged or hostile tars."""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from ota.bundle import (
    PI_SYSTEM_PACKAGES,
    Manifest,
    build_bundle,
    build_wheelhouse,
    open_bundle,
    read_version,
)
from ota.exceptions import BundleError
from tests.ota.conftest import BUILD_NS, BundleFactory, copy_tree, small_bundle

CAP = 1 << 30


def test_native_bundle_holds_everything_to_install(
    tmp_path: Path, native_bundle_factory: BundleFactory
) -> None:
    bundle = native_bundle_factory("1.4.0", min_version="1.2.0", build_time_ns=BUILD_NS)
    assert bundle.name == "qrgate-1.4.0.tar"
    with tarfile.open(bundle) as tar:
        names = tar.getnames()
        raw = json.loads(tar.extractfile("manifest.json").read())  # type: ignore[union-attr]
    assert names[:2] == ["manifest.json", "requirements.txt"]
    assert all(n.startswith("wheels/") and n.endswith(".whl") for n in names[2:])
    assert set(raw) == {
        *("format", "name", "version", "min_version", "device_types", "python", "platform"),
        *("build_time_ns", "wheels", "system_packages"),
    }

    manifest = open_bundle(bundle, tmp_path / "x", max_bytes=CAP)

    assert manifest.version == "1.4.0"
    assert manifest.min_version == "1.2.0"
    assert manifest.device_types == ("rpi4", "rpi5")
    assert manifest.python == f"cp3{sys.version_info.minor}"
    # a native bundle names this machine's platform, which readers compare with their own
    assert (manifest.platform, manifest.build_time_ns) == (f"linux_{os.uname().machine}", BUILD_NS)
    assert manifest.system_packages == ()
    projects = {w.split("-")[0].lower() for w in manifest.wheels}
    # native: every dependency, the ones a Pi takes from Debian included
    assert {"qrgate", "numpy", "systemd_python", "tuf", "paho_mqtt", "cryptography"} <= projects
    wheels = tmp_path / "x" / "wheels"
    for name, digest in manifest.wheels.items():
        assert hashlib.sha256((wheels / name).read_bytes()).hexdigest() == digest
    requirements = (tmp_path / "x" / "requirements.txt").read_text().splitlines()
    assert len(requirements) == len(manifest.wheels)
    assert f"qrgate==1.4.0 --hash=sha256:{manifest.wheels['qrgate-1.4.0-py3-none-any.whl']}" in (
        requirements
    )
    with zipfile.ZipFile(wheels / "qrgate-1.4.0-py3-none-any.whl") as whl:
        assert '__version__ = "1.4.0"' in whl.read("firmware/__init__.py").decode()
        assert "ota/bundle.py" in whl.namelist()


def test_a_patch_changes_only_its_own_bundle(
    tmp_path: Path, native_bundle_factory: BundleFactory
) -> None:
    def crash_at_start(tree: Path) -> None:
        (tree / "firmware" / "crash_marker.py").write_text("CRASH = True\n")

    patched = native_bundle_factory("3.0.0", patch=crash_at_start)
    plain = native_bundle_factory("1.4.0", min_version="1.2.0", build_time_ns=BUILD_NS)
    assert native_bundle_factory("3.0.0", patch=crash_at_start) == patched  # built once
    for bundle, expected in ((patched, True), (plain, False)):
        dest = tmp_path / bundle.stem
        manifest = open_bundle(bundle, dest, max_bytes=CAP)
        wheel = dest / "wheels" / f"qrgate-{manifest.version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel) as whl:
            assert ("firmware/crash_marker.py" in whl.namelist()) is expected


def test_pi_wheelhouse_is_aarch64_without_debian_packages(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "pyproject.toml").write_text(
        '[project]\nname = "x"\nversion = "1"\n'
        'dependencies = ["cbor2>=5.6", "numpy>=1.24", "rich>=13", "systemd-python>=235"]\n'
    )
    wheels = build_wheelhouse(source, tmp_path / "wh", platform="linux_aarch64")
    names = sorted(p.name for p in wheels.iterdir())
    projects = {n.split("-")[0].lower() for n in names}
    assert {"cbor2", "rich", "pygments", "markdown_it_py"} <= projects
    assert not projects & {"numpy", "systemd_python"}
    (cbor2,) = [n for n in names if n.startswith("cbor2-")]
    assert "cp311" in cbor2
    assert cbor2.endswith("_aarch64.whl")
    # a transitive dependency listed as a system package is left out too
    build_wheelhouse(
        source,
        tmp_path / "wh2",
        platform="linux_aarch64",
        system_packages=[*PI_SYSTEM_PACKAGES, "pygments"],
    )
    assert not list((tmp_path / "wh2").glob("pygments-*"))


def test_read_version_reads_the_text(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "t", "2.5.0rc1")
    assert read_version(tree) == "2.5.0rc1"
    (tree / "firmware" / "__init__.py").write_text('"""no version here"""\n')
    with pytest.raises(BundleError, match="__version__"):
        read_version(tree)
    (tree / "firmware" / "__init__.py").write_text('__version__ = "1.0-dev"\n')
    with pytest.raises(BundleError, match="not a release version"):
        read_version(tree)


def test_build_refuses_bad_options(tmp_path: Path) -> None:
    tree = copy_tree(tmp_path / "t", "1.0.0")
    with pytest.raises(BundleError, match="min_version"):
        build_bundle(tree, tmp_path / "out", platform="native", min_version="latest")
    with pytest.raises(BundleError, match=r"min_version 1\.1\.0 is newer than the bundle"):
        build_bundle(tree, tmp_path / "out", platform="native", min_version="1.1.0")
    with pytest.raises(BundleError, match="device type"):
        build_bundle(tree, tmp_path / "out", platform="native", device_types=())
    assert not (tmp_path / "out" / "qrgate-1.0.0.tar").exists()


# -- open_bundle against damaged and hostile tars --------------------------------------------


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tar.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tar.addfile(info, io.BytesIO(m[1]))
    return path


def _members(bundle: Path) -> list[tuple[str, bytes]]:
    with tarfile.open(bundle) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def test_open_small_bundle(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path, "1.0.0", min_version=None)
    manifest = open_bundle(bundle, tmp_path / "x", max_bytes=CAP)
    assert isinstance(manifest, Manifest)
    assert manifest.version == "1.0.0"
    assert manifest.min_version is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("flip_wheel_byte", "sha256"),
        ("extra_wheel", "wheels differ"),
        ("missing_wheel", "wheels differ"),
        ("requirements_hash", "requirements.txt hashes"),
        ("requirements_junk", "unexpected line"),
        ("traversal", "unexpected bundle member"),
        ("absolute", "unexpected bundle member"),
        ("symlink", "unexpected bundle member"),
        ("script", "unexpected bundle member"),
        ("duplicate", "twice"),
        ("no_manifest", "no manifest.json"),
        ("manifest_format", "format"),
        ("manifest_not_json", "not JSON"),
        ("manifest_bad_version", "release version"),
        ("manifest_bad_hash", "sha256 hex"),
    ],
)
def test_open_refuses_a_damaged_bundle(tmp_path: Path, change: str, message: str) -> None:
    members = _members(small_bundle(tmp_path / "good", "1.0.0", wheel_bytes=5000))
    files = dict(members)
    wheel = "wheels/qrgate-1.0.0-py3-none-any.whl"
    manifest = json.loads(files["manifest.json"])
    extra: list[tarfile.TarInfo | tuple[str, bytes]] = []
    if change == "flip_wheel_byte":
        files[wheel] = bytes([files[wheel][0] ^ 1]) + files[wheel][1:]
    elif change == "extra_wheel":
        files["wheels/evil-1.0-py3-none-any.whl"] = b"PK"
    elif change == "missing_wheel":
        del files[wheel]
    elif change == "requirements_hash":
        files["requirements.txt"] = f"qrgate==1.0.0 --hash=sha256:{'0' * 64}\n".encode()
    elif change == "requirements_junk":
        files["requirements.txt"] += b"--index-url http://evil.example/simple\n"
    elif change == "traversal":
        files["../escaped.whl"] = b"x"
    elif change == "absolute":
        files["/tmp/qrgate-absolute.whl"] = b"x"
    elif change == "symlink":
        extra.append(_symlink("wheels/link-1.0-py3-none-any.whl", "/etc/passwd"))
    elif change == "script":
        files["wheels/run.sh"] = b"#!/bin/sh\n"
    elif change == "duplicate":
        extra.append(("manifest.json", files["manifest.json"]))
    elif change == "no_manifest":
        del files["manifest.json"]
    elif change == "manifest_format":
        files["manifest.json"] = json.dumps({**manifest, "format": 2}).encode()
    elif change == "manifest_not_json":
        files["manifest.json"] = b"{not json"
    elif change == "manifest_bad_version":
        files["manifest.json"] = json.dumps({**manifest, "version": "../1"}).encode()
    elif change == "manifest_bad_hash":
        files["manifest.json"] = json.dumps(
            {**manifest, "wheels": dict.fromkeys(manifest["wheels"], "ab")}
        ).encode()
    bad = _tar(tmp_path / "bad.tar", [*files.items(), *extra])

    with pytest.raises(BundleError, match=message):
        open_bundle(bad, tmp_path / "x", max_bytes=CAP)

    assert not (tmp_path / "escaped.whl").exists()
    assert not Path("/tmp/qrgate-absolute.whl").exists()


def test_open_refuses_oversized_and_compressed_bundles(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path / "b", "1.0.0", wheel_bytes=100_000)
    with pytest.raises(BundleError, match="over the"):
        open_bundle(bundle, tmp_path / "x", max_bytes=bundle.stat().st_size - 1)
    assert not (tmp_path / "x").exists()

    # a member claiming more than the cap, in a file under it: refused before extraction
    huge = tarfile.TarInfo("wheels/qrgate-1.0.0-py3-none-any.whl")
    huge.size = 10**9
    (tmp_path / "sparse.tar").write_bytes(huge.tobuf())  # the header alone: no data follows
    with pytest.raises(BundleError, match="add up"):
        open_bundle(tmp_path / "sparse.tar", tmp_path / "y", max_bytes=10**6)
    assert list((tmp_path / "y").iterdir()) == []

    gz = tmp_path / "qrgate-1.0.0.tar.gz"
    with tarfile.open(gz, "w:gz") as tar:
        for name, body in _members(bundle):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    with pytest.raises(BundleError, match="cannot extract"):
        open_bundle(gz, tmp_path / "z", max_bytes=CAP)


def test_open_wants_an_empty_destination(tmp_path: Path) -> None:
    bundle = small_bundle(tmp_path / "b", "1.0.0")
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "left-over").write_text("x")
    with pytest.raises(BundleError, match="not empty"):
        open_bundle(bundle, tmp_path / "x", max_bytes=CAP)
