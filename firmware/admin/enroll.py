"""``qrgate enroll``: the enrollment server beside the broker, and its token database.

The server (:class:`provisioning.enroll.EnrollmentServer`) connects to the broker's
certificate listener as the back office, answers readers' requests on
``qrgate/v1/_enroll/<device>/csr`` and signs their CSRs with the fleet CA::

    qrgate enroll tokens add --db tokens.db tokens/lobby.json   # from provision qr --token-out
    qrgate enroll tokens list --db tokens.db
    qrgate enroll serve --ca fleet-ca --db tokens.db --broker mqtt.acme.example \\
        --cert backoffice.crt --key backoffice.key --ca-file broker/ca-chain.crt

``serve`` runs until SIGTERM or SIGINT and logs every decision (``qrgate.enroll`` logger).
"""

from __future__ import annotations

import datetime
import logging
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import click

from firmware.admin.common import REFUSED, fail
from provisioning.enroll import EnrollmentServer, TokenStore
from provisioning.exceptions import ProvisioningError
from provisioning.mqtt_transport import PahoTransport

__all__ = ["enroll"]

DEFAULT_PORT = 8883


def split_hostport(text: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` to (host, port). Raises ValueError."""
    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{text!r}: missing ']'")
        host, rest = text[1:end], text[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"{text!r}: expected ':port' after ']'")
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, p = text.split(":")
        port = int(p)
    if not host or not 0 < port < 65536:
        raise ValueError(f"{text!r}: not host[:port]")
    return host, port


_DB = click.option(
    "--db",
    "db",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="The token database (SQLite; created 0600).",
)


@click.group("enroll")
def enroll() -> None:
    """The enrollment server and its one-time enrollment tokens."""


@enroll.group("tokens")
def tokens() -> None:
    """Enrollment tokens made by `qrgate provision qr --token-out`."""


@tokens.command("add")
@_DB
@click.argument("token_files", nargs=-1, required=True, type=click.Path(path_type=Path))
def tokens_add(db: Path, token_files: tuple[Path, ...]) -> None:
    """Store token files (only the secret's hash is kept; delete the files afterwards)."""
    try:
        store = TokenStore(db)
        for f in token_files:
            t = store.add_file(f)
            click.echo(f"added {t.token_id} ({t.site}/{t.door}, expires {_when(t.exp)})")
    except ProvisioningError as e:
        fail(e, REFUSED)


def _when(seconds: int | None) -> str:
    if seconds is None:
        return "-"
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@tokens.command("list")
@_DB
def tokens_list(db: Path) -> None:
    """Every token: id, site/door, expiry, and who used it when."""
    try:
        rows = TokenStore(db).list()
    except ProvisioningError as e:
        fail(e, REFUSED)
    now = time.time()
    for t in rows:
        state = (
            f"used by {t.used_by} at {_when(t.used_at)}"
            if t.used_at is not None
            else ("expired" if now >= t.exp else "unused")
        )
        click.echo(f"{t.token_id}  {t.site}/{t.door}  expires {_when(t.exp)}  {state}")


@enroll.command("serve")
@click.option(
    "--ca",
    "ca_dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Fleet CA folder.",
)
@_DB
@click.option("--broker", required=True, help="HOST[:PORT] of the certificate listener (8883).")
@click.option("--cert", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option("--key", type=click.Path(path_type=Path, dir_okay=False), required=True)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="CA certificates to check the broker with (broker-config's ca-chain.crt).",
)
@click.option("--days", type=click.IntRange(1, 3650), default=730, show_default=True)
def serve(  # noqa: PLR0917 - click passes options positionally
    ca_dir: Path, db: Path, broker: str, cert: Path, key: Path, ca_file: Path, days: int
) -> None:
    """Answer enrollment requests until SIGTERM: check the token, sign the CSR, send the
    certificate. Connects as the back office (--cert/--key, from `qrgate ca` sign_service)."""
    try:
        host, port = split_hostport(broker)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--broker") from None
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    link = PahoTransport("qrgate-enroll-server")
    try:
        store = TokenStore(db)
        link.connect(host, port, str(ca_file), cert_file=str(cert), key_file=str(key))
        server = EnrollmentServer(ca_dir, store, link, days=days)
        server.start()  # subscribed (SUBACK) before it says it serves
        logging.getLogger("qrgate.enroll").info("enroll: serving on %s:%d", host, port)
        server.serve(stop)
    except ProvisioningError as e:
        fail(e, REFUSED)
    finally:
        link.close()
