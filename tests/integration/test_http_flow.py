"""What an HTTP publisher sees of full queues and durable subscribers, through a real gateway.

Real clients over loopback (aiohttp, pika, paho) against a gateway on each
event loop: a full AMQP 0.9.1 `reject_new` queue makes a POST 503 with
Retry-After; a slow SSE reader (drop_oldest) never holds a publisher back;
a 202 for a message a persistent MQTT session keeps survives a restart.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pika

from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

AMQP091 = {"amqp091": {"plain": {"addr": "127.0.0.1:0"}}}
DEADLINE = 10.0


def auth(password: str) -> aiohttp.BasicAuth:
    return aiohttp.BasicAuth(ROOT_USER, password)


async def metric(http: aiohttp.ClientSession, gw: GatewayThread, name: str) -> float:
    """The sum of a /metrics sample (the health listener), 0 when absent."""
    async with http.get(f"http://127.0.0.1:{gw.health_port}/metrics") as response:
        text = await response.text()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# -- a full reject_new queue: 503 ---------------------------------------------------------------------


def test_a_full_amqp_queue_refuses_the_post_with_503(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str
) -> None:
    gw = start_gateway(loopback_config(tmp_path, server=AMQP091))
    conn = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, root_password),
        connection_attempts=1, socket_timeout=5,
    ))
    try:
        channel = conn.channel()
        # x-max-length without x-overflow: reject_new, the AMQP 0.9.1 default.
        channel.queue_declare("http-refused", arguments={"x-max-length": 5})
        channel.queue_bind("http-refused", "amq.topic", routing_key="flow.refused")

        async def post_six() -> tuple[list[tuple[int, str | None, Any]], float]:
            answers = []
            async with aiohttp.ClientSession(auth=auth(root_password)) as http:
                for n in range(6):
                    async with http.post(f"http://127.0.0.1:{gw.http_port}/flow/refused", data=str(n).encode()) as r:
                        answers.append((r.status, r.headers.get("Retry-After"), await r.json()))
                refused = await metric(http, gw, 'polygate_messages_refused_total{protocol="http"}')
            return answers, refused

        answers, refused = asyncio.run(post_six())
        assert [status for status, _, _ in answers] == [202] * 5 + [503]
        _, retry_after, body = answers[5]
        assert retry_after == "1"
        assert "subscriber queue is full" in body["error"]
        assert refused == 1
        # The five that were accepted are all there, in order, and nothing else.
        got = []
        for _ in range(6):
            _, _, payload = channel.basic_get("http-refused", auto_ack=True)
            if payload is None:
                break
            got.append(payload)
        assert got == [str(n).encode() for n in range(5)]
    finally:
        conn.close()


# -- a slow SSE reader: drop_oldest, the publisher is never held ----------------------------------------


async def _events(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The data of each event of an SSE response, as it arrives."""
    while True:
        raw = await response.content.readuntil(b"\n\n", max_size=1 << 20)
        if not raw:
            return
        for line in raw.decode().splitlines():
            if line.startswith("data:"):
                yield json.loads(line[5:])


def test_a_slow_sse_reader_never_holds_the_publisher(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str
) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={"max_queued_messages": 4}))
    base = f"http://127.0.0.1:{gw.http_port}"
    payload = b"x" * 65536
    overflows = 'polygate_queue_overflows_total{policy="drop_oldest",protocol="http"}'

    async def scenario() -> tuple[list[float], float, float, int, int]:
        async with aiohttp.ClientSession(auth=auth(root_password)) as http:
            async with http.get(f"{base}/subscribe", params={"topic": "slow/#"}) as stream:
                assert stream.status == 200
                # The reader reads nothing now: the socket buffers fill, then the stream's queue of 4.
                latencies: list[float] = []
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 30
                while not await metric(http, gw, overflows):
                    assert loop.time() < deadline, "the stream's queue never overflowed"
                    for _ in range(20):
                        began = loop.time()
                        async with http.post(f"{base}/slow/x", data=payload) as response:
                            assert response.status == 202
                        latencies.append(loop.time() - began)
                # One more past the overflow, marked: drop_oldest keeps the newest.
                async with http.post(f"{base}/slow/last", data=b"last") as response:
                    assert response.status == 202
                counted = await metric(http, gw, overflows)
                dropped = await metric(http, gw, 'polygate_messages_dropped_total{protocol="http",reason="queue_full"}')
                received = 0
                async with asyncio.timeout(DEADLINE):
                    async for event in _events(stream):
                        received += 1
                        if event["topic"] == "slow/last":
                            break
        return latencies, counted, dropped, received, len(latencies) + 1

    latencies, counted, dropped, received, posted = asyncio.run(scenario())
    assert counted >= 1 and dropped == counted
    # Every publish was answered at once: no queue held the publisher while the reader was stuck.
    assert max(latencies) < 1.0, max(latencies)
    assert received == posted - dropped


# -- a durable subscriber: 202 means it survives a restart --------------------------------------------


def test_a_202_for_a_persistent_session_survives_a_restart(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str
) -> None:
    config = loopback_config(tmp_path)
    gw = start_gateway(config)
    session = PahoClient(gw.mqtt_port, client_id="p", username=ROOT_USER, password=root_password,
                         clean_session=False).connect_ok()
    try:
        assert session.subscribe(("durable/#", 1)) == [1]
    finally:
        session.disconnect()

    async def post() -> int:
        async with aiohttp.ClientSession(auth=auth(root_password)) as http:
            url = f"http://127.0.0.1:{gw.http_port}/durable/x?qos=1"
            async with http.post(url, data=b"kept across a restart") as response:
                return response.status

    assert asyncio.run(post()) == 202
    gw.stop()
    again = start_gateway(config)  # the same storage.path
    session = PahoClient(again.mqtt_port, client_id="p", username=ROOT_USER, password=root_password,
                         clean_session=False)
    try:
        assert session.connect() == (0, True)
        message = session.next_message(DEADLINE)
        assert (message.topic, message.payload, message.qos) == ("durable/x", b"kept across a restart", 1)
    finally:
        session.disconnect()
