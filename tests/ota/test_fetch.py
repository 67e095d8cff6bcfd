"""ota.fetch against a real TUF repository (ota.repository) served over loopback HTTP: a
good fetch of a real bundle, tampered and oversized targets, expired, replayed and forged
metadata, a connection cut mid-file (the download resumes with Range), unknown versions;
and the pure pre-download checks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Timestamp

from ota.bundle import open_bundle
from ota.exceptions import (
    ClockNotReadyError,
    DownloadFailedError,
    MetadataExpiredError,
    MetadataRejectedError,
    RejectedError,
    RepositoryError,
    TamperedError,
    TargetUnknownError,
)
from ota.fetch import Fetcher, Target, check_clock, check_space, check_target, free_bytes
from ota.repository import (
    init_repository,
    load_signer,
    metadata_dir,
    publish,
    refresh_timestamp,
    rotate_root,
    targets_dir,
    trusted_root,
)
from tests.firmware.conftest import no_leaks
from tests.ota.conftest import BUILD_NS, BundleFactory, small_bundle
from tests.ota.repo_server import RepoServer

__all__ = ["no_leaks"]  # a fixture: every test here must leave no server thread behind

pytestmark = pytest.mark.usefixtures("no_leaks")

SMALL = 3 * 1024 * 1024 + 17  # bytes of the small bundles' wheel: several download chunks


@dataclass
class Repo:
    root: Path
    keys: Path
    server: RepoServer
    tmp: Path

    def fetcher(self, name: str = "reader", **kwargs: object) -> Fetcher:
        """A reader's Fetcher with its own metadata and cache folders under ``tmp/name``."""
        return Fetcher(
            self.tmp / name / "metadata",
            self.tmp / name / "cache",
            self.server.url,
            trusted_root(self.root),
            **kwargs,  # type: ignore[arg-type]
        )

    def publish_small(self, version: str, **kwargs: object) -> Path:
        bundle = small_bundle(self.tmp / "bundles", version, wheel_bytes=SMALL, **kwargs)  # type: ignore[arg-type]
        publish(self.root, self.keys, bundle)
        return bundle

    def served_file(self, version: str) -> Path:
        (path,) = targets_dir(self.root).glob(f"*.qrgate-{version}.tar")
        return path


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[Repo]:
    root, keys = tmp_path / "repo", tmp_path / "keys"
    init_repository(root, keys)
    with RepoServer(root) as server:
        yield Repo(root, keys, server, tmp_path)


def test_fetches_a_real_bundle_verified_by_tuf(
    repo: Repo, native_bundle_factory: BundleFactory
) -> None:
    bundle = native_bundle_factory("1.4.0", min_version="1.2.0", build_time_ns=BUILD_NS)
    publish(repo.root, repo.keys, bundle)
    fetcher = repo.fetcher()

    target = fetcher.refresh_and_find("1.4.0")
    assert target.name == "qrgate-1.4.0.tar"
    assert target.length == bundle.stat().st_size
    assert (target.min_version, target.build_time_ns) == ("1.2.0", BUILD_NS)
    assert target.device_types == ("rpi4", "rpi5")

    seen: list[tuple[int, int]] = []
    path = fetcher.fetch(target, lambda done, total: seen.append((done, total)))
    assert path == fetcher.bundle_path(target)
    assert path.read_bytes() == bundle.read_bytes()
    assert seen[-1] == (target.length, target.length)
    manifest = open_bundle(path, repo.tmp / "opened", max_bytes=1 << 30)
    assert manifest.version == "1.4.0"
    # a second fetch finds the verified file in the cache and downloads nothing
    requests = len(repo.server.faults.requests)
    assert fetcher.fetch(target) == path
    assert len(repo.server.faults.requests) == requests


def test_download_resumes_after_the_connection_drops_mid_file(repo: Repo) -> None:
    bundle = repo.publish_small("2.0.0")
    repo.server.faults.drop_targets_after = 1_000_003
    repo.server.faults.drops_left = 1
    fetcher = repo.fetcher()
    target = fetcher.refresh_and_find("2.0.0")

    path = fetcher.fetch(target)

    assert path.read_bytes() == bundle.read_bytes()
    starts = [start for p, start in repo.server.faults.requests if p.startswith("/targets/")]
    assert starts == [None, 1_000_003]


def test_a_restarted_reader_resumes_the_partial_file(repo: Repo) -> None:
    bundle = repo.publish_small("2.0.0")
    repo.server.faults.drop_targets_after = 2_000_000
    repo.server.faults.drops_left = 10  # every attempt of the first fetch is cut
    first = repo.fetcher(download=_one_attempt)
    target = first.refresh_and_find("2.0.0")
    with pytest.raises(DownloadFailedError):
        first.fetch(target)
    repo.server.faults.drops_left = 0

    again = repo.fetcher()  # same folders: a new process after a restart
    path = again.fetch(target)  # refreshes the metadata itself

    assert path.read_bytes() == bundle.read_bytes()
    starts = [start for p, start in repo.server.faults.requests if p.startswith("/targets/")]
    assert starts == [None, 2_000_000]


def _one_attempt(url: str, dest: Path, **kwargs: object) -> Path:
    from ota.download import download

    return download(url, dest, attempts=1, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", ["flip_byte", "append"])
def test_a_tampered_bundle_on_the_server_is_rejected(repo: Repo, change: str) -> None:
    repo.publish_small("2.0.0")
    served = repo.served_file("2.0.0")
    data = bytearray(served.read_bytes())
    if change == "flip_byte":  # same length, other bytes
        data[len(data) // 2] ^= 0x01
    else:  # longer than signed: the server's Content-Length gives it away
        data += b"\x00" * 4096
    served.write_bytes(bytes(data))
    fetcher = repo.fetcher()
    target = fetcher.refresh_and_find("2.0.0")

    with pytest.raises(TamperedError) as e:
        fetcher.fetch(target)

    assert e.value.reason == "tampered"
    assert sorted(p.name for p in fetcher.cache_dir.iterdir()) == []


def test_a_bundle_over_the_cap_is_refused_before_download(repo: Repo) -> None:
    repo.publish_small("2.0.0")
    fetcher = repo.fetcher(max_bundle_bytes=SMALL)  # the tar is a little larger
    target = fetcher.refresh_and_find("2.0.0")
    with pytest.raises(RejectedError) as e:
        fetcher.fetch(target)
    assert e.value.reason == "bundle_too_large"
    assert not [p for p, _ in repo.server.faults.requests if p.startswith("/targets/")]


def test_expired_timestamp_is_rejected(repo: Repo) -> None:
    repo.publish_small("2.0.0")
    refresh_timestamp(repo.root, repo.keys, now=lambda: datetime.now(UTC) - timedelta(days=2))
    with pytest.raises(MetadataExpiredError) as e:
        repo.fetcher().refresh_and_find("2.0.0")
    assert e.value.reason == "metadata_expired"


def test_an_older_timestamp_served_after_a_newer_one_is_rejected(repo: Repo) -> None:
    repo.publish_small("2.0.0")
    ts = metadata_dir(repo.root) / "timestamp.json"
    old = ts.read_bytes()
    refresh_timestamp(repo.root, repo.keys)
    fetcher = repo.fetcher()
    fetcher.refresh_and_find("2.0.0")  # the reader now trusts the newer timestamp

    ts.write_bytes(old)  # an attacker (or a stale mirror) replays the older one
    with pytest.raises(MetadataRejectedError) as e:
        fetcher.refresh_and_find("2.0.0")
    assert e.value.reason == "metadata_rejected"
    assert "BadVersionNumber" in str(e.value)


def test_metadata_signed_by_another_key_is_rejected(repo: Repo, tmp_path: Path) -> None:
    repo.publish_small("2.0.0")
    other_root, other_keys = tmp_path / "other", tmp_path / "other-keys"
    init_repository(other_root, other_keys)
    # the attacker's timestamp, well formed and newer, signed with a key root does not name
    refresh_timestamp(other_root, other_keys)
    refresh_timestamp(other_root, other_keys)
    shutil.copyfile(
        metadata_dir(other_root) / "timestamp.json", metadata_dir(repo.root) / "timestamp.json"
    )
    with pytest.raises(MetadataRejectedError):
        repo.fetcher().refresh_and_find("2.0.0")


def test_a_reader_trusting_another_root_rejects_the_repository(repo: Repo, tmp_path: Path) -> None:
    repo.publish_small("2.0.0")
    init_repository(tmp_path / "other", tmp_path / "other-keys")
    fetcher = Fetcher(
        tmp_path / "r" / "metadata",
        tmp_path / "r" / "cache",
        repo.server.url,
        trusted_root(tmp_path / "other"),
    )
    with pytest.raises(MetadataRejectedError):
        fetcher.refresh_and_find("2.0.0")


def test_an_unknown_version_is_reported(repo: Repo) -> None:
    repo.publish_small("2.0.0")
    with pytest.raises(TargetUnknownError) as e:
        repo.fetcher().refresh_and_find("2.0.1")
    assert e.value.reason == "target_unknown"


def test_an_unreachable_repository_is_a_download_failure(repo: Repo, tmp_path: Path) -> None:
    fetcher = Fetcher(
        tmp_path / "r" / "metadata",
        tmp_path / "r" / "cache",
        repo.server.url + "nothing-here/",
        trusted_root(repo.root),
    )
    with pytest.raises(DownloadFailedError) as e:
        fetcher.refresh_and_find("2.0.0")
    assert e.value.reason == "metadata_unreachable"


TARGET = Target(
    name="qrgate-2.1.0.tar",
    version="2.1.0",
    length=50_000_000,
    sha256="ab" * 32,
    device_types=("rpi4", "rpi5"),
    min_version="1.5.0",
    build_time_ns=1_790_000_000 * 10**9,
    python="cp311",
    platform="linux_aarch64",
)


@pytest.mark.parametrize(
    ("target", "running", "device_type", "python", "allow_downgrade", "reason"),
    [
        (TARGET, "2.0.0", "rpi4", "cp312", False, "python_mismatch"),
        (
            replace(TARGET, platform="linux_x86_64"),
            "2.0.0",
            "rpi4",
            "cp311",
            False,
            "wrong_platform",
        ),
        (TARGET, "2.0.0", "rpi3", "cp311", False, "wrong_device_type"),
        (TARGET, "2.1.0", "rpi5", "cp311", False, "same_version"),
        (TARGET, "2.1.0", "rpi5", "cp311", True, "same_version"),
        (TARGET, "2.2.0", "rpi5", "cp311", False, "downgrade"),
        (TARGET, "2.1.0rc1", "rpi5", "cp311", True, "ok"),  # rc before the final
        (TARGET, "2.1.0", "rpi5", "cp311", False, "same_version"),
        (TARGET, "1.4.9", "rpi4", "cp311", False, "below_min_version"),
        (TARGET, "1.5.0", "rpi4", "cp311", False, "ok"),
        (replace(TARGET, version="1.0.0", min_version=None), "2.0.0", "rpi4", "cp311", True, "ok"),
    ],
)
def test_check_target(  # noqa: PLR0917 - one argument per parametrized column
    target: Target,
    running: str,
    device_type: str,
    python: str,
    allow_downgrade: bool,
    reason: str,
) -> None:
    def check() -> None:
        check_target(
            target,
            running=running,
            device_type=device_type,
            python=python,
            platform="linux_aarch64",
            allow_downgrade=allow_downgrade,
        )

    if reason == "ok":
        check()
    else:
        with pytest.raises(RejectedError) as e:
            check()
        assert e.value.reason == reason


def test_check_clock() -> None:
    build = TARGET.build_time_ns
    check_clock(build, build, synced=True)
    with pytest.raises(ClockNotReadyError) as e:
        check_clock(build, build + 10**9, synced=False)
    assert e.value.reason == "clock_unsynced"
    with pytest.raises(ClockNotReadyError) as e:
        check_clock(build, build - 1, synced=True)
    assert e.value.reason == "clock_behind_build"


def test_check_space_wants_twice_the_bundle() -> None:
    check_space(100_000_000, 50_000_000)
    with pytest.raises(RejectedError) as e:
        check_space(99_999_999, 50_000_000)
    assert e.value.reason == "insufficient_disk"


def test_readers_follow_a_root_rotation_and_drop_the_old_keys(repo: Repo) -> None:
    repo.publish_small("2.0.0")
    reader = repo.fetcher()
    reader.refresh_and_find("2.0.0")  # trusts root 1 and its timestamp key

    rotate_root(repo.root, repo.keys, replace=["root", "timestamp"])
    rotate_root(repo.root, repo.keys)  # root 3: a plain renewal with the new root keys

    again = repo.fetcher()  # same folders: a restarted reader
    assert again.refresh_and_find("2.0.0").version == "2.0.0"
    assert (repo.tmp / "reader" / "metadata" / "root_history" / "3.root.json").exists()
    fresh = repo.fetcher("new-reader")  # a reader shipped with root 1 walks 2 and 3
    assert fresh.refresh_and_find("2.0.0").version == "2.0.0"

    # a timestamp signed with the retired key, newer than the served one: refused
    (retired,) = (repo.keys / "online").glob("timestamp.pem.retired-*")
    ts = metadata_dir(repo.root) / "timestamp.json"
    md = Metadata[Timestamp].from_bytes(ts.read_bytes())
    md.signed.version += 1
    md.sign(load_signer(retired))
    ts.write_bytes(md.to_bytes())
    with pytest.raises(MetadataRejectedError):
        repo.fetcher().refresh_and_find("2.0.0")


def test_root_rotation_needs_the_threshold_of_offline_keys(repo: Repo) -> None:
    for key in sorted((repo.keys / "offline").iterdir())[1:]:
        key.unlink()  # one of three left; the threshold is two
    with pytest.raises(RepositoryError, match="2 are needed"):
        rotate_root(repo.root, repo.keys, replace=["timestamp"])
    assert not (metadata_dir(repo.root) / "2.root.json").exists()
    assert sorted(p.name for p in (repo.keys / "online").iterdir()) == [
        "snapshot.pem",
        "targets.pem",
        "timestamp.pem",
    ]


def test_free_bytes_is_what_statvfs_gives_users(tmp_path: Path) -> None:
    usage = shutil.disk_usage(tmp_path)
    free = free_bytes(tmp_path)
    assert 0 < free <= usage.total
    # other processes write to this disk meanwhile: the two looks agree within 1 GiB
    assert abs(free - usage.free) < 1 << 30


def test_a_damaged_trusted_root_is_a_metadata_rejection(repo: Repo, tmp_path: Path) -> None:
    fetcher = Fetcher(tmp_path / "r" / "md", tmp_path / "r" / "cache", repo.server.url, b"{}")
    with pytest.raises(MetadataRejectedError, match="DeserializationError"):
        fetcher.refresh_and_find("2.0.0")
