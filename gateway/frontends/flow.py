"""Pieces every stream frontend shares: admitting a connection, pausing reads, rate waits.

One copy here, so MQTT, AMQP 0.9.1 and AMQP 1.0 refuse, count and log the same
way and cannot drift apart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.events import Protocol
from gateway.ratelimit import TokenBucket
from gateway.state import Connection

log = logging.getLogger("polygate.frontend")


def admit(
    ctx: FrontendContext, listener: ListenerConfig, connection: Connection, protocol: Protocol, ip: str, peer: str
) -> bool:
    """Rate limit per source IP, then the listener's capacity. False: refused (counted, logged)."""
    if ctx.ratelimits.check_connection(ip) > 0:
        reason, why = "rate_limited", "rate limited"
    elif not ctx.state.register(listener.name, connection):
        reason, why = "max_connections", f"{listener.name} is full or stopping"
    else:
        ctx.metrics.connection_opened(protocol)
        return True
    ctx.metrics.connection_refused(protocol, reason)
    log.warning("%s connection from %s refused: %s", protocol.value, peer, why,
                extra={"event": "connection_refused", "peer": peer, "reason": reason})
    return False


class ReadPauses:
    """Why a connection stopped reading ("backlog", "ratelimit"); it reads again when none is left."""

    __slots__ = ("_transport", "_closed", "_reasons")

    def __init__(self, closed: Callable[[], bool]) -> None:
        self._transport: asyncio.Transport | None = None
        self._closed = closed
        self._reasons: set[str] = set()

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def __bool__(self) -> bool:
        return bool(self._reasons)

    def pause(self, reason: str) -> None:
        if not self._reasons and self._transport is not None and not self._closed():
            self._transport.pause_reading()
        self._reasons.add(reason)

    def resume(self, reason: str) -> None:
        reasons = self._reasons
        if reason in reasons:
            reasons.discard(reason)
            if not reasons and self._transport is not None and not self._closed():
                self._transport.resume_reading()

    async def wait_for_token(self, bucket: TokenBucket | None) -> None:
        """Wait for a rate-limit token with reading paused: a flooding client is slowed, not dropped."""
        if bucket is None:
            return
        wait = bucket.take()
        if wait <= 0:
            return
        self.pause("ratelimit")
        try:
            while wait > 0 and not self._closed():
                await asyncio.sleep(wait)
                wait = bucket.take()
        finally:
            self.resume("ratelimit")
