"""Every publisher protocol reaches every subscriber protocol, through one gateway.

Each side is a real client library: paho (MQTT over TCP and WebSocket), aiohttp
(HTTP POST, SSE), aiocoap (POST, Observe), pika (AMQP 0.9.1) and
python-qpid-proton (AMQP 1.0). The payload bytes must arrive unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import itertools
import json
import queue
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol as TypingProtocol
from urllib.parse import quote, urlencode

import pytest

from gateway.frontends.registry import built_kinds
from tests.conftest import ROOT_USER, loop_factory_of, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

PROTOCOLS = ("mqtt", "websocket", "http", "coap", "amqp091", "amqp")
#: listener kind each protocol needs
KIND = {"mqtt": "tcp", "websocket": "websocket", "http": "http", "coap": "coap", "amqp091": "amqp091", "amqp": "amqp"}
DEADLINE = 10.0


class Subscriber(TypingProtocol):
    def next_payload(self, timeout: float = DEADLINE) -> bytes: ...

    def close(self) -> None: ...


@pytest.fixture(scope="module")
def matrix_gateway(loop_name: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayThread, str]]:
    import os
    import secrets

    password = secrets.token_urlsafe(12)
    tmp: Path = tmp_path_factory.mktemp("matrix")
    server: dict[str, Any] = {}
    for kind in built_kinds():
        if kind not in ("tcp", "http"):
            server[kind] = {"plain": {"addr": "127.0.0.1:0"}}
    if "websocket" in server:
        server["websocket"]["plain"]["path"] = "/mqtt"
    saved = {k: os.environ.get(k) for k in ("POLYGATE_ROOT_USERNAME", "POLYGATE_ROOT_PASSWORD")}
    os.environ["POLYGATE_ROOT_USERNAME"] = ROOT_USER
    os.environ["POLYGATE_ROOT_PASSWORD"] = password
    gw = GatewayThread.from_dict(loopback_config(tmp, server=server), loop_factory=loop_factory_of(loop_name)).start()
    try:
        yield gw, password
    finally:
        gw.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


# -- threads with an event loop, for the async clients -----------------------------------------------


class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = DEADLINE) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


# -- subscribers ------------------------------------------------------------------------------------------


class MqttSubscriber:
    def __init__(self, gw: GatewayThread, password: str, topic: str, *, websocket: bool) -> None:
        port = gw.port("websocket") if websocket else gw.mqtt_port
        self.client = PahoClient(port, client_id=f"sub-{topic}", username=ROOT_USER, password=password)
        if websocket:
            self.client.client.transport = "websockets"
            self.client.client.ws_set_options(path="/mqtt")
        self.client.connect_ok()
        assert self.client.subscribe((topic, 1)) == [1]

    def next_payload(self, timeout: float = DEADLINE) -> bytes:
        return self.client.next_message(timeout).payload

    def close(self) -> None:
        self.client.disconnect()


class SseSubscriber:
    def __init__(self, gw: GatewayThread, password: str, topic: str) -> None:
        import aiohttp

        self.payloads: queue.Queue[bytes] = queue.Queue()
        self.loop = LoopThread()
        ready = threading.Event()

        async def stream() -> None:
            async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(ROOT_USER, password)) as http:
                url = f"http://127.0.0.1:{gw.http_port}/subscribe"
                async with http.get(url, params={"topic": topic}, timeout=aiohttp.ClientTimeout(total=None)) as response:
                    assert response.status == 200
                    ready.set()
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line.startswith("data:"):
                            self.payloads.put(base64.b64decode(json.loads(line[5:])["payload"]))

        self.task = asyncio.run_coroutine_threadsafe(stream(), self.loop.loop)
        assert ready.wait(DEADLINE), "SSE stream did not open"

    def next_payload(self, timeout: float = DEADLINE) -> bytes:
        return self.payloads.get(timeout=timeout)

    def close(self) -> None:
        self.task.cancel()
        # Let the cancellation unwind the stream (its `async with` blocks) before its loop stops.
        concurrent.futures.wait([self.task], timeout=DEADLINE)
        self.loop.stop()


def coap_uri(gw: GatewayThread, topic: str, password: str) -> str:
    path = "/".join(quote(level, safe="+") for level in topic.split("/"))
    return f"coap://127.0.0.1:{gw.port('coap')}/{path}?" + urlencode({"username": ROOT_USER, "password": password})


class CoapSubscriber:
    def __init__(self, gw: GatewayThread, password: str, topic: str) -> None:
        import aiocoap

        self.payloads: queue.Queue[bytes] = queue.Queue()
        self.loop = LoopThread()

        async def start() -> Any:
            context = await aiocoap.Context.create_client_context(transports=["udp6"])
            request = context.request(
                aiocoap.Message(code=aiocoap.GET, uri=coap_uri(gw, topic, password), observe=0), handle_blockwise=False
            )
            request.observation.register_callback(lambda message: self.payloads.put(bytes(message.payload)))
            first = await request.response
            assert first.code == aiocoap.CONTENT, first
            return context

        self.context = self.loop.run(start())

    def next_payload(self, timeout: float = DEADLINE) -> bytes:
        return self.payloads.get(timeout=timeout)

    def close(self) -> None:
        self.loop.run(self.context.shutdown())
        self.loop.stop()


class Amqp091Subscriber:
    def __init__(self, gw: GatewayThread, password: str, topic: str) -> None:
        import pika

        self.payloads: queue.Queue[bytes] = queue.Queue()
        self._stop = threading.Event()
        ready = threading.Event()
        errors: list[BaseException] = []

        def consume() -> None:
            try:
                params = pika.ConnectionParameters(
                    "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, password)
                )
                connection = pika.BlockingConnection(params)
                channel = connection.channel()
                name = channel.queue_declare(queue="", exclusive=True).method.queue
                channel.queue_bind(queue=name, exchange="amq.topic", routing_key=topic.replace("/", "."))
                ready.set()
                for method, _props, body in channel.consume(name, auto_ack=True, inactivity_timeout=0.1):
                    if self._stop.is_set():
                        break
                    if method is not None:
                        self.payloads.put(bytes(body))
                channel.cancel()
                connection.close()
            except BaseException as exc:  # surfaced by the main thread
                errors.append(exc)
                ready.set()

        self.thread = threading.Thread(target=consume, daemon=True)
        self.thread.start()
        assert ready.wait(DEADLINE) and not errors, errors

    def next_payload(self, timeout: float = DEADLINE) -> bytes:
        return self.payloads.get(timeout=timeout)

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)


class AmqpSubscriber:
    def __init__(self, gw: GatewayThread, password: str, topic: str) -> None:
        from proton.utils import BlockingConnection

        self.connection = BlockingConnection(
            f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=password,
            allowed_mechs="PLAIN", allow_insecure_mechs=True, timeout=DEADLINE,
        )
        self.receiver = self.connection.create_receiver(topic, credit=10)

    def next_payload(self, timeout: float = DEADLINE) -> bytes:
        message = self.receiver.receive(timeout=timeout)
        self.receiver.accept()
        body = message.body
        return bytes(body) if not isinstance(body, str) else body.encode()

    def close(self) -> None:
        self.connection.close()


def subscribe(kind: str, gw: GatewayThread, password: str, topic: str) -> Subscriber:
    if kind == "mqtt":
        return MqttSubscriber(gw, password, topic, websocket=False)
    if kind == "websocket":
        return MqttSubscriber(gw, password, topic, websocket=True)
    if kind == "http":
        return SseSubscriber(gw, password, topic)
    if kind == "coap":
        return CoapSubscriber(gw, password, topic)
    if kind == "amqp091":
        return Amqp091Subscriber(gw, password, topic)
    return AmqpSubscriber(gw, password, topic)


# -- publishers -------------------------------------------------------------------------------------------


def publish(kind: str, gw: GatewayThread, password: str, topic: str, payload: bytes) -> None:
    if kind in ("mqtt", "websocket"):
        port = gw.port("websocket") if kind == "websocket" else gw.mqtt_port
        client = PahoClient(port, client_id=f"pub-{topic}", username=ROOT_USER, password=password)
        if kind == "websocket":
            client.client.transport = "websockets"
            client.client.ws_set_options(path="/mqtt")
        client.connect_ok()
        try:
            client.publish(topic, payload, qos=1)
        finally:
            client.disconnect()
    elif kind == "http":
        request = urllib.request.Request(
            f"http://127.0.0.1:{gw.http_port}/{topic}?qos=1", data=payload, method="POST",
            headers={"Authorization": "Basic " + base64.b64encode(f"{ROOT_USER}:{password}".encode()).decode()},
        )
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            assert response.status == 202
    elif kind == "coap":
        import aiocoap

        async def post() -> None:
            context = await aiocoap.Context.create_client_context(transports=["udp6"])
            try:
                response = await context.request(
                    aiocoap.Message(code=aiocoap.POST, uri=coap_uri(gw, topic, password), payload=payload)
                ).response
                assert response.code == aiocoap.CHANGED, response
            finally:
                await context.shutdown()

        asyncio.run(post())
    elif kind == "amqp091":
        import pika

        params = pika.ConnectionParameters(
            "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, password)
        )
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            channel.basic_publish(exchange="amq.topic", routing_key=topic.replace("/", "."), body=payload)
        finally:
            connection.close()
    else:
        from proton import Message
        from proton.utils import BlockingConnection

        connection = BlockingConnection(
            f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=password,
            allowed_mechs="PLAIN", allow_insecure_mechs=True, timeout=DEADLINE,
        )
        try:
            connection.create_sender(topic).send(Message(body=payload))
        finally:
            connection.close()


@pytest.mark.parametrize(("publisher", "subscriber"), list(itertools.product(PROTOCOLS, PROTOCOLS)))
def test_message_crosses_protocols(matrix_gateway: tuple[GatewayThread, str], publisher: str, subscriber: str) -> None:
    built = built_kinds()
    missing = [p for p in (publisher, subscriber) if KIND[p] not in built]
    if missing:
        pytest.skip(f"frontend not built: {', '.join(missing)}")
    gw, password = matrix_gateway
    topic = f"matrix/{publisher}/{subscriber}"
    payload = b"\x00\xff" + f"{publisher}->{subscriber}".encode() + bytes(range(16))
    sub = subscribe(subscriber, gw, password, topic)
    try:
        publish(publisher, gw, password, topic, payload)
        assert sub.next_payload() == payload
    finally:
        sub.close()
