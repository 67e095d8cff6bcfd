"""``qrgate ca``: the fleet CA on the administrator's machine (:mod:`provisioning.ca`).

Setting up a fleet::

    qrgate ca init --dir fleet-ca --name "ACME doors"
    qrgate ca broker-config --dir fleet-ca --host mqtt.acme.example --out broker
    qrgate ca service --dir fleet-ca --name backoffice --out backoffice
    qrgate ca sign --dir fleet-ca reader.csr --out reader.crt
    qrgate ca revoke --dir fleet-ca --device 10000000abcdef01     # and copy crl.pem over
    qrgate ca list --dir fleet-ca

Exit codes: 0 done, 2 bad input (options, a refused CSR), 1 refused by the CA folder's state
(already initialised, missing, nothing to revoke, unreadable files).
"""

from __future__ import annotations

from pathlib import Path

import click
from cryptography import x509

from firmware.admin.common import REFUSED, fail
from firmware.policy.keys import write_file_atomic
from provisioning.ca import (
    DEFAULT_BACKOFFICE_CN,
    DEFAULT_ENROLL_PORT,
    MAX_CSR_BYTES,
    broker_config,
    init_ca,
    is_device_id,
    list_issued,
    make_crl,
    revoke,
    sign_csr,
    sign_service,
)
from provisioning.exceptions import CaError, CsrError

__all__ = ["ca"]

_DIR = click.option(
    "--dir",
    "folder",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="The fleet CA folder.",
)


def _write_out(path: Path, data: bytes, mode: int) -> None:
    try:
        write_file_atomic(path, data, mode, overwrite=True)
    except Exception as e:  # KeyFileError names the file and the reason
        fail(e, REFUSED)


@click.group("ca")
def ca() -> None:
    """The fleet CA: reader and broker certificates, revocation, broker configuration."""


@ca.command("init")
@_DIR
@click.option("--name", required=True, help='Fleet name: "NAME root CA", "NAME issuing CA".')
@click.option("--days-root", type=click.IntRange(1), default=7300, show_default=True)
@click.option("--days-issuing", type=click.IntRange(1), default=3650, show_default=True)
def ca_init(folder: Path, name: str, days_root: int, days_issuing: int) -> None:
    """Make a root and an issuing CA in --dir (never overwrites one). Keep root.key offline
    afterwards: only issuing.key is needed to sign."""
    try:
        init_ca(folder, name=name, days_root=days_root, days_issuing=days_issuing)
    except ValueError as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    click.echo(f"wrote a fleet CA in {folder}: root.crt, issuing.crt, keys 0600", err=True)


@ca.command("sign")
@_DIR
@click.argument("csr", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Default: stdout.")
@click.option("--days", type=click.IntRange(1), default=730, show_default=True)
@click.option("--device", "expect", help="Refuse the CSR unless it names this device id.")
def ca_sign(folder: Path, csr: Path, out: Path | None, days: int, expect: str | None) -> None:
    """Sign a reader's CSR (PEM): a client certificate whose CN is its device id."""
    try:
        with csr.open("rb") as f:
            data = f.read(MAX_CSR_BYTES + 1)
    except OSError as e:
        fail(ValueError(f"{csr}: cannot read: {e.strerror or e}"))
    try:
        pem = sign_csr(folder, data, days=days, expect_cn=expect)
    except (CsrError, ValueError) as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    if out is None:
        click.echo(pem.decode(), nl=False)
    else:
        _write_out(out, pem, 0o644)
        click.echo(f"wrote {out}", err=True)


@ca.command("service")
@_DIR
@click.option("--name", default=DEFAULT_BACKOFFICE_CN, show_default=True, help="CN/username.")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--days", type=click.IntRange(1), default=730, show_default=True)
def ca_service(folder: Path, name: str, out: Path, days: int) -> None:
    """A client certificate and key for a service (the back office): NAME.crt, NAME.key
    (0600) in --out. NAME is reserved: no reader can be signed under it."""
    try:
        cert, key = sign_service(folder, name, days=days)
    except ValueError as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    try:
        out.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        fail(ValueError(f"{out}: cannot create the folder: {e.strerror or e}", REFUSED))
    _write_out(out / f"{name}.key", key, 0o600)
    _write_out(out / f"{name}.crt", cert, 0o644)
    click.echo(f"wrote {out / name}.crt and {name}.key (0600)", err=True)


@ca.command("revoke")
@_DIR
@click.option("--serial", help="The certificate's serial, hex (as `qrgate ca list` shows).")
@click.option(
    "--cert",
    "cert_file",
    type=click.Path(path_type=Path, dir_okay=False),
    help="Revoke the certificate in this PEM file.",
)
@click.option("--device", help="Revoke every certificate with this CN (device id, service).")
@click.option("--crl-days", type=click.IntRange(1), default=30, show_default=True)
def ca_revoke(
    folder: Path, serial: str | None, cert_file: Path | None, device: str | None, crl_days: int
) -> None:
    """Revoke a certificate and write a new crl.pem in --dir. Copy it to the broker and
    reload mosquitto (systemctl reload mosquitto) for the refusal to take effect."""
    if sum(x is not None for x in (serial, cert_file, device)) != 1:
        fail(click.UsageError("give one of --serial, --cert or --device"))
    if device is not None and not is_device_id(device):
        fail(ValueError(f"{device!r:.80} is not a device id (4-64 of 0-9a-z_-)"))
    if cert_file is not None:
        try:
            cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
        except (OSError, ValueError) as e:
            fail(ValueError(f"{cert_file}: not a readable PEM certificate ({e})"))
        serial = f"{cert.serial_number:x}"
    try:
        done = revoke(folder, serial=serial, cn=device)
        make_crl(folder, crl_days)
    except ValueError as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    for c in done:
        click.echo(f"revoked {c.serial_hex} {c.cn}")
    click.echo(f"wrote {folder / 'crl.pem'}", err=True)


@ca.command("crl")
@_DIR
@click.option("--out", type=click.Path(path_type=Path, dir_okay=False), help="Also write here.")
@click.option("--days", type=click.IntRange(1), default=30, show_default=True)
def ca_crl(folder: Path, out: Path | None, days: int) -> None:
    """Write a fresh CRL (crl.pem in --dir, and --out). Run it well before the last one's
    nextUpdate (a monthly timer): an expired CRL makes mosquitto refuse every reader."""
    try:
        pem = make_crl(folder, days)
    except ValueError as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    if out is not None:
        _write_out(out, pem, 0o644)
    click.echo(f"wrote {folder / 'crl.pem'}" + (f" and {out}" if out else ""), err=True)


@ca.command("broker-config")
@_DIR
@click.option("--host", "hosts", multiple=True, required=True, help="Broker DNS name or IP.")
@click.option("--port", type=click.IntRange(1, 65535), default=8883, show_default=True)
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--backoffice", default=DEFAULT_BACKOFFICE_CN, show_default=True)
@click.option("--site", help="Allow readers one site only (default: any site level).")
@click.option("--install-dir", help="Where the files will be on the broker (default: --out).")
@click.option("--bind", "bind_address", help="Listen on this address only.")
@click.option(
    "--enroll-port",
    type=click.IntRange(0, 65535),
    default=DEFAULT_ENROLL_PORT,
    show_default=True,
    help="The enrollment listener (TLS, password login for the enroll user only); 0: none.",
)
def ca_broker_config(  # noqa: PLR0917 - click passes options positionally
    folder: Path,
    hosts: tuple[str, ...],
    port: int,
    out: Path,
    backoffice: str,
    site: str | None,
    install_dir: str | None,
    bind_address: str | None,
    enroll_port: int,
) -> None:
    """mosquitto files in --out: mosquitto.conf (TLS listener, client certificates, CRL,
    ACL; and the enrollment listener), ca-chain.crt, server.crt, server.key (0600), crl.pem,
    acl, enroll.passwd and enroll.password (0600: give it to readers with the firmware).
    --host may repeat."""
    try:
        files = broker_config(
            folder,
            out,
            host=hosts,
            port=port,
            backoffice_cn=backoffice,
            site_wildcard=site is None,
            site=site,
            bind_address=bind_address,
            install_dir=install_dir,
            enroll_port=enroll_port or None,
        )
    except ValueError as e:
        fail(e)
    except CaError as e:
        fail(e, REFUSED)
    extra = ", enroll.passwd, enroll.password" if enroll_port else ""
    click.echo(f"wrote {files.conf.parent}: mosquitto.conf, acl, certificates, crl.pem{extra}")


@ca.command("list")
@_DIR
def ca_list(folder: Path) -> None:
    """Certificates issued: serial, kind, CN, not after, and REVOKED marks."""
    try:
        issued = list_issued(folder)
    except CaError as e:
        fail(e, REFUSED)
    for c in issued:
        mark = f"  REVOKED {c.revoked_at:%Y-%m-%dT%H:%M:%SZ}" if c.revoked_at else ""
        click.echo(f"{c.serial_hex:>40}  {c.kind:<7}  {c.cn}  {c.not_after:%Y-%m-%d}{mark}")
