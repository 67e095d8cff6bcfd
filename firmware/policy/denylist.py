"""Denylist of revoked passes and subjects: 64-bit fingerprints in one open-addressing table.

An entry is a bytes key formed by the caller with :func:`key_for_cti` (``b"cti:" + cti``, RFC
8392 §3.1.7 CWT ID) or :func:`key_for_subject` (``b"sub:" + iss + b"\\x00" + sub``). The table
keeps only its :func:`fingerprint`: the BLAKE2b digest of the key with an 8-byte output
(``hashlib.blake2b(key, digest_size=8)``, RFC 7693) read as a little-endian unsigned integer,
with 0 mapped to 1 because 0 marks an empty slot. The fingerprints sit in one
``array.array('Q')`` (8 bytes a slot) with linear probing from the home slot
``((fp >> 32) * slots) >> 32`` (the top 32 bits scaled to the table, which need not be a power
of two); the load factor is at most :data:`LOAD_FACTOR`, so 100,000 entries take 1.6 MB (a
Python set of bytes takes about 10 MB) and a lookup is one hash plus a few probes.

False positives: two different keys with the same fingerprint are one entry. A pass that is
not revoked is denied (Reason.REVOKED) only if its key's fingerprint equals one of the n
stored ones: probability n / 2**64 per scan, about 5e-14 for a million entries, i.e. once in
millions of years of scanning at a busy door. That is acceptable because the error fails
closed (a denial, never a grant), it cannot be aimed (finding a key with a given BLAKE2b
fingerprint costs about 2**64 hashes, and the attacker only gets someone else denied), and the
holder is issued a pass with a new cti. There are no false negatives: every key added is found.

A table is immutable: :meth:`Denylist.with_changes` builds a new one, so the reader swaps the
reference atomically while scans keep reading the old one.
"""

from __future__ import annotations

import itertools
import math
from array import array
from collections.abc import Iterable
from hashlib import blake2b
from typing import cast

import numpy as np
import numpy.typing as npt

from firmware.exceptions import CredentialListError

LOAD_FACTOR = 0.5
"""Entries per slot at most. 16 bytes an entry: within the 2 MB per 100,000 budget, and a
lookup for a key that is absent (the usual case) probes 2.5 slots on average, not the 8.5 of
a 0.75 load."""

MIN_SLOTS = 8
"""Slots of the smallest (and the empty) table."""

MAX_ENTRIES = 4_000_000
"""Most keys (or fingerprints) one build or change may bring, and most entries a table may
hold (64 MB of table); more raises CredentialListError. The home slot arithmetic needs fewer
than 2**32 slots."""

MAX_KEY_BYTES = 1024
"""Longest key accepted, bytes: a cti is at most 32 bytes, iss and sub live in a pass of at
most 4096 bytes."""

_EMPTY = 0
_U64 = np.dtype("<u8")


def fingerprint(key: bytes) -> int:
    """The 64-bit fingerprint stored for ``key``: BLAKE2b-64 (RFC 7693) as a little-endian
    integer, 0 mapped to 1. In 1 .. 2**64 - 1."""
    return int.from_bytes(blake2b(key, digest_size=8).digest(), "little") or 1


def key_for_cti(cti: bytes) -> bytes:
    """The key revoking one pass: ``b"cti:" + cti`` (the CWT ID claim, RFC 8392 §3.1.7)."""
    return b"cti:" + bytes(cti)


def key_for_subject(iss: str, sub: str) -> bytes:
    """The key revoking every pass of one holder: ``b"sub:" + iss + b"\\x00" + sub`` (UTF-8;
    lone surrogates kept with ``surrogatepass`` so this never raises). An issuer name that
    itself holds NUL can make two (iss, sub) pairs share a key; that only ever denies."""
    return (
        b"sub:"
        + iss.encode("utf-8", "surrogatepass")
        + b"\x00"
        + sub.encode("utf-8", "surrogatepass")
    )


def _fingerprint_array(keys: Iterable[bytes], what: str) -> npt.NDArray[np.uint64]:
    """Fingerprints of ``keys`` (unsorted, with repeats). Raises CredentialListError for a key
    that is not bytes, is longer than MAX_KEY_BYTES, or past MAX_ENTRIES keys."""
    # checks done by C builtins over the whole list first, so the hashing loop stays bare
    # (a million keys: 0.4 s, about half of a loop that also checks each key)
    batch: list[object] = list(itertools.islice(keys, MAX_ENTRIES + 1))
    if len(batch) > MAX_ENTRIES:
        raise CredentialListError(f"denylist {what}: more than {MAX_ENTRIES} keys")
    if not set(map(type, batch)) <= {bytes, bytearray}:
        for i, key in enumerate(batch):
            if not isinstance(key, bytes | bytearray):
                raise CredentialListError(
                    f"denylist {what}: key {i} is {type(key).__name__}, expected bytes"
                )
    good = cast("list[bytes]", batch)
    if max(map(len, good), default=0) > MAX_KEY_BYTES:
        i = next(i for i, k in enumerate(good) if len(k) > MAX_KEY_BYTES)
        raise CredentialListError(
            f"denylist {what}: key {i} is {len(good[i])} bytes, at most {MAX_KEY_BYTES}"
        )
    digests = bytearray()
    for key in good:
        digests += blake2b(key, digest_size=8).digest()
    # a view on little-endian machines (every Raspberry Pi OS), a byte-swapped copy elsewhere
    fps = np.frombuffer(digests, dtype=_U64).astype(np.uint64, copy=False)
    fps[fps == _EMPTY] = 1
    return fps


def _fingerprint_ints(fps: Iterable[int], what: str) -> npt.NDArray[np.uint64]:
    """``fps`` as an array. Raises CredentialListError for a value that is not an int (bool
    is not) in 1 .. 2**64 - 1, or for more than MAX_ENTRIES values."""
    batch: list[object] = list(itertools.islice(fps, MAX_ENTRIES + 1))
    if len(batch) > MAX_ENTRIES:
        raise CredentialListError(f"denylist {what}: more than {MAX_ENTRIES} fingerprints")
    if not set(map(type, batch)) <= {int}:
        i, bad = next((i, fp) for i, fp in enumerate(batch) if type(fp) is not int)
        raise CredentialListError(
            f"denylist {what}: fingerprint {i} is {type(bad).__name__}, expected int"
        )
    try:
        out = np.array(batch, dtype=np.uint64)
    except (OverflowError, ValueError, TypeError):
        out = None
    if out is None or out.shape != (len(batch),) or (len(out) and not out.all()):
        raise CredentialListError(f"denylist {what}: a fingerprint is outside 1 .. 2**64 - 1")
    return out


def _sorted_unique(fps: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """``fps`` sorted ascending without repeats (np.unique is ten times slower here)."""
    fps = np.sort(fps)
    if len(fps) < 2:
        return fps
    fresh = np.empty(len(fps), dtype=bool)
    fresh[0] = True
    np.not_equal(fps[1:], fps[:-1], out=fresh[1:])
    return fps[fresh]


class Denylist:
    """An immutable set of revoked keys, held as 64-bit fingerprints (see the module text).

    Make one with :meth:`build`, :meth:`empty` or :meth:`with_changes`; ``key in denylist``
    answers in O(1).
    """

    __slots__ = ("_count", "_slots", "_table")

    def __init__(self, table: array[int], count: int) -> None:
        """Private: use :meth:`build`, :meth:`empty` or :meth:`with_changes`."""
        self._table = table
        self._slots = len(table)
        self._count = count

    @classmethod
    def empty(cls) -> Denylist:
        """A denylist with no entries."""
        return cls(array("Q", bytes(8 * MIN_SLOTS)), 0)

    @classmethod
    def build(cls, keys: Iterable[bytes]) -> Denylist:
        """A denylist of ``keys`` (repeats count once). Raises CredentialListError for a key
        that is not bytes or is longer than MAX_KEY_BYTES, or for more than MAX_ENTRIES
        keys."""
        return cls._from_unique(_sorted_unique(_fingerprint_array(keys, "build")))

    @classmethod
    def from_fingerprints(cls, fps: Iterable[int]) -> Denylist:
        """A denylist holding fingerprints ``fps`` (as :func:`fingerprint` gives; repeats
        count once), e.g. from a snapshot that carries fingerprints instead of keys. Raises
        CredentialListError for a value that is not an int in 1 .. 2**64 - 1 or for more
        than MAX_ENTRIES values."""
        return cls._from_unique(_sorted_unique(_fingerprint_ints(fps, "fingerprints")))

    def with_changes(self, add: Iterable[bytes] = (), remove: Iterable[bytes] = ()) -> Denylist:
        """A new denylist: (this one minus ``remove``) plus ``add``; this one is untouched.

        A key in both ``add`` and ``remove`` stays denied (fail closed). Removing a key removes
        its fingerprint, so it also removes any other key sharing it (probability n / 2**64).
        Raises CredentialListError as :meth:`build`, or when the result would exceed
        MAX_ENTRIES.
        """
        return self._changed(_fingerprint_array(add, "add"), _fingerprint_array(remove, "remove"))

    def with_fingerprint_changes(
        self, add: Iterable[int] = (), remove: Iterable[int] = ()
    ) -> Denylist:
        """As :meth:`with_changes`, given fingerprints; raises CredentialListError as
        :meth:`from_fingerprints`."""
        return self._changed(_fingerprint_ints(add, "add"), _fingerprint_ints(remove, "remove"))

    def _changed(self, add: npt.NDArray[np.uint64], remove: npt.NDArray[np.uint64]) -> Denylist:
        """(stored minus ``remove``) plus ``add``, as a new table."""
        removed = _sorted_unique(remove)
        added = _sorted_unique(add)
        stored = self._stored()
        keep = np.ones(len(stored), dtype=bool)
        if len(stored) and len(removed):
            at = np.minimum(np.searchsorted(stored, removed), len(stored) - 1)
            keep[at[stored[at] == removed]] = False
        kept = stored[keep]
        if len(kept) and len(added):
            at = np.minimum(np.searchsorted(kept, added), len(kept) - 1)
            added = added[kept[at] != added]
        if len(kept) + len(added) > MAX_ENTRIES:
            raise CredentialListError(
                f"denylist: {len(kept) + len(added)} entries after the change, "
                f"at most {MAX_ENTRIES}"
            )
        # kept is sorted and added is short as a rule: timsort merges in about linear time
        return self._from_unique(np.sort(np.concatenate([kept, added]), kind="stable"))

    @classmethod
    def _from_unique(cls, fps: npt.NDArray[np.uint64]) -> Denylist:
        """Place distinct nonzero fingerprints, sorted ascending, into a linear-probing table.

        The home slot, ``((fp >> 32) * slots) >> 32``, grows with ``fp``, so sorted
        fingerprints come in order of home slot and entry k lands at
        max(home[k], place[k-1] + 1), i.e. k + running max(home[j] - j): no Python loop.
        Entries pushed past the last slot wrap to the first free slots from 0, in order; every
        slot from an entry's home to its place is then occupied, which is all a lookup needs.
        """
        n = len(fps)
        slots = max(MIN_SLOTS, math.ceil(n / LOAD_FACTOR))
        packed = array("Q", [_EMPTY]) * slots
        # a numpy view on the array's own buffer: the table is filled without a copy
        table = np.frombuffer(packed, dtype=np.uint64)
        if n:
            # in place on one int64 array: building a million entries peaks near 50 MB
            place = ((fps >> np.uint64(32)) * np.uint64(slots)) >> np.uint64(32)
            place = place.view(np.int64)
            ranks = np.arange(n, dtype=np.int64)
            place -= ranks
            np.maximum.accumulate(place, out=place)
            place += ranks
            del ranks
            inside = int(np.searchsorted(place, slots))
            table[place[:inside]] = fps[:inside]
            if inside < n:
                free = np.flatnonzero(table == _EMPTY)[: n - inside]
                table[free] = fps[inside:]
        del table
        return cls(packed, n)

    def _stored(self) -> npt.NDArray[np.uint64]:
        """The stored fingerprints, sorted ascending."""
        table = np.frombuffer(self._table, dtype=np.uint64)
        # nearly sorted already (only wrapped entries are out of place): timsort is linear
        return np.sort(table[table != _EMPTY], kind="stable")

    def __contains__(self, key: object) -> bool:
        """True if ``key`` (bytes) was added (or shares a fingerprint with one that was).
        Anything that is not bytes, or is longer than MAX_KEY_BYTES, is never in the list."""
        if not isinstance(key, bytes | bytearray) or len(key) > MAX_KEY_BYTES:
            return False
        fp = int.from_bytes(blake2b(key, digest_size=8).digest(), "little") or 1
        return self.has_fingerprint(fp)

    def has_fingerprint(self, fp: int) -> bool:
        """True if fingerprint ``fp`` (as :func:`fingerprint` gives) is stored."""
        if not 0 < fp < 1 << 64:
            return False
        table, slots = self._table, self._slots
        i = ((fp >> 32) * slots) >> 32
        while True:
            slot = table[i]
            if slot == fp:
                return True
            if slot == _EMPTY:
                return False
            i += 1
            if i == slots:
                i = 0

    def __len__(self) -> int:
        """Number of distinct fingerprints stored."""
        return self._count

    @property
    def nbytes(self) -> int:
        """Bytes held by the table (8 a slot); the object around it adds under 200."""
        return self._slots * self._table.itemsize

    @property
    def slots(self) -> int:
        """Slots in the table (at least ``len / LOAD_FACTOR``; not a power of two)."""
        return self._slots

    def fingerprints(self) -> list[int]:
        """The stored fingerprints, sorted ascending (for building and checking deltas)."""
        return cast("list[int]", self._stored().tolist())

    def __repr__(self) -> str:
        return f"Denylist({self._count} entries, {self.nbytes} bytes)"
