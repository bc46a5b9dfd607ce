"""Provider `local`: users and ACL entries from an SQLite file managed by `polygate users/acl`.

Authorization is answered from an in-memory snapshot, with no I/O, so it also
offers the synchronous fast path `authorize_now`. A background task notices
changes made by the CLI (or another process) within one poll interval, reloads
the snapshot and asks the dispatcher to drop its cached answers.

Password checks (Argon2id, ~20-40 ms) run on a pool sized to the cores, taken
in turns by source IP, never on the event loop (`password_checks`); a check
waits up to `auth.local.max_wait` and is then answered "busy", never cut short
by `auth.timeout`. An unknown username is checked against a dummy hash so the
answer takes as long as for a wrong password.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from auth_providers.acl import AclChecker, AclEntry, AllowAll, CompiledAcl, DenyAll
from auth_providers.fair_pool import PoolBusy, PoolClosed
from auth_providers.local_store import ANONYMOUS, LocalStore, StoreSnapshot, UserRecord, certificate_user
from auth_providers.password_checks import PasswordChecker
from gateway.errors import ProviderError, StoreError
from gateway.events import Action, AuthEvent, Decision, Identity, Secret
from gateway.providers import ProviderContext

log = logging.getLogger("polygate.auth.local")

BAD_CREDENTIALS = "bad username or password"
BUSY = "auth provider 'local' is busy: no password check could start within auth.local.max_wait"
ANONYMOUS_IDENTITY = Identity(external_id=ANONYMOUS, username=ANONYMOUS)
DEFAULT_ROOT_USERNAME = "root"
#: Compiled ACLs kept per (user, client id); cleared at every reload.
MAX_COMPILED_ACLS = 10_000
_NOT_STARTED = "auth provider 'local' is not started"
_ALLOW_ALL = AllowAll()

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True, kw_only=True)
class _View:
    """A snapshot of the store, indexed for lookups."""

    revision: int
    users: Mapping[str, UserRecord]
    entries: Mapping[str, tuple[AclEntry, ...]]
    #: Users by certificate identity.
    certificates: Mapping[str, UserRecord]

    @staticmethod
    def of(snapshot: StoreSnapshot) -> _View:
        entries: dict[str, list[AclEntry]] = {}
        for entry in snapshot.acl:
            entries.setdefault(entry.username, []).append(entry)
        return _View(
            revision=snapshot.revision,
            users=snapshot.users,
            entries=MappingProxyType({name: tuple(rows) for name, rows in entries.items()}),
            certificates=snapshot.certificates,
        )


class LocalProvider:
    #: `%c` in ACL entries: the dispatcher keys cached decisions on the client id too.
    decisions_depend_on_client_id = True
    #: Seconds between two checks of the store's revision.
    poll_interval: float = 0.5
    #: A CONNECT's answer depends on the username, password and certificate only: cached across connections.
    authentication_depends_on_client = False

    def __init__(self, context: ProviderContext) -> None:
        self._context = context
        self._config = context.auth.local
        self._store: LocalStore | None = None
        # One thread owns the SQLite connection; a pool sized to the cores verifies passwords.
        self._store_executor: ThreadPoolExecutor | None = None
        self._passwords: PasswordChecker | None = None
        #: Answers come from this process: the dispatcher applies no auth.timeout and no breaker.
        self.in_process_wait = self._config.max_wait
        if context.metrics is not None:
            context.metrics.add_collector(self._collect_password_checks)
        self._view: _View | None = None
        self._compiled: dict[tuple[str, str], AclChecker] = {}
        self._watch_task: asyncio.Task[None] | None = None

    # -- lifecycle ------------------------------------------------------------

    async def start(self) -> None:
        self._store_executor = ThreadPoolExecutor(1, thread_name_prefix="polygate-local-store")
        self._passwords = PasswordChecker(self._config.argon2, max_wait=self._config.max_wait,
                                          persist=self._store_rehash)
        path = self._config.db
        try:
            self._store = await self._in_store_thread(lambda: LocalStore(path))
            await self._bootstrap_root()
            await self._passwords.start()
            snapshot = await self._in_store_thread(self._store.snapshot)
        except StoreError as exc:
            await self.aclose()
            raise ProviderError(f"auth provider 'local': {exc}") from exc
        except BaseException:
            await self.aclose()
            raise
        self._apply(snapshot)
        self._watch_task = asyncio.get_running_loop().create_task(self._watch(), name="polygate-local-store-watch")
        log.info(
            "auth provider 'local': %d users and %d ACL entries from %s",
            len(snapshot.users),
            len(snapshot.acl),
            path,
        )

    async def aclose(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._view = None
        self._compiled = {}
        store, self._store = self._store, None
        if store is not None and self._store_executor is not None:
            await self._in_store_thread(store.close)
        if self._store_executor is not None:
            self._store_executor.shutdown(wait=False, cancel_futures=True)
        if self._passwords is not None:
            self._passwords.shutdown()
        self._store_executor = self._passwords = None

    def ready(self) -> bool:
        return self._view is not None

    async def _bootstrap_root(self) -> None:
        """Create the first superuser.

        With a password in the environment, that user (default `root`) is
        created whenever it is missing, so a deployment can always rely on it;
        an existing user is never changed (its password may since have been
        changed with `users passwd`). Without one, an empty database gets
        `root` with a random password, shown once.
        """
        store = self._store
        assert store is not None
        username = os.environ.get(self._config.root_username_env, "") or DEFAULT_ROOT_USERNAME
        given = os.environ.get(self._config.root_password_env, "")
        if given:
            existing = await self._in_store_thread(lambda: store.get_user(username))
            if existing is not None:
                if not existing.superuser:
                    log.warning(
                        "user %r named by $%s exists but is not a superuser; left unchanged",
                        username,
                        self._config.root_username_env,
                    )
                return
            if await self._in_store_thread(lambda: store.ensure_superuser(username, Secret(given))):
                log.info("created superuser %r with the password from $%s", username, self._config.root_password_env)
            return
        if await self._in_store_thread(store.count_users):
            return
        password = secrets.token_urlsafe(18)
        created = await self._in_store_thread(lambda: store.create_first_superuser(username, Secret(password)))
        if not created:
            return  # someone else (the CLI) added a user meanwhile
        log.warning("created superuser %r with a generated password, shown once on stderr", username)
        # The one place a secret is ever written: never through logging, which may be shipped elsewhere.
        line = "=" * 78
        sys.stderr.write(
            f"\n{line}\n"
            f"Created superuser {username!r} with password: {password} — store it now; "
            f"it will not be shown again.\n"
            f"(Set ${self._config.root_username_env} and ${self._config.root_password_env} "
            f"before the first start to choose them.)\n"
            f"{line}\n\n"
        )
        sys.stderr.flush()

    async def _watch(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.poll_interval)
            store, view = self._store, self._view
            if store is None or view is None:
                return
            try:
                revision = await self._in_store_thread(store.revision)
                if revision != view.revision:
                    snapshot = await self._in_store_thread(store.snapshot)
                    self._apply(snapshot)
                    log.info("local auth store changed (revision %d): users and ACL entries reloaded", snapshot.revision)
                    self._invalidate_caches()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not failing:
                    log.warning(
                        "cannot read the local auth store %s (%s); keeping the users and ACL entries loaded before",
                        self._config.db,
                        exc,
                    )
                failing = True
            else:
                if failing:
                    log.info("the local auth store %s is readable again", self._config.db)
                failing = False

    def _apply(self, snapshot: StoreSnapshot) -> None:
        # Both replaced in one step of the event loop: no answer mixes old and new data.
        self._view = _View.of(snapshot)
        self._compiled = {}

    def _invalidate_caches(self) -> None:
        try:
            self._context.invalidate_caches()
        except Exception:
            log.exception("invalidating the auth caches after a store change failed")

    async def _store_rehash(self, username: str, old_phc: str, new_phc: str) -> bool:
        store = self._store
        if store is None:
            return False
        return await self._in_store_thread(lambda: store.replace_password_hash(username, old_phc, new_phc))

    async def _in_store_thread(self, work: Callable[[], _T]) -> _T:
        executor = self._store_executor
        if executor is None:
            raise StoreError("the local auth store is closed")
        return await asyncio.get_running_loop().run_in_executor(executor, work)

    def _collect_password_checks(self) -> Iterable[Metric]:
        passwords = self._passwords
        checks = CounterMetricFamily("polygate_local_password_checks", "Argon2 password verifications run")
        busy = CounterMetricFamily(
            "polygate_local_password_busy", "Password checks answered busy: no worker free within auth.local.max_wait"
        )
        waiting = GaugeMetricFamily("polygate_local_password_waiting", "Password checks waiting for a worker now")
        checks.add_metric([], passwords.verifications if passwords else 0)
        busy.add_metric([], passwords.pool.busy if passwords else 0)
        waiting.add_metric([], passwords.pool.waiting if passwords else 0)
        return [checks, busy, waiting]

    # -- authentication -------------------------------------------------------

    async def authenticate(self, event: AuthEvent) -> Decision:
        view = self._view
        if view is None:
            return Decision.unavailable(_NOT_STARTED)
        # A verified certificate of a user's identity needs no password (and no Argon2 work);
        # any other certificate, or none, leaves the decision to the password.
        by_certificate = certificate_user(view.certificates, event.username, event.tls_identity)
        if by_certificate is not None:
            return Decision.allow(
                Identity(
                    external_id=by_certificate.username,
                    username=by_certificate.username,
                    superuser=by_certificate.superuser,
                )
            )
        if not event.username:
            if self._config.allow_anonymous:
                return Decision.allow(ANONYMOUS_IDENTITY)
            return Decision.deny("anonymous clients are not allowed")
        user = view.users.get(event.username)
        passwords = self._passwords
        if passwords is None:
            return Decision.unavailable(_NOT_STARTED)
        try:
            matched = await passwords.check(
                event.username, user.password_hash if user is not None else None, event.secret, peer=event.peer
            )
        except PoolBusy:
            return Decision.unavailable(BUSY)
        except (PoolClosed, RuntimeError):  # shut down while we waited
            return Decision.unavailable(_NOT_STARTED)
        if not matched or user is None:
            return Decision.deny(BAD_CREDENTIALS)
        return Decision.allow(Identity(external_id=user.username, username=user.username, superuser=user.superuser))

    # -- authorization --------------------------------------------------------

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return self.authorize_now(event.action, event.topic, event.client_id, identity)

    def authorize_now(self, action: Action, topic: str, client_id: str, identity: Identity) -> Decision:
        """The whole answer, from memory: the dispatcher's per-message fast path."""
        view = self._view
        if view is None:
            return Decision.unavailable(_NOT_STARTED)
        key = (identity.username or identity.external_id, client_id)
        checker = self._compiled.get(key)
        if checker is None:
            checker = self._compile(view, *key)
            if len(self._compiled) >= MAX_COMPILED_ACLS:
                del self._compiled[next(iter(self._compiled))]
            self._compiled[key] = checker
        if action is Action.PUBLISH:
            return checker.check_publish(topic)
        if action is Action.SUBSCRIBE:
            return checker.check_subscribe(topic)
        return Decision.deny(f"auth provider 'local' does not authorize {action.value}")

    @staticmethod
    def _compile(view: _View, username: str, client_id: str) -> AclChecker:
        if username == ANONYMOUS:
            # `%u` is empty for anonymous clients, so entries using it never match.
            return CompiledAcl(view.entries.get(ANONYMOUS, ()), username="", client_id=client_id)
        user = view.users.get(username)
        if user is None:
            return DenyAll(f"user {username!r} no longer exists")
        if user.superuser:
            return _ALLOW_ALL
        return CompiledAcl(view.entries.get(username, ()), username=username, client_id=client_id)
