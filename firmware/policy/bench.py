"""Credential benchmarks for ``make bench`` (scripts/bench.py, section ``credentials``).

Verification per scan through :meth:`Policy.decide`, denylist lookups and memory, snapshot
apply, and a hostile-payload run through :meth:`Policy.check`. Each function returns plain
numbers; the script formats them.
"""

from __future__ import annotations

import gc
import os
import random
import tempfile
import time
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import base45
import cbor2
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware.clock import ClockState
from firmware.decoding.codes import DecodedCode
from firmware.policy import cose
from firmware.policy.badges import BadgeKind
from firmware.policy.context import CredentialKind
from firmware.policy.credentials import CredentialSet
from firmware.policy.denylist import Denylist, key_for_cti
from firmware.policy.keys import generate_key
from firmware.policy.kinds import IdCardKind, PassRules, RotatingPassKind, SignedPassKind
from firmware.policy.passes import (
    PassClaims,
    issue_pass,
    rotating_code,
    step_of,
    unwrap_pass,
)
from firmware.policy.policy import FixedClock, Policy
from firmware.policy.repeat import RepeatWindow
from firmware.policy.snapshot import SnapshotStore, sign_snapshot, snapshot_document
from firmware.policy.subjects import SubjectHasher
from firmware.policy.trust import IssuerKey, TrustList
from firmware.policy.verdict import Reason

CORNERS = ((0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0))
ISS = "bench-issuer"


def rss_kb() -> int:
    """VmRSS of this process, kB (0 where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def revoked_ctis(n: int, seed: int = 1) -> list[bytes]:
    """``n`` distinct 16-byte pass ids (deterministic)."""
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(n)]


@dataclass
class Setup:
    """Keys, passes and a policy on a SYNCED fixed clock with a 100,000-entry denylist."""

    now_s: int
    ed: Any
    es: Any
    holder: Ed25519PrivateKey
    trust: TrustList
    credentials: CredentialSet
    kinds: list[CredentialKind]
    policy: Policy
    ed_pass: bytes
    es_pass: bytes
    rotating_cose: bytes
    rotating_period: int
    deny_size: int
    extra: dict[str, Any] = field(default_factory=dict)


def _claims(now_s: int, cti: bytes, **kw: Any) -> PassClaims:
    return PassClaims(
        iss=ISS,
        sub=kw.pop("sub", "holder-1"),
        exp=now_s + 30 * 86400,
        nbf=now_s - 3600,
        iat=now_s - 60,
        cti=cti,
        doors=("*",),
        **kw,
    )


def make_setup(deny_size: int = 100_000) -> Setup:
    now_s = int(time.time())
    ed, es = generate_key("EdDSA"), generate_key("ES256")
    holder = Ed25519PrivateKey.generate()
    trust = TrustList.of([IssuerKey.of(ed.public_key(), ISS), IssuerKey.of(es.public_key(), ISS)])
    deny = Denylist.build(key_for_cti(c) for c in revoked_ctis(deny_size))
    creds = CredentialSet(trust=trust, denylist=deny, deny_cti=deny_size)
    rules = PassRules()
    kinds: list[CredentialKind] = [
        SignedPassKind(rules),
        RotatingPassKind(rules),
        IdCardKind(checkin=False),
        BadgeKind(),
    ]
    policy = Policy(
        kinds,
        SubjectHasher(bytes(range(32))),
        4096,
        credentials=creds,
        clock=FixedClock(ClockState.SYNCED, float(now_s)),
        door="door-1",
    )
    ed_pass = issue_pass(_claims(now_s, b"bench-ed-pass-01"), ed)
    es_pass = issue_pass(_claims(now_s, b"bench-es-pass-01"), es)
    period = 1
    raw_holder = holder.public_key().public_bytes_raw()
    rot = issue_pass(
        _claims(now_s, b"bench-rot-pass-1", holder_key=raw_holder, period_s=period), ed
    )
    return Setup(
        now_s, ed, es, holder, trust, creds, kinds, policy, ed_pass, es_pass,
        unwrap_pass(rot), period, deny_size,
    )  # fmt: skip


# --- 1. verification per scan ------------------------------------------------------------------


def _decide_ms(
    policy: Policy, payloads: list[bytes], walls_ns: list[int], expect: Reason
) -> list[float]:
    seen = RepeatWindow(0)  # never observed: nothing is a repeat
    out: list[float] = []
    for i, (p, wall) in enumerate(zip(payloads, walls_ns, strict=True)):
        code = DecodedCode(p, CORNERS, "bench")
        t0 = time.perf_counter_ns()
        d = policy.decide([code], seen, i, wall)
        out.append((time.perf_counter_ns() - t0) / 1e6)
        if d is None or d.reason is not expect:
            raise AssertionError(f"bench pass decided {d and d.reason}, expected {expect}")
    return out


def verify_per_scan(s: Setup, n: int = 3000, warm: int = 100) -> dict[str, list[float]]:
    """Decide times (ms) for n scans each: signed EdDSA, signed ES256, rotating (a new step
    each scan, the wall clock moving with it; the issuer signature cached after the first)."""
    gc.collect()
    wall = s.now_s * 1_000_000_000
    res: dict[str, list[float]] = {}
    for name, text in (("signed pass EdDSA", s.ed_pass), ("signed pass ES256", s.es_pass)):
        _decide_ms(s.policy, [text] * warm, [wall] * warm, Reason.GRANTED)
        res[name] = _decide_ms(s.policy, [text] * n, [wall] * n, Reason.GRANTED)
    first = step_of(s.now_s, s.rotating_period)
    steps = range(first, first + warm + n)
    codes = [rotating_code(s.rotating_cose, s.holder, st, None) for st in steps]
    walls = [st * s.rotating_period * 1_000_000_000 for st in steps]
    _decide_ms(s.policy, codes[:warm], walls[:warm], Reason.GRANTED)
    res["rotating pass (new step each scan)"] = _decide_ms(
        s.policy, codes[warm:], walls[warm:], Reason.GRANTED
    )
    return res


# --- 2. denylist lookups and memory -------------------------------------------------------------


@dataclass
class DenyResult:
    entries: int
    build_s: float
    nbytes: int
    traced_bytes: int
    traced_peak: int
    rss_delta_kb: int
    member_ns: float
    absent_ns: float
    loop_ns: float


def denylist_bench(n: int, lookups: int = 200_000) -> DenyResult:
    keys = [key_for_cti(c) for c in revoked_ctis(n, seed=n)]
    gc.collect()
    r0 = rss_kb()
    t0 = time.perf_counter()
    d = Denylist.build(keys)
    build_s = time.perf_counter() - t0
    rss_delta = rss_kb() - r0
    del d
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    d = Denylist.build(keys)
    traced, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rng = random.Random(7)
    members = [keys[rng.randrange(n)] for _ in range(lookups)]
    absent = [key_for_cti(rng.randbytes(16)) for _ in range(lookups)]

    def per_lookup(ks: list[bytes], expect: bool | None) -> float:
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter_ns()
            # expect None: the loop alone, for its overhead
            hits = sum(1 for k in ks if k) if expect is None else sum(1 for k in ks if k in d)
            best = min(best, (time.perf_counter_ns() - t) / len(ks))
            if expect is not None and hits != (len(ks) if expect else 0):
                raise AssertionError(f"denylist: {hits} hits of {len(ks)}, expected {expect}")
        return best

    return DenyResult(
        n,
        build_s,
        d.nbytes,
        traced - before,
        peak - before,
        rss_delta,
        per_lookup(members, True),
        per_lookup(absent, False),
        per_lookup(absent, None),
    )


# --- 3. snapshot apply ----------------------------------------------------------------------------


@dataclass
class SnapResult:
    entries: int
    bytes: int
    sign_s: float
    apply_s: list[float]
    folder: str


def snapshot_apply(s: Setup, n: int = 100_000, repeats: int = 3) -> SnapResult:
    """SnapshotStore.apply of a full snapshot with ``n`` revoked pass ids (new version each
    time) into a temp folder on disk (its fsyncs real)."""
    key = generate_key("EdDSA")
    deny = {"cti": [c.hex() for c in revoked_ctis(n, seed=3)]}
    blobs = []
    t0 = time.perf_counter()
    for v in range(1, repeats + 1):
        doc = snapshot_document(version=v, issued_at=s.now_s, trust=s.trust.to_json(), deny=deny)
        blobs.append(sign_snapshot(doc, key))
    sign_s = (time.perf_counter() - t0) / repeats
    times = []
    base = Path(tempfile.gettempdir())
    with tempfile.TemporaryDirectory(dir=base) as tmp:
        store = SnapshotStore(Path(tmp), key.public_key())
        for blob in blobs:
            gc.collect()
            t = time.perf_counter()
            new = store.apply(blob, "bench")
            times.append(time.perf_counter() - t)
            if len(new.denylist) != n:
                raise AssertionError(f"snapshot applied {len(new.denylist)} entries, not {n}")
    return SnapResult(n, len(blobs[0]), sign_s, times, str(base))


# --- 4. hostile payloads --------------------------------------------------------------------------


def _sign1_raw(
    protected: dict[Any, Any] | bytes,
    payload: bytes,
    key: Any,
    unprotected: dict[Any, Any] | None = None,
    tag: int = 18,
) -> bytes:
    """A COSE_Sign1 with any protected header, signed over the real Sig_structure by ``key``
    (whatever the header says), so the reader's own checks are what refuse it."""
    prot = protected if isinstance(protected, bytes) else cbor2.dumps(protected)
    tbs = cose.sig_structure(prot, payload)
    if isinstance(key, Ed25519PrivateKey):
        sig = key.sign(tbs)
    else:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

        r, s_ = decode_dss_signature(key.sign(tbs, ec.ECDSA(hashes.SHA256())))
        sig = r.to_bytes(32, "big") + s_.to_bytes(32, "big")
    return cbor2.dumps(cbor2.CBORTag(tag, [prot, unprotected or {}, payload, sig]))


def _qg1(cose_bytes: bytes, compress: bool = False) -> bytes:
    body = zlib.compress(cose_bytes, 9) if compress else cose_bytes
    text: bytes = b"QG1:" + base45.b45encode(body)
    return text


def _claims_map(s: Setup) -> dict[int, Any]:
    return {1: ISS, 2: "holder-x", 4: s.now_s + 86400, 6: s.now_s - 60, 7: b"c" * 8}


def hostile_pool(s: Setup, size: int = 8000, seed: int = 11) -> dict[str, list[bytes]]:
    """Hostile payloads by family (about ``size`` in all)."""
    rng = random.Random(seed)
    ed, es = s.ed, s.es
    ed_kid = cose.kid_of(ed.public_key())
    es_kid = cose.kid_of(es.public_key())
    other = generate_key("EdDSA")
    other_es = generate_key("ES256")
    good = cbor2.dumps(_claims_map(s))
    pool: dict[str, list[bytes]] = {}
    per = max(50, size // 14)

    def rb(lo: int, hi: int) -> bytes:
        return rng.randbytes(rng.randint(lo, hi))

    pool["random bytes"] = [rb(0, 600) for _ in range(per)] + [rb(4000, 5000) for _ in range(5)]
    pool["random after a pass prefix"] = [
        rng.choice([b"QG1:", b"QGR1:"]) + rb(0, 400) for _ in range(per)
    ]
    b45 = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
    pool["random base45 after a prefix"] = [
        rng.choice([b"QG1:", b"QGR1:"]) + bytes(rng.choice(b45) for _ in range(rng.randint(1, 600)))
        for _ in range(per)
    ]
    reals = [s.ed_pass, s.es_pass] + [
        rotating_code(s.rotating_cose, s.holder, step_of(s.now_s, 1), d) for d in (None, "door-1")
    ]
    pool["truncated real passes"] = [
        r[: rng.randint(0, len(r) - 1)] for r in reals for _ in range(per // 4)
    ]
    wrong_types: list[dict[int, Any]] = []
    for label, bad in [
        (1, 7), (1, b"iss"), (1, ""), (1, None), (2, [1]), (2, {}), (4, "2030"), (4, -1),
        (4, 2**64), (4, 1.5), (4, True), (6, None), (6, b"\x00"), (7, 7), (7, ""), (7, b""),
        (7, b"x" * 33), (8, 1), (8, {1: 2}), (8, {1: {1: 1, -1: 6, -2: b"short"}}), (8, {}),
        (-65537, "door-1"), (-65537, [1, 2]), (-65537, {"*": 1}), (-65538, 5),
        (-65539, 3), (-65540, 0), (-65540, 301), (-65540, "10"), (5, "now"),
    ]:  # fmt: skip
        m = _claims_map(s)
        m[label] = bad
        wrong_types.append(m)
    for missing in (1, 2, 4, 6, 7):
        m = _claims_map(s)
        del m[missing]
        wrong_types.append(m)
    wt: list[bytes] = []
    for m in wrong_types:
        payload = cbor2.dumps(m)
        for key in (ed, es):
            wt.append(_qg1(cose.sign1(payload, key, cose.kid_of(key.public_key()))))
    for payload in (cbor2.dumps([1, 2]), cbor2.dumps("claims"), b"\xa1", b"\xff", b""):
        wt.append(_qg1(cose.sign1(payload, ed, ed_kid)))
    pool["wrong CBOR types in claims (validly signed)"] = wt
    huge = []
    for n in (300, 1000, 1500):
        m = _claims_map(s)
        m[2] = "h" * n
        huge.append(m)
    for n in (65, 200, 500):
        m = _claims_map(s)
        m[-65537] = [f"d{i}" for i in range(n)]
        huge.append(m)
    m = _claims_map(s)
    for i in range(600):
        m[1000 + i] = i
    huge.append(m)
    m = _claims_map(s)
    m[99] = b"\x00" * 3000
    huge.append(m)
    hc = []
    for m in huge:
        c = cose.sign1(cbor2.dumps(m), ed, ed_kid)
        hc += [_qg1(c), _qg1(c, compress=True)]
    hc.append(b"QG1:" + base45.b45encode(zlib.compress(b"\xd2" + b"\x00" * 1_000_000, 9)))
    hc.append(b"QG1:" + base45.b45encode(zlib.compress(b"\xd2" * 4097, 9)))
    hc.append(b"QG1:" + b"A" * 5000)
    pool["huge claims and bombs"] = hc
    pool["signature of another key"] = [
        _qg1(_sign1_raw({1: -8, 4: ed_kid}, good, other)),
        _qg1(_sign1_raw({1: -7, 4: es_kid}, good, other_es)),
        _qg1(cose.sign1(good, other, cose.kid_of(other.public_key()))),  # unknown kid
        _qg1(_sign1_raw({1: -8}, good, ed, {4: ed_kid})),  # kid unprotected, fine structure
        _qg1(_sign1_raw({1: -8, 4: ed_kid}, good, ed)[:-1] + b"\x00"),  # flipped signature
    ]
    pool["alg none / alg text"] = [
        _qg1(_sign1_raw(p, good, ed))
        for p in (
            {1: "none", 4: ed_kid}, {1: "EdDSA", 4: ed_kid}, {1: 0, 4: ed_kid},
            {1: -35, 4: es_kid}, {1: None, 4: ed_kid}, {4: ed_kid}, {1: -8.0, 4: ed_kid},
            {1: -8, 4: ed_kid, 2: [1]}, {1: -8, 4: "kid-as-text"}, {1: -8, 4: b""},
            {1: -8, 4: b"k" * 17}, b"\xa0", b"", b"\x80", b"\xff",
        )
    ] + [_qg1(_sign1_raw({1: -8, 4: ed_kid}, good, ed, {1: -7}))]  # fmt: skip
    pool["kid confusion"] = [
        _qg1(_sign1_raw({1: -7, 4: ed_kid}, good, es)),  # ES256 header, EdDSA kid
        _qg1(_sign1_raw({1: -7, 4: ed_kid}, good, ed)),
        _qg1(_sign1_raw({1: -8, 4: es_kid}, good, ed)),  # EdDSA header, ES256 kid
        _qg1(_sign1_raw({1: -8, 4: es_kid}, good, es)),
    ]
    nested: list[bytes] = []
    inner = cose.sign1(good, ed, ed_kid)
    nested.append(_qg1(cbor2.dumps(cbor2.CBORTag(18, cbor2.loads(inner)))))
    nested.append(_qg1(cbor2.dumps(cbor2.CBORTag(18, cbor2.CBORTag(18, [b"", {}, b"", b""])))))
    nested.append(_qg1(_sign1_raw({1: -8, 4: ed_kid}, good, ed, tag=98)))
    nested.append(_qg1(b"\xd2" + b"\x81" * 5000))
    nested.append(_qg1(b"\xd2" + b"\x81" * 1000 + b"\x00"))
    nested.append(_qg1(b"\xd2" + b"\xd2" * 3000))
    deep: Any = 0
    for _ in range(40):
        deep = [deep]
    for payload in (
        cbor2.dumps(cbor2.CBORTag(1, _claims_map(s))),
        cbor2.dumps({**_claims_map(s), 99: cbor2.CBORTag(24, b"\xa0")}),
        cbor2.dumps({**_claims_map(s), 99: deep}),
        cbor2.dumps({**_claims_map(s), 7: cbor2.CBORTag(2, b"\x01")}),
        b"\xbf\x01\x61a\xff",  # indefinite-length map
    ):
        nested.append(_qg1(cose.sign1(payload, ed, ed_kid)))
    nested.append(b"QGR1:" + base45.b45encode(cbor2.dumps(cbor2.CBORTag(55799, [1, 2, 3, 4]))))
    pool["nested tags and depth"] = nested
    digest_step = step_of(s.now_s, 1)
    rot: list[bytes] = []
    for env in (
        [s.rotating_cose, digest_step, None, b"\x00" * 64],
        [s.rotating_cose, -1, None, b"\x00" * 64],
        [s.rotating_cose, 2**64, None, b"\x00" * 64],
        [s.rotating_cose, "step", None, b"\x00" * 64],
        [s.rotating_cose, digest_step, "d" * 300, b"\x00" * 64],
        [s.rotating_cose, digest_step, 5, b"\x00" * 64],
        [s.rotating_cose, digest_step, None, b"\x00" * 63],
        [unwrap_pass(s.ed_pass), digest_step, None, b"\x00" * 64],  # not rotating
        ["cose", digest_step, None, b"\x00" * 64],
        [s.rotating_cose, digest_step, None],
        {"a": 1},
    ):
        rot.append(b"QGR1:" + base45.b45encode(cbor2.dumps(env)))
    rot.append(rotating_code(s.rotating_cose, s.holder, digest_step + 1000, None))  # stale
    rot.append(rotating_code(s.rotating_cose, other_holder(), digest_step, None))
    pool["rotating envelopes"] = rot
    digits = b"0123456789"
    cccd = []
    for _ in range(per):
        idn = bytes(rng.choice(digits) for _ in range(rng.randint(6, 15)))
        fields = [
            bytes(rng.choice(b"0123456789abcXYZ \xc3\xa0/-") for _ in range(rng.randint(0, 40)))
            for _ in range(rng.randint(0, 9))
        ]
        bom = b"\xef\xbb\xbf" if rng.random() < 0.1 else b""
        cccd.append(bom + idn + b"|" + b"|".join(fields))
    cccd.append(b"012345678901|" + b"|" * 3000)
    cccd.append(b"012345678901|" + b"x" * 4000)
    pool["CCCD-like (digits, bar, fields)"] = cccd
    return pool


BULK = frozenset(
    {
        "random bytes",
        "random after a pass prefix",
        "random base45 after a prefix",
        "truncated real passes",
        "CCCD-like (digits, bar, fields)",
    }
)
CRAFTED_WEIGHT = 8


def other_holder() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


@dataclass
class HostileResult:
    total: int
    seconds: float
    reasons: Counter[str]
    kinds: Counter[str]
    internal_errors: int
    escaped: int
    pool: int
    families: dict[str, int]
    why_top: list[tuple[str, int]]


def hostile_run(
    s: Setup, total: int = 1_000_000, progress: Callable[[int], None] | None = None
) -> HostileResult:
    """``total`` payloads through Policy.check: the pool in turn (the crafted families
    repeated CRAFTED_WEIGHT times), every other lap mutated (a byte replaced, a byte dropped,
    or cut short, at a position that moves each lap and entry)."""
    families = hostile_pool(s)
    # the crafted families (signed, structured) are few: weighted so that they and their
    # mutations are a fair share of the run, not lost among the random ones
    flat = [p for f, ps in families.items() for p in ps * (1 if f in BULK else CRAFTED_WEIGHT)]
    policy = s.policy
    errors0 = policy.internal_errors
    reasons: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    whys: Counter[str] = Counter()
    escaped = 0
    n = len(flat)
    wall = s.now_s * 1_000_000_000
    check = policy.check
    t0 = time.perf_counter()
    for i in range(total):
        p = flat[i % n]
        lap = i // n
        if lap % 2 and p:
            at = (lap * 7919 + i * 31) % len(p)
            op = lap % 6
            if op == 1:
                p = p[:at] + bytes(((p[at] + lap) & 0xFF,)) + p[at + 1 :]
            elif op == 3:
                p = p[:at] + p[at + 1 :]
            else:
                p = p[:at]
        try:
            kind, c = check(p, wall)
        except Exception:
            escaped += 1
            continue
        if not isinstance(c.reason, Reason):
            raise AssertionError(f"no reason for payload {i}: {c!r}")
        reasons[c.reason.value] += 1
        kinds[kind] += 1
        whys[c.why or "-"] += 1
        if progress is not None and i % 100_000 == 99_999:
            progress(i + 1)
    seconds = time.perf_counter() - t0
    return HostileResult(
        total,
        seconds,
        reasons,
        kinds,
        policy.internal_errors - errors0,
        escaped,
        n,
        {k: len(v) for k, v in families.items()},
        whys.most_common(8),
    )


def pid_cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
