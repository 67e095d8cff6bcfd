"""``qrgate credentials``: build, inspect and publish signed credential snapshots.

A snapshot (:mod:`firmware.policy.snapshot`) is one signed, versioned file holding everything
readers decide with: the trust list, the badge lists, the denylist and the schedules. Readers
take it from MQTT (:mod:`firmware.uplink.credentials`) and apply it whole or not at all.

Register the group on the main command with ``main.add_command(credentials)``. This module
does not import :mod:`firmware.cli` (which imports it), so its broker options are its own;
they take the same names and values as the back office's (``qrgate ingest``).
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

import click

from firmware.backoffice.options import broker_options, mqtt_settings
from firmware.exceptions import CredentialListError, KeyFileError, SnapshotError
from firmware.policy import cose
from firmware.policy.credentials import CredentialSet, read_json_file
from firmware.policy.keys import load_private_key, load_public_key
from firmware.policy.snapshot import (
    MAX_VERSION,
    Snapshot,
    apply_delta,
    build_set,
    make_delta,
    read_snapshot,
    sign_snapshot,
    snapshot_document,
)
from firmware.policy.trust import seconds_to_rfc3339
from firmware.uplink.credentials import FetchOptions, fetch_snapshot, parse_pointer
from firmware.uplink.topics import Topics

PUBLISH_TIMEOUT_S = 30.0
BIG_MESSAGE_BYTES = 1024 * 1024
"""Above this, ``publish`` suggests ``--url``: many brokers cap message sizes."""


def _fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"qrgate credentials: {message}", err=True)
    sys.exit(code)


def _write_file(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` whole (temp file, fsync, rename), mode 0644."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        _fail(f"cannot read {path}: {e.strerror or e}")


def _public_key(path: Path) -> cose.PublicKey:
    """The public key in ``path``, or the public half of the private key there."""
    try:
        return load_public_key(path)
    except KeyFileError as first:
        try:
            return load_private_key(path).public_key()
        except KeyFileError:
            _fail(str(first))


def _when(seconds: int) -> str:
    try:
        return seconds_to_rfc3339(seconds)
    except (ValueError, OverflowError):
        return f"{seconds} s since the epoch"


@click.group("credentials")
def credentials() -> None:
    """Signed credential snapshots: what readers decide with, as one versioned file.

    A snapshot holds the issuer keys readers trust (trust list), the badge allowlist and
    denylist, the revoked passes and holders (denylist) and the access schedules, signed with
    your snapshot signing key. A reader whose [policy] snapshot_key is the matching public
    key applies it whole; one that is badly signed, older than what the reader has, or broken
    is refused, the reader keeps what it has, and says why in its MQTT status. A snapshot
    replaces the reader's local credential files while it is in force.

    The signing key is made once, apart from the issuer keys that sign passes:
    `qrgate keys new --out keys --name snapshot` writes keys/snapshot.key (keep it off the
    readers) and keys/snapshot.pub.pem, which goes into every reader's [policy]
    snapshot_key (the snapshot.trust.json it also writes is not needed here).

    \b
    A round:
      qrgate credentials build --key keys/snapshot.key --version 8 --site hq \\
          --trust trust.json --badges badges.json --denylist denylist.json \\
          --schedules schedules.json --out snapshot-8.cose
      qrgate credentials show snapshot-8.cose --key keys/snapshot.pub.pem
      qrgate credentials publish snapshot-8.cose --broker mqtts://broker.example.org \\
          --site hq --site-wide

    Every new snapshot needs a higher --version than the one before. Keep the files you
    published: a delta (--delta-from) is built against the previous one.
    """


@credentials.command("build")
@click.option(
    "--key",
    "key_path",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Snapshot signing key: a PEM private key (Ed25519 or P-256, mode 0600).",
)
@click.option(
    "--version",
    "version",
    required=True,
    type=click.IntRange(1, MAX_VERSION),
    help="This snapshot's version: higher than any snapshot published before.",
)
@click.option(
    "--trust",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help='Trust list JSON {"keys": [...]}: the issuer keys whose passes readers accept.',
)
@click.option(
    "--badges",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help='Badge list JSON {"allow": [...], "deny": [...]} (keyed HMACs, as qrgate badge add).',
)
@click.option(
    "--denylist",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help='Revocations JSON {"cti": ["<pass id hex>"], "sub": [["<iss>", "<sub>"]]}.',
)
@click.option(
    "--schedules",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Schedules JSON {timezone, holidays, groups}.",
)
@click.option(
    "--site",
    default="",
    help="Site name: readers of other sites refuse the snapshot [default: any site].",
)
@click.option(
    "--issued-at",
    type=click.IntRange(0, MAX_VERSION),
    help="Issue time, seconds since the epoch [default: now].",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the signed snapshot.",
)
@click.option(
    "--delta-from",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Also build a delta from this earlier snapshot (one signed with the same key) to "
    "this one: readers holding it need only the changes.",
)
@click.option(
    "--delta-out",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Where to write the delta (with --delta-from).",
)
def build(
    *,
    key_path: Path,
    version: int,
    trust: Path | None,
    badges: Path | None,
    denylist: Path | None,
    schedules: Path | None,
    site: str,
    issued_at: int | None,
    out: Path,
    delta_from: Path | None,
    delta_out: Path | None,
) -> None:
    """Build and sign a snapshot from credential files, checked as a reader will check it.

    A part not given is empty in the snapshot (it replaces what readers have; it is not laid
    over it). With --delta-from OLD and --delta-out FILE, also write a delta that turns OLD
    into this snapshot: publish the delta to readers that hold OLD, and keep the full
    snapshot (--out) for readers that do not and as the base of the next delta.
    """
    if (delta_from is None) != (delta_out is None):
        raise click.UsageError("--delta-from and --delta-out go together")
    try:
        key = load_private_key(key_path)
        parts = {
            name: read_json_file(path, what) if path is not None else None
            for name, path, what in (
                ("trust", trust, "trust list"),
                ("badges", badges, "badge list"),
                ("deny", denylist, "denylist"),
                ("schedules", schedules, "schedules"),
            )
        }
    except (KeyFileError, CredentialListError) as e:
        _fail(str(e))
    when = int(time.time()) if issued_at is None else issued_at
    doc = snapshot_document(version=version, issued_at=when, site=site, **parts)
    public = key.public_key()
    try:
        data = sign_snapshot(doc, key)
        snap = read_snapshot(data, public)
        new_set = build_set(snap)
    except (SnapshotError, ValueError) as e:
        _fail(f"not built: {e}")
    _write_file(out, data)
    click.echo(
        f"wrote {out}: snapshot version {version}"
        + (f" for site {site!r}" if site else " for any site")
        + f", {len(data):,} bytes, signed by key {cose.kid_of(public).hex()}"
    )
    _echo_counts(new_set)
    if delta_from is not None and delta_out is not None:
        _build_delta(delta_from, delta_out, snap, new_set, key)


def _build_delta(
    old_path: Path, out: Path, new: Snapshot, new_set: CredentialSet, key: cose.PrivateKey
) -> None:
    try:
        old = read_snapshot(_read_file(old_path), key.public_key())
    except SnapshotError as e:
        _fail(f"{old_path}: {e} (a delta needs a snapshot readers took from this key)")
    if old.is_delta:
        _fail(f"{old_path} is a delta; build the delta from the full snapshot of that version")
    try:
        old_set = build_set(old)
        doc = make_delta(
            old.doc, new.doc, version=new.version, issued_at=new.issued_at, site=new.site
        )
        data = sign_snapshot(doc, key)
        delta = read_snapshot(data, key.public_key())
        result = apply_delta(old_set, delta)
    except (SnapshotError, CredentialListError, ValueError) as e:
        _fail(f"delta not built: {e}")
    if _fingerprint(result) != _fingerprint(new_set):
        _fail("delta not built: it would not reproduce the snapshot (please report this)", 3)
    _write_file(out, data)
    click.echo(
        f"wrote {out}: delta from version {old.version} to {new.version}, {len(data):,} bytes"
    )


def _fingerprint(s: CredentialSet) -> tuple[Any, ...]:
    """What must agree between a snapshot and base + delta."""
    summary = s.summary()
    summary.pop("source")
    return (
        summary,
        s.badges.allow,
        s.badges.deny,
        s.badges.labels,
        s.denylist.fingerprints(),
        s.trust,
        s.schedules,
    )


def _echo_counts(s: CredentialSet) -> None:
    rows = (
        ("issuer keys", len(s.trust)),
        ("badges allowed", len(s.badges.allow)),
        ("badges denied", len(s.badges.deny)),
        ("revoked passes", s.deny_cti),
        ("revoked holders", s.deny_sub),
        ("schedule groups", len(s.schedules.groups)),
    )
    for name, n in rows:
        click.echo(f"  {name:<16} {n:>10,}")


def _delta_counts(snap: Snapshot) -> dict[str, Any]:
    def count(part: str, kind: str, key: str) -> int:
        section = snap.doc.get(part, {}).get(kind, {})
        values = section.get(key, []) if isinstance(section, dict) else []
        return len(values) if isinstance(values, list) else 0

    return {
        "revoked_passes_added": count("add", "deny", "cti"),
        "revoked_passes_removed": count("remove", "deny", "cti"),
        "revoked_holders_added": count("add", "deny", "sub"),
        "revoked_holders_removed": count("remove", "deny", "sub"),
        "badges_allowed_added": count("add", "badges", "allow"),
        "badges_allowed_removed": count("remove", "badges", "allow"),
        "badges_denied_added": count("add", "badges", "deny"),
        "badges_denied_removed": count("remove", "badges", "deny"),
        "trust_replaced": "trust" in snap.doc,
        "schedules_replaced": "schedules" in snap.doc,
    }


@credentials.command("show")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Check the signature with this key: the snapshot public key (PEM), as in the "
    "readers' [policy] snapshot_key (or the private key it belongs to).",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object instead of text.")
def show(*, file: Path, key_path: Path | None, as_json: bool) -> None:
    """Show what a snapshot or delta FILE holds and whether its signature is good.

    Exit status: 0 when the file is well formed (and, with --key, signed by that key); 1 when
    the signature does not match --key; 2 when FILE is not a usable snapshot.
    """
    data = _read_file(file)
    public = _public_key(key_path) if key_path is not None else None
    signature = "not checked (give --key)"
    code = 0
    try:
        snap = read_snapshot(data, None)
        if public is not None:
            try:
                read_snapshot(data, public)
                signature = f"valid for key {cose.kid_of(public).hex()}"
            except SnapshotError as e:
                signature, code = f"INVALID: {e}", 1
        if snap.is_delta:
            assert snap.base is not None
            apply_delta(CredentialSet(version=snap.base), snap)  # checks every part
            counts = _delta_counts(snap)
        else:
            counts = {k: v for k, v in build_set(snap).summary().items() if k not in _META}
    except SnapshotError as e:
        _fail(f"{file}: {e}")
    info: dict[str, Any] = {
        "file": str(file),
        "kind": "delta" if snap.is_delta else "snapshot",
        "version": snap.version,
        "base": snap.base,
        "site": snap.site or None,
        "issued_at": snap.issued_at,
        "kid": snap.kid.hex(),
        "bytes": len(data),
        "signature": signature,
        "counts": counts,
    }
    if as_json:
        click.echo(json.dumps(info, indent=1))
    else:
        what = f"delta from version {snap.base} to" if snap.is_delta else "snapshot"
        click.echo(
            f"{file}: {what} version {snap.version}, "
            + (f"site {snap.site!r}" if snap.site else "any site")
            + f", issued {_when(snap.issued_at)}, {len(data):,} bytes"
        )
        click.echo(f"signed by key {snap.kid.hex()}: signature {signature}")
        for name, n in counts.items():
            shown = ("yes" if n else "no") if isinstance(n, bool) else f"{n:>10,}"
            click.echo(f"  {name.replace('_', ' '):<24} {shown}")
    sys.exit(code)


_META = ("version", "source", "issued_at")


@credentials.command("publish")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@broker_options
@click.option("--site", required=True, help="The readers' site ([uplink] site).")
@click.option("--device", help="Publish to this one reader (its device id).")
@click.option("--site-wide", is_flag=True, help="Publish to every reader of the site.")
@click.option(
    "--url",
    help="Publish a pointer instead of the file: readers download FILE from this http(s) "
    "URL (put it there first). For snapshots too large for the broker.",
)
@click.option(
    "--no-check-url",
    is_flag=True,
    help="Do not download --url first to check that it serves FILE.",
)
@click.option(
    "--key",
    "key_path",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    help="Check FILE's signature with this public key before publishing (recommended).",
)
@click.option(
    "--timeout",
    default=PUBLISH_TIMEOUT_S,
    show_default=True,
    type=click.FloatRange(1, 3600),
    help="Seconds to wait for the broker.",
)
def publish(file: Path, **opts: Any) -> None:
    """Publish snapshot (or delta) FILE to readers, retained, so readers that are offline
    get it when they connect.

    --site-wide reaches every reader of --site (qrgate/v1/SITE/_site/credentials/snapshot);
    --device one reader (qrgate/v1/SITE/DEVICE/credentials/snapshot). A reader takes the
    higher version of the two. Readers report the outcome in their status ("credentials"):
    see `qrgate fleet status`.
    """
    device, site_wide, url = opts["device"], opts["site_wide"], opts["url"]
    if (device is None) == (not site_wide):
        raise click.UsageError("give exactly one of --device DEVICE and --site-wide")
    if device is not None and device.startswith("_"):
        raise click.BadParameter("device ids never start with '_'", param_hint="--device")
    try:
        topics = Topics(opts["site"], device or "any")
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    topic = topics.site_credentials_snapshot if site_wide else topics.credentials_snapshot
    data = _read_file(file)
    try:
        snap = read_snapshot(data, None)
        if opts["key_path"] is not None:
            read_snapshot(data, _public_key(opts["key_path"]))
    except SnapshotError as e:
        _fail(f"{file}: {e}")
    payload = data
    if url is not None:
        payload = json.dumps(
            {
                "version": snap.version,
                "url": url,
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
            }
        ).encode()
        try:
            pointer = parse_pointer(payload)
            if not opts["no_check_url"]:
                fetch_snapshot(pointer, FetchOptions(attempts=1, timeout_s=opts["timeout"]))
        except SnapshotError as e:
            _fail(f"{e}; upload {file} there first (or --no-check-url)")
    elif len(data) > BIG_MESSAGE_BYTES:
        click.echo(
            f"note: {len(data):,} bytes in one MQTT message; if the broker refuses it, put "
            "the file on a web server and publish with --url",
            err=True,
        )
    settings = mqtt_settings(opts)
    error = _publish_retained(settings, topic, payload, opts["timeout"])
    if error:
        _fail(error, 3)
    what = "delta" if snap.is_delta else "snapshot"
    how = f"pointer to {url}" if url is not None else f"{len(payload):,} bytes"
    click.echo(f"published {what} version {snap.version} to {topic} (retained, {how})")


def _publish_retained(settings: Any, topic: str, payload: bytes, timeout_s: float) -> str:
    """Publish ``payload`` retained at QoS 1 and wait for the broker's PUBACK; "" when it
    was taken, else what went wrong."""
    import paho.mqtt.client as mqtt

    connected, acked, gone = threading.Event(), threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        outcome["connect"] = rc
        connected.set()

    def on_publish(_c: Any, _u: Any, mid: int, rc: Any, _p: Any) -> None:
        outcome.setdefault("acks", {})[mid] = rc
        acked.set()

    try:
        client = settings.client(f"qrgate-credentials-{secrets.token_hex(4)}")
    except OSError as e:
        return f"cannot load the TLS files: {e}"
    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_disconnect = lambda *_: gone.set()
    try:
        client.connect(settings.host, settings.port, keepalive=settings.keepalive_s)
    except OSError as e:
        return f"cannot reach the broker {settings.address}: {e}"
    client.loop_start()
    try:
        if not connected.wait(timeout_s):
            return f"no answer from the broker {settings.address} within {timeout_s:.0f} s"
        rc = outcome["connect"]
        if rc.is_failure:
            return f"the broker {settings.address} refused the connection: {rc}"
        info = client.publish(topic, payload, qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            return f"cannot publish: {mqtt.error_string(info.rc)}"
        end = time.monotonic() + timeout_s
        while info.mid not in outcome.get("acks", {}):
            left = end - time.monotonic()
            if left <= 0:
                return f"the broker did not acknowledge the message within {timeout_s:.0f} s"
            acked.wait(left)
            acked.clear()
        rc = outcome["acks"][info.mid]
        if rc.is_failure:
            return f"the broker refused the message: {rc} (size limit or ACL?)"
        return ""
    finally:
        if client.is_connected():
            client.disconnect()
            gone.wait(timeout_s)  # the DISCONNECT written before the loop stops
        client.loop_stop()
