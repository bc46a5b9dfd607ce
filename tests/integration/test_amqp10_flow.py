"""AMQP 1.0 receivers and senders under the flow contract: full link queues, held publishers, shutdown.

Real clients over loopback: python-qpid-proton's blocking client (each
connection pumped by the test thread, so a client that is not pumped is a
client that reads nothing) and paho for MQTT. Every test counts messages and
runs on both event loops.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import pytest
from proton import ConnectionException, Delivery, Message
from proton.utils import BlockingConnection, BlockingReceiver, BlockingSender

from gateway.events import Protocol
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import AckCounter

AMQP = {"amqp": {"plain": {"addr": "127.0.0.1:0"}}}
DEADLINE = 10.0
#: limits.max_queued_messages in these tests: small, so a queue fills at once.
LIMIT = 20
#: How long one client waits for I/O before the next one gets a turn.
POLL = 0.005


@pytest.fixture
def start(gateway_loop_factory: Callable[[], Any], tmp_path: Path, root_password: str) -> Iterator[Callable[..., GatewayThread]]:
    """Start in-process gateways (AMQP 1.0, MQTT, health on loopback) on the module's event loop."""
    started: list[GatewayThread] = []

    def run(**sections: Any) -> GatewayThread:
        server = {**AMQP, **sections.pop("server", {})}
        config = loopback_config(tmp_path / f"gw{len(started)}", server=server, **sections)
        gw = GatewayThread.from_dict(config, loop_factory=gateway_loop_factory).start()
        started.append(gw)
        return gw

    yield run
    for gw in started:
        gw.stop()


@contextmanager
def amqp(gw: GatewayThread, password: str) -> Iterator[BlockingConnection]:
    connection = BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=password,
                                    allowed_mechs="PLAIN", timeout=DEADLINE)
    try:
        yield connection
    finally:
        try:
            connection.close()
        except ConnectionException:
            pass  # the gateway closed it first (shutdown)


def pump(connections: Sequence[BlockingConnection], until: Callable[[], bool], *,
         step: Callable[[], None] | None = None, timeout: float = DEADLINE) -> None:
    """Move bytes for every connection (and run `step`) until `until()`; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if step is not None:
            step()
        if until():
            return
        assert time.monotonic() < deadline, "condition not met within the deadline"
        for connection in connections:
            container = connection.container
            saved, container.timeout = container.timeout, POLL
            try:
                # The client returns after each message it receives: keep going while it is busy.
                for _ in range(100):
                    started = time.monotonic()
                    container.process()
                    if time.monotonic() - started >= POLL / 2:
                        break
            finally:
                container.timeout = saved


def pump_for(connections: Sequence[BlockingConnection], seconds: float) -> None:
    """Keep the clients reading and writing for a while (to see that something does *not* happen)."""
    end = time.monotonic() + seconds
    pump(connections, lambda: time.monotonic() >= end, timeout=seconds + DEADLINE)


def send(sender: BlockingSender, body: bytes) -> Delivery:
    """Hand the client one unsettled message without waiting: it goes out as the gateway's credit allows."""
    return cast(Delivery, sender.link.send(Message(body=body, inferred=True)))


def take_ready(receiver: BlockingReceiver, into: list[int]) -> None:
    """Accept every message the client has received so far; record its number."""
    fetcher = receiver.fetcher
    assert fetcher is not None
    while fetcher.has_message:
        message = fetcher.pop()
        receiver.accept()
        into.append(int(bytes(cast(bytes, message.body))))


def metric(gw: GatewayThread, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/metrics", timeout=5).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def amqp_dropped(gw: GatewayThread) -> dict[str, int]:
    assert gw.gateway is not None
    metrics = gw.gateway.ctx.metrics
    return gw.call(lambda: {reason: n for (protocol, reason), n in metrics.messages_dropped.items()
                            if protocol is Protocol.AMQP and n})


def held_publishers(gw: GatewayThread) -> int:
    assert gw.gateway is not None
    state = gw.gateway.state

    def count() -> int:
        publishers = [getattr(c, "publisher", None) for c in state.connections()]
        return sum(1 for publisher in publishers if publisher is not None and publisher.held)

    return gw.call(count)


# -- reject_new (the AMQP 1.0 default): the sender is told ----------------------------------------------


def test_a_full_link_queue_rejects_with_resource_limit_exceeded(
    start: Callable[..., GatewayThread], root_password: str
) -> None:
    total = 50
    gw = start(limits={"max_queued_messages": LIMIT})
    with amqp(gw, root_password) as consumer, amqp(gw, root_password) as producer:
        # The client grants no credit: everything for this link waits in its queue.
        receiver = consumer.create_receiver("full/#", credit=0)
        sender = producer.create_sender("full/x")
        deliveries = [send(sender, b"%d" % i) for i in range(total)]
        pump([producer], lambda: all(d.settled for d in deliveries))
        accepted = [i for i, d in enumerate(deliveries) if d.remote_state == Delivery.ACCEPTED]
        rejected = [i for i, d in enumerate(deliveries) if d.remote_state == Delivery.REJECTED]
        assert accepted == list(range(LIMIT))
        assert rejected == list(range(LIMIT, total))
        for i in rejected:
            condition = deliveries[i].remote.condition
            assert condition is not None and condition.name == "amqp:resource-limit-exceeded"
            assert "full/x" in str(condition.description) and "is full" in str(condition.description)
        for delivery in deliveries:
            delivery.settle()

        refused = total - LIMIT
        assert metric(gw, 'polygate_messages_refused_total{protocol="amqp"}') == refused
        assert metric(gw, 'polygate_queue_overflows_total{policy="reject_new",protocol="amqp"}') == refused

        # Every accepted message is delivered once the client asks for it, in order.
        got: list[int] = []
        receiver.link.flow(total)
        pump([consumer], lambda: len(got) >= LIMIT, step=lambda: take_ready(receiver, got))
        # With room again, the link takes new messages.
        late = send(sender, b"%d" % total)
        pump([producer, consumer], lambda: late.settled and len(got) > LIMIT, step=lambda: take_ready(receiver, got))
        assert late.remote_state == Delivery.ACCEPTED
        assert got == [*accepted, total]
    assert amqp_dropped(gw) == {"queue_full": refused}


@pytest.mark.parametrize("policy", ["reject_new", "block"])
def test_a_connection_is_never_held_by_its_own_receiver_link(
    start: Callable[..., GatewayThread], root_password: str, policy: str
) -> None:
    """Its own link's credit and settlements are what drain that queue: holding it could stall both.
    reject_new refuses (the sender is told); block takes the message past the bound."""
    total = 2 * LIMIT
    gw = start(limits={"max_queued_messages": LIMIT, "queue_overflow": {"amqp": policy}})
    with amqp(gw, root_password) as client:
        receiver = client.create_receiver("own/#", credit=0)
        sender = client.create_sender("own/x")
        deliveries = [send(sender, b"%d" % i) for i in range(total)]
        pump([client], lambda: all(d.settled for d in deliveries))
        assert held_publishers(gw) == 0
        accepted = [i for i, d in enumerate(deliveries) if d.remote_state == Delivery.ACCEPTED]
        assert accepted == list(range(LIMIT if policy == "reject_new" else total))
        got: list[int] = []
        receiver.link.flow(total)
        pump([client], lambda: len(got) == len(accepted), step=lambda: take_ready(receiver, got))
        assert got == accepted
        for delivery in deliveries:
            delivery.settle()


# -- block: the sender is held (no credit) until the receiver drains ------------------------------------


def test_block_holds_a_sender_without_credit_and_delivers_everything(
    start: Callable[..., GatewayThread], root_password: str
) -> None:
    total = 500
    gw = start(limits={"max_queued_messages": LIMIT, "queue_overflow": {"amqp": "block"}})
    with amqp(gw, root_password) as consumer, amqp(gw, root_password) as producer:
        receiver = consumer.create_receiver("blk/#", credit=0)
        sender = producer.create_sender("blk/x")
        # Unsettled messages, all handed to the client at once: it transfers them as credit allows.
        deliveries = [send(sender, b"%d" % i) for i in range(total)]
        link = sender.link

        def transferred() -> int:
            return total - link.queued

        def credit() -> int:
            # Proton counts the messages waiting for credit against it.
            return int(link.credit) + int(link.queued)

        pump([producer], lambda: held_publishers(gw) == 1 and credit() == 0)
        pump_for([producer], 0.2)
        before = transferred()
        pump_for([producer], 0.3)
        # Held: no credit, nothing more transferred, nothing more settled than the queue took.
        assert credit() == 0
        assert transferred() == before < total
        assert sum(1 for d in deliveries if d.settled) == LIMIT + 1  # the one that filled the queue holds it
        assert held_publishers(gw) == 1
        assert metric(gw, 'polygate_queue_overflows_total{policy="block",protocol="amqp"}') >= 1

        # The receiver starts: the sender gets credit back whenever the queue drains, and everything arrives.
        got: list[int] = []
        receiver.link.flow(total)
        pump([producer, consumer], lambda: len(got) == total and all(d.settled for d in deliveries),
             step=lambda: take_ready(receiver, got), timeout=30)
        assert got == list(range(total))
        assert all(d.remote_state == Delivery.ACCEPTED for d in deliveries)
        assert held_publishers(gw) == 0
        for delivery in deliveries:
            delivery.settle()
    assert amqp_dropped(gw) == {}


# -- MQTT QoS 1 into an AMQP 1.0 receiver that starts late -------------------------------------------------




def test_mqtt_qos1_into_a_late_amqp_receiver_delivers_everything_acknowledged(
    start: Callable[..., GatewayThread], root_password: str
) -> None:
    total = 500
    gw = start(limits={"max_queued_messages": LIMIT})
    with amqp(gw, root_password) as consumer:
        receiver = consumer.create_receiver("late/#", credit=0)
        publisher = AckCounter(gw.mqtt_port, root_password, "late-publisher")
        try:
            for number in range(total):
                publisher.publish("late/x", number)
            # The link queue is full and MQTT 3.1.1 cannot say "refused": the publisher is held,
            # so what it was acknowledged is what the queue holds.
            pump([consumer], lambda: held_publishers(gw) == 1 and len(publisher.acked) > 0)
            assert len(publisher.acked) < total
            acked_while_held = set(publisher.acked)
            # The receiver starts late: everything acknowledged (then everything) arrives, in order.
            got: list[int] = []
            receiver.link.flow(total)
            pump([consumer], lambda: len(got) == total and len(publisher.acked) == total,
                 step=lambda: take_ready(receiver, got), timeout=30)
        finally:
            publisher.stop()
    assert acked_while_held <= set(got)
    assert got == list(range(total))
    assert amqp_dropped(gw) == {}


# -- graceful shutdown ------------------------------------------------------------------------------------


def test_shutdown_waits_for_a_receiver_to_take_its_queue_and_accepts_no_more(
    start: Callable[..., GatewayThread], root_password: str
) -> None:
    gw = start(limits={"max_queued_messages": LIMIT}, server={"shutdown_timeout": "5s"})
    with amqp(gw, root_password) as consumer, amqp(gw, root_password) as producer:
        receiver = consumer.create_receiver("owed/#", credit=0)
        sender = producer.create_sender("owed/x")
        owed = [send(sender, b"%d" % i) for i in range(LIMIT)]
        pump([producer], lambda: all(d.settled for d in owed))
        assert all(d.remote_state == Delivery.ACCEPTED for d in owed)
        stopper = threading.Thread(target=gw.stop, daemon=True)
        stopper.start()
        try:
            # Draining: every connection is held as a publisher.
            pump([producer], lambda: held_publishers(gw) == 2)
            # A message sent now is neither accepted nor rejected.
            late = send(sender, b"late")
            # The gateway waits for the receiver: it takes everything it was owed before the close.
            got: list[int] = []
            receiver.link.flow(LIMIT)
            pump([consumer, producer], lambda: len(got) == LIMIT, step=lambda: take_ready(receiver, got))
            assert got == list(range(LIMIT))
            # Then it closes the connections; the message sent while draining was never settled.
            with pytest.raises(ConnectionException) as closed:
                pump([consumer], lambda: False)
            assert getattr(closed.value, "condition", None) == "amqp:connection:forced"
            with pytest.raises(ConnectionException):
                pump([producer], lambda: False)
            assert not late.settled
        finally:
            stopper.join(DEADLINE)
    assert not stopper.is_alive()
