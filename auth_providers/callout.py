"""Provider `callout`: ask an external auth service, over gRPC or HTTP, with FluxMQ's contract.

Services written for FluxMQ (or Magistrala's FluxMQ auth bridge) work
unchanged: the messages, field numbers, protocol strings and outcomes are
FluxMQ's (DESIGN.md, "Wire contracts of the providers"). This module holds
what both transports share: the provider the dispatcher sees, the mapping of
our events to the contract's values, outcomes and metrics. `auth.transport`
picks the transport (`callout_grpc` or `callout_http`); each one only turns a
request into a call and the service's answer into a `CalloutAnswer`, raising
`ProviderUnavailable` when there is no answer.

Every miss is one call: the dispatcher caches and coalesces, and
`gateway.resilience` adds the per-call timeout, retries and the circuit
breaker around this provider.
"""

from __future__ import annotations

import bisect
import logging
import math
import re
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

from gateway.config_types import AuthConfig
from gateway.errors import ProviderError, ProviderUnavailable
from gateway.events import NO_SECRET, Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.logging_setup import username_tag
from gateway.providers import ProviderContext

log = logging.getLogger("polygate.auth.callout")

#: The contract's `Protocol` enum (gRPC) ...
PROTOCOL_NUMBERS: dict[Protocol, int] = {
    Protocol.MQTT: 1,
    Protocol.AMQP: 2,
    Protocol.AMQP091: 3,
    Protocol.HTTP: 4,
    Protocol.COAP: 5,
}
#: ... and its strings (HTTP), spelled as FluxMQ sends them.
PROTOCOL_NAMES: dict[Protocol, str] = {
    Protocol.MQTT: "mqtt",
    Protocol.AMQP: "amqp_1_0",
    Protocol.AMQP091: "amqp_0_9_1",
    Protocol.HTTP: "http",
    Protocol.COAP: "coap",
}
ACTION_NUMBERS: dict[Action, int] = {Action.PUBLISH: 1, Action.SUBSCRIBE: 2}
ACTION_NAMES: dict[Action, str] = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe"}

#: A reason from the service is shown in audit logs: keep it one short line.
MAX_REASON_LENGTH = 200
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

_TRANSPORTS: dict[str, str] = {
    "grpc": "auth_providers.callout_grpc:GrpcTransport",
    "http": "auth_providers.callout_http:HttpTransport",
}
_USERINFO = re.compile(r"(//)[^/@\s]*@")


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthnRequest:
    client_id: str
    username: str
    password: Secret
    protocol: Protocol


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzRequest:
    external_id: str
    topic: str
    action: Action

    def __post_init__(self) -> None:
        if self.action not in ACTION_NUMBERS:
            raise ValueError(f"the callout contract has no action {self.action.value!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class CalloutAnswer:
    """What the service said: granted or not, and what it added."""

    granted: bool
    #: `AuthnRes.id`: the identity for later authorizations ("" = use the client id).
    external_id: str = ""
    reason_code: int = 0
    reason: str = ""
    #: Seconds the service wants this answer cached (HTTP `Cache-Control`), None = configured TTL.
    ttl: float | None = None


class CalloutTransport(TypingProtocol):
    """One way of reaching the service. Raises `ProviderUnavailable` when it got no answer."""

    name: str

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool: ...

    async def authenticate(self, request: AuthnRequest) -> CalloutAnswer: ...

    async def authorize(self, request: AuthzRequest) -> CalloutAnswer: ...


def scrub(text: str, secret: Secret = NO_SECRET) -> str:
    """Text from the service or a library, made safe for logs: no secret, one short line.

    A service may echo what it was sent (the password) in an error message, and
    a URL may carry credentials in its user info.
    """
    if secret:
        value = secret.reveal_str()
        if value:
            text = text.replace(value, "***")
    text = _USERINFO.sub(r"\1***@", text)
    text = " ".join(text.split())
    if len(text) > MAX_REASON_LENGTH:
        text = text[: MAX_REASON_LENGTH - 3] + "..."
    return text


def redact_url(url: str) -> str:
    return _USERINFO.sub(r"\1***@", url)


class Durations:
    """A latency histogram per method: plain integers bumped per call, rendered when scraped.

    Not a registered prometheus_client Histogram: a provider made again on the
    same `Metrics` (a reload) would collide with the first one's registration.
    """

    def __init__(self, buckets: tuple[float, ...] = DURATION_BUCKETS) -> None:
        self.buckets = buckets
        self._counts: dict[str, list[int]] = {}
        self._sums: defaultdict[str, float] = defaultdict(float)

    def observe(self, method: str, seconds: float) -> None:
        counts = self._counts.get(method)
        if counts is None:
            counts = self._counts[method] = [0] * (len(self.buckets) + 1)
        counts[bisect.bisect_left(self.buckets, seconds)] += 1
        self._sums[method] += seconds

    def family(self, transport: str) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "polygate_callout_duration_seconds",
            "Time of one call to the external auth service",
            labels=["transport", "method"],
        )
        for method, counts in sorted(self._counts.items()):
            cumulative, total = [], 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                total += count
                cumulative.append((floatToGoString(bound), total))
            family.add_metric([transport, method], cumulative, self._sums[method])
        return family


def _load_transport(auth: AuthConfig) -> CalloutTransport:
    target = _TRANSPORTS.get(auth.transport)
    if target is None:
        raise ProviderError(f"auth.transport must be one of {', '.join(_TRANSPORTS)} (got {auth.transport!r})")
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    transport: CalloutTransport = getattr(module, attr)(auth)
    return transport


class CalloutProvider:
    #: AuthzReq carries no client id: the answer is the same for every client of an identity.
    decisions_depend_on_client_id = False

    def __init__(self, context: ProviderContext) -> None:
        auth = context.auth
        if not auth.url:
            raise ProviderError("auth provider 'callout' needs auth.url (the auth service's address)")
        self.auth = auth
        self.transport = _load_transport(auth)
        #: (method, outcome) -> calls; the transport is one per provider.
        self.calls: defaultdict[tuple[str, Outcome], int] = defaultdict(int)
        self.durations = Durations()
        if context.metrics is not None:
            context.metrics.add_collector(self._collect)

    async def start(self) -> None:
        await self.transport.start()
        log.info(
            "auth provider 'callout': %s transport to %s (timeout %gs)",
            self.transport.name,
            redact_url(self.auth.url),
            self.auth.timeout,
        )

    async def aclose(self) -> None:
        await self.transport.aclose()

    def ready(self) -> bool:
        return self.transport.ready()

    async def authenticate(self, event: AuthEvent) -> Decision:
        # FluxMQ's contract has no certificate field: a verified certificate's identity is sent
        # as the username when the client sent none (DESIGN.md, "Transport security").
        username = event.username or event.tls_identity
        request = AuthnRequest(
            client_id=event.client_id, username=username, password=event.secret, protocol=event.protocol
        )
        answer = await self._call("authenticate", lambda: self.transport.authenticate(request), event)
        if answer.granted:
            identity = Identity(external_id=answer.external_id or event.client_id, username=username)
            return Decision(
                outcome=Outcome.ALLOW,
                identity=identity,
                reason=scrub(answer.reason, event.secret),
                reason_code=answer.reason_code,
                ttl=answer.ttl,
            )
        return Decision(
            outcome=Outcome.DENY,
            reason=scrub(answer.reason, event.secret) or "not authenticated",
            reason_code=answer.reason_code,
            ttl=answer.ttl,
        )

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        request = AuthzRequest(external_id=identity.external_id, topic=event.topic, action=event.action)
        answer = await self._call("authorize", lambda: self.transport.authorize(request), event)
        reason = scrub(answer.reason, event.secret)
        if answer.granted:
            return Decision(
                outcome=Outcome.ALLOW, identity=identity, reason=reason, reason_code=answer.reason_code, ttl=answer.ttl
            )
        return Decision(
            outcome=Outcome.DENY, reason=reason or "not authorized", reason_code=answer.reason_code, ttl=answer.ttl
        )

    async def _call(self, method: str, call: Callable[[], Awaitable[CalloutAnswer]], event: AuthEvent) -> CalloutAnswer:
        started = time.perf_counter()
        try:
            answer = await call()
        except ProviderUnavailable as exc:
            self._count(method, Outcome.UNAVAILABLE, started)
            log.debug(
                "callout %s client=%r user=%r: unavailable: %s",
                # Unchecked credentials: the "username" may be a password typed into the wrong field.
                method, event.client_id, username_tag(event.username) if method == "authenticate" else event.username,
                scrub(str(exc), event.secret),
            )
            raise
        except Exception:
            self._count(method, Outcome.UNAVAILABLE, started)
            raise
        outcome = Outcome.ALLOW if answer.granted else Outcome.DENY
        self._count(method, outcome, started)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "callout %s client=%r user=%r topic=%r: %s reason_code=%d reason=%r",
                method, event.client_id,
                username_tag(event.username) if method == "authenticate" and not answer.granted else event.username,
                event.topic, outcome.value,
                answer.reason_code, scrub(answer.reason, event.secret),
            )
        return answer

    def _count(self, method: str, outcome: Outcome, started: float) -> None:
        self.calls[(method, outcome)] += 1
        self.durations.observe(method, time.perf_counter() - started)

    def _collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily(
            "polygate_callouts",
            "Calls to the external auth service by transport, method and outcome",
            labels=["transport", "method", "outcome"],
        )
        for (method, outcome), count in sorted(self.calls.items(), key=lambda item: (item[0][0], item[0][1].value)):
            calls.add_metric([self.transport.name, method, outcome.value], count)
        return [calls, self.durations.family(self.transport.name)]
