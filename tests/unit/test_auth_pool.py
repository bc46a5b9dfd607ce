"""Auth under attack, on plain values: the fair Argon2 pool, the failed-login limiter,
the local provider outside the breaker, and the authn cache shared by stateless requests."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from auth_providers.fair_pool import FairPool, PoolBusy
from auth_providers.local_store import LocalStore
from auth_providers.password_checks import PasswordChecker
from gateway.config_types import Argon2Config, AuthConfig, CircuitBreakerConfig, FailedLoginsConfig, LimitsConfig
from gateway.dispatcher import Dispatcher
from gateway.events import Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.login_limiter import LOCKED_REASON, FailedLoginLimiter, source_ip
from gateway.metrics import Metrics
from gateway.resilience import ResilientProvider

FAST_ARGON2 = Argon2Config(memory=8192, time=1, parallelism=1)


# -- the pool ---------------------------------------------------------------------------------


async def test_a_flooding_source_does_not_push_another_back() -> None:
    pool = FairPool(1, max_wait=10)
    gate = threading.Event()
    order: list[str] = []

    def job(name: str) -> Any:
        def work() -> None:
            if name == "first":
                gate.wait(5)
            order.append(name)

        return work

    try:
        first = asyncio.ensure_future(pool.run("flood", job("first")))
        await asyncio.sleep(0.01)
        flood = [asyncio.ensure_future(pool.run("flood", job(f"flood-{i}"))) for i in range(20)]
        await asyncio.sleep(0)
        legit = asyncio.ensure_future(pool.run("legit", job("legit")))
        await asyncio.sleep(0)
        assert pool.waiting == 21
        gate.set()
        await asyncio.gather(first, legit, *flood)
    finally:
        pool.shutdown()
    # The legitimate source's one job ran after one flood job, not after twenty.
    assert order.index("legit") <= 2
    assert pool.completed == 22 and pool.waiting == 0 and pool.running == 0


async def test_a_wait_past_max_wait_is_busy_and_never_runs() -> None:
    pool = FairPool(1, max_wait=0.05)
    gate = threading.Event()
    ran: list[str] = []
    try:
        blocker = asyncio.ensure_future(pool.run("a", lambda: gate.wait(5)))
        await asyncio.sleep(0.01)
        with pytest.raises(PoolBusy):
            await pool.run("b", lambda: ran.append("late"))
        gate.set()
        await blocker
        # The worker is free again: the next job runs at once.
        assert await pool.run("b", lambda: 42) == 42
    finally:
        pool.shutdown()
    assert ran == [] and pool.busy == 1


async def test_cancelled_waiters_give_their_place_back() -> None:
    pool = FairPool(1, max_wait=10)
    gate = threading.Event()
    try:
        blocker = asyncio.ensure_future(pool.run("a", lambda: gate.wait(5)))
        await asyncio.sleep(0.01)
        waiters = [asyncio.ensure_future(pool.run("a", lambda: 1)) for _ in range(5)]
        await asyncio.sleep(0)
        for waiter in waiters:
            waiter.cancel()
        await asyncio.sleep(0)
        assert pool.waiting == 0
        gate.set()
        await blocker
        assert await asyncio.wait_for(pool.run("b", lambda: 7), 2) == 7
        assert pool.running == 0
    finally:
        pool.shutdown()


@pytest.mark.parametrize("peer,ip", [("10.0.0.1:5555", "10.0.0.1"), ("[::1]:80", "::1"), ("", ""), ("host", "host")])
def test_source_ip(peer: str, ip: str) -> None:
    assert source_ip(peer) == ip


# -- the failed-login limiter ----------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_an_ip_is_locked_after_n_failures_and_others_are_not() -> None:
    clock = Clock()
    limiter = FailedLoginLimiter(FailedLoginsConfig(per_ip=3, per_username=0, window=60, lockout=30), clock=clock)
    for _ in range(2):
        assert not limiter.refuse("10.0.0.1", "alice")
        limiter.failed("10.0.0.1", "alice")
    assert not limiter.refuse("10.0.0.1", "alice")
    limiter.failed("10.0.0.1", "alice")
    assert limiter.refuse("10.0.0.1", "alice")
    assert limiter.refuse("10.0.0.1", "bob")
    assert not limiter.refuse("10.0.0.2", "alice")
    assert limiter.lockouts == {"ip": 1, "username": 0} and limiter.refused["ip"] == 2
    clock.now += 31
    assert not limiter.refuse("10.0.0.1", "alice")


def test_failures_outside_the_window_do_not_add_up() -> None:
    clock = Clock()
    limiter = FailedLoginLimiter(FailedLoginsConfig(per_ip=3, per_username=0, window=10, lockout=30), clock=clock)
    for _ in range(10):
        limiter.failed("10.0.0.1", "alice")
        limiter.failed("10.0.0.1", "alice")
        clock.now += 11
    assert not limiter.refuse("10.0.0.1", "alice")


def test_a_username_is_locked_from_every_ip_and_a_success_clears_its_count() -> None:
    clock = Clock()
    limiter = FailedLoginLimiter(FailedLoginsConfig(per_ip=0, per_username=3, window=60, lockout=30), clock=clock)
    limiter.failed("10.0.0.1", "alice")
    limiter.failed("10.0.0.2", "alice")
    limiter.succeeded("alice")
    limiter.failed("10.0.0.3", "alice")
    limiter.failed("10.0.0.4", "alice")
    assert not limiter.refuse("10.0.0.5", "alice")
    limiter.failed("10.0.0.5", "alice")
    assert limiter.refuse("10.0.0.9", "alice")
    assert not limiter.refuse("10.0.0.9", "bob")


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["1.1.1.1", "2.2.2.2"]), st.text(max_size=5)), max_size=60))
def test_never_refuses_below_the_threshold(attempts: list[tuple[str, str]]) -> None:
    limiter = FailedLoginLimiter(FailedLoginsConfig(per_ip=1000, per_username=1000), clock=Clock())
    for ip, username in attempts:
        assert not limiter.refuse(ip, username)
        limiter.failed(ip, username)


# -- the local provider's answers are not cut by auth.timeout and never open the breaker ---------------


class SlowLocal:
    in_process_wait = 30.0

    def __init__(self, outcome: Outcome, delay: float) -> None:
        self.outcome, self.delay, self.calls = outcome, delay, 0

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.calls += 1
        await asyncio.sleep(self.delay)
        if self.outcome is Outcome.UNAVAILABLE:
            return Decision.unavailable("busy")
        return Decision.allow(Identity(external_id=event.username, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return Decision.allow(identity)


async def test_in_process_calls_outlive_the_timeout_and_never_open_the_breaker() -> None:
    breaker = CircuitBreakerConfig(failures=2, open_for=60, half_open_requests=1)
    slow = ResilientProvider(SlowLocal(Outcome.ALLOW, 0.2), name="local", timeout=0.05, retries=0,
                             breaker=breaker, in_process=True)
    assert (await slow.authenticate(connect("alice"))).allowed
    busy_inner = SlowLocal(Outcome.UNAVAILABLE, 0)
    busy = ResilientProvider(busy_inner, name="local", timeout=0.05, retries=3, breaker=breaker, in_process=True)
    for _ in range(10):
        assert (await busy.authenticate(connect("alice"))).outcome is Outcome.UNAVAILABLE
    assert busy.state == "closed" and busy.breaker.opened == 0 and busy_inner.calls == 10
    # The same provider treated as remote: cut at the timeout, and the breaker opens.
    remote = ResilientProvider(SlowLocal(Outcome.ALLOW, 0.2), name="x", timeout=0.05, retries=0, breaker=breaker)
    assert (await remote.authenticate(connect("alice"))).outcome is Outcome.UNAVAILABLE
    assert (await remote.authenticate(connect("alice"))).outcome is Outcome.UNAVAILABLE
    assert remote.state == "open"


async def test_dispatcher_gives_an_in_process_provider_its_own_wait() -> None:
    provider = SlowLocal(Outcome.ALLOW, 0.3)
    config = dataclasses.replace(AuthConfig(), timeout=0.05, retries=0)
    dispatcher = Dispatcher(config, limits=LimitsConfig(), metrics=Metrics(), provider=provider)  # type: ignore[arg-type]
    assert (await dispatcher.decide(connect("alice"))).allowed


# -- the authn cache across connections, and the limiter in the dispatcher -------------------------------


class Counting:
    def __init__(self, *, scoped: bool | None) -> None:
        if scoped is not None:
            self.authentication_depends_on_client = scoped
        self.calls = 0

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.calls += 1
        if event.secret.reveal() != b"right":
            return Decision.deny("bad credentials")
        return Decision.allow(Identity(external_id=event.username, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return Decision.allow(identity)


def connect(username: str, secret: str = "right", client_id: str = "c1", peer: str = "10.0.0.1:1000",
            protocol: Protocol = Protocol.MQTT, tls_identity: str = "") -> AuthEvent:
    return AuthEvent(protocol=protocol, action=Action.CONNECT, client_id=client_id, username=username,
                     secret=Secret(secret), peer=peer, tls_identity=tls_identity)


def make(provider: Counting, failed_logins: FailedLoginsConfig = FailedLoginsConfig()) -> Dispatcher:
    limits = dataclasses.replace(LimitsConfig(), failed_logins=failed_logins)
    return Dispatcher(AuthConfig(), limits=limits, metrics=Metrics(), provider=provider)  # type: ignore[arg-type]


async def test_one_check_per_credential_across_clients_when_the_provider_allows_it() -> None:
    provider = Counting(scoped=False)
    dispatcher = make(provider)
    for i in range(20):
        protocol = (Protocol.HTTP, Protocol.AMQP091, Protocol.COAP)[i % 3]
        event = connect("alice", client_id=f"http:10.0.0.1:{i}", peer=f"10.0.0.1:{i}", protocol=protocol)
        assert (await dispatcher.decide_stateless(event)).allowed
    assert provider.calls == 1
    assert not (await dispatcher.decide_stateless(connect("alice", "wrong", client_id="x"))).allowed
    assert (await dispatcher.decide_stateless(connect("bob", client_id="y"))).allowed  # another user: its own check
    # A certificate identity is part of the key: a cached password login is no certificate login.
    await dispatcher.decide_stateless(connect("alice", client_id="z", tls_identity="CN=alice"))
    assert provider.calls == 4
    for key in dispatcher.authn_cache._data:
        assert b"right" not in repr(key).encode()


async def test_keyed_per_client_unless_the_provider_says_otherwise() -> None:
    provider = Counting(scoped=None)
    dispatcher = make(provider)
    for i in range(3):
        assert (await dispatcher.decide_stateless(connect("alice", client_id=f"c{i}"))).allowed
    assert provider.calls == 3


async def test_the_dispatcher_denies_a_locked_out_ip_without_asking_the_provider() -> None:
    provider = Counting(scoped=False)
    dispatcher = make(provider, FailedLoginsConfig(per_ip=3, per_username=0))
    for i in range(3):
        decision = await dispatcher.decide(connect("alice", f"guess-{i}", peer="10.0.0.66:1"))
        assert decision.outcome is Outcome.DENY
    assert provider.calls == 3
    decision = await dispatcher.decide(connect("alice", "right", peer="10.0.0.66:2"))
    assert decision.outcome is Outcome.DENY and decision.reason == LOCKED_REASON
    assert provider.calls == 3
    assert (await dispatcher.decide(connect("alice", "right", peer="10.0.0.7:2"))).allowed
    rendered = dispatcher.metrics.render().decode()
    assert 'polygate_auth_lockouts_total{scope="ip"} 1.0' in rendered
    assert 'polygate_auth_lockout_refused_total{scope="ip"} 1.0' in rendered


# -- the password checker ---------------------------------------------------------------------------------


async def test_unknown_users_and_rehashed_users_use_the_configured_parameters(tmp_path: Any) -> None:
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.add_user("alice", Secret("pw"))
        stored = store.get_user("alice")
    assert stored is not None and "m=19456" in stored.password_hash
    checker = PasswordChecker(FAST_ARGON2, max_wait=5, workers=1)
    try:
        await checker.start()
        assert checker._dummy_hash.startswith("$argon2id$v=19$m=8,t=1,p=1$")
        assert not await checker.check("mallory", None, Secret("pw"), peer="10.0.0.1:1")
        assert not await checker.check("alice", stored.password_hash, Secret("nope"), peer="10.0.0.1:1")
        assert "alice" not in checker._upgraded
        assert await checker.check("alice", stored.password_hash, Secret("pw"), peer="10.0.0.1:1")
        assert checker._upgraded["alice"][1].startswith("$argon2id$v=19$m=8,t=1,p=1$")
        # The cheap verifier serves the next checks, right and wrong; a new stored hash drops it.
        assert await checker.check("alice", stored.password_hash, Secret("pw"), peer="10.0.0.1:1")
        assert not await checker.check("alice", stored.password_hash, Secret("nope"), peer="10.0.0.1:1")
        assert not await checker.check("alice", "$argon2id$v=19$m=8,t=1,p=1$AAAAAAAAAAAAAAAA$AAAA", Secret("pw"),
                                       peer="10.0.0.1:1")
        assert checker.verifications == 6
    finally:
        checker.shutdown()


async def test_a_rehash_is_stored_unless_the_password_changed_meanwhile(tmp_path: Any) -> None:
    store = LocalStore(str(tmp_path / "auth.db"))
    store.add_user("alice", Secret("pw"))
    store.add_user("bob", Secret("pw"))
    revision = store.revision()

    changed = []

    async def persist(username: str, old: str, new: str) -> bool:
        if username == "bob" and not changed:  # an operator changes bob's password while he logs in
            changed.append(store.set_password("bob", Secret("new")))
        return store.replace_password_hash(username, old, new)

    checker = PasswordChecker(FAST_ARGON2, max_wait=5, workers=1, persist=persist)
    try:
        await checker.start()
        for name in ("alice", "bob"):
            stored = store.get_user(name)
            assert stored is not None
            assert await checker.check(name, stored.password_hash, Secret("pw"), peer="10.0.0.1:1")
        alice, bob = store.get_user("alice"), store.get_user("bob")
        assert alice is not None and alice.password_hash.startswith("$argon2id$v=19$m=8,t=1,p=1$")
        assert bob is not None and not await checker.check("bob", bob.password_hash, Secret("pw"), peer="10.0.0.1:1")
        assert await checker.check("bob", bob.password_hash, Secret("new"), peer="10.0.0.1:1")
        assert checker.rehashes_stored == 2  # alice's, then bob's new password's
        # The re-hash alone is no change of rights: no reload of every gateway's view.
        assert store.revision() == revision + 1  # bob's new password only
    finally:
        checker.shutdown()
        store.close()
