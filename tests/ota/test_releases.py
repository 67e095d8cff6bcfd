"""Release folders and the atomic ``current``/``previous`` links."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ota.exceptions import OtaError, ReleaseError
from ota.releases import STAMP, Releases, check_version, version_key


def install(root: Path, *versions: str) -> Releases:
    """Complete release folders holding a marker file named after their version."""
    for v in versions:
        folder = root / "releases" / v
        folder.mkdir(parents=True)
        (folder / "VERSION").write_text(v)
        (folder / STAMP).write_text(f"{v}\n")
    return Releases(root)


def test_switch_points_current_and_previous(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "1.1")
    assert rel.current_version() is None
    assert rel.previous_version() is None
    rel.switch("1.0")
    assert os.readlink(tmp_path / "current") == "releases/1.0"
    assert not (tmp_path / "previous").is_symlink()
    assert (tmp_path / "current" / "VERSION").read_text() == "1.0"
    rel.switch("1.1")
    assert os.readlink(tmp_path / "current") == "releases/1.1"
    assert os.readlink(tmp_path / "previous") == "releases/1.0"
    assert (rel.current_version(), rel.previous_version()) == ("1.1", "1.0")
    rel.switch("1.1")  # switching to the running release keeps previous
    assert (rel.current_version(), rel.previous_version()) == ("1.1", "1.0")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "previous", "releases"]


def test_rollback(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "2.0")
    rel.switch("1.0")
    with pytest.raises(ReleaseError, match="no previous release"):
        rel.rollback()
    rel.switch("2.0")
    assert rel.rollback() == "1.0"
    assert os.readlink(tmp_path / "current") == "releases/1.0"
    assert not (tmp_path / "previous").is_symlink()
    with pytest.raises(ReleaseError, match="no previous release"):
        rel.rollback()
    assert rel.current_version() == "1.0"


def test_rollback_to_a_removed_folder_is_refused(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "2.0")
    rel.switch("1.0")
    rel.switch("2.0")
    shutil.rmtree(tmp_path / "releases" / "1.0")
    with pytest.raises(ReleaseError, match=r"release 1\.0 is not installed"):
        rel.rollback()
    assert rel.current_version() == "2.0"


def test_list_sorts_by_version_and_skips_others(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.10", "1.9", "2.0rc1", "2.0", "2.0a3", "2.0b1")
    (tmp_path / "releases" / ".trash-1.0-abcd").mkdir()
    (tmp_path / "releases" / "notes.txt").write_text("x")
    (tmp_path / "releases" / "3.0").write_text("a file, not a release")
    (tmp_path / "releases" / "4.0").symlink_to(tmp_path / "releases" / "2.0")
    assert rel.list() == ["1.9", "1.10", "2.0a3", "2.0b1", "2.0rc1", "2.0"]
    assert Releases(tmp_path / "nowhere").list() == []


def test_prune_keeps_newest_current_and_previous(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "1.1", "1.2", "1.3", "1.4", "1.5")
    rel.switch("1.1")
    rel.switch("1.0")  # current 1.0, previous 1.1: both old, both kept
    (tmp_path / ".tmp-current-deadbeef").symlink_to("releases/1.5")  # left by a kill
    (tmp_path / "releases" / ".trash-1.2-0000").mkdir()
    assert rel.prune(keep=2) == ["1.2", "1.3"]
    assert rel.list() == ["1.0", "1.1", "1.4", "1.5"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "previous", "releases"]
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == [
        "1.0",
        "1.1",
        "1.4",
        "1.5",
    ]
    assert rel.prune(keep=1) == ["1.4"]
    assert rel.list() == ["1.0", "1.1", "1.5"]
    with pytest.raises(ReleaseError, match="keep must be at least 1"):
        rel.prune(keep=0)


BAD_VERSIONS = [
    "",
    "..",
    "../etc",
    "1.0/../..",
    "/1.0",
    "1.0/",
    ".1",
    "1.",
    "1..2",
    "1.0 ",
    "1.0\n",
    "v1.0",
    "1.0-rc1",
    "1.0c1",
    "1.2.3.4.5",
    "1" * 33,
    "１.０",
]


@pytest.mark.parametrize("version", BAD_VERSIONS)
def test_bad_versions_refused(tmp_path: Path, version: str) -> None:
    rel = install(tmp_path, "1.0")
    rel.switch("1.0")
    with pytest.raises(ReleaseError, match="is not a release version"):
        rel.switch(version)
    with pytest.raises(ReleaseError, match="is not a release version"):
        rel.path(version)
    assert os.readlink(tmp_path / "current") == "releases/1.0"


def test_good_versions_and_order() -> None:
    good = ["0", "1.0", "1.2.3", "1.2.3.4", "2.0a1", "2.0b2", "2.0rc10", "10.0"]
    assert [check_version(v) for v in good] == good
    assert sorted(["2.0", "2.0rc1", "1.10", "1.9.9", "2.0a1"], key=version_key) == [
        "1.9.9",
        "1.10",
        "2.0a1",
        "2.0rc1",
        "2.0",
    ]
    assert version_key("1.0") == version_key("1.0.0")


def test_switch_refuses_missing_and_fake_releases(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0")
    rel.switch("1.0")
    with pytest.raises(ReleaseError, match=r"release 9\.9 is not installed"):
        rel.switch("9.9")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "releases" / "2.0").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ReleaseError, match="not a real folder"):
        rel.switch("2.0")
    assert rel.current_version() == "1.0"
    assert issubclass(ReleaseError, OtaError)


def test_foreign_links_are_reported(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0")
    (tmp_path / "current").symlink_to("/usr")
    with pytest.raises(ReleaseError, match="outside releases/"):
        rel.current_version()
    (tmp_path / "current").unlink()
    (tmp_path / "current").symlink_to("releases/..")
    with pytest.raises(ReleaseError, match="is not a release version"):
        rel.current_version()
    (tmp_path / "current").unlink()
    (tmp_path / "current").mkdir()
    with pytest.raises(ReleaseError, match="is not a symlink"):
        rel.current_version()


SWITCHER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from ota.releases import Releases

    rel = Releases(Path(sys.argv[1]))
    versions = sys.argv[2:]
    rel.switch(versions[0])
    print("ready", flush=True)
    while True:
        for v in versions:
            rel.switch(v)
        rel.rollback()
    """
)


def test_kill_9_during_switch_leaves_a_working_current(tmp_path: Path) -> None:
    versions = ["1.0", "1.1", "1.2"]
    rel = install(tmp_path, *versions)
    rel.switch("1.0")
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    seen = set()
    for _ in range(20):
        proc = subprocess.Popen(
            [sys.executable, "-c", SWITCHER, str(tmp_path), *versions],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"  # blocks until it is switching
        # the kill lands at an arbitrary point of the loop; no assertion depends on timing
        time.sleep(rng.uniform(0, 0.02))
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        proc.stdout.close()
        target = os.readlink(tmp_path / "current")
        assert target in {f"releases/{v}" for v in versions}
        current = rel.current_version()
        assert current is not None
        seen.add(current)
        assert (tmp_path / "current" / "VERSION").read_text() == current
        previous = rel.previous_version()
        if previous is not None:
            assert (tmp_path / "previous" / "VERSION").read_text() == previous
    # leftover temp links of killed runs are swept, the releases stay
    assert rel.prune(keep=3) == []
    assert sorted(p.name for p in tmp_path.iterdir()) in (
        ["current", "previous", "releases"],
        ["current", "releases"],
    )
    assert rel.list() == versions
    assert seen <= set(versions)


def test_switch_refuses_an_unstamped_release(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0")
    rel.switch("1.0")
    half = tmp_path / "releases" / "2.0"
    half.mkdir()
    with pytest.raises(ReleaseError, match=r"release 2\.0 is incomplete"):
        rel.switch("2.0")
    (half / STAMP).write_text("1.0\n")  # a stamp naming another version is not this one's
    with pytest.raises(ReleaseError, match="incomplete"):
        rel.switch("2.0")
    (half / STAMP).unlink()
    (half / STAMP).symlink_to(tmp_path / "releases" / "1.0" / STAMP)
    with pytest.raises(ReleaseError, match="incomplete"):
        rel.switch("2.0")
    (half / STAMP).unlink()
    rel.complete("2.0")
    assert (half / STAMP).read_text() == "2.0\n"
    rel.switch("2.0")
    assert rel.current_version() == "2.0"


def test_sweep_incomplete_spares_complete_current_and_previous(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "1.1", "1.2")
    rel.switch("1.0")
    rel.switch("1.1")
    # previous and current lose their stamps (a release made by hand): still never removed
    (tmp_path / "releases" / "1.0" / STAMP).unlink()
    (tmp_path / "releases" / "1.1" / STAMP).unlink()
    (tmp_path / "releases" / "2.0").mkdir()  # a killed install
    (tmp_path / "releases" / "2.0" / "bin").mkdir()
    (tmp_path / "releases" / ".staging-abc" / "wheels").mkdir(parents=True)
    assert rel.sweep_incomplete() == ["2.0"]
    assert sorted(p.name for p in (tmp_path / "releases").iterdir()) == ["1.0", "1.1", "1.2"]
    assert rel.sweep_incomplete() == []
    assert Releases(tmp_path / "nothing").sweep_incomplete() == []


def test_discard_refuses_current_and_previous(tmp_path: Path) -> None:
    rel = install(tmp_path, "1.0", "1.1", "1.2")
    rel.switch("1.0")
    rel.switch("1.1")
    for v in ("1.0", "1.1"):
        with pytest.raises(ReleaseError, match="current or previous"):
            rel.discard(v)
    rel.discard("1.2")
    rel.discard("1.2")  # gone already: nothing to do
    assert rel.list() == ["1.0", "1.1"]
