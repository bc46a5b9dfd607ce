"""Acknowledged means delivered: across protocols, slow consumers, SIGTERM and kill -9.

Every test counts messages: whatever a publisher was acknowledged (PUBACK, a
publisher confirm) must reach its subscriber, in order where the protocol
promises order. Restart tests run the gateway as a real process
(`tests.gateway_process`) so that SIGTERM and kill -9 are what an operator
or a crash does; every test runs on both event loops.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_process import GatewayProcess
from tests.gateway_thread import GatewayThread
from tests.paho_client import AckCounter, PahoClient

AMQP091 = {"amqp091": {"plain": {"addr": "127.0.0.1:0"}}}


@pytest.fixture
def processes() -> Iterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    yield made
    for process in made:
        process.kill()


def process_config(tmp_path: Path, *, fsync: str = "batch", server: dict[str, Any] | None = None,
                   **sections: Any) -> dict[str, Any]:
    config = loopback_config(tmp_path, server={**AMQP091, **(server or {})}, **sections)
    config["storage"] = {"path": str(tmp_path / "data"), "fsync": fsync}
    return config


def paho(port: int, password: str, client_id: str, *, clean: bool = True) -> PahoClient:
    return PahoClient(port, client_id=client_id, username=ROOT_USER, password=password, clean_session=clean)


def metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total




# -- slow and stuck consumers --------------------------------------------------------------------------


def test_stuck_mqtt_subscriber_does_not_slow_a_healthy_one(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    """drop_oldest (the MQTT default): the stuck subscriber loses its oldest, counted; nobody else waits."""
    gw = start_gateway(limits={"max_queued_messages": 200, "max_inflight_messages": 10})
    stuck = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="stuck", protocol=mqtt.MQTTv311)
    stuck.username_pw_set(ROOT_USER, root_password)
    stuck.connect("127.0.0.1", gw.mqtt_port)
    stuck.subscribe("flow/#", qos=1)
    # Read the SUBACK, then never read or acknowledge again.
    stuck.loop(timeout=1.0)
    healthy = paho(gw.mqtt_port, root_password, "healthy").connect_ok()
    assert healthy.subscribe(("flow/#", 1)) == [1]
    publisher = paho(gw.mqtt_port, root_password, "pub").connect_ok()
    total, batch = 3000, 100
    try:
        got: list[int] = []
        for start_at in range(0, total, batch):
            for number in range(start_at, start_at + batch):
                publisher.client.publish("flow/x", str(number).encode(), qos=1)
            # The healthy subscriber keeps pace with the publisher, batch after batch, while the
            # stuck one's queue overflows; a held publisher would stall a batch here.
            got += [int(m.payload) for m in healthy.expect(batch, timeout=5)]
        assert got == list(range(total))
        overflows = metric(gw.health_port, 'polygate_queue_overflows_total{policy="drop_oldest",protocol="mqtt"}')
        assert overflows > 0
        assert gw.call(lambda: not any(c.publisher.held for c in gw.gateway.state.connections()  # type: ignore[union-attr]
                                       if hasattr(c, "publisher")))
    finally:
        publisher.disconnect()
        healthy.disconnect()
        stuck.socket().close()


def test_mqtt_qos1_flood_into_a_late_amqp_consumer_loses_nothing_acknowledged(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start_gateway(server=AMQP091)
    amqp = pika.BlockingConnection(pika.ConnectionParameters(
        "127.0.0.1", gw.port("amqp091"), credentials=pika.PlainCredentials(ROOT_USER, root_password)))
    try:
        channel = amqp.channel()
        channel.queue_declare("late")
        channel.queue_bind("late", "amq.topic", routing_key="flood.#")
        publisher = AckCounter(gw.mqtt_port, root_password, "flooder")
        total = 6000
        for number in range(total):
            publisher.publish("flood/x", number)
        assert len(publisher.wait_acked(total)) == total
        publisher.stop()
        # The consumer starts only now: everything acknowledged is waiting for it.
        got: list[int] = []
        for method, _, body in channel.consume("late", inactivity_timeout=5):
            if method is None:
                break
            got.append(int(body))
            channel.basic_ack(method.delivery_tag)
            if len(got) == total:
                break
        assert got == list(range(total))
    finally:
        amqp.close()


def test_graceful_stop_delivers_what_a_slow_subscriber_was_owed(
    tmp_path: Path, root_password: str, loop_name: str, processes: list[GatewayProcess]
) -> None:
    """SIGTERM with a clean-session subscriber that reads slowly: every PUBACKed message reaches it first."""
    gateway = GatewayProcess(tmp_path, process_config(tmp_path, server={"shutdown_timeout": "20s"}), loop=loop_name)
    processes.append(gateway)
    gateway.start()
    port = gateway.port("tcp")
    received: list[int] = []

    def slow(client: Any, userdata: Any, message: Any) -> None:
        time.sleep(0.001)
        received.append(int(message.payload))

    subscriber = paho(port, root_password, "slow").connect_ok()
    subscriber.client.on_message = slow
    assert subscriber.subscribe(("owed/#", 1)) == [1]
    publisher = AckCounter(port, root_password, "pub")
    total = 1500
    for number in range(total):
        publisher.publish("owed/x", number)
    assert len(publisher.wait_acked(total)) == total
    publisher.stop()
    assert len(received) < total, "the subscriber was not slow enough to test anything"
    assert gateway.terminate() == 0
    subscriber.client.loop_stop()
    assert sorted(received) == list(range(total))


# -- restarts ------------------------------------------------------------------------------------------------


def test_sigterm_then_start_keeps_sessions_queued_messages_and_retained(
    tmp_path: Path, root_password: str, loop_name: str, processes: list[GatewayProcess]
) -> None:
    gateway = GatewayProcess(tmp_path, process_config(tmp_path), loop=loop_name)
    processes.append(gateway)
    gateway.start()
    subscriber = paho(gateway.port("tcp"), root_password, "keeper", clean=False).connect_ok()
    assert subscriber.subscribe(("kept/#", 1)) == [1]
    subscriber.disconnect()
    publisher = paho(gateway.port("tcp"), root_password, "pub").connect_ok()
    total = 200
    for number in range(total):
        publisher.publish("kept/x", str(number).encode(), qos=1)
    publisher.publish("kept/state", b"on", qos=1, retain=True)
    publisher.disconnect()
    assert gateway.terminate() == 0

    gateway.start()
    subscriber = paho(gateway.port("tcp"), root_password, "keeper", clean=False)
    code, session_present = subscriber.connect()
    assert (code, session_present) == (0, True)
    got = subscriber.expect(total + 1)
    assert [int(m.payload) for m in got[:total]] == list(range(total))
    assert (got[total].topic, got[total].payload) == ("kept/state", b"on")
    subscriber.disconnect()
    late = paho(gateway.port("tcp"), root_password, "late").connect_ok()
    late.subscribe(("kept/state", 1))
    retained = late.next_message()
    assert (retained.payload, retained.retain) == (b"on", True)
    late.disconnect()
    assert gateway.terminate() == 0


def test_kill_9_with_fsync_always_loses_nothing_acknowledged(
    tmp_path: Path, root_password: str, loop_name: str, processes: list[GatewayProcess]
) -> None:
    """MQTT QoS 1 into a persistent session and AMQP 0.9.1 confirms into a durable queue, then kill -9."""
    gateway = GatewayProcess(tmp_path, process_config(tmp_path, fsync="always"), loop=loop_name)
    processes.append(gateway)
    gateway.start()
    subscriber = paho(gateway.port("tcp"), root_password, "keeper", clean=False).connect_ok()
    assert subscriber.subscribe(("crash/#", 1)) == [1]
    subscriber.disconnect()
    credentials = pika.PlainCredentials(ROOT_USER, root_password)
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", gateway.port("amqp091"), credentials=credentials))
    channel = amqp.channel()
    channel.queue_declare("durable-q", durable=True)
    channel.confirm_delivery()
    confirmed: list[int] = []
    for number in range(300):
        channel.basic_publish("", "durable-q", str(number).encode(),
                              pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
        confirmed.append(number)

    publisher = AckCounter(gateway.port("tcp"), root_password, "pub")
    total = 5000
    for number in range(total):
        publisher.publish("crash/x", number)
    assert len(publisher.wait_acked(500)) >= 500
    gateway.kill()  # mid-stream: some publishes were acknowledged, some not yet
    publisher.client.loop_stop()
    acked = set(publisher.acked)
    assert len(acked) < total, "everything was acknowledged before the kill: nothing was tested mid-stream"
    try:
        amqp.close()
    except pika.exceptions.AMQPError:
        pass

    gateway.start()
    subscriber = paho(gateway.port("tcp"), root_password, "keeper", clean=False)
    assert subscriber.connect() == (0, True)
    delivered: set[int] = set()
    deadline = time.monotonic() + 30
    while not acked <= delivered and time.monotonic() < deadline:
        try:
            delivered.add(int(subscriber.next_message(timeout=2).payload))
        except AssertionError:
            break
    subscriber.disconnect()
    assert acked <= delivered, f"{len(acked - delivered)} acknowledged messages lost"
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", gateway.port("amqp091"), credentials=credentials))
    channel = amqp.channel()
    got: list[int] = []
    for method, _, body in channel.consume("durable-q", inactivity_timeout=5):
        if method is None:
            break
        got.append(int(body))
        channel.basic_ack(method.delivery_tag)
        if len(got) == len(confirmed):
            break
    amqp.close()
    assert got == confirmed
    assert gateway.terminate() == 0


def test_20000_confirmed_publishes_into_an_unconsumed_queue_are_all_delivered(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    """RabbitMQ keeps them all; so must we (the default bound is 100,000 per queue)."""
    gw = start_gateway(server=AMQP091)
    credentials = pika.PlainCredentials(ROOT_USER, root_password)
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", gw.port("amqp091"), credentials=credentials))
    try:
        channel = amqp.channel()
        channel.queue_declare("backlog", durable=True)
        channel.confirm_delivery()
        total = 20_000
        for number in range(total):
            channel.basic_publish("", "backlog", str(number).encode(),
                                  pika.BasicProperties(delivery_mode=pika.DeliveryMode.Persistent))
        channel.basic_qos(prefetch_count=500)
        got: list[int] = []
        for method, _, body in channel.consume("backlog", inactivity_timeout=5):
            if method is None:
                break
            got.append(int(body))
            if len(got) % 250 == 0 or len(got) == total:
                channel.basic_ack(method.delivery_tag, multiple=True)
            if len(got) == total:
                break
        assert got == list(range(total))
        dropped = gw.call(lambda: sum(gw.gateway.metrics.messages_dropped.values()))  # type: ignore[union-attr]
        assert dropped == 0
    finally:
        amqp.close()


# -- overflow policies and the memory watermark ------------------------------------------------------


def test_amqp_queue_arguments_choose_bound_and_policy(start_gateway: Callable[..., GatewayThread], root_password: str) -> None:
    """x-max-length with x-overflow drop-head keeps the newest; bad arguments are 406; both counted."""
    gw = start_gateway(server=AMQP091)
    credentials = pika.PlainCredentials(ROOT_USER, root_password)
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", gw.port("amqp091"), credentials=credentials))
    try:
        channel = amqp.channel()
        channel.queue_declare("newest", arguments={"x-max-length": 3, "x-overflow": "drop-head"})
        channel.confirm_delivery()
        for number in range(10):
            channel.basic_publish("", "newest", str(number).encode())  # all confirmed: drop-head never refuses
        got = [int(channel.basic_get("newest", auto_ack=True)[2]) for _ in range(3)]
        assert got == [7, 8, 9]
        assert metric(gw.health_port, 'polygate_queue_overflows_total{policy="drop_oldest",protocol="amqp091"}') == 7
        assert metric(gw.health_port, 'polygate_messages_dropped_total{protocol="amqp091",reason="queue_full"}') == 7
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as refused:
            channel.queue_declare("bad", arguments={"x-overflow": "sideways"})
        assert refused.value.reply_code == 406
    finally:
        amqp.close()


def test_memory_watermark_blocks_every_publisher_until_consumers_catch_up(
    start_gateway: Callable[..., GatewayThread], root_password: str
) -> None:
    """Above limits.memory_high_watermark: AMQP 0.9.1 gets connection.blocked, an MQTT publisher gets no PUBACK."""
    gw = start_gateway(server=AMQP091, limits={"memory_high_watermark": "1MB"})
    credentials = pika.PlainCredentials(ROOT_USER, root_password)
    amqp = pika.BlockingConnection(pika.ConnectionParameters("127.0.0.1", gw.port("amqp091"), credentials=credentials))
    events: list[str] = []
    amqp.add_on_connection_blocked_callback(lambda connection, method: events.append("blocked"))
    amqp.add_on_connection_unblocked_callback(lambda connection, method: events.append("unblocked"))
    mqtt_publisher = paho(gw.mqtt_port, root_password, "mqtt-pub").connect_ok()
    try:
        channel = amqp.channel()
        channel.queue_declare("hoard")
        channel.queue_bind("hoard", "amq.topic", routing_key="hoard.#")
        for _ in range(15):
            channel.basic_publish("", "hoard", b"x" * 100_000)
        deadline = time.monotonic() + 10
        while "blocked" not in events and time.monotonic() < deadline:
            amqp.process_data_events(time_limit=0.05)
        assert events == ["blocked"]
        assert metric(gw.health_port, "polygate_memory_alarm") == 1
        # Every publisher is held, whatever its protocol: this QoS 1 publish is not acknowledged yet.
        mqtt_publisher.client.publish("hoard/mqtt", b"m", qos=1)  # it trips the hold; the next one waits
        held = mqtt_publisher.client.publish("hoard/mqtt", b"m2", qos=1)
        held.wait_for_publish(0.5)  # a bounded look: nothing may acknowledge it while memory is short
        assert not held.is_published()
        for _ in range(15):
            assert channel.basic_get("hoard", auto_ack=True)[0] is not None
        held.wait_for_publish(10)
        assert held.is_published()
        while "unblocked" not in events and time.monotonic() < deadline:
            amqp.process_data_events(time_limit=0.05)
        assert events == ["blocked", "unblocked"]
        assert metric(gw.health_port, "polygate_memory_alarm") == 0
    finally:
        mqtt_publisher.disconnect()
        amqp.close()


def test_session_expiry_frees_an_offline_session_also_across_a_restart(
    tmp_path: Path, root_password: str, loop_name: str, processes: list[GatewayProcess]
) -> None:
    gateway = GatewayProcess(tmp_path, process_config(tmp_path, mqtt={"session_expiry": "1s"}), loop=loop_name)
    processes.append(gateway)
    gateway.start()
    subscriber = paho(gateway.port("tcp"), root_password, "brief", clean=False).connect_ok()
    subscriber.subscribe(("brief/#", 1))
    subscriber.disconnect()
    assert gateway.terminate() == 0
    time.sleep(1.2)  # the expiry is wall-clock time, and it must pass while the gateway is down
    gateway.start()
    log = gateway.log_text()
    # Freed while the store was restored, before any listener opened.
    assert '"event": "session_expired"' in log
    assert log.index('"event": "session_expired"') < log.index('"event": "ready"')
    again = paho(gateway.port("tcp"), root_password, "brief", clean=False)
    assert again.connect() == (0, False)
    again.disconnect()
    assert gateway.terminate() == 0
