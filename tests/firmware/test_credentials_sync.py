"""Credential snapshots delivered to running readers: retained MQTT messages on the reader's
and the site's topic (a real mosquitto), URL pointers served by http.server on 127.0.0.1, the
outcome in the retained status, and a slow apply that holds up neither keepalives, commands
nor scans (field case C17)."""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.frames import GrayImage
from firmware.admin.credentials import credentials as credentials_cli
from firmware.config import Config, load_config
from firmware.decoding.corpus import load_gray
from firmware.demo.broker import LocalBroker
from firmware.exceptions import SnapshotError
from firmware.policy.credentials import CredentialSet
from firmware.policy.keys import save_public_key
from firmware.policy.snapshot import SnapshotStore, why_of
from firmware.policy.verdict import Reason
from firmware.uplink.credentials import (
    CredentialSync,
    FetchOptions,
    fetch_snapshot,
    parse_pointer,
)
from firmware.uplink.topics import Topics
from tests.firmware.readers import HASHER, write_reader_config
from tests.firmware.test_snapshot import ALICE, OTHER, PUB, SIGNER, cti, full_doc, signed
from tests.firmware.test_uplink import (
    DEVICE,
    HELD,
    SITE,
    WAIT_S,
    BackOffice,
    Running,
    back_office,
    running,
    uplink_toml,
)
from tests.polling import wait_until
from tests.shared import case_file

pytestmark = pytest.mark.usefixtures("no_leaks")
TOPICS = Topics(SITE, DEVICE)


def doc(version: int, **over: Any) -> dict[str, Any]:
    return full_doc(version, site=SITE, **over)


def denying(version: int, *payloads: bytes) -> bytes:
    """A snapshot of ``version`` whose badge denylist holds ``payloads``."""
    return signed(doc(version, badges={"deny": [HASHER.subject(p) for p in payloads]}))


def sync_config(folder: Path, port: int, *, keepalive_s: int = 5, key: bool = True) -> Config:
    """A reader allowing HELD and ALICE from its local badge list, taking snapshots signed by
    SIGNER (``key``), its uplink on the test broker."""
    folder.mkdir(parents=True, exist_ok=True)
    f = write_reader_config(
        folder,
        allow=[HELD, ALICE],
        repeat_window_s=0.5,
        extra=uplink_toml(port, keepalive_s=keepalive_s),
    )
    if key:
        save_public_key(folder / "snapshot.pub", SIGNER)
        text = f.read_text().replace("[policy]\n", '[policy]\nsnapshot_key = "snapshot.pub"\n', 1)
        f.write_text(text)
    return load_config(f)


def reason(r: Running, payload: bytes) -> Reason:
    """What the running reader's policy answers for ``payload`` now."""
    return Reason(r.reader.scan.policy.check(payload, time.time_ns())[1].reason)


def creds(bo: BackOffice) -> dict[str, Any]:
    raw = bo.latest.get(TOPICS.status)
    return (json.loads(raw).get("credentials") or {}) if raw is not None else {}


def source_state(bo: BackOffice, label: str) -> dict[str, Any]:
    return dict(creds(bo).get("sources", {}).get(label, {}))


def retain(bo: BackOffice, topic: str, payload: bytes) -> None:
    bo.paho.publish(topic, payload, qos=1, retain=True).wait_for_publish(WAIT_S)


@pytest.fixture(scope="module")
def held() -> GrayImage:
    return load_gray(case_file("B06.png"))


# --- over a real mosquitto ------------------------------------------------------------------------


@pytest.mark.usefixtures("need_mosquitto")
def test_retained_snapshot_is_applied_refusals_are_reported_and_it_survives_a_restart(
    tmp_path: Path, stack: ExitStack
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = sync_config(tmp_path / "r", broker.port)
    # published while the reader is away: retained, so it arrives when the reader connects
    retain(bo, TOPICS.credentials_snapshot, denying(3, ALICE))
    r = running(stack, cfg)
    assert bo.wait(lambda: creds(bo).get("version") == 3), creds(bo)
    assert reason(r, ALICE) is Reason.REVOKED
    assert reason(r, HELD) is Reason.UNKNOWN  # a snapshot is whole: the local list is gone
    status = creds(bo)
    assert status["source"] == "device" and status["refused"] is None
    assert status["counts"]["badges_denied"] == 1 and status["counts"]["revoked_passes"] == 3
    assert source_state(bo, "device") == {"version": 3, "state": "applied"}
    # signed by another key: refused, the reader keeps version 3 and says why
    retain(bo, TOPICS.credentials_snapshot, signed(doc(4), OTHER))
    assert bo.wait(lambda: source_state(bo, "device").get("state") == "refused"), creds(bo)
    status = creds(bo)
    assert status["version"] == 3 and status["refused"]["why"] == "bad_signature"
    assert "signed by key" in status["refused"]["reason"]
    assert reason(r, ALICE) is Reason.REVOKED
    # an older one on the same topic: refused as older
    retain(bo, TOPICS.credentials_snapshot, denying(2))
    assert bo.wait(lambda: (creds(bo)["refused"] or {}).get("why") == "older"), creds(bo)
    assert creds(bo)["refused"]["reason"] == "older: version 2, version 3 is in force"
    assert reason(r, ALICE) is Reason.REVOKED
    # a reload of the local badge list cannot undo the snapshot's revocation
    bo.command(DEVICE, "reload_config", "reload-1")
    result = bo.result("reload-1")
    assert not result["ok"] and "snapshot version 3 is in force" in result["error"]
    r.stop()
    broker.stop()
    again = running(stack, cfg)  # no broker: the kept snapshot alone
    assert again.reader.scan.policy.credentials.version == 3
    assert reason(again, ALICE) is Reason.REVOKED


@pytest.mark.usefixtures("need_mosquitto")
def test_the_site_wide_topic_and_the_higher_version_wins(tmp_path: Path, stack: ExitStack) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    cfg = sync_config(tmp_path / "r", broker.port)
    retain(bo, TOPICS.site_credentials_snapshot, denying(3))
    retain(bo, TOPICS.credentials_snapshot, denying(5, ALICE))
    r = running(stack, cfg)
    assert bo.wait(lambda: creds(bo).get("version") == 5), creds(bo)
    assert reason(r, ALICE) is Reason.REVOKED and creds(bo)["refused"] is None
    # below the version in force, and it came by the other topic: superseded, not refused
    retain(bo, TOPICS.site_credentials_snapshot, denying(4))
    assert bo.wait(lambda: source_state(bo, "site") == {"version": 4, "state": "superseded"})
    assert creds(bo)["refused"] is None and creds(bo)["version"] == 5
    # a higher site-wide version takes over
    retain(bo, TOPICS.site_credentials_snapshot, denying(7, HELD))
    assert bo.wait(lambda: creds(bo).get("version") == 7), creds(bo)
    assert creds(bo)["source"] == "site"
    assert (reason(r, ALICE), reason(r, HELD)) == (Reason.UNKNOWN, Reason.REVOKED)
    # a delta over it, on the reader's own topic
    delta = {
        "delta": True,
        "base": 7,
        "version": 8,
        "issued_at": 8,
        "add": {"badges": {"allow": [HASHER.subject(ALICE)]}, "deny": {"cti": [cti("x", 1)]}},
    }
    retain(bo, TOPICS.credentials_snapshot, signed(delta))
    assert bo.wait(lambda: creds(bo).get("version") == 8), creds(bo)
    assert creds(bo)["deltas"] == 1 and creds(bo)["counts"]["revoked_passes"] == 4
    assert (reason(r, ALICE), reason(r, HELD)) == (Reason.GRANTED, Reason.REVOKED)
    # a delta for a base this reader does not hold is refused with what to do
    retain(bo, TOPICS.credentials_snapshot, signed({**delta, "base": 6, "version": 9}))
    assert bo.wait(lambda: source_state(bo, "device").get("state") == "refused")
    assert creds(bo)["refused"]["reason"] == (
        "delta for base 6, version in force is 8: publish a full snapshot"
    )


class Files:
    """An http.server on 127.0.0.1 serving ``files`` by name, counting requests."""

    def __init__(self, stack: ExitStack) -> None:
        self.files: dict[str, bytes] = {}
        self.hits: dict[str, int] = {}
        self.fail_first: dict[str, list[int]] = {}  # name -> status codes to answer first
        files = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                name = self.path.lstrip("/")
                files.hits[name] = files.hits.get(name, 0) + 1
                pending = files.fail_first.get(name)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                body = files.files.get(name)
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                """Quiet."""

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="test-http")
        self.thread.start()
        stack.callback(self.close)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/{name}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


def pointer(url: str, data: bytes, **over: Any) -> bytes:
    obj = {
        "version": over.pop("version", 0),
        "url": url,
        "sha256": hashlib.sha256(data).hexdigest(),
        "size": len(data),
        **over,
    }
    return json.dumps(obj).encode()


@pytest.mark.usefixtures("need_mosquitto")
def test_a_url_pointer_is_fetched_checked_and_applied(tmp_path: Path, stack: ExitStack) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    files = Files(stack)
    v3, v4 = denying(3, ALICE), denying(4, HELD)
    files.files.update({"v3.cose": v3, "v4.cose": v4})
    r = running(stack, sync_config(tmp_path / "r", broker.port))
    topic = TOPICS.credentials_snapshot
    retain(bo, topic, pointer(files.url("v3.cose"), v3, version=3))
    assert bo.wait(lambda: creds(bo).get("version") == 3), creds(bo)
    assert creds(bo)["source"] == f"device via {files.url('v3.cose')}"
    assert reason(r, ALICE) is Reason.REVOKED
    # a wrong sha256: refused at once (another try would fetch the same file)
    retain(bo, topic, pointer(files.url("v4.cose"), v4, version=4, sha256="ab" * 32))
    assert bo.wait(lambda: source_state(bo, "device").get("state") == "refused"), creds(bo)
    assert "sha256 mismatch" in creds(bo)["refused"]["reason"]
    assert creds(bo)["refused"]["why"] == "fetch" and files.hits["v4.cose"] == 1
    assert (creds(bo)["version"], reason(r, ALICE)) == (3, Reason.REVOKED)
    # the pointer's version must be the file's
    retain(bo, topic, pointer(files.url("v4.cose"), v4, version=5))
    assert bo.wait(lambda: "the file is version 4" in (creds(bo)["refused"] or {})["reason"])
    # missing: HTTP 404 is not retried either
    retain(bo, topic, pointer(files.url("nope.cose"), v4, version=4))
    assert bo.wait(lambda: "HTTP 404" in (creds(bo)["refused"] or {})["reason"]), creds(bo)
    assert files.hits["nope.cose"] == 1
    # a pointer to the version in force is not fetched again (the retained one, reconnecting)
    hits = files.hits["v3.cose"]
    retain(bo, topic, pointer(files.url("v3.cose"), v3, version=3))
    assert bo.wait(lambda: source_state(bo, "device") == {"version": 3, "state": "current"})
    assert files.hits["v3.cose"] == hits
    retain(bo, topic, pointer(files.url("v4.cose"), v4, version=4))
    assert bo.wait(lambda: creds(bo).get("version") == 4), creds(bo)
    assert (reason(r, ALICE), reason(r, HELD)) == (Reason.UNKNOWN, Reason.REVOKED)


@pytest.mark.usefixtures("need_mosquitto")
def test_c17_a_slow_apply_holds_up_neither_keepalives_nor_commands_nor_scans(
    tmp_path: Path, stack: ExitStack, held: GrayImage, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    # keepalive 2 s: the broker drops a client silent for 3 s
    r = running(stack, sync_config(tmp_path / "r", broker.port, keepalive_s=2))
    r.ready()
    sync = r.uplink.credentials
    assert sync is not None
    real: Callable[..., CredentialSet] = sync.store.apply_verified
    entered, release = threading.Event(), threading.Event()

    def slow_apply(snap: Any, source: str = "") -> CredentialSet:
        entered.set()
        release.wait(WAIT_S)  # the slow part: a huge snapshot on a slow card
        return real(snap, source)

    monkeypatch.setattr(sync.store, "apply_verified", slow_apply)
    retain(bo, TOPICS.credentials_snapshot, denying(3, HELD))
    assert entered.wait(WAIT_S)
    frames = r.reader.metrics.frames
    try:
        bo.command(DEVICE, "report_status", "during-apply")
        assert bo.result("during-apply")["ok"]
        assert r.scan(held).decision.granted  # the set in force until the new one is whole
        # 100 frames at 20 fps: 5 s, more than the broker's 3 s limit for a silent client
        assert wait_until(lambda: r.reader.metrics.frames >= frames + 100, WAIT_S)
        assert r.link.stats().connects == 1 and r.link.stats().state == "connected"
    finally:
        release.set()
    assert bo.wait(lambda: creds(bo).get("version") == 3), creds(bo)
    report = r.scan(held)
    assert (report.decision.granted, report.decision.reason) == (False, Reason.REVOKED)
    assert r.link.stats().connects == 1
    assert "exceeded timeout" not in broker.log_path.read_text()


@pytest.mark.usefixtures("need_mosquitto")
def test_a_reader_without_snapshot_key_refuses_and_says_so(
    tmp_path: Path, stack: ExitStack
) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    r = running(stack, sync_config(tmp_path / "r", broker.port, key=False))
    retain(bo, TOPICS.site_credentials_snapshot, denying(3, ALICE))
    assert bo.wait(lambda: source_state(bo, "site").get("state") == "refused"), creds(bo)
    assert creds(bo)["refused"]["reason"] == "no snapshot_key configured"
    assert creds(bo)["version"] == 0 and creds(bo)["source"] == "config"
    assert reason(r, ALICE) is Reason.GRANTED


@pytest.mark.usefixtures("need_mosquitto")
def test_cli_publish_reaches_a_running_reader(tmp_path: Path, stack: ExitStack) -> None:
    broker = stack.enter_context(LocalBroker(tmp_path / "b"))
    bo = back_office(stack, broker)
    files = Files(stack)
    r = running(stack, sync_config(tmp_path / "r", broker.port))
    r.ready()
    save_public_key(tmp_path / "s.pub", SIGNER)
    (tmp_path / "v3.cose").write_bytes(denying(3, ALICE))
    runner = CliRunner()
    base = ["publish", "--broker", f"127.0.0.1:{broker.port}", "--site", SITE]
    out = runner.invoke(
        credentials_cli,
        [*base, str(tmp_path / "v3.cose"), "--site-wide", "--key", str(tmp_path / "s.pub")],
    )
    assert out.exit_code == 0, out.output
    topic = TOPICS.site_credentials_snapshot
    assert f"published snapshot version 3 to {topic} (retained" in out.output
    assert bo.wait(lambda: creds(bo).get("version") == 3), creds(bo)
    assert reason(r, ALICE) is Reason.REVOKED
    # a pointer: the command checks the URL serves the file before publishing
    v4 = denying(4)
    (tmp_path / "v4.cose").write_bytes(v4)
    url = files.url("v4.cose")
    out = runner.invoke(
        credentials_cli, [*base, str(tmp_path / "v4.cose"), "--device", DEVICE, "--url", url]
    )
    assert out.exit_code == 2 and "HTTP 404" in out.output and "upload" in out.output
    files.files["v4.cose"] = v4
    out = runner.invoke(
        credentials_cli, [*base, str(tmp_path / "v4.cose"), "--device", DEVICE, "--url", url]
    )
    assert out.exit_code == 0, out.output
    assert bo.wait(lambda: creds(bo).get("version") == 4), creds(bo)
    assert creds(bo)["source"] == f"device via {url}"
    assert reason(r, ALICE) is Reason.UNKNOWN
    # usage mistakes and an unreachable broker
    out = runner.invoke(credentials_cli, [*base, str(tmp_path / "v4.cose")])
    assert out.exit_code == 2 and "exactly one of --device" in out.output
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    out = runner.invoke(
        credentials_cli,
        [
            "publish",
            "--broker",
            f"127.0.0.1:{port}",
            "--site",
            SITE,
            str(tmp_path / "v4.cose"),
            "--site-wide",
        ],
    )
    assert out.exit_code == 3 and "cannot reach the broker" in out.output


# --- the worker and the downloads, without a broker -----------------------------------------------


@pytest.fixture
def sync(tmp_path: Path) -> Iterator[tuple[CredentialSync, list[CredentialSet]]]:
    installed: list[CredentialSet] = []
    s = CredentialSync(
        SnapshotStore(tmp_path, PUB, site=SITE),
        installed.append,
        fetch=FetchOptions(timeout_s=0.5, attempts=3, backoff_s=0.01),
    )
    yield s, installed
    assert s.stop()


def settle(s: CredentialSync, handled: int) -> None:
    assert wait_until(lambda: s.handled >= handled and s.idle(), WAIT_S)


def test_of_two_full_snapshots_at_once_only_the_higher_is_built(
    sync: tuple[CredentialSync, list[CredentialSet]],
) -> None:
    s, installed = sync
    # both waiting when the worker looks, as the two retained messages on a connect
    s.offer("site", denying(6))
    s.offer("device", denying(5))
    s.start()
    settle(s, 1)
    assert [c.version for c in installed] == [6]
    assert s.status()["sources"] == {
        "device": {"version": 5, "state": "superseded"},
        "site": {"version": 6, "state": "applied"},
    }
    s.offer("site", b"")  # the retained message cleared
    settle(s, 2)
    assert s.status()["sources"]["site"] == {"version": None, "state": "cleared"}
    assert s.store.version == 6
    s.offer("device", b"\x00 not a snapshot")
    settle(s, 3)
    device = s.status()["sources"]["device"]
    assert device["state"] == "refused" and "neither a signed snapshot" in device["reason"]


def test_downloads_retry_then_give_up_and_never_hang(tmp_path: Path, stack: ExitStack) -> None:
    files = Files(stack)
    data = denying(3)
    files.files["s.cose"] = data
    files.fail_first["s.cose"] = [503, 503]
    opts = FetchOptions(timeout_s=0.5, attempts=3, backoff_s=0.01)
    p = parse_pointer(pointer(files.url("s.cose"), data, version=3))
    assert fetch_snapshot(p, opts) == data and files.hits["s.cose"] == 3
    files.fail_first["s.cose"] = [503, 503, 503]
    with pytest.raises(SnapshotError, match=r"after 3 tries: HTTP 503") as e:
        fetch_snapshot(p, opts)
    assert why_of(e.value) == "fetch"
    # a server that accepts the connection and never answers: bounded by the timeouts
    silent = socket.create_server(("127.0.0.1", 0))
    stack.callback(silent.close)
    url = f"http://127.0.0.1:{silent.getsockname()[1]}/s.cose"
    with pytest.raises(SnapshotError, match=r"after 2 tries: .*timed out"):
        fetch_snapshot(
            parse_pointer(pointer(url, data, version=3)),
            FetchOptions(timeout_s=0.2, deadline_s=5, attempts=2, backoff_s=0.01),
        )
    # a stop request ends the pauses between tries at once
    stop = threading.Event()
    stop.set()
    files.fail_first["s.cose"] = [503]
    with pytest.raises(SnapshotError, match="stopping"):
        fetch_snapshot(p, FetchOptions(timeout_s=0.5, attempts=3, backoff_s=3600.0), stop)
    # a file larger than the pointer says is cut off, not read to the end
    files.files["big.cose"] = data + bytes(10)
    big = parse_pointer(pointer(files.url("big.cose"), data, version=3))
    with pytest.raises(SnapshotError, match="the server has"):
        fetch_snapshot(big, opts)


def test_pointers_are_checked_before_anything_is_fetched() -> None:
    good = json.loads(pointer("https://files.example/s.cose", b"x", version=2))
    assert parse_pointer(json.dumps(good).encode()).size == 1
    bad = {
        "'url' must be an http:// or https:// URL": {**good, "url": "file:///etc/passwd"},
        "'url' must be an http:// or https:// URL with a host": {**good, "url": "http:///x"},
        "'sha256' must be 64 hex digits": {**good, "sha256": "zz" * 32},
        "'size' must be an integer from 1": {**good, "size": 2**40},
        "'version' must be an integer from 1": {**good, "version": True},
        "unknown key 'urls'": {**good, "urls": []},
    }
    for text, obj in bad.items():
        with pytest.raises(SnapshotError, match=text.replace("(", r"\(")):
            parse_pointer(json.dumps(obj).encode())
    with pytest.raises(SnapshotError, match="neither a signed snapshot"):
        parse_pointer(b"\x00\x01")


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_fuzz_pointers_only_ever_raise_snapshot_error(data: bytes) -> None:
    try:
        p = parse_pointer(data)
    except SnapshotError:
        return
    assert p.url.startswith(("http://", "https://"))
