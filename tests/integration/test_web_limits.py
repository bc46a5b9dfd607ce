"""Limits of the aiohttp listeners (HTTP with SSE, MQTT over WebSocket) against the real gateway, on both loops.

Each TCP connection, not each request, is admitted like an MQTT one: it counts
in `limits.max_connections_per_ip` (across all listeners) and the descriptor
budget, and a refused one is closed before any answer. Request headers must be
complete within `limits.handshake_timeout`. SSE streams count against
`limits.max_subscriptions_per_client`. Raw sockets where a client library would
hide what the server did; 127.0.0.2 and up are other source addresses on Linux.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from gateway.events import Protocol
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_process import GatewayProcess
from tests.gateway_thread import GatewayThread
from tests.integration.test_limits import (
    NOFILE,
    assert_refusals_logged_per_interval,
    closed_without_answer,
    flood,
    http_get,
    refused,
    take_all_descriptors_but_the_reserve,
    wait_until,
)
from tests.integration.test_websocket import connect_packet

StartGateway = Callable[..., GatewayThread]
WEB = {
    "http": {"plain": {"addr": "127.0.0.1:0"}},
    "websocket": {"plain": {"addr": "127.0.0.1:0", "path": "/mqtt"}},
}
DEADLINE = 10.0


def basic(password: str) -> str:
    return "Basic " + base64.b64encode(f"{ROOT_USER}:{password}".encode()).decode()


def publish_request(password: str, topic: str = "t/x") -> bytes:
    return (f"POST /{topic} HTTP/1.1\r\nHost: x\r\nAuthorization: {basic(password)}\r\n"
            "Content-Length: 1\r\n\r\n1").encode()


def status_of(sock: socket.socket) -> int:
    """The status code of the next response on `sock` (its headers and a short body read whole)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, f"closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    while len(body) < length:
        body += sock.recv(4096)
    return int(head.split()[1])


def closed_within(sock: socket.socket, seconds: float) -> float:
    """How long the gateway took to close `sock` (it must, within `seconds`)."""
    started = time.monotonic()
    sock.settimeout(seconds)
    assert closed_without_answer(sock)
    return time.monotonic() - started


# -- request headers within limits.handshake_timeout ------------------------------------------------------


def test_http_headers_must_be_complete_within_the_handshake_timeout(
    start_gateway: StartGateway, root_password: str
) -> None:
    gw = start_gateway(limits={"handshake_timeout": "500ms"})
    address = ("127.0.0.1", gw.http_port)
    # Half a request line, and nothing at all: both closed after the timeout, not after 75 s.
    with socket.create_connection(address, timeout=5) as slow, socket.create_connection(address, timeout=5) as silent:
        slow.sendall(b"POST /t/x HTT")
        assert 0.3 < closed_within(slow, 3.0) < 3.0
        assert closed_within(silent, 3.0) < 3.0
    # Headers that trickle in but are complete in time are served.
    with socket.create_connection(address, timeout=5) as sock:
        request = publish_request(root_password)
        for start in range(0, len(request), 40):
            sock.sendall(request[start:start + 40])
            time.sleep(0.01)
        assert status_of(sock) == 202
        # Idle between requests is the keep-alive timeout's business (75 s), not the handshake timeout's ...
        time.sleep(1.0)
        sock.sendall(publish_request(root_password))
        assert status_of(sock) == 202
        # ... but the next request's headers have the same deadline as the first's.
        sock.sendall(b"POST /t/x HTTP/1.1\r\nHost: x\r\n")
        assert closed_within(sock, 3.0) < 3.0


async def test_an_event_stream_outlives_the_handshake_timeout(start_gateway: StartGateway, root_password: str) -> None:
    gw = start_gateway(limits={"handshake_timeout": "300ms"})
    url = f"http://127.0.0.1:{gw.http_port}"
    headers = {"Authorization": basic(root_password)}
    async with aiohttp.ClientSession(headers=headers) as session:
        async with session.get(f"{url}/subscribe", params={"topic": "s/#"}) as stream:
            assert stream.status == 200
            await asyncio.sleep(1.0)
            async with session.post(f"{url}/s/x", data=b"late") as post:
                assert post.status == 202
            async with asyncio.timeout(DEADLINE):
                while not (line := await stream.content.readline()).startswith(b"data:"):
                    assert line, "the stream ended"
            assert json.loads(line[5:])["payload"] == base64.b64encode(b"late").decode()


def test_an_unfinished_tls_handshake_is_closed_after_the_handshake_timeout(start_gateway: StartGateway) -> None:
    server = {"http": {"tls": {"addr": "127.0.0.1:0", "self_signed": True}}}
    gw = start_gateway(server=server, limits={"handshake_timeout": "500ms"})
    with socket.create_connection(("127.0.0.1", gw.port("http")), timeout=5) as sock:
        sock.sendall(b"\x16\x03\x01")  # the start of a ClientHello, and nothing more
        assert closed_within(sock, 3.0) < 3.0
    # A whole handshake still works.
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", gw.port("http")), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(b"GET /t HTTP/1.1\r\nHost: x\r\n\r\n")
            assert status_of(tls) == 405


# -- connections, not requests, count against the per-IP cap and the descriptor budget ---------------------


def test_http_and_websocket_connections_count_against_the_per_ip_cap(
    start_gateway: StartGateway, root_password: str
) -> None:
    gw = start_gateway(server=WEB, limits={"max_connections_per_ip": 3})
    assert gw.gateway is not None
    state, metrics = gw.gateway.state, gw.gateway.metrics
    ports = {kind: gw.port(kind) for kind in ("tcp", "http", "websocket")}

    def connect(kind: str, source: str = "127.0.0.4") -> socket.socket:
        return socket.create_connection(("127.0.0.1", ports[kind]), timeout=5, source_address=(source, 0))

    held = [connect("tcp"), connect("http"), connect("websocket")]
    try:
        wait_until(lambda: gw.call(lambda: state.connections_from("127.0.0.4")) == 3)
        for kind in ("http", "websocket"):
            with connect(kind) as extra:
                # Closed at once (no request is read, no answer is sent), whatever it sends.
                try:
                    extra.sendall(publish_request(root_password))
                except ConnectionResetError:
                    pass
                assert closed_without_answer(extra)
        # Another source is not affected, and one keep-alive connection carries many requests.
        with connect("http", "127.0.0.5") as other:
            for _ in range(5):
                other.sendall(publish_request(root_password))
                assert status_of(other) == 202
    finally:
        for sock in held:
            sock.close()
    by_listener = metrics.connections_refused_by_listener
    assert gw.call(lambda: by_listener[(Protocol.HTTP, "server.http.plain", "max_connections_per_ip")]) == 1
    assert gw.call(lambda: by_listener[(Protocol.MQTT, "server.websocket.plain", "max_connections_per_ip")]) == 1
    wait_until(lambda: gw.call(lambda: state.connections_from("127.0.0.4")) == 0)


async def test_an_upgraded_websocket_counts_once(start_gateway: StartGateway, root_password: str) -> None:
    gw = start_gateway(server=WEB, limits={"max_connections_per_ip": 2})
    assert gw.gateway is not None
    state = gw.gateway.state
    url = f"http://127.0.0.1:{gw.port('websocket')}/mqtt"
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.6", 0), limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        sockets = []
        for n in range(2):
            ws = await session.ws_connect(url, protocols=("mqtt",))
            await ws.send_bytes(connect_packet(f"ws-{n}", ROOT_USER, root_password))
            assert (await ws.receive(timeout=DEADLINE)).data == b"\x20\x02\x00\x00"
            sockets.append(ws)
        # Handed over from the TCP connection to the MQTT connection: counted once each.
        assert gw.call(lambda: state.connections_from("127.0.0.6")) == 2
        assert gw.call(lambda: state.count("server.websocket.plain")) == 2
        with pytest.raises((aiohttp.ClientError, ConnectionError)):
            await session.ws_connect(url, protocols=("mqtt",))
        for ws in sockets:
            await ws.close()
    deadline = time.monotonic() + DEADLINE
    while gw.call(lambda: state.connections_from("127.0.0.6")):
        assert time.monotonic() < deadline, "closed WebSocket connections are still counted"
        await asyncio.sleep(0.02)


def test_a_flood_of_http_sockets_from_one_ip_is_capped_and_health_answers(
    tmp_path: Path, root_password: str, loop_name: str
) -> None:
    config = loopback_config(tmp_path, limits={"max_connections_per_ip": 40, "fd_reserve": 64})
    gw = GatewayProcess(tmp_path, config, loop=loop_name, nofile=NOFILE).start()
    socks: list[socket.socket] = []
    try:
        http_port, health_port = gw.port("http"), gw.port("health")
        # 1,100 sockets from one IP: far more than the gateway's 200 descriptors.
        socks += flood("127.0.0.1", http_port, 1100)
        wait_until(lambda: refused(http_get("127.0.0.2", health_port, "/metrics")[1], "max_connections_per_ip") >= 1000)
        # Another source is served (GET of a topic: 405, an answer all the same).
        assert http_get("127.0.0.2", http_port, "/t")[0] == 405
        take_all_descriptors_but_the_reserve(socks, http_port, health_port, per_source=40)
        assert_refusals_logged_per_interval(gw)
    finally:
        for sock in socks:
            sock.close()
        gw.terminate()


def test_a_source_outside_allowed_cidrs_gets_403_once_then_the_connection_closes(
    start_gateway: StartGateway, root_password: str
) -> None:
    gw = start_gateway(server=WEB, limits={"allowed_cidrs": ["127.0.0.2/32"]})
    assert gw.gateway is not None
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=5, source_address=("127.0.0.3", 0)) as sock:
        sock.sendall(publish_request(root_password) + publish_request(root_password))
        assert status_of(sock) == 403
        assert closed_without_answer(sock)  # the pipelined second request is not served
        assert gw.call(lambda: gw.gateway.state.connections_from("127.0.0.3")) == 0  # type: ignore[union-attr]
    # WebSocket (MQTT) is closed at its accept, as an MQTT listener does.
    with socket.create_connection(("127.0.0.1", gw.port("websocket")), timeout=5,
                                  source_address=("127.0.0.3", 0)) as sock:
        assert closed_without_answer(sock)
    by_listener = gw.gateway.metrics.connections_refused_by_listener
    assert gw.call(lambda: by_listener[(Protocol.HTTP, "server.http.plain", "not_allowed")]) == 1
    assert gw.call(lambda: by_listener[(Protocol.MQTT, "server.websocket.plain", "not_allowed")]) == 1


# -- limits.max_subscriptions_per_client on SSE streams ----------------------------------------------------


async def test_sse_streams_of_one_client_id_share_max_subscriptions_per_client(
    start_gateway: StartGateway, root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(limits={"max_subscriptions_per_client": 3})
    url = f"http://127.0.0.1:{gw.http_port}/subscribe"

    def headers(client_id: str) -> dict[str, str]:
        return {"Authorization": basic(root_password), "X-Client-ID": client_id}

    async with aiohttp.ClientSession() as session:
        first = await session.get(url, params=[("topic", "a/1"), ("topic", "a/2")], headers=headers("c1"))
        assert first.status == 200
        with caplog.at_level(logging.WARNING, logger="polygate.state"):
            # Two more would be four: the whole stream is refused.
            async with session.get(url, params=[("topic", "a/3"), ("topic", "a/4")], headers=headers("c1")) as over:
                assert over.status == 429
                assert over.headers["Retry-After"] == "60"
                assert "max_subscriptions_per_client" in (await over.json())["error"]
        assert any("refused a subscription" in r.getMessage() and "max_subscriptions_per_client" in r.getMessage()
                   for r in caplog.records)
        third = await session.get(url, params={"topic": "a/3"}, headers=headers("c1"))
        assert third.status == 200
        # Another client id has its own.
        other = await session.get(url, params=[("topic", "b/1"), ("topic", "b/2"), ("topic", "b/3")],
                                  headers=headers("c2"))
        assert other.status == 200
        # A closed stream gives its filters back.
        first.close()
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while True:
            async with session.get(url, params={"topic": "a/9"}, headers=headers("c1")) as again:
                if again.status == 200:
                    break
                assert again.status == 429
            assert asyncio.get_running_loop().time() < deadline, "the closed stream's filters were not given back"
            await asyncio.sleep(0.02)
        third.close()
        other.close()


def test_shutdown_closes_idle_keep_alive_connections_at_once(start_gateway: StartGateway, root_password: str) -> None:
    gw = start_gateway()
    with socket.create_connection(("127.0.0.1", gw.http_port), timeout=5) as sock:
        sock.sendall(publish_request(root_password))
        assert status_of(sock) == 202
        started = time.monotonic()
        gw.stop()
        # Counted connections are closed by the stop, not left to server.shutdown_timeout (2 s here).
        assert time.monotonic() - started < 1.5
        assert closed_without_answer(sock)
