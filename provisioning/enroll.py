"""Enrollment over MQTT: a new reader trades its CSR and a one-time token for a certificate.

The reader has no certificate yet, so it connects to the broker's enrollment listener with the
enrollment user's password (:func:`provisioning.ca.broker_config`; the ACL lets that user only
write ``qrgate/v1/_enroll/+/csr`` and read ``qrgate/v1/_enroll/+/cert``). The server
(:class:`EnrollmentServer`, ``qrgate enroll serve``) sits on the certificate listener as the
back office, checks the token in its :class:`TokenStore`, signs with the fleet CA and answers.

Messages (UTF-8 JSON objects, at most :data:`MAX_MESSAGE_BYTES`; larger ones are dropped
unread)::

    qrgate/v1/_enroll/<device>/csr   {"v": 1, "device", "csr" (PEM), "token_id" (16 hex),
                                      "token_secret" (16 hex), "site", "door", "request_id"}
    qrgate/v1/_enroll/<device>/cert  {"v": 1, "request_id", "ok": true, "cert", "chain"}
                                     {"v": 1, "request_id", "ok": false, "reason", "detail"}

``reason`` is one of :data:`REASONS`. Requests that cannot be read (not JSON, wrong fields,
topic and ``device`` disagreeing) get no answer: there is no trustworthy request id or device
to answer to; the reader times out.

Token checks, in order: the id is known and SHA-256 of the secret equals the stored hash
(``hmac.compare_digest``), else ``token_unknown`` (an unknown id and a wrong secret look the
same); not used yet, else ``token_used``; the server's clock before ``exp``, else
``token_expired``; site and door equal the token's, else ``scope``. Then the token is
**consumed** (``UPDATE ... WHERE used_at IS NULL``: of two racing requests exactly one wins)
before the CSR is looked at. So a request holding the right secret spends the token whatever
follows (``device_mismatch``, ``csr`` or ``internal``): a token is good for one try, and
anyone who learned a secret gets one attempt, not a probe. A reader refused after that needs
a new provisioning code. Wrong secrets never consume anything.

The MQTT client is behind :class:`Transport`, so this module needs no MQTT library;
:mod:`provisioning.mqtt_transport` is the paho implementation.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from provisioning import ca
from provisioning.device import DeviceKeys
from provisioning.exceptions import (
    CaError,
    CsrError,
    DeviceCertificateError,
    EnrollmentError,
    TokenStoreError,
)
from provisioning.identity import is_device_id

__all__ = [
    "ENROLL_PREFIX",
    "MAX_MESSAGE_BYTES",
    "REASONS",
    "TOKEN_FORMAT",
    "EnrollRequest",
    "EnrollmentServer",
    "Token",
    "TokenStore",
    "Transport",
    "answer_fail",
    "answer_ok",
    "cert_topic",
    "csr_topic",
    "enroll",
    "parse_request",
]

log = logging.getLogger("qrgate.enroll")

ENROLL_PREFIX = f"{ca.TOPIC_PREFIX}/{ca.ENROLL_LEVEL}"
REQUEST_FILTER = f"{ENROLL_PREFIX}/+/csr"
MAX_MESSAGE_BYTES = 32 * 1024
VERSION = 1
TOKEN_FORMAT = "qrgate-enroll-token-1"  # firmware.admin.provision.TOKEN_FORMAT
REASONS = (
    "token_unknown",
    "token_used",
    "token_expired",
    "scope",
    "csr",
    "device_mismatch",
    "internal",
)
_HEX16 = re.compile(r"[0-9a-f]{16}", re.ASCII)
_HEX64 = re.compile(r"[0-9a-f]{64}", re.ASCII)
_REQUEST_ID = re.compile(r"[0-9A-Za-z_-]{1,64}", re.ASCII)
_MAX_NAME = 64


def csr_topic(device: str) -> str:
    """``qrgate/v1/_enroll/<device>/csr``: where a reader publishes its request."""
    return f"{ENROLL_PREFIX}/{device}/csr"


def cert_topic(device: str) -> str:
    """``qrgate/v1/_enroll/<device>/cert``: where the server answers."""
    return f"{ENROLL_PREFIX}/{device}/cert"


class Transport(Protocol):
    """The few MQTT operations enrollment needs (MQTT 3.1.1 over TLS). Implementations raise
    :class:`~provisioning.exceptions.ProvisioningError` subclasses (EnrollmentError with
    reason "transport") when the broker cannot be reached or refuses."""

    def connect(
        self,
        host: str,
        port: int,
        ca_file: str,
        username: str | None = None,
        password: str | None = None,
        *,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        """Connect with TLS trusting ``ca_file``; log in with ``username``/``password`` or a
        client certificate (``cert_file``/``key_file``). Returns after a successful CONNACK."""
        ...

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Publish; returns once the broker has it (PUBACK) for QoS 1."""
        ...

    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe; returns after a SUBACK that grants it."""
        ...

    def next_message(self, timeout_s: float) -> tuple[str, bytes] | None:
        """The next (topic, payload) received, or None after ``timeout_s`` seconds."""
        ...

    def close(self) -> None:
        """Disconnect; safe to call twice."""
        ...


# --- messages -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EnrollRequest:
    """One reader's request. ``token_id`` and ``token_secret``: 8 bytes each
    (:class:`provisioning.qr.ProvisioningClaims`)."""

    device: str
    csr: str
    token_id: bytes
    token_secret: bytes
    site: str
    door: str
    request_id: str

    def to_bytes(self) -> bytes:
        """The JSON message."""
        return json.dumps(
            {
                "v": VERSION,
                "device": self.device,
                "csr": self.csr,
                "token_id": self.token_id.hex(),
                "token_secret": self.token_secret.hex(),
                "site": self.site,
                "door": self.door,
                "request_id": self.request_id,
            }
        ).encode()


def _load_object(payload: bytes) -> dict[str, Any]:
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"larger than {MAX_MESSAGE_BYTES} bytes")
    doc = json.loads(payload.decode("utf-8"))
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError(f"not a version {VERSION} object")
    return doc


def _text(doc: Mapping[str, Any], key: str, limit: int = _MAX_NAME) -> str:
    value = doc.get(key)
    if not isinstance(value, str) or not value or len(value) > limit:
        raise ValueError(f"{key}: a string of 1-{limit} characters is needed")
    return value


def parse_request(topic: str, payload: bytes) -> EnrollRequest:
    """The request in ``payload`` received on ``topic``. Raises ValueError (too large, not
    JSON, a missing or mistyped field, or the topic's device differing from ``device``)."""
    doc = _load_object(payload)
    device = _text(doc, "device")
    if not is_device_id(device) or topic != csr_topic(device):
        raise ValueError(f"device {device!r:.80} is not a device id or not the topic's")
    token_id, secret = _text(doc, "token_id"), _text(doc, "token_secret")
    if not _HEX16.fullmatch(token_id) or not _HEX16.fullmatch(secret):
        raise ValueError("token_id and token_secret: 16 lowercase hex digits each")
    request_id = _text(doc, "request_id")
    if not _REQUEST_ID.fullmatch(request_id):
        raise ValueError("request_id: 1-64 of A-Za-z0-9_-")
    return EnrollRequest(
        device=device,
        csr=_text(doc, "csr", ca.MAX_CSR_BYTES),
        token_id=bytes.fromhex(token_id),
        token_secret=bytes.fromhex(secret),
        site=_text(doc, "site"),
        door=_text(doc, "door"),
        request_id=request_id,
    )


def answer_ok(request_id: str, cert_pem: bytes, chain_pem: bytes) -> bytes:
    """The success answer: the reader's certificate and the CA chain (issuing + root)."""
    return json.dumps(
        {
            "v": VERSION,
            "request_id": request_id,
            "ok": True,
            "cert": cert_pem.decode("ascii"),
            "chain": chain_pem.decode("ascii"),
        }
    ).encode()


def answer_fail(request_id: str, reason: str, detail: str) -> bytes:
    """A refusal; ``reason`` one of :data:`REASONS`, ``detail`` a short human sentence."""
    if reason not in REASONS:
        raise ValueError(f"unknown reason {reason!r}")
    return json.dumps(
        {"v": VERSION, "request_id": request_id, "ok": False, "reason": reason, "detail": detail}
    ).encode()


# --- the token store -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Token:
    """A stored token: ``token_id`` (16 hex), scope (``fleet``, ``site``, ``door``,
    ``direction``), ``exp`` (seconds since the epoch), ``used_at`` (seconds, or None) and
    ``used_by`` (the device that spent it, or None)."""

    token_id: str
    fleet: str
    site: str
    door: str
    direction: str
    exp: int
    used_at: int | None
    used_by: str | None


_SCHEMA = """
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    secret_sha256 TEXT NOT NULL,
    fleet TEXT NOT NULL,
    site TEXT NOT NULL,
    door TEXT NOT NULL,
    direction TEXT NOT NULL,
    exp INTEGER NOT NULL,
    added_at INTEGER NOT NULL,
    used_at INTEGER,
    used_by TEXT
)
"""
_COLUMNS = "token_id, fleet, site, door, direction, exp, used_at, used_by"


class TokenStore:
    """Enrollment tokens in the SQLite file ``path`` (created 0600): each token's id, SHA-256
    of its secret (never the secret), scope, expiry and whether it was used. Safe to use from
    several threads and processes (a connection per call; SQLite's file locks).

    Raises TokenStoreError (damaged or unwritable database, bad token records)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            os.close(fd)
            with self._db() as db:
                db.execute(_SCHEMA)
        except OSError as e:
            raise TokenStoreError(f"{self.path}: cannot open: {e.strerror or e}") from None

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        try:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}") from None
        try:
            yield db
        except sqlite3.Error as e:
            raise TokenStoreError(f"{self.path}: {e}; restore or recreate the database") from None
        finally:
            db.close()

    def add(self, record: Mapping[str, Any]) -> Token:
        """Store a token record as ``qrgate provision qr --token-out`` writes it (format
        ``qrgate-enroll-token-1``); only the secret's hash is kept. Adding the same record
        again changes nothing. Raises TokenStoreError (not such a record; the id is already
        stored with a different secret or scope)."""
        try:
            if record.get("format") != TOKEN_FORMAT:
                raise ValueError(f"format is not {TOKEN_FORMAT}")
            token_id = str(record["token_id"])
            digest = str(record["secret_sha256"])
            if not _HEX16.fullmatch(token_id) or not _HEX64.fullmatch(digest):
                raise ValueError("token_id or secret_sha256 is not lowercase hex of the right size")
            if "secret" in record:
                secret = bytes.fromhex(str(record["secret"]))
                if hashlib.sha256(secret).hexdigest() != digest:
                    raise ValueError("secret_sha256 is not the SHA-256 of secret")
            row = (
                token_id,
                digest,
                str(record["fleet"]),
                str(record["site"]),
                str(record["door"]),
                str(record["direction"]),
                int(record["exp"]),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise TokenStoreError(f"not an enrollment token record: {e}") from None
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO tokens (token_id, secret_sha256, fleet, site, door, "
                "direction, exp, added_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (*row, int(time.time())),
            )
            stored = db.execute(
                "SELECT token_id, secret_sha256, fleet, site, door, direction, exp "
                "FROM tokens WHERE token_id = ?",
                (token_id,),
            ).fetchone()
        if tuple(stored) != row:
            raise TokenStoreError(f"token {token_id} is already stored with another secret/scope")
        token = self.get(token_id)
        assert token is not None
        return token

    def add_file(self, path: Path | str) -> Token:
        """:meth:`add` the JSON token file at ``path``. Raises TokenStoreError."""
        try:
            with Path(path).open("rb") as f:
                data = f.read(65_537)
            if len(data) > 65_536:
                raise ValueError("larger than 64 KiB")
            doc = json.loads(data)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
        except OSError as e:
            raise TokenStoreError(f"{path}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise TokenStoreError(f"{path}: not a token file: {e}") from None
        return self.add(doc)

    def get(self, token_id: str) -> Token | None:
        """The token with this id (16 hex), or None."""
        with self._db() as db:
            row = db.execute(
                f"SELECT {_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
            ).fetchone()
        return None if row is None else Token(*row)

    def list(self) -> list[Token]:
        """Every token, by expiry."""
        with self._db() as db:
            rows = db.execute(f"SELECT {_COLUMNS} FROM tokens ORDER BY exp, token_id").fetchall()
        return [Token(*r) for r in rows]

    def redeem(
        self, token_id: bytes, secret: bytes, *, site: str, door: str, device: str, now: float
    ) -> Token:
        """Check the token (see the module docstring for the order) and consume it for
        ``device`` at ``now`` (seconds since the epoch, the server's clock). Returns the token
        as it was before. Raises EnrollmentError ("token_unknown", "token_used",
        "token_expired", "scope") and TokenStoreError."""
        tid = token_id.hex()
        with self._db() as db:
            row = db.execute(
                "SELECT secret_sha256, site, door, exp, used_at FROM tokens WHERE token_id = ?",
                (tid,),
            ).fetchone()
            # hash even when the id is unknown, so both refusals cost the same
            given = hashlib.sha256(secret).digest()
            stored = bytes.fromhex(row[0]) if row is not None else b"\0" * 32
            if not hmac.compare_digest(given, stored) or row is None:
                raise EnrollmentError("token_unknown", "no token with this id and secret")
            _, t_site, t_door, exp, used_at = row
            if used_at is not None:
                raise EnrollmentError("token_used", f"token {tid} was already used")
            if now >= exp:
                raise EnrollmentError("token_expired", f"token {tid} expired")
            if (site, door) != (t_site, t_door):
                raise EnrollmentError("scope", f"token {tid} is for {t_site}/{t_door}")
            token = self.get(tid)
            won = db.execute(
                "UPDATE tokens SET used_at = ?, used_by = ? WHERE token_id = ? AND used_at IS NULL",
                (int(now), device, tid),
            ).rowcount
        if won != 1:
            raise EnrollmentError("token_used", f"token {tid} was already used")
        assert token is not None
        return token


# --- the server -----------------------------------------------------------------------------


class EnrollmentServer:
    """Answers enrollment requests: ``ca_folder`` (the fleet CA, :mod:`provisioning.ca`),
    ``tokens``, a connected ``transport`` (as the back office, on the certificate listener),
    ``clock`` (seconds since the epoch; the server's, trusted), ``days`` (certificate
    validity). Every decision is logged on the ``qrgate.enroll`` logger."""

    def __init__(
        self,
        ca_folder: Path | str,
        tokens: TokenStore,
        transport: Transport,
        clock: Callable[[], float] = time.time,
        *,
        days: int = 730,
    ) -> None:
        self.ca_folder = Path(ca_folder)
        self.tokens = tokens
        self.transport = transport
        self.clock = clock
        self.days = days
        self._started = False

    def start(self) -> None:
        """Subscribe to every reader's request topic (once)."""
        if not self._started:
            self.transport.subscribe(REQUEST_FILTER)
            self._started = True

    def decide(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """(answer topic, answer) for one received message, or None when it cannot be read
        (see the module docstring). Issues the certificate when the answer is ok."""
        try:
            req = parse_request(topic, payload)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            # RecursionError: json's answer to deeply nested arrays
            log.warning("enroll: dropped unreadable request on %.120s: %.200s", topic, e)
            return None
        try:
            cert, chain = self._issue(req)
        except EnrollmentError as e:
            log.warning(
                "enroll: refused %s (token %s, request %s): %s %s",
                req.device,
                req.token_id.hex(),
                req.request_id,
                e.reason,
                e.detail,
            )
            return cert_topic(req.device), answer_fail(req.request_id, e.reason, e.detail)
        log.info(
            "enroll: issued %s a certificate (token %s, request %s)",
            req.device,
            req.token_id.hex(),
            req.request_id,
        )
        return cert_topic(req.device), answer_ok(req.request_id, cert, chain)

    def _issue(self, req: EnrollRequest) -> tuple[bytes, bytes]:
        try:
            self.tokens.redeem(
                req.token_id,
                req.token_secret,
                site=req.site,
                door=req.door,
                device=req.device,
                now=self.clock(),
            )
        except TokenStoreError as e:
            raise EnrollmentError("internal", "the token store failed") from e
        try:
            _, cn = ca.check_csr(req.csr)
        except CsrError as e:
            raise EnrollmentError("csr", str(e)) from None
        if cn != req.device:
            raise EnrollmentError("device_mismatch", f"the CSR names {cn!r}, not {req.device!r}")
        try:
            cert = ca.sign_csr(self.ca_folder, req.csr, days=self.days, expect_cn=req.device)
            chain = (self.ca_folder / ca.ISSUING_CRT).read_bytes() + (
                self.ca_folder / ca.ROOT_CRT
            ).read_bytes()
        except CsrError as e:  # a reserved name
            raise EnrollmentError("csr", str(e)) from None
        except (CaError, OSError, ValueError) as e:
            log.error("enroll: the CA failed: %s", e)
            raise EnrollmentError("internal", "the CA could not sign; try again later") from e
        return cert, chain

    def serve_once(self, timeout_s: float) -> bool:
        """Handle at most one message; False when none came within ``timeout_s``."""
        got = self.transport.next_message(timeout_s)
        if got is None:
            return False
        out = self.decide(*got)
        if out is not None:
            try:
                self.transport.publish(out[0], out[1], qos=1)
            except EnrollmentError as e:
                # the reader times out and may retry; a spent token then answers token_used
                log.error("enroll: could not send the answer on %s: %s", out[0], e.detail)
        return True

    def serve(self, stop: threading.Event, poll_s: float = 0.5) -> None:
        """:meth:`start` if not done yet, then handle requests until ``stop`` is set."""
        self.start()
        while not stop.is_set():
            try:
                self.serve_once(poll_s)
            except Exception:
                # one bad request must not stop enrollment for the whole fleet
                log.exception("enroll: unexpected failure; still serving")


# --- the reader -----------------------------------------------------------------------------


def enroll(
    transport: Transport,
    keys: DeviceKeys,
    device_id: str,
    token_id: bytes,
    token_secret: bytes,
    *,
    site: str,
    door: str,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """Enroll this reader over a ``transport`` already connected to the enrollment listener:
    make a key if there is none (:meth:`DeviceKeys.create_key`) and a CSR, subscribe to the
    answer topic, publish the request, wait up to ``timeout_s`` seconds for the answer with
    this request's id, store the certificate and chain (:meth:`DeviceKeys.store_certificate`).
    Returns :meth:`DeviceKeys.status` for ``device_id``. The caller then closes the transport
    and connects with the certificate.

    Raises EnrollmentError: the server's reason, "timeout" (no answer: retry with the same
    code while it is valid) or "csr" (the certificate does not fit this key); DeviceKeyError
    as DeviceKeys."""
    if not keys.has_key():
        keys.create_key()
    csr = keys.make_csr(device_id).decode("ascii")
    request_id = secrets.token_hex(8)
    transport.subscribe(cert_topic(device_id))
    req = EnrollRequest(device_id, csr, token_id, token_secret, site, door, request_id)
    transport.publish(csr_topic(device_id), req.to_bytes(), qos=1)
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        got = transport.next_message(left)
        if got is None:
            break
        topic, payload = got
        if topic != cert_topic(device_id):
            continue
        try:
            doc = _load_object(payload)
        except (ValueError, UnicodeDecodeError, RecursionError):
            continue
        if doc.get("request_id") != request_id:
            continue  # an answer to an earlier try
        if doc.get("ok") is not True:
            reason = doc.get("reason")
            raise EnrollmentError(
                reason if reason in REASONS else "internal", str(doc.get("detail", ""))[:300]
            )
        cert, chain = doc.get("cert"), doc.get("chain")
        if not isinstance(cert, str) or not isinstance(chain, str):
            raise EnrollmentError("internal", "the answer has no certificate")
        try:
            keys.store_certificate(cert.encode(), chain.encode(), device_id=device_id)
        except DeviceCertificateError as e:
            raise EnrollmentError("csr", str(e)) from None
        return keys.status(device_id)
    raise EnrollmentError("timeout", f"no answer within {timeout_s:g} s")
