"""Typed, frozen configuration objects. Parsing and validation live in `gateway.config`.

Durations are float seconds; addresses are parsed into host and port once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from ipaddress import IPv4Network, IPv6Network
from dataclasses import dataclass, field
from types import MappingProxyType

from gateway.events import Protocol

IPNetwork = IPv4Network | IPv6Network


@dataclass(frozen=True, slots=True, kw_only=True)
class ListenerConfig:
    """One listener (e.g. `server.tcp.plain`)."""

    #: Key path, e.g. "server.tcp.tls", for log lines and errors.
    name: str
    #: The address as written (":1883", "127.0.0.1:0", "[::1]:1883").
    addr: str
    #: "" means every interface.
    host: str
    port: int
    max_connections: int = 0
    #: TLS settings; all None for a plain listener.
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    #: "none" | "request" | "require" (mTLS); the config's "optional" is read as "request".
    client_auth: str = "none"
    #: WebSocket path (server.websocket.*), e.g. "/mqtt".
    path: str = ""
    #: Source networks this listener takes connections from; empty: any (limits.allowed_cidrs still applies).
    allowed_cidrs: tuple[IPNetwork, ...] = ()
    #: Lowest TLS version accepted: "tls1.2" | "tls1.3".
    min_version: str = "tls1.2"
    #: OpenSSL cipher string for TLS 1.2 (TLS 1.3 suites are OpenSSL's defaults); "" keeps Python's defaults.
    cipher_suites: str = ""
    #: Serve a certificate made at start instead of cert_file/key_file (development only).
    self_signed: bool = False

    @property
    def tls(self) -> bool:
        return self.cert_file is not None or self.self_signed


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    #: Enabled listeners only, by kind: "tcp", "websocket", "http", "coap", "amqp", "amqp091".
    tcp: tuple[ListenerConfig, ...] = ()
    websocket: tuple[ListenerConfig, ...] = ()
    http: tuple[ListenerConfig, ...] = ()
    coap: tuple[ListenerConfig, ...] = ()
    amqp: tuple[ListenerConfig, ...] = ()
    amqp091: tuple[ListenerConfig, ...] = ()
    #: Health/ready/metrics listener; None when disabled.
    health: ListenerConfig | None = None
    #: Bounded time for in-flight work at shutdown.
    shutdown_timeout: float = 5.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CircuitBreakerConfig:
    failures: int = 5
    open_for: float = 10.0
    half_open_requests: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSClientConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AtomConfig:
    grpc_addr: str = ""
    insecure: bool = True
    ca_file: str = ""
    service_token_env: str = "POLYGATE_ATOM_SERVICE_TOKEN"
    topic_format: str = "magistrala"
    authn_cache_ttl: float = 30.0
    alias_cache_ttl: float = 300.0
    decision_cache_ttl: float = 0.0
    unsupported_topic_policy: str = "deny"


@dataclass(frozen=True, slots=True, kw_only=True)
class LocalConfig:
    db: str = "./polygate-auth.db"
    allow_anonymous: bool = False
    root_username_env: str = "POLYGATE_ROOT_USERNAME"
    root_password_env: str = "POLYGATE_ROOT_PASSWORD"
    #: A connect waits this long for a worker to check its password before it is told "busy".
    max_wait: float = 30.0
    argon2: Argon2Config = field(default_factory=lambda: Argon2Config())


@dataclass(frozen=True, slots=True, kw_only=True)
class Argon2Config:
    """Argon2id parameters of the hashes the gateway makes (OWASP's by default)."""

    #: Bytes (written as a size, e.g. "19MiB").
    memory: int = 19 * 1024 * 1024
    time: int = 2
    parallelism: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class FailedLoginsConfig:
    """`limits.failed_logins`: refuse at once, for `lockout`, a source IP or a username that failed too often."""

    #: Failed logins from one source IP within `window` that lock it out (0 = never).
    per_ip: int = 20
    #: Failed logins for one username, from any IP, within `window` that lock it out (0 = never).
    per_username: int = 100
    window: float = 60.0
    lockout: float = 60.0


def _all_protocols() -> Mapping[Protocol, bool]:
    return MappingProxyType({p: True for p in Protocol})


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthConfig:
    #: "local" | "callout" | "atom" | "none" (or a registered third-party name).
    provider: str = "local"
    timeout: float = 2.0
    #: Every Protocol is a key; False means operations on it are not checked.
    protocols: Mapping[Protocol, bool] = field(default_factory=_all_protocols)
    identity_cache_size: int = 50000
    identity_cache_ttl: float = 3600.0
    authn_cache_ttl: float = 30.0
    decision_cache_ttl: float = 0.0
    negative_cache_ttl: float = 0.0
    #: "drop" | "disconnect"
    deny_publish_action: str = "drop"
    # callout
    url: str = ""
    transport: str = "grpc"
    grpc_package: str = "auto"
    retries: int = 1
    circuit_breaker: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    tls: TLSClientConfig | None = None
    max_inflight: int = 1000
    stale_if_error: float = 0.0
    atom: AtomConfig = field(default_factory=AtomConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    #: Which field of a verified client certificate is its identity (`AuthEvent.tls_identity`):
    #: "common_name" | "san_dns" | "san_uri" | "san_email" (the first SAN of that kind).
    mtls_identity: str = "common_name"
    #: True: a password sent over a plaintext listener (CoAP counts as one) is refused.
    require_tls_for_passwords: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class RateConfig:
    enabled: bool = True
    #: Tokens per second.
    rate: float = 50.0
    burst: int = 200


@dataclass(frozen=True, slots=True, kw_only=True)
class RatelimitConfig:
    enabled: bool = False
    #: Per source IP: new connections (and HTTP/CoAP requests).
    connection: RateConfig = field(default_factory=lambda: RateConfig(rate=50.0, burst=200))
    #: Per client: messages published.
    message: RateConfig = field(default_factory=lambda: RateConfig(rate=500.0, burst=2000))
    #: Per MQTT connection: topic filters subscribed (a client over it is slowed, not refused).
    subscribe: RateConfig = field(default_factory=lambda: RateConfig(rate=100.0, burst=1000))


def total_memory() -> int:
    """Bytes of RAM on this machine (0 when the OS does not say)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 0


#: RabbitMQ's default: publishers are held once queued messages use 40% of RAM.
DEFAULT_MEMORY_HIGH_WATERMARK = 0.4


#: What a full subscriber queue does with one more message (`limits.queue_overflow`).
OVERFLOW_POLICIES = ("drop_oldest", "reject_new", "block")


def _default_overflow() -> Mapping[Protocol, str]:
    return MappingProxyType({
        Protocol.MQTT: "drop_oldest",
        Protocol.AMQP091: "reject_new",
        Protocol.AMQP: "reject_new",
        Protocol.HTTP: "drop_oldest",
        Protocol.COAP: "drop_oldest",
    })


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_message_size: int = 1048576
    max_topic_length: int = 1024
    #: Per queue (MQTT session, AMQP queue, SSE stream, CoAP observer, AMQP 1.0 link):
    #: messages waiting, before the overflow policy applies.
    max_queued_messages: int = 100000
    #: Per queue: payload bytes waiting, before the overflow policy applies.
    max_queued_bytes: int = 256_000_000
    #: Per protocol of the subscriber: one of OVERFLOW_POLICIES.
    queue_overflow: Mapping[Protocol, str] = field(default_factory=_default_overflow)
    #: Bytes of queued messages in memory, all queues together, above which every
    #: publisher is held (0 = never). Written as a fraction of RAM or a size.
    memory_high_watermark: int = field(default_factory=lambda: int(DEFAULT_MEMORY_HIGH_WATERMARK * total_memory()))
    #: MQTT: QoS 1/2 messages sent and not yet acknowledged, per session.
    max_inflight_messages: int = 100
    #: Retained messages kept by the router (0 = no cap).
    max_retained_messages: int = 100000
    #: Open connections (and CoAP observations) from one source IP (IPv6: its /64), all listeners (0 = no cap).
    max_connections_per_ip: int = 1000
    #: Subscriptions one client holds at once (0 = no cap): MQTT filters, AMQP 0.9.1 consumers and
    #: bindings, AMQP 1.0 receiving links, SSE filters, CoAP observations. What passes it is refused.
    max_subscriptions_per_client: int = 10000
    #: Source networks any listener takes connections from; empty: any.
    allowed_cidrs: tuple[IPNetwork, ...] = ()
    #: Bounds every connection's opening: the TLS handshake, MQTT CONNECT, the AMQP 1.0 and 0.9.1
    #: handshakes, HTTP and WebSocket request headers.
    handshake_timeout: float = 10.0
    #: File descriptors kept free of client connections (health listener, store, logs).
    fd_reserve: int = 128
    #: CoAP: block-wise uploads in progress from one source IP at once (0 = no cap).
    coap_uploads_per_ip: int = 8
    #: Failed-login limiter (per source IP and per username), for every provider.
    failed_logins: FailedLoginsConfig = field(default_factory=lambda: FailedLoginsConfig())


@dataclass(frozen=True, slots=True, kw_only=True)
class StorageConfig:
    """Where retained messages, persistent sessions and durable queues are kept."""

    #: "sqlite" (on disk, the default) | "memory" (nothing survives a restart).
    backend: str = "sqlite"
    #: A directory, relative to the working directory.
    path: str = "./polygate-data"
    #: "always" (fsync before each acknowledgement) | "batch" (group commit before the
    #: acknowledgement, fsync at checkpoints) | "never" (acknowledge before the write).
    fsync: str = "batch"


@dataclass(frozen=True, slots=True, kw_only=True)
class MQTTConfig:
    #: An offline persistent session and its messages are freed after this.
    session_expiry: float = 7200.0


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    ratelimit: RatelimitConfig = field(default_factory=RatelimitConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    mqtt: MQTTConfig = field(default_factory=MQTTConfig)
    #: The file it came from, None for the built-in defaults.
    source: str | None = None
