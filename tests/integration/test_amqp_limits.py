"""Limits on the AMQP 0.9.1 and 1.0 frontends, with real clients and raw sockets, on both event loops:
`limits.handshake_timeout`, the AMQP 1.0 idle timeout, `limits.max_subscriptions_per_client`, and
what a hostile client cannot make a connection hold (proton links and sessions, half-received bodies).
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import body as pamqp_body, commands, frame as pamqp_frame, header as pamqp_header
from proton import Connection, Endpoint, Message, Transport
from proton.utils import BlockingConnection, LinkDetached

import gateway.frontends.amqp as amqp_frontend
from gateway.amqp.sasl import AMQP_HEADER, SASL_HEADER
from gateway.amqp091.framing import PROTOCOL_HEADER
from tests.conftest import ROOT_USER
from tests.gateway_thread import GatewayThread

AMQP091 = {"amqp091": {"plain": {"addr": "127.0.0.1:0"}}}
AMQP = {"amqp": {"plain": {"addr": "127.0.0.1:0"}}}
BOTH = {**AMQP091, **AMQP}
TIMEOUT = 0.5


def _read_until_closed(sock: socket.socket, deadline: float = 5.0) -> tuple[bytes, float]:
    """Everything the gateway sends until it closes the socket, and how long that took."""
    started = time.monotonic()
    sock.settimeout(deadline)
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        except TimeoutError:
            raise AssertionError(f"the gateway did not close the connection; got {received!r}") from None
        if not chunk:
            break
        received += chunk
    return received, time.monotonic() - started


def _plain_init(user: str, password: str) -> bytes:
    response = f"\0{user}\0{password}".encode()
    fields = b"\xa3\x05PLAIN\xa0" + bytes((len(response),)) + response
    body = b"\x00\x53\x41\xc0" + bytes((len(fields) + 1, 2)) + fields
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def _open_frame(container: bytes = b"raw") -> bytes:
    """An AMQP 1.0 open with only its container-id: no idle-time-out of the client's own."""
    fields = b"\xa1" + bytes((len(container),)) + container
    body = b"\x00\x53\x10\xc0" + bytes((len(fields) + 1, 1)) + fields
    return struct.pack(">IBBH", 8 + len(body), 2, 0, 0) + body


def _connections(gw: GatewayThread, kind: str) -> int:
    return gw.call(lambda: gw.gateway.state.count(f"server.{kind}.plain"))  # type: ignore[union-attr]


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met within the deadline"
        time.sleep(0.01)


# -- limits.handshake_timeout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sent", ["nothing", "header"])
def test_amqp091_handshake_timeout_is_the_configured_one(start_gateway: Callable[..., GatewayThread], sent: str) -> None:
    gw = start_gateway(server=AMQP091, limits={"handshake_timeout": f"{TIMEOUT}s"})
    with socket.create_connection(("127.0.0.1", gw.port("amqp091")), timeout=5) as sock:
        if sent == "header":
            sock.sendall(PROTOCOL_HEADER)
        received, elapsed = _read_until_closed(sock)
    # Only connection.start was sent (frame type 1, channel 0), then the socket closed.
    assert received[:3] == (b"\x01\x00\x00" if sent == "header" else b"")
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2.5
    _wait_for(lambda: _connections(gw, "amqp091") == 0)


@pytest.mark.parametrize("sent", ["nothing", "sasl-header", "no-open"])
def test_amqp10_handshake_timeout_is_the_configured_one(start_gateway: Callable[..., GatewayThread], root_password: str,
                                                        sent: str) -> None:
    gw = start_gateway(server=AMQP, limits={"handshake_timeout": f"{TIMEOUT}s"})
    data = {"nothing": b"", "sasl-header": SASL_HEADER,
            # SASL done, the AMQP header sent, and never an Open.
            "no-open": SASL_HEADER + _plain_init(ROOT_USER, root_password) + AMQP_HEADER}[sent]
    with socket.create_connection(("127.0.0.1", gw.port("amqp")), timeout=5) as sock:
        sock.sendall(data)
        received, elapsed = _read_until_closed(sock)
    assert received.startswith(SASL_HEADER) == bool(data)
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 2.5
    _wait_for(lambda: _connections(gw, "amqp") == 0)


def test_amqp10_idle_timeout_drops_a_silent_client(start_gateway: Callable[..., GatewayThread], root_password: str,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # The fixed idle timeout (60 s) made short: a client that went quiet after its Open is dropped.
    monkeypatch.setattr(amqp_frontend, "IDLE_TIMEOUT", TIMEOUT)
    gw = start_gateway(server=AMQP)
    with socket.create_connection(("127.0.0.1", gw.port("amqp")), timeout=5) as sock:
        sock.sendall(SASL_HEADER + _plain_init(ROOT_USER, root_password) + AMQP_HEADER + _open_frame())
        received, elapsed = _read_until_closed(sock)
    assert b"local-idle-timeout expired" in received  # in the Close's condition
    assert TIMEOUT * 0.8 <= elapsed < TIMEOUT + 3
    _wait_for(lambda: _connections(gw, "amqp") == 0)


# -- limits.max_subscriptions_per_client -------------------------------------------------------------------------


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "reason", None) == "max_subscriptions_per_client"]


def _pika(gw: GatewayThread, password: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, password),
        connection_attempts=1, socket_timeout=5))


def _refused_406(call: Callable[[], Any]) -> str:
    with pytest.raises(pika.exceptions.ChannelClosedByBroker) as info:
        call()
    assert info.value.reply_code == 406
    return str(info.value.reply_text)


def test_amqp091_consumers_and_bindings_are_capped_per_connection(
    start_gateway: Callable[..., GatewayThread], root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "polygate")
    gw = start_gateway(server=AMQP091, limits={"max_subscriptions_per_client": 3})
    connection = _pika(gw, root_password)
    try:
        held = connection.channel()
        queue = held.queue_declare("", exclusive=True).method.queue
        held.queue_bind(queue, "amq.topic", "a.1")
        held.queue_bind(queue, "amq.topic", "a.2")
        received: list[bytes] = []
        held.basic_consume(queue, lambda ch, method, props, body: received.append(body), auto_ack=True)
        # Binding what is bound already is not one more.
        held.queue_bind(queue, "amq.topic", "a.1")

        extra = connection.channel()
        assert "max_subscriptions_per_client" in _refused_406(lambda: extra.queue_bind(queue, "amq.topic", "a.3"))
        extra = connection.channel()
        _refused_406(lambda: extra.basic_consume(queue, lambda *args: None))
        assert len(_refusals(caplog)) == 1  # then counted and summed up once per interval

        # What the connection holds keeps working.
        held.basic_publish("amq.topic", "a.2", b"still served")
        _wait_for_pika(connection, lambda: received == [b"still served"])
        # An unbind makes room.
        held.queue_unbind(queue, "amq.topic", "a.2")
        held.queue_bind(queue, "amq.topic", "a.3")
    finally:
        connection.close()


def test_amqp091_a_queue_keeps_at_most_the_cap_of_bindings_across_connections(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP091, limits={"max_subscriptions_per_client": 2})
    first = _pika(gw, root_password)
    try:
        channel = first.channel()
        channel.queue_declare("kept")
        channel.queue_bind("kept", "amq.topic", "k.1")
        channel.queue_bind("kept", "amq.topic", "k.2")
    finally:
        first.close()
    # A new connection holds nothing, but the queue it binds already has the cap.
    second = _pika(gw, root_password)
    try:
        text = _refused_406(lambda: second.channel().queue_bind("kept", "amq.topic", "k.3"))
        assert "queue 'kept'" in text
        channel = second.channel()
        channel.queue_declare("other")
        channel.queue_bind("other", "amq.topic", "k.3")
    finally:
        second.close()


def _wait_for_pika(connection: pika.BlockingConnection, predicate: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 5
    while not predicate():
        assert time.monotonic() < deadline, "condition not met within the deadline"
        connection.process_data_events(time_limit=0.05)


def test_amqp10_receiver_links_are_capped_per_connection(
    start_gateway: Callable[..., GatewayThread], root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "polygate")
    gw = start_gateway(server=AMQP, limits={"max_subscriptions_per_client": 3})
    connection = BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=root_password,
                                    allowed_mechs="PLAIN", timeout=10)
    try:
        receivers = [connection.create_receiver(f"r/{n}", credit=5) for n in range(3)]
        with pytest.raises(LinkDetached) as refused:
            connection.create_receiver("r/3")
        assert refused.value.condition == "amqp:resource-limit-exceeded"
        assert len(_refusals(caplog)) == 1
        # Sender links are not subscriptions, and the receivers held keep working.
        connection.create_sender("r/1").send(Message(body=b"still served", inferred=True))
        assert receivers[1].receive(timeout=10).body == b"still served"
        receivers[1].accept()
        # A closed receiver makes room.
        receivers[0].close()
        connection.create_receiver("r/3", credit=5)
    finally:
        connection.close()


# -- AMQP 1.0: links and sessions a client is done with do not stay --------------------------------------------


def _proton_endpoints(gw: GatewayThread) -> list[tuple[int, int]]:
    """(links, sessions) proton holds for each AMQP 1.0 connection of the gateway."""
    def count() -> list[tuple[int, int]]:
        assert gw.gateway is not None
        found = []
        for connection in gw.gateway.state.connections():
            engine = getattr(connection, "_connection", None)
            if engine is None:
                continue
            links = sessions = 0
            link, session = engine.link_head(0), engine.session_head(0)
            while link:
                links, link = links + 1, link.next(0)
            while session:
                sessions, session = sessions + 1, session.next(0)
            found.append((links, sessions))
        return found

    return gw.call(count)


def test_amqp10_detached_links_and_ended_sessions_are_freed(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP)
    client = BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=root_password,
                                allowed_mechs="PLAIN", timeout=10)
    try:
        kept = client.create_receiver("churn/#", credit=500)
        for n in range(200):
            receiver = client.create_receiver(f"churn/{n}", credit=1)
            sender = client.create_sender(f"churn/{n}")
            sender.send(Message(body=b"m", inferred=True))  # left unsettled on `receiver`
            receiver.close()
            sender.close()
        connection = client.conn
        assert connection is not None
        for n in range(50):
            session = connection.session()
            session.open()
            link = session.sender(f"s{n}")
            link.target.address = "churn/s"
            link.open()
            client.wait(lambda: bool(link.state & Endpoint.REMOTE_ACTIVE), msg="attach")
            session.close()
            client.wait(lambda: bool(session.state & Endpoint.REMOTE_CLOSED), msg="end")
        # Only the kept receiver and its session are left.
        assert _proton_endpoints(gw) == [(1, 1)]
        # And the messages sent on the links that came and went all arrived.
        for _ in range(200):
            kept.receive(timeout=10)
            kept.accept()
    finally:
        client.close()


class EngineClient:
    """A proton engine over a socket, driven by hand: it sends only what the test asks for
    (a detach the gateway sends is never answered)."""

    def __init__(self, port: int, password: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=0.05)
        self.transport = Transport()
        self.connection = Connection()
        self.connection.user, self.connection.password = ROOT_USER, password
        sasl = self.transport.sasl()
        sasl.allowed_mechs("PLAIN")
        sasl.allow_insecure_mechs = True
        self.transport.bind(self.connection)
        self.connection.container = "engine-client"
        self.connection.open()
        self.session = self.connection.session()
        self.session.open()

    def pump(self, seconds: float) -> bool:
        """Exchange bytes for `seconds`; False once the gateway closed the socket."""
        transport, deadline = self.transport, time.monotonic() + seconds
        while time.monotonic() < deadline:
            pending = transport.pending()
            if pending > 0:
                data = transport.peek(pending)
                assert data is not None
                try:
                    self.sock.sendall(data)
                except (BrokenPipeError, ConnectionResetError):
                    return False
                transport.pop(pending)
                continue  # everything out before waiting for an answer
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except ConnectionResetError:
                return False
            if not data:
                transport.close_tail()
                return False
            transport.push(data)
        return True

    def close(self) -> None:
        self.sock.close()


def _closed_for(caplog: pytest.LogCaptureFixture, client: EngineClient, condition: str) -> None:
    """The gateway closed the client's connection with `condition` (its Close may be lost to a
    reset when the client was still sending: the gateway's log says it then)."""
    received = client.connection.remote_condition
    assert received is None or received.name == condition, received
    assert any(condition in r.getMessage() for r in caplog.records if getattr(r, "event", "") == "protocol_error")


def test_amqp10_a_client_that_never_detaches_refused_links_is_closed(
    start_gateway: Callable[..., GatewayThread], root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "polygate")
    gw = start_gateway(server=AMQP)
    client = EngineClient(gw.port("amqp"), root_password)
    try:
        assert client.pump(0.3)
        sent = 0
        while sent < amqp_frontend.MAX_LINKS + 50:
            receiver = client.session.receiver(f"refused-{sent}")
            receiver.source.dynamic = True  # refused: dynamic sources are not offered
            receiver.open()
            sent += 1
            if sent % 16 == 0 and not client.pump(0.05):
                break
        assert not client.pump(2.0)
        # Closed for the one refused link beyond MAX_LINKS, not before.
        assert sent > amqp_frontend.MAX_LINKS
        _closed_for(caplog, client, "amqp:resource-limit-exceeded")
    finally:
        client.close()


# -- AMQP 0.9.1: half-received bodies are bounded per connection ------------------------------------------------


def test_amqp091_unfinished_publishes_on_many_channels_close_the_connection_with_506(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP091, limits={"max_message_size": 262144})
    chunk = pamqp_body.ContentBody(b"x" * 65536)
    # Not even logged in: a publish started on each of many channels, none finished.
    data = [PROTOCOL_HEADER]
    for channel in range(1, 200):
        data.append(pamqp_frame.marshal(commands.Basic.Publish(exchange="amq.topic", routing_key="a"), channel))
        data.append(pamqp_frame.marshal(pamqp_header.ContentHeader(0, 256 * 1024, commands.Basic.Properties()), channel))
        data.append(pamqp_frame.marshal(chunk, channel))
    with socket.create_connection(("127.0.0.1", gw.port("amqp091")), timeout=5) as sock:
        try:
            sock.sendall(b"".join(data))
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we were still sending: what is read below says why
        received, _ = _read_until_closed(sock)
    assert b"RESOURCE_ERROR" in received
    _wait_for(lambda: _connections(gw, "amqp091") == 0)
    # Others are served.
    _pika(gw, root_password).close()


def test_amqp091_exclusive_queues_declared_and_deleted_in_a_loop_are_not_kept(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP091)
    connection = _pika(gw, root_password)
    try:
        channel = connection.channel()
        for _ in range(200):
            channel.queue_delete(channel.queue_declare("", exclusive=True).method.queue)
        kept = channel.queue_declare("", exclusive=True).method.queue

        def held() -> list[int]:
            assert gw.gateway is not None
            return [len(c._exclusive) for c in gw.gateway.state.connections()]  # type: ignore[attr-defined]

        assert max(held()) <= 64
        channel.basic_publish("", kept, b"the live one works")
        assert channel.basic_get(kept, auto_ack=True)[2] == b"the live one works"
    finally:
        connection.close()


def test_amqp10_unfinished_messages_on_many_links_close_the_connection(
    start_gateway: Callable[..., GatewayThread], root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "polygate")
    gw = start_gateway(server=AMQP, limits={"max_message_size": 262144})
    client = EngineClient(gw.port("amqp"), root_password)
    try:
        senders = []
        for n in range(40):
            sender = client.session.sender(f"big-{n}")
            sender.target.address = f"big/{n}"
            sender.open()
            senders.append(sender)
        deadline = time.monotonic() + 5
        while not all(sender.credit for sender in senders):
            assert client.pump(0.05) and time.monotonic() < deadline, "no credit"
        # 300 KB of a message on each link, never its end (the transfers say `more`).
        for n, sender in enumerate(senders):
            sender.delivery(f"d{n}")
            sender.send(b"x" * 300_000)
        assert not client.pump(3.0)
        _closed_for(caplog, client, "amqp:resource-limit-exceeded")
    finally:
        client.close()
    _wait_for(lambda: _connections(gw, "amqp") == 0)


def test_amqp10_one_link_sending_its_largest_message_in_pieces_is_fine(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP, limits={"max_message_size": 262144})
    client = BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=root_password,
                                allowed_mechs="PLAIN", timeout=10)
    try:
        receiver = client.create_receiver("big/#", credit=5)
        for n in range(40):  # far more than the bound in total, one message at a time
            client.create_sender(f"big/{n}").send(Message(body=b"x" * 262144, inferred=True))
            assert receiver.receive(timeout=10).body == b"x" * 262144
            receiver.accept()
    finally:
        client.close()
