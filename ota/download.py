"""Resumable HTTP(S) download of an update bundle: never hangs, never reads past the size it
was told, and puts the file in place only when it is whole.

python-tuf's own downloader starts over after every drop; a reader on a poor link may never
finish a 50 MB bundle that way. This one keeps a ``.part`` file next to the destination and
asks for the rest with an HTTP range request (RFC 9110 §14.2 ``Range``, §14.4
``Content-Range``, §15.3.7 ``206 Partial Content``). Authenticity is not checked here: TUF
verifies the finished file afterwards (``sha256`` is only an early, optional check).

Standard library only (``http.client``), so the updater running as root pulls in no extra
HTTP stack.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import BinaryIO, Protocol

from ota.exceptions import DownloadFailedError, DownloadTooLargeError
from provisioning.files import fsync_dir

CHUNK = 64 * 1024
"""Bytes per read and write: memory stays flat whatever the bundle size."""

MAX_BACKOFF_S = 30.0
"""Upper bound of one pause between attempts, in seconds."""

_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class Response(Protocol):
    """What :func:`download` needs from an HTTP response (``http.client.HTTPResponse`` fits)."""

    status: int

    def getheader(self, name: str) -> str | None:
        """The header's value, or None when absent."""

    def read(self, amt: int) -> bytes:
        """At most ``amt`` body bytes; b"" at the end. Raises OSError (timeouts included) or
        http.client.HTTPException."""

    def close(self) -> None:
        """Close the response and its connection."""


Opener = Callable[[str, Mapping[str, str], float], Response]
"""``opener(url, headers, timeout_s)`` sends a GET and returns the response once its status
line and headers are in; ``timeout_s`` must apply to every socket operation."""


class _ClosingResponse:
    """An HTTPResponse that also closes its connection (no keep-alive socket left behind)."""

    def __init__(self, conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
        self._conn = conn
        self._resp = resp
        self.status = resp.status

    def getheader(self, name: str) -> str | None:
        return self._resp.getheader(name)

    def read(self, amt: int) -> bytes:
        return self._resp.read(amt)

    def close(self) -> None:
        try:
            self._resp.close()
        finally:
            self._conn.close()


def http_open(url: str, headers: Mapping[str, str], timeout_s: float) -> Response:
    """The default opener: one GET over a fresh ``http.client`` connection whose socket
    timeout (``timeout_s`` seconds) bounds the connect and every read. Redirects are not
    followed (a 3xx is returned as is). Raises ValueError (not an http/https URL with a
    host), OSError and http.client.HTTPException."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {url!r}")
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=timeout_s)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    try:
        conn.request("GET", path, headers=dict(headers))
        resp = conn.getresponse()
    except BaseException:
        conn.close()
        raise
    return _ClosingResponse(conn, resp)


class _RetryableError(Exception):
    """One attempt failed in a way another attempt may fix (drop, timeout, 5xx, ...)."""


def part_path(dest: Path) -> Path:
    """Where the unfinished download of ``dest`` is kept: ``dest`` plus ``.part``."""
    return dest.with_suffix(dest.suffix + ".part")


def download(
    url: str,
    dest: Path,
    *,
    expected_size: int,
    max_size: int,
    sha256: bytes | None = None,
    attempts: int = 5,
    backoff_s: float = 0.5,
    timeout_s: float = 10,
    progress: Callable[[int, int], None] | None = None,
    opener: Opener = http_open,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Download ``url`` to ``dest`` (exactly ``expected_size`` bytes), resuming a ``.part``
    file left by an earlier call or attempt; return ``dest``.

    - Resume: with N bytes already in the part file it sends ``Range: bytes=N-`` and accepts a
      206 whose ``Content-Range`` starts at N (and whose total, if given, is
      ``expected_size``); a 200 means the server ignored the range: the part file is
      truncated and the download starts over.
    - Size: refuses ``expected_size > max_size`` before any request; never reads more than
      ``expected_size`` bytes; a server announcing (Content-Length / Content-Range) or sending
      more is refused with :class:`DownloadTooLargeError` and the part file deleted.
    - Retries: at most ``attempts`` requests. Connection errors, socket timeouts (``timeout_s``
      seconds on the connect and on every read, so a stalled server cannot hang it), short
      reads, 408, 429, 5xx and a 206 for the wrong range are retried after
      ``backoff_s * 2**k`` seconds (k = 0, 1, ...; capped at 30 s) times a random jitter
      factor in [0.5, 1.5), through ``sleep``. Other statuses are final.
    - Done: the part file is fsynced, its SHA-256 compared with ``sha256`` (32 bytes) if
      given, renamed to ``dest`` (os.replace) and the folder fsynced.
    - ``progress(done, total)`` is called after each chunk written, in bytes with
      ``total == expected_size``; ``done`` grows, but falls back to the first chunk if the
      server ignores a range and the download starts over.

    Raises :class:`DownloadFailedError` with ``reason`` ``http_<status>``, ``hash_mismatch``
    (part file deleted), ``bad_url`` or ``gave_up_after_<attempts>_attempts`` (the last
    failure in ``detail``; the part file kept for a later resume);
    :class:`DownloadTooLargeError` (reason ``too_large``); OSError for local disk errors.
    """
    if expected_size < 0 or attempts < 1:
        raise ValueError("expected_size must be >= 0 and attempts >= 1")
    if expected_size > max_size:
        raise DownloadTooLargeError(f"expected {expected_size} bytes, cap {max_size}")
    part = part_path(dest)
    last = ""
    for attempt in range(attempts):
        if attempt:
            pause = min(backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
            sleep(pause * random.uniform(0.5, 1.5))
        try:
            _attempt(
                url,
                part,
                expected=expected_size,
                timeout_s=timeout_s,
                progress=progress,
                opener=opener,
            )
        except _RetryableError as e:
            last = str(e)
            continue
        _finish(part, dest, sha256)
        return dest
    raise DownloadFailedError(f"gave_up_after_{attempts}_attempts", last)


def _attempt(
    url: str,
    part: Path,
    *,
    expected: int,
    timeout_s: float,
    progress: Callable[[int, int], None] | None,
    opener: Opener,
) -> None:
    """One request: append to ``part`` until it holds ``expected`` bytes. Returns when it
    does; raises _RetryableError, DownloadFailedError or DownloadTooLargeError."""
    # O_CREAT without O_TRUNC: the bytes of earlier attempts are what we resume from.
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "r+b") as f:
        offset = f.seek(0, os.SEEK_END)
        if offset > expected:  # not ours, or a bundle of another size: start over
            offset = _truncate(f, 0)
        if offset == expected:
            # complete already (a crash between the last write and the rename); its bytes
            # may not have reached the disk yet
            os.fsync(f.fileno())
            return
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            resp = opener(url, headers, timeout_s)
        except ValueError as e:
            raise DownloadFailedError("bad_url", str(e)) from e
        except (OSError, http.client.HTTPException) as e:
            raise _RetryableError(f"connect: {e!r}") from e
        try:
            offset = _check_response(resp, offset, expected, f, part)
            _copy(resp, f, offset=offset, expected=expected, progress=progress, part=part)
        finally:
            resp.close()
        f.flush()
        os.fsync(f.fileno())


def _truncate(f: BinaryIO, size: int) -> int:
    f.truncate(size)
    return f.seek(size)


def _check_response(resp: Response, offset: int, expected: int, f: BinaryIO, part: Path) -> int:
    """The offset the body starts at, after checking status and headers."""
    status = resp.status
    if status == 200:
        if offset:  # the server ignored Range: its body is the whole file
            offset = _truncate(f, 0)
    elif status == 206:
        m = _CONTENT_RANGE.match(resp.getheader("Content-Range") or "")
        if not m or int(m[1]) != offset:
            raise _RetryableError(f"206 for another range: {resp.getheader('Content-Range')!r}")
        total = m[3]
        if total != "*" and int(total) != expected:
            _too_large_or_wrong(int(total), expected, part)
        if int(m[2]) >= expected:
            _refuse(part, f"Content-Range {m[0]!r} past {expected} bytes")
    elif status in (408, 429) or 500 <= status <= 599:
        raise _RetryableError(f"http_{status}")
    else:
        raise DownloadFailedError(f"http_{status}", f"GET {status}")
    length = resp.getheader("Content-Length")
    if length is not None and length.strip().isdigit() and offset + int(length) > expected:
        _refuse(part, f"Content-Length {length} from offset {offset} past {expected} bytes")
    return offset


def _too_large_or_wrong(total: int, expected: int, part: Path) -> None:
    if total > expected:
        _refuse(part, f"server total {total} bytes, expected {expected}")
    # A smaller file than announced: the URL serves something else; retrying cannot help.
    raise DownloadFailedError("size_mismatch", f"server total {total} bytes, expected {expected}")


def _refuse(part: Path, detail: str) -> None:
    part.unlink(missing_ok=True)
    raise DownloadTooLargeError(detail)


def _copy(
    resp: Response,
    f: BinaryIO,
    *,
    offset: int,
    expected: int,
    progress: Callable[[int, int], None] | None,
    part: Path,
) -> None:
    """Append the body to ``f`` up to ``expected`` bytes in all, then make sure nothing
    follows."""
    done = offset
    try:
        while done < expected:
            chunk = resp.read(min(CHUNK, expected - done))
            if not chunk:
                raise _RetryableError(f"short read: connection closed at byte {done}")
            f.write(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, expected)
        # One more byte tells a server that sends too much from one that ends here.
        extra = resp.read(1)
    except (OSError, http.client.HTTPException) as e:
        raise _RetryableError(f"read at byte {done}: {e!r}") from e
    if extra:
        f.close()
        _refuse(part, f"server sent more than {expected} bytes")


def _finish(part: Path, dest: Path, sha256: bytes | None) -> None:
    """Check the whole part file's hash if asked, then rename it over ``dest`` durably."""
    if sha256 is not None:
        h = hashlib.sha256()
        with part.open("rb") as f:
            while block := f.read(CHUNK):
                h.update(block)
        if h.digest() != sha256:
            part.unlink(missing_ok=True)
            raise DownloadFailedError(
                "hash_mismatch", f"sha256 {h.hexdigest()}, expected {sha256.hex()}"
            )
    os.replace(part, dest)
    fsync_dir(dest.parent)
