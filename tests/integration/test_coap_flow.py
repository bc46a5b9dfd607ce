"""What a CoAP publisher sees of full queues and durable subscribers, through a real gateway.

Real clients over loopback (aiocoap, raw CoAP datagrams, pika, paho), each
test on asyncio and on uvloop (tests/integration/conftest.py): a full AMQP
0.9.1 `reject_new` queue makes a POST 5.03 with Max-Age; an observer that
acknowledges slowly (drop_oldest) never holds a publisher back, and under
`block` holds the 2.04 until it caught up; a graceful stop first sends what
an observer was owed; a 2.04 for a message a persistent MQTT session keeps is
committed and survives a restart.
"""

from __future__ import annotations

import asyncio
import sqlite3
import urllib.request
from pathlib import Path

import aiocoap
import pika
from aiocoap import POST, Message
from aiocoap.numbers import codes
from aiocoap.numbers.types import ACK, CON
from prometheus_client.parser import text_string_to_metric_families

from gateway.events import Protocol
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_thread import GatewayThread
from tests.integration.test_coap import (  # noqa: F401  (client and root are fixtures)
    COAP,
    DEADLINE,
    RawPeer,
    StartGateway,
    client,
    coap_uri,
    raw_get,
    request,
    root,
    wait_for,
)
from tests.paho_client import PahoClient

AMQP091 = {"amqp091": {"plain": {"addr": "127.0.0.1:0"}}}


def metric(gw: GatewayThread, name: str, **labels: str) -> float:
    """One sample of the health listener's /metrics, 0 when absent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/metrics", timeout=DEADLINE).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


async def metric_of(gw: GatewayThread, name: str, **labels: str) -> float:
    return await asyncio.to_thread(metric, gw, name, **labels)


# -- a full reject_new queue: 5.03 ------------------------------------------------------------------


async def test_a_full_amqp_queue_refuses_the_post_with_5_03(
    start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server={**COAP, **AMQP091})
    port = gw.port("coap")
    amqp = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, root_password),
        connection_attempts=1, socket_timeout=DEADLINE,
    ))
    try:
        channel = amqp.channel()
        # x-max-length without x-overflow: reject_new, the AMQP 0.9.1 default.
        channel.queue_declare("coap-refused", arguments={"x-max-length": 3})
        channel.queue_bind("coap-refused", "amq.topic", routing_key="flow.refused")
        answers = [
            await request(client, POST, coap_uri(port, "flow/refused", **root), b"%d" % number) for number in range(4)
        ]
        assert [answer.code for answer in answers] == [codes.CHANGED] * 3 + [codes.SERVICE_UNAVAILABLE]
        refused = answers[3]
        assert refused.opt.max_age == 1
        assert b"subscriber queue is full" in refused.payload, refused.payload
        assert await metric_of(gw, "polygate_messages_refused_total", protocol="coap") == 1
        # The three that were accepted are all there, in order, and nothing else.
        got = []
        for _ in range(4):
            _, _, body = channel.basic_get("coap-refused", auto_ack=True)
            if body is None:
                break
            got.append(body)
        assert got == [b"0", b"1", b"2"]
    finally:
        amqp.close()


# -- an observer that acknowledges slowly: drop_oldest, the publisher is never held ------------------


async def test_a_slow_observer_never_holds_the_publisher(
    tmp_path: Path, start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(loopback_config(tmp_path, server=COAP, limits={"max_queued_messages": 5}))
    port = gw.port("coap")
    peer = RawPeer(port)
    try:
        peer.send(raw_get(("slow", "#"), root, token=b"\x5a", observe=0))
        first = await asyncio.to_thread(peer.response)
        assert (first.code, first.opt.observe) == (codes.CONTENT, 0)
        # The observer reads nothing for now: the first CON notification waits for its ACK,
        # five more wait in the observation's queue, and each one after pushes out the oldest.
        loop = asyncio.get_running_loop()
        latencies = []
        for number in range(20):
            began = loop.time()
            response = await request(client, POST, coap_uri(port, "slow/x", **root, qos=1), b"%d" % number)
            latencies.append(loop.time() - began)
            assert response.code == codes.CHANGED, response.payload
        assert max(latencies) < 1.0, max(latencies)
        overflows = await metric_of(gw, "polygate_queue_overflows_total", protocol="coap", policy="drop_oldest")
        dropped = await metric_of(gw, "polygate_messages_dropped_total", protocol="coap", reason="queue_full")
        assert (overflows, dropped) == (14, 14)
        # The observer catches up: the one in flight, then the newest five.
        payloads: list[bytes] = []
        seen: set[int] = set()
        while len(payloads) < 6:
            note = await asyncio.to_thread(peer.receive)
            if note.mtype is CON:
                ack = Message(code=codes.EMPTY)
                ack.mtype, ack.mid = ACK, note.mid
                peer.sock.sendto(ack.encode(), peer.address)
            if note.mid not in seen:  # a retransmission of a notification is not another one
                seen.add(note.mid)
                assert (note.code, note.token) == (codes.CONTENT, b"\x5a")
                payloads.append(note.payload)
        assert payloads == [b"0", b"15", b"16", b"17", b"18", b"19"]
    finally:
        peer.close()


class SlowObserver:
    """A raw observer that reads notifications and acknowledges each one only when told to."""

    def __init__(self, peer: RawPeer) -> None:
        self.peer = peer
        self.seen: set[int] = set()

    def next(self) -> Message:
        """The next new notification, not acknowledged yet (retransmissions are skipped)."""
        while True:
            note = self.peer.receive()
            if note.mid not in self.seen:
                self.seen.add(note.mid)
                return note

    def ack(self, note: Message) -> None:
        ack = Message(code=codes.EMPTY)
        ack.mtype, ack.mid = ACK, note.mid
        self.peer.sock.sendto(ack.encode(), self.peer.address)


async def test_a_full_block_observer_holds_the_2_04_until_it_caught_up(
    tmp_path: Path, start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(loopback_config(
        tmp_path, server=COAP, limits={"max_queued_messages": 2, "queue_overflow": {"coap": "block"}},
    ))
    port = gw.port("coap")
    peer = RawPeer(port)
    observer = SlowObserver(peer)
    try:
        peer.send(raw_get(("block", "#"), root, token=b"\x5b", observe=0))
        assert (await asyncio.to_thread(peer.response)).opt.observe == 0
        # 0 goes out and waits for its ACK, 1 and 2 fill the queue: all three are taken at once.
        for number in range(3):
            response = await request(client, POST, coap_uri(port, "block/x", **root, qos=1), b"%d" % number)
            assert response.code == codes.CHANGED
        held = asyncio.ensure_future(request(client, POST, coap_uri(port, "block/x", **root, qos=1), b"3"))
        try:
            notes = [await asyncio.to_thread(observer.next)]
            assert gw.gateway is not None
            overflows = gw.gateway.metrics.overflows
            await wait_for(lambda: gw.call(lambda: overflows[(Protocol.COAP, "block")]) == 1,
                           "the full queue to take 3 and hold its publisher")
            # A bounded look: nothing may answer the held POST while the queue is full.
            done, _ = await asyncio.wait({held}, timeout=0.3)
            assert not done
            # The observer catches up: once its queue is down to half, the POST is answered.
            while len(notes) < 4:
                observer.ack(notes[-1])
                notes.append(await asyncio.to_thread(observer.next))
            observer.ack(notes[-1])
            assert (await held).code == codes.CHANGED
        finally:
            held.cancel()
        assert [note.payload for note in notes] == [b"0", b"1", b"2", b"3"]  # block loses nothing
    finally:
        peer.close()


# -- a durable subscriber: 2.04 means committed ---------------------------------------------------------


def stored_payloads(data: Path, topic: str) -> list[bytes]:
    """Queued messages on `topic` that the store has committed, read by a connection of our own."""
    connection = sqlite3.connect(f"file:{data / 'polygate.db'}?mode=ro", uri=True)
    try:
        return [bytes(row[0]) for row in connection.execute("SELECT payload FROM messages WHERE topic = ?", (topic,))]
    finally:
        connection.close()


async def test_a_2_04_for_a_persistent_session_is_committed_and_survives_a_restart(
    tmp_path: Path, start_gateway: StartGateway, root_password: str, root: dict[str, str], client: aiocoap.Context
) -> None:
    data = tmp_path / "coap-durable"
    config = loopback_config(tmp_path, server=COAP, storage={"path": str(data)})
    gw = start_gateway(config)
    session = PahoClient(gw.mqtt_port, client_id="keeper", username=ROOT_USER, password=root_password,
                         clean_session=False).connect_ok()
    try:
        assert session.subscribe(("durable/#", 1)) == [1]
    finally:
        session.disconnect()
    assert gw.gateway is not None
    state = gw.gateway.state
    await wait_for(lambda: gw.call(state.count) == 0, "the session to go offline")

    response = await request(client, POST, coap_uri(gw.port("coap"), "durable/x", **root, qos=1), b"kept")
    assert response.code == codes.CHANGED, response.payload
    # Answered only once the store committed the message for the offline session.
    assert await asyncio.to_thread(stored_payloads, data, "durable/x") == [b"kept"]

    await asyncio.to_thread(gw.stop)
    again = start_gateway(config)  # the same storage.path
    session = PahoClient(again.mqtt_port, client_id="keeper", username=ROOT_USER, password=root_password,
                         clean_session=False)
    try:
        assert await asyncio.to_thread(session.connect) == (0, True)
        message = await asyncio.to_thread(session.next_message, DEADLINE)
        assert (message.topic, message.payload, message.qos) == ("durable/x", b"kept", 1)
    finally:
        session.disconnect()


async def test_a_graceful_stop_sends_what_an_observer_was_owed_first(
    start_gateway: StartGateway, root: dict[str, str], client: aiocoap.Context
) -> None:
    gw = start_gateway(server=COAP)
    port = gw.port("coap")
    peer = RawPeer(port)
    observer = SlowObserver(peer)
    try:
        peer.send(raw_get(("owed", "#"), root, token=b"\x5c", observe=0))
        assert (await asyncio.to_thread(peer.response)).opt.observe == 0
        for number in range(4):
            response = await request(client, POST, coap_uri(port, "owed/x", **root, qos=1), b"%d" % number)
            assert response.code == codes.CHANGED
        # 0 waits for its ACK and 1-3 are queued when the gateway begins to stop.
        stopping = asyncio.ensure_future(asyncio.to_thread(gw.stop))
        notes = []
        while True:
            note = await asyncio.to_thread(observer.next)
            if note.code != codes.CONTENT:
                break
            notes.append(note.payload)
            observer.ack(note)
        assert notes == [b"0", b"1", b"2", b"3"]
        assert (note.code, note.payload) == (codes.SERVICE_UNAVAILABLE, b"observation ended: gateway shutting down")
        await stopping
    finally:
        peer.close()
