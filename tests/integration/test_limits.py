"""Limits a hostile network needs, against the real gateway on both loops.

Linux routes all of 127/8 to lo, so 127.0.0.2 and up are "other IPs" for free.
The descriptor test runs `polygate run` with a low RLIMIT_NOFILE so that a
flood of a thousand sockets is enough to reach it.
"""

from __future__ import annotations

import json
import queue
import socket
import time
from pathlib import Path
from typing import Any

import aiocoap
import paho.mqtt.client as mqtt
import pytest
from aiocoap import POST, Message
from aiocoap.numbers import codes
from aiocoap.numbers.types import CON
from paho.mqtt.enums import CallbackAPIVersion

from gateway.events import Protocol
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_process import GatewayProcess
from tests.paho_client import PahoClient

#: The gateway process's descriptor limit (soft = hard, so raising it at start changes nothing).
NOFILE = 200


def flood(source: str, port: int, count: int) -> list[socket.socket]:
    """`count` raw TCP connections from `source` that never send a byte."""
    socks = []
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
        sock.settimeout(5)
        sock.connect(("127.0.0.1", port))
        socks.append(sock)
    return socks


def closed_without_answer(sock: socket.socket) -> bool:
    """The gateway closed (or reset) the connection without sending a byte."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def http_get(source: str, port: int, path: str) -> tuple[int, str]:
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0)) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


def refused(metrics: str, reason: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("polygate_connections_refused_total{") and f'reason="{reason}"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def wait_until(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def take_all_descriptors_but_the_reserve(socks: list[socket.socket], port: int, health_port: int, per_source: int) -> None:
    """More sources flood `port` until the descriptor reserve refuses; /health still answers then."""
    for source in ("127.0.0.3", "127.0.0.4", "127.0.0.5", "127.0.0.6"):
        socks += flood(source, port, per_source)
    wait_until(lambda: refused(http_get("127.0.0.2", health_port, "/metrics")[1], "fd_reserve") >= 1)
    assert http_get("127.0.0.2", health_port, "/health")[0] == 200


def assert_refusals_logged_per_interval(gw: GatewayProcess) -> None:
    """Refusals are logged once per interval and reason with a count, never once per connection."""
    records = [json.loads(line) for line in gw.log_text().splitlines() if line.startswith("{")]
    refusals = [r for r in records if r.get("event") == "connection_refused"]
    assert 1 <= len(refusals) <= 4, refusals
    assert not any("Traceback" in line for line in gw.lines)


def paho_connect(port: int, password: str, source: str) -> int:
    """CONNACK code of a paho connect from `source` (-1: no CONNACK)."""
    answers: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"c-{source}", protocol=mqtt.MQTTv311,
                         reconnect_on_failure=False)
    client.username_pw_set(ROOT_USER, password)
    client.on_connect = lambda c, u, f, rc, p: answers.put(rc.value)
    client.connect("127.0.0.1", port, 30, bind_address=source)
    client.loop_start()
    try:
        return answers.get(timeout=10)
    except queue.Empty:
        return -1
    finally:
        client.disconnect()
        client.loop_stop()


def raw_connect(port: int, password: str, source: str) -> int:
    """The CONNACK return code of an MQTT 3.1.1 CONNECT from `source` (-1: closed without one)."""
    def string(text: str) -> bytes:
        return len(text.encode()).to_bytes(2, "big") + text.encode()

    body = string("MQTT") + b"\x04\xc2\x00\x3c" + string(f"raw-{source}") + string(ROOT_USER) + string(password)
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
        sock.sendall(b"\x10" + bytes([len(body)]) + body)
        answer = sock.recv(4)
    return answer[3] if len(answer) == 4 and answer[0] == 0x20 else -1


def test_a_flood_from_one_ip_leaves_room_for_others_and_health(
    tmp_path: Path, root_password: str, loop_name: str
) -> None:
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    config = loopback_config(tmp_path, limits={"max_connections_per_ip": 40, "fd_reserve": 64})
    gw = GatewayProcess(tmp_path, config, loop=loop_name, nofile=NOFILE).start()
    socks: list[socket.socket] = []
    try:
        assert "file descriptor limit" in gw.log_text()
        mqtt_port, health_port = gw.port("tcp"), gw.port("health")
        # 1,100 sockets from one IP: far more than the gateway's 200 descriptors.
        socks += flood("127.0.0.1", mqtt_port, 1100)
        wait_until(lambda: refused(http_get("127.0.0.2", health_port, "/metrics")[1], "max_connections_per_ip") >= 1000)
        # A raw CONNECT: paho's select() cannot take a descriptor above 1,024, and this process holds 1,100.
        assert raw_connect(mqtt_port, root_password, "127.0.0.2") == 0
        take_all_descriptors_but_the_reserve(socks, mqtt_port, health_port, per_source=60)
        assert http_get("127.0.0.2", health_port, "/ready")[0] == 200
        assert_refusals_logged_per_interval(gw)
    finally:
        for sock in socks:
            sock.close()
        gw.terminate()


def test_per_listener_cidr_refuses_other_sources(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(server={"tcp": {"plain": {"addr": "127.0.0.1:0", "allowed_cidrs": ["127.0.0.2/32"]}}})
    port = gw.mqtt_port
    assert paho_connect(port, root_password, "127.0.0.2") == 0
    with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.3", 0)) as sock:
        # Closed at once, before any byte: the refused client gets no CONNACK.
        try:
            sock.sendall(b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00")
        except ConnectionResetError:
            pass
        assert closed_without_answer(sock)
    metrics = gw.gateway.metrics
    wait_until(lambda: metrics.connections_refused_by_listener[(Protocol.MQTT, "server.tcp.plain", "not_allowed")] == 1)


def test_global_cidr_answers_http_with_403(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(limits={"allowed_cidrs": ["127.0.0.2/32"]})
    assert http_get("127.0.0.3", gw.http_port, "/t")[0] == 403
    assert http_get("127.0.0.2", gw.http_port, "/t")[0] != 403


def test_per_ip_cap(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(limits={"max_connections_per_ip": 2})
    socks = flood("127.0.0.4", gw.mqtt_port, 2)
    try:
        wait_until(lambda: gw.gateway.state.connections_from("127.0.0.4") == 2)
        with socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=5, source_address=("127.0.0.4", 0)) as sock:
            assert closed_without_answer(sock)
        assert paho_connect(gw.mqtt_port, root_password, "127.0.0.5") == 0
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: gw.gateway.state.connections_from("127.0.0.4") == 0)


def test_subscription_cap_answers_0x80_for_extra_filters(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(limits={"max_subscriptions_per_client": 3})
    client = PahoClient(gw.mqtt_port, client_id="subs", username=ROOT_USER, password=root_password).connect_ok()
    try:
        assert client.subscribe(("a/1", 1), ("a/2", 0)) == [1, 0]
        # Re-subscribing to a held filter is not a new subscription.
        assert client.subscribe(("a/1", 0), ("a/3", 1), ("a/4", 1), ("a/5", 0)) == [0, 1, 0x80, 0x80]
        client.publish("a/3", b"still served", qos=1)
        assert client.next_message().payload == b"still served"
    finally:
        client.disconnect()
    metrics = http_get("127.0.0.1", gw.port("health"), "/metrics")[1]
    assert ('polygate_limit_refusals_total{listener="server.tcp.plain",reason="max_subscriptions_per_client",'
            'what="subscription"} 2.0') in metrics


def test_handshake_timeout_closes_a_silent_socket(start_gateway: Any) -> None:
    gw = start_gateway(limits={"handshake_timeout": "300ms"})
    with socket.create_connection(("127.0.0.1", gw.mqtt_port), timeout=5) as sock:
        started = time.monotonic()
        assert sock.recv(10) == b""
        assert time.monotonic() - started < 3


def test_coap_block_uploads_per_ip(start_gateway: Any, root_password: str) -> None:
    gw = start_gateway(server={"coap": {"plain": {"addr": "127.0.0.1:0"}}}, limits={"coap_uploads_per_ip": 2})
    port = gw.port("coap")
    query = (f"username={ROOT_USER}", f"password={root_password}")

    def first_block(source: str, topic: str, mid: int) -> aiocoap.numbers.codes.Code:
        request = Message(code=POST, mtype=CON, mid=mid, token=mid.to_bytes(2, "big"), payload=b"x" * 64,
                          uri_path=(topic,), uri_query=query)
        request.opt.block1 = (0, True, 2)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind((source, 0))
            sock.settimeout(5)
            sock.sendto(request.encode(), ("127.0.0.1", port))
            return Message.decode(sock.recv(2048)).code

    assert first_block("127.0.0.7", "u1", 1) == codes.CONTINUE
    assert first_block("127.0.0.7", "u2", 2) == codes.CONTINUE
    assert first_block("127.0.0.7", "u3", 3) == codes.SERVICE_UNAVAILABLE
    assert first_block("127.0.0.8", "u4", 4) == codes.CONTINUE
