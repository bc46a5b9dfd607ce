"""The one internal auth event and the decision a provider returns.

Every connect, publish and subscribe on every protocol becomes an `AuthEvent`;
the dispatcher answers with a `Decision`. Secrets travel in `Secret`, whose repr
is redacted so no log line or traceback can print one.
"""

from __future__ import annotations

import dataclasses
import enum
import hmac
from dataclasses import dataclass


class _IdentityEnum(enum.Enum):
    """Members are singletons compared by identity: hash them by identity too.

    Enum's own __hash__ hashes the member name in Python, and these enums key
    counters on every message.
    """

    __hash__ = object.__hash__


class Protocol(_IdentityEnum):
    MQTT = "mqtt"
    HTTP = "http"
    COAP = "coap"
    AMQP = "amqp"  # AMQP 1.0
    AMQP091 = "amqp091"


class Action(_IdentityEnum):
    CONNECT = "connect"
    PUBLISH = "publish"
    SUBSCRIBE = "subscribe"


class Outcome(_IdentityEnum):
    ALLOW = "allow"
    DENY = "deny"
    #: The provider could not answer (down, timeout, open breaker). Never an allow.
    UNAVAILABLE = "unavailable"


class Secret:
    """A password or token. `repr`/`str` never show the value; compare in constant time."""

    __slots__ = ("_value",)

    def __init__(self, value: str | bytes) -> None:
        if isinstance(value, str):
            value = value.encode("utf-8", "surrogateescape")
        self._value = bytes(value)

    def reveal(self) -> bytes:
        """The raw secret, for the one place that must send or verify it."""
        return self._value

    def reveal_str(self) -> str:
        return self._value.decode("utf-8", "replace")

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        # Secrets must never be used as dict keys: cache keys use an HMAC instead.
        raise TypeError("Secret is not hashable; key caches by an HMAC of the secret")

    def __repr__(self) -> str:
        return "Secret('***')" if self._value else "Secret('')"

    __str__ = __repr__

    def __reduce__(self) -> object:
        raise TypeError("Secret cannot be pickled")


NO_SECRET = Secret(b"")


@dataclass(frozen=True, slots=True, kw_only=True)
class Identity:
    """Who a client turned out to be: the id used in every later authorization."""

    external_id: str
    tenant: str = ""
    username: str = ""
    superuser: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthEvent:
    protocol: Protocol
    action: Action
    client_id: str
    username: str = ""
    secret: Secret = NO_SECRET
    #: Topic name for PUBLISH, topic filter (as written) for SUBSCRIBE, "" for CONNECT.
    topic: str = ""
    #: "ip:port" of the peer, for logs and rate limits.
    peer: str = ""
    #: Subject of a verified client certificate (mTLS), "" otherwise.
    tls_identity: str = ""
    #: That certificate's serial number (lowercase hex of the DER INTEGER, as Atom
    #: stores it) and SHA-256 fingerprint of its DER (lowercase hex); "" without one.
    #: Not secrets: a certificate is public, so both may appear in reprs and logs.
    tls_serial: str = ""
    tls_fingerprint: str = ""

    def for_operation(self, action: Action, topic: str = "") -> AuthEvent:
        """The same client's event for another action (a CONNECT carries no topic)."""
        return dataclasses.replace(self, action=action, topic=topic)

    def __post_init__(self) -> None:
        if self.action is Action.CONNECT:
            if self.topic:
                raise ValueError("a CONNECT event has no topic")
        elif not self.topic:
            raise ValueError(f"a {self.action.value} event needs a topic")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    outcome: Outcome
    reason: str = ""
    identity: Identity | None = None
    #: Provider-specific code (callout `reason_code`), for the audit log only.
    reason_code: int = 0
    #: Seconds the provider wants this answer cached (None: use the configured TTL).
    ttl: float | None = None
    #: A granted subscription's exclusions: topic filters (parts of the filter a
    #: deny rule covers) whose messages it must not receive. Applied per message
    #: at delivery; empty for everything but a partly denied subscription.
    exclusions: tuple[str, ...] = ()

    @property
    def allowed(self) -> bool:
        return self.outcome is Outcome.ALLOW

    @staticmethod
    def allow(identity: Identity | None = None, reason: str = "", exclusions: tuple[str, ...] = ()) -> Decision:
        return Decision(outcome=Outcome.ALLOW, identity=identity, reason=reason, exclusions=exclusions)

    @staticmethod
    def deny(reason: str, reason_code: int = 0) -> Decision:
        return Decision(outcome=Outcome.DENY, reason=reason, reason_code=reason_code)

    @staticmethod
    def unavailable(reason: str) -> Decision:
        return Decision(outcome=Outcome.UNAVAILABLE, reason=reason)
