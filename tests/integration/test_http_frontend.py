"""The HTTP frontend over a real loopback socket: publish, SSE subscribe, status codes, cleanup."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import aiohttp
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from yarl import URL

from gateway.config_types import (
    AuthConfig,
    GatewayConfig,
    LimitsConfig,
    ListenerConfig,
    LocalConfig,
    RateConfig,
    RatelimitConfig,
)
from gateway.context import FrontendContext
from gateway.dispatcher import Dispatcher
from gateway.events import Action, AuthEvent, Decision, Identity, Protocol, Secret
from gateway.frontends.http import HTTPFrontend, encode_event
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimits
from gateway.queues import STORED, MessageQueue, QueueLimits
from gateway.router import ROUTED, Message, Router
from gateway.state import GatewayState
from gateway.store.base import Store
from gateway.store.memory import MemoryStore
from gateway.topics import filter_covers

DEADLINE = 5.0
PASSWORDS = {"alice": "wonderland", "bob": "builder"}


def basic(username: str, password: str) -> dict[str, str]:
    return {"Authorization": aiohttp.encode_basic_auth(username, password)}


ALICE = basic("alice", "wonderland")


class TestProvider:
    """Users from PASSWORDS; each may use topics under `<user>/`. `unavailable` makes it fail."""

    __test__ = False

    def __init__(self) -> None:
        self.unavailable = False
        self.events: list[AuthEvent] = []
        #: filter -> the exclusions a granted subscribe of it carries.
        self.exclusions: dict[str, tuple[str, ...]] = {}

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.events.append(event)
        if self.unavailable:
            return Decision.unavailable("test service down")
        expected = PASSWORDS.get(event.username)
        if expected is None or event.secret != Secret(expected):
            return Decision.deny("bad username or password")
        return Decision.allow(Identity(external_id=event.username, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        self.events.append(event)
        if self.unavailable:
            return Decision.unavailable("test service down")
        if filter_covers(f"{identity.external_id}/#", event.topic):
            exclusions = self.exclusions.get(event.topic, ()) if event.action is Action.SUBSCRIBE else ()
            return Decision.allow(identity, exclusions=exclusions)
        return Decision.deny("not your topic")


class Recorder:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.arrived = asyncio.Event()

    def deliver(self, message: Message, qos: int, retain: bool, publisher: object) -> int:
        self.messages.append(message)
        self.arrived.set()
        return 0


@dataclass
class Harness:
    frontend: HTTPFrontend
    session: aiohttp.ClientSession
    router: Router
    metrics: Metrics
    state: GatewayState
    provider: TestProvider
    listener: ListenerConfig
    clock: list[float] = field(default_factory=lambda: [0.0])

    @property
    def url(self) -> str:
        host, port = self.frontend.bound
        return f"http://{host}:{port}"

    def recorder(self, topic_filter: str = "#") -> Recorder:
        recorder = Recorder()
        self.router.subscribe(recorder, topic_filter, 2)
        return recorder


Factory = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def make_harness() -> AsyncIterator[Factory]:
    async with contextlib.AsyncExitStack() as stack:

        async def make(
            *,
            limits: LimitsConfig | None = None,
            auth: AuthConfig | None = None,
            ratelimit: RatelimitConfig | None = None,
            max_connections: int = 0,
            keepalive: float = 15.0,
            tls: dict[str, Any] | None = None,
            ssl_client: ssl.SSLContext | None = None,
            configured_provider: bool = False,
            store: Store | None = None,
        ) -> Harness:
            config = GatewayConfig(
                limits=limits or LimitsConfig(),
                auth=auth or AuthConfig(provider="test"),
                ratelimit=ratelimit or RatelimitConfig(),
            )
            metrics = Metrics()
            provider = TestProvider()
            dispatcher = Dispatcher(
                config.auth, limits=config.limits, metrics=metrics, provider=None if configured_provider else provider
            )
            await dispatcher.start()
            stack.push_async_callback(dispatcher.aclose)
            router = Router(max_topic_length=config.limits.max_topic_length)
            state = GatewayState()
            clock = [0.0]
            ratelimits = RateLimits(config.ratelimit, clock=lambda: clock[0])
            ctx = FrontendContext(
                config=config, dispatcher=dispatcher, router=router, metrics=metrics, state=state, ratelimits=ratelimits,
                store=store or MemoryStore(),
            )
            listener = ListenerConfig(
                name="server.http.plain", addr="127.0.0.1:0", host="127.0.0.1", port=0,
                max_connections=max_connections, **(tls or {}),
            )
            frontend = HTTPFrontend(ctx, listener, keepalive=keepalive)
            await frontend.start()
            stack.push_async_callback(frontend.aclose)
            stack.push_async_callback(state.close_all, "test over", 1.0)
            connector = aiohttp.TCPConnector(ssl=ssl_client) if ssl_client is not None else None
            session = aiohttp.ClientSession(connector=connector)
            stack.push_async_callback(session.close)
            return Harness(frontend, session, router, metrics, state, provider, listener, clock)

        yield make


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def next_event(response: aiohttp.ClientResponse, *, comments: bool = False) -> dict[str, Any] | str:
    """The next SSE event's JSON data (or, with `comments`, a comment line too)."""
    data: list[str] = []
    async with asyncio.timeout(DEADLINE):
        while True:
            line = (await response.content.readline()).decode("utf-8")
            if not line:
                raise AssertionError("the event stream ended")
            line = line.rstrip("\n")
            if line.startswith(":"):
                if comments:
                    return line
                continue
            if line == "":
                if data:
                    return json.loads("\n".join(data))
                continue
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# -- publish ---------------------------------------------------------------------------------------


async def test_raw_publish_reaches_a_subscriber(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/alice/room%201/temp?qos=1&retain=true", data=b"21.5", headers=ALICE) as resp:
        assert resp.status == 202, await resp.text()
        assert (await resp.json())["status"] == "accepted"
    assert recorder.messages == [Message("alice/room 1/temp", b"21.5", 1, True)]
    assert h.metrics.messages_in[Protocol.HTTP] == 1
    assert h.router.retained("alice/#") == [Message("alice/room 1/temp", b"21.5", 1, True)]
    authn = h.provider.events[0]
    assert authn.protocol is Protocol.HTTP and authn.username == "alice"
    assert authn.secret == Secret("wonderland")
    assert authn.client_id == f"http:{authn.peer}" and authn.peer.startswith("127.0.0.1:")
    assert h.provider.events[-1].action is Action.PUBLISH and h.provider.events[-1].topic == "alice/room 1/temp"


async def test_json_publish_reaches_a_subscriber(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder()
    body = {"topic": "alice/bin", "payload": b64(b"\x00\xffdata"), "qos": 2, "retain": False}
    async with h.session.post(f"{h.url}/publish", json=body, headers=ALICE) as resp:
        assert resp.status == 202, await resp.text()
    assert recorder.messages == [Message("alice/bin", b"\x00\xffdata", 2, False)]


@pytest.mark.parametrize(
    ("headers", "username", "client_id"),
    [
        ({"Authorization": "Bearer builder", "X-Username": "bob"}, "bob", None),
        ({"Authorization": "Client builder", "X-FluxMQ-Username": "bob", "X-Client-ID": "dev-7"}, "bob", "dev-7"),
        ({"Authorization": "bearer builder", "X-Username": "bob", "X-FluxMQ-Client-ID": "dev-8"}, "bob", "dev-8"),
    ],
)
async def test_token_credentials_and_client_id_headers(
    make_harness: Factory, headers: dict[str, str], username: str, client_id: str | None
) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/bob/x", data=b"1", headers=headers) as resp:
        assert resp.status == 202, await resp.text()
    assert [m.topic for m in recorder.messages] == ["bob/x"]
    event = h.provider.events[0]
    assert event.username == username and event.secret == Secret("builder")
    assert event.client_id == (client_id or f"http:{event.peer}")


async def test_with_the_local_provider(
    make_harness: Factory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from auth_providers.local_store import LocalStore

    db = str(tmp_path / "auth.db")
    store = LocalStore(db)
    store.add_user("alice", Secret("wonderland"))
    store.grant("alice", "alice/#", {"publish", "subscribe"})
    store.close()
    monkeypatch.setenv("POLYGATE_ROOT_USERNAME", "root")
    monkeypatch.setenv("POLYGATE_ROOT_PASSWORD", "root-password-for-tests")
    h = await make_harness(auth=AuthConfig(provider="local", local=LocalConfig(db=db)), configured_provider=True)
    recorder = h.recorder()
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as stream:
        assert stream.status == 200
        async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
            assert resp.status == 202
        assert await next_event(stream) == {"topic": "alice/x", "payload": b64(b"1")}
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=basic("alice", "nope")) as resp:
        assert resp.status == 401
    async with h.session.post(f"{h.url}/bob/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 403
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "#"}, headers=ALICE) as resp:
        assert resp.status == 403
    assert [m.topic for m in recorder.messages] == ["alice/x"]


async def test_without_required_auth_the_provider_is_never_asked(make_harness: Factory) -> None:
    protocols = MappingProxyType({p: p is not Protocol.HTTP for p in Protocol})
    h = await make_harness(auth=AuthConfig(provider="test", protocols=protocols))
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/anyone/x", data=b"1", headers={"Authorization": "Weird stuff"}) as resp:
        assert resp.status == 202, await resp.text()
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "#"}) as resp:
        assert resp.status == 200
        h.router.publish(Message("any/thing", b"p"))
        assert await next_event(resp) == {"topic": "any/thing", "payload": b64(b"p")}
    assert [m.topic for m in recorder.messages] == ["anyone/x", "any/thing"]
    assert h.provider.events == []


# -- error codes -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "needle"),
    [
        ("POST", "/", b"x", "must not be empty"),
        ("POST", "/alice/%2B", b"x", "wildcards"),
        ("POST", "/alice/%23", b"x", "wildcards"),
        ("POST", "/alice/%00", b"x", "NUL"),
        ("POST", "/alice/%FF", b"x", "percent-encoded UTF-8"),
        ("POST", "/alice/x?qos=3", b"x", "qos"),
        ("POST", "/alice/x?retain=maybe", b"x", "retain"),
        ("POST", "/publish", b"not json", "JSON"),
        ("POST", "/publish", b"[1]", "JSON object"),
        ("POST", "/publish", b'{"payload": ""}', "topic"),
        ("POST", "/publish", b'{"topic": "alice/x", "payload": "***"}', "base64"),
        ("POST", "/publish", b'{"topic": "alice/x", "qos": true}', "qos"),
        ("POST", "/publish", b'{"topic": "alice/x", "retain": "yes"}', "retain"),
        ("POST", "/publish", b'{"topic": "alice/+"}', "wildcards"),
        ("GET", "/subscribe", b"", "topic filter"),
        ("GET", "/subscribe?topic=alice/%23/x", b"", "'#'"),
        ("GET", "/subscribe?topic=alice/x%2B", b"", "'+'"),
    ],
)
async def test_bad_requests_are_400_with_the_reason(
    make_harness: Factory, method: str, path: str, body: bytes, needle: str
) -> None:
    h = await make_harness()
    recorder = h.recorder()
    url = URL(h.url + path, encoded=True)
    async with h.session.request(method, url, data=body or None, headers=ALICE) as resp:
        assert resp.status == 400
        assert needle in (await resp.json())["error"]
    assert recorder.messages == []


async def test_a_topic_longer_than_the_limit_is_400(make_harness: Factory) -> None:
    h = await make_harness(limits=LimitsConfig(max_topic_length=16))
    async with h.session.post(f"{h.url}/alice/{'x' * 20}", data=b"1", headers=ALICE) as resp:
        assert resp.status == 400
        assert "longer than 16" in (await resp.json())["error"]


@pytest.mark.parametrize(
    "headers",
    [
        basic("alice", "wrong"),
        basic("mallory", "wonderland"),
        {},
        {"Authorization": "Basic !!!"},
        {"Authorization": "Basic " + b64(b"no-colon")},
        {"Authorization": "Digest abc"},
        {"Authorization": "Bearer wrong", "X-Username": "alice"},
    ],
)
async def test_bad_credentials_are_401(make_harness: Factory, headers: dict[str, str]) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == 'Basic realm="polygate"'
        text = await resp.text()
    assert "wonderland" not in text and "wrong" not in text
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=headers) as resp:
        assert resp.status == 401
    assert recorder.messages == []
    assert h.router.subscription_count == 1


async def test_unauthorized_publish_and_subscribe_are_403(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/bob/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 403
        assert "publish" in (await resp.json())["error"]
    async with h.session.post(f"{h.url}/publish", json={"topic": "bob/x"}, headers=ALICE) as resp:
        assert resp.status == 403
    # One denied filter refuses the whole stream, before it starts.
    params = [("topic", "alice/#"), ("topic", "bob/#")]
    async with h.session.get(f"{h.url}/subscribe", params=params, headers=ALICE) as resp:
        assert resp.status == 403
        assert "bob/#" in (await resp.json())["error"]
    # A filter is authorized as written: `+` at the first level is not under alice/.
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "+/x"}, headers=ALICE) as resp:
        assert resp.status == 403
    assert recorder.messages == []
    assert h.router.subscription_count == 1
    assert h.frontend._streams == set()


async def test_auth_service_unavailable_is_503_not_401(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder()
    h.provider.unavailable = True
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == "1"
        assert "auth service unavailable" in (await resp.json())["error"]
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        assert resp.status == 503
    assert recorder.messages == []
    h.provider.unavailable = False
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 202


async def test_a_10_mb_body_is_413_and_the_server_keeps_serving(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.post(f"{h.url}/alice/big", data=io.BytesIO(b"x" * (10 * 1024 * 1024)), headers=ALICE) as resp:
        assert resp.status == 413
        assert "limit of 1048576 bytes" in (await resp.json())["error"]
    async with h.session.post(f"{h.url}/alice/small", data=b"ok", headers=ALICE) as resp:
        assert resp.status == 202
    assert [m.topic for m in recorder.messages] == ["alice/small"]


async def test_oversized_bodies_without_a_length_and_in_json_are_413(make_harness: Factory) -> None:
    h = await make_harness(limits=LimitsConfig(max_message_size=1000))
    recorder = h.recorder()

    async def chunked() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b"y" * 1024

    async with h.session.post(f"{h.url}/alice/chunked", data=chunked(), headers=ALICE) as resp:
        assert resp.status == 413
    # base64 makes the JSON larger than the message: the decoded size is what counts.
    body = {"topic": "alice/json", "payload": b64(b"z" * 1000)}
    async with h.session.post(f"{h.url}/publish", json=body, headers=ALICE) as resp:
        assert resp.status == 202
    body = {"topic": "alice/json", "payload": b64(b"z" * 1001)}
    async with h.session.post(f"{h.url}/publish", json=body, headers=ALICE) as resp:
        assert resp.status == 413
    assert [len(m.payload) for m in recorder.messages] == [1000]


async def test_rate_limits_are_429_with_retry_after(make_harness: Factory) -> None:
    ratelimit = RatelimitConfig(
        enabled=True,
        connection=RateConfig(rate=0.5, burst=2),
        message=RateConfig(rate=0.25, burst=1),
    )
    h = await make_harness(ratelimit=ratelimit)
    recorder = h.recorder()
    headers = {"X-Client-ID": "dev-1"}
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers={**ALICE, **headers}) as resp:
        assert resp.status == 202
    # Per client id: the second message waits 1 / 0.25 = 4 s.
    async with h.session.post(f"{h.url}/alice/x", data=b"2", headers={**ALICE, **headers}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "4"
    # A wrong password does not spend dev-1's message budget; it does spend the address's.
    h.clock[0] += 4.0
    async with h.session.post(f"{h.url}/alice/x", data=b"3", headers=headers) as resp:
        assert resp.status == 401
    # Per source address: the bucket of 2 refilled in 4 s; the 401 took one, this takes the other.
    async with h.session.post(f"{h.url}/alice/x", data=b"4", headers={**ALICE, **headers}) as resp:
        assert resp.status == 202
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "2"
    assert [m.payload for m in recorder.messages] == [b"1", b"4"]


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/alice/x", "POST"), ("PUT", "/alice/x", "POST"), ("DELETE", "/subscribe", "GET"), ("POST", "/subscribe?topic=a", None)],
)
async def test_other_methods_are_405(make_harness: Factory, method: str, path: str, allow: str | None) -> None:
    h = await make_harness()
    recorder = h.recorder()
    async with h.session.request(method, f"{h.url}{path}", headers=ALICE) as resp:
        if allow is None:
            # Only GET /subscribe streams; POST /subscribe publishes to the topic "subscribe".
            assert resp.status == 403
        else:
            assert resp.status == 405
            assert resp.headers["Allow"] == allow
            assert "error" in await resp.json()
    assert recorder.messages == []


async def test_an_unexpected_error_is_a_logged_500(
    make_harness: Factory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make_harness()

    def broken(message: Message, publisher: object = None) -> int:
        raise RuntimeError("router exploded")

    monkeypatch.setattr(h.router, "publish", broken)
    with caplog.at_level(logging.ERROR, logger="polygate.http"):
        async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
            assert resp.status == 500
            assert await resp.json() == {"error": "internal server error"}
    assert "router exploded" in caplog.text
    monkeypatch.undo()
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 202


async def test_secrets_never_reach_the_logs(make_harness: Factory, caplog: pytest.LogCaptureFixture) -> None:
    h = await make_harness()
    with caplog.at_level(logging.DEBUG):
        for headers in (ALICE, basic("alice", "s3cr3t-guess")):
            async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=headers) as resp:
                assert resp.status in (202, 401)
    assert "wonderland" not in caplog.text and "s3cr3t-guess" not in caplog.text


# -- what a publisher sees: the flow contract ----------------------------------------------------------


class Holder:
    """A subscriber whose queue holds every publisher it gets (as a full `block` queue does)."""

    def __init__(self) -> None:
        self.held: list[Any] = []
        self.forgotten: list[Any] = []

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Any) -> int:
        self.held.append(publisher)
        publisher.hold(self)
        return 0

    def forget_publisher(self, publisher: Any) -> None:
        self.forgotten.append(publisher)

    def release_all(self) -> None:
        for publisher in self.held:
            publisher.release(self)


class StoringSubscriber:
    """A durable subscriber: every delivery is a store write the publisher's answer must wait for."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Any) -> int:
        self.messages.append(message)
        return STORED


class ManualStore(MemoryStore):
    """Batches commit only when the test says so; `token` is the open batch."""

    durable = True
    acks_wait = True

    def __init__(self) -> None:
        self.open_batch = 1
        self.waiting: list[tuple[int, Callable[[], None]]] = []

    @property
    def token(self) -> int:
        return self.open_batch

    def when_committed(self, token: int, callback: Callable[[], None]) -> None:
        if token < self.open_batch:
            callback()
        else:
            self.waiting.append((token, callback))

    def commit(self) -> None:
        committed, self.open_batch = self.open_batch, self.open_batch + 1
        due = [callback for token, callback in self.waiting if token <= committed]
        self.waiting = [(token, callback) for token, callback in self.waiting if token > committed]
        for callback in due:
            callback()


async def test_a_full_reject_new_queue_makes_the_publish_503(make_harness: Factory) -> None:
    h = await make_harness()
    queue = MessageQueue(name="amqp-like", protocol=Protocol.AMQP091, limits=QueueLimits(1, 1 << 20, "reject_new"),
                         budget=h.router.budget, metrics=h.metrics)

    class Subscriber:
        def deliver(self, message: Message, qos: int, retain: bool, publisher: Any) -> int:
            return queue.put(message, 0, publisher)

    h.router.subscribe(Subscriber(), "alice/#", 1)
    async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 202
    for form in ({"url": f"{h.url}/alice/x", "data": b"2"}, {"url": f"{h.url}/publish", "json": {"topic": "alice/x"}}):
        async with h.session.post(**form, headers=ALICE) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert "subscriber queue is full" in (await resp.json())["error"]
    assert [entry[0].payload for entry in queue.entries] == [b"1"]
    assert h.metrics.messages_refused[Protocol.HTTP] == 2
    assert h.metrics.overflows[(Protocol.AMQP091, "reject_new")] == 2


async def test_a_held_publish_is_answered_once_released(make_harness: Factory) -> None:
    h = await make_harness()
    holder = Holder()
    h.router.subscribe(holder, "alice/#", 1)

    async def post() -> int:
        async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE) as resp:
            return resp.status

    answer = asyncio.create_task(post())
    await wait_for(lambda: len(holder.held) == 1, "the publish to be held")
    # Routed and held: the 202 waits for the holder (and cannot have been sent before it releases).
    assert not answer.done()
    holder.release_all()
    async with asyncio.timeout(DEADLINE):
        assert await answer == 202
    # Answered: nothing keeps the request's publisher any more.
    assert holder.forgotten == []


async def test_a_client_that_gives_up_while_held_is_forgotten(make_harness: Factory) -> None:
    h = await make_harness()
    holder = Holder()
    h.router.subscribe(holder, "alice/#", 1)
    answer = asyncio.create_task(h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE))
    await wait_for(lambda: len(holder.held) == 1, "the publish to be held")
    answer.cancel()  # the client closes the connection
    with contextlib.suppress(asyncio.CancelledError):
        await answer
    await wait_for(lambda: holder.forgotten == holder.held, "the holder to forget the publisher")


async def test_a_stored_publish_is_answered_after_the_commit(make_harness: Factory) -> None:
    store = ManualStore()
    h = await make_harness(store=store)
    durable = StoringSubscriber()
    h.router.subscribe(durable, "alice/#", 1)

    async def post() -> int:
        async with h.session.post(f"{h.url}/alice/x?qos=1", data=b"1", headers=ALICE) as resp:
            return resp.status

    answer = asyncio.create_task(post())
    await wait_for(lambda: bool(store.waiting), "the answer to wait for the store")
    assert [token for token, _ in store.waiting] == [1]
    assert not answer.done() and len(durable.messages) == 1
    store.commit()
    async with asyncio.timeout(DEADLINE):
        assert await answer == 202
    # A publish no durable queue wrote is answered without waiting for the store.
    h.router.unsubscribe_all(durable)
    async with h.session.post(f"{h.url}/alice/x?qos=1", data=b"2", headers=ALICE) as resp:
        assert resp.status == 202
    assert store.waiting == []


async def test_publishing_while_the_gateway_stops_is_503(make_harness: Factory) -> None:
    h = await make_harness()
    recorder = h.recorder("alice/x")
    # On a keep-alive connection opened before the stop began (a new one is refused at its accept).
    async with h.session.post(f"{h.url}/alice/before", data=b"0", headers=ALICE) as resp:
        assert resp.status == 202
    h.state.shutting_down = True
    for form in ({"url": f"{h.url}/alice/x", "data": b"1"}, {"url": f"{h.url}/publish", "json": {"topic": "alice/x"}}):
        async with h.session.post(**form, headers=ALICE) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"] == "1"
            assert "shutting down" in (await resp.json())["error"]
    assert recorder.messages == []
    assert h.metrics.messages_in[Protocol.HTTP] == 1


# -- server-sent events -----------------------------------------------------------------------------


async def test_stream_sends_retained_first_then_live_messages(make_harness: Factory) -> None:
    h = await make_harness()
    h.router.publish(Message("alice/a", b"old", 0, True))
    h.router.publish(Message("bob/b", b"not for alice", 0, True))
    params = [("topic", "alice/#"), ("topic", "alice/a")]
    async with h.session.get(f"{h.url}/subscribe", params=params, headers=ALICE) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        # Overlapping filters do not repeat a retained message.
        assert await next_event(resp) == {"topic": "alice/a", "payload": b64(b"old")}
        assert h.router.subscriptions(next(iter(h.frontend._streams))) == {"alice/#": 0, "alice/a": 0}
        h.router.publish(Message("bob/b", b"nope"))
        h.router.publish(Message("alice/b", b"\x00new\n"))
        assert await next_event(resp) == {"topic": "alice/b", "payload": b64(b"\x00new\n")}
        # A publish over HTTP reaches the stream too.
        async with h.session.post(f"{h.url}/alice/c", data=b"via http", headers=ALICE) as post:
            assert post.status == 202
        assert await next_event(resp) == {"topic": "alice/c", "payload": b64(b"via http")}
        assert h.metrics.messages_out[Protocol.HTTP] == 3
        # TCP connections count: the stream's, and the keep-alive one the POST came on.
        assert h.metrics.connections_open[Protocol.HTTP] == 2
        assert h.state.count("server.http.plain") == 2


async def test_a_stream_never_gets_what_its_decision_excludes(make_harness: Factory) -> None:
    h = await make_harness()
    h.provider.exclusions["alice/#"] = ("alice/secret/#",)
    h.router.publish(Message("alice/secret/old", b"hidden", 0, True))
    h.router.publish(Message("alice/open", b"seen", 0, True))
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        assert resp.status == 200
        assert await next_event(resp) == {"topic": "alice/open", "payload": b64(b"seen")}
        for topic in ("alice/secret/new", "alice/z"):
            async with h.session.post(f"{h.url}/{topic}", data=topic.encode(), headers=ALICE) as post:
                assert post.status == 202
        assert await next_event(resp) == {"topic": "alice/z", "payload": b64(b"alice/z")}
    assert h.metrics.messages_out[Protocol.HTTP] == 2


async def test_a_stream_with_queued_events_is_not_drained(make_harness: Factory) -> None:
    h = await make_harness()
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        assert resp.status == 200
        (stream,) = h.frontend._streams
        assert h.state.undrained() == []
        # No await: the writer cannot run yet, so the events wait in the stream's queue.
        for n in range(3):
            h.router.publish(Message("alice/x", str(n).encode()))
        assert [connection.attached for connection in h.state.undrained()] == [stream]  # type: ignore[attr-defined]
        assert h.router.budget.messages == 3
        assert [await next_event(resp) for _ in range(3)] == [
            {"topic": "alice/x", "payload": b64(str(n).encode())} for n in range(3)
        ]
        assert h.state.undrained() == [] and h.router.budget.messages == 0


async def test_stream_cleanup_when_the_client_goes_away(make_harness: Factory) -> None:
    h = await make_harness()
    resp = await h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE)
    assert resp.status == 200
    assert h.router.subscription_count == 1
    resp.close()  # drops the connection
    await wait_for(lambda: h.router.subscription_count == 0, "the subscription to go")
    await wait_for(lambda: h.state.count() == 0, "the stream to unregister")
    await wait_for(lambda: h.metrics.connections_open[Protocol.HTTP] == 0, "the connection gauge")
    assert h.metrics.connections_total[Protocol.HTTP] == 1
    assert h.frontend._streams == set()
    assert h.router.publish(Message("alice/x", b"after")) == 0


async def test_keepalive_comments_keep_an_idle_stream_open(make_harness: Factory) -> None:
    h = await make_harness(keepalive=0.05)
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        assert await next_event(resp, comments=True) == ": keepalive"
        h.router.publish(Message("alice/x", b"1"))
        assert await next_event(resp) == {"topic": "alice/x", "payload": b64(b"1")}


async def test_shutdown_ends_streams(make_harness: Factory) -> None:
    h = await make_harness()
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        h.router.publish(Message("alice/last", b"queued before shutdown"))
        await h.frontend.stop_accepting()
        await h.state.close_all("gateway shutting down", 2.0)
        # What was queued is flushed, then the stream ends.
        assert await next_event(resp) == {"topic": "alice/last", "payload": b64(b"queued before shutdown")}
        async with asyncio.timeout(DEADLINE):
            assert await resp.content.read() == b""
    assert h.router.subscription_count == 0
    with pytest.raises(aiohttp.ClientConnectionError):
        async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE):
            pass


async def test_a_full_queue_drops_its_oldest_counts_and_logs(
    make_harness: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    h = await make_harness(limits=LimitsConfig(max_queued_messages=3))
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as resp:
        with caplog.at_level(logging.WARNING, logger="polygate.queues"):
            # No await between publishes: the stream's writer cannot run, so its queue fills.
            # drop_oldest (the SSE default): the newest three are kept, the publisher is never told.
            assert {h.router.publish(Message("alice/x", str(n).encode())) for n in range(10)} == {ROUTED}
        assert [await next_event(resp) for _ in range(3)] == [
            {"topic": "alice/x", "payload": b64(str(n).encode())} for n in range(7, 10)
        ]
        assert h.metrics.messages_dropped[(Protocol.HTTP, "queue_full")] == 7
        assert h.metrics.overflows[(Protocol.HTTP, "drop_oldest")] == 7
        # The first overflow is logged, the following ones are only counted.
        assert len([r for r in caplog.records if "is full" in r.getMessage()]) == 1
        h.router.publish(Message("alice/x", b"later"))
        assert await next_event(resp) == {"topic": "alice/x", "payload": b64(b"later")}


async def test_max_connections_caps_tcp_connections_not_requests(make_harness: Factory) -> None:
    h = await make_harness(max_connections=1)
    async with h.session.get(f"{h.url}/subscribe", params={"topic": "alice/#"}, headers=ALICE) as first:
        assert first.status == 200
        # The stream holds the only connection: another one is closed at its accept, before any answer.
        for _ in range(2):
            reader, writer = await asyncio.open_connection(*h.frontend.bound)
            try:
                writer.write(b"POST /alice/x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\n1")
                async with asyncio.timeout(DEADLINE):
                    assert await reader.read() == b""
            except ConnectionResetError:
                pass
            finally:
                writer.close()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with h.session.post(f"{h.url}/alice/x", data=b"1", headers=ALICE):
                pass
        assert h.router.subscription_count == 1
        assert h.metrics.connections_refused[(Protocol.HTTP, "max_connections")] >= 3
        h.router.publish(Message("alice/x", b"1"))
        assert await next_event(first) == {"topic": "alice/x", "payload": b64(b"1")}
    await wait_for(lambda: h.state.count() == 0, "the stream's connection to close")
    # Requests are not connections: one keep-alive connection carries any number of them.
    for n in range(3):
        async with h.session.post(f"{h.url}/alice/x", data=str(n).encode(), headers=ALICE) as post:
            assert post.status == 202
    assert h.metrics.connections_total[Protocol.HTTP] == 2


# -- TLS ------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, made with the openssl CLI."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca_key.pem", "-out", "ca.pem", "-days", "1", "-subj", "/CN=Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    (directory / "client.ext").write_text("basicConstraints=CA:FALSE\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/O=Polygate, Test/CN=device-1")):
        _openssl("req", *ec, "-keyout", f"{name}_key.pem", "-out", f"{name}.csr", "-subj", subject, cwd=directory)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca_key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory,
        )
    return {name: directory / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool")
async def test_mtls_passes_the_client_certificate_subject(make_harness: Factory, tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    client_ssl = ssl.create_default_context(cafile=str(pki["ca"]))
    client_ssl.load_cert_chain(pki["client"], pki["client_key"])
    tls = {"cert_file": str(pki["server"]), "key_file": str(pki["server_key"]), "ca_file": str(pki["ca"]), "client_auth": "require"}
    h = await make_harness(tls=tls, ssl_client=client_ssl)
    recorder = h.recorder()
    url = h.url.replace("http://", "https://")
    async with h.session.post(f"{url}/alice/x", data=b"1", headers=ALICE) as resp:
        assert resp.status == 202
    assert [m.topic for m in recorder.messages] == ["alice/x"]
    # auth.mtls_identity (default common_name) picks the field; the frontend must pass it on.
    assert h.provider.events[0].tls_identity == "device-1"
    # Without a client certificate the handshake fails.
    no_cert = ssl.create_default_context(cafile=str(pki["ca"]))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=no_cert)) as other:
        with pytest.raises(aiohttp.ClientError):
            async with other.post(f"{url}/alice/x", data=b"1", headers=ALICE) as resp:
                await resp.read()
    assert len(recorder.messages) == 1


# -- properties ---------------------------------------------------------------------------------------

topic_names = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00+#"), min_size=1, max_size=40
)


def _percent_encode(topic: str) -> str:
    # Everything but '/' and ASCII letters/digits, so no client can normalise '.' segments.
    return "".join(
        ch if ch == "/" or (ch.isascii() and ch.isalnum()) else "".join(f"%{b:02X}" for b in ch.encode("utf-8"))
        for ch in topic
    )


async def test_any_valid_topic_round_trips_through_the_path_and_json(make_harness: Factory) -> None:
    protocols = MappingProxyType({p: p is not Protocol.HTTP for p in Protocol})
    h = await make_harness(auth=AuthConfig(provider="test", protocols=protocols))

    # Hypothesis drives sync functions: draw the examples first, then send them on this loop.
    examples: list[tuple[str, bytes]] = []

    @settings(max_examples=60, deadline=None, database=None)
    @given(topic=topic_names, payload=st.binary(max_size=64))
    @example(topic="publish", payload=b"json form only")
    def collect(topic: str, payload: bytes) -> None:
        examples.append((topic, payload))

    collect()
    for topic, payload in examples:
        # Subscribed to the topic itself: `#` would not match a topic starting with `$`.
        recorder = h.recorder(topic)
        # `POST /publish` is the JSON form: the topic "publish" is reachable only through it.
        forms = 1
        if topic != "publish":
            forms = 2
            url = URL(f"{h.url}/{_percent_encode(topic)}", encoded=True)
            async with h.session.post(url, data=payload) as resp:
                assert resp.status == 202, (topic, await resp.text())
        body = {"topic": topic, "payload": b64(payload), "retain": False}
        async with h.session.post(f"{h.url}/publish", json=body) as resp:
            assert resp.status == 202, (topic, await resp.text())
        assert recorder.messages == [Message(topic, payload)] * forms
        h.router.unsubscribe_all(recorder)


@given(topic=topic_names, payload=st.binary(max_size=256))
def test_an_event_is_one_data_line_that_decodes_back(topic: str, payload: bytes) -> None:
    event = encode_event(Message(topic, payload))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    line = event[len(b"data: "):-2]
    assert b"\n" not in line and b"\r" not in line
    assert json.loads(line) == {"topic": topic, "payload": b64(payload)}
