"""``qrgate keys``: issuer key pairs for signed passes, and the trust list readers verify with.

``keys new`` writes three files for one issuer key, NAME.key (PKCS#8 PEM, mode 0600),
NAME.pub.pem (SubjectPublicKeyInfo PEM) and NAME.trust.json (a trust list document holding
this one key, :mod:`firmware.policy.trust`), and prints the key id.

``keys trust`` merges public keys (PEM files or trust list documents) into one trust list,
the file a reader's ``[policy] trust`` names. Rotating an issuer key::

    qrgate keys new --out keys --name acme-2026 --iss acme
    qrgate keys trust keys/acme-2026.pub.pem --out trust.json           # add the new key
    qrgate keys trust keys/acme-2025.pub.pem --not-after now --out trust.json   # retire the old
    qrgate keys trust --remove <old kid> --out trust.json    # once its last pass has expired

A retired key (not_after in the past) signs no new passes, while the passes it issued before
live to their own ``exp``: a reader checks a pass's ``iat`` against the key's window.

The logic is in plain functions (:func:`new_key`, :func:`merge_trust`, :func:`parse_time`);
the click commands only parse options and print.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import click

from firmware.admin.common import fail, time_option
from firmware.exceptions import CredentialListError, KeyFileError
from firmware.policy.cose import ALG_IDS
from firmware.policy.keys import (
    generate_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from firmware.policy.keys import write_file_atomic as write_file
from firmware.policy.trust import (
    MAX_ISS_CHARS,
    IssuerKey,
    TrustList,
    load_trust,
    rfc3339_to_seconds,
    trust_entry,
)

__all__ = [
    "NewKey",
    "keys",
    "merge_trust",
    "new_key",
    "parse_time",
    "read_trust_inputs",
    "write_file",
    "write_trust",
]

MAX_SECONDS = 253_402_300_799  # 9999-12-31T23:59:59Z: the last time RFC 3339 can write
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_RELATIVE = re.compile(r"([+-])([0-9]{1,9})([smhdw])", re.ASCII)
_T = TypeVar("_T")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_time(text: str, now_s: int) -> int:
    """A time given on the command line, as seconds since the epoch.

    Accepted: an RFC 3339 date-time with an offset ("2026-03-01T08:00:00+07:00", "…Z"),
    whole seconds since the epoch ("1790000000"), "now" (``now_s``), or an offset from
    ``now_s``: a sign, a number and a unit s, m, h, d or w ("+30d", "+8h", "+15m", "-1h").
    Raises ValueError (message fit for the user) for anything else or outside 1970-9999."""
    t = text.strip()
    if t == "now":
        seconds = now_s
    elif (m := _RELATIVE.fullmatch(t)) is not None:
        sign, n, unit = m.groups()
        delta = int(n) * _UNIT_S[unit]
        seconds = now_s + delta if sign == "+" else now_s - delta
    elif t.isascii() and t.isdigit() and len(t) <= 16:
        seconds = int(t)
    else:
        try:
            seconds = rfc3339_to_seconds(t)
        except (ValueError, OverflowError):
            raise ValueError(
                f"{text!r:.60} is not a time: give RFC 3339 (2026-03-01T08:00:00Z), seconds "
                "since the epoch, 'now', or an offset such as +30d, +8h, +15m, -1h"
            ) from None
    if not 0 <= seconds <= MAX_SECONDS:
        raise ValueError(f"{text!r:.60} is outside the years 1970-9999")
    return seconds


def _trust_json(trust: TrustList) -> bytes:
    return (json.dumps(trust.to_json(), indent=1) + "\n").encode("utf-8")


def write_trust(path: Path, trust: TrustList, *, overwrite: bool = True) -> None:
    """Write ``trust`` as a trust list document (mode 0644), atomically. Raises
    KeyFileError."""
    write_file(path, _trust_json(trust), 0o644, overwrite=overwrite)


@dataclass(frozen=True, slots=True)
class NewKey:
    """What :func:`new_key` wrote. ``kid``: the key id in hex (16 digits), as in the trust
    list. ``alg``: "EdDSA" or "ES256"."""

    kid: str
    alg: str
    private_path: Path
    public_path: Path
    trust_path: Path


def _check_window(not_before: int | None, not_after: int | None) -> None:
    if not_before is not None and not_after is not None and not_before > not_after:
        raise ValueError("not_before is after not_after")


def _check_iss(iss: str | None) -> None:
    if iss is not None and not 0 < len(iss) <= MAX_ISS_CHARS:
        raise ValueError(f"the issuer name must be 1-{MAX_ISS_CHARS} characters")


def new_key(
    out_dir: Path,
    name: str,
    alg: str = "EdDSA",
    *,
    iss: str | None = None,
    not_before: int | None = None,
    not_after: int | None = None,
) -> NewKey:
    """Make an issuer key pair and write ``out_dir``/NAME.key (0600), NAME.pub.pem and
    NAME.trust.json (this key alone, with ``iss`` and the validity window, seconds since the
    epoch, when given). ``out_dir`` is created (0700) if missing.

    Writes nothing when any of the three files exists. Raises ValueError (a bad name, alg,
    issuer or window) and KeyFileError (a file exists, or cannot be written; files this
    call wrote are removed again)."""
    if not _NAME.fullmatch(name):
        raise ValueError(
            f"key name {name!r:.70}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if alg not in ALG_IDS:
        raise ValueError(f"unknown algorithm {alg!r:.20}: expected EdDSA or ES256")
    _check_iss(iss)
    _check_window(not_before, not_after)
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise KeyFileError(f"{out_dir}: cannot create the folder: {e.strerror or e}") from None
    paths = NewKey(
        kid="",
        alg=alg,
        private_path=out_dir / f"{name}.key",
        public_path=out_dir / f"{name}.pub.pem",
        trust_path=out_dir / f"{name}.trust.json",
    )
    for p in (paths.private_path, paths.public_path, paths.trust_path):
        if os.path.lexists(p):
            raise KeyFileError(f"{p}: already exists; not overwriting a key (choose another name)")
    key = generate_key(alg)
    trust = TrustList.from_json(
        {"keys": [trust_entry(key.public_key(), iss, not_before, not_after)]}
    )
    written: list[Path] = []
    try:
        save_private_key(paths.private_path, key)
        written.append(paths.private_path)
        save_public_key(paths.public_path, key, overwrite=False)
        written.append(paths.public_path)
        write_trust(paths.trust_path, trust, overwrite=False)
    except BaseException:
        # half a key set is worse than none: the next try would refuse to overwrite it
        for p in written:
            p.unlink(missing_ok=True)
        raise
    (issuer_key,) = trust.values()
    return replace(paths, kid=issuer_key.kid.hex())


def read_trust_inputs(path: Path) -> list[IssuerKey]:
    """The keys in ``path``: a SubjectPublicKeyInfo PEM file (one key, no iss or window) or
    a trust list document (its entries as they are). Raises KeyFileError or
    CredentialListError naming the file."""
    try:
        with Path(path).open("rb") as f:
            head = f.read(64)
    except OSError as e:
        raise KeyFileError(f"{path}: cannot read: {e.strerror or e}") from None
    if head.lstrip().startswith(b"-----BEGIN"):
        return [IssuerKey.of(load_public_key(path))]
    return list(load_trust(path).values())


def _pick(given: _T | None, own: _T | None, kept: _T | None) -> _T | None:
    return given if given is not None else own if own is not None else kept


def merge_trust(
    existing: TrustList,
    inputs: Sequence[IssuerKey],
    *,
    iss: str | None = None,
    not_before: int | None = None,
    not_after: int | None = None,
    remove: Sequence[bytes] = (),
) -> tuple[TrustList, list[tuple[str, str]]]:
    """``existing`` with ``inputs`` merged in and the kids in ``remove`` taken out.

    A key already in the list keeps its place and is updated. Each of ``iss``,
    ``not_before``, ``not_after`` (seconds since the epoch), when given, is set on every
    input key; when not given, an input's own value is kept, else the existing entry's.
    Returns (the new list, [(kid hex, "added" | "updated" | "unchanged" | "removed")]).
    Raises ValueError for a kid in ``remove`` that is not in the list (nor an input), or a
    window whose start is after its end."""
    _check_iss(iss)
    keys: dict[bytes, IssuerKey] = {k.kid: k for k in existing.values()}
    changes: dict[bytes, str] = {}
    for k in inputs:
        old = keys.get(k.kid)
        new = replace(
            k,
            iss=_pick(iss, k.iss, old.iss if old else None),
            not_before=_pick(not_before, k.not_before, old.not_before if old else None),
            not_after=_pick(not_after, k.not_after, old.not_after if old else None),
        )
        _check_window(new.not_before, new.not_after)
        if old is None:
            changes[k.kid] = "added"
        elif changes.get(k.kid) != "added":
            changes[k.kid] = "unchanged" if new == old else "updated"
        keys[k.kid] = new
    for kid in remove:
        if kid not in keys:
            raise ValueError(f"key {kid.hex()} is not in the trust list")
        del keys[kid]
        changes[kid] = "removed"
    return TrustList(keys.values()), [(kid.hex(), what) for kid, what in changes.items()]


# --- the commands -----------------------------------------------------------------------------


@click.group("keys")
def keys() -> None:
    """Issuer keys for signed passes, and the trust list a reader verifies them with."""


@keys.command("new")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the key files (created 0700 if missing).",
)
@click.option("--name", required=True, help="Base name: NAME.key, NAME.pub.pem, NAME.trust.json.")
@click.option("--alg", type=click.Choice(sorted(ALG_IDS)), default="EdDSA", show_default=True)
@click.option("--iss", help="Issuer name the key's passes must carry (in the trust entry).")
@click.option("--not-before", metavar="TIME", help="Passes issued before TIME are refused.")
@click.option("--not-after", metavar="TIME", help="Passes issued after TIME are refused.")
def keys_new(  # noqa: PLR0917 - click passes options positionally
    out_dir: Path,
    name: str,
    alg: str,
    iss: str | None,
    not_before: str | None,
    not_after: str | None,
) -> None:
    """Make an issuer key pair: NAME.key (private, 0600), NAME.pub.pem and NAME.trust.json
    (a trust list with this key, to merge into a reader's with `qrgate keys trust`).

    Prints the key id (kid); never overwrites. TIME: RFC 3339, seconds since the epoch,
    'now' or an offset such as +30d."""
    now = int(time.time())
    nbf = time_option(not_before, "--not-before", now)
    naf = time_option(not_after, "--not-after", now)
    try:
        made = new_key(out_dir, name, alg, iss=iss, not_before=nbf, not_after=naf)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except KeyFileError as e:
        fail(e)
        return
    click.echo(
        f"wrote {made.private_path} (private, 0600), {made.public_path}, {made.trust_path}",
        err=True,
    )
    click.echo(made.kid)


@keys.command("trust")
@click.argument("files", nargs=-1, type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The trust list to write; an existing one is merged into.",
)
@click.option("--iss", help="Issuer name to set on the keys in FILES.")
@click.option("--not-before", metavar="TIME", help="Set on the keys in FILES.")
@click.option("--not-after", metavar="TIME", help="Set on the keys in FILES (retires a key).")
@click.option("--remove", "remove", multiple=True, metavar="KID", help="Take this key out.")
def keys_trust(  # noqa: PLR0917 - click passes options positionally
    files: tuple[Path, ...],
    out: Path,
    iss: str | None,
    not_before: str | None,
    not_after: str | None,
    remove: tuple[str, ...],
) -> None:
    """Merge public keys (FILE.pub.pem or trust list documents) into the trust list --out.

    Keys already in it are updated in place: add a new issuer key, later set --not-after on
    the old one, and --remove it once its last pass has expired."""
    if not files and not remove:
        raise click.UsageError("give public key files to add, or --remove KID")
    now = int(time.time())
    nbf = time_option(not_before, "--not-before", now)
    naf = time_option(not_after, "--not-after", now)
    kids: list[bytes] = []
    for r in remove:
        if not re.fullmatch(r"[0-9a-fA-F]{16}", r):
            raise click.BadParameter(f"{r!r:.40}: a kid is 16 hex digits", param_hint="--remove")
        kids.append(bytes.fromhex(r))
    try:
        existing = load_trust(out) if out.exists() else TrustList.empty()
        inputs = [k for f in files for k in read_trust_inputs(f)]
        merged, changes = merge_trust(
            existing, inputs, iss=iss, not_before=nbf, not_after=naf, remove=kids
        )
        write_trust(out, merged)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except (KeyFileError, CredentialListError) as e:
        fail(e)
        return
    for kid, what in changes:
        click.echo(f"{what} {kid}")
    click.echo(f"wrote {out}: {len(merged)} issuer keys", err=True)
