"""The CoAP frontend seen from aiocoap's client (and raw datagrams) against the real gateway.

Every test runs twice: on asyncio and on uvloop (what `polygate run` uses when
installed). The gateway's thread and the test's own loop (its clients, and a
frontend a test builds itself) are of the same kind.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import warnings
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiocoap
import pytest
from aiocoap import GET, POST, PUT, Message
from aiocoap.numbers import codes
from aiocoap.numbers.constants import Reliable
from aiocoap.numbers.types import ACK, CON, NON

from auth_providers.local_store import LocalStore
from gateway.config import parse_config
from gateway.context import FrontendContext
from gateway.dispatcher import Dispatcher
from gateway.events import AuthEvent, Decision, Identity, Protocol, Secret
from gateway.frontends import coap as coap_module
from gateway.frontends.coap import CoAPFrontend
from gateway.metrics import Metrics
from gateway.ratelimit import RateLimits
from gateway.router import Message as RouterMessage, Router
from gateway.state import GatewayState
from tests.conftest import ROOT_USER, UnavailableProvider, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

DEADLINE = 5.0
COAP = {"coap": {"plain": {"addr": "127.0.0.1:0"}}}
StartGateway = Callable[..., GatewayThread]
def coap_uri(port: int, topic: str, **query: Any) -> str:
    """`coap://127.0.0.1:<port>/<topic>?<query>`: each level percent-encoded (`#` as %23)."""
    path = "/".join(quote(level, safe="+") for level in topic.split("/"))
    suffix = "?" + urlencode(query) if query else ""
    return f"coap://127.0.0.1:{port}/{path}{suffix}"


@pytest.fixture
async def client() -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield context
    await context.shutdown()


@pytest.fixture
def root(root_password: str) -> dict[str, str]:
    return {"username": ROOT_USER, "password": root_password}


async def request(client: aiocoap.Context, code: Any, uri: str, payload: bytes = b"", **kwargs: Any) -> Message:
    async with asyncio.timeout(DEADLINE):
        return await client.request(Message(code=code, uri=uri, payload=payload), **kwargs).response


class Observer:
    """One Observe registration; every notification lands in `notifications` (the async iterator is lossy)."""

    def __init__(self, client: aiocoap.Context, uri: str, *, blockwise: bool = True) -> None:
        self.request = client.request(Message(code=GET, uri=uri, observe=0), handle_blockwise=blockwise)
        self.notifications: asyncio.Queue[Message] = asyncio.Queue()
        self.ended: asyncio.Queue[BaseException] = asyncio.Queue()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            self.request.observation.register_callback(self.notifications.put_nowait)
            self.request.observation.register_errback(self.ended.put_nowait)

    async def first(self) -> Message:
        async with asyncio.timeout(DEADLINE):
            return await self.request.response

    async def next(self) -> Message:
        async with asyncio.timeout(DEADLINE):
            return await self.notifications.get()


async def observe(client: aiocoap.Context, uri: str, *, blockwise: bool = True) -> Observer:
    observer = Observer(client, uri, blockwise=blockwise)
    first = await observer.first()
    assert first.code == codes.CONTENT, first.payload
    assert first.opt.observe == 0
    return observer


async def wait_for(check: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not check():
        if loop.time() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def subscriptions(gw: GatewayThread) -> int:
    assert gw.gateway is not None
    router = gw.gateway.router
    return gw.call(lambda: router.subscription_count)


def paho(gw: GatewayThread, root_password: str, client_id: str) -> PahoClient:
    return PahoClient(gw.mqtt_port, client_id=client_id, username=ROOT_USER, password=root_password).connect_ok()


def coap_frontend(gw: GatewayThread) -> CoAPFrontend:
    assert gw.gateway is not None
    frontend = gw.gateway.frontends["coap"][0]
    assert isinstance(frontend, CoAPFrontend)
    return frontend


def serving(gw: GatewayThread) -> bool:
    return gw.call(coap_frontend(gw).serving)


def coap_errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ERROR records of the CoAP frontend and of its aiocoap stack (polygate.coap.aiocoap)."""
    return [
        f"{record.name}: {record.getMessage()}" for record in caplog.records
        if record.levelno >= logging.ERROR and record.name.startswith("polygate.coap")
    ]


async def new_client() -> aiocoap.Context:
    return await aiocoap.Context.create_client_context(transports=["udp6"])


# -- publish and observe ---------------------------------------------------------------------------


async def test_post_reaches_mqtt_subscriber_with_identical_bytes(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    sub = paho(gw, root_password, "sub")
    try:
        assert sub.subscribe(("t/#", 1)) == [1]
        payload = bytes(range(256))
        response = await request(client, POST, coap_uri(port, "t/a", **root, qos=1), payload)
        assert response.code == codes.CHANGED
        received = await asyncio.to_thread(sub.next_message)
        assert (received.topic, received.payload, received.qos) == ("t/a", payload, 1)
        response = await request(client, POST, coap_uri(port, "mqtt/publish/t/b", **root), b"alias")
        assert response.code == codes.CHANGED
        received = await asyncio.to_thread(sub.next_message)
        assert (received.topic, received.payload, received.qos) == ("t/b", b"alias", 0)
    finally:
        sub.disconnect()


async def test_mqtt_publish_reaches_observer_con_for_qos1_non_for_qos0(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    observer = await observe(client, coap_uri(gw.port("coap"), "dev/+/state", **root), blockwise=False)
    pub = paho(gw, root_password, "pub")
    try:
        pub.publish("dev/1/state", b"on", qos=1)
        note = await observer.next()
        assert (note.code, note.payload, note.opt.location_path, note.mtype) == (codes.CONTENT, b"on", ("dev", "1", "state"), CON)
        pub.publish("dev/2/state", b"off", qos=0)
        note = await observer.next()
        assert (note.payload, note.opt.location_path, note.mtype) == (b"off", ("dev", "2", "state"), NON)
        pub.publish("dev/2/other", b"not matched", qos=1)
        pub.publish("dev/3/state", b"last", qos=1)
        assert (await observer.next()).payload == b"last"
    finally:
        pub.disconnect()


async def test_observer_receives_every_message_in_order_retained_first(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    assert (await request(client, POST, coap_uri(port, "s/kept", **root, retain="true"), b"retained")).code == codes.CHANGED
    observer = await observe(client, coap_uri(port, "s/#", **root), blockwise=False)
    assert (await observer.next()).payload == b"retained"
    pub = paho(gw, root_password, "pub")
    try:
        for index in range(50):
            pub.publish("s/n", str(index).encode(), qos=index % 2)
        got = [(await observer.next()).payload for _ in range(50)]
        assert got == [str(index).encode() for index in range(50)]
    finally:
        pub.disconnect()


async def test_get_without_observe_reads_the_retained_message(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    assert (await request(client, GET, coap_uri(port, "r/x", **root))).code == codes.NOT_FOUND
    await request(client, POST, coap_uri(port, "r/x", **root, retain=1), b"state")
    response = await request(client, GET, coap_uri(port, "r/x", **root))
    assert (response.code, response.payload, response.opt.location_path) == (codes.CONTENT, b"state", ("r", "x"))
    response = await request(client, GET, coap_uri(port, "r/+", **root))
    assert response.code == codes.BAD_REQUEST


# -- how observations end --------------------------------------------------------------------------


async def test_cancelled_observation_removes_the_router_subscription(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    # Without aiocoap's block-wise wrapper: it loses a cancel() that comes before its first notification.
    observer = await observe(client, coap_uri(gw.port("coap"), "c/#", **root), blockwise=False)
    assert subscriptions(gw) == 1
    observer.request.observation.cancel()
    pub = paho(gw, root_password, "pub")
    try:
        # aiocoap's client answers the next confirmable notification with RST.
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while subscriptions(gw):
            assert loop.time() < end, "the subscription outlived the observation"
            pub.publish("c/x", b"anyone?", qos=1)
            await asyncio.sleep(0.05)
    finally:
        pub.disconnect()


class RawPeer:
    """A UDP socket speaking CoAP through aiocoap's own codec, for what its client will not send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(DEADLINE)
        self.address = ("127.0.0.1", port)
        self._mid = 0x1000

    def send(self, message: Message) -> None:
        self._mid += 1
        message.mid = self._mid
        self.sock.sendto(message.encode(), self.address)

    def receive(self) -> Message:
        data, _ = self.sock.recvfrom(65536)
        return Message.decode(data)

    def response(self) -> Message:
        """The next answer, acknowledged if confirmable.

        An answer slower than aiocoap's EMPTY_ACK_DELAY (a loaded machine)
        comes as an empty ACK and then a CON of its own, not piggybacked.
        """
        while True:
            message = self.receive()
            if message.mtype is CON:
                ack = Message(code=codes.EMPTY)
                ack.mtype, ack.mid = ACK, message.mid
                self.sock.sendto(ack.encode(), self.address)
            if message.code != codes.EMPTY:
                return message

    def close(self) -> None:
        self.sock.close()


def raw_get(path: tuple[str, ...], query: dict[str, str], *, token: bytes, observe: int | None) -> Message:
    message = Message(code=GET, uri_path=path, uri_query=tuple(f"{k}={v}" for k, v in query.items()))
    message.mtype = CON
    message.token = token
    if observe is not None:
        message.opt.observe = observe
    return message


async def test_deregistration_with_observe_1_removes_the_subscription(
    start_gateway: StartGateway, root: dict[str, str]
) -> None:
    gw = start_gateway(server=COAP)
    peer = RawPeer(gw.port("coap"))
    try:
        peer.send(raw_get(("d", "#"), root, token=b"\x07\x07", observe=0))
        first = await asyncio.to_thread(peer.response)
        assert (first.code, first.opt.observe, first.token) == (codes.CONTENT, 0, b"\x07\x07")
        assert subscriptions(gw) == 1
        peer.send(raw_get(("d", "x"), root, token=b"\x07\x07", observe=1))
        answer = await asyncio.to_thread(peer.response)
        assert answer.code == codes.NOT_FOUND  # answered as a plain GET: nothing retained on d/x
        await wait_for(lambda: subscriptions(gw) == 0, "the deregistered subscription to go")
    finally:
        peer.close()


class AllowAll:
    def __init__(self) -> None:
        self.events: list[AuthEvent] = []

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.events.append(event)
        return Decision.allow(Identity(external_id=event.client_id, username=event.username))

    async def authorize(self, event: AuthEvent, identity: Identity) -> Decision:
        return Decision.allow(identity)


class QuickGiveUp(Reliable):
    ACK_TIMEOUT = 0.05
    ACK_RANDOM_FACTOR = 1.0
    MAX_RETRANSMIT = 2


async def test_observer_that_stops_acknowledging_loses_its_subscription() -> None:
    config = parse_config({"server": {**COAP, "health_addr": ""}, "auth": {"provider": "none"}})
    metrics = Metrics()
    router = Router()
    state = GatewayState()
    ctx = FrontendContext(
        config=config,
        dispatcher=Dispatcher(config.auth, limits=config.limits, metrics=metrics, provider=AllowAll()),
        router=router,
        metrics=metrics,
        state=state,
        ratelimits=RateLimits(config.ratelimit),
    )
    frontend = CoAPFrontend(ctx, config.server.coap[0], reliable_tuning=QuickGiveUp())
    await frontend.start()
    peer = RawPeer(frontend.bound[1])
    try:
        peer.send(raw_get(("q",), {}, token=b"\x01", observe=0))
        assert (await asyncio.to_thread(peer.response)).opt.observe == 0
        assert router.subscription_count == 1 and state.count() == 1
        router.publish(RouterMessage("q", b"are you there?", 1))
        # The peer reads but never acknowledges: the CON is sent 1 + MAX_RETRANSMIT times, then given up.
        for _ in range(3):
            note = await asyncio.to_thread(peer.receive)
            assert (note.mtype, note.payload) == (CON, b"are you there?")
        await wait_for(lambda: router.subscription_count == 0, "the unacknowledged observation to end")
        await wait_for(lambda: state.count() == 0, "the observation to leave the gateway state")
        assert metrics.connections_open[Protocol.COAP] == 0
    finally:
        peer.close()
        await frontend.stop_accepting()
        await frontend.aclose()


async def test_observer_whose_port_closed_is_dropped_on_the_icmp_error(
    start_gateway: StartGateway, root_password: str, root: dict[str, str]
) -> None:
    gw = start_gateway(server=COAP)
    gone = await aiocoap.Context.create_client_context(transports=["udp6"])
    await observe(gone, coap_uri(gw.port("coap"), "i/#", **root))
    assert subscriptions(gw) == 1
    await gone.shutdown()
    pub = paho(gw, root_password, "pub")
    try:
        pub.publish("i/x", b"to a closed port", qos=0)
        await wait_for(lambda: subscriptions(gw) == 0, "the ICMP error to end the observation")
    finally:
        pub.disconnect()


async def test_shutdown_ends_observations_with_5_03(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    observer = await observe(client, coap_uri(gw.port("coap"), "z/#", **root), blockwise=False)
    await asyncio.to_thread(gw.stop)
    final = await observer.next()
    assert final.code == codes.SERVICE_UNAVAILABLE
    assert b"shutting down" in final.payload


# -- clients that vanish, and a listener that stops reading ----------------------------------------
#
# A datagram to a port that closed comes back as an ICMP port-unreachable,
# queued on the listener's socket (IP_RECVERR): on uvloop that used to end the
# reading of the socket for good, and on both loops the pending error failed
# the next send, whoever it went to.


class HeldAuth(AllowAll):
    """Allows everything, once the test releases it: until then authentication waits."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = threading.Event()
        self.release = threading.Event()

    async def authenticate(self, event: AuthEvent) -> Decision:
        self.asked.set()
        await asyncio.to_thread(self.release.wait, DEADLINE)
        return await super().authenticate(event)


def record_errors(gw: GatewayThread) -> list[Any]:
    """The remotes the CoAP message layer is told about an error for (an ICMP error, a failed send), in order."""
    remotes: list[Any] = []
    layer = coap_frontend(gw).layer
    dispatch = layer.dispatch_error

    def recording(error: Exception, remote: Any) -> None:
        remotes.append(remote)
        dispatch(error, remote)

    gw.call(lambda: setattr(layer, "dispatch_error", recording))
    return remotes


async def test_vanished_observers_leave_the_listener_serving(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context,
    caplog: pytest.LogCaptureFixture,
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    live = await observe(client, coap_uri(port, "v/#", **root), blockwise=False)
    # Two observers that go without deregistering: an aiocoap client shut down, and a raw socket closed.
    gone = await new_client()
    try:
        await observe(gone, coap_uri(port, "v/#", **root))
    finally:
        await gone.shutdown()
    raw = RawPeer(port)
    try:
        raw.send(raw_get(("v", "#"), root, token=b"\x0f", observe=0))
        assert (await asyncio.to_thread(raw.response)).opt.observe == 0
    finally:
        raw.close()
    assert subscriptions(gw) == 3
    pub = paho(gw, root_password, "pub")
    try:
        # Notifications to both closed ports: each comes back as an ICMP error, which ends its observation.
        for qos in (0, 1):
            pub.publish("v/x", b"qos %d" % qos, qos=qos)
            assert (await live.next()).payload == b"qos %d" % qos
        await wait_for(lambda: subscriptions(gw) == 1, "the ICMP errors to end the vanished observations")
    finally:
        pub.disconnect()
    fresh = await new_client()
    try:
        response = await request(fresh, POST, coap_uri(port, "v/after", **root, qos=1, retain=1), b"after")
        assert response.code == codes.CHANGED
        assert (await live.next()).payload == b"after"
        assert (await request(fresh, GET, coap_uri(port, "v/after", **root))).payload == b"after"
    finally:
        await fresh.shutdown()
    assert not coap_errors(caplog)
    assert serving(gw)


async def test_con_get_whose_client_closed_before_the_reply_leaves_the_listener_serving(
    start_gateway: StartGateway, client: aiocoap.Context
) -> None:
    provider = HeldAuth()
    gw = start_gateway(server=COAP, provider=provider)
    port = gw.port("coap")
    errors = record_errors(gw)
    peer = RawPeer(port)
    closed_port = peer.sock.getsockname()[1]
    try:
        peer.send(raw_get(("h", "x"), {"username": "u", "password": "p"}, token=b"\x0b", observe=None))
        assert await asyncio.to_thread(provider.asked.wait, DEADLINE)
    finally:
        peer.close()
    provider.release.set()
    # The reply (4.04: nothing retained) goes to the closed port and its ICMP error comes back.
    await wait_for(lambda: any(remote.sockaddr[1] == closed_port for remote in errors), "the ICMP error")
    for index in range(3):
        response = await request(client, POST, coap_uri(port, f"h/{index}", username="u", password="p"), b"x")
        assert response.code == codes.CHANGED
    assert serving(gw)


async def test_21_sequential_clients_are_all_answered(
    start_gateway: StartGateway, root: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """Each client opens its own context, asks once and shuts down; an observer leaves without
    deregistering, so later publishes send notifications to closed ports in between."""
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    for index in range(21):
        context = await new_client()
        try:
            if index % 3 == 0:
                await observe(context, coap_uri(port, "seq/#", **root))
            elif index % 3 == 1:
                uri = coap_uri(port, f"seq/{index}", **root, qos=1, retain=1)
                assert (await request(context, POST, uri, b"%d" % index)).code == codes.CHANGED, index
            else:
                response = await request(context, GET, coap_uri(port, f"seq/{index - 1}", **root))
                assert (response.code, response.payload) == (codes.CONTENT, b"%d" % (index - 1)), index
        finally:
            await context.shutdown()
    assert not coap_errors(caplog)
    assert serving(gw)


async def test_sequential_observers_each_get_every_notification(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    for index in range(6):
        context = await new_client()
        try:
            observer = await observe(context, coap_uri(port, "so/#", **root), blockwise=False)
            for qos in (1, 0):
                payload = b"%d qos %d" % (index, qos)
                response = await request(client, POST, coap_uri(port, f"so/{index}", **root, qos=qos), payload)
                assert response.code == codes.CHANGED
                note = await observer.next()
                assert (note.payload, note.opt.location_path) == (payload, ("so", str(index)))
        finally:
            # Without deregistering: the next notification of this observation meets a closed port.
            await context.shutdown()
    assert not coap_errors(caplog)
    assert serving(gw)


async def test_serving_is_false_once_the_socket_is_no_longer_read(
    start_gateway: StartGateway, root: dict[str, str], caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The watchdog's verdict takes one to two intervals of input waiting; a short one keeps the test short.
    monkeypatch.setattr(coap_module, "WATCHDOG_INTERVAL", 0.1)
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    assert serving(gw)
    reader_fd = coap_frontend(gw).layer.message_interface.transport.reader_fd
    gw.call(lambda: gw.loop.remove_reader(reader_fd))  # what uvloop did on an ICMP error, silently
    peer = RawPeer(port)
    try:
        # Input that waits: the watchdog notices nobody reads it.
        peer.send(raw_get(("t",), root, token=b"\x05", observe=None))
        await wait_for(lambda: not serving(gw), "serving() to turn False")
    finally:
        peer.close()
    gw.stop()
    stopped = [error for error in coap_errors(caplog) if "stopped reading its socket" in error]
    assert len(stopped) == 1, stopped


# -- auth ------------------------------------------------------------------------------------------


async def test_bad_or_missing_credentials_are_4_01(
    start_gateway: StartGateway, root_password: str, client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    wrong = {"username": ROOT_USER, "password": root_password + "x"}
    for response in (
        await request(client, POST, coap_uri(port, "t", **wrong), b"x"),
        await request(client, POST, coap_uri(port, "t"), b"x"),
        await Observer(client, coap_uri(port, "t/#", **wrong)).first(),
    ):
        assert (response.code, response.payload) == (codes.UNAUTHORIZED, b"bad credentials")
    assert subscriptions(gw) == 0


@pytest.fixture
def alice_db(db_path: str) -> str:
    store = LocalStore(db_path)
    store.add_user("alice", Secret("wonderland"))
    store.grant("alice", "alice/#", {"publish", "subscribe"})
    store.close()
    return db_path


async def test_acl_user_denied_publish_and_observe_are_4_03(
    start_gateway: StartGateway, alice_db: str, client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    alice = {"username": "alice", "password": "wonderland"}
    assert (await request(client, POST, coap_uri(port, "alice/x", **alice), b"ok")).code == codes.CHANGED
    denied = await request(client, POST, coap_uri(port, "bob/x", **alice), b"no")
    assert (denied.code, denied.payload) == (codes.FORBIDDEN, b"not authorized to publish 'bob/x'")
    refused = await Observer(client, coap_uri(port, "bob/#", **alice)).first()
    assert (refused.code, refused.opt.observe) == (codes.FORBIDDEN, None)
    wider = await Observer(client, coap_uri(port, "#", **alice)).first()
    assert wider.code == codes.FORBIDDEN
    await observe(client, coap_uri(port, "alice/#", **alice))
    assert subscriptions(gw) == 1
    # The bare secret in `auth=` (alias of `authorization=`) with the user named.
    bare = await request(client, POST, coap_uri(port, "alice/y", username="alice", auth="wonderland"), b"ok")
    assert bare.code == codes.CHANGED
    both = await request(client, POST, coap_uri(port, "alice/y", username="alice", password="a", auth="b"), b"x")
    assert both.code == codes.BAD_REQUEST


async def test_observing_a_partly_denied_filter_skips_the_denied_topics(
    start_gateway: StartGateway, db_path: str, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    store = LocalStore(db_path)
    store.add_user("alice", Secret("wonderland"))
    store.grant("alice", "alice/#", {"publish", "subscribe"})
    store.grant("alice", "alice/secret/#", {"subscribe"}, deny=True)
    store.close()
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    alice = {"username": "alice", "password": "wonderland"}
    for topic, payload in (("alice/secret/kept", b"hidden"), ("alice/kept", b"shown")):
        response = await request(client, POST, coap_uri(port, topic, **root, qos=1, retain=1), payload)
        assert response.code == codes.CHANGED
    observer = await observe(client, coap_uri(port, "alice/#", **alice), blockwise=False)
    # The retained replay leaves out the denied topic too.
    note = await observer.next()
    assert (note.payload, note.opt.location_path) == (b"shown", ("alice", "kept"))
    pub = paho(gw, root_password, "pub")
    try:
        pub.publish("alice/secret/key", b"hidden", qos=1)
        pub.publish("alice/temp", b"21.5", qos=1)
        note = await observer.next()
        assert (note.payload, note.opt.location_path) == (b"21.5", ("alice", "temp"))
        assert observer.notifications.empty()
    finally:
        pub.disconnect()
    denied = await request(client, GET, coap_uri(port, "alice/secret/kept", **alice))
    assert denied.code == codes.FORBIDDEN


async def test_auth_service_unavailable_is_5_03_with_max_age(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP, provider=UnavailableProvider())
    port = gw.port("coap")
    for response in (
        await request(client, POST, coap_uri(port, "t", **root), b"x"),
        await Observer(client, coap_uri(port, "t/#", **root)).first(),
    ):
        assert response.code == codes.SERVICE_UNAVAILABLE
        assert response.payload == b"auth service unavailable, try again later"
        assert response.opt.max_age is not None and response.opt.max_age >= 1
    assert subscriptions(gw) == 0


async def test_client_id_is_the_query_parameter_or_the_peer(
    start_gateway: StartGateway, client: aiocoap.Context
) -> None:
    provider = AllowAll()
    gw = start_gateway(server=COAP, provider=provider)
    port = gw.port("coap")
    await request(client, POST, coap_uri(port, "t", client_id="sensor-7", username="u", password="p"), b"x")
    await request(client, POST, coap_uri(port, "t", username="u", password="p"), b"x")
    first, second = provider.events
    assert (first.protocol, first.client_id, first.username, first.secret) == (Protocol.COAP, "sensor-7", "u", Secret("p"))
    assert second.client_id.startswith("coap:127.0.0.1:") and second.peer == second.client_id[len("coap:"):]


# -- sizes and block-wise transfer -----------------------------------------------------------------


async def test_4kb_payloads_travel_block_wise_both_ways(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    observer = await observe(client, coap_uri(port, "big/#", **root))
    sub = paho(gw, root_password, "sub")
    pub = paho(gw, root_password, "pub")
    try:
        sub.subscribe(("big/#", 1))
        upload = os.urandom(4096)
        assert (await request(client, POST, coap_uri(port, "big/up", **root), upload)).code == codes.CHANGED
        assert (await asyncio.to_thread(sub.next_message)).payload == upload
        assert (await observer.next()).payload == upload
        # Two large notifications in a row: the second waits until the first was fetched.
        downloads = [os.urandom(4096), os.urandom(5000)]
        for payload in downloads:
            pub.publish("big/down", payload, qos=1)
        for payload in downloads:
            note = await observer.next()
            assert (note.payload, note.opt.location_path) == (payload, ("big", "down"))
        retained = os.urandom(3000)
        pub.publish("big/kept", retained, qos=1, retain=True)
        assert (await observer.next()).payload == retained
        assert (await request(client, GET, coap_uri(port, "big/kept", **root))).payload == retained
    finally:
        sub.disconnect()
        pub.disconnect()


async def test_oversized_payloads_are_4_13(
    tmp_path: Path, start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(loopback_config(tmp_path, server=COAP, limits={"max_message_size": 2000}))
    port = gw.port("coap")
    assert (await request(client, POST, coap_uri(port, "t", **root), os.urandom(2000))).code == codes.CHANGED
    blockwise = await request(client, POST, coap_uri(port, "t", **root), os.urandom(4096))
    assert (blockwise.code, blockwise.opt.size1) == (codes.REQUEST_ENTITY_TOO_LARGE, 2000)
    # One datagram, no Block1: the payload itself is over the limit.
    whole = await request(client, POST, coap_uri(port, "t", **root), os.urandom(3000), handle_blockwise=False)
    assert (whole.code, whole.opt.size1) == (codes.REQUEST_ENTITY_TOO_LARGE, 2000)


async def test_garbage_and_oversized_datagrams_do_not_disturb_another_client(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    observer = await observe(client, coap_uri(port, "g/#", **root), blockwise=False)
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        truncated_post = Message(code=POST, uri_path=("g", "cut"), payload=b"A" * 9000)
        truncated_post.mtype, truncated_post.mid = CON, 1
        for datagram in (
            os.urandom(10_000), b"\xff" * 60_000, b"", b"\x40", os.urandom(7),
            b"\x40\x01\x00\x01\xb2\xff\xfe",  # GET with a Uri-Path that is not UTF-8
            truncated_post.encode(),  # a valid message, longer than one read: must not publish its first 4 KB
        ):
            raw.sendto(datagram, ("127.0.0.1", port))
    finally:
        raw.close()
    assert gw.gateway is not None
    dropped = gw.gateway.metrics.messages_dropped
    await wait_for(
        lambda: gw.call(lambda: dropped[(Protocol.COAP, "datagram_too_large")] == 3
                        and dropped[(Protocol.COAP, "malformed_datagram")] >= 3),
        "the bad datagrams to be counted",
    )
    response = await request(client, POST, coap_uri(port, "g/after", **root), b"still here")
    assert response.code == codes.CHANGED
    note = await observer.next()
    assert (note.payload, note.opt.location_path) == (b"still here", ("g", "after"))


@pytest.mark.filterwarnings("error::RuntimeWarning", "error::pytest.PytestUnraisableExceptionWarning")
async def test_a_token_repeated_in_one_burst_leaves_no_coroutine_unawaited(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    """A request that a second one with its token replaces before its render task ran (one read of
    the listener takes up to READ_BATCH datagrams) is dropped without a never-awaited coroutine."""
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for mid in range(1, 61):
            repeated = Message(code=GET, uri_path=("r", "x"), uri_query=tuple(f"{k}={v}" for k, v in root.items()))
            repeated.mtype, repeated.mid, repeated.token = NON, mid, b"\x01"
            raw.sendto(repeated.encode(), ("127.0.0.1", port))
    finally:
        raw.close()
    # Served on: the burst cost nothing but its own answers.
    assert (await request(client, POST, coap_uri(port, "r/after", **root), b"x")).code == codes.CHANGED
    gw.stop()  # every render task of the burst has ended, and its coroutine with it


# -- bad requests and limits -----------------------------------------------------------------------


async def test_bad_topics_methods_and_options(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    base = f"coap://127.0.0.1:{port}"
    query = "?" + urlencode(root)
    for code, uri in (
        (POST, coap_uri(port, "a/+", **root)),
        (POST, coap_uri(port, "a/#", **root)),
        (POST, f"{base}/{query}"),
        (POST, coap_uri(port, "t", **root, qos=3)),
        (POST, coap_uri(port, "t", **root, retain="maybe")),
        (POST, f"{base}/t{query}&qos=1&qos=0"),
    ):
        response = await request(client, code, uri, b"x")
        assert response.code == codes.BAD_REQUEST, (uri, response.payload)
    refused = await Observer(client, coap_uri(port, "a/#/b", **root)).first()
    assert refused.code == codes.BAD_REQUEST
    assert (await request(client, PUT, coap_uri(port, "t", **root), b"x")).code == codes.METHOD_NOT_ALLOWED
    conditional = Message(code=POST, uri=coap_uri(port, "t", **root), payload=b"x")
    conditional.opt.if_none_match = True  # a critical option this frontend does not act on
    async with asyncio.timeout(DEADLINE):
        assert (await client.request(conditional).response).code == codes.BAD_OPTION
    assert subscriptions(gw) == 0


async def test_max_connections_caps_observations(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server={"coap": {"plain": {"addr": "127.0.0.1:0", "max_connections": 1}}})
    port = gw.port("coap")
    await observe(client, coap_uri(port, "m/#", **root))
    refused = await Observer(client, coap_uri(port, "n/#", **root)).first()
    assert (refused.code, refused.payload) == (codes.SERVICE_UNAVAILABLE, b"too many observations on this listener")
    # Publishing is not a connection: it still works.
    assert (await request(client, POST, coap_uri(port, "m/x", **root), b"x")).code == codes.CHANGED


async def test_requests_over_the_rate_limit_are_4_29(
    tmp_path: Path, start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(loopback_config(
        tmp_path, server=COAP,
        ratelimit={"enabled": True, "connection": {"rate": 0.01, "burst": 2}, "message": {"enabled": False}},
    ))
    port = gw.port("coap")
    codes_seen = [(await request(client, POST, coap_uri(port, "t", **root), b"x")).code for _ in range(2)]
    assert codes_seen == [codes.CHANGED, codes.CHANGED]
    limited = await request(client, POST, coap_uri(port, "t", **root), b"x")
    assert limited.code == codes.TOO_MANY_REQUESTS
    assert limited.opt.max_age is not None and limited.opt.max_age >= 1
