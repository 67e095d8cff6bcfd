"""ota.download against a real ThreadingHTTPServer on loopback: resume by Range, restart when
Range is ignored, refusal of oversize bodies, final statuses, stalls, progress."""

from __future__ import annotations

import hashlib
import http.server
import random
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ota.download import download, part_path
from ota.exceptions import DownloadFailedError, DownloadTooLargeError, OtaError

SIZE = 3 * 1024 * 1024
DATA = random.Random(7).randbytes(SIZE)
DIGEST = hashlib.sha256(DATA).digest()
DROP_AFTER = 1_000_003  # odd on purpose: resume offsets are not chunk multiples


@dataclass
class Behaviour:
    """What the test server does; ``ranges`` records each request's Range start (None when
    the request had no Range header)."""

    ignore_range: bool = False
    drop_first: int = 0  # drop the connection after DROP_AFTER bytes on this many requests
    fail_first: int = 0  # answer 503 to this many requests
    status: int = 200  # any other value: answer it with no body
    extra: bytes = b""  # sent after the file
    announce_length: bool = True
    stall: bool = False  # wait (until released) instead of answering
    released: threading.Event = field(default_factory=threading.Event)
    ranges: list[int | None] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0 (the default): one response per connection, so a drop is just a return.
    server: Server

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        b = self.server.behaviour
        m = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(m[1]) if m else None
        with b.lock:
            b.ranges.append(start)
            n = len(b.ranges)
        if b.stall:
            b.released.wait(10)
            return
        if n <= b.fail_first:
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if b.status != 200:
            self.send_response(b.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = DATA + b.extra
        if start is not None and not b.ignore_range:
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{SIZE - 1}/{SIZE}")
            body = body[start:]
        else:
            self.send_response(200)
        if b.announce_length:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if n <= b.drop_first:
            body = body[:DROP_AFTER]
        self.wfile.write(body)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, behaviour: Behaviour) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.behaviour = behaviour

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that timed out and left is expected here


Serve = Callable[..., tuple[str, Behaviour]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """serve(**behaviour) -> (url, behaviour); the servers stop at teardown."""
    started: list[tuple[Server, threading.Thread]] = []

    def start(**kw: object) -> tuple[str, Behaviour]:
        b = Behaviour(**kw)  # type: ignore[arg-type]
        srv = Server(b)
        t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05})
        t.start()
        started.append((srv, t))
        return f"http://127.0.0.1:{srv.server_address[1]}/bundle.tar", b

    yield start
    for srv, t in started:
        srv.behaviour.released.set()
        srv.shutdown()
        srv.server_close()
        t.join(10)


def test_plain_download_progress_grows_to_total(serve: Serve, tmp_path: Path) -> None:
    url, b = serve()
    seen: list[tuple[int, int]] = []
    dest = tmp_path / "bundle.tar"
    out = download(
        url,
        dest,
        expected_size=SIZE,
        max_size=SIZE,
        sha256=DIGEST,
        progress=lambda done, total: seen.append((done, total)),
    )
    assert out == dest
    assert hashlib.sha256(dest.read_bytes()).digest() == DIGEST
    assert not part_path(dest).exists()
    assert b.ranges == [None]
    dones = [d for d, _ in seen]
    assert all(t == SIZE for _, t in seen)
    assert dones == sorted(set(dones))  # strictly increasing
    assert dones[-1] == SIZE
    assert len(dones) == SIZE // (64 * 1024)  # 3 MB in 64 KiB chunks


def test_drops_resume_from_the_right_offsets_with_backoff(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(drop_first=3)
    pauses: list[float] = []
    dest = tmp_path / "bundle.tar"
    download(
        url,
        dest,
        expected_size=SIZE,
        max_size=SIZE,
        sha256=DIGEST,
        attempts=5,
        backoff_s=0.5,
        sleep=pauses.append,
    )
    assert hashlib.sha256(dest.read_bytes()).digest() == DIGEST
    assert b.ranges == [None, DROP_AFTER, 2 * DROP_AFTER, 3 * DROP_AFTER]
    # exponential backoff with jitter in [0.5, 1.5) of 0.5, 1, 2 s
    assert len(pauses) == 3
    for k, p in enumerate(pauses):
        base = 0.5 * 2**k
        assert 0.5 * base <= p < 1.5 * base


def test_gave_up_keeps_the_part_and_a_later_call_resumes(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(drop_first=1)
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadFailedError) as e:
        download(url, dest, expected_size=SIZE, max_size=SIZE, attempts=1)
    assert e.value.reason == "gave_up_after_1_attempts"
    assert "short read" in e.value.detail or "IncompleteRead" in e.value.detail
    assert part_path(dest).read_bytes() == DATA[:DROP_AFTER]
    assert not dest.exists()
    download(url, dest, expected_size=SIZE, max_size=SIZE, sha256=DIGEST, attempts=1)
    assert dest.read_bytes() == DATA
    assert b.ranges == [None, DROP_AFTER]


def test_server_ignoring_range_restarts_from_zero(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(ignore_range=True)
    dest = tmp_path / "bundle.tar"
    part_path(dest).write_bytes(b"\xff" * 5000)  # stale bytes a 200 must not be appended to
    seen: list[int] = []
    download(
        url,
        dest,
        expected_size=SIZE,
        max_size=SIZE,
        sha256=DIGEST,
        progress=lambda done, _total: seen.append(done),
        sleep=lambda _s: None,
    )
    assert dest.read_bytes() == DATA
    assert b.ranges == [5000]
    assert seen[0] == 64 * 1024  # counted from zero again, not from 5000
    assert seen[-1] == SIZE


def test_dropped_then_range_ignored_restarts(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(ignore_range=True, drop_first=1)
    dest = tmp_path / "bundle.tar"
    download(url, dest, expected_size=SIZE, max_size=SIZE, sha256=DIGEST, sleep=lambda _s: None)
    assert dest.read_bytes() == DATA
    assert b.ranges == [None, DROP_AFTER]


def test_announced_oversize_is_refused_without_retry(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(extra=b"x" * 100)
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadTooLargeError) as e:
        download(url, dest, expected_size=SIZE, max_size=SIZE, sleep=lambda _s: None)
    assert e.value.reason == "too_large"
    assert str(SIZE + 100) in e.value.detail
    assert b.ranges == [None]
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_unannounced_oversize_is_refused(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(extra=b"x" * 100, announce_length=False)
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadTooLargeError) as e:
        download(url, dest, expected_size=SIZE, max_size=SIZE, sleep=lambda _s: None)
    assert isinstance(e.value, DownloadFailedError)
    assert isinstance(e.value, OtaError)
    assert e.value.reason == "too_large"
    assert b.ranges == [None]
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_expected_size_over_the_cap_sends_nothing(serve: Serve, tmp_path: Path) -> None:
    url, b = serve()
    with pytest.raises(DownloadTooLargeError) as e:
        download(url, tmp_path / "b", expected_size=SIZE, max_size=SIZE - 1)
    assert e.value.reason == "too_large"
    assert b.ranges == []


def test_404_is_final(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(status=404)
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadFailedError) as e:
        download(url, dest, expected_size=SIZE, max_size=SIZE, sleep=lambda _s: None)
    assert e.value.reason == "http_404"
    assert b.ranges == [None]
    assert not dest.exists()


def test_503_is_retried(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(fail_first=2)
    pauses: list[float] = []
    dest = tmp_path / "bundle.tar"
    download(url, dest, expected_size=SIZE, max_size=SIZE, sha256=DIGEST, sleep=pauses.append)
    assert dest.read_bytes() == DATA
    assert b.ranges == [None, None, None]
    assert len(pauses) == 2


def test_hash_mismatch_deletes_the_part(serve: Serve, tmp_path: Path) -> None:
    url, _b = serve()
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadFailedError) as e:
        download(url, dest, expected_size=SIZE, max_size=SIZE, sha256=b"\0" * 32)
    assert e.value.reason == "hash_mismatch"
    assert DIGEST.hex() in e.value.detail
    assert not dest.exists()
    assert not part_path(dest).exists()


def test_complete_part_is_finished_without_a_request(serve: Serve, tmp_path: Path) -> None:
    url, b = serve()
    dest = tmp_path / "bundle.tar"
    part_path(dest).write_bytes(DATA)
    download(url, dest, expected_size=SIZE, max_size=SIZE, sha256=DIGEST)
    assert dest.read_bytes() == DATA
    assert b.ranges == []


def test_stalled_server_times_out_and_gives_up(serve: Serve, tmp_path: Path) -> None:
    url, b = serve(stall=True)
    pauses: list[float] = []
    dest = tmp_path / "bundle.tar"
    with pytest.raises(DownloadFailedError) as e:
        download(
            url,
            dest,
            expected_size=SIZE,
            max_size=SIZE,
            attempts=3,
            timeout_s=0.3,
            sleep=pauses.append,
        )
    assert e.value.reason == "gave_up_after_3_attempts"
    assert "timed out" in e.value.detail.lower() or "timeout" in e.value.detail.lower()
    assert b.ranges == [None, None, None]
    assert len(pauses) == 2
    assert not dest.exists()


def test_bad_url_is_final(tmp_path: Path) -> None:
    with pytest.raises(DownloadFailedError) as e:
        download("ftp://example.invalid/x", tmp_path / "x", expected_size=1, max_size=1)
    assert e.value.reason == "bad_url"
