"""Credential snapshots delivered over MQTT (or fetched from a URL the message names).

Topics (retained, QoS 1; see :mod:`firmware.uplink.topics`): the reader's own
``qrgate/v1/<site>/<device>/credentials/snapshot`` (label ``"device"``) and the site's
``qrgate/v1/<site>/_site/credentials/snapshot`` (label ``"site"``). Either payload is

- the signed snapshot or delta itself (:mod:`firmware.policy.snapshot`; its first byte is
  0xD2, the COSE_Sign1 tag), or
- a pointer, a UTF-8 JSON object ``{"version": N, "url": "https://…" | "http://…",
  "sha256": "<64 hex>", "size": <bytes>}`` for snapshots too large for the broker. The
  reader downloads the file only when ``version`` is above the one in force, and takes it only
  if its size and SHA-256 match and the signed version equals ``version``. Downloads use
  urllib with a per-read timeout, a deadline per attempt, at most :data:`MAX_SNAPSHOT_BYTES`,
  redirects only to http/https, and a bounded number of attempts with doubling pauses; then
  the pointer is refused with the reason (the retained message comes again on the next
  connect, and with it another try). A wrong SHA-256 or size, an HTTP 4xx (but 408 and 429)
  or a redirect to another scheme is not retried.
- empty: a retained message being cleared; ignored.

Both topics may carry a snapshot; the higher version wins. A full snapshot below one received
at the same time is skipped, and a version below the one in force that came by the *other*
topic is reported ``"superseded"`` (not a refusal): a site whose readers moved on to the
site-wide topic keeps an old per-device message without a refusal on every reconnect.

Threads: paho's network thread only queues messages; the uplink worker calls
:meth:`CredentialSync.offer`, which keeps the newest payload per topic and returns at once;
the "qrgate-credentials" thread downloads, verifies, builds the new set (100,000 entries in a
fraction of a second, but a large one on a slow card can take seconds), keeps it, puts it in
force with one assignment (``install``) and reports. So neither keepalives, PUBACKs, commands
nor scans wait for a snapshot.

The outcome is the status's ``"credentials"`` object: :meth:`SnapshotStore.status
<firmware.policy.snapshot.SnapshotStore.status>` plus ``"sources": {"device" | "site":
{"version", "state", "reason"?}}`` where ``state`` is ``"applied"`` (in force now),
``"current"`` (the version in force already), ``"superseded"``, ``"refused"`` (``reason``
says why) or ``"cleared"``.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any
from urllib.parse import urlsplit

from firmware import __version__
from firmware.exceptions import SnapshotError
from firmware.policy.credentials import CredentialSet
from firmware.policy.snapshot import (
    COSE_SIGN1_FIRST_BYTE,
    MAX_SNAPSHOT_BYTES,
    MAX_VERSION,
    Snapshot,
    SnapshotStore,
    snapshot_error,
    version_of,
    why_of,
)

log = logging.getLogger(__name__)

DEVICE, SITE = "device", "site"
"""Labels of the two topics a snapshot comes by."""
MAX_POINTER_BYTES = 4096
MAX_URL_CHARS = 2048
POINTER_KEYS = frozenset({"version", "url", "sha256", "size"})
READ_CHUNK = 256 * 1024
THREAD_NAME = "qrgate-credentials"


@dataclass(frozen=True, slots=True)
class FetchOptions:
    """How a pointer's file is downloaded. ``timeout_s``: each connect and read, seconds.
    ``deadline_s``: one attempt at most, seconds (64 MB over a 1 Mbit/s link takes ~9 min).
    ``attempts``: tries at most. ``backoff_s``: the pause after the first failed try,
    doubling up to ``backoff_max_s``."""

    timeout_s: float = 20.0
    deadline_s: float = 900.0
    attempts: int = 4
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0


@dataclass(frozen=True, slots=True)
class Pointer:
    """Where to fetch a snapshot: ``version`` (as the publisher says; checked against the
    signed one), ``url`` (http or https), ``sha256`` (64 lowercase hex digits), ``size``
    (bytes)."""

    version: int
    url: str
    sha256: str
    size: int


def parse_pointer(payload: bytes) -> Pointer:
    """A pointer message (module docstring). Raises SnapshotError (why ``pointer``)."""

    def bad(what: str) -> SnapshotError:
        return snapshot_error("pointer", f"bad pointer: {what}")

    if len(payload) > MAX_POINTER_BYTES:
        raise bad(f"{len(payload)} bytes; a pointer is at most {MAX_POINTER_BYTES}")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise bad("neither a signed snapshot (COSE_Sign1) nor a JSON pointer") from None
    if not isinstance(obj, dict):
        raise bad("expected a JSON object {version, url, sha256, size}")
    unknown = sorted(set(obj) - POINTER_KEYS)
    if unknown:
        raise bad(f"unknown key {unknown[0]!r:.40} (expected version, url, sha256, size)")
    version, url, digest, size = (obj.get(k) for k in ("version", "url", "sha256", "size"))
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= MAX_VERSION:
        raise bad(f"'version' must be an integer from 1 to {MAX_VERSION}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SNAPSHOT_BYTES:
        raise bad(f"'size' must be an integer from 1 to {MAX_SNAPSHOT_BYTES} (bytes)")
    if not isinstance(digest, str) or len(digest) != 64:
        raise bad("'sha256' must be 64 hex digits")
    try:
        bytes.fromhex(digest)
    except ValueError:
        raise bad("'sha256' must be 64 hex digits") from None
    if not isinstance(url, str) or not 0 < len(url) <= MAX_URL_CHARS or not url.isprintable():
        raise bad(f"'url' must be a printable URL of at most {MAX_URL_CHARS} characters")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad(f"'url' must be an http:// or https:// URL with a host, found {url!r:.80}")
    return Pointer(version, url, digest.lower(), size)


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http and https only (urllib would also follow one to ftp)."""

    def redirect_request(  # noqa: PLR0917 - urllib passes these positionally
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        if urlsplit(newurl).scheme not in ("http", "https"):
            raise urllib.error.HTTPError(
                newurl, code, f"redirect to a non-HTTP URL {newurl!r:.80}", headers, fp
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


class _PermanentError(Exception):
    """A download failure that another try would not mend."""


class _StoppedError(Exception):
    """The reader is stopping."""


def fetch_snapshot(
    pointer: Pointer, options: FetchOptions | None = None, stop: threading.Event | None = None
) -> bytes:
    """The file ``pointer`` names, its size and SHA-256 checked (module docstring). Returns
    within about ``attempts`` x (``deadline_s`` + ``timeout_s``) plus the pauses, or sooner
    once ``stop`` is set. Raises SnapshotError (why ``fetch``) saying what failed last."""
    opts = options or FetchOptions()
    stop = stop or threading.Event()
    opener = urllib.request.build_opener(_Redirects)
    pause = opts.backoff_s
    last = "no attempt"
    for attempt in range(1, max(1, opts.attempts) + 1):
        try:
            return _fetch_once(opener, pointer, opts, stop)
        except _PermanentError as e:
            raise snapshot_error(
                "fetch", f"cannot fetch {pointer.url}: {e}", pointer.version
            ) from None
        except _StoppedError:
            raise snapshot_error("fetch", "the reader is stopping", pointer.version) from None
        except Exception as e:  # network and HTTP failures of every kind: try again
            last = str(e) or type(e).__name__
        if attempt < opts.attempts:
            log.warning(
                "snapshot download %s failed (%s); try %d of %d in %.1f s",
                pointer.url,
                last,
                attempt + 1,
                opts.attempts,
                pause,
            )
            if stop.wait(pause):
                raise snapshot_error("fetch", "the reader is stopping", pointer.version)
            pause = min(pause * 2, opts.backoff_max_s)
    raise snapshot_error(
        "fetch",
        f"cannot fetch {pointer.url} after {opts.attempts} tries: {last}",
        pointer.version,
    )


def _fetch_once(
    opener: urllib.request.OpenerDirector, p: Pointer, opts: FetchOptions, stop: threading.Event
) -> bytes:
    deadline = time.monotonic() + opts.deadline_s
    request = urllib.request.Request(p.url, headers={"User-Agent": f"qrgate/{__version__}"})
    try:
        response = opener.open(request, timeout=opts.timeout_s)
    except urllib.error.HTTPError as e:
        e.close()
        # a redirect refused by _Redirects, or a 4xx: another try gets the same answer
        if 300 <= e.code < 500 and e.code not in (408, 429):
            raise _PermanentError(f"HTTP {e.code} {e.reason}") from None
        raise OSError(f"HTTP {e.code} {e.reason}") from None
    except ValueError as e:  # a URL urllib cannot use
        raise _PermanentError(str(e)) from None
    with response:
        length = response.headers.get("Content-Length")
        if length is not None and length.isdigit() and int(length) != p.size:
            raise _PermanentError(f"the server has {int(length)} bytes, the pointer says {p.size}")
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        got = 0
        while True:
            if stop.is_set():
                raise _StoppedError
            if time.monotonic() > deadline:
                raise OSError(f"not complete after {opts.deadline_s:.0f} s ({got} bytes)")
            try:
                chunk = response.read(min(READ_CHUNK, p.size + 1 - got))
            except http.client.IncompleteRead as e:
                raise OSError(f"connection closed after {got + len(e.partial)} bytes") from None
            if not chunk:
                break
            got += len(chunk)
            if got > p.size:
                raise _PermanentError(f"more than the {p.size} bytes the pointer says")
            digest.update(chunk)
            chunks.append(chunk)
    if got != p.size:
        raise OSError(f"connection closed after {got} of {p.size} bytes")
    if digest.hexdigest() != p.sha256:
        raise _PermanentError("sha256 mismatch: the file is not the one the pointer names")
    return b"".join(chunks)


@dataclass(frozen=True, slots=True)
class _Candidate:
    label: str
    snapshot: Snapshot
    source: str


class CredentialSync:
    """The reader's side of ``credentials/snapshot`` (module docstring).

    ``store``: the snapshot store (loaded already). ``install``: puts a set in force (in the
    daemon, ``policy.credentials = new_set``); called on this object's thread. ``report``:
    receives the status's ``credentials`` object after every change (must not block).
    ``fetch``: download settings. ``on_change``: called after ``report`` (the uplink sets it
    to publish its status at once).
    """

    def __init__(
        self,
        store: SnapshotStore,
        install: Callable[[CredentialSet], None],
        report: Callable[[dict[str, Any]], None] | None = None,
        *,
        fetch: FetchOptions | None = None,
    ) -> None:
        self.store = store
        self._install = install
        self._report = report
        self.fetch_options = fetch or FetchOptions()
        self.on_change: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._pending: dict[str, bytes] = {}
        self._busy = False
        self._handled = 0
        self._sources: dict[str, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if report is not None:
            report(self.status())

    # --- any thread ---------------------------------------------------------------------------

    def offer(self, label: str, payload: bytes) -> None:
        """A payload arrived on the topic ``label`` ("device" or "site"); never blocks. Only
        the newest payload per topic waits: one that was not handled yet is replaced."""
        with self._cond:
            self._pending[label] = payload
            self._cond.notify_all()

    def status(self) -> dict[str, Any]:
        """The status's ``credentials`` object (module docstring)."""
        status = self.store.status()
        with self._cond:
            status["sources"] = {k: dict(v) for k, v in sorted(self._sources.items())}
        return status

    @property
    def handled(self) -> int:
        """Batches of payloads handled so far (tests wait on it)."""
        with self._cond:
            return self._handled

    def idle(self) -> bool:
        """True when nothing waits and nothing is being handled."""
        with self._cond:
            return not self._pending and not self._busy

    # --- life cycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._main, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> bool:
        """Stop the worker: a download stops at its next read; an apply under way completes
        (a half-kept snapshot does not exist). True if it ended within ``timeout_s``."""
        thread = self._thread
        if thread is None:
            return True
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        thread.join(timeout_s)
        if thread.is_alive():
            log.warning("credential snapshot worker still busy after %.1f s", timeout_s)
            return False
        self._thread = None
        return True

    # --- the worker ---------------------------------------------------------------------------

    def _main(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    return
                batch, self._pending = self._pending, {}
                self._busy = True
            try:
                self._handle(batch)
            except Exception:
                log.exception("credential snapshot handling failed; the set in force stays")
            finally:
                with self._cond:
                    self._busy = False
                    self._handled += 1
                    self._cond.notify_all()
            self._publish()

    def _publish(self) -> None:
        try:
            if self._report is not None:
                self._report(self.status())
            if self.on_change is not None:
                self.on_change()
        except Exception:
            log.exception("credential snapshot status report failed")

    def _outcome(self, label: str, version: int | None, state: str, reason: str = "") -> None:
        entry: dict[str, Any] = {"version": version, "state": state}
        if reason:
            entry["reason"] = reason
        with self._cond:
            self._sources[label] = entry

    def _in_force_label(self) -> str:
        # the store's source is "<label>" or "<label> via <url>"
        return self.store.source.split(" ", 1)[0]

    def _handle(self, batch: dict[str, bytes]) -> None:
        candidates: list[_Candidate] = []
        for label, payload in sorted(batch.items()):
            if not payload:
                log.info("credential snapshot message on the %s topic cleared", label)
                self._outcome(label, None, "cleared")
                continue
            try:
                candidate = self._resolve(label, payload)
            except SnapshotError as e:
                self.store.refuse(e)
                self._outcome(label, version_of(e), "refused", str(e))
                continue
            if candidate is not None:
                candidates.append(candidate)
        fulls = [c for c in candidates if not c.snapshot.is_delta]
        best = max(fulls, key=lambda c: c.snapshot.version, default=None)
        for c in fulls:
            if c is not best:
                self._outcome(c.label, c.snapshot.version, "superseded")
        chosen = [c for c in candidates if c.snapshot.is_delta or c is best]
        for c in sorted(chosen, key=lambda c: c.snapshot.version):
            self._apply(c)

    def _resolve(self, label: str, payload: bytes) -> _Candidate | None:
        """The verified snapshot a payload stands for, downloading a pointer's file when its
        version is new; None when there is nothing to do."""
        if payload[0] == COSE_SIGN1_FIRST_BYTE:
            return _Candidate(label, self.store.verify(payload), label)
        pointer = parse_pointer(payload)
        if self._known(label, pointer.version):
            return None
        log.info("credential snapshot version %d: fetching %s", pointer.version, pointer.url)
        data = fetch_snapshot(pointer, self.fetch_options, self._stop)
        snap = self.store.verify(data)
        if snap.version != pointer.version:
            raise snapshot_error(
                "pointer",
                f"the pointer says version {pointer.version}, the file is version {snap.version}",
                snap.version,
            )
        return _Candidate(label, snap, f"{label} via {pointer.url}")

    def _known(self, label: str, version: int) -> bool:
        """Record the outcome for a version not above the one in force (True), else False."""
        in_force = self.store.version
        if version > in_force:
            return False
        if version == in_force:
            self._outcome(label, version, "current")
        elif label != self._in_force_label():
            self._outcome(label, version, "superseded")
        else:
            e = snapshot_error(
                "older", f"older: version {version}, version {in_force} is in force", version
            )
            self.store.refuse(e)
            self._outcome(label, version, "refused", str(e))
        return True

    def _apply(self, c: _Candidate) -> None:
        if self._known(c.label, c.snapshot.version):
            return
        try:
            new = self.store.apply_verified(c.snapshot, c.source)
        except SnapshotError as e:
            self._outcome(c.label, c.snapshot.version, "refused", str(e))
            if why_of(e) == "cannot_keep":
                log.error("credential snapshot not kept: check the state folder's disk")
            return
        # one assignment: a scan decides on the old set or the new one, never on a mix
        self._install(new)
        self._outcome(c.label, new.version, "applied")
