"""Signed credential snapshots: applied whole, refused with a reason, kept across restarts and
kill -9, and the administrator's ``qrgate credentials`` commands. Real keys and signatures."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import cbor2
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.pins import make_pin_factory
from firmware.admin.credentials import credentials as credentials_cli
from firmware.config import load_config
from firmware.daemon import build_reader
from firmware.exceptions import SnapshotError
from firmware.policy import cose
from firmware.policy.badges import BadgeList
from firmware.policy.credentials import CredentialSet
from firmware.policy.denylist import key_for_cti, key_for_subject
from firmware.policy.keys import generate_key, save_private_key, save_public_key
from firmware.policy.snapshot import (
    FILE_NAME,
    MAX_SNAPSHOT_BYTES,
    SnapshotStore,
    build_set,
    make_delta,
    read_snapshot,
    sign_snapshot,
    snapshot_document,
    version_of,
    why_of,
)
from firmware.policy.trust import trust_entry
from tests.firmware.readers import HASHER, write_reader_config
from tests.firmware.test_uplink import FeedSource

ISSUER = generate_key()
SIGNER = generate_key()  # the site's snapshot key (EdDSA)
PUB = SIGNER.public_key()
OTHER = generate_key()
ES_SIGNER = generate_key("ES256")

ALICE, MALLORY = b"badge-alice", b"badge-mallory"
SCHEDULES = {
    "timezone": "Europe/Berlin",
    "holidays": ["2026-12-25"],
    "groups": {"staff": {"windows": [{"days": "mon-fri", "from": "07:00", "to": "19:00"}]}},
}


def cti(tag: str, i: int) -> str:
    return hashlib.sha256(f"{tag}{i}".encode()).digest()[:16].hex()


def full_doc(v: int, /, **over: Any) -> dict[str, Any]:
    doc = snapshot_document(
        version=v,
        issued_at=1_790_000_000 + v,
        site="hq",
        trust={"keys": [trust_entry(ISSUER.public_key(), iss="acme")]},
        badges={
            "allow": [{"subject": HASHER.subject(ALICE), "label": "alice"}],
            "deny": [HASHER.subject(MALLORY)],
        },
        deny={"cti": [cti("p", i) for i in range(3)], "sub": [["acme", "bob"]]},
        schedules=SCHEDULES,
    )
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def signed(doc: dict[str, Any], key: cose.PrivateKey = SIGNER) -> bytes:
    return sign_snapshot(doc, key)


def raw_signed(payload: bytes, key: cose.PrivateKey = SIGNER) -> bytes:
    """A COSE_Sign1 over any payload bytes (for broken payloads)."""
    return cose.sign1(payload, key, cose.kid_of(key.public_key()))


def store(tmp_path: Path, key: Any = PUB, site: str | None = "hq") -> SnapshotStore:
    return SnapshotStore(tmp_path, key, site=site, clock=lambda: 1_800_000_000.0)


def refusal(s: SnapshotStore, data: bytes) -> SnapshotError:
    with pytest.raises(SnapshotError) as info:
        s.apply(data, "test")
    return info.value


# --- applying -------------------------------------------------------------------------------------


def test_a_snapshot_puts_every_part_in_force_and_is_kept(tmp_path: Path) -> None:
    s = store(tmp_path)
    assert s.load() is None and s.version == 0
    new = s.apply(signed(full_doc(3)), "device")
    assert (new.version, new.site, new.issued_at, new.source) == (
        3,
        "hq",
        1_790_000_003,
        "snapshot",
    )
    assert list(new.trust) == [cose.kid_of(ISSUER.public_key())]
    assert new.trust[cose.kid_of(ISSUER.public_key())].iss == "acme"
    assert new.badges.allow == {HASHER.subject(ALICE)} and new.badges.deny == {
        HASHER.subject(MALLORY)
    }
    assert new.badges.labels == {HASHER.subject(ALICE): "alice"}
    assert key_for_cti(bytes.fromhex(cti("p", 2))) in new.denylist
    assert key_for_subject("acme", "bob") in new.denylist
    assert (new.deny_cti, new.deny_sub, len(new.denylist)) == (3, 1, 4)
    assert new.schedules.groups == ("staff",) and new.schedules.timezone == "Europe/Berlin"
    assert s.current is new and s.version == 3
    status = s.status()
    assert status == {
        "version": 3,
        "issued_at": 1_790_000_003,
        "applied_at": 1_800_000_000,
        "source": "device",
        "deltas": 0,
        "counts": {
            "issuer_keys": 1,
            "badges_allowed": 1,
            "badges_denied": 1,
            "revoked_passes": 3,
            "revoked_holders": 1,
            "schedule_groups": 1,
        },
        "refused": None,
    }
    kept = tmp_path / FILE_NAME
    assert kept.stat().st_mode & 0o777 == 0o600
    # a restart rebuilds the same set from the kept file
    again = store(tmp_path).load()
    assert again is not None
    assert (again.version, again.badges, again.trust, again.schedules) == (
        3,
        new.badges,
        new.trust,
        new.schedules,
    )
    assert again.denylist.fingerprints() == new.denylist.fingerprints()
    assert [p.name for p in tmp_path.iterdir()] == [FILE_NAME]


def test_es256_signing_keys_work_too(tmp_path: Path) -> None:
    s = store(tmp_path, ES_SIGNER.public_key())
    assert s.apply(signed(full_doc(1), ES_SIGNER)).version == 1


def test_an_equal_version_is_a_no_op(tmp_path: Path) -> None:
    s = store(tmp_path)
    first = s.apply(signed(full_doc(4)))
    kept = (tmp_path / FILE_NAME).read_bytes()
    # the broker hands the retained snapshot again on every reconnect
    same = s.apply(signed(full_doc(4, deny={"cti": [cti("other", 1)]})))
    assert same is first and s.status()["refused"] is None
    assert (tmp_path / FILE_NAME).read_bytes() == kept


def test_a_part_left_out_is_empty_a_snapshot_is_whole(tmp_path: Path) -> None:
    s = store(tmp_path)
    s.apply(signed(full_doc(1)))
    new = s.apply(signed(snapshot_document(version=2, issued_at=5)))
    assert (len(new.trust), len(new.badges.allow), len(new.denylist), new.schedules.groups) == (
        0,
        0,
        0,
        (),
    )
    assert new.site == "" and new.issued_at == 5


# --- refusals -------------------------------------------------------------------------------------


REFUSED: dict[str, tuple[Any, str, str]] = {
    # name: (signed bytes or a function of them, why, text in the reason)
    "another key": (lambda: signed(full_doc(9), OTHER), "bad_signature", "signed by key"),
    "another algorithm": (lambda: signed(full_doc(9), ES_SIGNER), "bad_signature", "signed by key"),
    "payload changed": (
        lambda: signed(full_doc(9)).replace(b"acme", b"acmf"),
        "bad_signature",
        "bad signature",
    ),
    "kid of ours, signature of another": (
        lambda: cose.sign1(cbor2.dumps(full_doc(9)), OTHER, cose.kid_of(PUB)),
        "bad_signature",
        "not signed by issuer key",
    ),
    "older": (lambda: signed(full_doc(4)), "older", "older: version 4, version 5 is in force"),
    "not COSE: JSON": (lambda: json.dumps(full_doc(9)).encode(), "not_cose", "COSE_Sign1"),
    "not COSE: empty": (lambda: b"", "not_cose", "COSE_Sign1"),
    "not COSE: tag 18, garbage": (lambda: b"\xd2\x84\x40", "not_cose", "truncated"),
    "not COSE: untagged": (lambda: signed(full_doc(9))[1:], "not_cose", "COSE_Sign1"),
    "not COSE: no alg": (
        lambda: cbor2.dumps(cbor2.CBORTag(18, [b"", {}, cbor2.dumps(full_doc(9)), bytes(64)])),
        "not_cose",
        "alg",
    ),
    "oversized": (lambda: b"\xd2" + bytes(MAX_SNAPSHOT_BYTES), "too_large", "too large"),
    "another site": (lambda: signed(full_doc(9, site="branch")), "wrong_site", "site 'branch'"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_bad_snapshot_is_refused_and_the_last_good_one_stays(tmp_path: Path, case: str) -> None:
    s = store(tmp_path)
    good = s.apply(signed(full_doc(5)))
    kept = (tmp_path / FILE_NAME).read_bytes()
    make, why, text = REFUSED[case]
    e = refusal(s, make())
    assert why_of(e) == why and text in str(e), str(e)
    assert s.current is good and s.version == 5
    assert (tmp_path / FILE_NAME).read_bytes() == kept
    refused = s.status()["refused"]
    assert refused["why"] == why and refused["reason"] == str(e)
    assert refused["at"] == 1_800_000_000
    assert refused["version"] == (4 if case == "older" else 9 if why == "wrong_site" else None)


def test_a_reader_without_snapshot_key_refuses_every_snapshot(tmp_path: Path) -> None:
    s = store(tmp_path, key=None)
    e = refusal(s, signed(full_doc(1)))
    assert (why_of(e), str(e)) == ("no_key", "no snapshot_key configured")
    assert s.current is None and not (tmp_path / FILE_NAME).exists()


def broken_payloads() -> dict[str, tuple[bytes, str]]:
    """name -> (signed bytes whose payload is broken, text in the reason)."""
    tag_inside = b"\xa2\x67version\x01\x69issued_at\xc1\x01"  # issued_at is tag 1 (a date)
    cases = {
        "payload not a map": (raw_signed(cbor2.dumps([1, 2])), "must be a CBOR map"),
        "payload not CBOR": (raw_signed(b"\xff\x00"), "not strict CBOR"),
        "payload with a tag": (raw_signed(tag_inside), "CBOR tag 1"),
        "indefinite length": (raw_signed(b"\xbf\xff"), "indefinite length"),
        "bytes after the map": (raw_signed(cbor2.dumps(full_doc(9)) + b"\x00"), "1 bytes after"),
        "invalid UTF-8": (raw_signed(b"\xa1\x61\xff\x01"), "does not decode"),
        "nested too deep": (raw_signed(b"\x81" * 40 + b"\x01"), "nested deeper than 16"),
    }
    docs: dict[str, tuple[dict[str, Any], str]] = {
        "no version": (full_doc(9, version=None), "'version' must be an integer"),
        "version 0": (full_doc(0), "'version' must be an integer from 1"),
        "version true": (full_doc(9, version=True), "'version' must be an integer"),
        "version too big": (full_doc(2**53), "'version' must be an integer"),
        "no issued_at": (full_doc(9, issued_at=None), "'issued_at' must be an integer"),
        "site not text": (full_doc(9, site=7), "'site' must be a short string"),
        "unknown key": (full_doc(9, extra=1), "unknown key 'extra'"),
        "trust: kid of another key": (
            full_doc(
                9,
                trust={
                    "keys": [
                        {
                            **trust_entry(ISSUER.public_key()),
                            "kid": cose.kid_of(OTHER.public_key()).hex(),
                        }
                    ]
                },
            ),
            "does not match the public key",
        ),
        "badges: not hex": (full_doc(9, badges={"allow": ["zz" * 32]}), "not hex"),
        "deny: cti not hex": (full_doc(9, deny={"cti": ["nothex"]}), "deny.cti[0]"),
        "deny: sub not a pair": (full_doc(9, deny={"sub": [["acme"]]}), "deny.sub[0]"),
        "schedules: unknown zone": (
            full_doc(9, schedules={**SCHEDULES, "timezone": "Mars/Olympus"}),
            "Mars/Olympus",
        ),
        "delta: not true": (full_doc(9, delta=False), "'delta' must be true"),
        "delta: base above version": (
            {"delta": True, "base": 9, "version": 9, "issued_at": 1},
            "must be above its base",
        ),
    }
    for name, (doc, text) in docs.items():
        cases[name] = (raw_signed(cbor2.dumps(doc)), text)
    return cases


BROKEN = broken_payloads()


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_content_is_refused_part_by_part(tmp_path: Path, case: str) -> None:
    s = store(tmp_path)
    good = s.apply(signed(full_doc(5)))
    data, text = BROKEN[case]
    e = refusal(s, data)
    assert why_of(e) == "content" and text in str(e), str(e)
    assert str(e).startswith("broken content:")
    assert s.current is good
    if case.split(":", maxsplit=1)[0] in ("trust", "badges", "deny", "schedules"):
        assert version_of(e) == 9 and s.status()["refused"]["version"] == 9


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=300))
def test_fuzz_random_bytes_only_ever_raise_snapshot_error(data: bytes) -> None:
    s = SnapshotStore(Path("/nonexistent-qrgate-state"), PUB, site="hq")
    for candidate in (data, b"\xd2" + data, b"\xd2\x84" + data):
        with pytest.raises(SnapshotError):
            s.apply(candidate)


GOOD = signed(full_doc(2))


@settings(max_examples=300, deadline=None)
@given(at=st.integers(0, len(GOOD) - 1), value=st.integers(0, 255))
def test_fuzz_a_changed_byte_never_gets_in(at: int, value: int) -> None:
    changed = GOOD[:at] + bytes([value]) + GOOD[at + 1 :]
    s = SnapshotStore(Path("/nonexistent-qrgate-state"), PUB, site="hq")
    if changed == GOOD:
        return
    with pytest.raises(SnapshotError):
        s.verify(changed)


# --- deltas ---------------------------------------------------------------------------------------


def delta_doc(base: int, version: int, **parts: Any) -> dict[str, Any]:
    return {"delta": True, "base": base, "version": version, "issued_at": 7, "site": "hq", **parts}


def test_a_delta_changes_the_set_in_force_and_survives_a_restart(tmp_path: Path) -> None:
    s = store(tmp_path)
    base = s.apply(signed(full_doc(5)))
    bob_sub = HASHER.subject(b"badge-bob")
    delta = delta_doc(
        5,
        6,
        add={
            # cti p0 is revoked already: counted once
            "deny": {"cti": [cti("p", 0), cti("n", 1)], "sub": [["acme", "carol"]]},
            "badges": {"allow": [{"subject": bob_sub, "label": "bob"}], "deny": []},
        },
        remove={
            # p1 goes, p9 was never there; bob's holder revocation ends
            "deny": {"cti": [cti("p", 1), cti("p", 9)], "sub": [["acme", "bob"]]},
            "badges": {"allow": [], "deny": [HASHER.subject(MALLORY)]},
        },
        schedules={"timezone": "UTC", "groups": {}},
    )
    new = s.apply(signed(delta), "site")
    assert (new.version, new.issued_at, new.source) == (6, 7, "snapshot")
    assert (new.deny_cti, new.deny_sub, len(new.denylist)) == (3, 1, 4)
    for c, denied in ((cti("p", 0), True), (cti("p", 1), False), (cti("n", 1), True)):
        assert (key_for_cti(bytes.fromhex(c)) in new.denylist) is denied
    assert key_for_subject("acme", "bob") not in new.denylist
    assert key_for_subject("acme", "carol") in new.denylist
    assert new.badges.allow == {HASHER.subject(ALICE), bob_sub} and new.badges.deny == set()
    assert new.badges.labels[bob_sub] == "bob"
    assert new.trust == base.trust and new.schedules.groups == ()
    # the base is untouched (scans still holding it see it whole)
    assert (base.deny_cti, len(base.denylist), base.badges.deny) == (
        3,
        4,
        frozenset({HASHER.subject(MALLORY)}),
    )
    assert s.status()["deltas"] == 1 and s.status()["source"] == "site"
    again = store(tmp_path).load()
    assert again is not None and again.version == 6
    assert again.denylist.fingerprints() == new.denylist.fingerprints()
    assert (again.badges, again.deny_cti, again.deny_sub) == (new.badges, 3, 1)
    # the same delta again (a reconnect) changes nothing
    assert s.apply(signed(delta)) is new


def test_a_delta_on_another_base_is_refused(tmp_path: Path) -> None:
    s = store(tmp_path)
    e = refusal(s, signed(delta_doc(5, 6)))
    assert str(e) == "delta for base 5, version in force is 0: publish a full snapshot"
    s.apply(signed(full_doc(5)))
    s.apply(signed(delta_doc(5, 6, add={"deny": {"cti": [cti("n", 1)]}})))
    e = refusal(s, signed(delta_doc(5, 7)))
    assert why_of(e) == "delta_base" and version_of(e) == 7
    assert str(e) == "delta for base 5, version in force is 6: publish a full snapshot"
    assert s.version == 6 and s.status()["refused"]["why"] == "delta_base"
    broken = refusal(s, signed(delta_doc(6, 7, add={"deny": {"cti": ["xyz"]}})))
    assert why_of(broken) == "content" and "deny.cti[0]" in str(broken)
    assert (
        refusal(s, signed(delta_doc(6, 7, add={"trust": {}})))
        .args[0]
        .endswith("unknown key 'trust' (deny, badges)")
    )
    # a full snapshot starts a new chain
    assert s.apply(signed(full_doc(8))).version == 8 and s.status()["deltas"] == 0


def test_make_delta_reproduces_the_full_snapshot(tmp_path: Path) -> None:
    old = full_doc(5)
    new = full_doc(
        6,
        trust={"keys": []},
        badges={"allow": [{"subject": HASHER.subject(ALICE), "label": "alice smith"}]},
        deny={"cti": [cti("p", 0), cti("q", 1)], "sub": [["acme", "eve"]]},
    )
    s = store(tmp_path)
    s.apply(signed(old))
    via_delta = s.apply(signed(make_delta(old, new, version=6, issued_at=new["issued_at"])))
    direct = build_set(read_snapshot(signed(new), PUB))
    assert via_delta.denylist.fingerprints() == direct.denylist.fingerprints()
    assert (via_delta.badges, via_delta.trust, via_delta.schedules) == (
        direct.badges,
        direct.trust,
        direct.schedules,
    )
    assert (via_delta.deny_cti, via_delta.deny_sub) == (direct.deny_cti, direct.deny_sub) == (2, 1)
    with pytest.raises(ValueError, match="must be above"):
        make_delta(old, new, version=5, issued_at=0)


# --- the kept file --------------------------------------------------------------------------------


def kept_variants() -> dict[str, Any]:
    def flip_signature(raw: bytes) -> bytes:
        kept = cbor2.loads(raw)
        base = bytearray(kept["base"])
        base[-1] ^= 1
        kept["base"] = bytes(base)
        return cbor2.dumps(kept)

    return {
        "truncated": (lambda raw: raw[: len(raw) // 2], "not a kept snapshot file"),
        "garbage": (lambda raw: os.urandom(len(raw)), "not a kept snapshot file"),
        "emptied": (lambda raw: b"", "not a kept snapshot file"),
        "zeroed": (lambda raw: bytes(len(raw)), "not a kept snapshot file"),
        "signature bit flipped": (flip_signature, "bad signature"),
        "other format": (lambda raw: cbor2.dumps({"format": "x"}), "qrgate-credentials-1"),
    }


@pytest.mark.parametrize("damage", sorted(kept_variants()))
def test_a_damaged_kept_file_is_moved_aside_at_start(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    store(tmp_path).apply(signed(full_doc(5)))
    kept = tmp_path / FILE_NAME
    fn, reason = kept_variants()[damage]
    kept.write_bytes(fn(kept.read_bytes()))
    s = store(tmp_path)
    assert s.load() is None and s.version == 0
    assert not kept.exists()
    aside = [p.name for p in tmp_path.iterdir()]
    assert len(aside) == 1 and aside[0].startswith(f"{FILE_NAME}.damaged-")
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any(reason in m and "moved aside" in m for m in logged), logged
    # a later snapshot is taken as if none was ever kept
    assert s.apply(signed(full_doc(2))).version == 2


def test_a_kept_file_for_another_key_or_site_is_moved_aside_without_a_key_left(
    tmp_path: Path,
) -> None:
    store(tmp_path).apply(signed(full_doc(5)))
    assert store(tmp_path, key=None).load() is None  # no key: not used, left in place
    assert (tmp_path / FILE_NAME).exists()
    assert store(tmp_path, site="branch").load() is None
    assert not (tmp_path / FILE_NAME).exists()
    store(tmp_path).apply(signed(full_doc(5)))
    assert store(tmp_path, key=OTHER.public_key()).load() is None
    assert len(list(tmp_path.glob(f"{FILE_NAME}.damaged-*"))) == 2


def test_a_kept_file_that_cannot_be_written_means_not_applied(tmp_path: Path) -> None:
    s = SnapshotStore(tmp_path / "missing", PUB)
    e = refusal(s, signed(full_doc(1)))
    assert why_of(e) == "cannot_keep" and "not applied" in str(e)
    assert s.current is None


def reader_toml(tmp_path: Path) -> Path:
    f = write_reader_config(tmp_path, allow=[ALICE])
    save_public_key(tmp_path / "snapshot.pub", SIGNER)
    text = f.read_text().replace("[policy]\n", '[policy]\nsnapshot_key = "snapshot.pub"\n', 1)
    f.write_text(text)
    return f


def test_the_reader_starts_on_the_kept_snapshot_or_on_its_files_when_it_is_damaged(
    tmp_path: Path,
) -> None:
    cfg = load_config(reader_toml(tmp_path))
    state = cfg.reader.state_dir
    state.mkdir(parents=True)
    store(state, site=None).apply(signed(full_doc(5, badges={"deny": [HASHER.subject(ALICE)]})))

    def start() -> CredentialSet:
        reader = build_reader(
            cfg,
            pin_factory=make_pin_factory("mock"),
            source=FeedSource(),
            clock_synced=lambda: False,
        )
        try:
            reader.start()
            assert not reader.wait(0)  # running
            return reader.scan.policy.credentials
        finally:
            reader.stop()

    kept = start()
    assert (kept.version, kept.source) == (5, "snapshot")
    assert kept.badges.deny == {HASHER.subject(ALICE)}
    (state / FILE_NAME).write_bytes(b"\xd2garbage")
    local = start()
    assert (local.version, local.source) == (0, "config")
    assert local.badges.allow == {HASHER.subject(ALICE)}
    assert len(list(state.glob(f"{FILE_NAME}.damaged-*"))) == 1


# --- kill -9 during apply -------------------------------------------------------------------------


ENTRIES = 40_000
CHILD = textwrap.dedent(
    """
    import hashlib, os, sys
    from firmware.policy import snapshot
    from firmware.policy.keys import load_private_key

    state, key_file, entries = sys.argv[1], sys.argv[2], int(sys.argv[3])
    key = load_private_key(key_file)
    snapshot.WRITE_CHUNK = 256 * 1024  # more moments inside the write

    def out(line):
        sys.stdout.write(line + "\\n")
        sys.stdout.flush()

    real_write, real_replace = os.write, os.replace

    def write(fd, data):
        n = real_write(fd, data)
        if len(data) >= 65536:
            out("w")
        return n

    def replace(a, b):
        real_replace(a, b)
        out("replaced")

    os.write, os.replace = write, replace

    def doc(version):
        tag = "a" if version % 2 else "b"
        ids = [hashlib.sha256(f"{tag}{i}".encode()).digest()[:16].hex() for i in range(entries)]
        return {"version": version, "issued_at": version, "deny": {"cti": ids}}

    store = snapshot.SnapshotStore(state, key.public_key())
    current = store.load()
    version = (current.version if current is not None else 0) + 1
    while True:
        data = snapshot.sign_snapshot(doc(version), key)
        out(f"start {version}")
        store.apply(data, "child")
        out(f"done {version}")
        version += 1
    """
)


def expected_key(version: int) -> bytes:
    tag = "a" if version % 2 else "b"
    return key_for_cti(hashlib.sha256(f"{tag}7".encode()).digest()[:16])


def test_kill_9_during_apply_leaves_a_whole_snapshot_of_a_written_version(tmp_path: Path) -> None:
    key_file = tmp_path / "snapshot.key"
    save_private_key(key_file, SIGNER)
    state = tmp_path / "state"
    state.mkdir()
    rng = random.Random(20261201)
    where: dict[str, int] = {}
    for _ in range(24):
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(state), str(key_file), str(ENTRIES)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        target = rng.randint(1, 30)
        lines: list[str] = []
        try:
            for line in proc.stdout:
                lines.append(line.strip())
                if len(lines) >= target and any(x.startswith("done") for x in lines):
                    break
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)
            proc.stdout.close()
        done = [int(x.split()[1]) for x in lines if x.startswith("done")]
        started = [int(x.split()[1]) for x in lines if x.startswith("start")]
        where[lines[-1].split()[0]] = where.get(lines[-1].split()[0], 0) + 1
        s = SnapshotStore(state, PUB)
        got = s.load()  # never raises
        assert got is not None, lines
        # the last finished version, or the one under way if its rename got through
        assert got.version in {done[-1], started[-1]}, (got.version, lines[-3:])
        assert (got.deny_cti, len(got.denylist)) == (ENTRIES, ENTRIES)
        assert expected_key(got.version) in got.denylist
        assert expected_key(got.version + 1) not in got.denylist
        assert [p.name for p in state.iterdir()] == [FILE_NAME]  # temp files removed
    # the kills landed inside writes and between them, not only after whole applies
    assert where.get("w", 0) + where.get("start", 0) + where.get("replaced", 0) >= 5, where


# --- the administrator's commands -----------------------------------------------------------------


def test_cli_build_show_and_delta(tmp_path: Path) -> None:
    runner = CliRunner()
    save_private_key(tmp_path / "s.key", SIGNER)
    save_public_key(tmp_path / "s.pub", SIGNER)
    save_public_key(tmp_path / "other.pub", OTHER)
    (tmp_path / "trust.json").write_text(json.dumps(full_doc(1)["trust"]))
    (tmp_path / "badges.json").write_text(json.dumps(full_doc(1)["badges"]))
    (tmp_path / "deny.json").write_text(json.dumps(full_doc(1)["deny"]))
    (tmp_path / "schedules.json").write_text(json.dumps(SCHEDULES))

    def build(version: int, *extra: str) -> Any:
        args = ["build", "--key", str(tmp_path / "s.key"), "--version", str(version)]
        args += ["--site", "hq", "--issued-at", "1790000000"]
        for part in ("trust", "badges", "schedules"):
            args += [f"--{part}", str(tmp_path / f"{part}.json")]
        args += ["--denylist", str(tmp_path / "deny.json"), *extra]
        return runner.invoke(credentials_cli, args)

    r = build(1, "--out", str(tmp_path / "v1.cose"))
    assert r.exit_code == 0, r.output
    assert "snapshot version 1 for site 'hq'" in r.output and "revoked passes" in r.output
    (tmp_path / "deny.json").write_text(json.dumps({"cti": [cti("p", 0), cti("z", 1)]}))
    r = build(
        2,
        "--out",
        str(tmp_path / "v2.cose"),
        "--delta-from",
        str(tmp_path / "v1.cose"),
        "--delta-out",
        str(tmp_path / "d2.cose"),
    )
    assert r.exit_code == 0, r.output
    assert "delta from version 1 to 2" in r.output
    # what a reader makes of them: v1 then the delta equals v2
    s = store(tmp_path / "a")
    (tmp_path / "a").mkdir()
    s.apply((tmp_path / "v1.cose").read_bytes())
    via = s.apply((tmp_path / "d2.cose").read_bytes())
    direct = build_set(read_snapshot((tmp_path / "v2.cose").read_bytes(), PUB))
    assert via.denylist.fingerprints() == direct.denylist.fingerprints()
    assert (via.deny_cti, via.deny_sub, via.badges) == (2, 0, direct.badges)

    r = runner.invoke(
        credentials_cli, ["show", str(tmp_path / "d2.cose"), "--key", str(tmp_path / "s.pub")]
    )
    assert r.exit_code == 0, r.output
    assert "delta from version 1 to version 2, site 'hq'" in r.output
    assert "signature valid" in r.output
    r = runner.invoke(
        credentials_cli,
        ["show", str(tmp_path / "v2.cose"), "--key", str(tmp_path / "other.pub"), "--json"],
    )
    assert r.exit_code == 1
    shown = json.loads(r.output)
    assert shown["signature"].startswith("INVALID: bad signature")
    assert shown["counts"]["revoked_passes"] == 2 and shown["version"] == 2
    r = runner.invoke(credentials_cli, ["show", str(tmp_path / "deny.json")])
    assert r.exit_code == 2 and "not a signed snapshot" in r.output

    (tmp_path / "deny.json").write_text(json.dumps({"cti": ["nothex"]}))
    r = build(3, "--out", str(tmp_path / "v3.cose"))
    assert r.exit_code == 2 and "deny.cti[0]" in r.output
    assert not (tmp_path / "v3.cose").exists()
    r = runner.invoke(credentials_cli, ["--help"])
    assert r.exit_code == 0 and "snapshot_key" in r.output and "--version" in r.output


def test_badge_list_of_a_snapshot_matches_what_badges_json_means(tmp_path: Path) -> None:
    s = store(tmp_path)
    new = s.apply(signed(full_doc(1, badges={"allow": [HASHER.subject(ALICE)], "version": 4})))
    assert new.badges == BadgeList(frozenset({HASHER.subject(ALICE)}), frozenset(), {}, 4)
