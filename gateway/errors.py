"""The small exception hierarchy of Polygate.

Every error a user can see carries a message they can act on. Protocol errors
carry a hint of which side caused them so a frontend can pick its close code.
"""

from __future__ import annotations

from collections.abc import Sequence


class PolygateError(Exception):
    """Base class of every error raised on purpose by Polygate."""


class ConfigError(PolygateError):
    """The configuration is invalid; `problems` lists every error with its key path."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  {p}" for p in self.problems))


class ProtocolError(PolygateError):
    """A peer sent something its protocol does not allow. Closes only that connection."""


class InvalidTopic(PolygateError):
    """A topic name or filter is not valid MQTT 3.1.1 syntax or breaks a limit."""


class StoreError(PolygateError):
    """The local user/ACL store refused an operation (unknown user, superuser delete...)."""


class ProviderError(PolygateError):
    """A provider could not be created or started (unknown name, bad settings)."""


class ProviderUnavailable(PolygateError):
    """A provider could not get an answer (connection refused, timeout, 5xx, bad body).

    `retryable` marks transport errors worth one more try (connection errors,
    timeouts, gRPC UNAVAILABLE/DEADLINE_EXCEEDED, HTTP 502/503/504). A denial is
    never an exception: it is a `Decision`.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class StorageError(PolygateError):
    """The durable store (`storage.*`) cannot be opened or used: the message says which path and why."""
