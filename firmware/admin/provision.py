"""``qrgate provision``: the fleet's provisioning key and the signed provisioning codes.

An administrator makes one provisioning key per fleet (``provision keygen``); its public half
is installed with the firmware. For each reader to install, ``provision qr`` signs a code
(:mod:`provisioning.qr`: ``QGP1:`` + base45 of a COSE_Sign1) naming the site, door, broker,
fleet CA and a one-time enrollment token, and draws it (terminal, PNG or SVG). The reader in
provisioning mode reads it with its own camera and checks it (:func:`verify_code`)::

    qrgate provision keygen --out keys                      # keys/provisioning.key, .pub.pem
    qrgate provision qr --key keys/provisioning.key --fleet acme --site hq --door lobby \\
        --broker mqtts://mqtt.acme.example --ca fleet-ca/root.crt --expires 2h \\
        --token-out tokens/lobby.json --png lobby.png

Token file (``--token-out``; JSON, mode 0600), for the enrollment server::

    {"format": "qrgate-enroll-token-1",
     "token_id": "<16 hex>",            # also the code's cti
     "secret": "<16 hex>",              # the token secret; the server keeps only its hash:
     "secret_sha256": "<64 hex>",       # SHA-256 of the secret's 8 bytes
     "fleet", "site", "door", "direction", "broker",    # the scope the code was made for
     "ca_fingerprint": "<64 hex>", "kid": "<16 hex>",
     "iat": seconds, "exp": seconds}

This module is also where ``provisioning`` (which imports nothing from ``firmware``) meets the
project's COSE: :func:`signer` and :data:`OPENER` wrap :mod:`firmware.policy.cose`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Container, Iterable, Mapping
from pathlib import Path

import click
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from firmware.admin.common import fail
from firmware.admin.keys import parse_time, write_file
from firmware.admin.passes import draw_qr, make_qr, save_qr
from firmware.exceptions import KeyFileError, PassError
from firmware.policy import cose
from firmware.policy.cose import PrivateKey, PublicKey, kid_of
from firmware.policy.keys import (
    generate_key,
    load_private_key,
    read_regular,
    save_private_key,
    save_public_key,
)
from provisioning.qr import (
    CA_FINGERPRINT_BYTES,
    DEFAULT_LEEWAY_S,
    DIRECTIONS,
    MAX_V10_CHARS,
    ProvisioningClaims,
    Sign1Opener,
    issue_provisioning,
    new_claims,
    token_secret_hash,
    verify_provisioning,
)

__all__ = [
    "DEFAULT_FLEET",
    "OPENER",
    "TOKEN_FORMAT",
    "ca_fingerprint_of",
    "key_ring",
    "keygen",
    "parse_expiry",
    "parse_fingerprint",
    "provision",
    "qr_version",
    "signer",
    "token_json",
    "verify_code",
]

DEFAULT_FLEET = "default"
TOKEN_FORMAT = "qrgate-enroll-token-1"
MAX_CERT_BYTES = 64 * 1024
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", re.ASCII)
_DURATION = re.compile(r"[0-9]{1,9}[smhdw]", re.ASCII)


# --- wiring provisioning.qr to firmware.policy.cose --------------------------------------------


def signer(key: PrivateKey, kid: bytes | None = None) -> Callable[[bytes], bytes]:
    """``sign(payload) -> COSE_Sign1`` with ``key`` under ``kid`` (default: the key's
    :func:`~firmware.policy.cose.kid_of`), for :func:`provisioning.qr.issue_provisioning`."""
    key_id = kid if kid is not None else kid_of(key.public_key())

    def sign(payload: bytes) -> bytes:
        return cose.sign1(payload, key, key_id)

    return sign


def _parse(data: bytes) -> cose.Sign1:
    try:
        return cose.parse_sign1(data)
    except PassError as e:
        raise ValueError(e.why) from None


def _verify(parsed: cose.Sign1, key: PublicKey) -> bool:
    try:
        cose.verify(parsed, key, cose.alg_of(key))
    except PassError:
        return False
    return True


OPENER: Sign1Opener[cose.Sign1, PublicKey] = Sign1Opener(parse=_parse, verify=_verify)
"""COSE_Sign1 reading for :func:`provisioning.qr.verify_provisioning`: strict, capped parsing
(:func:`firmware.policy.cose.parse_sign1`) and EdDSA/ES256 verification."""


def key_ring(keys: Iterable[PublicKey]) -> dict[bytes, PublicKey]:
    """``{kid: key}`` of provisioning public keys (kid: :func:`~firmware.policy.cose.kid_of`)."""
    return {kid_of(k): k for k in keys}


def verify_code(
    text: str | bytes,
    *,
    public_keys: Mapping[bytes, PublicKey],
    fleet: str,
    now: int | None,
    seen: Container[bytes] = (),
    clock_floor: int | None = None,
    leeway_s: int = DEFAULT_LEEWAY_S,
    allow_plain_mqtt: bool = False,
) -> ProvisioningClaims:
    """:func:`provisioning.qr.verify_provisioning` with this project's COSE (:data:`OPENER`).
    Raises ProvisioningCodeError only."""
    return verify_provisioning(
        text,
        opener=OPENER,
        public_keys=public_keys,
        fleet=fleet,
        now=now,
        seen=seen,
        clock_floor=clock_floor,
        leeway_s=leeway_s,
        allow_plain_mqtt=allow_plain_mqtt,
    )


# --- inputs -------------------------------------------------------------------------------------


def parse_fingerprint(text: str) -> bytes:
    """32 bytes from a SHA-256 fingerprint in hex, with or without ':' separators (as
    ``openssl x509 -fingerprint -sha256`` prints it). Raises ValueError."""
    digits = text.strip().replace(":", "")
    if not re.fullmatch(r"[0-9A-Fa-f]{64}", digits):
        raise ValueError(f"{text!r:.80}: a SHA-256 fingerprint is 64 hex digits")
    return bytes.fromhex(digits)


def ca_fingerprint_of(path: Path) -> bytes:
    """SHA-256 of the DER of the certificate in ``path`` (PEM or DER): the fleet's root or
    issuing CA. Raises KeyFileError (unreadable) or ValueError (not a certificate)."""
    data, _ = read_regular(Path(path), MAX_CERT_BYTES)
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            cert = x509.load_pem_x509_certificate(data)
        else:
            cert = x509.load_der_x509_certificate(data)
    except ValueError:
        raise ValueError(f"{path}: not a PEM or DER X.509 certificate") from None
    digest = cert.fingerprint(hashes.SHA256())
    assert len(digest) == CA_FINGERPRINT_BYTES
    return digest


def parse_expiry(text: str, now_s: int) -> int:
    """When a code expires, seconds since the epoch: a duration from now ("2h", "30m",
    "1d", "+2h"; units s m h d w), an RFC 3339 time with an offset, or seconds since the
    epoch. Raises ValueError (message fit for the user), also for a time not after now."""
    t = text.strip()
    exp = parse_time(f"+{t}" if _DURATION.fullmatch(t) else t, now_s)
    if exp <= now_s:
        raise ValueError(f"--expires {text!r:.60} is not in the future")
    return exp


def qr_version(text: str) -> int:
    """The version (1-40) of the symbol :func:`firmware.admin.passes.make_qr` makes for
    ``text``: alphanumeric mode, error correction M."""
    version: int = make_qr(text.encode("ascii")).version
    return version


def token_json(claims: ProvisioningClaims, kid: bytes) -> dict[str, object]:
    """The token file document for ``claims`` signed under ``kid`` (module docstring)."""
    return {
        "format": TOKEN_FORMAT,
        "token_id": claims.token_id.hex(),
        "secret": claims.token_secret.hex(),
        "secret_sha256": token_secret_hash(claims.token_secret).hex(),
        "fleet": claims.fleet,
        "site": claims.site,
        "door": claims.door,
        "direction": claims.direction,
        "broker": claims.broker,
        "ca_fingerprint": claims.ca_fingerprint.hex(),
        "kid": kid.hex(),
        "iat": claims.iat,
        "exp": claims.exp,
    }


# --- the commands -------------------------------------------------------------------------------


@click.group("provision")
def provision() -> None:
    """The fleet's provisioning key and signed provisioning codes for new readers."""


@provision.command("keygen")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Folder for the key files (created 0700 if missing).",
)
@click.option("--name", default="provisioning", show_default=True, help="NAME.key, NAME.pub.pem.")
def keygen(out_dir: Path, name: str) -> None:
    """Make the fleet's provisioning key: NAME.key (Ed25519, private, 0600) and NAME.pub.pem
    (to install with the firmware). Prints the key id; never overwrites."""
    if not _NAME.fullmatch(name):
        raise click.BadParameter(
            "use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param_hint="--name",
        )
    private_path, public_path = out_dir / f"{name}.key", out_dir / f"{name}.pub.pem"
    key = generate_key("EdDSA")
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        save_private_key(private_path, key)
        try:
            save_public_key(public_path, key, overwrite=False)
        except BaseException:
            # half a key pair is worse than none: the next try would refuse to overwrite it
            private_path.unlink(missing_ok=True)
            raise
    except OSError as e:
        fail(KeyFileError(f"{out_dir}: cannot create the folder: {e.strerror or e}"))
        return
    except KeyFileError as e:
        fail(e)
        return
    click.echo(f"wrote {private_path} (private, 0600), {public_path}", err=True)
    click.echo(kid_of(key.public_key()).hex())


@provision.command("qr")
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The provisioning private key (from `provision keygen`).",
)
@click.option("--fleet", default=DEFAULT_FLEET, show_default=True, help="Fleet id.")
@click.option("--site", required=True, help="Site name (the reader's MQTT topic level).")
@click.option("--door", required=True, help="Door name.")
@click.option("--direction", type=click.Choice(DIRECTIONS), default="in", show_default=True)
@click.option("--broker", required=True, help="mqtts://host[:port] (port 8883 by default).")
@click.option("--allow-plain-mqtt", is_flag=True, help="Allow mqtt:// (no TLS): labs only.")
@click.option("--ca-fingerprint", help="SHA-256 of the fleet CA certificate (64 hex digits).")
@click.option(
    "--ca",
    "ca_path",
    type=click.Path(path_type=Path, dir_okay=False),
    help="The fleet CA certificate (PEM or DER) to take the fingerprint of.",
)
@click.option("--expires", required=True, metavar="TIME", help="2h, 30m, 1d, or an RFC 3339 time.")
@click.option(
    "--token-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Write the enrollment token here (JSON, 0600) for the enrollment server.",
)
@click.option("--png", type=click.Path(path_type=Path, dir_okay=False), help="Write a PNG.")
@click.option("--svg", type=click.Path(path_type=Path, dir_okay=False), help="Write an SVG.")
def qr(  # noqa: PLR0917 - click passes options positionally
    key_path: Path,
    fleet: str,
    site: str,
    door: str,
    direction: str,
    broker: str,
    allow_plain_mqtt: bool,
    ca_fingerprint: str | None,
    ca_path: Path | None,
    expires: str,
    token_out: Path | None,
    png: Path | None,
    svg: Path | None,
) -> None:
    """Sign a provisioning code and show it: --png/--svg, else drawn in the terminal. The
    code text goes to standard output, its size to standard error.

    Anyone holding the code can enroll one reader into the fleet until it expires or is
    used: keep --expires short and the token file private."""
    if (ca_fingerprint is None) == (ca_path is None):
        raise click.UsageError("give exactly one of --ca-fingerprint and --ca")
    if png is not None and svg is not None:
        raise click.UsageError("give at most one of --png and --svg")
    now = int(time.time())
    try:
        exp = parse_expiry(expires, now)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--expires") from None
    try:
        if ca_path is not None:
            fingerprint = ca_fingerprint_of(ca_path)
        else:
            assert ca_fingerprint is not None  # exactly one of the two, checked above
            fingerprint = parse_fingerprint(ca_fingerprint)
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    except KeyFileError as e:
        fail(e)
        return
    try:
        key = load_private_key(key_path)
    except KeyFileError as e:
        fail(e)
        return
    try:
        claims = new_claims(
            fleet,
            site,
            door,
            direction,
            broker,
            fingerprint,
            now,
            exp,
            allow_plain_mqtt=allow_plain_mqtt,
        )
        kid = kid_of(key.public_key())
        text = issue_provisioning(claims, signer(key, kid))
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    try:
        # the token record first: a code whose token the server never learns is useless
        if token_out is not None:
            doc = json.dumps(token_json(claims, kid), indent=1) + "\n"
            write_file(token_out, doc.encode("utf-8"), 0o600, overwrite=False)
        if png is not None:
            save_qr(text.encode("ascii"), png, "png")
        if svg is not None:
            save_qr(text.encode("ascii"), svg, "svg")
    except KeyFileError as e:
        fail(e)
        return
    except OSError as e:
        fail(KeyFileError(f"cannot write the image: {e.strerror or e}"))
        return
    version = qr_version(text)
    note = "" if len(text) <= MAX_V10_CHARS else " (larger than version 10: shorten the names)"
    click.echo(
        f"token {claims.token_id.hex()}, expires {exp - now} s from now; "
        f"{len(text)} characters, QR version {version}{note}",
        err=True,
    )
    click.echo(text)
    if png is None and svg is None:
        draw_qr(text.encode("ascii"), sys.stdout)
