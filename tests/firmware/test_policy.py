"""Verdict policy: badges by keyed HMAC, denylist precedence, several codes, repeat window."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from firmware.decoding.codes import DecodedCode
from firmware.exceptions import CredentialListError
from firmware.policy.badges import BadgeKind, BadgeList, load_badges, write_badges
from firmware.policy.credentials import CredentialSet
from firmware.policy.policy import Policy
from firmware.policy.repeat import RepeatWindow
from firmware.policy.subjects import SubjectHasher, load_key
from firmware.policy.verdict import Reason

KEY = bytes(range(32))
H = SubjectHasher(KEY)
ALICE, MALLORY, EVE = b"QRG-BADGE:alice", b"QRG-BADGE:mallory", b"QRG-BADGE:eve"
S = 1_000_000_000
CORNERS = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))


def code(payload: bytes, exact: bool = True, backend: str = "zxing-cpp") -> DecodedCode:
    return DecodedCode(payload, CORNERS, backend, exact=exact)


@pytest.fixture
def policy() -> Policy:
    badges = BadgeList.of(allow=[H.subject(ALICE), H.subject(MALLORY)], deny=[H.subject(MALLORY)])
    return Policy([BadgeKind()], H, max_payload=64, credentials=CredentialSet(badges=badges))


def test_subject_is_keyed_hmac_not_payload() -> None:
    s = H.subject(ALICE)
    assert len(s) == 64 and ALICE.hex() not in s
    assert s != SubjectHasher(bytes(32)).subject(ALICE)


def test_short_key_refused() -> None:
    with pytest.raises(CredentialListError, match="at least 16"):
        SubjectHasher(b"short")


def test_allowlisted_badge_granted(policy: Policy) -> None:
    d = policy.decide([code(ALICE)], RepeatWindow(2 * S), 10 * S, 0)
    assert d is not None and d.granted and d.reason is Reason.GRANTED
    assert d.kind == "badge" and d.subject == H.subject(ALICE)


def test_denylist_wins_over_allowlist(policy: Policy) -> None:
    d = policy.decide([code(MALLORY)], RepeatWindow(2 * S), 10 * S, 0)
    assert d is not None and not d.granted and d.reason is Reason.REVOKED


def test_unknown_malformed_unsupported(policy: Policy) -> None:
    seen = RepeatWindow(0)
    assert policy.decide([code(EVE)], seen, S, 0).reason is Reason.UNKNOWN  # type: ignore[union-attr]
    assert policy.decide([code(b"")], seen, S, 0).reason is Reason.MALFORMED  # type: ignore[union-attr]
    assert policy.decide([code(b"x" * 65)], seen, S, 0).reason is Reason.MALFORMED  # type: ignore[union-attr]
    d = policy.decide([code(ALICE, exact=False, backend="zbar")], seen, S, 0)
    assert d is not None and not d.granted and d.reason is Reason.UNSUPPORTED_ENCODING


def test_no_codes_no_decision(policy: Policy) -> None:
    assert policy.decide([], RepeatWindow(S), S, 0) is None


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 2, 0), (1, 0), (0, 2)])
def test_several_codes_never_grant_and_revoked_wins(policy: Policy, order: tuple[int, ...]) -> None:
    codes = [code(ALICE), code(MALLORY), code(EVE)]
    d = policy.decide([codes[i] for i in order], RepeatWindow(S), S, 0)
    assert d is not None and not d.granted
    if 1 in order:  # MALLORY is revoked: a granted ALICE never masks it
        assert d.reason is Reason.REVOKED and d.subject == H.subject(MALLORY)
    else:
        assert d.reason is Reason.MULTIPLE_CODES and d.subject is None
    assert len(d.codes) == len(order)
    assert [v.subject for v in d.codes] == sorted(v.subject for v in d.codes)


def test_same_payload_twice_is_one_code(policy: Policy) -> None:
    d = policy.decide([code(ALICE), code(ALICE, backend="zbar")], RepeatWindow(S), S, 0)
    assert d is not None and d.granted and len(d.codes) == 1


def test_repeat_window_monotonic(policy: Policy) -> None:
    seen = RepeatWindow(2 * S)
    d = policy.decide([code(ALICE)], seen, 10 * S, 0)
    assert d is not None and d.granted and not d.suppressed
    seen.observe([ALICE], 10 * S)
    # held in view: every frame refreshes the window, so it never fires again
    for t in range(1, 90):
        now = 10 * S + t * S // 30
        d = policy.decide([code(ALICE)], seen, now, 0)
        assert d is not None and d.suppressed
        seen.observe([ALICE], now)
    last = 10 * S + 89 * S // 30
    # a different code is never suppressed by the previous one
    d = policy.decide([code(EVE)], seen, last + 1, 0)
    assert d is not None and not d.suppressed and d.reason is Reason.UNKNOWN
    # out of view longer than the window: a new scan
    d = policy.decide([code(ALICE)], seen, last + 2 * S + 1, 0)
    assert d is not None and d.granted and not d.suppressed


def test_repeat_window_is_bounded() -> None:
    seen = RepeatWindow(S, capacity=10)
    seen.observe((bytes([i]) for i in range(100)), 0)
    assert len(seen) == 10 and seen.is_recent(bytes([99]), 1) and not seen.is_recent(b"\x00", 1)


def test_badge_file_round_trip(tmp_path: Path) -> None:
    f = tmp_path / "badges.json"
    write_badges(
        f,
        BadgeList(
            frozenset({H.subject(ALICE)}),
            frozenset({H.subject(EVE)}),
            {H.subject(ALICE): "alice"},
            7,
        ),
    )
    b = load_badges(f)
    assert b.version == 7 and H.subject(ALICE) in b.allow and H.subject(EVE) in b.deny
    assert b.labels[H.subject(ALICE)] == "alice"


@pytest.mark.parametrize(
    "content, needle",
    [
        ("{not json", "not valid JSON"),
        ('["a"]', "JSON object"),
        ('{"allow": "x"}', "arrays"),
        ('{"allow": ["abc"]}', "allow[0]"),
        ('{"deny": ["' + "z" * 64 + '"]}', "not hex"),
        ('{"version": "2"}', "version"),
        ('{"alow": []}', "unknown key 'alow'"),
        ('{"allow": [{"subject": "' + "a" * 64 + '", "label": 7}]}', "allow[0].label"),
        ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_broken_badge_file_named_error(tmp_path: Path, content: str, needle: str) -> None:
    f = tmp_path / "badges.json"
    f.write_text(content)
    with pytest.raises(CredentialListError, match=re.escape(needle)):
        load_badges(f)


def test_key_file(tmp_path: Path) -> None:
    f = tmp_path / "site.key"
    f.write_text(KEY.hex() + "\n")
    assert load_key(f) == KEY
    f.write_text("not hex")
    with pytest.raises(CredentialListError, match="site HMAC key"):
        load_key(f)
    f.write_text("00" * 32)  # not random: any HMAC under it is a plain hash
    with pytest.raises(CredentialListError, match=f"{f}: the site HMAC key must be"):
        load_key(f)


def test_badge_list_json_shape(tmp_path: Path) -> None:
    f = tmp_path / "b.json"
    write_badges(f, BadgeList.of(allow=[H.subject(ALICE)], version=1))
    doc = json.loads(f.read_text())
    assert doc["allow"][0]["subject"] == H.subject(ALICE) and doc["deny"] == []


def test_rewriting_a_badge_list_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "badges.json"
    write_badges(path, BadgeList.of(allow=["aa" * 32], version=1))
    path.chmod(0o640)  # the administrator let the reader's group read it
    write_badges(path, BadgeList.of(allow=["aa" * 32, "bb" * 32], version=2))
    assert path.stat().st_mode & 0o777 == 0o640
    assert len(json.loads(path.read_text())["allow"]) == 2
