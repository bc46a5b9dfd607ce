"""TLS for listeners: one place that builds server contexts."""

from __future__ import annotations

import ssl

from gateway.config_types import ListenerConfig

_CLIENT_AUTH = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}


def server_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
    """A server context for a TLS or mTLS listener (TLS 1.2 or newer)."""
    assert listener.cert_file and listener.key_file
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(listener.cert_file, listener.key_file)
    if listener.ca_file:
        context.load_verify_locations(cafile=listener.ca_file)
    context.verify_mode = _CLIENT_AUTH.get(listener.client_auth, ssl.CERT_NONE)
    return context
