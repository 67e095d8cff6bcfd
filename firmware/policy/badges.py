"""Static badges: printed codes matched on their raw payload bytes by keyed HMAC.

Badge list file (JSON, UTF-8)::

    {"version": 3,
     "allow": [{"subject": "<hex HMAC-SHA256>", "label": "alice"}, ...],
     "deny":  ["<hex HMAC-SHA256>", ...]}

``subject`` is HMAC-SHA256(site key, payload bytes) in hex (``qrgate badge add`` computes
it). A subject on both lists is denied: the denylist wins. Unknown keys are refused, so a
typo never silently empties a list.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from firmware.exceptions import CredentialListError
from firmware.policy.context import Check, ScanContext
from firmware.policy.verdict import Reason

MAX_LIST_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class BadgeList:
    """An allowlist and a denylist of subjects (hex HMACs). ``version`` as given in the file."""

    allow: frozenset[str]
    deny: frozenset[str]
    labels: dict[str, str]
    version: int = 0

    @classmethod
    def of(cls, allow: Iterable[str] = (), deny: Iterable[str] = (), version: int = 0) -> BadgeList:
        """Build from subjects (for tests and tools)."""
        return cls(frozenset(allow), frozenset(deny), {}, version)


class BadgeKind:
    """The ``badge`` credential kind: claims every payload no other kind claims (the
    fallback), so an unknown code is answered ``unknown``. Matched on the keyed HMAC of the
    raw payload bytes (field case C01: never on a decoder's guess at the text)."""

    name = "badge"

    def claims(self, payload: bytes) -> bool:
        """Badges are any bytes at all."""
        return True

    def check(self, payload: bytes, ctx: ScanContext) -> Check:
        """Denylist first, then allowlist; O(1) set lookups."""
        badges = ctx.credentials.badges
        if ctx.subject in badges.deny:
            return Check(False, Reason.REVOKED)
        if ctx.subject in badges.allow:
            return Check(True, Reason.GRANTED, valid=True)
        return Check(False, Reason.UNKNOWN)


def _fail(where: str, what: str) -> CredentialListError:
    return CredentialListError(
        f"{where}: {what}; fix the list (a running reader keeps its last good badge list)"
    )


def _subject(where: str, v: Any) -> str:
    if not isinstance(v, str) or len(v) != 64:
        raise _fail(where, f"expected a 64-character hex HMAC, found {v!r:.80}")
    try:
        bytes.fromhex(v)
    except ValueError:
        raise _fail(where, f"not hex: {v!r:.80}") from None
    return v.lower()


def badges_from_json(data: object, where: str) -> BadgeList:
    """Validate a badge list document (module docstring). ``where`` names it in errors.

    Raises CredentialListError naming the entry."""
    if not isinstance(data, dict):
        raise _fail(where, "expected a JSON object with 'allow' and 'deny'")
    unknown = sorted(str(k) for k in set(data) - {"version", "allow", "deny"})
    if unknown:
        raise _fail(where, f"unknown key {unknown[0]!r:.40} (expected version, allow, deny)")
    version = data.get("version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise _fail(where, f"'version' must be an integer, found {version!r:.40}")
    allow_raw, deny_raw = data.get("allow", []), data.get("deny", [])
    if not isinstance(allow_raw, list) or not isinstance(deny_raw, list):
        raise _fail(where, "'allow' and 'deny' must be arrays")
    allow: set[str] = set()
    labels: dict[str, str] = {}
    for i, entry in enumerate(allow_raw):
        if isinstance(entry, str):
            allow.add(_subject(f"{where}: allow[{i}]", entry))
            continue
        if not isinstance(entry, dict):
            raise _fail(where, f"allow[{i}]: expected an object {{subject, label}}")
        s = _subject(f"{where}: allow[{i}].subject", entry.get("subject"))
        allow.add(s)
        label = entry.get("label", "")
        if not isinstance(label, str):
            raise _fail(where, f"allow[{i}].label: expected a string, found {label!r:.40}")
        if label:
            labels[s] = label
    deny = {_subject(f"{where}: deny[{i}]", e) for i, e in enumerate(deny_raw)}
    return BadgeList(frozenset(allow), frozenset(deny), labels, version)


def badges_to_json(badges: BadgeList) -> dict[str, Any]:
    """The document form of ``badges`` (module docstring), sorted."""
    return {
        "version": badges.version,
        "allow": [{"subject": s, "label": badges.labels.get(s, "")} for s in sorted(badges.allow)],
        "deny": sorted(badges.deny),
    }


def load_badges(path: Path) -> BadgeList:
    """Read and validate a badge list file. Raises CredentialListError naming the entry."""
    try:
        if path.stat().st_size > MAX_LIST_BYTES:
            raise _fail(str(path), f"larger than {MAX_LIST_BYTES} bytes")
        data = json.loads(path.read_bytes())
    except OSError as e:
        raise _fail(str(path), f"cannot read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(str(path), f"not valid JSON: {e}") from None
    except RecursionError:
        raise _fail(str(path), "not valid JSON: nested too deeply") from None
    return badges_from_json(data, str(path))


def write_badges(path: Path, badges: BadgeList) -> None:
    """Write a badge list atomically (temp file + os.replace). A list that exists keeps its
    permission bits and group: an administrator who let the reader's group read it (root
    writes, the service reads) must not lose that on the next edit."""
    doc = badges_to_json(badges)
    try:
        before: os.stat_result | None = path.stat()
    except FileNotFoundError:
        before = None
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        if before is not None:
            os.fchmod(fd, before.st_mode & 0o777)
            with contextlib.suppress(PermissionError):  # only root or a member may chgrp
                os.fchown(fd, -1, before.st_gid)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
