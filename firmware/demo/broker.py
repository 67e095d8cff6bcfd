"""A real mosquitto broker on loopback, for the MQTT uplink's tests and the demo.

:class:`LocalBroker` writes a mosquitto config into a folder of its own, runs ``mosquitto -c``
as a child process, and can stop it politely (SIGTERM), kill it for real (SIGKILL) and bring
it back on the same port with the same persistence file, so tests see exactly what a reader
sees when the backend's broker crashes. :func:`make_test_pki` makes a throwaway CA, a server
certificate for 127.0.0.1/localhost and client certificates, for the TLS listener.

Linux only (it is the reader's platform); needs Debian's ``mosquitto`` package (2.x).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from firmware.exceptions import BrokerError

HOST = "127.0.0.1"
INSTALL_HINT = "apt-get install mosquitto"
# Debian puts the broker in /usr/sbin, which is not on a normal user's PATH.
DEBIAN_BINARY = "/usr/sbin/mosquitto"
MAX_QUEUED_MESSAGES = 100_000

_CONFIG_NAME = "mosquitto.conf"
_LOG_NAME = "mosquitto.log"
_OUTPUT_NAME = "mosquitto.out"
_CLIENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TAIL_LINES = 20
_POLL_S = 0.02
_STOP_TIMEOUT_S = 10.0
_PKI_VALID_DAYS = 365


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """PEM files for a TLS listener and its clients.

    ``ca_cert``: the root CA that signed everything here (clients trust it; the broker checks
    client certificates against it). ``server_cert``/``server_key``: the broker's certificate
    (SAN 127.0.0.1 and localhost) and its key. ``client_cert``/``client_key``: the first
    client's pair, or None. ``clients``: every client's ``(cert, key)`` by its name, which is
    also its certificate's CN and so, with ``use_identity_as_username``, its MQTT username.
    """

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path | None = None
    client_key: Path | None = None
    clients: Mapping[str, tuple[Path, Path]] = field(default_factory=dict)


def find_mosquitto(binary: str | None = None) -> str:
    """The mosquitto executable to run: ``binary`` if given (a path or a name on PATH), else
    ``mosquitto`` on PATH, else Debian's /usr/sbin/mosquitto.

    Raises BrokerError, with the install hint, when it is not an executable file.
    """
    if binary is not None:
        found = shutil.which(binary)
        if found is None:
            raise BrokerError(
                f"mosquitto binary {binary!r} not found or not executable; "
                f"install the broker with: {INSTALL_HINT}"
            )
        return found
    found = shutil.which("mosquitto") or shutil.which(DEBIAN_BINARY)
    if found is None:
        raise BrokerError(
            f"mosquitto is not installed (not on PATH, not {DEBIAN_BINARY}); "
            f"install it with: {INSTALL_HINT}"
        )
    return found


def free_port(host: str = HOST) -> int:
    """A TCP port on ``host`` that nothing listens on right now (the kernel's pick for port 0).

    Another process may take it before it is used; :meth:`LocalBroker.start` retries with a
    new one when that happens to a port it chose itself. Raises OSError if ``host`` is not local.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _kill_and_reap(proc: subprocess.Popen[bytes]) -> None:
    # Safety net run by weakref.finalize (also at interpreter exit): a broker whose owner was
    # dropped or forgotten must not outlive the test run or the demo.
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class LocalBroker:
    """A mosquitto broker on 127.0.0.1 whose config, log and persistence live in ``folder``.

    ``port``: the TCP port to listen on; None picks a free one (kept across :meth:`restart`).
    ``tls``: serve MQTT over TLS with these files (see :func:`make_test_pki`); None for plain
    TCP. ``require_certificate``: with ``tls``, refuse clients without a certificate signed by
    ``tls.ca_cert`` and use the certificate's CN as the username. ``allow_anonymous``: accept
    clients that give no username (with no password file, False lets in only certificate
    users). ``persistence``: keep retained messages, subscriptions and queued QoS 1/2 messages
    in ``folder/mosquitto.db``, saved at the end of each broker loop pass that changed them, so
    they survive :meth:`kill`, not only :meth:`stop` (mosquitto may send a PUBACK just before
    that save; once it has answered a later packet, the change is on disk). ``extra_config``:
    lines appended to the config verbatim (must keep the log file and the ``notice`` log type,
    which :meth:`start` reads). ``binary``: the mosquitto executable (see
    :func:`find_mosquitto`).

    The config is written here; the process starts with :meth:`start` or ``with``. Use one
    instance from one thread. Raises BrokerError when mosquitto is not installed, ValueError
    for ``require_certificate`` without ``tls`` or a path mosquitto's config cannot hold.
    """

    def __init__(
        self,
        folder: Path,
        *,
        port: int | None = None,
        tls: TlsFiles | None = None,
        require_certificate: bool = False,
        allow_anonymous: bool = True,
        persistence: bool = True,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        if require_certificate and tls is None:
            raise ValueError("require_certificate needs tls files")
        self.folder = Path(folder).resolve()
        self.binary = find_mosquitto(binary)
        self.tls = tls
        self.require_certificate = require_certificate
        self.allow_anonymous = allow_anonymous
        self.persistence = persistence
        self.extra_config = extra_config
        self._port_chosen = port is None
        self._port = free_port() if port is None else port
        self._proc: subprocess.Popen[bytes] | None = None
        self._reaper: weakref.finalize[[subprocess.Popen[bytes]], LocalBroker] | None = None
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write_config()

    @property
    def host(self) -> str:
        """The listener's address, always 127.0.0.1."""
        return HOST

    @property
    def port(self) -> int:
        """The listener's TCP port; the same after :meth:`restart`."""
        return self._port

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``, or ``mqtts://...`` with TLS."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{HOST}:{self._port}"

    @property
    def running(self) -> bool:
        """True while the mosquitto process started here is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id of the current or last mosquitto process; None before the first start."""
        return None if self._proc is None else self._proc.pid

    @property
    def config_path(self) -> Path:
        """The mosquitto config file written in ``folder``."""
        return self.folder / _CONFIG_NAME

    @property
    def log_path(self) -> Path:
        """mosquitto's own log file (appended to across restarts)."""
        return self.folder / _LOG_NAME

    @property
    def output_path(self) -> Path:
        """mosquitto's stdout and stderr (config errors land here, before its log is open)."""
        return self.folder / _OUTPUT_NAME

    def start(self, timeout_s: float = 10.0) -> None:
        """Run mosquitto and return once it listens on :attr:`port` (polled, no fixed sleep).

        Does nothing when already running. ``timeout_s``: seconds to wait for it to come up.
        Raises BrokerError, with the tail of its log, if it exits or is not up in time; the
        process is gone by then. A port chosen here that another process took meanwhile is
        replaced by a new free one (twice at most); an explicit ``port`` is never changed.
        """
        if self.running:
            return
        attempts = 3 if self._port_chosen and self._proc is None else 1
        for attempt in range(attempts):
            try:
                self._start_once(timeout_s)
                return
            except BrokerError as e:
                if attempt + 1 == attempts or "Address already in use" not in str(e):
                    raise
                self._port = free_port()
                self._write_config()

    def stop(self, timeout_s: float = _STOP_TIMEOUT_S) -> None:
        """Stop mosquitto with SIGTERM (it saves its persistence file) and wait for it to exit;
        SIGKILL if it has not within ``timeout_s`` seconds. Does nothing when not running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            self._detach()
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        self._detach()

    def kill(self) -> None:
        """Kill mosquitto with SIGKILL, as a crash or power cut would, and wait until it is gone
        (process reaped, port closed). Only what it had saved survives. Does nothing when not
        running."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self._detach()

    def restart(self, timeout_s: float = 10.0) -> None:
        """:meth:`stop` (if running), then :meth:`start` on the same port and persistence file.
        Raises BrokerError as :meth:`start` does."""
        self.stop()
        self.start(timeout_s)

    def __enter__(self) -> LocalBroker:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def log_tail(self, lines: int = _TAIL_LINES) -> str:
        """The last ``lines`` lines of mosquitto's log and output files, for error messages."""
        parts = []
        for path in (self.output_path, self.log_path):
            try:
                text = path.read_text(errors="replace")
            except FileNotFoundError:
                continue
            tail = text.splitlines()[-lines:]
            if tail:
                parts.append(f"--- {path.name} ---\n" + "\n".join(tail))
        return "\n".join(parts) if parts else "(mosquitto wrote nothing)"

    @property
    def log_size(self) -> int:
        """Bytes in mosquitto's log now (0 before it exists): a ``since`` for
        :meth:`logged_subscription` that skips what earlier runs wrote."""
        return self._size(self.log_path)

    def logged_subscription(self, topic_filter: str, *, since: int = 0) -> bool:
        """True when mosquitto's log, from byte ``since`` on, shows a client subscribing to
        exactly ``topic_filter``.

        mosquitto logs ``<client id> <qos> <filter>`` right after it has added the subscription
        (before its SUBACK), so a message published after this returned True is routed to that
        subscriber. That matters for a shared subscription: the broker drops what is published
        to a group that has no member yet.
        """
        try:
            with self.log_path.open("rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except FileNotFoundError:
            return False
        for line in text.splitlines():
            # "<timestamp>: <client id> <qos> <filter>"; the timestamp format is the config's
            _, _, entry = line.partition(": ")
            parts = entry.split(" ", 2)
            if len(parts) == 3 and parts[1] in ("0", "1", "2") and parts[2] == topic_filter:
                return True
        return False

    def _start_once(self, timeout_s: float) -> None:
        log_offset = self._size(self.log_path)
        with self.output_path.open("ab") as out:
            # A session of its own: Ctrl-C in the demo's terminal must not reach the broker
            # before the demo has shut its clients down; stop() ends it instead.
            proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.folder,
                start_new_session=True,
            )
        self._proc = proc
        self._reaper = weakref.finalize(self, _kill_and_reap, proc)
        try:
            self._wait_up(proc, log_offset, timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait_up(self, proc: subprocess.Popen[bytes], log_offset: int, timeout_s: float) -> None:
        # Two signs are needed: the "running" line proves this process bound the port (so a
        # stranger already listening there is not mistaken for it), the connect proves the
        # listener takes clients.
        deadline = time.monotonic() + timeout_s
        while True:
            code = proc.poll()
            if code is not None:
                raise BrokerError(
                    f"mosquitto exited with code {code} while starting on {HOST}:{self._port} "
                    f"(config {self.config_path}):\n{self.log_tail()}"
                )
            if self._logged_running(log_offset) and self._accepts():
                return
            if time.monotonic() >= deadline:
                raise BrokerError(
                    f"mosquitto did not accept connections on {HOST}:{self._port} within "
                    f"{timeout_s:g} s (config {self.config_path}):\n{self.log_tail()}"
                )
            time.sleep(_POLL_S)

    def _logged_running(self, offset: int) -> bool:
        try:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                return b" running" in f.read()
        except FileNotFoundError:
            return False

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((HOST, self._port), timeout=1.0):
                return True
        except OSError:
            return False

    @staticmethod
    def _size(path: Path) -> int:
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return 0

    def _detach(self) -> None:
        if self._reaper is not None:
            self._reaper.detach()
            self._reaper = None

    def _write_config(self) -> None:
        self.config_path.write_text(self._config_text())

    def _config_text(self) -> str:
        lines = [
            "# Written by qrgate's LocalBroker; rewritten on every construction.",
            f"listener {self._port} {HOST}",
            f"allow_anonymous {_yes(self.allow_anonymous)}",
            f"log_dest file {_conf_path(self.log_path)}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
            # A backend that was away for hours must find every scan queued for it.
            f"max_queued_messages {MAX_QUEUED_MESSAGES}",
            "max_queued_bytes 0",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto 2 drops to user "mosquitto", which cannot open the log or
            # write the database in a root-owned 0700 folder (a pytest tmp_path, CI as root).
            lines.append("user root")
        if self.persistence:
            lines += [
                "persistence true",
                # mosquitto 1.x glues location and file name together without a separator.
                f"persistence_location {_conf_path(self.folder)}/",
                "persistence_file mosquitto.db",
                # Save after every change, not every 30 min: kill() must only lose what a real
                # crash would. Each save rewrites the whole file, so huge queues cost CPU.
                "autosave_on_changes true",
                "autosave_interval 1",
            ]
        else:
            lines.append("persistence false")
        if self.tls is not None:
            lines += [
                f"cafile {_conf_path(self.tls.ca_cert)}",
                f"certfile {_conf_path(self.tls.server_cert)}",
                f"keyfile {_conf_path(self.tls.server_key)}",
            ]
            if self.require_certificate:
                lines += ["require_certificate true", "use_identity_as_username true"]
        text = "\n".join(lines) + "\n"
        if self.extra_config:
            text += self.extra_config.rstrip("\n") + "\n"
        return text


def _yes(flag: bool) -> str:
    return "true" if flag else "false"


def _conf_path(path: Path) -> str:
    # mosquitto reads one option per line and trims the value, so a path cannot carry these.
    s = str(Path(path).resolve())
    if "\n" in s or "\r" in s or s != s.strip():
        raise ValueError(f"path {s!r} cannot be written into a mosquitto config")
    return s


def make_test_pki(folder: Path, *, clients: Sequence[str] = ("reader-1",)) -> TlsFiles:
    """A throwaway PKI in ``folder`` (created if missing): a root CA, a server certificate for
    127.0.0.1 and localhost, and one client certificate per name in ``clients`` (CN = name).

    All keys are ECDSA P-256, unencrypted PEM, written 0600; certificates are valid from an
    hour ago for a year. Files: ``ca.crt``, ``ca.key``, ``server.crt``, ``server.key``,
    ``client-NAME.crt``, ``client-NAME.key``; existing ones are overwritten. Raises ValueError
    for a client name that is not 1-64 of ``A-Za-z0-9._-`` (it becomes a file name and an MQTT
    username), or a repeated name.
    """
    for name in clients:
        if not _CLIENT_NAME.match(name):
            raise ValueError(f"client name {name!r}: use 1-64 of A-Za-z0-9._- (letter/digit first)")
    if len(set(clients)) != len(clients):
        raise ValueError(f"client names repeat: {list(clients)}")
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qrgate test CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_crt_path, _ = _write_pair(folder, "ca", ca_cert, ca_key)

    def leaf(
        cn: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName] | None
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            _builder(subject, ca_name, key.public_key(), now)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_san: list[x509.GeneralName] = [
        x509.IPAddress(ipaddress.ip_address(HOST)),
        x509.DNSName("localhost"),
    ]
    server_crt_path, server_key_path = _write_pair(
        folder, "server", *leaf("localhost", ExtendedKeyUsageOID.SERVER_AUTH, server_san)
    )
    pairs: dict[str, tuple[Path, Path]] = {}
    for name in clients:
        pairs[name] = _write_pair(
            folder, f"client-{name}", *leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, None)
        )
    first = pairs[clients[0]] if clients else None
    return TlsFiles(
        ca_cert=ca_crt_path,
        server_cert=server_crt_path,
        server_key=server_key_path,
        client_cert=first[0] if first else None,
        client_key=first[1] if first else None,
        clients=pairs,
    )


def _builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    now: datetime.datetime,
) -> x509.CertificateBuilder:
    # Backdated an hour so a reader whose clock lags the test host still accepts it.
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=_PKI_VALID_DAYS))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _write_pair(
    folder: Path, stem: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey
) -> tuple[Path, Path]:
    crt_path = folder / f"{stem}.crt"
    key_path = folder / f"{stem}.key"
    crt_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as f:
        # O_CREAT's mode does not apply to a file that already existed.
        os.fchmod(fd, 0o600)
        f.write(pem)
    return crt_path, key_path
