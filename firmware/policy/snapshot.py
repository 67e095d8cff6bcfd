"""Signed credential snapshots and deltas: verified, applied whole or not at all, kept.

A **snapshot** carries everything a reader decides with (trust list, badges, denylist,
schedules) as one versioned, signed unit. It is a tagged COSE_Sign1 (RFC 9052 §4.2, made by
:func:`firmware.policy.cose.sign1`: alg and kid in the protected header, empty external_aad)
whose payload is the CBOR (RFC 8949) encoding of the credential set's document form
(:mod:`firmware.policy.credentials`), with ``version`` and ``issued_at`` required::

    {"version": 7,              # integer 1 .. 2**53-1; only a higher version replaces the set
     "issued_at": 1790000000,   # seconds since the epoch, when it was built (informational)
     "site": "hq",              # optional: a reader of another site ([uplink] site) refuses
                                #   it; without one, readers of any site take it
     "trust": {...}, "badges": {...}, "deny": {...}, "schedules": {...}}   # each optional

A part left out is empty in the new set: a snapshot is whole, never laid over the set before.

A **delta** changes the snapshot in force into the next version without sending it all::

    {"delta": true, "base": 7, "version": 8, "issued_at": 1790003600, "site": "hq",
     "add":    {"deny": {"cti": [...], "sub": [[iss, sub], ...]},
                "badges": {"allow": [{"subject", "label"} | "<subject>", ...], "deny": [...]}},
     "remove": {"deny": {"cti": [...], "sub": [...]},
                "badges": {"allow": ["<subject>", ...], "deny": ["<subject>", ...]}},
     "trust": {...}, "schedules": {...}}     # optional: replace that part whole

A delta applies only over the version it names as ``base``; an entry both added and removed
stays denied (fail closed); an added allow entry sets its label.

Signing key: Ed25519 ("EdDSA") or P-256 ("ES256") in the PEM files of
:mod:`firmware.policy.keys`; the reader holds the public key in ``[policy] snapshot_key`` and
accepts only snapshots whose kid (:func:`firmware.policy.cose.kid_of`) and signature match it.

Checks, in the order :meth:`SnapshotStore.apply` makes them (the parts' content last, so an
old snapshot is refused without being built); each refusal is a
:class:`~firmware.exceptions.SnapshotError` whose ``why`` attribute (:func:`why_of`) is one
stable word and whose message says what to do:

=====================  ========================================================================
why                    when
=====================  ========================================================================
``too_large``          more than :data:`MAX_SNAPSHOT_BYTES` (64 MB)
``no_key``             the reader has no ``snapshot_key`` ("no snapshot_key configured")
``not_cose``           not a well-formed tagged COSE_Sign1 (a delta or snapshot from elsewhere)
``bad_signature``      signed by another key, or the signature does not verify
``content``            the payload is not strict CBOR (no tags, definite lengths), not a map,
                       or lacks a valid version or issued_at
``wrong_site``         its ``site`` is not this reader's site
``older``              its version is below the one in force (an equal version is a no-op)
``delta_base``         a delta whose base is not the version in force ("delta for base N,
                       version in force is K: publish a full snapshot")
``too_many_deltas``    more than :data:`MAX_DELTAS` deltas (or :data:`MAX_KEPT_BYTES`) since the
                       last full snapshot
``content``            a part (trust, badges, deny, schedules; a delta's add and remove) is
                       invalid, or the document has an unknown key; the message names the entry
``cannot_keep``        the file could not be written: not kept means not applied
=====================  ========================================================================

The signature is checked before the payload is decoded, so unauthenticated bytes only ever
meet the small envelope parser.

**Kept file**: ``credentials.snapshot`` in the state folder, a CBOR map
``{"format": "qrgate-credentials-1", "base": <signed snapshot bytes>, "deltas": [<signed
delta bytes>, ...], "applied_at": <seconds since the epoch>, "source": <text>}``: the full
snapshot in force and every delta applied over it since, so a restart rebuilds exactly the
same set (each part verified again). It is written whole before the new set is handed out:
temp file in the same folder, fsync, ``os.replace``, fsync of the folder, so a crash or power
cut at any moment leaves either the old file or the new one. At start a file that cannot be
read, decoded, verified with the configured key, or is for another site is moved aside as
``credentials.snapshot.damaged-<UTC time>`` (the newest :data:`KEEP_DAMAGED` are kept) with
the reason logged, and the reader starts on its local files. Without a ``snapshot_key`` the
file is left where it is and not used.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cbor2

from firmware.exceptions import CredentialListError, PassError, SnapshotError
from firmware.policy import cose
from firmware.policy.badges import BadgeList, badges_from_json
from firmware.policy.cose import PrivateKey, PublicKey
from firmware.policy.credentials import (
    DOCUMENT_KEYS,
    MAX_NAME_CHARS,
    CredentialSet,
    credentials_from_json,
    deny_keys,
)
from firmware.policy.schedules import Schedules
from firmware.policy.trust import TrustList
from provisioning.files import fsync_dir

log = logging.getLogger(__name__)

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
"""The largest signed snapshot or delta taken, bytes (about 1.8 million revoked pass ids)."""
MAX_DELTAS = 256
"""Deltas applied over one full snapshot at most; then a full snapshot is needed."""
MAX_KEPT_BYTES = 2 * MAX_SNAPSHOT_BYTES
"""The kept file (base plus deltas) at most, bytes."""
MAX_VERSION = 2**53 - 1
"""The highest version (JSON's exact integers, as ``config/desired``)."""
MAX_PAYLOAD_ITEMS = 10_000_000
"""CBOR data items in one payload at most (2 million [iss, sub] pairs are 6 million)."""
MAX_PAYLOAD_DEPTH = 16
"""Nesting of arrays and maps in a payload at most (a schedule window is 5 deep)."""
FILE_NAME = "credentials.snapshot"
KEPT_FORMAT = "qrgate-credentials-1"
KEEP_DAMAGED = 3
"""Moved-aside kept files left on the card (each can be 128 MB): the newest ones."""
WRITE_CHUNK = 1024 * 1024
"""Bytes per write() of the kept file."""

COSE_SIGN1_FIRST_BYTE = 0xC0 | cose.COSE_SIGN1_TAG  # 0xD2: what a signed payload starts with
DELTA_KEYS = (
    "delta",
    "base",
    "version",
    "issued_at",
    "site",
    "add",
    "remove",
    "trust",
    "schedules",
)
CHANGE_KEYS = ("deny", "badges")


# --- errors -----------------------------------------------------------------------------------


def snapshot_error(why: str, message: str, version: int | None = None) -> SnapshotError:
    """A SnapshotError with ``why`` (a stable word, see the module table) and the ``version``
    refused (None when unknown), both readable with :func:`why_of` / :func:`version_of`."""
    e = SnapshotError(message)
    # SnapshotError takes only a message; these ride along for the status
    setattr(e, "why", why)  # noqa: B010
    setattr(e, "version", version)  # noqa: B010
    return e


def why_of(e: SnapshotError) -> str:
    """The stable ``why`` of a refusal ("content" for a SnapshotError made elsewhere)."""
    why = getattr(e, "why", None)
    return why if isinstance(why, str) else "content"


def version_of(e: SnapshotError) -> int | None:
    """The version a refusal was about, None when it is not known."""
    v = getattr(e, "version", None)
    return v if isinstance(v, int) else None


# --- the signed unit --------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A signed snapshot or delta, taken apart.

    ``data``: the signed bytes as received. ``kid``: the signing key's id. ``version``,
    ``issued_at`` (seconds since the epoch), ``site`` ("" when it names none), ``base`` (the
    version a delta applies over; None for a full snapshot). ``doc``: the decoded payload map.
    ``verified``: the signature was checked against a key (False only from
    :func:`read_snapshot` with ``public_key=None``, for tools that show a file).
    """

    data: bytes
    kid: bytes
    version: int
    issued_at: int
    site: str
    base: int | None
    doc: Mapping[str, Any]
    verified: bool

    @property
    def is_delta(self) -> bool:
        """True for a delta."""
        return self.base is not None


def sign_snapshot(doc: Mapping[str, Any], key: PrivateKey) -> bytes:
    """The signed bytes of snapshot or delta document ``doc`` (module docstring): its
    canonical CBOR (RFC 8949 §4.2.1) in a COSE_Sign1 by ``key``, kid = kid_of(its public key).

    Only the envelope is made here; :func:`read_snapshot` and :func:`build_set` check the
    content. Raises ValueError for an unsupported key or a result over MAX_SNAPSHOT_BYTES."""
    payload = cbor2.dumps(dict(doc), canonical=True)
    data = cose.sign1(payload, key, cose.kid_of(key.public_key()))
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise ValueError(f"the snapshot is {len(data)} bytes, over the {MAX_SNAPSHOT_BYTES} cap")
    return data


def _envelope(data: bytes) -> cose.Sign1:
    """The COSE_Sign1 in ``data`` with its structure checked, not its signature.

    :func:`firmware.policy.cose.parse_sign1` caps a whole COSE_Sign1 at 4096 bytes (a pass), so
    the headers and signature are checked by it on the envelope with the payload left out,
    and the payload is put back afterwards."""
    if data[:1] != bytes([COSE_SIGN1_FIRST_BYTE]):
        raise snapshot_error("not_cose", "not a signed snapshot: expected a tagged COSE_Sign1")
    try:
        body = cose.decode_cbor(data, "cbor", tag=cose.COSE_SIGN1_TAG).value
        if not isinstance(body, list) or len(body) != 4 or not isinstance(body[2], bytes):
            raise cose.malformed("cose_structure", "COSE_Sign1 must be an array of 4")
        envelope = cbor2.dumps(cbor2.CBORTag(cose.COSE_SIGN1_TAG, [body[0], body[1], b"", body[3]]))
        sign1 = cose.parse_sign1(envelope)
    except PassError as e:
        raise snapshot_error("not_cose", f"not a signed snapshot: {e}") from None
    except Exception as e:  # cbor2 re-encoding an odd but well-formed header
        raise snapshot_error("not_cose", f"not a signed snapshot: {type(e).__name__}") from None
    return dataclasses.replace(sign1, payload=body[2])


def _check_key(sign1: cose.Sign1, public_key: PublicKey) -> None:
    want = cose.kid_of(public_key)
    if sign1.kid != want:
        raise snapshot_error(
            "bad_signature",
            f"bad signature: signed by key {sign1.kid.hex()}, not by the snapshot key "
            f"{want.hex()} ([policy] snapshot_key)",
        )
    try:
        cose.verify(sign1, public_key, cose.alg_of(public_key))
    except PassError as e:
        raise snapshot_error("bad_signature", f"bad signature: {e}") from None


def _strict_cbor(data: bytes) -> None:
    """Check that ``data`` is one well-formed CBOR item (RFC 8949 §3) with definite lengths,
    no tags, no simple values but false/true/null/floats, at most MAX_PAYLOAD_ITEMS items
    and MAX_PAYLOAD_DEPTH deep, and nothing after it; raises SnapshotError ("content").

    cbor2 has no switch to turn its tag decoders off (see :mod:`firmware.policy.cose`), and
    :func:`firmware.policy.cose.decode_cbor` is capped for a pass (512 items), so the payload
    gets this check with a snapshot's caps. One loop with an explicit stack, no recursion."""
    n = len(data)
    pos = items = 0
    pending = 1
    stack: list[int] = []
    problem = ""
    while not problem:
        while pending == 0 and stack:
            pending = stack.pop()
        if pending == 0:
            if pos != n:
                problem = f"{n - pos} bytes after the CBOR item"
            break
        pending -= 1
        items += 1
        if items > MAX_PAYLOAD_ITEMS:
            problem = f"more than {MAX_PAYLOAD_ITEMS} data items"
            break
        if pos >= n:
            problem = "truncated"
            break
        head = data[pos]
        major, info = head >> 5, head & 0x1F
        pos += 1
        if info < 24:
            arg = info
        elif info < 28:
            end = pos + (1 << (info - 24))
            if end > n:
                problem = "truncated"
                break
            arg = int.from_bytes(data[pos:end], "big")
            pos = end
        else:
            problem = f"indefinite length or reserved value (byte 0x{head:02x})"
            break
        if major <= 1:
            continue
        if major <= 3:
            if arg > n - pos:
                problem = "truncated"
            pos += arg
        elif major <= 5:
            count = arg if major == 4 else 2 * arg
            if count > n - pos:
                problem = "truncated"
            elif count:
                if len(stack) >= MAX_PAYLOAD_DEPTH:
                    problem = f"nested deeper than {MAX_PAYLOAD_DEPTH}"
                stack.append(pending)
                pending = count
        elif major == 6:
            problem = f"CBOR tag {arg} (no tags allowed)"
        elif info not in (20, 21, 22, 25, 26, 27):
            problem = f"simple value (byte 0x{head:02x})"
    if problem:
        raise snapshot_error(
            "content", f"broken content: the payload is not strict CBOR: {problem}"
        )


def _int_field(doc: Mapping[str, Any], key: str, low: int, version: int | None = None) -> int:
    v = doc.get(key)
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= MAX_VERSION:
        raise snapshot_error(
            "content",
            f"broken content: '{key}' must be an integer from {low} to {MAX_VERSION}, "
            f"found {v!r:.40}",
            version,
        )
    return v


def _decode(sign1: cose.Sign1, data: bytes, verified: bool) -> Snapshot:
    _strict_cbor(sign1.payload)
    try:
        doc = cbor2.loads(sign1.payload)
    except Exception as e:  # well formed by now: invalid UTF-8 in a text string, say
        raise snapshot_error(
            "content", f"broken content: the payload does not decode: {type(e).__name__}"
        ) from None
    if not isinstance(doc, dict):
        raise snapshot_error("content", "broken content: the payload must be a CBOR map")
    version = _int_field(doc, "version", 1)
    issued_at = _int_field(doc, "issued_at", 0, version)
    site = doc.get("site", "")
    if not isinstance(site, str) or len(site) > MAX_NAME_CHARS:
        raise snapshot_error(
            "content", f"broken content: 'site' must be a short string, found {site!r:.40}", version
        )
    base: int | None = None
    if "delta" in doc:
        if doc["delta"] is not True:
            raise snapshot_error(
                "content", "broken content: 'delta' must be true or left out", version
            )
        base = _int_field(doc, "base", 1, version)
        if base >= version:
            raise snapshot_error(
                "content",
                f"broken content: a delta's version ({version}) must be above its base ({base})",
                version,
            )
    return Snapshot(data, sign1.kid, version, issued_at, site, base, doc, verified)


def read_snapshot(data: bytes, public_key: PublicKey | None) -> Snapshot:
    """Check the size, the envelope and the signature of a snapshot or delta (against
    ``public_key``), then decode its payload and its version fields; the parts are checked by
    :func:`build_set`. ``public_key=None`` skips the signature (``verified`` False): for
    tools showing a file, never for a reader. Raises SnapshotError (why ``too_large``,
    ``not_cose``, ``bad_signature``, ``content``)."""
    if not isinstance(data, bytes | bytearray):
        raise snapshot_error("not_cose", "not a signed snapshot: expected bytes")
    data = bytes(data)
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise snapshot_error(
            "too_large", f"too large: {len(data)} bytes, over the {MAX_SNAPSHOT_BYTES} cap"
        )
    sign1 = _envelope(data)
    if public_key is not None:
        _check_key(sign1, public_key)
    return _decode(sign1, data, public_key is not None)


# --- building sets ----------------------------------------------------------------------------


def _content(e: Exception, version: int) -> SnapshotError:
    return snapshot_error("content", f"broken content: {e}", version)


def build_set(snapshot: Snapshot, current: CredentialSet | None = None) -> CredentialSet:
    """The credential set a snapshot stands for (source "snapshot"), or for a delta the set
    ``current`` becomes with it (``current`` must be the delta's base; not checked here).
    Nothing is shared with ``current`` that a later change could alter. Raises SnapshotError
    ("content", or "delta_base" for a delta without a ``current``)."""
    if snapshot.is_delta:
        if current is None:
            raise snapshot_error(
                "delta_base",
                f"delta for base {snapshot.base}, version in force is 0: publish a full snapshot",
                snapshot.version,
            )
        return apply_delta(current, snapshot)
    unknown = sorted(str(k) for k in snapshot.doc if k not in DOCUMENT_KEYS)
    if unknown:
        raise _content(
            CredentialListError(f"unknown key {unknown[0]!r:.40} (expected {DOCUMENT_KEYS})"),
            snapshot.version,
        )
    try:
        return credentials_from_json(snapshot.doc, source="snapshot")
    except CredentialListError as e:
        raise _content(e, snapshot.version) from None
    except Exception as e:  # fail closed on anything the part parsers did not foresee
        raise _content(Exception(f"unexpected {type(e).__name__}"), snapshot.version) from None


def _changes(doc: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    part = doc.get(key, {})
    if not isinstance(part, Mapping):
        raise CredentialListError(f"delta: '{key}' must be a map of deny, badges")
    unknown = sorted(str(k) for k in part if k not in CHANGE_KEYS)
    if unknown:
        raise CredentialListError(f"delta: {key}: unknown key {unknown[0]!r:.40} (deny, badges)")
    return part


def apply_delta(current: CredentialSet, delta: Snapshot) -> CredentialSet:
    """``current`` changed by ``delta`` (module docstring) as a new set; ``current`` is left
    as it was. Revocation counts stay exact: an added key already denied, or a removed key not
    denied, changes nothing. Raises SnapshotError ("content")."""
    try:
        return _apply_delta(current, delta)
    except CredentialListError as e:
        raise _content(e, delta.version) from None
    except Exception as e:  # fail closed on anything the part parsers did not foresee
        raise _content(Exception(f"unexpected {type(e).__name__}"), delta.version) from None


def _apply_delta(current: CredentialSet, delta: Snapshot) -> CredentialSet:
    doc = delta.doc
    unknown = sorted(str(k) for k in doc if k not in DELTA_KEYS)
    if unknown:
        raise CredentialListError(f"delta: unknown key {unknown[0]!r:.40} (expected {DELTA_KEYS})")
    add, remove = _changes(doc, "add"), _changes(doc, "remove")
    add_keys, add_cti, _ = deny_keys(add.get("deny"))
    rm_keys, rm_cti, _ = deny_keys(remove.get("deny"))
    old = current.denylist
    counts = [current.deny_cti, current.deny_sub]
    for kind, (added, removed) in enumerate(
        (
            (set(add_keys[:add_cti]), set(rm_keys[:rm_cti])),
            (set(add_keys[add_cti:]), set(rm_keys[rm_cti:])),
        )
    ):
        counts[kind] += sum(1 for k in added if k not in old)
        counts[kind] -= sum(1 for k in removed - added if k in old)
    denylist = old.with_changes(add=add_keys, remove=rm_keys)
    badges = current.badges
    if "badges" in add or "badges" in remove:
        plus = badges_from_json(add.get("badges", {}), "delta: add.badges")
        minus = badges_from_json(remove.get("badges", {}), "delta: remove.badges")
        allow = (badges.allow - minus.allow) | plus.allow
        labels = {s: label for s, label in badges.labels.items() if s in allow}
        for s in plus.allow:  # an added entry sets its label, or clears it
            labels.pop(s, None)
        labels.update(plus.labels)
        badges = BadgeList(
            allow=frozenset(allow),
            deny=frozenset((badges.deny - minus.deny) | plus.deny),
            labels=labels,
            version=badges.version,
        )
    trust = TrustList.from_json(doc["trust"]) if "trust" in doc else current.trust
    schedules = Schedules.from_json(doc["schedules"]) if "schedules" in doc else current.schedules
    return CredentialSet(
        trust=trust,
        badges=badges,
        denylist=denylist,
        schedules=schedules,
        version=delta.version,
        site=delta.site or current.site,
        issued_at=delta.issued_at,
        source="snapshot",
        deny_cti=max(0, counts[0]),
        deny_sub=max(0, counts[1]),
    )


# --- documents for the issuing tools ----------------------------------------------------------


def snapshot_document(
    *,
    version: int,
    issued_at: int,
    site: str = "",
    trust: object = None,
    badges: object = None,
    deny: object = None,
    schedules: object = None,
) -> dict[str, Any]:
    """A snapshot document (module docstring) from its parts (the parts' JSON documents;
    None: left out). Not checked here: :func:`check_document` does."""
    doc: dict[str, Any] = {"version": version, "issued_at": issued_at}
    if site:
        doc["site"] = site
    for key, part in (
        ("trust", trust),
        ("badges", badges),
        ("deny", deny),
        ("schedules", schedules),
    ):
        if part is not None:
            doc[key] = part
    return doc


def check_document(doc: object) -> CredentialSet:
    """The set a snapshot document stands for, every part checked as a reader will (the
    signature aside). Raises SnapshotError ("content")."""
    if not isinstance(doc, Mapping):
        raise snapshot_error("content", "broken content: the document must be a map")
    payload = cbor2.dumps(dict(doc), canonical=True)
    sign1 = cose.Sign1(b"", {}, payload, b"", cose.EDDSA, b"-")
    snap = _decode(sign1, b"", verified=False)
    if snap.is_delta:
        raise snapshot_error("content", "broken content: a delta, not a snapshot", snap.version)
    return build_set(snap)


def _deny_sets(doc: Mapping[str, Any]) -> tuple[set[str], set[tuple[str, str]]]:
    part = doc.get("deny") or {}
    cti = {bytes.fromhex(c).hex() for c in part.get("cti", [])}
    sub = {(s[0], s[1]) for s in part.get("sub", [])}
    return cti, sub


def make_delta(
    old: Mapping[str, Any], new: Mapping[str, Any], *, version: int, issued_at: int, site: str = ""
) -> dict[str, Any]:
    """The delta document that turns snapshot document ``old`` into ``new`` (both already
    checked with :func:`check_document`) as version ``version``: the denylist and badge
    entries added and removed; trust list and schedules whole when they changed. Raises
    ValueError when ``version`` is not above ``old``'s."""
    base = int(old["version"])
    if version <= base:
        raise ValueError(f"the delta's version ({version}) must be above the base's ({base})")
    old_cti, old_sub = _deny_sets(old)
    new_cti, new_sub = _deny_sets(new)
    add: dict[str, Any] = {}
    remove: dict[str, Any] = {}
    if new_cti - old_cti or new_sub - old_sub:
        add["deny"] = {
            "cti": sorted(new_cti - old_cti),
            "sub": [list(s) for s in sorted(new_sub - old_sub)],
        }
    if old_cti - new_cti or old_sub - new_sub:
        remove["deny"] = {
            "cti": sorted(old_cti - new_cti),
            "sub": [list(s) for s in sorted(old_sub - new_sub)],
        }
    ob = badges_from_json(old.get("badges", {}), "base badges")
    nb = badges_from_json(new.get("badges", {}), "new badges")
    plus_allow = [
        {"subject": s, "label": nb.labels.get(s, "")}
        for s in sorted(nb.allow)
        if s not in ob.allow or nb.labels.get(s, "") != ob.labels.get(s, "")
    ]
    if plus_allow or nb.deny - ob.deny:
        add["badges"] = {"allow": plus_allow, "deny": sorted(nb.deny - ob.deny)}
    if ob.allow - nb.allow or ob.deny - nb.deny:
        remove["badges"] = {"allow": sorted(ob.allow - nb.allow), "deny": sorted(ob.deny - nb.deny)}
    doc: dict[str, Any] = {"delta": True, "base": base, "version": version, "issued_at": issued_at}
    if site:
        doc["site"] = site
    if add:
        doc["add"] = add
    if remove:
        doc["remove"] = remove
    empty_trust: dict[str, Any] = {"keys": []}
    if TrustList.from_json(old.get("trust", empty_trust)) != TrustList.from_json(
        new.get("trust", empty_trust)
    ):
        doc["trust"] = new.get("trust", empty_trust)
    empty_schedules = Schedules.empty().to_json()
    if Schedules.from_json(old.get("schedules", empty_schedules)) != Schedules.from_json(
        new.get("schedules", empty_schedules)
    ):
        doc["schedules"] = new.get("schedules", empty_schedules)
    return doc


# --- the store --------------------------------------------------------------------------------


class SnapshotStore:
    """The reader's applied snapshot: verified, applied whole, kept in ``state_dir``.

    ``public_key``: ``[policy] snapshot_key`` (None: every snapshot is refused with "no
    snapshot_key configured"). ``site``: this reader's site; a snapshot naming another is
    refused (None: not checked). ``clock``: wall clock, seconds since the epoch.

    :meth:`load` at start, then :meth:`apply` (or :meth:`verify` + :meth:`apply_verified`)
    from one thread at a time (they serialize on a lock); :meth:`status` and the properties
    from any thread. The caller puts a returned set in force with one assignment
    (``policy.credentials = new_set``).
    """

    def __init__(
        self,
        state_dir: Path,
        public_key: PublicKey | None,
        *,
        site: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_dir = Path(state_dir)
        self.public_key = public_key
        self.site = site or None
        self._clock = clock
        self._apply_lock = threading.Lock()
        self._lock = threading.Lock()
        self._current: CredentialSet | None = None
        self._base: bytes | None = None
        self._deltas: list[bytes] = []
        self._applied_at = 0
        self._source = ""
        self._refused: dict[str, Any] | None = None

    @property
    def path(self) -> Path:
        """The kept file."""
        return self.state_dir / FILE_NAME

    @property
    def current(self) -> CredentialSet | None:
        """The set of the snapshot in force, None before any."""
        with self._lock:
            return self._current

    @property
    def version(self) -> int:
        """The version in force (0: none, the local files)."""
        with self._lock:
            return self._current.version if self._current is not None else 0

    @property
    def source(self) -> str:
        """Where the snapshot in force came from (as given to :meth:`apply`), "" before any."""
        with self._lock:
            return self._source

    # --- start --------------------------------------------------------------------------------

    def load(self) -> CredentialSet | None:
        """The set kept by an earlier run, or None (none kept, no key, or not usable: then
        the file is moved aside and the reason logged). Never raises: a reader must start on
        its local files whatever the card holds. Also removes temp files a crash left."""
        self._remove_temp_files()
        path = self.path
        if not path.exists():
            return None
        if self.public_key is None:
            log.warning(
                "credential snapshot %s not used: no snapshot_key configured ([policy]); "
                "deciding with the local files",
                path,
            )
            return None
        try:
            current, base, deltas, applied_at, source = self._read_kept(path)
        except SnapshotError as e:
            self._move_aside(path, str(e))
            return None
        except Exception as e:  # never stop a reader over a file on its card
            self._move_aside(path, f"unexpected {type(e).__name__}: {e}")
            return None
        with self._lock:
            self._current, self._base, self._deltas = current, base, deltas
            self._applied_at, self._source = applied_at, source
        log.info(
            "credential snapshot version %d in force (kept, %d deltas): %s",
            current.version,
            len(deltas),
            current.summary(),
        )
        return current

    def _read_kept(self, path: Path) -> tuple[CredentialSet, bytes, list[bytes], int, str]:
        try:
            with path.open("rb") as f:
                raw = f.read(MAX_KEPT_BYTES + 4096)
        except OSError as e:
            raise snapshot_error("content", f"cannot read it: {e.strerror or e}") from None
        if len(raw) > MAX_KEPT_BYTES + 1024:
            raise snapshot_error("too_large", f"larger than {MAX_KEPT_BYTES} bytes")
        try:
            kept = cose.decode_cbor(raw, "kept")
        except PassError as e:
            raise snapshot_error("content", f"not a kept snapshot file: {e}") from None
        if not isinstance(kept, dict):
            kept = {}
        base, deltas = kept.get("base"), kept.get("deltas")
        applied_at, source = kept.get("applied_at"), kept.get("source")
        if (
            kept.get("format") != KEPT_FORMAT
            or not isinstance(base, bytes)
            or not isinstance(deltas, list)
            or not all(isinstance(d, bytes) for d in deltas)
            or len(deltas) > MAX_DELTAS
            or isinstance(applied_at, bool)
            or not isinstance(applied_at, int)
            or not isinstance(source, str)
        ):
            raise snapshot_error("content", f"not a kept snapshot file ({KEPT_FORMAT})")
        snap = self.verify(base)
        if snap.is_delta:
            raise snapshot_error("content", "the kept base is a delta")
        current = build_set(snap)
        for d in deltas:
            ds = self.verify(d)
            if ds.base != current.version:
                raise snapshot_error(
                    "delta_base",
                    f"a kept delta for base {ds.base} follows version {current.version}",
                )
            current = build_set(ds, current)
        return current, base, list(deltas), applied_at, source

    def _remove_temp_files(self) -> None:
        try:
            stale = list(self.state_dir.glob(f".{FILE_NAME}.*.tmp"))
        except OSError:
            return
        for p in stale:
            try:
                p.unlink()
            except OSError as e:
                log.warning("cannot remove the stale temp file %s: %s", p, e)

    def _move_aside(self, path: Path, reason: str) -> None:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{FILE_NAME}.damaged-{stamp}")
        try:
            os.replace(path, aside)
            fsync_dir(self.state_dir)
        except OSError as e:
            log.error(
                "credential snapshot %s unusable (%s) and cannot be moved aside (%s): "
                "deciding with the local files",
                path,
                reason,
                e,
            )
            return
        log.error(
            "credential snapshot %s unusable (%s): moved aside as %s; deciding with the local "
            "files until a new snapshot arrives",
            path,
            reason,
            aside.name,
        )
        try:
            old = sorted(self.state_dir.glob(f"{FILE_NAME}.damaged-*"))[:-KEEP_DAMAGED]
            for p in old:
                p.unlink()
        except OSError as e:
            log.warning("cannot remove older damaged snapshot files: %s", e)

    # --- applying -----------------------------------------------------------------------------

    def verify(self, data: bytes) -> Snapshot:
        """:func:`read_snapshot` with this reader's key, then the site check. Nothing is
        recorded. Raises SnapshotError (``too_large``, ``no_key``, ``not_cose``,
        ``bad_signature``, ``content``, ``wrong_site``)."""
        if isinstance(data, bytes | bytearray) and len(data) > MAX_SNAPSHOT_BYTES:
            raise snapshot_error(
                "too_large", f"too large: {len(data)} bytes, over the {MAX_SNAPSHOT_BYTES} cap"
            )
        if self.public_key is None:
            raise snapshot_error("no_key", "no snapshot_key configured")
        snap = read_snapshot(data, self.public_key)
        if self.site is not None and snap.site and snap.site != self.site:
            raise snapshot_error(
                "wrong_site",
                f"for site {snap.site!r}, this reader is at site {self.site!r}",
                snap.version,
            )
        return snap

    def apply(self, data: bytes, source: str = "") -> CredentialSet:
        """Verify, check the version, build the whole new set, keep it, return it (module
        docstring). An equal version returns the set in force unchanged. ``source``: where it
        came from, for the status. Raises SnapshotError with the reason, recorded as the last
        refusal in :meth:`status`; the set in force and the kept file stay as they were."""
        try:
            snap = self.verify(data)
        except SnapshotError as e:
            self.refuse(e)
            raise
        return self.apply_verified(snap, source)

    def apply_verified(self, snap: Snapshot, source: str = "") -> CredentialSet:
        """:meth:`apply` for a snapshot :meth:`verify` returned."""
        try:
            return self._apply(snap, source)
        except SnapshotError as e:
            self.refuse(e)
            raise

    def _apply(self, snap: Snapshot, source: str) -> CredentialSet:
        if not snap.verified:
            raise snapshot_error("bad_signature", "bad signature: not verified", snap.version)
        with self._apply_lock:
            with self._lock:
                current, base, deltas = self._current, self._base, list(self._deltas)
            in_force = current.version if current is not None else 0
            if current is not None and snap.version == in_force:
                return current
            if snap.version < in_force:
                raise snapshot_error(
                    "older",
                    f"older: version {snap.version}, version {in_force} is in force",
                    snap.version,
                )
            if snap.is_delta:
                if current is None or snap.base != in_force or base is None:
                    raise snapshot_error(
                        "delta_base",
                        f"delta for base {snap.base}, version in force is {in_force}: "
                        "publish a full snapshot",
                        snap.version,
                    )
                size = len(base) + sum(map(len, deltas)) + len(snap.data)
                if len(deltas) >= MAX_DELTAS or size > MAX_KEPT_BYTES:
                    raise snapshot_error(
                        "too_many_deltas",
                        f"{len(deltas)} deltas ({size} bytes) kept since the last full "
                        "snapshot: publish a full snapshot",
                        snap.version,
                    )
                new = build_set(snap, current)
                deltas.append(snap.data)
            else:
                new = build_set(snap)
                base, deltas = snap.data, []
            applied_at = int(self._clock())
            try:
                self._write(base, deltas, applied_at, source)
            except OSError as e:
                raise snapshot_error(
                    "cannot_keep",
                    f"cannot keep it on the reader: {e.strerror or e}; not applied",
                    snap.version,
                ) from None
            with self._lock:
                self._current, self._base, self._deltas = new, base, deltas
                self._applied_at, self._source = applied_at, source
            log.info(
                "credential snapshot version %d applied (%s, from %s): %s",
                new.version,
                f"delta over {snap.base}" if snap.base is not None else "full",
                source or "-",
                new.summary(),
            )
            return new

    def _write(self, base: bytes, deltas: list[bytes], applied_at: int, source: str) -> None:
        """Replace the kept file whole (module docstring). Raises OSError."""
        blob = cbor2.dumps(
            {
                "format": KEPT_FORMAT,
                "base": base,
                "deltas": deltas,
                "applied_at": applied_at,
                "source": source,
            }
        )
        fd, tmp = tempfile.mkstemp(dir=self.state_dir, prefix=f".{FILE_NAME}.", suffix=".tmp")
        try:
            try:
                view = memoryview(blob)
                done = 0
                while done < len(view):
                    done += os.write(fd, view[done : done + WRITE_CHUNK])
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        # the rename must reach the disk too, or a power cut brings the old file back
        fsync_dir(self.state_dir)

    def refuse(self, error: SnapshotError, version: int | None = None) -> None:
        """Record ``error`` as the last refusal (for a refusal decided outside, such as a
        failed download) and log it. ``version``: when the error does not carry one."""
        v = version_of(error)
        v = v if v is not None else version
        with self._lock:
            in_force = self._current.version if self._current is not None else 0
            self._refused = {
                "version": v,
                "why": why_of(error),
                "reason": str(error),
                "at": int(self._clock()),
            }
        log.error(
            "credential snapshot version %s refused: %s (version %d stays in force)",
            "?" if v is None else v,
            error,
            in_force,
        )

    def status(self) -> dict[str, Any]:
        """The ``credentials`` part of the reader's status: ``version`` in force (0: the
        local files), ``issued_at`` and ``applied_at`` (seconds since the epoch, null before
        any), ``source``, ``deltas`` (applied since the full snapshot), ``counts`` (issuer
        keys, badges, revocations, schedule groups) and ``refused``: the last refusal
        ``{"version" (null when unknown), "why", "reason", "at"}`` or null."""
        with self._lock:
            cur = self._current
            refused = dict(self._refused) if self._refused is not None else None
            return {
                "version": cur.version if cur is not None else 0,
                "issued_at": cur.issued_at if cur is not None else None,
                "applied_at": self._applied_at if cur is not None else None,
                "source": self._source if cur is not None else "config",
                "deltas": len(self._deltas),
                "counts": _counts(cur) if cur is not None else None,
                "refused": refused,
            }


def _counts(s: CredentialSet) -> dict[str, int]:
    summary = s.summary()
    return {
        k: summary[k]
        for k in (
            "issuer_keys",
            "badges_allowed",
            "badges_denied",
            "revoked_passes",
            "revoked_holders",
            "schedule_groups",
        )
    }
