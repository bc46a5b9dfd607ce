"""MQTT over WebSocket over TLS (wss) with a verified client certificate, on both event loops.

The WebSocket frontend hands `MQTTConnection` a `WebSocketTransport`; a
certificate identity only reaches the MQTT session if that transport passes the
underlying TLS connection's `ssl_object` through. Shown with two independent
clients: `websockets` speaking hand-written MQTT bytes, and paho-mqtt's own
WebSocket transport. Certificates come from `gateway.certs` (`polygate gen-cert`).

`websockets`' asyncio client, not its sync one: the sync client reads in a
thread of its own while the caller writes, on one SSL object, which OpenSSL
does not allow; over TLS 1.3 (whose session tickets arrive after the
handshake) about 1 in 200 of its upgrade requests was then never received by
any server (none with TLS 1.2, none with a single-threaded client).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
import websockets.asyncio.client

from auth_providers.local_store import LocalStore
from gateway import certs
from tests.conftest import loopback_config
from tests.gateway_thread import GatewayThread
from tests.integration.test_websocket import PahoWebSocketClient, _packet, _string, publish_packet, subscribe_packet

DEADLINE = 10.0
CONNACK_ACCEPTED = b"\x20\x02\x00\x00"
CONNACK_NOT_AUTHORIZED = b"\x20\x02\x00\x05"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA, a server certificate for 127.0.0.1 and client certificates with CN device-1 and stranger."""
    directory = tmp_path_factory.mktemp("pki")
    certs.generate(directory, clients=["device-1", "stranger"])
    return directory


def anonymous_connect(client_id: str) -> bytes:
    """An MQTT 3.1.1 CONNECT with no username and no password (clean session, keepalive 60 s)."""
    return _packet(0x10, _string("MQTT") + bytes([4, 0x02]) + (60).to_bytes(2, "big") + _string(client_id))


def client_context(pki: Path, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client is not None:
        context.load_cert_chain(pki / f"client-{client}.pem", pki / f"client-{client}-key.pem")
    return context


@pytest.fixture
def wss_gateway(tmp_path: Path, pki: Path, start_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    """A wss listener that asks for (but does not require) a client certificate; device-1 is a local user."""
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.add_user("device-1", None, cert_identity="device-1")
        store.grant("device-1", "device-1/#", {"publish", "subscribe"})
    block = {"addr": "127.0.0.1:0", "path": "/mqtt", "cert_file": str(pki / "server.pem"),
             "key_file": str(pki / "server-key.pem"), "ca_file": str(pki / "ca.pem"), "client_auth": "request"}
    return start_gateway(loopback_config(tmp_path, server={"websocket": {"tls": block}}))


def wss(gw: GatewayThread, pki: Path, client: str | None) -> websockets.asyncio.client.connect:
    return websockets.asyncio.client.connect(
        f"wss://127.0.0.1:{gw.port('websocket')}/mqtt", ssl=client_context(pki, client),
        subprotocols=["mqtt"], open_timeout=DEADLINE,  # type: ignore[list-item]
    )


async def received(ws: websockets.asyncio.client.ClientConnection, size: int) -> bytes:
    """`size` bytes of MQTT from however many frames they come in."""
    data = b""
    async with asyncio.timeout(DEADLINE):
        while len(data) < size:
            frame = await ws.recv()
            assert isinstance(frame, bytes)
            data += frame
    return data


async def test_a_client_certificate_logs_its_user_in_over_wss_without_a_password(
    wss_gateway: GatewayThread, pki: Path
) -> None:
    async with wss(wss_gateway, pki, "device-1") as ws:
        await ws.send(anonymous_connect("device-1-ws"))
        assert await received(ws, 4) == CONNACK_ACCEPTED
        # Authorized as device-1, and as nobody more: its own topics granted, another's refused.
        await ws.send(subscribe_packet(1, "device-1/#", 0) + subscribe_packet(2, "other/#", 0))
        assert await received(ws, 10) == b"\x90\x03\x00\x01\x00" + b"\x90\x03\x00\x02\x80"
        await ws.send(publish_packet("device-1/temp", b"21.5"))
        expected = publish_packet("device-1/temp", b"21.5")
        assert await received(ws, len(expected)) == expected


async def test_without_a_known_certificate_and_without_a_password_wss_is_not_authorized(
    wss_gateway: GatewayThread, pki: Path
) -> None:
    for client in (None, "stranger"):
        async with wss(wss_gateway, pki, client) as ws:
            await ws.send(anonymous_connect(f"anon-{client}"))
            assert await received(ws, 4) == CONNACK_NOT_AUTHORIZED, client


def test_paho_over_wss_with_a_client_certificate(wss_gateway: GatewayThread, pki: Path) -> None:
    client = PahoWebSocketClient(wss_gateway.port("websocket"), client_id="device-1-paho")
    client.client.tls_set(ca_certs=str(pki / "ca.pem"), certfile=str(pki / "client-device-1.pem"),
                          keyfile=str(pki / "client-device-1-key.pem"))
    client.connect_ok()
    try:
        assert client.subscribe(("device-1/#", 1), ("other/#", 1)) == [1, 0x80]
        client.publish("device-1/x", b"over wss", qos=1)
        assert client.next_message().payload == b"over wss"
    finally:
        client.disconnect()
