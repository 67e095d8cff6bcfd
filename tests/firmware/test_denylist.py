"""Denylist: 64-bit fingerprints in a linear-probing table; membership, memory, changes."""

from __future__ import annotations

import hashlib
import random
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.exceptions import CredentialListError
from firmware.policy import denylist as dl
from firmware.policy.denylist import Denylist, fingerprint, key_for_cti, key_for_subject

N = 100_000
TOP = 2**64 - 1


def cti_keys(n: int, start: int = 0) -> list[bytes]:
    return [key_for_cti(i.to_bytes(16, "big")) for i in range(start, start + n)]


@pytest.fixture(scope="module")
def big() -> tuple[Denylist, list[bytes]]:
    keys = cti_keys(N)
    return Denylist.build(keys), keys


def test_every_key_of_100k_is_found(big: tuple[Denylist, list[bytes]]) -> None:
    d, keys = big
    assert len(d) == N
    missing = [k for k in keys if k not in d]
    assert missing == []


def test_random_keys_are_absent_from_100k(big: tuple[Denylist, list[bytes]]) -> None:
    d, keys = big
    rng = random.Random(4)
    probes = [key_for_cti(rng.randbytes(16)) for _ in range(100_000)]
    probes += [key_for_subject("https://issuer.example", f"user-{i}") for i in range(1000)]
    assert set(probes).isdisjoint(keys)
    assert [k for k in probes if k in d] == []


def test_memory_of_100k_is_within_2_mb(big: tuple[Denylist, list[bytes]]) -> None:
    d, _ = big
    assert d.nbytes <= 2_000_000
    assert d.nbytes == 8 * d.slots
    # load factor at most LOAD_FACTOR, so absent keys always meet an empty slot
    assert len(d) <= d.slots * dl.LOAD_FACTOR
    assert d.slots & (d.slots - 1) != 0  # not a power of two: the home slot copes


def test_fingerprint_is_blake2b_64_little_endian() -> None:
    key = key_for_cti(b"\x01\x02")
    digest = hashlib.blake2b(b"cti:\x01\x02", digest_size=8).digest()
    assert fingerprint(key) == int.from_bytes(digest, "little")
    assert fingerprint(b"") == 0xB4B2797457A0A6E4  # pinned: deltas made elsewhere must match


def test_key_helpers() -> None:
    assert key_for_cti(b"\x00\xff") == b"cti:\x00\xff"
    assert key_for_cti(cast(bytes, bytearray(b"ab"))) == b"cti:ab"
    assert key_for_subject("iss", "sub") == b"sub:iss\x00sub"
    assert key_for_subject("Bệnh viện", "ü") == b"sub:B\xe1\xbb\x87nh vi\xe1\xbb\x87n\x00\xc3\xbc"
    assert key_for_subject("a\ud800", "") == b"sub:a\xed\xa0\x80\x00"  # never raises
    assert key_for_cti(b"x") != key_for_subject("x", "")


def test_empty() -> None:
    d = Denylist.empty()
    assert len(d) == 0 and d.fingerprints() == []
    assert d.nbytes == 8 * dl.MIN_SLOTS
    assert b"" not in d and key_for_cti(b"a") not in d
    assert not d.has_fingerprint(1) and not d.has_fingerprint(TOP)
    assert len(Denylist.build([])) == 0
    grown = d.with_changes(add=[b"a"])
    assert b"a" in grown and len(grown) == 1 and len(d) == 0


def test_duplicates_count_once() -> None:
    keys: list[Any] = [b"a", b"b", b"a", bytearray(b"b"), b"c"]
    d = Denylist.build(keys)
    assert len(d) == 3
    assert d.fingerprints() == sorted({fingerprint(b"a"), fingerprint(b"b"), fingerprint(b"c")})
    assert Denylist.from_fingerprints([5, 5, 7]).fingerprints() == [5, 7]


class _ZeroDigest:
    def digest(self) -> bytes:
        return bytes(8)


def test_zero_fingerprint_is_stored_as_one(monkeypatch: pytest.MonkeyPatch) -> None:
    # no key with an all-zero BLAKE2b-64 digest is known: stand one in
    real = hashlib.blake2b

    def blake2b(data: bytes, digest_size: int) -> Any:
        return _ZeroDigest() if data == b"zero" else real(data, digest_size=digest_size)

    monkeypatch.setattr(dl, "blake2b", blake2b)
    assert fingerprint(b"zero") == 1
    d = Denylist.build([b"zero", b"other"])
    assert b"zero" in d and b"other" in d and len(d) == 2
    assert d.has_fingerprint(1) and not d.has_fingerprint(0)
    assert d.fingerprints()[0] == 1
    assert b"zero" in Denylist.from_fingerprints([1])
    assert b"zero" in Denylist.empty().with_changes(add=[b"zero"])
    assert b"zero" not in d.with_changes(remove=[b"zero"])


def test_with_changes_makes_a_new_table() -> None:
    old = Denylist.build(cti_keys(1000))
    before = old.fingerprints()
    new = old.with_changes(add=cti_keys(10, start=5000), remove=cti_keys(10))
    assert old.fingerprints() == before  # untouched: a reader swaps the reference
    assert len(old) == 1000 and len(new) == 1000
    assert all(k in new for k in cti_keys(10, start=5000))
    assert not any(k in new for k in cti_keys(10))
    assert all(k in new for k in cti_keys(990, start=10))
    assert all(k not in old for k in cti_keys(10, start=5000))


def test_with_changes_edge_cases() -> None:
    d = Denylist.build([b"a", b"b"])
    both = d.with_changes(add=[b"x"], remove=[b"x", b"a"])
    assert b"x" in both and b"a" not in both and b"b" in both  # add wins: fail closed
    assert d.with_changes(remove=[b"never-there"]).fingerprints() == d.fingerprints()
    assert d.with_changes(add=[b"a"]).fingerprints() == d.fingerprints()
    assert len(d.with_changes(remove=[b"a", b"b"])) == 0
    fp = fingerprint(b"q")
    by_fp = d.with_fingerprint_changes(add=[fp], remove=[fingerprint(b"b")])
    assert b"q" in by_fp and b"b" not in by_fp and b"a" in by_fp


def test_entries_pushed_past_the_end_wrap_to_the_start() -> None:
    # all home in the last slot, plus small ones whose home is slot 0: the wrapped entries
    # must probe past the slot-0 cluster
    high = [TOP - i for i in range(6)]
    low = [1, 2, 3]
    d = Denylist.from_fingerprints(high + low)
    assert d.slots == 18 and len(d) == 9
    assert all(d.has_fingerprint(fp) for fp in high + low)
    assert not any(d.has_fingerprint(fp) for fp in (4, TOP - 6, 2**63, 0, 2**64, -1))
    assert d.fingerprints() == sorted(high + low)


def test_lookup_of_non_bytes_or_long_keys_is_false() -> None:
    d = Denylist.build([b"a"])
    assert "a" not in d and None not in d and 1 not in d
    assert bytearray(b"a") in d
    assert b"a" * (dl.MAX_KEY_BYTES + 1) not in d


@pytest.mark.parametrize(
    ("keys", "words"),
    [
        ([b"ok", "text"], "key 1 is str"),
        ([None], "key 0 is NoneType"),
        ([b"x" * (dl.MAX_KEY_BYTES + 1)], f"{dl.MAX_KEY_BYTES + 1} bytes"),
    ],
)
def test_bad_keys_raise(keys: list[Any], words: str) -> None:
    with pytest.raises(CredentialListError, match=words):
        Denylist.build(keys)
    with pytest.raises(CredentialListError, match=words):
        Denylist.empty().with_changes(add=keys)
    with pytest.raises(CredentialListError, match=words):
        Denylist.empty().with_changes(remove=keys)


@pytest.mark.parametrize("fps", [[0], [2**64], [-1], [True], ["1"], [1.0], [[1]]])
def test_bad_fingerprints_raise(fps: list[Any]) -> None:
    with pytest.raises(CredentialListError, match="fingerprint"):
        Denylist.from_fingerprints(fps)
    with pytest.raises(CredentialListError, match="fingerprint"):
        Denylist.empty().with_fingerprint_changes(add=fps)


def test_entry_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dl, "MAX_ENTRIES", 5)
    assert len(Denylist.build(cti_keys(5))) == 5
    with pytest.raises(CredentialListError, match="more than 5 keys"):
        Denylist.build(iter(cti_keys(6)))
    with pytest.raises(CredentialListError, match="more than 5 fingerprints"):
        Denylist.from_fingerprints(range(1, 7))
    with pytest.raises(CredentialListError, match="6 entries after the change"):
        Denylist.build(cti_keys(5)).with_changes(add=cti_keys(1, start=9))


KEYS = st.binary(max_size=12)


@settings(max_examples=300, deadline=None)
@given(st.sets(KEYS, max_size=60), st.sets(KEYS, max_size=20), st.sets(KEYS, max_size=20))
def test_behaves_as_a_set(start: set[bytes], add: set[bytes], remove: set[bytes]) -> None:
    d = Denylist.build(start)
    changed = d.with_changes(add=add, remove=remove)
    expected = (start - remove) | add
    for key in start | add | remove | {b"probe"}:
        assert (key in d) == (key in start)
        assert (key in changed) == (key in expected)
    assert len(changed) == len(expected)
    assert changed.fingerprints() == sorted({fingerprint(k) for k in expected})


FPS = st.one_of(
    st.integers(1, 40),
    st.integers(TOP - 40, TOP),
    st.integers(1, TOP),
    st.integers((1 << 32) - 5, (1 << 33) + 5),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(FPS, max_size=80), st.lists(FPS, max_size=20))
def test_placement_finds_every_fingerprint(fps: list[int], probes: list[int]) -> None:
    d = Denylist.from_fingerprints(fps)
    assert len(d) == len(set(fps)) <= d.slots * dl.LOAD_FACTOR
    assert all(d.has_fingerprint(fp) for fp in fps)
    assert all(d.has_fingerprint(fp) == (fp in set(fps)) for fp in probes)
    assert d.fingerprints() == sorted(set(fps))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.integers(), st.binary(), st.text(), st.none(), st.floats())))
def test_hostile_input_raises_only_credential_list_error(items: list[Any]) -> None:
    for make in (Denylist.from_fingerprints, Denylist.build):
        try:
            made = make(items)
        except CredentialListError:
            continue
        # accepted only when every item fits: all bytes, or all ints in 1 .. 2**64 - 1
        assert len(made) == len(set(items))
        assert all(x in made if isinstance(x, bytes) else made.has_fingerprint(x) for x in items)
