"""The credential set: everything a reader decides with, swapped whole so a scan never sees half.

A :class:`CredentialSet` is immutable. The policy holds one reference to it; a reload or a
snapshot builds a complete new set first and replaces the reference in one assignment, so a
scan decides either entirely on the old set or entirely on the new one.

Its document form (the content of a signed snapshot, see :mod:`firmware.policy.snapshot`)::

    {"version": 7, "site": "acme", "issued_at": 1790000000,
     "trust": {"keys": [...]},                        # firmware.policy.trust
     "badges": {"allow": [...], "deny": [...]},       # firmware.policy.badges, by keyed HMAC
     "deny": {"cti": ["<hex pass id>", ...],          # revoked passes
              "sub": [["<iss>", "<sub>"], ...]},      # revoked holders, every pass of theirs
     "schedules": {...}}                              # firmware.policy.schedules

Every part is optional; a missing part is empty.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from firmware.exceptions import CredentialListError
from firmware.policy.badges import BadgeList, badges_from_json, badges_to_json
from firmware.policy.denylist import Denylist, key_for_cti, key_for_subject
from firmware.policy.schedules import Schedules
from firmware.policy.trust import TrustList

# caps on one document: 1,000,000 revocations of 32-byte ids is ~70 MB of JSON text
MAX_DENY_ENTRIES = 2_000_000
MAX_CTI_BYTES = 32
MAX_NAME_CHARS = 256
DOCUMENT_KEYS = ("version", "site", "issued_at", "trust", "badges", "deny", "schedules")


@dataclass(frozen=True)
class CredentialSet:
    """What the reader decides with. ``version``: the snapshot's version (0: local files).
    ``source``: where it came from ("config", "snapshot"). ``deny_cti``/``deny_sub``: counts of
    revoked pass ids and holders, for the status (the :class:`Denylist` holds fingerprints
    only)."""

    trust: TrustList = field(default_factory=TrustList.empty)
    badges: BadgeList = field(default_factory=BadgeList.of)
    denylist: Denylist = field(default_factory=Denylist.empty)
    schedules: Schedules = field(default_factory=Schedules.empty)
    version: int = 0
    site: str = ""
    issued_at: int = 0
    source: str = "config"
    deny_cti: int = 0
    deny_sub: int = 0

    def summary(self) -> dict[str, Any]:
        """Counts for the status and the CLI: version, source, keys, badges, revocations."""
        return {
            "version": self.version,
            "source": self.source,
            "issued_at": self.issued_at,
            "issuer_keys": len(self.trust),
            "badges_allowed": len(self.badges.allow),
            "badges_denied": len(self.badges.deny),
            "revoked_passes": self.deny_cti,
            "revoked_holders": self.deny_sub,
            "schedule_groups": len(self.schedules.groups),
        }


def _err(where: str, what: str) -> CredentialListError:
    return CredentialListError(f"credentials: {where}: {what}")


def _int(doc: Mapping[str, Any], key: str) -> int:
    v = doc.get(key, 0)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 2**53 - 1:
        raise _err(key, f"expected an integer 0..2^53-1, found {v!r:.40}")
    return v


def deny_keys(doc: object) -> tuple[list[bytes], int, int]:
    """Denylist keys from a ``deny`` part: (keys, number of pass ids, number of holders).

    Raises CredentialListError naming the entry."""
    if doc is None:
        return [], 0, 0
    if not isinstance(doc, Mapping):
        raise _err("deny", "expected an object {cti: [...], sub: [[iss, sub], ...]}")
    unknown = sorted(str(k) for k in doc if k not in ("cti", "sub"))
    if unknown:
        raise _err("deny", f"unknown key {unknown[0]!r:.40} (expected cti, sub)")
    ctis, subs = doc.get("cti", []), doc.get("sub", [])
    if not isinstance(ctis, list) or not isinstance(subs, list):
        raise _err("deny", "'cti' and 'sub' must be arrays")
    if len(ctis) + len(subs) > MAX_DENY_ENTRIES:
        raise _err("deny", f"more than {MAX_DENY_ENTRIES} entries")
    keys: list[bytes] = []
    for i, c in enumerate(ctis):
        try:
            cti = bytes.fromhex(c) if isinstance(c, str) else None
        except ValueError:
            cti = None
        if not cti or len(cti) > MAX_CTI_BYTES:
            raise _err(f"deny.cti[{i}]", f"expected a pass id in hex (1-32 bytes), found {c!r:.70}")
        keys.append(key_for_cti(cti))
    for i, s in enumerate(subs):
        if not (
            isinstance(s, list)
            and len(s) == 2
            and all(isinstance(x, str) and 0 < len(x) <= MAX_NAME_CHARS for x in s)
        ):
            raise _err(f"deny.sub[{i}]", f"expected [issuer, subject] strings, found {s!r:.70}")
        keys.append(key_for_subject(s[0], s[1]))
    return keys, len(ctis), len(subs)


def credentials_from_json(doc: object, source: str = "snapshot") -> CredentialSet:
    """Build a whole :class:`CredentialSet` from its document form (module docstring).

    Nothing is shared with the set in force, so a failure leaves it untouched. Raises
    CredentialListError (or its ScheduleError) naming the part and entry."""
    if not isinstance(doc, Mapping):
        raise _err("document", "expected an object")
    unknown = sorted(str(k) for k in doc if k not in DOCUMENT_KEYS)
    if unknown:
        raise _err("document", f"unknown key {unknown[0]!r:.40} (expected {DOCUMENT_KEYS})")
    site = doc.get("site", "")
    if not isinstance(site, str) or len(site) > MAX_NAME_CHARS:
        raise _err("site", f"expected a short string, found {site!r:.40}")
    trust = TrustList.from_json(doc["trust"]) if "trust" in doc else TrustList.empty()
    badges = badges_from_json(doc["badges"], "credentials: badges") if "badges" in doc else None
    keys, n_cti, n_sub = deny_keys(doc.get("deny"))
    schedules = Schedules.from_json(doc["schedules"]) if "schedules" in doc else None
    return CredentialSet(
        trust=trust,
        badges=badges or BadgeList.of(),
        denylist=Denylist.build(keys),
        schedules=schedules or Schedules.empty(),
        version=_int(doc, "version"),
        site=site,
        issued_at=_int(doc, "issued_at"),
        source=source,
        deny_cti=n_cti,
        deny_sub=n_sub,
    )


def badges_part(badges: BadgeList) -> dict[str, Any]:
    """The ``badges`` part of a document for ``badges``."""
    return badges_to_json(badges)


MAX_FILE_BYTES = 256 * 1024 * 1024


def read_json_file(path: Path, what: str) -> object:
    """A JSON file of at most 256 MB. Raises CredentialListError naming the file."""
    try:
        if path.stat().st_size > MAX_FILE_BYTES:
            raise _err(str(path), f"{what} larger than {MAX_FILE_BYTES} bytes")
        return json.loads(path.read_bytes())
    except OSError as e:
        raise _err(str(path), f"cannot read the {what}: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _err(str(path), f"the {what} is not valid JSON: {e}") from None
    except RecursionError:
        raise _err(str(path), f"the {what} is nested too deeply") from None


def load_local_credentials(
    *,
    trust: Path | None = None,
    badges: Path | None = None,
    denylist: Path | None = None,
    schedules: Path | None = None,
) -> CredentialSet:
    """The credential set from the local files named in ``[policy]`` (version 0, source
    "config"): what a reader decides with until a signed snapshot arrives. A file not named
    is empty. Raises CredentialListError (or ScheduleError) naming the file and entry."""
    doc: dict[str, object] = {}
    if trust is not None:
        doc["trust"] = read_json_file(trust, "trust list")
    if badges is not None:
        doc["badges"] = read_json_file(badges, "badge list")
    if denylist is not None:
        doc["deny"] = read_json_file(denylist, "denylist")
    if schedules is not None:
        doc["schedules"] = read_json_file(schedules, "schedules")
    return credentials_from_json(doc, source="config")
