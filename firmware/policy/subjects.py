"""Keyed HMAC of credentials: how payloads and subjects are named without being stored."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from firmware.exceptions import CredentialListError

MIN_KEY_BYTES = 16


class SubjectHasher:
    """HMAC-SHA256 under the site key (RFC 2104). ``subject(payload) -> hex`` (64 chars).

    The same key makes the badge list, so the back office can map a subject to a badge while
    the reader never stores a raw payload: a plain hash of a 12-digit ID is brute-forceable.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise CredentialListError(
                f"site HMAC key is {len(key)} bytes, need at least {MIN_KEY_BYTES}: "
                "make one with `qrgate badge keygen`"
            )
        self._key = key

    def subject(self, payload: bytes) -> str:
        """Hex HMAC-SHA256 of ``payload``."""
        return hmac.new(self._key, payload, hashlib.sha256).hexdigest()


def load_key(path: Path) -> bytes:
    """Read a site key file: hex text (whitespace ignored). Raises CredentialListError."""
    try:
        text = path.read_text(encoding="ascii").strip()
        key = bytes.fromhex(text)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CredentialListError(
            f"{path}: cannot read the site HMAC key (hex text): {e}; "
            "fix the file, the reader cannot start without it"
        ) from None
    if len(key) < MIN_KEY_BYTES or len(set(key)) == 1:
        raise CredentialListError(
            f"{path}: the site HMAC key must be at least {MIN_KEY_BYTES} "
            "random bytes; make one with `qrgate badge keygen`"
        )
    return key
