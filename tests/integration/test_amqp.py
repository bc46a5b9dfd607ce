"""The AMQP 1.0 frontend driven by python-qpid-proton's blocking client, against a real gateway."""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from proton import ConnectionException, Delivery, Message
from proton.reactor import AtMostOnce
from proton.utils import BlockingConnection, LinkDetached, SendException

from gateway.amqp.sasl import AMQP_HEADER, SASL_HEADER, SaslCode, encode_outcome
from gateway.events import Protocol, Secret
from tests.conftest import ROOT_USER, UnavailableProvider
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

AMQP = {"amqp": {"plain": {"addr": "127.0.0.1:0"}}}
ALL_BYTES = bytes(range(256))


@contextmanager
def amqp_client(gw: GatewayThread, user: str | None, password: str | None, **kwargs: Any) -> Iterator[BlockingConnection]:
    if user is not None:
        kwargs.setdefault("allowed_mechs", "PLAIN")
    connection = BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=user, password=password,
                                    timeout=10, **kwargs)
    try:
        yield connection
    finally:
        connection.close()


def connect_error(gw: GatewayThread, user: str, password: str) -> ConnectionException:
    with pytest.raises(ConnectionException) as caught:
        BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=user, password=password,
                           allowed_mechs="PLAIN", timeout=10)
    return caught.value


def mqtt(gw: GatewayThread, password: str, client_id: str) -> PahoClient:
    return PahoClient(gw.mqtt_port, client_id=client_id, username=ROOT_USER, password=password).connect_ok()


def take(receiver: Any, *, accept: bool = True) -> Message:
    """The next message, its body copied to bytes (proton's body is a view into the message)."""
    message = receiver.receive(timeout=10)
    message.body = bytes(message.body) if not isinstance(message.body, str) else message.body
    if accept:
        receiver.accept()
    return message


def wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within the deadline")
        time.sleep(0.01)


@pytest.fixture
def gw(start_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    return start_gateway(server=AMQP)


@pytest.fixture
def acl_gw(start_gateway: Callable[..., GatewayThread], db_path: str) -> GatewayThread:
    from auth_providers.local_store import LocalStore

    store = LocalStore(db_path)
    store.add_user("alice", Secret("alice-pw"))
    store.grant("alice", "alice/#", {"publish", "subscribe"})
    store.close()
    return start_gateway(server=AMQP)


# -- messages across protocols ---------------------------------------------------------------


def test_amqp_publish_reaches_mqtt_subscriber_with_identical_bytes(gw: GatewayThread, root_password: str) -> None:
    subscriber = mqtt(gw, root_password, "sub-1")
    try:
        assert subscriber.subscribe(("t/#", 1)) == [1]
        with amqp_client(gw, ROOT_USER, root_password) as client:
            sender = client.create_sender("t/bin")
            sender.send(Message(body=ALL_BYTES, inferred=True))  # a Data section
            sender.send(Message(body=ALL_BYTES))  # an AmqpValue holding binary
            sender.send(Message(body="héllo ✓"))  # an AmqpValue holding a string: its UTF-8
        got = subscriber.expect(3)
        assert [(m.topic, m.payload) for m in got] == [
            ("t/bin", ALL_BYTES), ("t/bin", ALL_BYTES), ("t/bin", "héllo ✓".encode()),
        ]
    finally:
        subscriber.disconnect()
    assert gw.call(lambda: gw.gateway.ctx.metrics.messages_in[Protocol.AMQP]) == 3


def test_mqtt_publish_reaches_amqp_receiver_as_a_data_section(gw: GatewayThread, root_password: str) -> None:
    publisher = mqtt(gw, root_password, "pub-1")
    try:
        with amqp_client(gw, ROOT_USER, root_password) as client:
            receiver = client.create_receiver("s/+/x", credit=10)
            publisher.publish("s/1/x", ALL_BYTES, qos=1)
            publisher.publish("s/2/y", b"not for this filter", qos=1)
            publisher.publish("s/2/x", b"", qos=0)
            first = receiver.receive(timeout=10)
            first_body, first_inferred = bytes(first.body), first.inferred
            receiver.accept()
            second = take(receiver)
    finally:
        publisher.disconnect()
    # inferred: the body came as a Data section, not an AmqpValue.
    assert (first.address, first_body, first_inferred) == ("s/1/x", ALL_BYTES, True)
    assert (second.address, second.body) == ("s/2/x", b"")


def test_receiver_at_most_once_gets_presettled_deliveries(gw: GatewayThread, root_password: str) -> None:
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("q/#", credit=5, options=AtMostOnce())
        sender = client.create_sender("q/1")
        for i in range(3):
            sender.send(Message(body=b"%d" % i))
        # Pre-settled: nothing for the client to accept.
        bodies = [take(receiver, accept=False).body for _ in range(3)]
    assert bodies == [b"0", b"1", b"2"]


def test_credit_flow_delivers_a_thousand_messages_in_order(gw: GatewayThread, root_password: str) -> None:
    # One connection: a blocking client only moves bytes for the connection it waits on.
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("flow/#", credit=5)
        # Pre-settled: the sender does not wait, so messages pile up behind the receiver's credit.
        fast = client.create_sender("flow/fast", options=AtMostOnce())
        for i in range(1000):
            fast.send(Message(body=b"%04d" % i, inferred=True))
        got = [take(receiver).body for _ in range(1000)]
    assert got == [b"%04d" % i for i in range(1000)]
    dropped = gw.call(lambda: dict(gw.gateway.ctx.metrics.messages_dropped))
    assert not [key for key in dropped if key[0] is Protocol.AMQP and key[1] != "unsettled_on_close"]


def test_a_released_delivery_is_sent_again(gw: GatewayThread, root_password: str) -> None:
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("r/#", credit=1)
        sender = client.create_sender("r/1")
        sender.send(Message(body=b"first"))
        sender.send(Message(body=b"second"))
        assert take(receiver, accept=False).body == b"first"
        receiver.release(delivered=True)  # MODIFIED: the client did not process it
        # "second" may already be on its way (the client's credit came back on receive).
        assert sorted(take(receiver).body for _ in range(2)) == [b"first", b"second"]


# -- authentication ------------------------------------------------------------------------------


def test_bad_credentials_are_refused_as_unauthorized(gw: GatewayThread, root_password: str) -> None:
    error = connect_error(gw, ROOT_USER, root_password + "x")
    assert getattr(error, "condition", None) == "amqp:unauthorized-access"
    assert "bad credentials" in str(error)
    with amqp_client(gw, ROOT_USER, root_password):
        pass  # the right password still works


def test_auth_service_unavailable_is_a_distinct_error(start_gateway: Callable[..., GatewayThread]) -> None:
    gw = start_gateway(server=AMQP, provider=UnavailableProvider())
    error = connect_error(gw, "anyone", "anything")
    assert getattr(error, "condition", None) == "amqp:internal-error"
    assert "unavailable" in str(error)


def test_malformed_plain_response_fails_the_sasl_exchange(gw: GatewayThread) -> None:
    reply = raw_exchange(gw, SASL_HEADER + sasl_frame_init(b"no-separators"))
    assert reply.startswith(SASL_HEADER)
    assert reply.endswith(encode_outcome(SaslCode.AUTH))


def test_without_auth_anonymous_and_no_sasl_clients_connect(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP, auth={"protocols": {"amqp": False}})
    subscriber = mqtt(gw, root_password, "sub-anon")
    try:
        subscriber.subscribe(("open/#", 1))
        with amqp_client(gw, None, None, allowed_mechs="ANONYMOUS") as client:
            client.create_sender("open/a").send(Message(body=b"anon"))
        with amqp_client(gw, None, None, sasl_enabled=False) as client:
            client.create_sender("open/b").send(Message(body=b"bare"))
        assert [(m.topic, m.payload) for m in subscriber.expect(2)] == [("open/a", b"anon"), ("open/b", b"bare")]
    finally:
        subscriber.disconnect()


# -- authorization -----------------------------------------------------------------------------------


def test_denied_attaches_are_refused_as_unauthorized(acl_gw: GatewayThread) -> None:
    with amqp_client(acl_gw, "alice", "alice-pw") as client:
        with pytest.raises(LinkDetached) as sender_error:
            client.create_sender("bob/inbox")
        assert sender_error.value.condition == "amqp:unauthorized-access"
        with pytest.raises(LinkDetached) as receiver_error:
            client.create_receiver("bob/#")
        assert receiver_error.value.condition == "amqp:unauthorized-access"
        with pytest.raises(LinkDetached) as wide_error:
            client.create_receiver("#")  # authorized as written, never narrowed
        assert wide_error.value.condition == "amqp:unauthorized-access"
        # The connection is still good for what alice may do.
        receiver = client.create_receiver("alice/#", credit=5)
        client.create_sender("alice/inbox").send(Message(body=b"mine"))
        message = take(receiver)
    assert (message.address, message.body) == ("alice/inbox", b"mine")


def test_a_receiver_gets_nothing_a_deny_entry_covers(
    start_gateway: Callable[..., GatewayThread], db_path: str
) -> None:
    from auth_providers.local_store import LocalStore

    store = LocalStore(db_path)
    store.add_user("alice", Secret("alice-pw"))
    store.grant("alice", "alice/#", {"publish", "subscribe"})
    store.grant("alice", "alice/secret/#", {"subscribe"}, deny=True)
    store.close()
    gw = start_gateway(server=AMQP)
    with amqp_client(gw, "alice", "alice-pw") as client:
        # Granted, narrowed by the deny entry (the subscription's exclusions).
        receiver = client.create_receiver("alice/#", credit=5)
        sender = client.create_sender(None)
        sender.send(Message(address="alice/secret/x", body=b"hidden"))
        sender.send(Message(address="alice/open", body=b"seen"))
        message = take(receiver)
    assert (message.address, message.body) == ("alice/open", b"seen")


def test_anonymous_sender_is_authorized_per_message(acl_gw: GatewayThread, root_password: str) -> None:
    subscriber = mqtt(acl_gw, root_password, "root-watch")
    try:
        subscriber.subscribe(("#", 1))
        with amqp_client(acl_gw, "alice", "alice-pw") as client:
            sender = client.create_sender(None)
            sender.send(Message(address="alice/a", body=b"1"))
            with pytest.raises(SendException) as denied:
                sender.send(Message(address="bob/a", body=b"2"))
            assert denied.value.state == Delivery.REJECTED
            with pytest.raises(SendException) as no_topic:
                sender.send(Message(body=b"3"))  # no `to`
            assert no_topic.value.state == Delivery.REJECTED
            sender.send(Message(address="alice/b", body=b"4"))
        got = subscriber.expect(2)
    finally:
        subscriber.disconnect()
    assert [(m.topic, m.payload) for m in got] == [("alice/a", b"1"), ("alice/b", b"4")]
    assert subscriber.messages.empty()


def test_oversized_message_is_rejected(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    gw = start_gateway(server=AMQP, limits={"max_message_size": 1000})
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("big/#", credit=5)
        sender = client.create_sender("big/1")
        with pytest.raises(SendException) as too_big:
            sender.send(Message(body=b"x" * 200_000, inferred=True))  # spans many frames
        assert too_big.value.state == Delivery.REJECTED
        sender.send(Message(body=b"y" * 1000, inferred=True))
        assert take(receiver).body == b"y" * 1000


def test_max_connections(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    gw = start_gateway(server={"amqp": {"plain": {"addr": "127.0.0.1:0", "max_connections": 1}}})
    with amqp_client(gw, ROOT_USER, root_password):
        with pytest.raises(ConnectionException):
            BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=root_password,
                               allowed_mechs="PLAIN", timeout=10)


# -- broken peers close alone ---------------------------------------------------------------------


def sasl_frame_init(response: bytes) -> bytes:
    body = b"\xa3\x05PLAIN\xa0" + bytes((len(response),)) + response
    body = b"\x00\x53\x41\xc0" + bytes((len(body) + 1, 2)) + body
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def raw_exchange(gw: GatewayThread, data: bytes, *, half_close: bool = False, timeout: float = 5.0) -> bytes:
    """Send `data`, then read until the gateway closes the connection; fail if it does not."""
    with socket.create_connection(("127.0.0.1", gw.port("amqp")), timeout=timeout) as sock:
        sock.sendall(data)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            except TimeoutError:
                raise AssertionError(f"the gateway did not close the connection; got {received!r}") from None
            if not chunk:
                return received
            received += chunk


BROKEN_PEERS = {
    "garbage": (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", False),
    "amqp-0-9-1-header": (b"AMQP\x00\x00\x09\x01", False),
    "amqp-header-without-sasl": (AMQP_HEADER, False),
    "frame-size-below-header": (SASL_HEADER + struct.pack(">IBBH", 3, 2, 1, 0), False),
    "truncated-frame-then-eof": (SASL_HEADER + sasl_frame_init(b"\0u\0p")[:11], True),
    "garbage-after-sasl": (SASL_HEADER + sasl_frame_init(b"\0root\0x") + AMQP_HEADER + b"\x00\x00\x00\x08\x09\x00" * 4, False),
}


@pytest.mark.parametrize("name", list(BROKEN_PEERS))
def test_broken_peer_is_closed_alone(gw: GatewayThread, root_password: str, name: str) -> None:
    data, half_close = BROKEN_PEERS[name]
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("alive/#", credit=5)
        sender = client.create_sender("alive/1")
        reply = raw_exchange(gw, data, half_close=half_close)
        # The peer is answered with the header we speak before being closed.
        assert reply.startswith(SASL_HEADER), reply
        sender.send(Message(body=b"still here"))
        assert take(receiver).body == b"still here"
    with amqp_client(gw, ROOT_USER, root_password):
        pass  # and new clients are served


def test_silent_truncated_peer_is_dropped_after_the_handshake_timeout(
    start_gateway: Callable[..., GatewayThread]
) -> None:
    gw = start_gateway(server=AMQP, limits={"handshake_timeout": "0.3s"})
    started = time.monotonic()
    reply = raw_exchange(gw, SASL_HEADER + sasl_frame_init(b"\0u\0p")[:11])
    assert reply.startswith(SASL_HEADER)
    assert time.monotonic() - started < 4.0
    wait_for(lambda: gw.call(lambda: gw.gateway.state.count("server.amqp.plain")) == 0)


def test_shutdown_closes_clients_with_connection_forced(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP)
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("bye/#", credit=1)
        gw.stop()
        with pytest.raises(ConnectionException) as caught:
            receiver.receive(timeout=10)
        assert getattr(caught.value, "condition", None) == "amqp:connection:forced"


def test_a_flooding_sender_is_slowed_not_dropped(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP, ratelimit={"enabled": True, "message": {"rate": 100, "burst": 5}})
    with amqp_client(gw, ROOT_USER, root_password) as client:
        receiver = client.create_receiver("rl/#", credit=50)
        sender = client.create_sender("rl/1", options=AtMostOnce())
        started = time.monotonic()
        for i in range(35):
            sender.send(Message(body=b"%d" % i))
        got = [take(receiver).body for _ in range(35)]
        elapsed = time.monotonic() - started
    assert got == [b"%d" % i for i in range(35)]
    assert elapsed >= 0.25  # 30 messages beyond the burst at 100/s
