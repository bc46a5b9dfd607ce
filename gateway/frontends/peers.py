"""Who is on the other end of a transport: its address and its verified certificate.

One place for every frontend, so one peer and one certificate read the same
on every protocol (logs, rate-limit keys, `AuthEvent.peer`, `tls_identity`,
`tls_serial`, `tls_fingerprint`), and one rule for passwords on plaintext
listeners (`auth.require_tls_for_passwords`).

A verified certificate is read as Atom reads the certificates it issues
(absmach/atom `certs::service`): the serial number is the lowercase hex of the
DER INTEGER's content bytes, a leading 00 kept when the top bit is set
(`normalize_serial(raw_serial_as_string())`, e.g. "00a1b2"), and the
fingerprint is the SHA-256 of the DER, lowercase hex without separators.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway.certs import fingerprint_sha256
from gateway.config_types import AuthConfig, GatewayConfig, ListenerConfig
from gateway.events import Decision, Protocol, Secret

log = logging.getLogger("polygate.tls")

#: `auth.mtls_identity` values.
MTLS_IDENTITY_FIELDS: Final = ("common_name", "san_dns", "san_uri", "san_email")
_SAN_TYPES: Final[dict[str, type[x509.GeneralName]]] = {
    "san_dns": x509.DNSName,
    "san_uri": x509.UniformResourceIdentifier,
    "san_email": x509.RFC822Name,
}
#: The reason a password on a plaintext listener is refused (audit and debug log; no secret in it).
PLAINTEXT_PASSWORD_REFUSED: Final = "passwords are refused on plaintext listeners (auth.require_tls_for_passwords)"
#: `server.<kind>` sections and the protocol whose auth decides whether they take passwords.
_LISTENER_PROTOCOLS: Final = (
    ("tcp", Protocol.MQTT),
    ("websocket", Protocol.MQTT),
    ("http", Protocol.HTTP),
    ("coap", Protocol.COAP),
    ("amqp", Protocol.AMQP),
    ("amqp091", Protocol.AMQP091),
)


def format_peer(host: str, port: int) -> str:
    """"ip:port", with brackets around IPv6 addresses ("[::1]:1883")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(transport: asyncio.BaseTransport) -> tuple[str, str]:
    """(ip, "ip:port") of the peer; empty strings when the transport does not know."""
    peername = transport.get_extra_info("peername")
    if not peername:
        return "", ""
    host, port = str(peername[0]), int(peername[1])
    return host, format_peer(host, port)


def certificate_identity(certificate: x509.Certificate, field: str = "common_name") -> str:
    """The `auth.mtls_identity` field of a certificate: its first value of that kind, or "" when it has none.

    Only the first value counts, so which of several names a device is known by
    never depends on the order a provider happens to try them in.
    """
    if field == "common_name":
        names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return _text(value.value for value in names)
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    return _text(san.get_values_for_type(_SAN_TYPES[field]))  # type: ignore[arg-type]


def _text(values: Iterable[object]) -> str:
    for value in values:
        # A CN may be a BMPString decoded to str or, rarely, raw bytes: only text is an identity.
        return value if isinstance(value, str) else ""
    return ""


@dataclass(frozen=True, slots=True)
class PeerCertificate:
    """A verified client certificate, as far as auth cares: what a provider may know a client by.

    None of it is secret (a certificate is shown to anyone who connects), so
    it is plain text in events and logs.
    """

    #: The `auth.mtls_identity` field, "" when the certificate has none.
    identity: str = ""
    #: Lowercase hex of the DER serial INTEGER's content bytes (Atom's form).
    serial: str = ""
    #: SHA-256 of the DER, lowercase hex without separators.
    fingerprint: str = ""

    def __bool__(self) -> bool:
        return bool(self.fingerprint)


#: No certificate, or none that was verified.
NO_CERTIFICATE: Final = PeerCertificate()


def certificate_serial(certificate: x509.Certificate) -> str:
    """The serial as Atom stores it: hex of the minimal two's-complement bytes DER carries.

    A positive serial whose top bit is set gets its leading 00 byte, as on the
    wire; a (non-conforming) negative one keeps its sign bits.
    """
    number = certificate.serial_number
    length = ((number if number >= 0 else ~number).bit_length() + 8) // 8
    return number.to_bytes(length, "big", signed=True).hex()


def certificate_details(certificate: x509.Certificate, field: str = "common_name") -> PeerCertificate:
    return PeerCertificate(
        identity=certificate_identity(certificate, field),
        serial=certificate_serial(certificate),
        fingerprint=fingerprint_sha256(certificate).replace(":", "").lower(),
    )


@functools.lru_cache(maxsize=256)
def _details_of_der(der: bytes, field: str) -> PeerCertificate:
    # HTTP asks once per request: keep-alive requests on one connection, and
    # the connections of one device, reuse the parse and the hash.
    try:
        return certificate_details(x509.load_der_x509_certificate(der), field)
    except ValueError:
        log.warning("client certificate could not be parsed; no TLS identity")
        return NO_CERTIFICATE


def peer_certificate(transport: asyncio.BaseTransport, field: str = "common_name") -> PeerCertificate:
    """The verified client certificate's identity (`auth.mtls_identity` field), serial and fingerprint.

    `NO_CERTIFICATE` when the connection is not TLS, the client sent no
    certificate or it was not verified; a verified certificate without that
    field has an empty identity but still its serial and fingerprint.
    """
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return NO_CERTIFICATE
    der = ssl_object.getpeercert(binary_form=True)
    # Only a verified certificate is an identity (client_auth optional/require).
    if not der or not ssl_object.getpeercert():
        return NO_CERTIFICATE
    return _details_of_der(der, field)


def peer_identity(transport: asyncio.BaseTransport, field: str = "common_name") -> str:
    """The verified client certificate's identity (`auth.mtls_identity` field), or "".

    "" when the connection is not TLS, the client sent no certificate, the
    certificate was not verified or it lacks that field.
    """
    return peer_certificate(transport, field).identity


def password_refused(auth: AuthConfig, listener: ListenerConfig, secret: Secret) -> Decision | None:
    """A denial when `auth.require_tls_for_passwords` forbids this password here; None to go on as usual.

    A certificate identity or an anonymous client carries no secret, so it is never refused here.
    """
    if not auth.require_tls_for_passwords or listener.tls or not secret:
        return None
    log.debug("%s: a password on a plaintext listener was refused", listener.name)
    return Decision.deny(PLAINTEXT_PASSWORD_REFUSED)


def plaintext_password_listeners(config: GatewayConfig) -> list[ListenerConfig]:
    """The plaintext listeners (CoAP always is one) of protocols whose operations need auth."""
    found: list[ListenerConfig] = []
    for kind, protocol in _LISTENER_PROTOCOLS:
        if not config.auth.protocols.get(protocol, True) or config.auth.provider == "none":
            continue
        found.extend(listener for listener in getattr(config.server, kind) if not listener.tls)
    return found


def warn_plaintext_passwords(config: GatewayConfig) -> None:
    """One WARNING per plaintext listener that accepts passwords (nothing when they are refused)."""
    if config.auth.require_tls_for_passwords:
        return
    for listener in plaintext_password_listeners(config):
        log.warning(
            "%s (%s) accepts passwords in plaintext; use a tls listener, or set "
            "auth.require_tls_for_passwords: true to refuse them there",
            listener.name,
            listener.addr,
        )
