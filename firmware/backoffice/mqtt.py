"""How the back office's commands reach the MQTT broker: address, TLS and login settings,
and a paho client (MQTT 5, callback API 2) made from them."""

from __future__ import annotations

import logging
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

PLAIN_PORT = 1883
TLS_PORT = 8883
KEEPALIVE_S = 30


@dataclass(frozen=True, slots=True)
class MqttSettings:
    """A broker and how to log in. ``tls``: connect over TLS, checking the broker's
    certificate against ``ca_file`` (PEM; None: the system's CAs) and its host name.
    ``cert_file``/``key_file``: this client's certificate and key (PEM) when the broker wants
    one. ``username``/``password``: MQTT login, or None. ``keepalive_s``: MQTT keepalive."""

    host: str
    port: int = PLAIN_PORT
    tls: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = KEEPALIVE_S

    @classmethod
    def parse(
        cls,
        broker: str,
        *,
        tls: bool = False,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> MqttSettings:
        """Settings from ``broker``: ``HOST``, ``HOST:PORT``, ``[IPv6]:PORT`` or
        ``mqtt://``/``mqtts://`` URLs. TLS is on with ``tls``, an ``mqtts://`` URL, or any
        of the three files; the port defaults to 8883 with TLS, 1883 without.

        Raises ValueError for an empty host, a port that is not 1-65535, another URL scheme,
        or a key without a certificate.
        """
        text = broker.strip()
        if "://" in text:
            parts = urlsplit(text)
            if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
                raise ValueError(f"broker URL scheme {parts.scheme!r}: use mqtt:// or mqtts://")
            tls = tls or parts.scheme in ("mqtts", "ssl")
            host = parts.hostname or ""
            try:
                port_given = parts.port
            except ValueError:
                raise ValueError(f"broker {broker!r}: the port must be 1-65535") from None
        else:
            host, port_given = _host_port(text)
        if not host:
            raise ValueError(f"broker {broker!r} has no host")
        if key_file is not None and cert_file is None:
            raise ValueError("a client key needs its certificate (--certfile)")
        tls = tls or ca_file is not None or cert_file is not None
        port = port_given if port_given is not None else TLS_PORT if tls else PLAIN_PORT
        return cls(host, port, tls, ca_file, cert_file, key_file, username, password)

    @property
    def address(self) -> str:
        """``host:port`` with the scheme, for log lines: ``mqtts://broker:8883``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def client(self, client_id: str, *, manual_ack: bool = False) -> mqtt.Client:
        """A new, unconnected MQTT 5 client with these TLS and login settings.

        Raises ssl.SSLError / OSError when a certificate or key file cannot be loaded.
        """
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=manual_ack,
        )
        client.enable_logger(logging.getLogger("qrgate.backoffice.paho"))
        if self.username is not None:
            client.username_pw_set(self.username, self.password)
        if self.tls:
            context = ssl.create_default_context(
                cafile=str(self.ca_file) if self.ca_file is not None else None
            )
            if self.cert_file is not None:
                context.load_cert_chain(
                    str(self.cert_file), str(self.key_file) if self.key_file else None
                )
            client.tls_set_context(context)
        return client


def _host_port(text: str) -> tuple[str, int | None]:
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise ValueError(f"broker {text!r}: expected [IPv6]:PORT")
        return host, _port(text, rest[1:]) if rest else None
    if text.count(":") == 1:
        host, _, port = text.partition(":")
        return host, _port(text, port)
    return text, None  # a bare name, or a bare IPv6 address without a port


def _port(broker: str, text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"broker {broker!r}: the port must be 1-65535, found {text!r}")
    return int(text)
