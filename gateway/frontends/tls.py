"""TLS for listeners: one place that builds server contexts, and swaps in new certificates.

Every TCP frontend (MQTT, WebSocket, HTTP, AMQP 1.0, AMQP 0.9.1) gets its
context from `server_ssl_context`. The context handed to the server is fixed
for the listener's life, so reloading works through its `sni_callback`, which
OpenSSL calls during every handshake (with or without SNI): when the
certificate files changed, the callback moves that one connection to a
context rebuilt from them. Connections already open keep the context they
were made with. The protocol version, cipher list and verify mode are taken
from the first context (OpenSSL copies them into each connection before the
callback runs); the certificate, key and client CAs from the swapped one.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import ssl
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from gateway.certs import Issued, fingerprint_sha256, make_self_signed
from gateway.config_types import ListenerConfig
from gateway.errors import PolygateError

log = logging.getLogger("polygate.tls")

_VERSIONS = {"tls1.2": ssl.TLSVersion.TLSv1_2, "tls1.3": ssl.TLSVersion.TLSv1_3}
# "optional" is the older spelling of "request"; parsed configs carry "request".
_CLIENT_AUTH = {"none": ssl.CERT_NONE, "request": ssl.CERT_OPTIONAL, "optional": ssl.CERT_OPTIONAL, "require": ssl.CERT_REQUIRED}

#: Certificate files are looked at (three stat calls) at most this often, by a handshake.
RELOAD_CHECK_INTERVAL = 1.0

#: (path, inode, size, mtime) of each configured file; None fields for a file that is missing.
_Signature = tuple[tuple[str, int | None, int | None, int | None], ...]


class TLSSetupError(PolygateError):
    """A listener's certificate or key could not be loaded at start."""


def server_ssl_context(listener: ListenerConfig) -> ssl.SSLContext:
    """The context for a TLS or mTLS listener, which picks up changed certificate files by itself."""
    return ReloadingContext(listener).context


class ReloadingContext:
    """A listener's server context plus what it needs to notice and load changed certificate files."""

    def __init__(self, listener: ListenerConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._listener = listener
        self._clock = clock
        self._self_signed: Issued | None = None
        if listener.self_signed:
            self._self_signed = make_self_signed(_self_signed_hosts(listener))
            log.info(
                "%s: serving a self-signed certificate made at start (development only), SHA-256 fingerprint %s",
                listener.name, fingerprint_sha256(self._self_signed.certificate),
            )
        self._signature = self._files_signature()
        try:
            self.context = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise TLSSetupError(f"{listener.name}: cannot load the TLS certificate, key or CA file: {exc}") from None
        #: What new connections get; `context` itself until files change.
        self.current = self.context
        self._failed_signature: _Signature | None = None
        self._next_check = clock() + RELOAD_CHECK_INTERVAL
        self.context.sni_callback = self._on_handshake

    def _on_handshake(self, ssl_object: ssl.SSLObject, server_name: str | None, initial: ssl.SSLContext) -> None:
        current = self.latest()
        if current is not initial:
            ssl_object.context = current
        return None

    def latest(self) -> ssl.SSLContext:
        """The context for the next connection, reloaded first if the files changed since the last look."""
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + RELOAD_CHECK_INTERVAL
            self._reload_if_changed()
        return self.current

    def _reload_if_changed(self) -> None:
        signature = self._files_signature()
        if signature == self._signature:
            return
        try:
            rebuilt = self._build()
        except (OSError, ssl.SSLError, ValueError) as exc:
            # Often a half-written replacement (new certificate, old key): keep serving, say so once per change.
            if signature != self._failed_signature:
                self._failed_signature = signature
                log.error(
                    "%s: changed certificate files cannot be loaded, new connections keep the previous ones: %s",
                    self._listener.name, exc,
                )
            return
        self._signature, self._failed_signature, self.current = signature, None, rebuilt
        log.info("%s: certificate files changed; new connections use them", self._listener.name)

    def _files_signature(self) -> _Signature:
        listener = self._listener
        found: list[tuple[str, int | None, int | None, int | None]] = []
        for name in (listener.cert_file, listener.key_file, listener.ca_file):
            if not name:
                continue
            try:
                stat = os.stat(name)
            except OSError:
                found.append((name, None, None, None))
            else:
                found.append((name, stat.st_ino, stat.st_size, stat.st_mtime_ns))
        return tuple(found)

    def _build(self) -> ssl.SSLContext:
        listener = self._listener
        # Not create_default_context: with no cafile it trusts the system CAs for *client*
        # certificates too, and an mTLS listener must accept its own CA's certificates only.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_SINGLE_DH_USE | ssl.OP_SINGLE_ECDH_USE
        context.minimum_version = _VERSIONS[listener.min_version]
        if listener.cipher_suites:
            context.set_ciphers(listener.cipher_suites)
        if self._self_signed is not None:
            _load_chain_from_memory(context, self._self_signed)
        else:
            assert listener.cert_file and listener.key_file
            context.load_cert_chain(listener.cert_file, listener.key_file)
        if listener.ca_file:
            context.load_verify_locations(cafile=listener.ca_file)
        context.verify_mode = _CLIENT_AUTH[listener.client_auth]
        return context


def _self_signed_hosts(listener: ListenerConfig) -> list[str]:
    hosts = ["localhost", "127.0.0.1", "::1", socket.gethostname()]
    if listener.host:
        hosts.insert(0, listener.host)
    return hosts


def _load_chain_from_memory(context: ssl.SSLContext, issued: Issued) -> None:
    """`load_cert_chain` reads files only: write them to a private directory for the call.

    The key is written encrypted with a password that lives only in this frame,
    so even the moment it spends on disk gives nothing away.
    """
    password = secrets.token_bytes(32)
    with tempfile.TemporaryDirectory(prefix="polygate-tls-") as directory:
        cert_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        cert_path.write_bytes(issued.cert_pem)
        key_path.write_bytes(issued.key_pem(password))
        context.load_cert_chain(cert_path, key_path, password=password)
