"""The gRPC transport of the callout: `AuthService` of `broker.auth.v1` or `fluxmq.auth.v1`.

One long-lived `grpc.aio` channel carries every call; each call has the
deadline `auth.timeout`. Both package names exist in the field with identical
messages; `grpc_package: auto` asks `broker.auth.v1` first and, when the
service answers UNIMPLEMENTED, uses `fluxmq.auth.v1` for the life of the
process.

Addresses: `host:port` and `http://host:port` are plaintext, `https://host:port`
is TLS (system CAs, or `auth.tls.ca_file`; `auth.tls.cert_file`/`key_file` are
the client certificate for mTLS). A bare `host:port` with `auth.tls` set is TLS.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import grpc.aio

from auth_providers.callout import (
    ACTION_NUMBERS,
    PROTOCOL_NUMBERS,
    AuthnRequest,
    AuthzRequest,
    CalloutAnswer,
    scrub,
)
from auth_providers.proto.broker.auth.v1 import auth_pb2 as broker_pb2
from auth_providers.proto.broker.auth.v1 import auth_pb2_grpc as broker_pb2_grpc
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2 as fluxmq_pb2
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2_grpc as fluxmq_pb2_grpc
from gateway.config_types import AuthConfig, TLSClientConfig
from gateway.errors import ProviderError, ProviderUnavailable
from gateway.events import NO_SECRET, Secret

log = logging.getLogger("polygate.auth.callout")

BROKER_PACKAGE = "broker.auth.v1"
FLUXMQ_PACKAGE = "fluxmq.auth.v1"

#: Answers that are the service's "no" (Magistrala's bridge answers a wrong password this way).
DENIAL_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT}
)
#: Transport errors worth another try.
RETRYABLE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})

#: Bounds of gRPC's reconnect backoff (its default grows to 120 s).
MIN_RECONNECT_BACKOFF = 0.1
MAX_RECONNECT_BACKOFF = 1.0


def channel_options(open_for: float) -> tuple[tuple[str, Any], ...]:
    """Reconnect at least twice per breaker interval.

    With gRPC's default backoff a service that came back would stay unreachable
    long after the circuit breaker half-opens, and every trial call would fail
    at once on the channel's old failure and open the circuit again.
    """
    cap = min(MAX_RECONNECT_BACKOFF, max(MIN_RECONNECT_BACKOFF, open_for / 2))
    return (
        ("grpc.initial_reconnect_backoff_ms", int(MIN_RECONNECT_BACKOFF * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(cap * 1000)),
    )


@dataclass(frozen=True, slots=True)
class _Package:
    name: str
    messages: ModuleType
    stub: Callable[[grpc.aio.Channel], Any]


_PACKAGES = {
    BROKER_PACKAGE: _Package(BROKER_PACKAGE, broker_pb2, broker_pb2_grpc.AuthServiceStub),
    FLUXMQ_PACKAGE: _Package(FLUXMQ_PACKAGE, fluxmq_pb2, fluxmq_pb2_grpc.AuthServiceStub),
}


def grpc_target(url: str, tls: TLSClientConfig | None = None) -> tuple[str, bool]:
    """(channel target, use TLS) for `host:port`, `http://host:port` or `https://host:port`."""
    if "://" not in url:
        return url, tls is not None
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ProviderError(f"auth.url: expected host:port, http://host:port or https://host:port (got {url!r})")
    secure = parts.scheme == "https"
    host = parts.hostname
    port = parts.port or (443 if secure else 80)
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}"), secure


def _read(path: str | None, key: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ProviderError(f"auth.tls.{key}: cannot read {path}: {exc.strerror}") from exc


class GrpcTransport:
    name = "grpc"

    def __init__(self, auth: AuthConfig) -> None:
        self._target, self._secure = grpc_target(auth.url, auth.tls)
        self._tls = auth.tls
        self._timeout = auth.timeout
        self._options = channel_options(auth.circuit_breaker.open_for)
        self._auto = auth.grpc_package == "auto"
        self._package = BROKER_PACKAGE if self._auto else auth.grpc_package
        if self._package not in _PACKAGES:
            raise ProviderError(f"auth.grpc_package must be auto, {BROKER_PACKAGE} or {FLUXMQ_PACKAGE}")
        self._channel: grpc.aio.Channel | None = None
        self._stubs: dict[str, Any] = {}
        #: The last call got an answer from the service (for `ready`).
        self._answered = False

    @property
    def package(self) -> str:
        """The package calls go to now."""
        return self._package

    async def start(self) -> None:
        # Creating a channel connects lazily: it succeeds while the service is down.
        if self._secure:
            tls = self._tls or TLSClientConfig()
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read(tls.ca_file, "ca_file"),
                private_key=_read(tls.key_file, "key_file"),
                certificate_chain=_read(tls.cert_file, "cert_file"),
            )
            self._channel = grpc.aio.secure_channel(self._target, credentials, options=self._options)
        else:
            self._channel = grpc.aio.insecure_channel(self._target, options=self._options)
        self._stubs = {name: package.stub(self._channel) for name, package in _PACKAGES.items()}

    async def aclose(self) -> None:
        channel, self._channel = self._channel, None
        self._stubs = {}
        if channel is not None:
            await channel.close()

    def ready(self) -> bool:
        if self._channel is None:
            return False
        state = self._channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return True
        # An idle channel (no call for a while) reconnects on the next call.
        return self._answered and state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)

    async def authenticate(self, request: AuthnRequest) -> CalloutAnswer:
        def build(messages: ModuleType) -> Any:
            return messages.AuthnReq(
                client_id=request.client_id,
                username=request.username,
                password=request.password.reveal_str(),
                protocol=PROTOCOL_NUMBERS[request.protocol],
            )

        response = await self._call("Authenticate", build, request.password)
        if isinstance(response, CalloutAnswer):
            return response
        return CalloutAnswer(
            granted=bool(response.authenticated),
            external_id=response.id,
            reason_code=response.reason_code,
            reason=response.reason,
        )

    async def authorize(self, request: AuthzRequest) -> CalloutAnswer:
        def build(messages: ModuleType) -> Any:
            return messages.AuthzReq(
                external_id=request.external_id, topic=request.topic, action=ACTION_NUMBERS[request.action]
            )

        response = await self._call("Authorize", build, NO_SECRET)
        if isinstance(response, CalloutAnswer):
            return response
        return CalloutAnswer(
            granted=bool(response.authorized), reason_code=response.reason_code, reason=response.reason
        )

    async def _call(self, method: str, build: Callable[[ModuleType], Any], secret: Secret) -> Any:
        """The response message, or a `CalloutAnswer` for a denial by status."""
        if not self._stubs:
            raise ProviderUnavailable("auth provider 'callout' is not started")
        package = self._package
        while True:
            rpc = getattr(self._stubs[package], method)
            try:
                response = await rpc(build(_PACKAGES[package].messages), timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code is grpc.StatusCode.UNIMPLEMENTED and self._auto and package == BROKER_PACKAGE:
                    self._fall_back()
                    package = FLUXMQ_PACKAGE
                    continue
                return self._failed(method, package, code, exc.details() or "", secret)
            except grpc.RpcError as exc:  # e.g. the channel was closed under the call
                self._answered = False
                detail = scrub(str(exc), secret)
                raise ProviderUnavailable(f"auth service call failed: {detail}", retryable=True) from None
            self._answered = True
            return response

    def _fall_back(self) -> None:
        if self._package == BROKER_PACKAGE:
            self._package = FLUXMQ_PACKAGE
            log.warning(
                "auth service at %s does not implement %s.AuthService; using %s from now on",
                self._target, BROKER_PACKAGE, FLUXMQ_PACKAGE,
            )

    def _failed(self, method: str, package: str, code: grpc.StatusCode, details: str, secret: Secret) -> CalloutAnswer:
        details = scrub(details, secret)
        if code in DENIAL_CODES:
            self._answered = True
            return CalloutAnswer(granted=False, reason=details or code.name)
        self._answered = False
        if code is grpc.StatusCode.UNIMPLEMENTED:
            packages = f"{BROKER_PACKAGE} or {FLUXMQ_PACKAGE}" if self._auto else package
            raise ProviderUnavailable(
                f"auth service at {self._target} does not implement {method} of {packages}.AuthService",
                retryable=False,
            )
        suffix = f": {details}" if details else ""
        raise ProviderUnavailable(f"auth service answered {code.name}{suffix}", retryable=code in RETRYABLE_CODES)
