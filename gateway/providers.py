"""The provider interface every auth provider implements, and how one is found by name.

Providers know no protocol beyond what the event carries and keep no cache:
caching, coalescing and admission control wrap any provider from outside
(`gateway.dispatcher`). Two optional attributes tell the dispatcher how
(`InProcessAnswers`, `CredentialScope`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import importlib.util
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from gateway.errors import ProviderError
from gateway.events import Action, AuthEvent, Decision, Identity

if TYPE_CHECKING:
    from gateway.config_types import AuthConfig, LimitsConfig
    from gateway.metrics import Metrics

ENTRY_POINT_GROUP = "polygate.auth_providers"


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderContext:
    """What a provider may use besides its config."""

    auth: AuthConfig
    limits: LimitsConfig
    #: Call when the provider's own data changed (users, ACLs) so cached
    #: decisions are dropped; connected clients then see the change at once.
    invalidate_caches: Callable[[], None] = field(default=lambda: None)
    #: Where a provider exports metrics of its own (`metrics.add_collector`).
    metrics: Metrics | None = None


@runtime_checkable
class AuthProvider(Protocol):
    """One narrow interface: authenticate a connect, authorize a publish/subscribe."""

    async def start(self) -> None:
        """Open connections, load data. Must not fail because a remote service is down."""

    async def aclose(self) -> None:
        """Release everything `start` opened."""

    async def authenticate(self, event: AuthEvent) -> Decision:
        """Check the credentials of a CONNECT event. An allow carries the resolved Identity."""

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        """Decide a PUBLISH or SUBSCRIBE event for an authenticated identity."""

    def ready(self) -> bool:
        """True when the provider can answer (for `/ready`)."""


class SyncAuthorizer(Protocol):
    """Optional: providers that can decide in memory expose this fast path.

    It takes plain values rather than an `AuthEvent` because it runs per message
    and building an event costs more than the decision itself. Returning None
    means "ask `authorize`"; the dispatcher then awaits.

    A provider whose answers depend on the client id (e.g. `%c` in ACLs) sets the
    class attribute `decisions_depend_on_client_id = True` so the decision cache
    keys on it too.
    """

    def authorize_now(
        self, action: Action, topic: str, client_id: str, identity: Identity
    ) -> Decision | None: ...


class InProcessAnswers(Protocol):
    """Optional: a provider that answers from this process (memory, a local file, CPU work such as Argon2).

    `in_process_wait` is the longest a call may wait for the provider's own
    resources (e.g. its password-hashing pool) before the provider answers
    unavailable itself. The dispatcher then applies no `auth.timeout`, no
    retries and no circuit breaker to it: those are for remote services, and
    cutting a queued local check short would refuse clients the provider could
    still serve.
    """

    in_process_wait: float


class CredentialScope(Protocol):
    """Optional: `authentication_depends_on_client = False` when a provider's answer to a CONNECT
    depends only on the username, the secret and the certificate identity (not on the client id,
    protocol or peer). Successful checks are then cached across connections and requests, so an
    HTTP request without X-Client-ID or each AMQP 0.9.1 connection does not pay a fresh check.
    Unset (a remote service that may look at the client id): keyed per client, as before.
    """

    authentication_depends_on_client: bool


ProviderFactory = Callable[[ProviderContext], AuthProvider]

_BUILTIN: dict[str, str] = {
    "local": "auth_providers.local:LocalProvider",
    "none": "auth_providers.none:AllowAllProvider",
    "callout": "auth_providers.callout:CalloutProvider",
    "atom": "auth_providers.atom:AtomProvider",
}


def _load(target: str) -> ProviderFactory:
    module_name, _, attr = target.partition(":")
    module = __import__(module_name, fromlist=[attr])
    return getattr(module, attr)


def available_providers() -> set[str]:
    """Built-in providers whose module is present, and every registered plug-in."""
    names = {name for name, target in _BUILTIN.items() if importlib.util.find_spec(target.partition(":")[0])}
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return names


def find_provider(name: str) -> ProviderFactory:
    """The factory registered under `name`: built-ins first, then the entry-point group."""
    if name in _BUILTIN and name in available_providers():
        return _load(_BUILTIN[name])
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name == name:
            try:
                return ep.load()
            except Exception as exc:  # a broken third-party plugin must say so clearly
                raise ProviderError(f"auth provider {name!r} failed to load: {exc}") from exc
    raise ProviderError(
        f"unknown auth provider {name!r}; available: {', '.join(sorted(available_providers()))}"
    )
