"""The `local` and `none` providers, with real Argon2id parameters and a real SQLite file."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from auth_providers.local import BAD_CREDENTIALS, LocalProvider
from auth_providers.local_store import LocalStore
from auth_providers.none import AllowAllProvider
from gateway.config_types import AuthConfig, LimitsConfig, LocalConfig
from gateway.errors import ProviderError
from gateway.events import Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.providers import AuthProvider, ProviderContext, find_provider

USER_ENV = "POLYGATE_TEST_LOCAL_ROOT_USER"
PASS_ENV = "POLYGATE_TEST_LOCAL_ROOT_PASSWORD"
BANNER = re.compile(r"Created superuser '(?P<user>[^']+)' with password: (?P<password>\S+) — store it now")


class Invalidations:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def context(db: str, *, allow_anonymous: bool = False, invalidate: Callable[[], None] = lambda: None) -> ProviderContext:
    local = LocalConfig(
        db=db, allow_anonymous=allow_anonymous, root_username_env=USER_ENV, root_password_env=PASS_ENV
    )
    return ProviderContext(auth=AuthConfig(local=local), limits=LimitsConfig(), invalidate_caches=invalidate)


def connect(username: str, password: str = "", client_id: str = "c1") -> AuthEvent:
    return AuthEvent(
        protocol=Protocol.MQTT, action=Action.CONNECT, client_id=client_id, username=username, secret=Secret(password)
    )


def op(action: Action, topic: str, client_id: str = "c1") -> AuthEvent:
    return AuthEvent(protocol=Protocol.MQTT, action=action, client_id=client_id, topic=topic)


async def authz(provider: LocalProvider, identity: Identity, action: Action, topic: str, client_id: str = "c1") -> Decision:
    """Both entry points must give the same answer."""
    fast = provider.authorize_now(action, topic, client_id, identity)
    slow = await provider.authorize(op(action, topic, client_id), identity)
    assert fast == slow
    return slow


@pytest.fixture
def db(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv(USER_ENV, raising=False)
    monkeypatch.delenv(PASS_ENV, raising=False)
    return str(tmp_path / "auth.db")


@pytest.fixture
def invalidations() -> Invalidations:
    return Invalidations()


@pytest.fixture
async def seeded(db: str, invalidations: Invalidations) -> AsyncIterator[LocalProvider]:
    """A started provider with root, alice and some ACL entries."""
    with LocalStore(db) as store:
        store.add_user("root", Secret("root-pw"), superuser=True)
        store.add_user("alice", Secret("alice-pw"))
        store.grant("alice", "tenants/%u/#", {"publish", "subscribe"})
        store.grant("alice", "tenants/%u/secret", {"publish", "subscribe"}, deny=True)
        store.grant("alice", "devices/%c/up", {"publish"})
        store.grant("anonymous", "public/#", {"subscribe"})
        store.grant("anonymous", "users/%u/#", {"subscribe"})
    provider = LocalProvider(context(db, allow_anonymous=True, invalidate=invalidations))
    await provider.start()
    yield provider
    await provider.aclose()


def identity(name: str, superuser: bool = False) -> Identity:
    return Identity(external_id=name, username=name, superuser=superuser)


async def wait_for(condition: Callable[[], bool], timeout: float = 2.0) -> float:
    """Poll with a deadline; returns the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


async def test_generated_root_password_is_printed_once_and_works(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    provider = LocalProvider(context(db))
    assert not provider.ready()
    await provider.start()
    try:
        assert provider.ready()
        err = capsys.readouterr().err
        found = BANNER.findall(err)
        assert len(found) == 1
        user, password = found[0]
        assert user == "root"
        assert len(password) >= 24
        decision = await provider.authenticate(connect("root", password))
        assert decision.allowed
        assert decision.identity == Identity(external_id="root", username="root", superuser=True)
        assert (await provider.authenticate(connect("root", password + "x"))).reason == BAD_CREDENTIALS
    finally:
        await provider.aclose()
    # A second start on the same database creates nobody and prints nothing.
    again = LocalProvider(context(db))
    await again.start()
    await again.aclose()
    assert "password" not in capsys.readouterr().err
    with LocalStore(db) as store:
        assert [u.username for u in store.list_users()] == ["root"]


async def test_root_from_env_vars_prints_no_secret(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv(USER_ENV, "admin")
    monkeypatch.setenv(PASS_ENV, "env-secret-pw")
    provider = LocalProvider(context(db))
    with caplog.at_level(logging.DEBUG):
        await provider.start()
    try:
        captured = capsys.readouterr()
        assert "env-secret-pw" not in captured.err + captured.out + caplog.text
        assert not BANNER.search(captured.err)
        decision = await provider.authenticate(connect("admin", "env-secret-pw"))
        assert decision.allowed and decision.identity is not None and decision.identity.superuser
        assert not (await provider.authenticate(connect("root", "env-secret-pw"))).allowed
    finally:
        await provider.aclose()


async def test_env_root_is_added_to_a_populated_store_but_never_changed(
    db: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with LocalStore(db) as store:
        store.add_user("alice", Secret("alice-pw"))
    monkeypatch.setenv(PASS_ENV, "first-pw")
    provider = LocalProvider(context(db))
    await provider.start()
    try:
        decision = await provider.authenticate(connect("root", "first-pw"))
        assert decision.allowed and decision.identity is not None and decision.identity.superuser
    finally:
        await provider.aclose()
    # A later start with another password in the environment leaves root's password alone.
    monkeypatch.setenv(PASS_ENV, "second-pw")
    monkeypatch.setenv(USER_ENV, "alice")
    again = LocalProvider(context(db))
    with caplog.at_level(logging.WARNING, logger="polygate.auth.local"):
        await again.start()
    try:
        assert "'alice' named by $" in caplog.text and "not a superuser" in caplog.text
        assert (await again.authenticate(connect("root", "first-pw"))).allowed
        assert not (await again.authenticate(connect("alice", "second-pw"))).allowed
        alice = await again.authenticate(connect("alice", "alice-pw"))
        assert alice.identity is not None and not alice.identity.superuser
    finally:
        await again.aclose()


async def test_no_bootstrap_when_users_exist(db: str, capsys: pytest.CaptureFixture[str]) -> None:
    with LocalStore(db) as store:
        store.add_user("alice", Secret("alice-pw"))
    provider = LocalProvider(context(db))
    await provider.start()
    await provider.aclose()
    assert not BANNER.search(capsys.readouterr().err)
    with LocalStore(db) as store:
        assert [u.username for u in store.list_users()] == ["alice"]


async def test_bad_root_username_fails_start(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(USER_ENV, "anonymous")
    provider = LocalProvider(context(db))
    with pytest.raises(ProviderError, match="reserved"):
        await provider.start()
    assert not provider.ready()


async def test_unusable_database_fails_start(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"not a database at all" * 100)
    provider = LocalProvider(context(str(bad)))
    with pytest.raises(ProviderError, match="auth provider 'local'"):
        await provider.start()


async def test_wrong_password_and_unknown_user_look_the_same(seeded: LocalProvider) -> None:
    ok = await seeded.authenticate(connect("alice", "alice-pw"))
    assert ok.allowed
    assert ok.identity == Identity(external_id="alice", username="alice", superuser=False)
    wrong = await seeded.authenticate(connect("alice", "nope"))
    unknown = await seeded.authenticate(connect("mallory", "alice-pw"))
    empty = await seeded.authenticate(connect("alice", ""))
    reserved = await seeded.authenticate(connect("anonymous", ""))
    for decision in (wrong, unknown, empty, reserved):
        assert decision.outcome is Outcome.DENY
        assert decision.reason == BAD_CREDENTIALS
        assert decision.identity is None


async def test_unknown_user_costs_a_real_verification(seeded: LocalProvider, monkeypatch: pytest.MonkeyPatch) -> None:
    import auth_providers.password_checks as local_module  # where the check runs

    checked: list[str] = []
    real = local_module.verify_password

    def spy(phc: str, secret: Secret) -> bool:
        checked.append(phc)
        return real(phc, secret)

    monkeypatch.setattr(local_module, "verify_password", spy)
    assert not (await seeded.authenticate(connect("mallory", "pw"))).allowed
    assert not (await seeded.authenticate(connect("alice", "pw"))).allowed
    dummy, alice = checked
    # Same algorithm and cost for a user that does not exist, so timing tells nothing.
    assert dummy.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert dummy.split("$")[:4] == alice.split("$")[:4]


async def test_verification_runs_off_the_event_loop(seeded: LocalProvider) -> None:
    # While four Argon2 verifications run, the loop keeps turning.
    ticks = 0
    done = asyncio.Event()

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    results = await asyncio.gather(*(seeded.authenticate(connect("alice", "alice-pw")) for _ in range(4)))
    done.set()
    await task
    assert all(r.allowed for r in results)
    assert ticks > 100


async def test_anonymous(db: str, seeded: LocalProvider) -> None:
    decision = await seeded.authenticate(connect(""))
    assert decision.allowed
    anon = decision.identity
    assert anon == Identity(external_id="anonymous", username="anonymous")
    assert (await authz(seeded, anon, Action.SUBSCRIBE, "public/#")).allowed
    assert not (await authz(seeded, anon, Action.PUBLISH, "public/x")).allowed
    # `%u` is empty for anonymous clients: the entry never matches.
    assert not (await authz(seeded, anon, Action.SUBSCRIBE, "users//x")).allowed
    assert not (await authz(seeded, anon, Action.SUBSCRIBE, "users/anonymous/x")).allowed

    closed = LocalProvider(context(db, allow_anonymous=False))
    await closed.start()
    try:
        denied = await closed.authenticate(connect(""))
        assert denied.outcome is Outcome.DENY
        assert denied.reason == "anonymous clients are not allowed"
    finally:
        await closed.aclose()


async def test_authorization(seeded: LocalProvider) -> None:
    alice = identity("alice")
    assert (await authz(seeded, alice, Action.PUBLISH, "tenants/alice/x")).allowed
    assert (await authz(seeded, alice, Action.SUBSCRIBE, "tenants/alice/+/x")).allowed
    assert (await authz(seeded, alice, Action.SUBSCRIBE, "tenants/alice/+/x")).exclusions == ()
    for topic_filter in ("tenants/bob/#", "#", "tenants/+/x", "tenants/alice/secret"):
        # The last one is wholly covered by the deny entry.
        assert not (await authz(seeded, alice, Action.SUBSCRIBE, topic_filter)).allowed, topic_filter
    secret = await authz(seeded, alice, Action.SUBSCRIBE, "tenants/alice/secret")
    assert secret.reason == "a deny ACL entry forbids subscribe to 'tenants/alice/secret'"
    # A filter the deny entry covers only part of is narrowed: allowed, without the denied topic.
    for topic_filter in ("tenants/alice/#", "tenants/alice/+"):
        narrowed = await authz(seeded, alice, Action.SUBSCRIBE, topic_filter)
        assert narrowed.allowed and narrowed.exclusions == ("tenants/alice/secret",), topic_filter
    denied = await authz(seeded, alice, Action.PUBLISH, "tenants/alice/secret")
    assert denied.reason == "a deny ACL entry forbids publish on 'tenants/alice/secret'"
    nothing = await authz(seeded, alice, Action.PUBLISH, "x")
    assert nothing.reason == "no ACL entry allows publish on 'x'"
    # `%c` is the client id of the event.
    assert (await authz(seeded, alice, Action.PUBLISH, "devices/dev7/up", client_id="dev7")).allowed
    assert not (await authz(seeded, alice, Action.PUBLISH, "devices/dev7/up", client_id="dev8")).allowed
    assert not (await authz(seeded, alice, Action.PUBLISH, "devices/+/up", client_id="+")).allowed
    # Superusers may do everything, whatever the ACL says.
    root = identity("root", superuser=True)
    assert (await authz(seeded, root, Action.SUBSCRIBE, "#")).allowed
    assert (await authz(seeded, root, Action.PUBLISH, "tenants/alice/secret")).allowed
    # The superuser flag comes from the store, not from whoever built the identity.
    assert not (await authz(seeded, identity("alice", superuser=True), Action.SUBSCRIBE, "#")).allowed
    assert not (await authz(seeded, identity("ghost"), Action.PUBLISH, "tenants/ghost/x")).allowed


async def test_changes_apply_within_two_seconds(db: str, seeded: LocalProvider, invalidations: Invalidations) -> None:
    calls_before = invalidations.count
    alice = identity("alice")
    assert not (await authz(seeded, alice, Action.PUBLISH, "news/today")).allowed

    with LocalStore(db) as other:
        other.grant("alice", "news/#", {"publish"})
    took = await wait_for(lambda: seeded.authorize_now(Action.PUBLISH, "news/today", "c1", alice).allowed)
    assert took < 2.0
    assert invalidations.count > calls_before

    with LocalStore(db) as other:
        other.add_user("bob", Secret("bob-pw"))
        other.delete_user("alice")
    await wait_for(lambda: not seeded.authorize_now(Action.PUBLISH, "news/today", "c1", alice).allowed)
    assert seeded.authorize_now(Action.PUBLISH, "news/today", "c1", alice).reason == "user 'alice' no longer exists"
    assert (await seeded.authenticate(connect("bob", "bob-pw"))).allowed
    assert (await seeded.authenticate(connect("alice", "alice-pw"))).reason == BAD_CREDENTIALS


async def test_store_changes_reach_a_caching_dispatcher(db: str) -> None:
    from gateway.dispatcher import Dispatcher
    from gateway.metrics import Metrics

    with LocalStore(db) as store:
        store.add_user("alice", Secret("alice-pw"))
    auth = AuthConfig(
        local=LocalConfig(db=db, root_username_env=USER_ENV, root_password_env=PASS_ENV),
        authn_cache_ttl=60.0,
        decision_cache_ttl=60.0,
        negative_cache_ttl=60.0,
    )
    dispatcher = Dispatcher(auth, limits=LimitsConfig(), metrics=Metrics())
    assert isinstance(dispatcher.provider.inner, LocalProvider)  # type: ignore[attr-defined]
    await dispatcher.start()
    try:
        assert (await dispatcher.decide(connect("alice", "alice-pw"))).allowed
        publish = op(Action.PUBLISH, "news/today")
        assert not (await dispatcher.decide(publish)).allowed  # now in the negative cache
        with LocalStore(db) as other:
            other.grant("alice", "news/#", {"publish"})
        started = time.monotonic()
        while not (await dispatcher.decide(publish)).allowed:
            assert time.monotonic() - started < 2.0, "the grant did not reach the dispatcher within 2 s"
            await asyncio.sleep(0.02)
        # A changed password is not hidden by the authn cache either.
        with LocalStore(db) as other:
            other.set_password("alice", Secret("new-pw"))
        started = time.monotonic()
        while (await dispatcher.decide(connect("alice", "alice-pw"))).allowed:
            assert time.monotonic() - started < 2.0, "the old password still worked after 2 s"
            await asyncio.sleep(0.02)
    finally:
        await dispatcher.aclose()


async def test_invalidate_hook_from_the_context(db: str) -> None:
    calls = Invalidations()
    provider = LocalProvider(context(db, invalidate=calls))
    await provider.start()
    try:
        with LocalStore(db) as other:
            other.add_user("carol", Secret("carol-pw"))
        await wait_for(lambda: calls.count == 1)
    finally:
        await provider.aclose()


async def test_aclose_stops_everything(db: str) -> None:
    provider = LocalProvider(context(db))
    await provider.start()
    task = provider._watch_task  # noqa: SLF001 - the background task must end
    assert task is not None and not task.done()
    await provider.aclose()
    assert task.done()
    assert not provider.ready()
    assert (await provider.authenticate(connect("root", "x"))).outcome is Outcome.UNAVAILABLE
    assert provider.authorize_now(Action.PUBLISH, "a", "c1", identity("root")).outcome is Outcome.UNAVAILABLE
    await provider.aclose()  # twice is harmless


async def test_is_an_auth_provider(db: str) -> None:
    assert find_provider("local") is LocalProvider
    # `%c` entries make answers depend on the client id: the dispatcher must key on it.
    assert LocalProvider.decisions_depend_on_client_id is True
    assert isinstance(LocalProvider(context(db)), AuthProvider)


async def test_allow_all_provider(db: str, caplog: pytest.LogCaptureFixture) -> None:
    assert find_provider("none") is AllowAllProvider
    provider = AllowAllProvider(context(db))
    assert isinstance(provider, AuthProvider)
    with caplog.at_level(logging.WARNING, logger="polygate.auth.none"):
        await provider.start()
    assert "never use this in production" in caplog.text
    assert provider.ready()
    decision = await provider.authenticate(connect("bob", "anything", client_id="c9"))
    assert decision.allowed and decision.identity == Identity(external_id="c9", username="bob")
    assert (await provider.authenticate(connect("bob", client_id=""))).identity == Identity(
        external_id="bob", username="bob"
    )
    assert (await provider.authorize(op(Action.SUBSCRIBE, "#"), identity("bob"))).allowed
    assert provider.authorize_now(Action.PUBLISH, "$SYS/x", "c1", identity("bob")).allowed  # type: ignore[union-attr]
    await provider.aclose()
    assert not provider.ready()
