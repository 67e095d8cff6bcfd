"""ota.repository: the metadata it writes checked with python-tuf's own verification, key
files, publishing (custom fields, consistent-snapshot file names, version bumps, refusal
to change a published version), the timestamp refresh, and the ``qrgate ota`` commands."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from firmware.cli import main
from ota.exceptions import BundleError, RepositoryError
from ota.repository import (
    init_repository,
    metadata_dir,
    publish,
    refresh_timestamp,
    targets_dir,
    trusted_root,
)
from tests.ota.conftest import BUILD_NS, BundleFactory, small_bundle


def _md(repo: Path, name: str) -> Metadata:  # type: ignore[type-arg]
    return Metadata.from_file(str(metadata_dir(repo) / name))


def test_init_writes_a_root_with_offline_threshold_and_online_keys(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    path = init_repository(repo, keys, root_threshold=2, root_keys=3)

    assert path == metadata_dir(repo) / "1.root.json"
    assert trusted_root(repo) == path.read_bytes()
    root_md = _md(repo, "1.root.json")
    root = root_md.signed
    assert isinstance(root, Root)
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2
    assert len(root.roles["root"].keyids) == 3
    assert len(root_md.signatures) == 3
    root.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
    for role in ("targets", "snapshot", "timestamp"):
        assert len(root.roles[role].keyids) == 1
        assert not set(root.roles[role].keyids) & set(root.roles["root"].keyids)
        root.verify_delegate(role, *_signed(repo, role))

    offline = sorted(p.name for p in (keys / "offline").iterdir())
    online = sorted(p.name for p in (keys / "online").iterdir())
    assert offline == ["root-1.pem", "root-2.pem", "root-3.pem"]
    assert online == ["snapshot.pem", "targets.pem", "timestamp.pem"]
    for key in [*(keys / "offline").iterdir(), *(keys / "online").iterdir()]:
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")


def _signed(repo: Path, role: str) -> tuple[bytes, dict]:  # type: ignore[type-arg]
    name = "timestamp.json" if role == "timestamp" else _newest(repo, role)
    md = _md(repo, name)
    return md.signed_bytes, md.signatures


def _newest(repo: Path, role: str) -> str:
    versions = [int(p.name.split(".")[0]) for p in metadata_dir(repo).glob(f"*.{role}.json")]
    return f"{max(versions)}.{role}.json"


def test_a_second_init_replaces_nothing(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    before = {p: p.read_bytes() for p in [*keys.rglob("*.pem"), *repo.rglob("*.json")]}
    with pytest.raises(RepositoryError, match="not empty"):
        init_repository(repo, keys)
    with pytest.raises(RepositoryError, match="exists"):
        init_repository(tmp_path / "repo2", keys)
    with pytest.raises(RepositoryError, match="threshold"):
        init_repository(tmp_path / "repo3", tmp_path / "keys3", root_threshold=4, root_keys=3)
    assert {p: p.read_bytes() for p in before} == before


def test_publish_a_real_bundle(tmp_path: Path, native_bundle_factory: BundleFactory) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    bundle = native_bundle_factory("1.4.0", min_version="1.2.0", build_time_ns=BUILD_NS)
    digest = hashlib.sha256(bundle.read_bytes()).hexdigest()

    info = publish(repo, keys, bundle)

    assert info.path == "qrgate-1.4.0.tar"
    assert info.length == bundle.stat().st_size
    assert info.hashes == {"sha256": digest}
    python = f"cp3{__import__('sys').version_info.minor}"
    assert info.custom == {
        "version": "1.4.0",
        "device_types": ["rpi4", "rpi5"],
        "min_version": "1.2.0",
        "build_time_ns": BUILD_NS,
        "python": python,
        "platform": f"linux_{os.uname().machine}",
    }
    served = targets_dir(repo) / f"{digest}.qrgate-1.4.0.tar"
    assert served.read_bytes() == bundle.read_bytes()
    targets = _md(repo, "2.targets.json").signed
    assert isinstance(targets, Targets)
    assert targets.targets["qrgate-1.4.0.tar"] == info


def test_publish_bumps_targets_snapshot_and_timestamp_consistently(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    publish(repo, keys, small_bundle(tmp_path / "b", "1.0.0"))
    publish(repo, keys, small_bundle(tmp_path / "b", "1.1.0"))

    assert _newest(repo, "targets") == "3.targets.json"
    targets = _md(repo, "3.targets.json").signed
    assert isinstance(targets, Targets)
    assert sorted(targets.targets) == ["qrgate-1.0.0.tar", "qrgate-1.1.0.tar"]
    snapshot = _md(repo, "3.snapshot.json").signed
    assert isinstance(snapshot, Snapshot)
    assert snapshot.meta["targets.json"].version == 3
    timestamp = _md(repo, "timestamp.json").signed
    assert isinstance(timestamp, Timestamp)
    assert timestamp.version == 3
    snap_bytes = (metadata_dir(repo) / "3.snapshot.json").read_bytes()
    assert timestamp.snapshot_meta.version == 3
    assert timestamp.snapshot_meta.length == len(snap_bytes)
    assert timestamp.snapshot_meta.hashes == {"sha256": hashlib.sha256(snap_bytes).hexdigest()}


def test_a_published_version_never_changes_its_bytes(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    first = small_bundle(tmp_path / "a", "1.0.0")
    publish(repo, keys, first)
    publish(repo, keys, first)  # the same bytes again: only re-signed
    assert _newest(repo, "targets") == "3.targets.json"

    other = small_bundle(tmp_path / "b", "1.0.0", wheel_bytes=1000)
    with pytest.raises(RepositoryError, match="other contents"):
        publish(repo, keys, other)
    assert _newest(repo, "targets") == "3.targets.json"
    assert len(list(targets_dir(repo).iterdir())) == 1


def test_publish_refuses_a_broken_bundle(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    bad = tmp_path / "qrgate-1.0.0.tar"
    bad.write_bytes(b"not a tar" * 100)
    with pytest.raises(BundleError):
        publish(repo, keys, bad)
    assert _newest(repo, "targets") == "1.targets.json"
    assert list(targets_dir(repo).iterdir()) == []


def test_timestamp_refresh_needs_only_the_snapshot_and_timestamp_keys(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    (keys / "online" / "targets.pem").unlink()  # the server holds only the two online keys
    for offline in (keys / "offline").iterdir():
        offline.unlink()

    assert refresh_timestamp(repo, keys) == 2
    assert refresh_timestamp(repo, keys) == 3
    assert _newest(repo, "snapshot") == "3.snapshot.json"
    with pytest.raises(RepositoryError, match=r"targets\.pem"):
        publish(repo, keys, small_bundle(tmp_path / "b", "1.0.0"))


def test_a_key_of_another_repository_is_refused(tmp_path: Path) -> None:
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    init_repository(tmp_path / "other", tmp_path / "other-keys")
    (keys / "online" / "timestamp.pem").write_bytes(
        (tmp_path / "other-keys" / "online" / "timestamp.pem").read_bytes()
    )
    before = (metadata_dir(repo) / "timestamp.json").read_bytes()
    with pytest.raises(RepositoryError, match="not a timestamp key"):
        refresh_timestamp(repo, keys)
    assert (metadata_dir(repo) / "timestamp.json").read_bytes() == before


def test_ota_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    res = runner.invoke(
        main, ["ota", "init", "--repo", str(repo), "--keys", str(keys), "--threshold", "1"]
    )
    assert res.exit_code == 0, res.output
    assert "1.root.json" in res.output
    root = json.loads((metadata_dir(repo) / "1.root.json").read_text())
    assert root["signed"]["roles"]["root"]["threshold"] == 1

    bundle = small_bundle(tmp_path / "b", "1.0.0")
    res = runner.invoke(
        main, ["ota", "publish", str(bundle), "--repo", str(repo), "--keys", str(keys)]
    )
    assert res.exit_code == 0, res.output
    assert "published qrgate-1.0.0.tar" in res.output

    res = runner.invoke(main, ["ota", "timestamp", "--repo", str(repo), "--keys", str(keys)])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == "timestamp version 3"

    res = runner.invoke(main, ["ota", "init", "--repo", str(repo), "--keys", str(keys)])
    assert res.exit_code == 1
    assert "not empty" in res.output


def test_ota_rotate_root_and_build_commands(tmp_path: Path) -> None:
    runner = CliRunner()
    repo, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(repo, keys)
    res = runner.invoke(
        main,
        ["ota", "rotate-root", "--repo", str(repo), "--keys", str(keys), "--replace", "targets"],
    )
    assert res.exit_code == 0, res.output
    root = json.loads((metadata_dir(repo) / "2.root.json").read_text())["signed"]
    assert root["version"] == 2
    assert _newest(repo, "targets") == "2.targets.json"
    assert len(list((keys / "online").glob("targets.pem.retired-1"))) == 1

    res = runner.invoke(
        main,
        ["ota", "build", "--source", str(tmp_path), "--out", str(tmp_path / "dist")],
    )
    assert res.exit_code == 1
    assert "cannot read" in res.output
    assert "firmware/__init__.py" in res.output
