"""Who is on the other end of a transport: its address and its verified certificate.

One place for every frontend, so one peer and one certificate read the same
on every protocol (logs, rate-limit keys, `AuthEvent.peer`/`tls_identity`).
"""

from __future__ import annotations

import asyncio
import logging

from cryptography import x509

log = logging.getLogger("polygate.tls")


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


def peer_identity(transport: asyncio.BaseTransport) -> str:
    """The verified client certificate's subject in RFC 4514 form ("CN=device-1,O=acme"), or "".

    RFC 4514 orders and escapes the names, so a subject like O="x,CN=admin"
    cannot read like a different one.
    """
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return ""
    der = ssl_object.getpeercert(binary_form=True)
    # Only a verified certificate is an identity (client_auth optional/require).
    if not der or not ssl_object.getpeercert():
        return ""
    try:
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    except ValueError:
        log.warning("client certificate could not be parsed; no TLS identity")
        return ""
