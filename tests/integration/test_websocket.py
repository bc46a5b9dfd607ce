"""MQTT over WebSocket, seen from paho-mqtt, amqtt and a raw aiohttp WebSocket client.

The session code is the TCP one (tests/integration/test_mqtt_broker.py); what
is shown here is that it behaves the same behind a WebSocket, that TCP and
WebSocket clients meet in one topic and session space, and what is specific
to WebSockets (subprotocol, frames, close codes, backpressure through the
frame writer).
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from amqtt.client import MQTTClient
from amqtt.errors import ConnectError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from auth_providers.local_store import LocalStore
from gateway.events import Secret
from gateway.frontends.websocket import FRAME_BYTES, WebSocketTransport
from tests.conftest import ROOT_USER, UnavailableProvider, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

ALICE_PASSWORD = "alice-ws-pw-91c2"
WS_SERVER = {"websocket": {"plain": {"addr": "127.0.0.1:0", "path": "/mqtt"}}}


class PahoWebSocketClient(PahoClient):
    """tests.paho_client.PahoClient over paho's own WebSocket transport."""

    def __init__(self, port: int, *, path: str = "/mqtt", **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        self.client.transport = "websockets"
        self.client.ws_set_options(path=path)


@pytest.fixture
def clients() -> Iterator[Callable[..., PahoClient]]:
    made: list[PahoClient] = []

    def make(port: int, *, websocket: bool = True, **kwargs: Any) -> PahoClient:
        client = PahoWebSocketClient(port, **kwargs) if websocket else PahoClient(port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.disconnect()
        except Exception:
            pass


@pytest.fixture
def ws_gateway(start_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    return start_gateway(server=WS_SERVER)


@pytest.fixture
def alice_db(db_path: str) -> str:
    store = LocalStore(db_path)
    try:
        store.add_user("alice", Secret(ALICE_PASSWORD))
        store.grant("alice", "tenants/alice/#", {"publish", "subscribe"})
    finally:
        store.close()
    return db_path


def root(port: int, clients: Callable[..., PahoClient], password: str, client_id: str, **kwargs: Any) -> PahoClient:
    return clients(port, client_id=client_id, username=ROOT_USER, password=password, **kwargs).connect_ok()


# -- MQTT written out by hand from the 3.1.1 spec (independent of the gateway's codec) -----------------


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def _packet(header: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            return bytes([header]) + bytes(encoded) + body


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    body = _string("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big") + _string(client_id)
    return _packet(0x10, body + _string(username) + _string(password))


def subscribe_packet(packet_id: int, topic_filter: str, qos: int) -> bytes:
    return _packet(0x82, packet_id.to_bytes(2, "big") + _string(topic_filter) + bytes([qos]))


def publish_packet(topic: str, payload: bytes) -> bytes:
    return _packet(0x30, _string(topic) + payload)


PINGREQ = b"\xc0\x00"


class RawWebSocket:
    """An aiohttp WebSocket client that reads MQTT packets from the frames' byte stream."""

    def __init__(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.session = session
        self.ws = ws
        self.buffer = b""

    @classmethod
    async def open(cls, port: int, protocols: tuple[str, ...] = ("mqtt",), **kwargs: Any) -> RawWebSocket:
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(f"http://127.0.0.1:{port}/mqtt", protocols=protocols, **kwargs)
        except BaseException:
            await session.close()
            raise
        return cls(session, ws)

    async def send(self, data: bytes) -> None:
        await self.ws.send_bytes(data)

    async def next_message(self, timeout: float = 5.0) -> aiohttp.WSMessage:
        return await self.ws.receive(timeout=timeout)

    async def read_packet(self, timeout: float = 5.0) -> tuple[int, bytes]:
        async with asyncio.timeout(timeout):
            while True:
                parsed = self._parse()
                if parsed is not None:
                    return parsed
                message = await self.ws.receive()
                assert message.type is aiohttp.WSMsgType.BINARY, f"expected a binary frame, got {message}"
                self.buffer += message.data

    def _parse(self) -> tuple[int, bytes] | None:
        buffer = self.buffer
        length, shift, position = 0, 0, 1
        while True:
            if position >= len(buffer):
                return None
            byte = buffer[position]
            length |= (byte & 0x7F) << shift
            shift += 7
            position += 1
            if not byte & 0x80:
                break
        if len(buffer) < position + length:
            return None
        self.buffer = buffer[position + length:]
        return buffer[0], buffer[position:position + length]

    async def close(self) -> None:
        await self.ws.close()
        await self.session.close()


async def connected(port: int, password: str, client_id: str, **kwargs: Any) -> RawWebSocket:
    raw = await RawWebSocket.open(port, **kwargs)
    await raw.send(connect_packet(client_id, ROOT_USER, password))
    assert await raw.read_packet() == (0x20, b"\x00\x00")
    return raw


# -- authentication -------------------------------------------------------------------------------


def test_connack_codes_for_credentials(ws_gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = ws_gateway.port("websocket")
    assert clients(port, client_id="a", username=ROOT_USER, password="wrong").connect()[0] == 4
    assert clients(port, client_id="b", username="nobody", password="x").connect()[0] == 4
    assert clients(port, client_id="c").connect()[0] == 5
    assert clients(port, client_id="d", username=ROOT_USER, password=root_password).connect()[0] == 0


def test_auth_service_unavailable_is_connack_3(start_gateway: Any, clients: Any) -> None:
    gw = start_gateway(server=WS_SERVER, provider=UnavailableProvider())
    assert clients(gw.port("websocket"), client_id="u", username=ROOT_USER, password="any").connect()[0] == 3


def test_amqtt_client_over_websocket(start_gateway: Any, alice_db: str) -> None:
    port = start_gateway(server=WS_SERVER).port("websocket")

    async def scenario() -> None:
        bad = MQTTClient(client_id="amqtt-bad", config={"auto_reconnect": False})
        with pytest.raises(ConnectError) as refused:
            await bad.connect(f"ws://alice:wrong@127.0.0.1:{port}/mqtt")
        assert refused.value.return_code == 4

        client = MQTTClient(client_id="amqtt-alice", config={"auto_reconnect": False})
        await client.connect(f"ws://alice:{ALICE_PASSWORD}@127.0.0.1:{port}/mqtt")
        try:
            assert await client.subscribe([("tenants/alice/#", 1), ("tenants/bob/#", 1)]) == [1, 0x80]
            await client.publish("tenants/bob/x", b"denied", qos=1)
            await client.publish("tenants/alice/x", b"allowed", qos=1)
            message = await client.deliver_message(timeout_duration=10)
            assert message is not None
            assert (message.topic, bytes(message.data)) == ("tenants/alice/x", b"allowed")
        finally:
            await client.disconnect()

    asyncio.run(scenario())


def test_denied_publish_and_subscribe(start_gateway: Any, alice_db: str, clients: Any, root_password: str) -> None:
    gw = start_gateway(server=WS_SERVER)
    watcher = root(gw.mqtt_port, clients, root_password, "watcher", websocket=False)
    assert watcher.subscribe(("#", 1)) == [1]
    alice = clients(gw.port("websocket"), client_id="alice-ws", username="alice", password=ALICE_PASSWORD).connect_ok()
    assert alice.subscribe(("tenants/bob/#", 1), ("tenants/alice/#", 1)) == [0x80, 1]
    alice.publish("tenants/bob/x", b"must not arrive", qos=1)
    alice.publish("tenants/alice/x", b"marker", qos=1)
    first = watcher.next_message()
    assert (first.topic, first.payload) == ("tenants/alice/x", b"marker")


# -- delivery across transports ------------------------------------------------------------------


def test_websocket_and_tcp_clients_exchange_identical_bytes(
    ws_gateway: GatewayThread, clients: Any, root_password: str
) -> None:
    payload = bytes(range(256)) * 40  # every byte value, and larger than one TCP segment
    tcp = root(ws_gateway.mqtt_port, clients, root_password, "tcp-side", websocket=False)
    ws = root(ws_gateway.port("websocket"), clients, root_password, "ws-side")
    assert tcp.subscribe(("to-tcp/#", 1)) == [1]
    assert ws.subscribe(("to-ws/#", 1)) == [1]

    ws.publish("to-tcp/x", payload, qos=1)
    got = tcp.next_message()
    assert (got.topic, got.payload, got.qos) == ("to-tcp/x", payload, 1)

    tcp.publish("to-ws/y", payload[::-1], qos=1)
    got = ws.next_message()
    assert (got.topic, got.payload, got.qos) == ("to-ws/y", payload[::-1], 1)


def test_thousand_qos1_messages_in_order(ws_gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = ws_gateway.port("websocket")
    sub = root(port, clients, root_password, "sub")
    sub.subscribe(("seq/#", 1))
    pub = root(port, clients, root_password, "pub")
    for i in range(1000):
        pub.client.publish("seq/a", str(i).encode(), qos=1)
    got = sub.expect(1000, timeout=30)
    assert [int(m.payload) for m in got] == list(range(1000))
    assert all(m.qos == 1 for m in got)


def test_session_taken_over_from_tcp_by_websocket(ws_gateway: GatewayThread, clients: Any, root_password: str) -> None:
    over_tcp = root(ws_gateway.mqtt_port, clients, root_password, "same", websocket=False, clean_session=False)
    assert over_tcp.subscribe(("take/#", 1)) == [1]
    over_ws = clients(ws_gateway.port("websocket"), client_id="same", username=ROOT_USER, password=root_password,
                      clean_session=False)
    code, session_present = over_ws.connect()
    assert (code, session_present) == (0, True)
    assert over_tcp.disconnected.wait(5)
    publisher = root(ws_gateway.mqtt_port, clients, root_password, "publisher", websocket=False)
    publisher.publish("take/x", b"follows the session", qos=1)
    got = over_ws.next_message()
    assert (got.topic, got.payload) == ("take/x", b"follows the session")


# -- what is specific to WebSockets ------------------------------------------------------------------


async def test_subprotocol_mqtt_required(ws_gateway: GatewayThread, root_password: str) -> None:
    port = ws_gateway.port("websocket")
    for offered in ((), ("json",)):
        raw = await RawWebSocket.open(port, protocols=offered)
        try:
            message = await raw.next_message()
            assert message.type is aiohttp.WSMsgType.CLOSE
            assert message.data == aiohttp.WSCloseCode.PROTOCOL_ERROR
        finally:
            await raw.close()
    # MQTT 3.1 clients offer "mqttv3.1"; that is accepted too.
    raw = await connected(port, root_password, "v31", protocols=("mqttv3.1",))
    assert raw.ws.protocol == "mqttv3.1"
    await raw.close()
    refused = ws_gateway.call(lambda: ws_gateway.gateway.metrics.render().decode())  # type: ignore[union-attr]
    assert 'reason="no_subprotocol"' in refused


async def test_text_frame_closes_only_that_connection(ws_gateway: GatewayThread, root_password: str) -> None:
    port = ws_gateway.port("websocket")
    other = await connected(port, root_password, "bystander")
    raw = await connected(port, root_password, "texter")
    try:
        await raw.ws.send_str("\x10\x0c")
        message = await raw.next_message()
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.UNSUPPORTED_DATA
        await other.send(PINGREQ)
        assert await other.read_packet() == (0xD0, b"")
    finally:
        await raw.close()
        await other.close()


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
async def test_packets_split_and_joined_across_frames(
    ws_gateway: GatewayThread, root_password: str, piece: int
) -> None:
    """Frames carry a byte stream: a packet may span frames and a frame may hold several packets."""
    raw = await RawWebSocket.open(ws_gateway.port("websocket"))
    try:
        stream = (
            connect_packet(f"split-{piece}", ROOT_USER, root_password)
            + subscribe_packet(1, "split/#", 0)
            + publish_packet("split/a", b"one")
            + PINGREQ
            + publish_packet("split/b", b"two")
        )
        for start in range(0, len(stream), piece):
            await raw.send(stream[start:start + piece])
        assert await raw.read_packet() == (0x20, b"\x00\x00")
        assert await raw.read_packet() == (0x90, b"\x00\x01\x00")
        assert await raw.read_packet() == (0x30, _string("split/a") + b"one")
        assert await raw.read_packet() == (0xD0, b"")
        assert await raw.read_packet() == (0x30, _string("split/b") + b"two")
    finally:
        await raw.close()


async def test_oversized_frame_is_refused(start_gateway: Any, tmp_path: Path, root_password: str) -> None:
    gw = start_gateway(loopback_config(tmp_path, server=WS_SERVER, limits={"max_message_size": 1024}))
    raw = await connected(gw.port("websocket"), root_password, "big")
    try:
        await raw.send(publish_packet("big/x", b"x" * 200_000))
        message = await raw.next_message()
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.MESSAGE_TOO_BIG
    finally:
        await raw.close()


async def test_plain_http_and_other_paths_are_answered(ws_gateway: GatewayThread) -> None:
    port = ws_gateway.port("websocket")
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/mqtt") as response:
            assert response.status == 426
            assert "subprotocol mqtt" in await response.text()
        async with session.get(f"http://127.0.0.1:{port}/other") as response:
            assert response.status == 404
        with pytest.raises(aiohttp.WSServerHandshakeError):
            await session.ws_connect(f"http://127.0.0.1:{port}/other", protocols=("mqtt",))


def test_unfinished_upgrade_request_is_dropped(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(server=WS_SERVER, limits={"handshake_timeout": "500ms"})
    port = gw.port("websocket")
    slow = socket.create_connection(("127.0.0.1", port))
    slow.settimeout(5)
    started = time.monotonic()
    try:
        slow.sendall(b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
        try:
            assert slow.recv(1024) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - started < 3
    finally:
        slow.close()
    # An upgraded connection outlives the handshake timeout.
    client = PahoWebSocketClient(port, client_id="stays", username=ROOT_USER, password=root_password).connect_ok()
    try:
        time.sleep(1.0)
        assert client.subscribe(("still/#", 0)) == [0]
    finally:
        client.disconnect()


async def test_max_connections_refuses_the_extra_one(start_gateway: Any, root_password: str) -> None:
    server = {"websocket": {"plain": {"addr": "127.0.0.1:0", "path": "/mqtt", "max_connections": 1}}}
    gw = start_gateway(server=server)
    port = gw.port("websocket")
    first = await connected(port, root_password, "first")
    try:
        # Refused at its accept, before the upgrade: the TCP connection is what counts.
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            extra = await RawWebSocket.open(port)
            await extra.close()
        await first.send(PINGREQ)
        assert await first.read_packet() == (0xD0, b"")
    finally:
        await first.close()
    # The slot is free again once the first one has gone.
    def open_connections() -> int:
        return gw.gateway.state.count("server.websocket.plain")  # type: ignore[union-attr]

    deadline = time.monotonic() + 5
    while gw.call(open_connections) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    again = await connected(port, root_password, "again")
    await again.close()
    metrics = gw.call(lambda: gw.gateway.metrics.render().decode())  # type: ignore[union-attr]
    assert 'reason="max_connections"' in metrics


async def test_shutdown_sends_going_away(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(server=WS_SERVER)
    raw = await connected(gw.port("websocket"), root_password, "leaving")
    try:
        stopping = asyncio.get_running_loop().run_in_executor(None, gw.stop)
        message = await raw.next_message(timeout=10)
        assert message.type is aiohttp.WSMsgType.CLOSE
        assert message.data == aiohttp.WSCloseCode.GOING_AWAY
        await stopping
    finally:
        await raw.close()


async def test_slow_websocket_subscriber_under_block_holds_publisher_back(
    start_gateway: Any, tmp_path: Path, root_password: str
) -> None:
    """A WebSocket that is not read fills the frame writer, which pauses the session (QoS 0 too);
    under the `block` policy its full queue then holds the publisher and nothing is lost."""
    config = loopback_config(tmp_path, server=WS_SERVER,
                             limits={"max_queued_messages": 100, "queue_overflow": {"mqtt": "block"}})
    gw = start_gateway(config)
    slow = await connected(gw.port("websocket"), root_password, "slow")
    # A small receive buffer; the gateway's socket may still buffer up to
    # net.ipv4.tcp_wmem's maximum, so the flood is several times that.
    sock = slow.ws.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    await slow.send(subscribe_packet(1, "flood/#", 0))
    assert await slow.read_packet() == (0x90, b"\x00\x01\x00")

    def queued() -> int:
        registry = gw.gateway.state.shared("mqtt.sessions", lambda: None)  # type: ignore[union-attr]
        return len(registry.sessions["slow"].queue)

    publisher = PahoClient(gw.mqtt_port, client_id="flooder", username=ROOT_USER, password=root_password).connect_ok()
    payload = b"p" * 4000
    total = (3 * _max_socket_send_buffer() + 2**21) // len(payload)
    try:
        for i in range(total):
            publisher.client.publish("flood/x", i.to_bytes(4, "big") + payload, qos=1)
        deadline = time.monotonic() + 10
        most_queued = gw.call(queued)
        while most_queued < 50 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
            most_queued = max(most_queued, gw.call(queued))
        # The queue may drain again right after (the kernel takes more), so what counts is the peak.
        assert most_queued >= 50, "the session never saw the WebSocket congested"
        received = []
        while len(received) < total:
            header, body = await slow.read_packet(timeout=10)
            assert header == 0x30
            received.append(int.from_bytes(body[9:13], "big"))
        assert received == list(range(total))
    finally:
        publisher.disconnect()
        await slow.close()
    dropped = gw.call(lambda: sum(gw.gateway.metrics.messages_dropped.values()))  # type: ignore[union-attr]
    assert dropped == 0


def _max_socket_send_buffer() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 2**20


def _server_certificate(directory: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "ws.pem", directory / "ws-key.pem"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


def test_websocket_over_tls(start_gateway: Any, tmp_path: Path, clients: Any, root_password: str) -> None:
    cert_file, key_file = _server_certificate(tmp_path)
    server = {"websocket": {"tls": {"addr": "127.0.0.1:0", "path": "/mqtt",
                                    "cert_file": str(cert_file), "key_file": str(key_file)}}}
    gw = start_gateway(server=server)
    client = clients(gw.port("websocket"), client_id="wss", username=ROOT_USER, password=root_password)
    client.client.tls_set(ca_certs=str(cert_file), cert_reqs=ssl.CERT_REQUIRED)
    client.connect_ok()
    assert client.subscribe(("secure/#", 1)) == [1]
    client.publish("secure/x", b"over wss", qos=1)
    assert client.next_message().payload == b"over wss"


# -- the transport adapter on its own, against a stand-in WebSocket ------------------------------------


class FakeWebSocket:
    """The part of aiohttp's WebSocketResponse the adapter uses; sends wait for `gate`."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.gate = asyncio.Event()
        self.gate.set()
        self.incoming: asyncio.Queue[aiohttp.WSMessage] = asyncio.Queue()
        self.closed_with: tuple[int, bytes] | None = None
        self.events: list[str] = []

    async def send_bytes(self, data: bytes) -> None:
        await self.gate.wait()
        self.frames.append(data)
        self.events.append("frame")

    async def close(self, *, code: int, message: bytes) -> bool:
        self.closed_with = (code, message)
        self.events.append("close")
        self.incoming.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSING, None, None))
        return True

    async def receive(self) -> aiohttp.WSMessage:
        return await self.incoming.get()

    def feed(self, data: bytes) -> None:
        self.incoming.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.BINARY, data, None))


class FakeSocket(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.aborted = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("192.0.2.7", 40000) if name == "peername" else default

    def abort(self) -> None:
        self.aborted = True


class RecordingProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.received: list[bytes] = []
        self.calls: list[str] = []
        self.lost: list[BaseException | None] = []
        self.pause_after_first = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.received.append(data)
        if self.pause_after_first and self.transport is not None:
            self.transport.pause_reading()

    def pause_writing(self) -> None:
        self.calls.append("pause")

    def resume_writing(self) -> None:
        self.calls.append("resume")

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def _until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0)


def _adapter(ws: FakeWebSocket, protocol: RecordingProtocol, socket_transport: FakeSocket | None = None,
             shutting_down: bool = False) -> WebSocketTransport:
    return WebSocketTransport(ws, socket_transport or FakeSocket(), protocol,  # type: ignore[arg-type]
                              shutting_down=lambda: shutting_down)


async def test_adapter_backpressure_and_frame_joining() -> None:
    ws, protocol = FakeWebSocket(), RecordingProtocol()
    ws.gate.clear()
    adapter = _adapter(ws, protocol)
    running = asyncio.create_task(adapter.run())
    await _until(lambda: protocol.transport is not None)
    chunks = [bytes([i]) * 10_000 for i in range(10)]
    for chunk in chunks:
        adapter.write(chunk)
    assert protocol.calls == ["pause"]  # past 64 KiB queued, as an asyncio socket transport does
    assert adapter.get_write_buffer_size() == 100_000
    ws.gate.set()
    await _until(lambda: protocol.calls == ["pause", "resume"])
    # Joined into frames of about FRAME_BYTES, never splitting what one write gave.
    assert ws.frames == [b"".join(chunks[:7]), b"".join(chunks[7:])]
    assert len(ws.frames[0]) >= FRAME_BYTES
    adapter.write(b"last")
    adapter.close()
    await asyncio.wait_for(running, 2)
    assert ws.frames[-1] == b"last"
    assert ws.events[-1] == "close" and ws.closed_with == (aiohttp.WSCloseCode.OK, b"")
    assert protocol.lost == [None]
    assert adapter.get_extra_info("peername") == ("192.0.2.7", 40000)


async def test_adapter_pause_reading_holds_frames_back() -> None:
    ws, protocol = FakeWebSocket(), RecordingProtocol()
    protocol.pause_after_first = True
    adapter = _adapter(ws, protocol, shutting_down=True)
    running = asyncio.create_task(adapter.run())
    ws.feed(b"one")
    ws.feed(b"two")
    await _until(lambda: protocol.received == [b"one"])
    for _ in range(20):
        await asyncio.sleep(0)
    assert protocol.received == [b"one"]
    protocol.pause_after_first = False
    adapter.resume_reading()
    await _until(lambda: protocol.received == [b"one", b"two"])
    adapter.close()
    await asyncio.wait_for(running, 2)
    assert ws.closed_with == (aiohttp.WSCloseCode.GOING_AWAY, b"")


async def test_adapter_abort_drops_output_and_peer_close_ends_it() -> None:
    ws, protocol, sock = FakeWebSocket(), RecordingProtocol(), FakeSocket()
    ws.gate.clear()
    adapter = _adapter(ws, protocol, sock)
    running = asyncio.create_task(adapter.run())
    await _until(lambda: protocol.transport is not None)
    adapter.write(b"never sent")
    adapter.abort()
    assert sock.aborted and adapter.is_closing()
    ws.incoming.put_nowait(aiohttp.WSMessage(aiohttp.WSMsgType.CLOSED, None, None))
    await asyncio.wait_for(running, 2)
    ws.gate.set()
    assert ws.frames == [] and ws.closed_with is None
    assert protocol.lost == [None]
