"""Password checks of provider `local`: Argon2id on a fair pool, with the configured parameters.

Every check waits its turn on a `FairPool` sized to the cores, up to
`auth.local.max_wait`; the provider turns `PoolBusy` into "unavailable" (MQTT
0x03, HTTP 503). The wait is the provider's own bound: `auth.timeout` and the
circuit breaker are for remote services and do not apply to it.

`auth.local.argon2` sets the parameters of the hashes made here: the dummy hash
an unknown username is checked against (so it costs what a real check costs),
and the re-hash of a user whose stored hash was made with other parameters,
done after that user's first successful login. The re-hash is kept in memory
(keyed on the stored hash, so a password change drops it) and written back to
the store by `persist`, compare-and-set, so the next start checks it too.
"""

from __future__ import annotations

import secrets
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from argon2 import PasswordHasher, Type
from argon2.exceptions import InvalidHashError

from auth_providers.fair_pool import FairPool, core_count
from auth_providers.local_store import verify_password
from gateway.config_types import Argon2Config
from gateway.events import Secret
from gateway.login_limiter import source_ip

T = TypeVar("T")

log = logging.getLogger("polygate.auth.local")

#: Writes a re-hash back: (username, stored hash, new hash) -> stored (False: the hash changed meanwhile).
PersistRehash = Callable[[str, str, str], Awaitable[bool]]

#: Users whose re-hashed verifier is kept; beyond this the oldest is dropped.
MAX_UPGRADED = 100_000


def password_hasher(params: Argon2Config) -> PasswordHasher:
    return PasswordHasher(
        time_cost=params.time,
        memory_cost=max(8 * params.parallelism, params.memory // 1024),
        parallelism=params.parallelism,
        type=Type.ID,
    )


class PasswordChecker:
    def __init__(self, params: Argon2Config, *, max_wait: float, workers: int = 0,
                 persist: PersistRehash | None = None) -> None:
        self.hasher = password_hasher(params)
        self._persist = persist
        #: Re-hashes written back to the store.
        self.rehashes_stored = 0
        self.pool = FairPool(workers or core_count(), max_wait=max_wait, name="polygate-argon2")
        self._dummy_hash = ""
        #: username -> (the stored hash, the same password hashed with the configured parameters).
        self._upgraded: dict[str, tuple[str, str]] = {}
        #: Argon2 verifications run (a flood's cost, and what the authn cache saves).
        self.verifications = 0

    async def start(self) -> None:
        self._dummy_hash = await self.pool.run("", lambda: self.hasher.hash(secrets.token_bytes(16)))

    def shutdown(self) -> None:
        self.pool.shutdown()
        self._upgraded.clear()

    async def run(self, work: Callable[[], T]) -> T:
        """Other hashing work (not a login), in turn with everyone else's."""
        return await self.pool.run("", work)

    async def check(self, username: str, stored_hash: str | None, secret: Secret, *, peer: str) -> bool:
        """True when `secret` is the password of a user whose hash is `stored_hash` (None: no such user).

        Raises `PoolBusy` when no worker was free within max_wait.
        """
        phc = stored_hash or self._dummy_hash
        upgraded = self._upgraded.get(username) if stored_hash else None
        if upgraded is not None and upgraded[0] == stored_hash:
            phc = upgraded[1]
        source = source_ip(peer)
        matched = await self.pool.run(source, lambda: verify_password(phc, secret))
        self.verifications += 1
        if not matched or stored_hash is None:
            return False
        if phc is stored_hash and self._needs_rehash(stored_hash):
            new_hash = await self.pool.run(source, lambda: self.hasher.hash(secret.reveal()))
            if len(self._upgraded) >= MAX_UPGRADED:
                del self._upgraded[next(iter(self._upgraded))]
            self._upgraded[username] = (stored_hash, new_hash)
            await self._store_rehash(username, stored_hash, new_hash)
        return True

    async def _store_rehash(self, username: str, stored_hash: str, new_hash: str) -> None:
        if self._persist is None:
            return
        try:
            if await self._persist(username, stored_hash, new_hash):
                self.rehashes_stored += 1
        except Exception as exc:
            # Logins go on with the verifier in memory; the store is tried again after a restart.
            log.warning("could not store %r's password hash with the configured Argon2 parameters: %s", username, exc)

    def _needs_rehash(self, phc: str) -> bool:
        try:
            return self.hasher.check_needs_rehash(phc)
        except (InvalidHashError, ValueError):
            return False
