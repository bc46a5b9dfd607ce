"""MQTT 5 on the MQTT frontend, seen from paho-mqtt (protocol=MQTTv5) and from raw bytes, over loopback.

The basics of issue 20's first part: a v5 client connects, subscribes,
publishes at QoS 0/1/2 and receives, with v5 CONNACK/PUBACK/SUBACK wire forms
and the auth outcomes as MQTT 5 reason codes; 3.1.1 and 5 clients share topics.
"""

from __future__ import annotations

import queue
import socket
import threading
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions

from auth_providers.local_store import LocalStore
from gateway.events import Decision, Secret
from gateway.mqtt import Properties, decode_packet, encode
from gateway.mqtt.packets import Connect, Puback, Publish, Subscribe, SubscriptionOptions
from tests.conftest import ROOT_USER, UnavailableProvider, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

ALICE_PASSWORD = "alice-pw-5e1b"


class V5Client:
    """paho-mqtt speaking MQTT 5, driven synchronously with deadlines."""

    def __init__(self, port: int, client_id: str = "", username: str | None = None, password: str | None = None,
                 *, clean_start: bool = True, session_expiry: int | None = None) -> None:
        self.port = port
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5,
                                  reconnect_on_failure=False)
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.connack: queue.Queue[tuple[int, bool, Any]] = queue.Queue()
        self.subacks: queue.Queue[tuple[int, list[int]]] = queue.Queue()
        self.pubacks: dict[int, int] = {}
        self._pubacked = threading.Condition()
        self.disconnects: queue.Queue[int] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_message = lambda client, userdata, message: self.messages.put(message)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.connack.put((reason_code.value, bool(flags.session_present), properties))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        self.subacks.put((mid, [code.value for code in reason_codes]))

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        with self._pubacked:
            self.pubacks[mid] = reason_code.value
            self._pubacked.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.disconnects.put(reason_code.value)

    def connect(self, timeout: float = 10.0) -> tuple[int, bool, Any]:
        """(CONNACK reason code, session present, CONNACK properties)."""
        properties = None
        if self.session_expiry is not None:
            properties = PahoProperties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = self.session_expiry
        self.client.connect("127.0.0.1", self.port, keepalive=60, clean_start=self.clean_start, properties=properties)
        self.client.loop_start()
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no CONNACK within the deadline") from None

    def connect_ok(self) -> V5Client:
        code, _present, _props = self.connect()
        assert code == 0, f"CONNACK 0x{code:02x}"
        return self

    def subscribe(self, *filters: tuple[str, int], timeout: float = 10.0, **options: Any) -> list[int]:
        result, mid = self.client.subscribe([(topic, SubscribeOptions(qos=qos, **options)) for topic, qos in filters])
        assert result == mqtt.MQTT_ERR_SUCCESS
        got_mid, codes = self.subacks.get(timeout=timeout)
        assert got_mid == mid
        return codes

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, timeout: float = 10.0) -> int:
        """Publish; at QoS 1/2 wait for the acknowledgement and return its reason code."""
        info = self.client.publish(topic, payload, qos, retain)
        if not qos:
            return 0
        with self._pubacked:
            if not self._pubacked.wait_for(lambda: info.mid in self.pubacks, timeout):
                raise AssertionError(f"no acknowledgement of {topic!r} within the deadline")
            return self.pubacks.pop(info.mid)

    def expect(self, count: int = 1, timeout: float = 10.0) -> list[mqtt.MQTTMessage]:
        got = []
        for _ in range(count):
            try:
                got.append(self.messages.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError(f"expected {count} messages, got {len(got)}") from None
        return got

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()


@pytest.fixture
def v5_clients() -> Any:
    made: list[V5Client] = []

    def make(port: int, client_id: str = "", username: str | None = None, password: str | None = None,
             **kwargs: Any) -> V5Client:
        client = V5Client(port, client_id, username, password, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.close()
        except Exception:
            pass


@pytest.fixture
def v4_clients() -> Any:
    made: list[PahoClient] = []

    def make(port: int, **kwargs: Any) -> PahoClient:
        client = PahoClient(port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.disconnect()
        except Exception:
            pass


@pytest.fixture
def alice_db(db_path: str) -> str:
    store = LocalStore(db_path)
    try:
        store.add_user("alice", Secret(ALICE_PASSWORD))
        store.grant("alice", "tenants/alice/#", {"publish", "subscribe"})
    finally:
        store.close()
    return db_path


def root5(make: Any, port: int, root_password: str, client_id: str, **kwargs: Any) -> V5Client:
    return make(port, client_id, ROOT_USER, root_password, **kwargs).connect_ok()  # type: ignore[no-any-return]


# -- connect, subscribe, publish, receive -------------------------------------------------------------


def test_v5_client_publishes_and_receives_at_every_qos(gateway: GatewayThread, v5_clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root5(v5_clients, port, root_password, "v5-sub")
    assert sub.subscribe(("v5/q0", 0), ("v5/q1", 1), ("v5/q2", 2)) == [0, 1, 2]
    pub = root5(v5_clients, port, root_password, "v5-pub")
    assert pub.publish("v5/q0", b"zero", qos=0) == 0
    assert pub.publish("v5/q1", b"one", qos=1) == 0
    assert pub.publish("v5/q2", b"two", qos=2) == 0
    got = sorted((m.topic, m.payload, m.qos) for m in sub.expect(3))
    assert got == [("v5/q0", b"zero", 0), ("v5/q1", b"one", 1), ("v5/q2", b"two", 2)]


def test_v5_connack_announces_what_is_served_and_assigns_a_client_id(
    gateway: GatewayThread, v5_clients: Any, root_password: str
) -> None:
    client = v5_clients(gateway.mqtt_port, "", ROOT_USER, root_password)
    code, present, props = client.connect()
    assert (code, present) == (0, False)
    assert props.AssignedClientIdentifier.startswith("auto-")
    # Not served yet, so announced as unavailable; the packet size is the gateway's limit.
    assert props.SubscriptionIdentifierAvailable == 0
    assert props.SharedSubscriptionAvailable == 0
    assert props.MaximumPacketSize > 1_048_576


def test_v5_persistent_session_with_session_expiry(gateway: GatewayThread, v5_clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root5(v5_clients, port, root_password, "v5-keep", clean_start=False, session_expiry=3600)
    assert sub.subscribe(("kept5/#", 1)) == [1]
    sub.close()
    pub = root5(v5_clients, port, root_password, "v5-keep-pub")
    assert pub.publish("kept5/x", b"while away", qos=1) == 0
    again = v5_clients(port, "v5-keep", ROOT_USER, root_password, clean_start=False, session_expiry=3600)
    code, present, _props = again.connect()
    assert (code, present) == (0, True)
    assert again.expect(1)[0].payload == b"while away"


def test_v5_session_without_expiry_ends_with_the_connection(
    gateway: GatewayThread, v5_clients: Any, root_password: str
) -> None:
    port = gateway.mqtt_port
    first = root5(v5_clients, port, root_password, "v5-brief", clean_start=False)
    first.subscribe(("brief5/#", 1))
    first.close()
    again = v5_clients(port, "v5-brief", ROOT_USER, root_password, clean_start=False)
    assert again.connect()[:2] == (0, False)


def test_v4_and_v5_clients_share_topics(
    gateway: GatewayThread, v4_clients: Any, v5_clients: Any, root_password: str
) -> None:
    port = gateway.mqtt_port
    old = v4_clients(port, client_id="v4-side", username=ROOT_USER, password=root_password).connect_ok()
    new = root5(v5_clients, port, root_password, "v5-side")
    assert old.subscribe(("mixed/#", 2)) == [2]
    assert new.subscribe(("mixed/#", 2)) == [2]
    new.publish("mixed/from5", b"hello 3.1.1", qos=1)
    old.publish("mixed/from4", b"hello 5", qos=2)
    for client in (old, new):
        got = sorted((m.topic, m.payload) for m in client.expect(2))  # type: ignore[attr-defined]
        assert got == [("mixed/from4", b"hello 5"), ("mixed/from5", b"hello 3.1.1")]


def test_v5_retain_handling(gateway: GatewayThread, v5_clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    pub = root5(v5_clients, port, root_password, "rh-pub")
    pub.publish("rh/state", b"kept", qos=1, retain=True)
    never = root5(v5_clients, port, root_password, "rh-never")
    assert never.subscribe(("rh/state", 1), retainHandling=2) == [1]
    if_new = root5(v5_clients, port, root_password, "rh-new")
    assert if_new.subscribe(("rh/state", 1), retainHandling=1) == [1]
    assert if_new.expect(1)[0].retain
    assert if_new.subscribe(("rh/state", 1), retainHandling=1) == [1]  # exists now: nothing again
    pub.publish("rh/marker", b"m", qos=1)
    assert never.subscribe(("rh/marker", 1)) == [1]
    pub.publish("rh/marker", b"m2", qos=1)
    assert [m.payload for m in never.expect(1)] == [b"m2"]
    assert never.messages.empty() and if_new.messages.empty()


# -- auth outcomes as MQTT 5 reason codes -------------------------------------------------------------------


def test_v5_connack_reason_codes_for_credentials(gateway: GatewayThread, v5_clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    assert v5_clients(port, "a", ROOT_USER, "wrong").connect()[0] == 0x86
    assert v5_clients(port, "b").connect()[0] == 0x87  # no credentials, anonymous off
    assert v5_clients(port, "c", ROOT_USER, root_password).connect()[0] == 0


def test_v5_connack_server_unavailable(start_gateway: Any, v5_clients: Any) -> None:
    gw = start_gateway(provider=UnavailableProvider())
    assert v5_clients(gw.mqtt_port, "x", "anyone", "anything").connect()[0] == 0x88


class _BusyProvider(UnavailableProvider):
    """Every password check shed for load, as the local provider answers when its workers are all busy."""

    async def authenticate(self, event: Any) -> Any:
        return Decision.unavailable("auth provider 'local' is busy: no password check could start in time")


def test_v5_connack_server_busy(start_gateway: Any, v5_clients: Any, v4_clients: Any) -> None:
    gw = start_gateway(provider=_BusyProvider())
    assert v5_clients(gw.mqtt_port, "x", "anyone", "anything").connect()[0] == 0x89
    # 3.1.1 has no "busy": it is "server unavailable" there.
    assert v4_clients(gw.mqtt_port, client_id="y", username="anyone", password="anything").connect()[0] == 3


def test_v5_suback_and_puback_say_not_authorized(
    start_gateway: Any, alice_db: str, v5_clients: Any, root_password: str
) -> None:
    gw = start_gateway()
    port = gw.mqtt_port
    watcher = root5(v5_clients, port, root_password, "watcher")
    watcher.subscribe(("tenants/#", 1))
    alice = v5_clients(port, "alice-5", "alice", ALICE_PASSWORD).connect_ok()
    assert alice.subscribe(("tenants/bob/#", 1), ("tenants/alice/#", 1)) == [0x87, 1]
    # A denied QoS 1 publish is refused with 0x87 (3.1.1 acknowledges it silently); QoS 2 below, in raw bytes.
    assert alice.publish("tenants/bob/x", b"no", qos=1) == 0x87
    assert alice.publish("tenants/alice/x", b"yes", qos=1) == 0
    got = watcher.expect(1)[0]
    assert (got.topic, got.payload) == ("tenants/alice/x", b"yes")
    assert watcher.messages.empty()


def test_v5_shared_subscriptions_are_refused_until_served(
    gateway: GatewayThread, v5_clients: Any, root_password: str
) -> None:
    client = root5(v5_clients, gateway.mqtt_port, root_password, "sharer")
    assert client.subscribe(("$share/g/t", 1), ("t", 1)) == [0x9E, 1]


def test_v5_queue_overflow_refusal_is_puback_0x97(
    start_gateway: Any, tmp_path: Path, v5_clients: Any, root_password: str
) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={
        "max_queued_messages": 2, "max_inflight_messages": 1, "queue_overflow": {"mqtt": "reject_new"}}))
    port = gw.mqtt_port
    # A subscriber that never acknowledges: one message in flight, two queued, then the queue is full.
    stuck = _RawV5(port)
    stuck.send(_connect5("stuck", ROOT_USER, root_password))
    assert stuck.read_packet()[0] == 0x20
    stuck.send(encode(Subscribe(packet_id=1, topics=(("full/#", SubscriptionOptions(1)),)), 5))
    assert stuck.read_packet()[0] == 0x90
    pub = root5(v5_clients, port, root_password, "filler")
    codes = [pub.publish("full/x", str(i).encode(), qos=1) for i in range(6)]
    assert codes[:3] == [0, 0, 0]
    assert set(codes[3:]) == {0x97}
    stuck.close()


# -- the wire forms -------------------------------------------------------------------------------------------


class _RawV5:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(5)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_packet(self) -> tuple[int, bytes]:
        header = self._read(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header, self._read(length)

    def read_whole(self) -> bytes:
        header, body = self.read_packet()
        return bytes((header,)) + _varint(len(body)) + body

    def closed(self) -> bool:
        try:
            while self.sock.recv(65536):
                pass
            return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self) -> None:
        self.sock.close()


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _connect5(client_id: str, username: str, password: str, **properties: Any) -> bytes:
    return encode(Connect(protocol_level=5, client_id=client_id, username=username, password=password.encode(),
                          properties=Properties(**properties)))


def test_v5_wire_forms_of_connack_suback_and_puback(gateway: GatewayThread, root_password: str) -> None:
    raw = _RawV5(gateway.mqtt_port)
    try:
        raw.send(_connect5("wire", ROOT_USER, root_password))
        connack = decode_packet(raw.read_whole(), 5)
        assert connack.reason_code == 0 and not connack.session_present  # type: ignore[union-attr]
        raw.send(encode(Subscribe(packet_id=7, topics=(("w/#", SubscriptionOptions(1)),
                                                       ("w/#/x", SubscriptionOptions(0)))), 5))
        # SUBACK: packet id, empty properties, granted QoS 1, 0x8F topic filter invalid.
        assert raw.read_packet() == (0x90, b"\x00\x07\x00\x01\x8f")
        raw.send(encode(Publish("w/a", b"p", 1, False, False, 9), 5))
        # Our own message comes back (as a v5 PUBLISH with an empty property length), and the
        # PUBACK of a success takes the short form (no reason code, no properties).
        packets = sorted((raw.read_whole() for _ in range(2)), key=lambda wire: wire[0])
        publish, ack = packets[0], packets[1]
        assert ack == b"\x40\x02\x00\x09"
        assert decode_packet(ack, 5) == Puback(9)
        assert publish[0] == 0x32 and publish[2:7] == b"\x00\x03w/a" and publish[9:] == b"\x00p"
    finally:
        raw.close()


def test_v5_protocol_error_is_answered_with_disconnect_and_reason(gateway: GatewayThread, root_password: str) -> None:
    raw = _RawV5(gateway.mqtt_port)
    try:
        raw.send(_connect5("twice", ROOT_USER, root_password))
        raw.read_packet()
        raw.send(_connect5("twice", ROOT_USER, root_password))  # a second CONNECT
        header, body = raw.read_packet()
        assert header == 0xE0 and body[0] == 0x82  # DISCONNECT, protocol error
        assert raw.closed()
    finally:
        raw.close()


def test_v5_packet_over_the_announced_size_is_disconnect_0x95(
    start_gateway: Any, tmp_path: Path, root_password: str
) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={"max_message_size": 1024}))
    raw = _RawV5(gw.mqtt_port)
    try:
        raw.send(_connect5("big", ROOT_USER, root_password))
        connack = decode_packet(raw.read_whole(), 5)
        limit = connack.properties.maximum_packet_size  # type: ignore[union-attr]
        assert limit is not None and 1024 < limit < 4096
        raw.send(b"\x30\xff\xff\x03")  # announces ~64 KB
        header, body = raw.read_packet()
        assert header == 0xE0 and body[0] == 0x95
        assert raw.closed()
    finally:
        raw.close()


def test_v5_session_takeover_tells_the_old_connection(gateway: GatewayThread, root_password: str) -> None:
    first = _RawV5(gateway.mqtt_port)
    second = _RawV5(gateway.mqtt_port)
    try:
        first.send(_connect5("same5", ROOT_USER, root_password))
        first.read_packet()
        second.send(_connect5("same5", ROOT_USER, root_password))
        assert second.read_packet()[0] == 0x20
        header, body = first.read_packet()
        assert header == 0xE0 and body[0] == 0x8E  # session taken over
    finally:
        first.close()
        second.close()


def test_v5_bad_authentication_method_is_refused(gateway: GatewayThread, root_password: str) -> None:
    raw = _RawV5(gateway.mqtt_port)
    try:
        raw.send(_connect5("scram", ROOT_USER, root_password, authentication_method="SCRAM-SHA-256"))
        connack = decode_packet(raw.read_whole(), 5)
        assert connack.reason_code == 0x8C  # type: ignore[union-attr]
        assert raw.closed()
    finally:
        raw.close()


def test_v5_denied_qos2_publish_is_pubrec_0x87(start_gateway: Any, alice_db: str) -> None:
    gw = start_gateway()
    raw = _RawV5(gw.mqtt_port)
    try:
        raw.send(_connect5("alice-raw", "alice", ALICE_PASSWORD))
        assert raw.read_packet()[0] == 0x20
        raw.send(encode(Publish("tenants/bob/x", b"no", 2, False, False, 3), 5))
        assert raw.read_packet() == (0x50, b"\x00\x03\x87")  # PUBREC, packet id 3, not authorized
        # The exchange is over; a PUBREL all the same (as paho sends one) is answered, not an error.
        raw.send(b"\x62\x02\x00\x03")
        assert raw.read_packet() == (0x70, b"\x00\x03")
        raw.send(encode(Publish("tenants/alice/x", b"yes", 2, False, False, 4), 5))
        assert raw.read_packet() == (0x50, b"\x00\x04")
    finally:
        raw.close()
