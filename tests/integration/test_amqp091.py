"""The AMQP 0.9.1 frontend seen from pika and aio-pika (and raw sockets), with the local provider."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import pika
import pika.exceptions
import pytest
from pamqp import commands, frame as pamqp_frame

from auth_providers.local_store import LocalStore
from gateway.amqp091.framing import PROTOCOL_HEADER
from gateway.events import Protocol, Secret
from tests.conftest import ROOT_USER, UnavailableProvider
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

ALICE_PASSWORD = "alice-pw-51c2"
BOB_PASSWORD = "bob-pw-9d04"
AMQP091 = {"amqp091": {"plain": {"addr": "127.0.0.1:0"}}}


@pytest.fixture
def users_db(db_path: str) -> str:
    store = LocalStore(db_path)
    try:
        store.add_user("alice", Secret(ALICE_PASSWORD))
        store.grant("alice", "alice/#", {"publish", "subscribe"})
        store.add_user("bob", Secret(BOB_PASSWORD))
        store.grant("bob", "bob/#", {"publish", "subscribe"})
    finally:
        store.close()
    return db_path


@pytest.fixture
def gw(start_gateway: Callable[..., GatewayThread], users_db: str) -> GatewayThread:
    return start_gateway(server=AMQP091)


@pytest.fixture
def connect(gw: GatewayThread, root_password: str) -> Iterator[Callable[..., pika.BlockingConnection]]:
    """Open pika connections to `gw` (root by default); all are closed after the test."""
    made: list[pika.BlockingConnection] = []
    passwords = {ROOT_USER: root_password, "alice": ALICE_PASSWORD, "bob": BOB_PASSWORD}

    def make(user: str = ROOT_USER, password: str | None = None, **params: Any) -> pika.BlockingConnection:
        conn = pika.BlockingConnection(_params(gw, user, password or passwords[user], **params))
        made.append(conn)
        return conn

    yield make
    for conn in made:
        if conn.is_open:
            try:
                conn.close()
            except Exception:
                pass


def _params(gw: GatewayThread, user: str, password: str, **params: Any) -> pika.ConnectionParameters:
    return pika.ConnectionParameters("127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(user, password),
                                     connection_attempts=1, socket_timeout=5, blocked_connection_timeout=10, **params)


def _closed_by_broker(call: Callable[[], object]) -> pika.exceptions.ChannelClosedByBroker:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        call()
    return info.value


# -- authentication -----------------------------------------------------------------------------------


def test_bad_credentials_close_the_connection_with_403(gw: GatewayThread) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as info:
        pika.BlockingConnection(_params(gw, "alice", "wrong"))
    assert "403" in str(info.value) and "ACCESS_REFUSED" in str(info.value)

    async def aio() -> None:
        with pytest.raises(aiormq.exceptions.ProbableAuthenticationError) as failure:
            await aio_pika.connect(f"amqp://alice:wrong@127.0.0.1:{gw.port('amqp091')}/", timeout=5)
        assert "ACCESS_REFUSED" in str(failure.value)

    asyncio.run(aio())


def test_auth_service_unavailable_is_541_not_403(start_gateway: Callable[..., GatewayThread]) -> None:
    gw = start_gateway(server=AMQP091, provider=UnavailableProvider())
    with pytest.raises(pika.exceptions.AMQPConnectionError) as info:
        pika.BlockingConnection(_params(gw, "alice", ALICE_PASSWORD))
    text = str(info.value)
    assert "541" in text and "auth service unavailable" in text and "403" not in text

    async def aio() -> None:
        with pytest.raises(aiormq.exceptions.ConnectionClosed) as failure:
            await aio_pika.connect(f"amqp://alice:{ALICE_PASSWORD}@127.0.0.1:{gw.port('amqp091')}/", timeout=5)
        assert failure.value.args[0] == 541 and "auth service unavailable" in failure.value.args[1]

    asyncio.run(aio())


class RecordingProvider:
    """Allows everyone and remembers the client id of every event, as an auth service would see it."""

    def __init__(self) -> None:
        self.client_ids: list[str] = []

    async def start(self) -> None: ...

    async def aclose(self) -> None: ...

    def ready(self) -> bool:
        return True

    async def authenticate(self, event: Any) -> Any:
        from gateway.events import Decision, Identity

        self.client_ids.append(event.client_id)
        if event.secret.reveal() != b"right":
            return Decision.deny("bad password")
        return Decision.allow(Identity(external_id=event.username, username=event.username))

    async def authorize(self, event: Any, identity: Any) -> Any:
        from gateway.events import Decision

        self.client_ids.append(event.client_id)
        return Decision.allow(identity)


def test_client_id_is_connection_name_or_peer(start_gateway: Callable[..., GatewayThread]) -> None:
    provider = RecordingProvider()
    gw = start_gateway(server=AMQP091, provider=provider)
    named = pika.BlockingConnection(_params(gw, "dev", "right", client_properties={"connection_name": "sensor-7"}))
    anonymous = pika.BlockingConnection(_params(gw, "dev", "right"))
    try:
        local_port = anonymous._impl._transport._sock.getsockname()[1]
        assert provider.client_ids == ["sensor-7", f"amqp091:127.0.0.1:{local_port}"]
    finally:
        named.close()
        anonymous.close()


def test_amqplain_login(gw: GatewayThread, root_password: str) -> None:
    from pamqp import encode

    def amqplain(user: str, password: str) -> str:
        return encode.field_table({"LOGIN": user, "PASSWORD": password})[4:].decode()

    raw = RawClient(gw.port("amqp091"))
    try:
        raw.send(PROTOCOL_HEADER)
        start = raw.expect(commands.Connection.Start)
        assert start.mechanisms.split() == ["PLAIN", "AMQPLAIN"]
        raw.send(pamqp_frame.marshal(commands.Connection.StartOk(
            client_properties={}, mechanism="AMQPLAIN", response=amqplain(ROOT_USER, root_password)), 0))
        raw.expect(commands.Connection.Tune)
    finally:
        raw.close()
    raw = RawClient(gw.port("amqp091"))
    try:
        raw.send(PROTOCOL_HEADER)
        raw.expect(commands.Connection.Start)
        raw.send(pamqp_frame.marshal(commands.Connection.StartOk(
            client_properties={}, mechanism="AMQPLAIN", response=amqplain(ROOT_USER, "wrong")), 0))
        assert raw.expect(commands.Connection.Close).reply_code == 403
    finally:
        raw.close()


# -- authorization and ownership --------------------------------------------------------------------------


def test_denied_publish_closes_the_channel_with_403(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect("alice")
    channel = conn.channel()
    channel.confirm_delivery()
    channel.basic_publish("amq.topic", "alice.ok", b"allowed")
    error = _closed_by_broker(lambda: channel.basic_publish("amq.topic", "bob.inbox", b"denied"))
    assert error.reply_code == 403 and "bob/inbox" in error.reply_text
    # Only the channel closed: the connection still works.
    assert conn.is_open
    conn.channel().queue_declare("", exclusive=True)


def test_denied_bind_closes_the_channel_with_403(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect("alice")
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "amq.topic", "alice.#")
    error = _closed_by_broker(lambda: channel.queue_bind(queue, "amq.topic", "bob.*"))
    assert error.reply_code == 403 and "bob/+" in error.reply_text
    # A wildcard is never widened: '#' alone is denied to alice.
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    assert _closed_by_broker(lambda: channel.queue_bind(queue, "amq.topic", "#")).reply_code == 403


def test_another_users_queue_is_refused_with_403(connect: Callable[..., pika.BlockingConnection]) -> None:
    alice = connect("alice").channel()
    alice.queue_declare("alice-q")
    alice.basic_publish("", "alice-q", b"for alice")
    bob_conn = connect("bob")
    attempts: list[Callable[[pika.adapters.blocking_connection.BlockingChannel], object]] = [
        lambda ch: ch.queue_declare("alice-q", passive=True),
        lambda ch: ch.queue_declare("alice-q"),
        lambda ch: ch.basic_consume("alice-q", lambda *a: None),
        lambda ch: ch.basic_get("alice-q"),
        lambda ch: ch.queue_bind("alice-q", "amq.topic", "bob.x"),
        lambda ch: ch.queue_purge("alice-q"),
        lambda ch: ch.queue_delete("alice-q"),
    ]
    for attempt in attempts:
        channel = bob_conn.channel()
        assert _closed_by_broker(lambda: attempt(channel)).reply_code == 403
    channel = bob_conn.channel()
    channel.confirm_delivery()
    assert _closed_by_broker(lambda: channel.basic_publish("", "alice-q", b"from bob")).reply_code == 403
    # The queue is untouched, and the superuser may use it.
    root = connect().channel()
    method, _, body = root.basic_get("alice-q", auto_ack=True)
    assert body == b"for alice" and method.message_count == 0


def test_exclusive_queue_is_locked_to_its_connection(connect: Callable[..., pika.BlockingConnection]) -> None:
    owner = connect("alice").channel()
    queue = owner.queue_declare("", exclusive=True).method.queue
    other = connect("alice").channel()
    assert _closed_by_broker(lambda: other.basic_consume(queue, lambda *a: None)).reply_code == 405
    # A publish through the default exchange is allowed (RPC reply queues).
    other = connect("alice").channel()
    other.confirm_delivery()
    other.basic_publish("", queue, b"reply")
    assert owner.basic_get(queue, auto_ack=True)[2] == b"reply"


def test_exclusive_queue_goes_with_its_connection(connect: Callable[..., pika.BlockingConnection]) -> None:
    first = connect()
    queue = first.channel().queue_declare("", exclusive=True).method.queue
    first.close()
    channel = connect().channel()
    assert _closed_by_broker(lambda: channel.queue_declare(queue, passive=True)).reply_code == 404


# -- delivery ----------------------------------------------------------------------------------------------


def test_ten_thousand_confirmed_messages_in_order(gw: GatewayThread, root_password: str,
                                                 connect: Callable[..., pika.BlockingConnection]) -> None:
    total = 10_000
    ready = threading.Event()
    received: list[bytes] = []
    redelivered: list[bool] = []
    failure: list[BaseException] = []

    def consume() -> None:
        try:
            conn = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
            try:
                channel = conn.channel()
                channel.basic_qos(prefetch_count=100)
                queue = channel.queue_declare("load", auto_delete=True).method.queue
                channel.queue_bind(queue, "amq.topic", "load.*")

                def on_message(ch: Any, method: Any, properties: Any, body: bytes) -> None:
                    received.append(body)
                    redelivered.append(method.redelivered)
                    ch.basic_ack(method.delivery_tag)

                channel.basic_consume(queue, on_message)
                ready.set()
                deadline = time.monotonic() + 60
                while len(received) < total and time.monotonic() < deadline:
                    conn.process_data_events(time_limit=0.2)
            finally:
                conn.close()
        except BaseException as exc:
            failure.append(exc)
            ready.set()

    consumer = threading.Thread(target=consume)
    consumer.start()
    assert ready.wait(10)
    channel = connect().channel()
    channel.confirm_delivery()
    for index in range(total):
        channel.basic_publish("amq.topic", "load.seq", str(index).encode(), mandatory=True)
    consumer.join(70)
    assert not failure, failure
    assert received == [str(i).encode() for i in range(total)]
    assert not any(redelivered)


def test_publishes_of_changing_shape_reach_consumers_on_other_connections_intact(
        connect: Callable[..., pika.BlockingConnection]) -> None:
    """Repeats and changes of key, size (empty, one frame, several frames) and properties, to
    consumers on two other connections: each gets every message, as sent and in order."""
    consumers = [connect().channel() for _ in range(2)]
    queues = []
    for channel in consumers:
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "amq.topic", "shape.#")
        queues.append(queue)
    shapes = [
        ("shape.a", b"x" * 100, pika.BasicProperties()),
        ("shape.a", b"y" * 100, pika.BasicProperties()),
        ("shape.a", b"", pika.BasicProperties()),
        ("shape.b.c", b"z" * 100, pika.BasicProperties(delivery_mode=2)),
        ("shape.b.c", bytes(range(256)) * 600, pika.BasicProperties(delivery_mode=2)),  # several body frames
        ("shape.a", b"w" * 101, pika.BasicProperties(headers={"n": 1}, content_type="text/plain")),
    ]
    publisher = connect().channel()
    publisher.confirm_delivery()
    sent: list[tuple[str, bytes, int | None, Any]] = []
    for index in range(30):
        key, body, properties = shapes[index % len(shapes) if index % 4 else 0]
        publisher.basic_publish("amq.topic", key, body, properties=properties, mandatory=True)
        sent.append((key, body, properties.delivery_mode, properties.headers))
    for channel, queue in zip(consumers, queues):
        got = []
        deadline = time.monotonic() + 10
        while len(got) < len(sent) and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                got.append((method.routing_key, body, properties.delivery_mode, properties.headers))
        assert got == sent


def test_nack_with_requeue_redelivers(connect: Callable[..., pika.BlockingConnection]) -> None:
    channel = connect().channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_publish("", queue, b"again")
    method, _, body = channel.basic_get(queue)
    assert body == b"again" and not method.redelivered
    channel.basic_nack(method.delivery_tag, requeue=True)
    method, _, body = channel.basic_get(queue)
    assert body == b"again" and method.redelivered
    channel.basic_reject(method.delivery_tag, requeue=False)
    assert channel.basic_get(queue) == (None, None, None)


def test_unacked_messages_return_when_the_channel_closes(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect()
    first = conn.channel()
    queue = first.queue_declare("", exclusive=True).method.queue
    for body in (b"1", b"2", b"3"):
        first.basic_publish("", queue, body)
    first.basic_get(queue)
    first.basic_get(queue)
    first.close()
    second = conn.channel()
    got = [second.basic_get(queue, auto_ack=True) for _ in range(3)]
    assert [(g[2], g[0].redelivered) for g in got] == [(b"1", True), (b"2", True), (b"3", False)]


def test_basic_get_counts_and_empty(connect: Callable[..., pika.BlockingConnection]) -> None:
    channel = connect().channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    assert channel.basic_get(queue) == (None, None, None)
    channel.queue_bind(queue, "amq.topic", "get.test")
    channel.basic_publish("amq.topic", "get.test", b"a",
                          properties=pika.BasicProperties(content_type="text/plain", headers={"k": "v"}))
    channel.basic_publish("amq.topic", "get.test", b"b")
    method, properties, body = channel.basic_get(queue, auto_ack=True)
    assert (method.exchange, method.routing_key, method.message_count, body) == ("amq.topic", "get.test", 1, b"a")
    assert (properties.content_type, properties.headers) == ("text/plain", {"k": "v"})
    assert channel.queue_purge(queue).method.message_count == 1
    assert channel.queue_delete(queue).method.message_count == 0


def test_mandatory_unroutable_is_returned_before_its_confirm(connect: Callable[..., pika.BlockingConnection]) -> None:
    channel = connect().channel()
    returned: list[tuple[int, str, bytes]] = []
    channel.add_on_return_callback(lambda ch, method, props, body: returned.append((method.reply_code, method.routing_key, body)))
    channel.confirm_delivery()
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish("amq.topic", "nobody.listens", b"lost", mandatory=True)
    with pytest.raises(pika.exceptions.UnroutableError):
        channel.basic_publish("", "no-such-queue", b"lost too", mandatory=True)
    channel.basic_publish("amq.topic", "nobody.listens", b"not mandatory")  # silently dropped
    channel.connection.process_data_events(time_limit=0)
    assert returned == [(312, "nobody.listens", b"lost"), (312, "no-such-queue", b"lost too")]


def test_prefetch_limits_unacknowledged_deliveries(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect()
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    for index in range(10):
        channel.basic_publish("", queue, str(index).encode())
    channel.basic_qos(prefetch_count=3)
    got: list[Any] = []
    channel.basic_consume(queue, lambda ch, method, props, body: got.append(method))
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    conn.process_data_events(time_limit=0.3)
    assert len(got) == 3
    channel.basic_ack(got[-1].delivery_tag, multiple=True)
    deadline = time.monotonic() + 5
    while len(got) < 6 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.1)
    assert len(got) == 6


# -- across protocols ---------------------------------------------------------------------------------------


def test_mqtt_publish_reaches_amqp_consumer_and_back(gw: GatewayThread, root_password: str,
                                                    connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect()
    channel = conn.channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.queue_bind(queue, "amq.topic", "a.*.c")
    mqtt = PahoClient(gw.mqtt_port, client_id="mqtt-x", username=ROOT_USER, password=root_password).connect_ok()
    try:
        mqtt.subscribe(("a/+/c", 1))
        mqtt.publish("a/b/c", b"from mqtt", qos=1)
        mqtt.publish("a/v1.2/c", b"dotted", qos=0)
        deadline = time.monotonic() + 5
        got: list[tuple[str, bytes, int | None]] = []
        while len(got) < 2 and time.monotonic() < deadline:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is not None:
                got.append((method.routing_key, body, properties.delivery_mode))
        assert got == [("a.b.c", b"from mqtt", 2), ("a.v1/2.c", b"dotted", None)]
        assert [m.topic for m in mqtt.expect(2)] == ["a/b/c", "a/v1.2/c"]  # its own messages
        channel.basic_publish("amq.topic", "a.x/y.c", b"from amqp",
                              properties=pika.BasicProperties(delivery_mode=2))
        message = mqtt.next_message()
        assert (message.topic, message.payload, message.qos) == ("a/x.y/c", b"from amqp", 1)
    finally:
        mqtt.disconnect()


def test_aio_pika_round_trip_with_confirms(gw: GatewayThread, root_password: str) -> None:
    async def aio() -> list[tuple[str, bytes]]:
        url = f"amqp://{ROOT_USER}:{root_password}@127.0.0.1:{gw.port('amqp091')}/"
        async with await aio_pika.connect(url, timeout=5) as connection:
            channel = await connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=10)
            exchange = await channel.get_exchange("amq.topic")
            queue = await channel.declare_queue(exclusive=True)
            await queue.bind(exchange, "aio.#")
            for index in range(20):
                await exchange.publish(aio_pika.Message(f"m{index}".encode()), routing_key=f"aio.n{index}")
            got: list[tuple[str, bytes]] = []
            async with queue.iterator() as messages:
                async for message in messages:
                    async with message.process():
                        got.append((message.routing_key or "", message.body))
                    if len(got) == 20:
                        break
            return got

    got = asyncio.run(asyncio.wait_for(aio(), 20))
    assert got == [(f"aio.n{i}", f"m{i}".encode()) for i in range(20)]


# -- limits and unsupported things -------------------------------------------------------------------------


def test_unsupported_methods_close_with_540(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect()
    assert _closed_by_broker(conn.channel().tx_select).reply_code == 540
    assert _closed_by_broker(lambda: conn.channel().exchange_declare("mine", "topic")).reply_code == 540
    assert _closed_by_broker(lambda: conn.channel().exchange_declare("mine", passive=True)).reply_code == 404
    assert _closed_by_broker(lambda: conn.channel().basic_recover(requeue=False)).reply_code == 540
    channel = conn.channel()
    channel.exchange_declare("amq.topic", "topic", passive=True)
    channel.exchange_declare("amq.topic", "topic", durable=True)
    assert conn.is_open


def test_unknown_connection_method_closes_with_540(gw: GatewayThread, root_password: str) -> None:
    raw = RawClient(gw.port("amqp091"))
    try:
        raw.login(ROOT_USER, root_password)
        payload = struct.pack(">HH", 10, 99)
        raw.send(struct.pack(">BHI", 1, 0, len(payload)) + payload + b"\xce")
        close = raw.expect(commands.Connection.Close)
        assert close.reply_code == 540
    finally:
        raw.close()


def test_body_over_the_limit_closes_the_channel_with_311(start_gateway: Callable[..., GatewayThread],
                                                       root_password: str) -> None:
    gw = start_gateway(server=AMQP091, limits={"max_message_size": 1000})
    conn = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.confirm_delivery()
        channel.basic_publish("", queue, b"x" * 1000)
        assert _closed_by_broker(lambda: channel.basic_publish("", queue, b"x" * 1001)).reply_code == 311
        assert conn.channel().basic_get(queue, auto_ack=True)[2] == b"x" * 1000
    finally:
        conn.close()


def test_large_bodies_cross_frame_max_both_ways(connect: Callable[..., pika.BlockingConnection]) -> None:
    channel = connect(frame_max=4096).channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    body = bytes(i % 253 for i in range(300_000))
    channel.basic_publish("", queue, body)
    assert channel.basic_get(queue, auto_ack=True)[2] == body


def test_full_queue_refuses_with_nack_and_counts(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    """reject_new (the AMQP 0.9.1 default): what does not fit is refused to the publisher, never confirmed."""
    gw = start_gateway(server=AMQP091, limits={"max_queued_messages": 10})
    conn = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.confirm_delivery()
        nacked = 0
        for index in range(15):
            try:
                channel.basic_publish("", queue, str(index).encode())
            except pika.exceptions.NackError:
                nacked += 1
        assert nacked == 5
        assert channel.queue_declare(queue, passive=True).method.message_count == 10
        dropped = gw.call(lambda: gw.gateway.metrics.messages_dropped[(Protocol.AMQP091, "queue_full")])  # type: ignore[union-attr]
        assert dropped == 5
    finally:
        conn.close()


# -- broken peers close alone -------------------------------------------------------------------------------


class RawClient:
    """A socket speaking AMQP by hand, for what no client library sends."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frame(self) -> tuple[int, object]:
        while True:
            if len(self.buffer) >= 7:
                size = struct.unpack_from(">I", self.buffer, 3)[0]
                if len(self.buffer) >= size + 8:
                    used, channel, value = pamqp_frame.unmarshal(self.buffer)
                    self.buffer = self.buffer[used:]
                    return channel, value
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def expect(self, kind: type) -> Any:
        _, value = self.frame()
        assert isinstance(value, kind), value
        return value

    def login(self, user: str, password: str, heartbeat: int = 0) -> None:
        self.send(PROTOCOL_HEADER)
        self.expect(commands.Connection.Start)
        self.send(pamqp_frame.marshal(commands.Connection.StartOk(
            client_properties={}, mechanism="PLAIN", response=f"\x00{user}\x00{password}"), 0))
        self.expect(commands.Connection.Tune)
        self.send(pamqp_frame.marshal(commands.Connection.TuneOk(2047, 131072, heartbeat), 0))
        self.send(pamqp_frame.marshal(commands.Connection.Open(), 0))
        self.expect(commands.Connection.OpenOk)

    def read_until_closed(self, timeout: float = 5.0) -> bytes:
        data = self.buffer
        self.sock.settimeout(timeout)
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return data
            data += chunk

    def close(self) -> None:
        self.sock.close()


def test_broken_peers_are_closed_and_others_keep_working(gw: GatewayThread, root_password: str,
                                                        connect: Callable[..., pika.BlockingConnection]) -> None:
    healthy = connect().channel()
    queue = healthy.queue_declare("", exclusive=True).method.queue

    def still_works(tag: bytes) -> None:
        healthy.basic_publish("", queue, tag)
        assert healthy.basic_get(queue, auto_ack=True)[2] == tag

    port = gw.port("amqp091")
    for header in (b"AMQP\x00\x01\x00\x00", b"AMQP\x03\x01\x00\x00", b"GET / HTTP/1.1\r\n\r\n", b"\xff" * 64):
        raw = RawClient(port)
        try:
            raw.send(header)
            assert raw.read_until_closed() == PROTOCOL_HEADER
        finally:
            raw.close()
        still_works(header[:8])

    # Garbage after a good login: a frame error, then the socket closes.
    raw = RawClient(port)
    try:
        raw.login(ROOT_USER, root_password)
        raw.send(b"\x01\x00\x01\x00\x00\x00\x05hello!!!!!!")
        close = raw.expect(commands.Connection.Close)
        assert close.reply_code == 501
        assert raw.read_until_closed() == b""
    finally:
        raw.close()
    still_works(b"after garbage")

    # A truncated frame: the peer stops mid-frame and half-closes.
    raw = RawClient(port)
    try:
        raw.login(ROOT_USER, root_password)
        frame = pamqp_frame.marshal(commands.Channel.Open(), 1)
        raw.send(frame[:-3])
        raw.sock.shutdown(socket.SHUT_WR)
        assert raw.read_until_closed() == b""
    finally:
        raw.close()
    still_works(b"after truncation")


def test_missed_heartbeats_drop_the_connection(gw: GatewayThread, root_password: str) -> None:
    raw = RawClient(gw.port("amqp091"))
    try:
        raw.login(ROOT_USER, root_password, heartbeat=1)
        started = time.monotonic()
        data = raw.read_until_closed(timeout=10)
        elapsed = time.monotonic() - started
        # The server sent heartbeats while waiting, then gave up after ~2 intervals of silence.
        assert b"\x08\x00\x00\x00\x00\x00\x00\xce" in data
        assert 1.5 < elapsed < 5
    finally:
        raw.close()


def test_metrics_count_amqp_traffic(gw: GatewayThread, connect: Callable[..., pika.BlockingConnection]) -> None:
    channel = connect().channel()
    queue = channel.queue_declare("", exclusive=True).method.queue
    channel.basic_publish("", queue, b"m")
    assert channel.basic_get(queue, auto_ack=True)[2] == b"m"
    metrics = gw.call(lambda: gw.gateway.metrics)  # type: ignore[union-attr]
    counts = gw.call(lambda: (metrics.messages_in[Protocol.AMQP091], metrics.messages_out[Protocol.AMQP091],
                              metrics.connections_open[Protocol.AMQP091]))
    assert counts == (1, 1, 1)


def test_max_connections_refuses_the_extra_client(start_gateway: Callable[..., GatewayThread],
                                                 root_password: str) -> None:
    gw = start_gateway(server={"amqp091": {"plain": {"addr": "127.0.0.1:0", "max_connections": 1}}})
    first = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    try:
        with pytest.raises(pika.exceptions.AMQPConnectionError):
            pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
        assert first.is_open
    finally:
        first.close()


def test_full_queue_under_block_holds_the_publisher_instead_of_dropping(start_gateway: Callable[..., GatewayThread],
                                                                        root_password: str) -> None:
    gw = start_gateway(server=AMQP091, limits={"max_queued_messages": 100, "queue_overflow": {"amqp091": "block"}})
    consumer = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    publisher = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    try:
        channel = consumer.channel()
        channel.queue_declare("slow")
        channel.basic_qos(prefetch_count=1)
        got: list[Any] = []
        channel.basic_consume("slow", lambda ch, method, props, body: got.append(method))
        total = 300
        out = publisher.channel()
        for index in range(total):
            out.basic_publish("", "slow", str(index).encode())
        publisher.process_data_events(time_limit=0.2)

        deadline = time.monotonic() + 5
        while gw.call(lambda: len(_queue(gw, "slow").ready)) < 100 and time.monotonic() < deadline:
            time.sleep(0.02)
        # Held once the queue is full (at most the one message that found it full over), nothing dropped.
        assert 100 <= gw.call(lambda: len(_queue(gw, "slow").ready)) <= 101
        deadline = time.monotonic() + 10
        while len(got) < total and time.monotonic() < deadline:
            consumer.process_data_events(time_limit=0.05)
            if got:
                channel.basic_ack(got[-1].delivery_tag, multiple=True)
        assert len(got) == total
        dropped = gw.call(lambda: gw.gateway.metrics.messages_dropped.get((Protocol.AMQP091, "queue_full"), 0))  # type: ignore[union-attr]
        assert dropped == 0
    finally:
        consumer.close()
        publisher.close()


def _queue(gw: GatewayThread, name: str) -> Any:
    assert gw.gateway is not None
    return gw.gateway.state.shared("amqp091.broker", dict).queues[name]


def test_shutdown_closes_clients_with_320(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    gw = start_gateway(server=AMQP091)
    conn = pika.BlockingConnection(_params(gw, ROOT_USER, root_password))
    conn.channel()
    gw.stop()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        conn.process_data_events(time_limit=5)
    assert info.value.reply_code == 320


def test_consumer_lifecycle(connect: Callable[..., pika.BlockingConnection]) -> None:
    conn = connect()
    channel = conn.channel()
    # An auto-delete queue goes with its last consumer.
    channel.queue_declare("temp", auto_delete=True)
    tag = channel.basic_consume("temp", lambda *a: None)
    channel.basic_cancel(tag)
    assert _closed_by_broker(lambda: channel.queue_declare("temp", passive=True)).reply_code == 404
    # A queue deleted under a consumer cancels it (consumer_cancel_notify).
    channel = conn.channel()
    channel.queue_declare("shared")
    channel.basic_consume("shared", lambda *a: None)
    assert channel.consumer_tags
    connect().channel().queue_delete("shared")
    deadline = time.monotonic() + 5
    while channel.consumer_tags and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert not channel.consumer_tags
    # Acknowledging a tag never delivered is a channel error.
    channel.basic_ack(99)
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        channel.queue_declare("", exclusive=True)
    assert info.value.reply_code == 406
    # Declaring an existing queue with other flags is refused.
    channel = conn.channel()
    channel.queue_declare("durable-q", durable=True)
    assert _closed_by_broker(lambda: channel.queue_declare("durable-q", durable=False)).reply_code == 406


def test_handshake_timeout_drops_a_silent_peer(start_gateway: Callable[..., GatewayThread]) -> None:
    gw = start_gateway(server=AMQP091, limits={"handshake_timeout": "0.3s"})
    raw = RawClient(gw.port("amqp091"))
    try:
        raw.send(PROTOCOL_HEADER)
        raw.expect(commands.Connection.Start)
        started = time.monotonic()
        assert raw.read_until_closed() == b""
        assert time.monotonic() - started < 3
    finally:
        raw.close()


def test_an_internal_error_closes_only_that_connection(connect: Callable[..., pika.BlockingConnection],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from gateway.frontends.amqp091 import AMQP091Connection

    healthy = connect().channel()

    def explode(self: Any, channel: Any, method: Any) -> None:
        raise RuntimeError("injected bug")

    # Handlers are bound per connection when it is made: patch before the broken one connects.
    monkeypatch.setattr(AMQP091Connection, "_on_basic_recover", explode)
    channel = connect().channel()
    with pytest.raises(pika.exceptions.ConnectionClosedByBroker) as info:
        channel.basic_recover(requeue=True)
    assert info.value.reply_code == 541
    queue = healthy.queue_declare("", exclusive=True).method.queue
    healthy.basic_publish("", queue, b"fine")
    assert healthy.basic_get(queue, auto_ack=True)[2] == b"fine"


def _server_certificate(directory: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "amqps.pem", directory / "amqps-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_file, key_file


def test_amqp_over_tls(start_gateway: Callable[..., GatewayThread], root_password: str, tmp_path: Path) -> None:
    cert_file, key_file = _server_certificate(tmp_path)
    gw = start_gateway(server={"amqp091": {"tls": {"addr": "127.0.0.1:0", "cert_file": str(cert_file),
                                                   "key_file": str(key_file)}}})
    context = ssl.create_default_context(cafile=str(cert_file))
    params = _params(gw, ROOT_USER, root_password, ssl_options=pika.SSLOptions(context, "127.0.0.1"))
    conn = pika.BlockingConnection(params)
    try:
        channel = conn.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.basic_publish("", queue, b"over amqps")
        assert channel.basic_get(queue, auto_ack=True)[2] == b"over amqps"
    finally:
        conn.close()
