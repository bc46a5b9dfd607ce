"""Every frontend fuzzed: a seeded mutator over a valid session of each protocol.

Each protocol gets a valid session written out as byte chunks (the MQTT
CONNECT/SUBSCRIBE/PUBLISH/PINGREQ/DISCONNECT, an HTTP request, a WebSocket
upgrade and its frames, CoAP datagrams, AMQP 0.9.1 and 1.0 from protocol
header to close, with the root user's real password so the cases reach the
states behind auth). A case mutates one to three chunks (bit flips, random
and "interesting" bytes, invalid UTF-8, cut, repeated, dropped and swapped
chunks), sends the result on a connection of its own and reads until the
gateway closes or goes quiet. Afterwards: no ERROR record and no traceback in
the gateway's log (both formats, through the handlers `polygate run`
installs), no 500, the root password in no log line, a real client of the
protocol still publishes, and the process's RSS grew by a bounded amount.

The seed is fixed, so a failure reproduces; `POLYGATE_FUZZ_CASES` and
`POLYGATE_FUZZ_SEED` run more (CI nightly: a few thousand per protocol).
"""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import os
import random
import struct
from collections.abc import Callable, Iterator
from typing import Any

import aiocoap
import aiohttp
import pika
import pytest
from pamqp import commands, frame, header
from pamqp import body as pamqp_body
from proton import Message as ProtonMessage
from proton.utils import BlockingConnection

from gateway.logging_setup import make_handler
from tests.conftest import ROOT_USER
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

CASES = int(os.environ.get("POLYGATE_FUZZ_CASES", "500"))
SEED = int(os.environ.get("POLYGATE_FUZZ_SEED", "19"))
#: Connections fuzzed at once, and how long one waits for the gateway to answer or close.
CONCURRENCY = 24
QUIET = 0.15
#: How much the process may grow over one protocol's cases.
RSS_GROWTH_LIMIT = 64 * 1024 * 1024

SERVER = {
    "websocket": {"plain": {"addr": "127.0.0.1:0", "path": "/mqtt"}},
    "coap": {"plain": {"addr": "127.0.0.1:0"}},
    "amqp": {"plain": {"addr": "127.0.0.1:0"}},
    "amqp091": {"plain": {"addr": "127.0.0.1:0"}},
}
# The lockout would refuse the final real client after so many mutated passwords.
LIMITS = {"failed_logins": {"per_ip": 0, "per_username": 0}}


# -- valid sessions, as chunks -----------------------------------------------------------------------


def _mqtt_str(value: bytes) -> bytes:
    return struct.pack(">H", len(value)) + value


def _mqtt_packet(first: int, body: bytes) -> bytes:
    length, encoded = len(body), bytearray()
    while True:
        digit, length = length % 128, length // 128
        encoded.append(digit | (0x80 if length else 0))
        if not length:
            return bytes((first,)) + bytes(encoded) + body


def mqtt_session(password: str) -> list[bytes]:
    connect = (_mqtt_str(b"MQTT") + b"\x04\xc2\x00\x3c" + _mqtt_str(b"fuzz-mqtt")
               + _mqtt_str(ROOT_USER.encode()) + _mqtt_str(password.encode()))
    return [
        _mqtt_packet(0x10, connect),
        _mqtt_packet(0x82, b"\x00\x01" + _mqtt_str(b"fuzz/+/x") + b"\x01"),
        _mqtt_packet(0x32, _mqtt_str(b"fuzz/mqtt/x") + b"\x00\x02" + b"payload"),
        _mqtt_packet(0x30, _mqtt_str(b"fuzz/mqtt/y") + b"\xff\xfe"),
        b"\xc0\x00",
        _mqtt_packet(0xA2, b"\x00\x03" + _mqtt_str(b"fuzz/+/x")),
        b"\xe0\x00",
    ]


def _basic(password: str) -> bytes:
    return b"Basic " + base64.b64encode(f"{ROOT_USER}:{password}".encode())


def http_session(password: str) -> list[bytes]:
    body = b'{"topic": "fuzz/http", "payload": "aGVsbG8=", "qos": 1, "retain": false}'
    return [
        b"POST /fuzz/http?qos=1 HTTP/1.1\r\nHost: gw\r\n",
        b"Authorization: " + _basic(password) + b"\r\nX-Client-ID: fuzz-http\r\n",
        b"Content-Length: 5\r\n\r\nhello",
        b"POST /publish HTTP/1.1\r\nHost: gw\r\nAuthorization: " + _basic(password) + b"\r\n",
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body,
        b"GET /subscribe?topic=fuzz/%23 HTTP/1.1\r\nHost: gw\r\nAuthorization: " + _basic(password) + b"\r\n\r\n",
    ]


def _ws_frame(payload: bytes, opcode: int = 0x2) -> bytes:
    mask = b"\x11\x22\x33\x44"
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    size = len(payload)
    length = bytes((0x80 | size,)) if size < 126 else b"\xfe" + struct.pack(">H", size)
    return bytes((0x80 | opcode,)) + length + mask + masked


def websocket_session(password: str) -> list[bytes]:
    upgrade = (b"GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
               b"Sec-WebSocket-Protocol: mqtt\r\n\r\n")
    return [upgrade, *(_ws_frame(packet) for packet in mqtt_session(password)), _ws_frame(b"\x03\xe8", 0x8)]


def _coap_option(delta: int, value: bytes) -> bytes:
    def nibble(n: int) -> tuple[int, bytes]:
        if n < 13:
            return n, b""
        if n < 269:
            return 13, bytes((n - 13,))
        return 14, struct.pack(">H", n - 269)

    d, dext = nibble(delta)
    size, lext = nibble(len(value))
    return bytes(((d << 4) | size,)) + dext + lext + value


def _coap(message_id: int, code: int, options: list[tuple[int, bytes]], payload: bytes = b"") -> bytes:
    out = bytearray((0x42, code)) + struct.pack(">H", message_id) + b"fz"
    last = 0
    for number, value in options:
        out += _coap_option(number - last, value)
        last = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def coap_session(password: str) -> list[bytes]:
    auth = [(15, f"username={ROOT_USER}".encode()), (15, f"password={password}".encode())]
    return [
        _coap(1, 0x02, [(11, b"fuzz"), (11, b"coap"), *auth], b"hello"),
        _coap(2, 0x01, [(6, b""), (11, b"fuzz"), (11, b"coap"), *auth]),
        _coap(3, 0x03, [(11, b"fuzz"), (11, b"coap"), *auth, (27, b"\x0a")], b"block" * 4),
    ]


def amqp091_session(password: str) -> list[bytes]:
    response = f"\0{ROOT_USER}\0{password}"
    return [
        b"AMQP\x00\x00\x09\x01",
        frame.marshal(commands.Connection.StartOk(client_properties={"product": "fuzz"}, mechanism="PLAIN",
                                                  response=response), 0),
        frame.marshal(commands.Connection.TuneOk(channel_max=16, frame_max=131072, heartbeat=0), 0),
        frame.marshal(commands.Connection.Open(virtual_host="/"), 0),
        frame.marshal(commands.Channel.Open(), 1),
        frame.marshal(commands.Queue.Declare(queue="fuzz-q", auto_delete=True), 1),
        frame.marshal(commands.Basic.Publish(exchange="amq.topic", routing_key="fuzz.amqp091"), 1),
        frame.marshal(header.ContentHeader(body_size=5), 1),
        frame.marshal(pamqp_body.ContentBody(b"hello"), 1),
        frame.marshal(commands.Channel.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 1),
        frame.marshal(commands.Connection.Close(reply_code=200, reply_text="bye", class_id=0, method_id=0), 0),
    ]


def _described(code: int, fields: list[bytes]) -> bytes:
    body = b"".join(fields)
    return b"\x00\x53" + bytes((code, 0xC0, len(body) + 1, len(fields))) + body


def _str8(value: bytes, code: int = 0xA1) -> bytes:
    return bytes((code, len(value))) + value


def _amqp_frame(body: bytes, channel: int = 0, kind: int = 0) -> bytes:
    return struct.pack(">IBBH", 8 + len(body), 2, kind, channel) + body


def amqp10_session(password: str) -> list[bytes]:
    null, true, false, zero = b"\x40", b"\x41", b"\x42", b"\x43"
    window = b"\x70" + struct.pack(">I", 100)
    plain = f"\0{ROOT_USER}\0{password}".encode()
    sasl_init = _described(0x41, [_str8(b"PLAIN", 0xA3), _str8(plain, 0xA0)])
    attach = _described(0x12, [_str8(b"fuzz-link"), zero, false, null, null,
                               _described(0x28, [_str8(b"src")]), _described(0x29, [_str8(b"fuzz/amqp")])])
    transfer = _described(0x14, [zero, zero, _str8(b"t", 0xA0), zero, true]) + b"\x00\x53\x75" + _str8(b"hello", 0xA0)
    return [
        b"AMQP\x03\x01\x00\x00",
        _amqp_frame(sasl_init, kind=1),
        b"AMQP\x00\x01\x00\x00",
        _amqp_frame(_described(0x10, [_str8(b"fuzz-container")])),
        _amqp_frame(_described(0x11, [null, zero, window, window])),
        _amqp_frame(attach),
        _amqp_frame(transfer),
        _amqp_frame(_described(0x16, [zero, true])),
        _amqp_frame(_described(0x17, [])),
        _amqp_frame(_described(0x18, [])),
    ]


# -- the mutator ---------------------------------------------------------------------------------------

_INTERESTING = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00",
                b"\xed\xa0\x80", b"\xc3\x28", b"\xf8\x88\x80\x80\x80", b"%", b"\r\n", b"[" * 64, b"\x00" * 64)


def mutate(rng: random.Random, chunks: list[bytes]) -> list[bytes]:
    """One to three mutations of a copy of `chunks`; the result may be any bytes at all."""
    out = [bytearray(chunk) for chunk in chunks]
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(10)
        index = rng.randrange(len(out))
        chunk = out[index]
        at = rng.randrange(len(chunk) + 1)
        if op == 0 and chunk:
            chunk[min(at, len(chunk) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and chunk:
            chunk[min(at, len(chunk) - 1)] = rng.randrange(256)
        elif op == 2:
            chunk[at:at] = rng.choice(_INTERESTING)
        elif op == 3:
            chunk[at:at] = rng.randbytes(rng.randint(1, 16))
        elif op == 4:
            del chunk[at:at + rng.randint(1, 8)]
        elif op == 5:
            del chunk[at:]
        elif op == 6 and len(out) > 1:
            del out[index]
        elif op == 7:
            out.insert(index, bytearray(chunk))
        elif op == 8 and len(out) > 1:
            other = rng.randrange(len(out))
            out[index], out[other] = out[other], out[index]
        else:
            # A length or count field turned huge or zero, wherever one may sit.
            span = chunk[at:at + 4]
            chunk[at:at + len(span)] = rng.choice((b"\xff", b"\x00")) * len(span)
    return [bytes(chunk) for chunk in out]


# -- running cases -------------------------------------------------------------------------------------------


async def _stream_case(port: int, chunks: list[bytes]) -> bytes:
    """Send the chunks on one connection; what came back before the gateway closed or went quiet."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    received = bytearray()
    try:
        for chunk in chunks:
            writer.write(chunk)
        await writer.drain()
        while True:
            try:
                data = await asyncio.wait_for(reader.read(65536), QUIET)
            except TimeoutError:
                break
            if not data:
                break
            received += data
    except ConnectionError:
        pass
    finally:
        writer.transport.abort()
    return bytes(received)


async def fuzz_stream(port: int, session: list[bytes], seed: int) -> list[bytes]:
    rng = random.Random(seed)
    cases = [mutate(rng, session) for _ in range(CASES)]
    slots = asyncio.Semaphore(CONCURRENCY)

    async def run(chunks: list[bytes]) -> bytes:
        async with slots:
            return await _stream_case(port, chunks)

    return await asyncio.gather(*(run(case) for case in cases))


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: list[bytes] = []

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.append(data)

    def error_received(self, exc: Exception) -> None:
        pass


async def fuzz_datagrams(port: int, session: list[bytes], seed: int) -> list[bytes]:
    """Every case's datagrams from one socket that stays open, so every reply has somewhere to go."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_datagram_endpoint(_Datagrams, remote_addr=("127.0.0.1", port))
    try:
        for number in range(CASES):
            for datagram in mutate(rng, session):
                transport.sendto(datagram)
            if number % 32 == 31:
                await asyncio.sleep(0.005)  # a pace the gateway's socket buffer takes
        await asyncio.sleep(QUIET)
    finally:
        transport.close()
    return protocol.received


def _rss() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class LogCapture:
    """The handlers `polygate run` installs (text and JSON, with the redacting filter), on the root logger."""

    def __init__(self) -> None:
        self.text, self.json = io.StringIO(), io.StringIO()
        self.records: list[logging.LogRecord] = []
        self._handlers = [make_handler("text", self.text), make_handler("json", self.json)]
        self._keep = _Keep(self.records)

    def __enter__(self) -> LogCapture:
        root = logging.getLogger()
        self._level = root.level
        root.setLevel(logging.INFO)
        for handler in (*self._handlers, self._keep):
            root.addHandler(handler)
        return self

    def __exit__(self, *exc: object) -> None:
        root = logging.getLogger()
        for handler in (*self._handlers, self._keep):
            root.removeHandler(handler)
        root.setLevel(self._level)

    def lines(self) -> list[str]:
        return self.text.getvalue().splitlines() + self.json.getvalue().splitlines()


class _Keep(logging.Handler):
    def __init__(self, records: list[logging.LogRecord]) -> None:
        super().__init__(logging.INFO)
        self._records = records

    def emit(self, record: logging.LogRecord) -> None:
        self._records.append(record)


@pytest.fixture
def fuzz_gateway(start_gateway: Callable[..., GatewayThread]) -> Iterator[tuple[GatewayThread, LogCapture]]:
    with LogCapture() as logs:
        gw = start_gateway(server=SERVER, limits=LIMITS)
        yield gw, logs


def check_logs(logs: LogCapture, password: str) -> None:
    errors = [f"{r.name}: {r.getMessage()}" for r in logs.records if r.levelno >= logging.ERROR]
    assert not errors, errors[:5]
    lines = logs.lines()
    assert not [line for line in lines if "Traceback" in line][:3]
    assert not [line for line in lines if password in line][:3]


# -- the real client afterwards ------------------------------------------------------------------------


def _subscriber(gw: GatewayThread, password: str) -> PahoClient:
    subscriber = PahoClient(gw.mqtt_port, client_id="fuzz-watch", username=ROOT_USER, password=password)
    subscriber.connect_ok()
    subscriber.subscribe(("after/#", 1))
    return subscriber


def _published(subscriber: PahoClient, topic: str) -> None:
    message = subscriber.next_message(timeout=10)
    assert message.topic == topic


# -- the tests: one per protocol ----------------------------------------------------------------------------


async def test_fuzz_mqtt_tcp(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    before = _rss()
    await fuzz_stream(gw.mqtt_port, mqtt_session(root_password), SEED)
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)
    publisher = PahoClient(gw.mqtt_port, client_id="after", username=ROOT_USER, password=root_password)
    publisher.connect_ok()
    publisher.publish("after/mqtt", b"ok", qos=1)
    _published(subscriber, "after/mqtt")
    publisher.disconnect()
    subscriber.disconnect()
    check_logs(logs, root_password)


async def test_fuzz_mqtt_websocket(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    port = gw.port("websocket")
    before = _rss()
    replies = await fuzz_stream(port, websocket_session(root_password), SEED + 1)
    assert not [reply[:80] for reply in replies if reply.startswith(b"HTTP/1.1 500")]
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(f"http://127.0.0.1:{port}/mqtt", protocols=("mqtt",)) as ws:
            connect = _mqtt_str(b"MQTT") + b"\x04\xc2\x00\x3c" + _mqtt_str(b"after-ws") + _mqtt_str(
                ROOT_USER.encode()) + _mqtt_str(root_password.encode())
            await ws.send_bytes(_mqtt_packet(0x10, connect))
            assert (await ws.receive_bytes(timeout=10)) == b"\x20\x02\x00\x00"
            await ws.send_bytes(_mqtt_packet(0x30, _mqtt_str(b"after/ws") + b"ok"))
            _published(subscriber, "after/ws")
    subscriber.disconnect()
    check_logs(logs, root_password)


async def test_fuzz_http(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    before = _rss()
    replies = await fuzz_stream(gw.http_port, http_session(root_password), SEED + 2)
    assert not [reply[:200] for reply in replies if b" 500 " in reply.split(b"\r\n", 1)[0]]
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)
    async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(ROOT_USER, root_password)) as session:
        async with session.post(f"http://127.0.0.1:{gw.http_port}/after/http", data=b"ok") as response:
            assert response.status == 202
    _published(subscriber, "after/http")
    subscriber.disconnect()
    check_logs(logs, root_password)


async def test_fuzz_coap(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    port = gw.port("coap")
    before = _rss()
    await fuzz_datagrams(port, coap_session(root_password), SEED + 3)
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        request = aiocoap.Message(
            code=aiocoap.POST, payload=b"ok",
            uri=f"coap://127.0.0.1:{port}/after/coap?username={ROOT_USER}&password={root_password}")
        response = await asyncio.wait_for(context.request(request).response, 10)
        assert response.code.is_successful(), response
    finally:
        await context.shutdown()
    _published(subscriber, "after/coap")
    subscriber.disconnect()
    check_logs(logs, root_password)


async def test_fuzz_amqp091(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    port = gw.port("amqp091")
    before = _rss()
    await fuzz_stream(port, amqp091_session(root_password), SEED + 4)
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)

    def publish() -> None:
        parameters = pika.ConnectionParameters(
            "127.0.0.1", port, credentials=pika.PlainCredentials(ROOT_USER, root_password))
        connection = pika.BlockingConnection(parameters)
        try:
            connection.channel().basic_publish("amq.topic", "after.amqp091", b"ok")
        finally:
            connection.close()

    await asyncio.to_thread(publish)
    _published(subscriber, "after/amqp091")
    subscriber.disconnect()
    check_logs(logs, root_password)


async def test_fuzz_amqp10(fuzz_gateway: tuple[GatewayThread, LogCapture], root_password: str) -> None:
    gw, logs = fuzz_gateway
    port = gw.port("amqp")
    before = _rss()
    await fuzz_stream(port, amqp10_session(root_password), SEED + 5)
    assert _rss() - before < RSS_GROWTH_LIMIT
    subscriber = _subscriber(gw, root_password)

    def publish() -> None:
        connection = BlockingConnection(f"amqp://127.0.0.1:{port}", user=ROOT_USER, password=root_password,
                                        allowed_mechs="PLAIN", timeout=10)
        try:
            connection.create_sender("after/amqp10").send(ProtonMessage(body=b"ok"))
        finally:
            connection.close()

    await asyncio.to_thread(publish)
    _published(subscriber, "after/amqp10")
    subscriber.disconnect()
    check_logs(logs, root_password)


def test_the_mutator_is_seeded_and_changes_the_session() -> None:
    session = mqtt_session("pw")
    rng, again = random.Random(7), random.Random(7)
    first = [mutate(rng, session) for _ in range(50)]
    assert first == [mutate(again, session) for _ in range(50)]
    assert sum(case != session for case in first) >= 45
    assert len({b"".join(case) for case in first}) >= 45
