"""The administrator's CLI: `qrgate keys`, `qrgate pass` and `qrgate badge remove`, through
click's CliRunner on real files, the real QR renderer and the real decoder; the verdicts
with an injected clock through the functions the commands call."""

from __future__ import annotations

import json
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import base45
import pytest
from click.testing import CliRunner, Result
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.replay import load_gray
from firmware.admin.keys import merge_trust, new_key, parse_time, read_trust_inputs
from firmware.admin.passes import (
    KINDS,
    PNG_SCALE,
    QUIET_ZONE,
    explain,
    inspect_payload,
    issue,
    load_wallet,
    make_qr,
    offline_policy,
    reader_clock,
    reader_policy,
    rotating_frames,
)
from firmware.cli import main
from firmware.clock import ClockState
from firmware.config import load_config
from firmware.decoding.registry import make_decoder
from firmware.exceptions import KeyFileError
from firmware.policy.badges import load_badges
from firmware.policy.cose import kid_of
from firmware.policy.keys import load_private_key, load_public_key
from firmware.policy.passes import (
    PASS_PREFIX,
    ROTATING_PREFIX,
    VerifiedCache,
    read_pass,
    read_rotating,
    unwrap_pass,
)
from firmware.policy.policy import FixedClock, Policy
from firmware.policy.subjects import SubjectHasher, load_key
from firmware.policy.trust import TrustList, load_trust, rfc3339_to_seconds

SYNCED = FixedClock(ClockState.SYNCED)
CCCD = (
    "074085003417|280912345|Trần Văn Bình|14031985|Nam|"
    "Tổ 3, Khu phố Mẫu, Phường Bình Hòa, Thuận An, Bình Dương|10052021"
)
PERSONAL_QR = "074085003417|TRAN VAN BINH|1985-03-14|0|160000000000000001|<1<<0900000000"
T0 = 1_800_000_000  # 2027-01-15T08:00:00Z
S = 1_000_000_000


def run(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def decode_png(path: Path) -> list[bytes]:
    return [c.payload for c in make_decoder("zxing-cpp").decode(load_gray(path))]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Site:
    """An issuer key in a reader's trust list, a site key, and the reader's config."""

    dir: Path
    key: Path
    kid: str
    trust: Path
    site_key: Path
    badges: Path
    config: Path
    state: Path

    def policy(self, clock: FixedClock = SYNCED) -> Policy:
        return reader_policy(load_config(self.config), clock)


@pytest.fixture
def site(tmp_path: Path) -> Site:
    r = run("keys", "new", "--out", tmp_path / "keys", "--name", "acme", "--iss", "acme")
    assert r.exit_code == 0, r.output
    kid = r.stdout.strip()
    trust = tmp_path / "trust.json"
    r = run("keys", "trust", tmp_path / "keys" / "acme.trust.json", "--out", trust)
    assert r.exit_code == 0, r.output
    assert run("badge", "keygen", tmp_path / "site.key").exit_code == 0
    state = tmp_path / "state"
    state.mkdir()
    config = tmp_path / "reader.toml"
    config.write_text(
        '[reader]\ndoor = "front"\nzones = ["lobby"]\nstate_dir = "state"\n'
        '[camera]\nsource = "v4l2"\n'
        '[policy]\ntrust = "trust.json"\nhmac_key = "site.key"\nbadges = "badges.json"\n',
        encoding="utf-8",
    )
    (tmp_path / "badges.json").write_text('{"version": 1, "allow": [], "deny": []}')
    return Site(
        tmp_path,
        tmp_path / "keys" / "acme.key",
        kid,
        trust,
        tmp_path / "site.key",
        tmp_path / "badges.json",
        config,
        state,
    )


# --- keys -------------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_keys_new_writes_key_files_and_prints_kid(tmp_path: Path, alg: str) -> None:
    out = tmp_path / "k"
    r = run(
        "keys", "new", "--out", out, "--name", "gate", "--alg", alg, "--iss", "acme",
        "--not-before", "2027-01-01T00:00:00Z", "--not-after", "2028-01-01T00:00:00+07:00",
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert mode(out / "gate.key") == 0o600
    assert mode(out) == 0o700
    private = load_private_key(out / "gate.key")
    public = load_public_key(out / "gate.pub.pem")
    assert kid_of(private.public_key()) == kid_of(public)
    doc = json.loads((out / "gate.trust.json").read_text())
    assert r.stdout.strip() == doc["keys"][0]["kid"] == kid_of(public).hex()
    assert doc["keys"][0]["alg"] == alg and doc["keys"][0]["iss"] == "acme"
    (entry,) = load_trust(out / "gate.trust.json").values()
    assert entry.not_before == 1_798_761_600 and entry.not_after == 1_830_272_400


def test_keys_new_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run("keys", "new", "--out", tmp_path, "--name", "a").exit_code == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    r = run("keys", "new", "--out", tmp_path, "--name", "a")
    assert r.exit_code == 2 and "already exists" in r.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # one file of the three in the way is enough: nothing is written
    (tmp_path / "b.trust.json").write_text("{}")
    assert run("keys", "new", "--out", tmp_path, "--name", "b").exit_code == 2
    assert not (tmp_path / "b.key").exists() and not (tmp_path / "b.pub.pem").exists()
    with pytest.raises(ValueError, match="key name"):
        new_key(tmp_path, "../evil")


def test_keys_trust_merges_and_rotates(tmp_path: Path) -> None:
    old = new_key(tmp_path, "old", iss="acme")
    new = new_key(tmp_path, "new", "ES256")
    trust = tmp_path / "trust.json"
    r = run("keys", "trust", old.trust_path, new.public_path, "--iss", "acme", "--out", trust)
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [f"added {old.kid}", f"added {new.kid}"]
    keys = {k.kid.hex(): k for k in load_trust(trust).values()}
    assert list(keys) == [old.kid, new.kid] and {k.iss for k in keys.values()} == {"acme"}
    # retire the old key; the new one is untouched and keeps its iss
    r = run("keys", "trust", old.public_path, "--not-after", "2027-01-15T08:00:00Z", "--out", trust)
    assert r.stdout.splitlines() == [f"updated {old.kid}"]
    keys = {k.kid.hex(): k for k in load_trust(trust).values()}
    assert keys[old.kid].not_after == T0 and keys[old.kid].iss == "acme"
    assert keys[new.kid].not_after is None and keys[new.kid].iss == "acme"
    # what the reader then does: the old key's passes issued before T0 live, later ones not
    old_key = load_private_key(old.private_path)
    t = load_trust(trust)
    before = issue(old_key, iss="acme", sub="a", exp=T0 + 86_400, now_s=T0 - 60, doors=["*"])
    after = issue(old_key, iss="acme", sub="a", exp=T0 + 86_400, now_s=T0 + 60, doors=["*"])
    assert read_pass(before.text, t).claims.sub == "a"
    with pytest.raises(Exception, match="validity") as e:
        read_pass(after.text, t)
    assert getattr(e.value, "why", None) == "key_validity"
    # and once its passes have expired, out it goes
    r = run("keys", "trust", "--remove", old.kid, "--out", trust)
    assert r.stdout.splitlines() == [f"removed {old.kid}"]
    assert [k.kid.hex() for k in load_trust(trust).values()] == [new.kid]
    assert run("keys", "trust", "--remove", old.kid, "--out", trust).exit_code == 2


def test_merge_trust_keeps_existing_fields(tmp_path: Path) -> None:
    a = new_key(tmp_path, "a", iss="acme", not_before=T0)
    existing = TrustList(read_trust_inputs(a.trust_path))
    merged, changes = merge_trust(existing, read_trust_inputs(a.public_path))
    assert changes == [(a.kid, "unchanged")] and merged == existing
    with pytest.raises(ValueError, match="not_before is after not_after"):
        merge_trust(existing, read_trust_inputs(a.public_path), not_after=T0 - 1)


def test_parse_time() -> None:
    assert parse_time("+30d", T0) == T0 + 30 * 86_400
    assert parse_time("+8h", T0) == T0 + 8 * 3600
    assert parse_time("+15m", T0) == T0 + 900
    assert parse_time("-1h", T0) == T0 - 3600
    assert parse_time("now", T0) == T0
    assert parse_time("1790000000", T0) == 1_790_000_000
    assert parse_time("2027-01-15T15:00:00+07:00", 0) == T0
    for bad in ("tomorrow", "+3y", "30d", "2027-01-15", "-1d"):
        with pytest.raises(ValueError):
            parse_time(bad, 0 if bad == "-1d" else T0)


# --- pass issue -------------------------------------------------------------------------------


def test_pass_issue_png_decodes_to_the_code_text(site: Site) -> None:
    png = site.dir / "alice.png"
    r = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "alice@example.com",
        "--exp", "+30d", "--nbf", "-1m", "--doors", "front, back", "--zones", "lobby",
        "--schedule", "staff", "--png", png,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    text = r.stdout.strip().encode("ascii")
    assert text.startswith(PASS_PREFIX)
    assert decode_png(png) == [text]
    vp = read_pass(text, load_trust(site.trust))
    c = vp.claims
    assert (c.iss, c.sub, c.doors, c.zones, c.schedule) == (
        "acme",
        "alice@example.com",
        ("front", "back"),
        ("lobby",),
        "staff",
    )
    assert len(c.cti) == 16 and c.exp - c.iat == 30 * 86_400 and c.nbf == c.iat - 60
    assert abs(c.iat - time.time()) < 3600  # iat is now (generous: no timing assertion)
    assert f"pass id {c.cti.hex()}" in r.stderr


def test_code_is_alphanumeric_mode_error_correction_m(site: Site) -> None:
    png = site.dir / "p.png"
    r = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "bob",
        "--exp", "+1d", "--doors", "*", "--png", png,
    )  # fmt: skip
    text = r.stdout.strip().encode("ascii")
    assert re.fullmatch(rb"[0-9A-Z $%*+\-./:]+", text)
    qr = make_qr(text)
    assert (qr.mode, qr.error) == ("alphanumeric", "M")
    import segno

    byte_mode = segno.make_qr(text.decode(), error="m", mode="byte", boost_error=False)
    assert byte_mode.version > qr.version  # the mode matters for this text
    # the PNG is that symbol: 8 px per module with a 4-module quiet zone
    modules = qr.symbol_size(scale=1, border=0)[0]
    assert load_gray(png).shape == ((modules + 2 * QUIET_ZONE) * PNG_SCALE,) * 2


def test_pass_issue_svg_and_terminal(site: Site) -> None:
    svg = site.dir / "p.svg"
    args = ["pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "c", "--exp", "+1h"]
    r = run(*args, "--doors", "*", "--svg", svg)
    assert r.exit_code == 0 and svg.read_text().lstrip().startswith("<?xml")
    r = run(*args, "--zones", "lobby")
    lines = r.stdout.splitlines()
    assert lines[0].startswith("QG1:") and "\x1b[" in r.stdout and len(lines) > 20


def test_pass_issue_refusals(site: Site) -> None:
    args = ["pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "c"]
    r = run(*args, "--exp", "+1h")
    assert r.exit_code == 2 and "open nothing" in r.output
    r = run(*args, "--exp", "soon", "--doors", "*")
    assert r.exit_code == 2 and "--exp" in r.output
    r = run(*args, "--exp", "+1h", "--doors", "*", "--rotating")
    assert r.exit_code == 2 and "--wallet" in r.output
    r = run(*args, "--exp", "+1h", "--nbf", "+2h", "--doors", "*")
    assert r.exit_code == 2 and "never be valid" in r.output
    os.chmod(site.key, 0o644)
    r = run(*args, "--exp", "+1h", "--doors", "*")
    assert r.exit_code == 2 and "owner only" in r.stderr


# --- pass inspect -----------------------------------------------------------------------------


def test_inspect_valid_pass_with_reader_policy(site: Site) -> None:
    key = load_private_key(site.key)
    p = issue(
        key, iss="acme", sub="alice", exp=T0 + 3600, now_s=T0 - 60, nbf=T0 - 60, doors=["front"]
    )
    r = inspect_payload(p.text, site.policy(), T0 * S)
    assert (r["kind"], r["valid"], r["decision"], r["reason"], r["why"]) == (
        "signed_pass",
        True,
        "granted",
        "granted",
        None,
    )
    assert r["claims"] == {
        "iss": "acme",
        "sub": "alice",
        "iat": "2027-01-15T07:59:00Z",
        "nbf": "2027-01-15T07:59:00Z",
        "exp": "2027-01-15T09:00:00Z",
        "pass_id": p.claims.cti.hex(),
        "doors": ["front"],
        "zones": None,
        "schedule": None,
        "rotating": False,
        "period_s": None,
    }
    assert r["claims_verified"] is True and r["kid"] == site.kid
    assert r["clock"] == {"state": "synced", "now": "2027-01-15T08:00:00Z", "floor": None}
    assert r["reader"] == {
        "configured": True,
        "door": "front",
        "zones": ["lobby"],
        "issuer_keys": 1,
        "credentials": {"source": "config", "version": 0},
    }
    # a pass for another door is still valid; the door rule denies it
    other = issue(key, iss="acme", sub="a", exp=T0 + 3600, now_s=T0, doors=["back"])
    r = inspect_payload(other.text, site.policy(), T0 * S)
    assert (r["valid"], r["decision"], r["reason"]) == (True, "denied", "wrong_door")
    assert "not door 'front'" in r["explanation"]
    # the same valid pass on an untrusted clock
    r = inspect_payload(p.text, site.policy(FixedClock(ClockState.UNTRUSTED)), T0 * S)
    assert (r["valid"], r["reason"], r["clock"]["state"]) == (False, "clock_untrusted", "untrusted")


def test_inspect_expired_forged_and_unknown_key(site: Site) -> None:
    key = load_private_key(site.key)
    policy = site.policy()
    expired = issue(key, iss="acme", sub="al", exp=T0 - 86_400, now_s=T0 - 9 * 86_400, doors=["*"])
    r = inspect_payload(expired.text, policy, T0 * S)
    assert (r["kind"], r["valid"], r["decision"], r["reason"]) == (
        "signed_pass",
        False,
        "denied",
        "expired",
    )
    assert r["claims_verified"] is True and r["explanation"] == "expired at 2027-01-14T08:00:00Z"

    good = issue(key, iss="acme", sub="alice", exp=T0 + 3600, now_s=T0, doors=["*"])
    cose = unwrap_pass(good.text)
    assert cose.count(b"alice") == 1
    forged = PASS_PREFIX + base45.b45encode(cose.replace(b"alice", b"alicf"))
    r = inspect_payload(forged, policy, T0 * S)
    assert (r["kind"], r["valid"], r["reason"], r["why"]) == (
        "signed_pass",
        False,
        "bad_signature",
        "signature",
    )
    assert r["claims_verified"] is False and r["claims"]["sub"] == "alicf"
    assert "UNVERIFIED" in "\n".join(explain(r))

    stranger = Ed25519PrivateKey.generate()
    unknown = issue(stranger, iss="acme", sub="x", exp=T0 + 3600, now_s=T0, doors=["*"])
    r = inspect_payload(unknown.text, policy, T0 * S)
    assert (r["valid"], r["reason"], r["why"]) == (False, "unknown_issuer", "unknown_kid")
    assert r["kid"] == kid_of(stranger.public_key()).hex() and r["claims"]["sub"] == "x"
    assert r["kid"] in r["explanation"]


def test_inspect_id_cards_badges_and_unknown(site: Site) -> None:
    policy = site.policy()
    r = inspect_payload(CCCD.encode(), policy, T0 * S)
    assert (r["kind"], r["valid"], r["decision"], r["reason"]) == (
        "cccd",
        True,
        "denied",
        "not_enrolled",
    )
    assert r["detail"]["person"]["birth_year"] == 1985 and "claims" not in r
    assert r["detail"]["person"]["name_masked"] == "Trần V** B**"
    shown = json.dumps(r, ensure_ascii=False)
    assert "Bình" not in shown and "Thuận An" not in shown and "074085003417" not in shown
    r = inspect_payload(PERSONAL_QR.encode(), policy, T0 * S)
    assert (r["kind"], r["reason"]) == ("personal_qr", "not_enrolled")
    r = inspect_payload(b"074085003417|bad", policy, T0 * S)
    assert (r["kind"], r["valid"], r["reason"]) == ("cccd", False, "invalid_id_card")
    r = inspect_payload(b"hello world", policy, T0 * S)
    assert (r["kind"], r["valid"], r["decision"], r["reason"]) == (
        "unknown",
        False,
        "denied",
        "unknown",
    )
    r = run("badge", "add", "--key", site.site_key, "--list", site.badges, "--text", "B1")
    assert r.exit_code == 0
    r = inspect_payload(b"B1", site.policy(), T0 * S)
    assert (r["kind"], r["valid"], r["decision"]) == ("badge", True, "granted")
    assert r["subject"] == SubjectHasher(load_key(site.site_key)).subject(b"B1")
    assert {inspect_payload(p, policy, T0 * S)["kind"] for p in (b"QG1:", b"QGR1:")} == {
        "signed_pass",
        "rotating_pass",
    }


def test_inspect_cli_json_with_config(site: Site) -> None:
    png = site.dir / "p.png"
    r = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "alice",
        "--exp", "+1d", "--doors", "front", "--png", png,
    )  # fmt: skip
    assert r.exit_code == 0
    r = run("pass", "inspect", "--config", site.config, png, "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["kind"] == "signed_pass" and out["claims_verified"] is True
    assert out["claims"]["sub"] == "alice" and out["kid"] == site.kid
    assert out["clock"]["state"] in {"synced", "holdover", "untrusted"}
    # whatever this machine's clock: granted exactly when it is trusted
    trusted = out["clock"]["state"] != "untrusted"
    assert (out["valid"], out["decision"]) == (trusted, "granted" if trusted else "denied")
    assert out["reason"] == ("granted" if trusted else "clock_untrusted")
    assert list(site.state.iterdir()) == []  # an inspection writes no state
    # the human form says the same
    r = run("pass", "inspect", "--config", site.config, png)
    assert r.exit_code == 0 and "signed pass: " in r.stdout
    assert f"verified with key {site.kid}" in r.stdout and "holder 'alice'" in r.stdout


def test_inspect_cli_without_config_is_unverified(site: Site) -> None:
    text = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "alice",
        "--exp", "+1d", "--doors", "front", "--png", site.dir / "p.png",
    ).stdout.strip()  # fmt: skip
    r = run("pass", "inspect", text, "--json")
    out = json.loads(r.stdout)
    assert (out["kind"], out["valid"], out["decision"], out["reason"]) == (
        "signed_pass",
        False,
        "denied",
        "unknown_issuer",
    )
    assert out["claims_verified"] is False and out["claims"]["sub"] == "alice"
    assert out["reader"]["configured"] is False and out["subject"] is None
    r = run("pass", "inspect", text)
    assert "UNVERIFIED" in r.stdout and "nothing is trusted" in r.stdout
    r = run("pass", "inspect", CCCD, "--json")
    assert json.loads(r.stdout)["kind"] == "cccd"
    r = run("pass", "inspect", PERSONAL_QR, "--json")
    assert json.loads(r.stdout)["kind"] == "personal_qr"
    r = run("pass", "inspect", "just some text", "--json")
    assert (json.loads(r.stdout)["kind"], r.exit_code) == ("unknown", 0)
    r = run("pass", "inspect", "A" * 5000, "--json")  # longer than a file name may be
    assert (json.loads(r.stdout)["reason"], r.exit_code) == ("malformed", 0)


def test_inspect_unreadable_input_exits_2(site: Site, tmp_path: Path) -> None:
    from PIL import Image

    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png at all")
    for arg, needle in (
        (blank, "no QR code"),
        (garbage, "garbage.png"),
        (tmp_path / "missing.png", "no such image"),
    ):
        r = run("pass", "inspect", arg)
        assert r.exit_code == 2 and needle in r.stderr, (arg, r.output)
    r = run("pass", "inspect", "--config", tmp_path / "nope.toml", "x")
    assert r.exit_code == 2


def test_reader_clock_reads_the_state_and_writes_nothing(tmp_path: Path) -> None:
    from firmware.clock import ClockTrust

    record = tmp_path / "clock.json"
    record.write_text('{"wall_ns": 1790000000000000000, "mono_ns": 1, "boot_id": "x"}')
    before = record.read_bytes()
    clock = reader_clock(tmp_path, probe=lambda: True)
    assert clock.state() is ClockState.SYNCED and clock.floor_s() >= 1_790_000_000
    assert record.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [
        "clock.json"
    ]
    unsynced = reader_clock(tmp_path, probe=lambda: False)
    assert unsynced.state() is ClockState.UNTRUSTED and unsynced.floor_s() == 1_790_000_000
    # the daemon's own clock trust does write there (what the read-only one must not do)
    ClockTrust(lambda: True, state_file=record, boot_id="y")
    assert record.read_bytes() != before


def test_inspect_judges_with_the_kept_snapshot_and_leaves_it(site: Site) -> None:
    from firmware.policy.snapshot import SnapshotStore, sign_snapshot

    signer = new_key(site.dir / "keys", "snap")
    issuer2 = new_key(site.dir / "keys", "acme2", iss="acme")
    with site.config.open("a", encoding="utf-8") as f:
        f.write(f'snapshot_key = "{signer.public_path}"\n')
    doc = {
        "version": 5,
        "issued_at": T0,
        "trust": json.loads(issuer2.trust_path.read_text()),
    }
    data = sign_snapshot(doc, load_private_key(signer.private_path))
    SnapshotStore(site.state, load_public_key(signer.public_path)).apply(data)
    kept = {p.name: p.read_bytes() for p in site.state.iterdir()}
    assert kept  # the reader keeps the snapshot there
    key2 = load_private_key(issuer2.private_path)
    p2 = issue(key2, iss="acme", sub="s", exp=T0 + 60, now_s=T0, doors=["front"])
    p1 = issue(load_private_key(site.key), iss="acme", sub="s", exp=T0 + 60, now_s=T0, doors=["*"])
    policy = site.policy()
    r = inspect_payload(p2.text, policy, T0 * S)
    assert (r["decision"], r["kid"]) == ("granted", issuer2.kid)
    assert r["reader"]["credentials"] == {"source": "snapshot", "version": 5}
    # the snapshot replaced the local trust list: the first key is no longer known there
    assert inspect_payload(p1.text, policy, T0 * S)["why"] == "unknown_kid"
    assert {p.name: p.read_bytes() for p in site.state.iterdir()} == kept
    assert "snapshot version 5" in "\n".join(explain(r))


@settings(max_examples=300, deadline=None)
@given(
    prefix=st.sampled_from([b"", b"QG1:", b"QGR1:", b"074085003417|"]),
    body=st.one_of(
        st.binary(max_size=200),
        st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:", max_size=200).map(
            str.encode
        ),
    ),
)
def test_inspect_never_raises(prefix: bytes, body: bytes) -> None:
    r = inspect_payload(prefix + body, FUZZ_POLICY, T0 * S)
    assert r["kind"] in KINDS and r["decision"] == "denied"
    json.dumps(r)
    assert explain(r)[0].endswith(r["reason"] + (f" ({r['why']})" if r["why"] else ""))


FUZZ_POLICY = offline_policy(SYNCED)


# --- pass show (rotating) ---------------------------------------------------------------------


def issue_rotating(site: Site, *extra: object) -> tuple[Path, bytes]:
    wallet = site.dir / "bob.wallet"
    r = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "bob", "--exp", "+1d",
        "--zones", "lobby", "--rotating", "--period", "10", "--wallet", wallet,
        "--png", site.dir / "bob.png", *extra,
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return wallet, r.stdout.strip().encode()


def frames_in(folder: Path) -> list[tuple[int, bytes]]:
    out = []
    for png in sorted(folder.glob("*.png")):
        m = re.fullmatch(r"frame-\d{3}-step-(\d+)\.png", png.name)
        assert m is not None
        (text,) = decode_png(png)
        out.append((int(m.group(1)), text))
    return out


def test_pass_show_frames_are_rotating_codes_that_verify(site: Site) -> None:
    wallet, pass_text = issue_rotating(site)
    assert mode(wallet) == 0o600
    w = load_wallet(wallet)
    assert w.pass_text == pass_text and w.period_s == 10 and w.claims.sub == "bob"
    show = ["pass", "show", "--rotating", wallet, "--door", "front", "--png-dir", site.dir / "f"]
    r = run(*show, "--frames", 3)
    assert r.exit_code == 0, r.output
    frames = frames_in(site.dir / "f")
    steps = [s for s, _ in frames]
    assert len(frames) == 3 and steps == list(range(steps[0], steps[0] + 3))
    trust = load_trust(site.trust)
    for step, text in frames:
        assert text.startswith(ROTATING_PREFIX)
        vr = read_rotating(text, trust, VerifiedCache())
        assert (vr.step, vr.door, vr.pass_.claims.sub) == (step, "front", "bob")
        # at its own time step the reader grants it
        verdict = inspect_payload(text, site.policy(), (step * 10 + 1) * S)
        assert (verdict["kind"], verdict["decision"], verdict["valid"]) == (
            "rotating_pass",
            "granted",
            True,
        )
    # the bare pass is a screenshot
    r2 = inspect_payload(pass_text, site.policy(), steps[0] * 10 * S)
    assert (r2["kind"], r2["reason"], r2["why"]) == (
        "signed_pass",
        "stale_code",
        "rotating_pass_shown_static",
    )


def test_pass_show_at_a_past_time_is_refused_as_stale(site: Site) -> None:
    wallet, _ = issue_rotating(site)
    now = time.time()
    past = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 300))
    show = ["pass", "show", "--rotating", wallet, "--png-dir", site.dir / "old", "--frames", 1]
    r = run(*show, "--at", past)
    assert r.exit_code == 0, r.output
    ((step, stale),) = frames_in(site.dir / "old")
    assert step == rfc3339_to_seconds(past) // 10
    policy = site.policy()
    r1 = inspect_payload(stale, policy, int(now * S))
    assert (r1["kind"], r1["valid"], r1["decision"], r1["reason"], r1["why"]) == (
        "rotating_pass",
        False,
        "denied",
        "stale_code",
        "step_out_of_range",
    )
    assert r1["code"]["steps_behind"] >= 29 and r1["claims_verified"] is True
    # the same wallet's code for now is granted by the same policy
    (fresh,) = rotating_frames(load_wallet(wallet), now, 1)
    assert inspect_payload(fresh.text, policy, int(now * S))["decision"] == "granted"
    # the terminal once, at a given time, prints that code's text
    r = run("pass", "show", "--rotating", wallet, "--at", past)
    assert r.exit_code == 0 and stale.decode() in r.stdout


def test_wallet_refusals(site: Site) -> None:
    wallet, _ = issue_rotating(site)
    os.chmod(wallet, 0o644)
    with pytest.raises(KeyFileError, match="owner only"):
        load_wallet(wallet)
    os.chmod(wallet, 0o600)
    doc = json.loads(wallet.read_text())
    doc["holder_key"] = "A" * 43 + "="
    wallet.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="holder key is not the one"):
        load_wallet(wallet)
    wallet.write_text("[]")
    with pytest.raises(KeyFileError, match="not a qrgate wallet"):
        load_wallet(wallet)
    r = run("pass", "show", "--rotating", wallet, "--once")
    assert r.exit_code == 2 and "not a qrgate wallet" in r.stderr
    # a wallet is never overwritten
    r = run(
        "pass", "issue", "--key", site.key, "--iss", "acme", "--sub", "x", "--exp", "+1d",
        "--doors", "*", "--rotating", "--wallet", wallet,
    )  # fmt: skip
    assert r.exit_code == 2 and wallet.read_text() == "[]"


# --- badge remove -----------------------------------------------------------------------------


def test_badge_remove(site: Site) -> None:
    lst = site.dir / "b.json"
    hasher = SubjectHasher(load_key(site.site_key))
    base = ["--key", site.site_key, "--list", lst]
    assert run("badge", "remove", *base, "--text", "A").exit_code == 2  # no list yet
    for payload in ("A", "B"):
        assert run("badge", "add", *base, "--text", payload, "--label", payload).exit_code == 0
    assert run("badge", "add", *base, "--hex", "00ff", "--deny").exit_code == 0
    v = load_badges(lst).version
    r = run("badge", "remove", *base, "--text", "A")
    assert r.exit_code == 0 and r.stdout.strip() == f"removed {hasher.subject(b'A')}"
    b = load_badges(lst)
    assert b.allow == {hasher.subject(b"B")} and b.version == v + 1
    assert b.labels == {hasher.subject(b"B"): "B"}
    r = run("badge", "remove", *base, "--text", "B", "--revoke")
    b = load_badges(lst)
    assert r.exit_code == 0 and not b.allow
    assert b.deny == {hasher.subject(b"B"), hasher.subject(bytes.fromhex("00ff"))}
    r = run("badge", "remove", *base, "--hex", "00FF")
    assert r.exit_code == 0 and load_badges(lst).deny == {hasher.subject(b"B")}
    before = lst.read_bytes()
    r = run("badge", "remove", *base, "--text", "A")
    assert r.exit_code == 1 and "nothing changed" in r.stdout and lst.read_bytes() == before
    assert run("badge", "remove", *base, "--text", "B", "--revoke").exit_code == 1
    assert run("badge", "remove", *base).exit_code == 2
