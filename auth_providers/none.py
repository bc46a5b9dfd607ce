"""Provider `none`: every client may do everything. For local experiments only."""

from __future__ import annotations

import logging

from gateway.events import Action, AuthEvent, Decision, Identity
from gateway.providers import ProviderContext

log = logging.getLogger("polygate.auth.none")

_ALLOW = Decision.allow()


class AllowAllProvider:
    def __init__(self, context: ProviderContext) -> None:
        self._context = context
        self._started = False

    async def start(self) -> None:
        log.warning("auth provider 'none': every client is allowed to do everything; never use this in production")
        self._started = True

    async def aclose(self) -> None:
        self._started = False

    async def authenticate(self, event: AuthEvent) -> Decision:
        return Decision.allow(Identity(external_id=event.client_id or event.username, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return _ALLOW

    def authorize_now(self, action: Action, topic: str, client_id: str, identity: Identity) -> Decision | None:
        return _ALLOW

    def ready(self) -> bool:
        return self._started
