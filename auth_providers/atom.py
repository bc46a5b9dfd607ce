"""Provider `atom`: ask an Atom identity and authorization service directly over gRPC.

The protocol is Atom's as the upstream service speaks it (`protos/atom/v1/
atom.proto`, DESIGN.md "Wire contracts of the providers"):

- Connect: MQTT sends its username and password as a credential
  (`AuthService.AuthenticateCredential`, kind "password"); every other protocol
  sends its password, bearer token or `authorization` value as a token
  (`AuthService.Authenticate`, a leading `Bearer ` stripped). The identity is
  Atom's entity id and tenant id.
- Connect with a verified client certificate and no password or token (mTLS):
  `CertificateService.ResolveCertificate` with the certificate's serial number
  and SHA-256 fingerprint, in the forms Atom stores them (`gateway.frontends.
  peers`). An entity is the identity; NOT_FOUND (unknown, revoked, expired,
  another certificate with that serial) is a denial, and so is an answer whose
  `expires_at` has passed: Atom's clock or a lenient Atom is not trusted for
  it. An allow is cached until at most `expires_at`. A password or token sent
  beside a certificate takes the credential path above instead: the
  certificate only secured the transport.
- Publish/subscribe: topics `m/<tenant>/c/<channel>[/...]` (`atom_topics`).
  Aliases are resolved by `AliasService.ResolveAlias`, one call per alias per
  `alias_cache_ttl` (concurrent identical lookups share one call); a topic of
  another tenant is denied without asking Atom for a decision; the rest is one
  `AuthzService.Check` on the channel. Topics outside the format follow
  `unsupported_topic_policy`.

Every call carries the service token (`authorization: Bearer <token>` from the
environment variable `auth.atom.service_token_env`) and the deadline
`auth.timeout`. Outcomes are the callout's: UNAUTHENTICATED, PERMISSION_DENIED
and INVALID_ARGUMENT (and NOT_FOUND from ResolveAlias and ResolveCertificate)
are denials; any other status or a connection error raises `ProviderUnavailable`
and the dispatcher's `gateway.resilience` layer turns it into retries, the
circuit breaker and an unavailable answer. Authn and decision caching are the dispatcher's
(`auth.atom.authn_cache_ttl`, `decision_cache_ttl`); only the alias cache,
which maps public names and no decision, lives here.

Readiness: `ready()` is False until Atom has answered: the gRPC channel is
connected (the provider starts connecting at `start` and each `/ready` probe
nudges it), or the last call got an answer and the channel is only idle or
reconnecting. `start` never waits for Atom, so the gateway starts while Atom is
down, reports not ready and fails closed.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import grpc
import grpc.aio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from auth_providers.atom_topics import (
    OBJECT_KIND,
    AliasLookup,
    Refused,
    Unsupported,
    alias_lookup,
    check_context,
    parse_topic,
    same_id,
)
from auth_providers.callout import scrub
from auth_providers.callout_grpc import DENIAL_CODES, RETRYABLE_CODES, channel_options
from auth_providers.proto.atom.v1 import atom_pb2, atom_pb2_grpc
from gateway.cache import TTLCache
from gateway.coalescing import Coalescer
from gateway.errors import ProviderError, ProviderUnavailable
from gateway.events import NO_SECRET, Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.providers import ProviderContext

log = logging.getLogger("polygate.auth.atom")

#: The credential kind MQTT's username/password are sent as.
PASSWORD_KIND: Final = "password"
_BEARER: Final = "bearer "
_ACTIONS: Final = {Action.PUBLISH: "publish", Action.SUBSCRIBE: "subscribe"}
#: Methods whose NOT_FOUND means "no such thing" (a denial), not a missing service.
_NOT_FOUND_DENIES: Final = frozenset({"ResolveAlias", "ResolveCertificate"})
#: An allow that ends at `expires_at` is cached for at most this share of the time left:
#: the dispatcher's caches add up to +10% jitter to a TTL (`gateway.cache`).
_EXPIRY_CACHE_SHARE: Final = 0.9


@dataclass(frozen=True, slots=True)
class _Resolved:
    """What `ResolveAlias` answered."""

    tenant_id: str
    object_id: str


def utf8(secret: Secret) -> str | None:
    """The secret as text, or None when it is not UTF-8 (the wire carries proto strings)."""
    try:
        return secret.reveal().decode("utf-8")
    except UnicodeDecodeError:
        return None


def bearer_token(secret: Secret) -> str:
    """The token in a password, bearer value or `authorization` value ("" when there is none)."""
    text = utf8(secret)
    if text is None:
        return ""
    text = text.lstrip()
    if text[: len(_BEARER)].lower() == _BEARER:
        text = text[len(_BEARER) :]
    return text.strip()


def certificate_expiry(expires_at: str) -> datetime.datetime | None:
    """`ResolveCertificateResponse.expires_at` (RFC 3339) as an aware datetime; None when empty.

    An offset-less time is taken as UTC, as Atom keeps every time. Raises
    ValueError for text that is not a time.
    """
    if not expires_at:
        return None
    moment = datetime.datetime.fromisoformat(expires_at.strip())
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    return moment


def _service_token(env_name: str) -> Secret:
    value = os.environ.get(env_name, "") if env_name else ""
    if not value:
        raise ProviderError(
            f"auth.atom.service_token_env: environment variable {env_name or '(none)'} is not set or empty "
            "(Atom needs a service token)"
        )
    if not value.isascii() or not value.isprintable():
        raise ProviderError(
            f"auth.atom.service_token_env: the token in {env_name} must be printable ASCII (it is sent as gRPC metadata)"
        )
    return Secret(value)


class AtomProvider:
    #: Check carries no client id: the answer is the same for every client of an entity.
    decisions_depend_on_client_id = False

    def __init__(self, context: ProviderContext) -> None:
        auth = context.auth
        atom = auth.atom
        if not atom.grpc_addr:
            raise ProviderError("auth.atom.grpc_addr: required when auth.provider is atom")
        if atom.topic_format != "magistrala":
            raise ProviderError(f"auth.atom.topic_format: only magistrala is supported (got {atom.topic_format!r})")
        self._token = _service_token(atom.service_token_env)
        self._token_env = atom.service_token_env
        self._target = atom.grpc_addr
        self._secure = not atom.insecure
        self._ca_file = atom.ca_file
        self._timeout = auth.timeout
        self._options = channel_options(auth.circuit_breaker.open_for)
        self._allow_unsupported = atom.unsupported_topic_policy == "allow"
        self.alias_cache: TTLCache[AliasLookup, _Resolved] = TTLCache(
            "atom_alias", maxsize=auth.identity_cache_size, ttl=atom.alias_cache_ttl
        )
        self._alias_calls: Coalescer[_Resolved | Decision | ProviderUnavailable] = Coalescer.with_line(
            auth.max_inflight, wait_timeout=auth.timeout
        )
        self._channel: grpc.aio.Channel | None = None
        self._authn: Any = None
        self._authz: Any = None
        self._aliases: Any = None
        self._certificates: Any = None
        #: The last call got an answer from Atom (for `ready`).
        self._answered = False
        #: (method, outcome) -> calls made to Atom.
        self.calls: defaultdict[tuple[str, Outcome], int] = defaultdict(int)
        if context.metrics is not None:
            context.metrics.add_collector(self._collect)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        # Creating a channel connects lazily: this succeeds while Atom is down.
        if self._secure:
            credentials = grpc.ssl_channel_credentials(root_certificates=self._read_ca())
            channel = grpc.aio.secure_channel(self._target, credentials, options=self._options)
        else:
            channel = grpc.aio.insecure_channel(self._target, options=self._options)
        self._channel = channel
        self._authn = atom_pb2_grpc.AuthServiceStub(channel)
        self._authz = atom_pb2_grpc.AuthzServiceStub(channel)
        self._aliases = atom_pb2_grpc.AliasServiceStub(channel)
        self._certificates = atom_pb2_grpc.CertificateServiceStub(channel)
        # Start connecting now, so /ready turns green before the first client comes.
        channel.get_state(try_to_connect=True)
        log.info(
            "auth provider 'atom': gRPC to %s (%s), service token from $%s, timeout %gs",
            self._target, "TLS" if self._secure else "plaintext", self._token_env, self._timeout,
        )

    async def aclose(self) -> None:
        self._alias_calls.cancel_all()
        channel, self._channel = self._channel, None
        self._authn = self._authz = self._aliases = self._certificates = None
        if channel is not None:
            await channel.close()

    def ready(self) -> bool:
        channel = self._channel
        if channel is None:
            return False
        state = channel.get_state(try_to_connect=True)
        if state is grpc.ChannelConnectivity.READY:
            return True
        # An idle channel (no call for a while) reconnects on the next call.
        return self._answered and state in (grpc.ChannelConnectivity.IDLE, grpc.ChannelConnectivity.CONNECTING)

    # -- the provider interface ------------------------------------------------------------------

    async def authenticate(self, event: AuthEvent) -> Decision:
        if event.tls_fingerprint and not event.secret:
            return await self._authenticate_certificate(event)
        if event.protocol is Protocol.MQTT:
            secret = utf8(event.secret)
            if not event.username or not secret:
                return Decision.deny("Atom needs the credential identifier as username and the secret as password")
            request: Any = atom_pb2.AuthenticateCredentialRequest(
                identifier=event.username, secret=secret, kind=PASSWORD_KIND
            )
            rpc = self._stub(self._authn).AuthenticateCredential
            result = await self._call("AuthenticateCredential", rpc, request, event.secret)
        else:
            token = bearer_token(event.secret)
            if not token:
                return Decision.deny("Atom needs a token (password, bearer token or authorization value)")
            request = atom_pb2.AuthenticateRequest(token=token)
            result = await self._call("Authenticate", self._stub(self._authn).Authenticate, request, event.secret)
        if isinstance(result, Decision):
            return result
        if not result.entity_id:
            return Decision.deny("Atom answered no entity id")
        return Decision.allow(Identity(external_id=result.entity_id, tenant=result.tenant_id, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        action = _ACTIONS.get(event.action)
        if action is None:
            return Decision.deny(f"Atom decides publish and subscribe, not {event.action.value}")
        is_filter = event.action is Action.SUBSCRIBE
        parsed = parse_topic(event.topic, is_filter=is_filter)
        if isinstance(parsed, Refused):
            return Decision.deny(parsed.reason)
        if isinstance(parsed, Unsupported):
            if self._allow_unsupported:
                return Decision.allow(identity, reason="topic outside the magistrala format (unsupported_topic_policy: allow)")
            return Decision.deny("topic outside the magistrala format (unsupported_topic_policy: deny)")
        route = parsed
        if route.tenant_is_id and not same_id(route.tenant, identity.tenant):
            return Decision.deny("the topic's tenant is not the client's tenant")
        lookup = alias_lookup(route)
        if lookup is None:
            channel_id = route.channel.lower()
        else:
            resolved = await self._resolve(lookup, event.secret)
            if isinstance(resolved, Decision):
                return resolved
            if not same_id(resolved.tenant_id or lookup.tenant_id, identity.tenant):
                return Decision.deny("the topic's tenant is not the client's tenant")
            if not resolved.object_id:
                return Decision.deny("Atom resolved the channel alias to no id")
            channel_id = resolved.object_id
        request = atom_pb2.CheckRequest(
            subject_id=identity.external_id,
            action=action,
            object_kind=OBJECT_KIND,
            object_id=channel_id,
            context=check_context(route, protocol=event.protocol.value, is_filter=is_filter),
        )
        result = await self._call("Check", self._stub(self._authz).Check, request, event.secret)
        if isinstance(result, Decision):
            return result
        reason = scrub(result.reason, event.secret)
        if result.allowed:
            return Decision.allow(identity, reason=reason)
        return Decision.deny(reason or "not authorized by Atom")

    # -- internals -------------------------------------------------------------------------------

    async def _authenticate_certificate(self, event: AuthEvent) -> Decision:
        request = atom_pb2.ResolveCertificateRequest(
            serial_number=event.tls_serial, fingerprint_sha256=event.tls_fingerprint
        )
        rpc = self._stub(self._certificates).ResolveCertificate
        result = await self._call("ResolveCertificate", rpc, request, NO_SECRET)
        if isinstance(result, Decision):
            return result
        if not result.entity_id:
            return Decision.deny("Atom resolved the certificate to no entity id")
        try:
            expiry = certificate_expiry(result.expires_at)
        except ValueError:
            # An answer that does not parse is the service misbehaving, not a "no" (DESIGN: outcomes).
            raise ProviderUnavailable(
                f"Atom ResolveCertificate answered an expires_at that is not an RFC 3339 time: {result.expires_at[:64]!r}",
                retryable=False,
            ) from None
        identity = Identity(external_id=result.entity_id, tenant=result.tenant_id, username=event.tls_identity)
        if expiry is None:
            return Decision.allow(identity, reason="certificate resolved by Atom")
        left = (expiry - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        if left <= 0:
            return Decision.deny(f"Atom's mapping of this certificate expired at {result.expires_at[:64]}")
        return Decision(
            outcome=Outcome.ALLOW, identity=identity, reason="certificate resolved by Atom",
            ttl=left * _EXPIRY_CACHE_SHARE,
        )

    async def _resolve(self, lookup: AliasLookup, secret: Secret) -> _Resolved | Decision:
        cached = self.alias_cache.get(lookup)
        if cached is not None:
            return cached
        # The lookup runs in the coalescer's own task and reports failures as
        # values, so a caller that went away leaves no unretrieved exception.
        answer = await self._alias_calls.run(lookup, lambda: self._resolve_call(lookup), overloaded=_alias_overloaded)
        if isinstance(answer, ProviderUnavailable):
            raise ProviderUnavailable(scrub(str(answer), secret), retryable=answer.retryable)
        return answer

    async def _resolve_call(self, lookup: AliasLookup) -> _Resolved | Decision | ProviderUnavailable:
        request = atom_pb2.ResolveAliasRequest(
            tenant_id=lookup.tenant_id,
            tenant_alias=lookup.tenant_alias,
            object_kind=lookup.object_kind,
            object_alias=lookup.object_alias,
        )
        try:
            result = await self._call("ResolveAlias", self._stub(self._aliases).ResolveAlias, request, NO_SECRET)
        except ProviderUnavailable as exc:
            return exc
        if isinstance(result, Decision):
            return result
        resolved = _Resolved(tenant_id=result.tenant_id, object_id=result.object_id)
        if resolved.object_id:
            self.alias_cache.put(lookup, resolved)
        return resolved

    def _stub(self, stub: Any) -> Any:
        if stub is None:
            raise ProviderUnavailable("auth provider 'atom' is not started")
        return stub

    async def _call(self, method: str, rpc: Any, request: Any, secret: Secret) -> Any:
        """The response message, or a denial `Decision` for a status that means "no"."""
        metadata = (("authorization", f"Bearer {self._token.reveal_str()}"),)
        try:
            response = await rpc(request, timeout=self._timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            return self._failed(method, exc.code(), exc.details() or "", secret)
        except grpc.RpcError as exc:  # e.g. the channel was closed under the call
            self._answered = False
            self.calls[(method, Outcome.UNAVAILABLE)] += 1
            raise ProviderUnavailable(f"Atom {method} failed: {scrub(str(exc), secret)}", retryable=True) from None
        self._answered = True
        granted = not (method == "Check" and not response.allowed)
        self.calls[(method, Outcome.ALLOW if granted else Outcome.DENY)] += 1
        return response

    def _failed(self, method: str, code: grpc.StatusCode, details: str, secret: Secret) -> Decision:
        details = scrub(self._without_token(details), secret)
        if code in DENIAL_CODES or (code is grpc.StatusCode.NOT_FOUND and method in _NOT_FOUND_DENIES):
            self._answered = True
            self.calls[(method, Outcome.DENY)] += 1
            return Decision.deny(f"Atom {method}: {details or code.name}")
        self._answered = False
        self.calls[(method, Outcome.UNAVAILABLE)] += 1
        suffix = f": {details}" if details else ""
        raise ProviderUnavailable(f"Atom answered {method} with {code.name}{suffix}", retryable=code in RETRYABLE_CODES)

    def _without_token(self, text: str) -> str:
        token = self._token.reveal_str()
        return text.replace(token, "***") if token else text

    def _read_ca(self) -> bytes | None:
        if not self._ca_file:
            return None
        try:
            return Path(self._ca_file).read_bytes()
        except OSError as exc:
            raise ProviderError(f"auth.atom.ca_file: cannot read {self._ca_file}: {exc.strerror}") from exc

    def _collect(self) -> Iterable[Metric]:
        calls = CounterMetricFamily(
            "polygate_atom_calls", "Calls to Atom by method and outcome", labels=["method", "outcome"]
        )
        for (method, outcome), count in sorted(self.calls.items(), key=lambda item: (item[0][0], item[0][1].value)):
            calls.add_metric([method, outcome.value], count)
        hits = CounterMetricFamily("polygate_atom_alias_cache_hits", "Alias lookups answered by the alias cache")
        hits.add_metric([], self.alias_cache.hits)
        misses = CounterMetricFamily("polygate_atom_alias_cache_misses", "Alias lookups the alias cache missed")
        misses.add_metric([], self.alias_cache.misses)
        size = GaugeMetricFamily("polygate_atom_alias_cache_size", "Entries in the alias cache")
        size.add_metric([], len(self.alias_cache))
        return [calls, hits, misses, size]


def _alias_overloaded() -> ProviderUnavailable:
    return ProviderUnavailable("too many Atom alias lookups in flight", retryable=False)
