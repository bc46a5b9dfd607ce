"""The auth dispatcher: picks the provider, consults the caches, calls on a miss.

Caching, coalescing of identical in-flight calls, timeouts and admission
control wrap any provider from outside, once; providers keep no cache. An
unavailable answer is never cached and never turned into an allow.

Session protocols (MQTT, AMQP) get a `SessionAuth` handle at connect whose
`publish_now` answers a cache hit without building an event, creating a task or
awaiting; stateless protocols (HTTP, CoAP) call `decide_stateless` per request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Hashable, Iterable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from gateway.cache import TTLCache, cache_metrics
from gateway.coalescing import Coalescer
from gateway.config_types import AuthConfig, LimitsConfig
from gateway.events import (
    Action,
    AuthEvent,
    Decision,
    Identity,
    Outcome,
    Protocol,
    Secret,
)
from gateway.logging_setup import username_tag
from gateway.login_limiter import LOCKED_REASON, FailedLoginLimiter, source_ip
from gateway.metrics import Metrics
from gateway.providers import AuthProvider, ProviderContext, find_provider
from gateway.resilience import ResilientProvider

log = logging.getLogger("polygate.dispatcher")
audit = logging.getLogger("polygate.audit")

_NOT_CHECKED = "auth not required for this protocol"


class Dispatcher:
    def __init__(
        self,
        auth: AuthConfig,
        *,
        limits: LimitsConfig,
        metrics: Metrics,
        provider: AuthProvider | None = None,
    ) -> None:
        self.auth = auth
        self.metrics = metrics
        self._required = {p: bool(auth.protocols.get(p, True)) for p in Protocol}
        if provider is None:
            factory = find_provider(auth.provider)
            provider = factory(
                ProviderContext(auth=auth, limits=limits, invalidate_caches=self.invalidate, metrics=metrics)
            )
        # A provider answering in this process bounds its own waits (`InProcessAnswers`).
        in_process_wait = getattr(provider, "in_process_wait", None)
        in_process = isinstance(in_process_wait, (int, float)) and in_process_wait > 0
        # Timeouts, retries of transport errors and the circuit breaker wrap every
        # provider once, here; no provider carries its own copy.
        self.provider: AuthProvider = ResilientProvider(
            provider,
            name=auth.provider,
            timeout=auth.timeout,
            retries=auth.retries,
            breaker=auth.circuit_breaker,
            metrics=metrics,
            in_process=in_process,
        )
        # Bounds the whole call, retries and backoff included (each attempt has `timeout`);
        # in process, the provider's own bound and a second of grace for it to answer "busy" itself.
        self._call_budget = auth.timeout * (auth.retries + 1) + auth.retries * 1.0 + 0.5
        slot_wait = auth.timeout
        if in_process:
            self._call_budget = slot_wait = float(in_process_wait) + 1.0  # type: ignore[arg-type]
        # `CredentialScope`: unless the provider says otherwise, a CONNECT's answer may depend on the client.
        self._authn_per_client = bool(getattr(provider, "authentication_depends_on_client", True))
        self.login_limiter = FailedLoginLimiter(limits.failed_logins)
        self._authorize_now = getattr(provider, "authorize_now", None)
        self._client_scoped = bool(getattr(provider, "decisions_depend_on_client_id", False))
        # A key made at start: cache keys carry an HMAC of the secret, never the secret.
        self._hmac_key = secrets.token_bytes(32)
        size = auth.identity_cache_size
        self.identity_cache: TTLCache[tuple[Protocol, str], Identity] = TTLCache(
            "identity", maxsize=size, ttl=auth.identity_cache_ttl, jitter=0.0
        )
        stale = auth.stale_if_error
        authn_ttl, decision_ttl = auth.authn_cache_ttl, auth.decision_cache_ttl
        if auth.provider == "atom":
            # The atom section carries its own TTLs (DESIGN: auth.atom.*_cache_ttl).
            authn_ttl, decision_ttl = auth.atom.authn_cache_ttl, auth.atom.decision_cache_ttl
        self.authn_cache: TTLCache[Hashable, Decision] = TTLCache(
            "authn", maxsize=size, ttl=authn_ttl, keep_stale=stale
        )
        self.decision_cache: TTLCache[Hashable, Decision] = TTLCache(
            "decision", maxsize=size * 4, ttl=decision_ttl, keep_stale=stale
        )
        self.negative_cache: TTLCache[Hashable, Decision] = TTLCache(
            "negative", maxsize=size, ttl=auth.negative_cache_ttl
        )
        self._calls: Coalescer[Decision] = Coalescer.with_line(auth.max_inflight, wait_timeout=slot_wait)
        self._caching_decisions = self.decision_cache.ttl > 0 or self.negative_cache.ttl > 0
        self.stale_served = 0
        metrics.add_collector(
            cache_metrics(lambda: (self.identity_cache, self.authn_cache, self.decision_cache, self.negative_cache))
        )
        metrics.add_collector(self._collect)
        metrics.add_collector(self.login_limiter.collect)

    def _collect(self) -> Iterable[Metric]:
        for name, doc, value in (
            ("polygate_auth_coalesced_calls", "Auth requests that shared an identical in-flight call", self.coalesced),
            ("polygate_auth_shed_calls", "Auth misses refused: no call slot free within auth.timeout", self.shed),
            ("polygate_auth_waited_calls", "Auth misses that waited for a call slot (max_inflight busy)", self._calls.waited),
            ("polygate_auth_stale_served", "Expired allows served while the provider was unavailable", self.stale_served),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family
        outstanding = GaugeMetricFamily("polygate_auth_outstanding_calls", "Distinct auth calls in flight now")
        outstanding.add_metric([], self._calls.outstanding)
        yield outstanding
        waiting = GaugeMetricFamily("polygate_auth_waiting_calls", "Auth misses waiting for a call slot now")
        waiting.add_metric([], self._calls.waiting)
        yield waiting

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.provider.start()

    async def aclose(self) -> None:
        self._calls.cancel_all()
        await self.provider.aclose()

    @property
    def coalesced(self) -> int:
        return self._calls.coalesced

    @property
    def shed(self) -> int:
        return self._calls.shed

    def ready(self) -> bool:
        try:
            return bool(self.provider.ready())
        except Exception:
            log.exception("provider ready() failed")
            return False

    def requires_auth(self, protocol: Protocol) -> bool:
        return self._required[protocol]

    def invalidate(self) -> None:
        """Drop every cached answer (the provider's data changed). Identities stay."""
        self.authn_cache.clear()
        self.decision_cache.clear()
        self.negative_cache.clear()

    def forget(self, protocol: Protocol, client_id: str) -> None:
        """The client disconnected: its resolved identity is no longer needed."""
        self.identity_cache.pop((protocol, client_id))

    # -- the general path: one event in, one decision out ------------------------------------

    async def decide(self, event: AuthEvent) -> Decision:
        """Decide an event of a session protocol (its CONNECT, then its operations)."""
        if not self._required[event.protocol]:
            return self._unchecked(event)
        if event.action is Action.CONNECT:
            decision = await self._authenticate(event)
            if decision.outcome is Outcome.ALLOW and decision.identity is not None:
                self.identity_cache.put((event.protocol, event.client_id), decision.identity)
            self._record(event, decision, credentials_checked=True)
            return decision
        identity = self.identity_cache.get((event.protocol, event.client_id))
        if identity is None:
            # Evicted or expired while connected: check the credentials again (authn-cached).
            authn = await self._authenticate(event.for_operation(Action.CONNECT))
            if authn.outcome is not Outcome.ALLOW or authn.identity is None:
                self._record(event, authn, credentials_checked=True)
                return authn
            identity = authn.identity
            self.identity_cache.put((event.protocol, event.client_id), identity)
        decision = await self._authorize(event, identity)
        self._record(event, decision)
        return decision

    async def decide_stateless(self, event: AuthEvent) -> Decision:
        """Decide a request of a stateless protocol: authenticate, then authorize.

        A DENY with `identity` None means the credentials were refused; with an
        identity, the operation was not authorized.
        """
        if not self._required[event.protocol]:
            return self._unchecked(event)
        authn = await self._authenticate(event.for_operation(Action.CONNECT) if event.action is not Action.CONNECT else event)
        if authn.outcome is not Outcome.ALLOW or authn.identity is None or event.action is Action.CONNECT:
            self._record(event, authn, credentials_checked=True)
            return authn
        decision = await self._authorize(event, authn.identity)
        if decision.outcome is Outcome.DENY and decision.identity is None:
            decision = Decision(
                outcome=Outcome.DENY,
                reason=decision.reason,
                reason_code=decision.reason_code,
                identity=authn.identity,
            )
        self._record(event, decision)
        return decision

    def session(self, event: AuthEvent, identity: Identity) -> SessionAuth:
        """The fast handle a session protocol uses after its CONNECT was allowed."""
        return SessionAuth(self, event, identity)

    # -- internals ----------------------------------------------------------------------------

    def _unchecked(self, event: AuthEvent) -> Decision:
        identity = Identity(external_id=event.client_id or event.username, username=event.username)
        return Decision(outcome=Outcome.ALLOW, reason=_NOT_CHECKED, identity=identity)

    def secret_digest(self, secret: Secret) -> bytes:
        return hmac.new(self._hmac_key, secret.reveal(), hashlib.sha256).digest()

    def credentials_digest(self, username: str, secret: Secret) -> bytes:
        """An HMAC of (username, secret), length-prefixed so no two pairs share one input."""
        name = username.encode("utf-8", "surrogateescape")
        mac = hmac.new(self._hmac_key, len(name).to_bytes(4, "big"), hashlib.sha256)
        mac.update(name)
        mac.update(secret.reveal())
        return mac.digest()

    def _authn_key(self, event: AuthEvent) -> Hashable:
        digest = self.credentials_digest(event.username, event.secret)
        # The fingerprint too: two certificates with one CN are two credentials (Atom
        # resolves each on its own; one may be revoked or expired, the other not).
        if self._authn_per_client:
            return (event.protocol, event.client_id, event.username, event.tls_identity, event.tls_fingerprint, digest)
        # The same credentials from any connection or request: one check per TTL, not one each.
        return (event.username, event.tls_identity, event.tls_fingerprint, digest)

    async def _authenticate(self, event: AuthEvent) -> Decision:
        limiter = self.login_limiter
        source = source_ip(event.peer)
        # Before any cache: a locked-out guesser must not get free guesses against cached credentials.
        if limiter.enabled and limiter.refuse(source, event.username):
            return Decision.deny(LOCKED_REASON)
        key = self._authn_key(event)
        cached = self.authn_cache.get(key) if self.authn_cache.enabled else None
        if cached is not None:
            return cached
        if self.negative_cache.enabled:
            denied = self.negative_cache.get(key)
            if denied is not None:
                return denied
        decision = await self._coalesced("authn", key, lambda: self.provider.authenticate(event), self.authn_cache)
        if decision.outcome is Outcome.UNAVAILABLE:
            return self._stale_or(self.authn_cache, key, decision, event)
        if limiter.enabled:
            if decision.outcome is Outcome.DENY:
                limiter.failed(source, event.username)
            else:
                limiter.succeeded(event.username)
        return decision

    def _decision_key(
        self, identity: Identity, client_id: str, action: Action, topic: str
    ) -> tuple[str, str, Action, str]:
        # Keyed on the client id too when the provider's answers depend on it (`%c` ACLs).
        return (identity.external_id, client_id if self._client_scoped else "", action, topic)

    def decide_now(
        self, protocol: Protocol, action: Action, client_id: str, topic: str, identity: Identity
    ) -> Decision | None:
        """Answer from a cache or the provider's in-memory fast path, or None (then await)."""
        if not self._caching_decisions:
            # Nothing to look up or remember: straight to the provider's in-memory answer.
            return self._decide_in_memory(action, topic, client_id, identity)
        key = self._decision_key(identity, client_id, action, topic)
        if self.decision_cache.ttl > 0:
            decision = self.decision_cache.get(key)
            if decision is not None:
                return decision
        if self.negative_cache.ttl > 0:
            decision = self.negative_cache.get(key)
            if decision is not None:
                return decision
        decision = self._decide_in_memory(action, topic, client_id, identity)
        if decision is not None:
            self._remember(self.decision_cache, key, decision)
        return decision

    def _decide_in_memory(self, action: Action, topic: str, client_id: str, identity: Identity) -> Decision | None:
        if self._authorize_now is None:
            return None
        try:
            return self._authorize_now(action, topic, client_id, identity)
        except Exception:
            log.exception("provider fast path failed; asking authorize()")
            return None

    async def _authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        now = self.decide_now(event.protocol, event.action, event.client_id, event.topic, identity)
        if now is not None:
            return now
        key = self._decision_key(identity, event.client_id, event.action, event.topic)
        decision = await self._coalesced("authz", key, lambda: self.provider.authorize(event, identity),
                                         self.decision_cache)
        if decision.outcome is Outcome.UNAVAILABLE:
            return self._stale_or(self.decision_cache, key, decision, event)
        return decision

    def _stale_or(
        self, cache: TTLCache[Hashable, Decision], key: Hashable, unavailable: Decision, event: AuthEvent
    ) -> Decision:
        """`auth.stale_if_error`: an allow that expired recently still serves while the provider is down."""
        window = self.auth.stale_if_error
        if window <= 0:
            return unavailable
        stale = cache.get_stale(key, window)
        if stale is None or stale.outcome is not Outcome.ALLOW:
            return unavailable
        self.stale_served += 1
        log.warning(
            "serving a stale %s allow for client %r (%s): %s",
            event.action.value, event.client_id, event.protocol.value, unavailable.reason,
            extra={"event": "stale_allow", "client_id": event.client_id, "action": event.action.value},
        )
        return stale

    def _remember(self, cache: TTLCache[Hashable, Decision], key: Hashable, decision: Decision) -> None:
        """Cache an allow in `cache`, a denial in the negative cache; never an unavailable."""
        if decision.ttl == 0:
            return
        if decision.outcome is Outcome.ALLOW:
            if cache.enabled:
                cache.put(key, decision, decision.ttl)
        elif decision.outcome is Outcome.DENY and self.negative_cache.enabled:
            self.negative_cache.put(key, decision, decision.ttl)

    async def _coalesced(self, kind: str, key: Hashable, call: Callable[[], Awaitable[Decision]],
                         cache: TTLCache[Hashable, Decision]) -> Decision:
        """One call per (kind, key) at a time; its answer is cached by the call itself, so that
        from the moment the call is no longer in flight its answer is in the cache: a request
        arriving in between (before the callers awaiting it resume) finds one or the other."""

        async def call_and_remember() -> Decision:
            decision = await self._guarded(call)
            self._remember(cache, key, decision)
            return decision

        return await self._calls.run((kind, key), call_and_remember, overloaded=_overloaded)

    async def _guarded(self, call: Callable[[], Awaitable[Decision]]) -> Decision:
        try:
            async with asyncio.timeout(self._call_budget):
                decision = await call()
        except TimeoutError:
            return Decision.unavailable(f"auth provider did not answer within {self._call_budget:g}s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A crashing provider is a counted failure, not a crash, and never an allow.
            log.error("auth provider %s failed: %s: %s", self.auth.provider, type(exc).__name__, exc)
            return Decision.unavailable("auth provider error")
        if not isinstance(decision, Decision):
            log.error("auth provider %s returned %r, not a Decision", self.auth.provider, type(decision))
            return Decision.unavailable("auth provider error")
        return decision

    def _record(self, event: AuthEvent, decision: Decision, *, credentials_checked: bool = False) -> None:
        self.metrics.auth_decisions[(event.protocol, event.action, decision.outcome)] += 1
        username = event.username
        if credentials_checked and decision.outcome is not Outcome.ALLOW:
            # Refused credentials: the "username" may be a password typed into the wrong field.
            username = username_tag(username)
        _audit(event.protocol, event.action, event.client_id, username, event.topic, event.peer, decision)


def _overloaded() -> Decision:
    return Decision.unavailable("auth service overloaded: no call slot free in time")


def _audit(
    protocol: Protocol, action: Action, client_id: str, username: str, topic: str, peer: str, decision: Decision
) -> None:
    level = logging.INFO
    if decision.outcome is Outcome.ALLOW and action is not Action.CONNECT:
        level = logging.DEBUG
    if not audit.isEnabledFor(level):
        return
    audit.log(
        level,
        "%s %s %s client=%r user=%r topic=%r reason=%r",
        decision.outcome.value,
        protocol.value,
        action.value,
        client_id,
        username,
        topic,
        decision.reason,
        extra={
            "event": "auth_decision",
            "outcome": decision.outcome.value,
            "protocol": protocol.value,
            "action": action.value,
            "client_id": client_id,
            "username": username,
            "topic": topic,
            "peer": peer,
            "reason": decision.reason,
            "reason_code": decision.reason_code,
        },
    )



class SessionAuth:
    """Per-connection auth handle of a session protocol; built once at CONNECT.

    `publish_now` is the hot path: a dict lookup on a cache hit, the provider's
    in-memory answer otherwise, or None when the caller must `await publish()`.
    """

    __slots__ = ("_dispatcher", "_connect", "identity", "_required", "_metrics", "_protocol", "_client_id", "_allow",
                 "_publish_keys")

    def __init__(self, dispatcher: Dispatcher, connect: AuthEvent, identity: Identity) -> None:
        self._dispatcher = dispatcher
        self._connect = connect
        self.identity = identity
        self._protocol = connect.protocol
        self._client_id = connect.client_id
        self._required = dispatcher.requires_auth(connect.protocol)
        self._metrics = dispatcher.metrics.auth_decisions
        self._allow = Decision(outcome=Outcome.ALLOW, reason=_NOT_CHECKED, identity=identity)
        self._publish_keys = {outcome: (self._protocol, Action.PUBLISH, outcome) for outcome in Outcome}

    def publish_now(self, topic: str) -> Decision | None:
        if not self._required:
            return self._allow
        decision = self._dispatcher.decide_now(self._protocol, Action.PUBLISH, self._client_id, topic, self.identity)
        if decision is not None:
            self._metrics[self._publish_keys[decision.outcome]] += 1
            if decision.outcome is not Outcome.ALLOW or audit.isEnabledFor(logging.DEBUG):
                c = self._connect
                _audit(c.protocol, Action.PUBLISH, c.client_id, c.username, topic, c.peer, decision)
        return decision

    async def publish(self, topic: str) -> Decision:
        return await self._operation(Action.PUBLISH, topic)

    async def subscribe(self, topic_filter: str) -> Decision:
        return await self._operation(Action.SUBSCRIBE, topic_filter)

    async def _operation(self, action: Action, topic: str) -> Decision:
        if not self._required:
            return self._allow
        event = self._connect.for_operation(action, topic)
        decision = await self._dispatcher._authorize(event, self.identity)
        self._dispatcher._record(event, decision)
        return decision

    def close(self) -> None:
        self._dispatcher.forget(self._protocol, self._client_id)


