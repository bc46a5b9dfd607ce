"""What every frontend is constructed with: one object, the same for all protocols."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from gateway.config_types import GatewayConfig
from gateway.metrics import Metrics
from gateway.state import GatewayState
from gateway.store.base import Store
from gateway.store.memory import MemoryStore

if TYPE_CHECKING:
    from gateway.dispatcher import Dispatcher
    from gateway.ratelimit import RateLimits
    from gateway.router import Router


@dataclass(frozen=True, slots=True, kw_only=True)
class FrontendContext:
    config: GatewayConfig
    dispatcher: Dispatcher
    router: Router
    metrics: Metrics
    state: GatewayState
    ratelimits: RateLimits
    #: Where durable queues and sessions are kept (opened before any listener).
    store: Store = field(default_factory=MemoryStore)
