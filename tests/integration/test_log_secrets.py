"""Issue 19's reproducers: no secret in any log line, no traceback for bad input.

Each test sends what an attacker (or a confused user) would, then reads every
line the gateway logged, in both formats, through the handlers `polygate run`
installs (`gateway.logging_setup.make_handler`); one runs a real
`polygate run` process and reads its JSON stderr.
"""

from __future__ import annotations

import asyncio
import base64
import re
import logging
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.frontends import aiohttp_listener
from gateway.logging_setup import username_tag
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_process import GatewayProcess
from tests.gateway_thread import GatewayThread
from tests.integration.test_fuzz import (
    LogCapture,
    _amqp_frame,
    _described,
    _str8,
)
from tests.paho_client import PahoClient

SECRET = "Sup3r-S3cret-pw!"
SERVER = {
    "websocket": {"plain": {"addr": "127.0.0.1:0", "path": "/mqtt"}},
    "amqp": {"plain": {"addr": "127.0.0.1:0"}},
}
NULL, TRUE, FALSE, ZERO = b"\x40", b"\x41", b"\x42", b"\x43"


@pytest.fixture
def logged(start_gateway: Callable[..., GatewayThread]) -> Iterator[tuple[GatewayThread, LogCapture]]:
    with LogCapture() as logs:
        yield start_gateway(server=SERVER), logs


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `data`, read until the gateway closes the connection (or stops answering)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return received
            if not chunk:
                return received
            received += chunk


def sasl_init(username: str, password: str) -> bytes:
    plain = f"\0{username}\0{password}".encode()
    return _amqp_frame(_described(0x41, [_str8(b"PLAIN", 0xA3), _str8(plain, 0xA0)]), kind=1)


def assert_clean(logs: LogCapture, *secrets: str) -> None:
    lines = logs.lines()
    assert lines, "nothing was logged"
    for secret in secrets:
        assert not [line for line in lines if secret in line]
    assert not [line for line in lines if "Traceback" in line]
    assert not [r.getMessage() for r in logs.records if r.levelno >= logging.ERROR]


async def wait_logged(logs: LogCapture, needle: str, deadline_s: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while needle not in logs.text.getvalue():
        assert loop.time() < deadline, f"{needle!r} not logged"
        await asyncio.sleep(0.01)


# -- secrets ---------------------------------------------------------------------------------------------


async def test_a_second_sasl_init_does_not_log_the_password(logged: tuple[GatewayThread, LogCapture]) -> None:
    gw, logs = logged
    data = b"AMQP\x03\x01\x00\x00" + sasl_init("alice", SECRET) * 2
    reply = await asyncio.to_thread(exchange, gw.port("amqp"), data)
    # Proton still tells the client, whose own bytes they are.
    assert b"framing-error" in reply
    await wait_logged(logs, "Unknown protocol detected")
    assert_clean(logs, SECRET)


@pytest.mark.parametrize("listener", ["http", "websocket"])
async def test_a_malformed_request_is_one_warning_without_header_values(
    logged: tuple[GatewayThread, LogCapture], listener: str
) -> None:
    gw, logs = logged
    credentials = base64.b64encode(f"{ROOT_USER}:{SECRET}".encode()).decode()
    request = (f"GET /mqtt HTTP/1.1\r\nHost: gw\r\nAuthorization: Basic {credentials}\r\n"
               "Bad\x01Header: x\r\n\r\n").encode()
    for _ in range(3):
        reply = await asyncio.to_thread(exchange, gw.port(listener), request)
        assert reply.startswith(b"HTTP/1.0 400") or reply.startswith(b"HTTP/1.1 400"), reply[:60]
    await wait_logged(logs, "bad HTTP request")
    warnings = [r for r in logs.records if r.name == "polygate.http_server"]
    # Three bad requests within the interval: the first is logged, the others counted.
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert "127.0.0.1" in warnings[0].getMessage()
    assert_clean(logs, SECRET, credentials)


def test_the_throttle_logs_the_first_then_one_line_per_interval_with_a_count(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = [100.0]
    monkeypatch.setattr("gateway.logging_setup.time.monotonic", lambda: clock[0])
    errors = aiohttp_listener.RequestErrorLog("server.http.plain", interval=60.0)
    with caplog.at_level(logging.WARNING, logger="polygate.http_server"):
        for _ in range(5):
            errors.bad_request("192.0.2.1", "BadHttpMessage (400)")
        clock[0] += 61.0
        errors.bad_request("192.0.2.2", "BadHttpMessage (400)")
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2 and errors.bad_requests == 6
    assert "more since" not in messages[0]
    assert "192.0.2.2" in messages[1] and "(4 more since the last such line)" in messages[1]


async def test_a_password_typed_as_the_username_is_logged_only_as_a_tag(
    logged: tuple[GatewayThread, LogCapture]
) -> None:
    gw, logs = logged

    def connect() -> int:
        client = PahoClient(gw.mqtt_port, client_id="typo", username=SECRET, password="x")
        code, _ = client.connect()
        client.kill()
        return code

    assert await asyncio.to_thread(connect) != 0
    await wait_logged(logs, username_tag(SECRET))
    assert_clean(logs, SECRET)


# -- bad input is an error answer, not a traceback --------------------------------------------------------


def http_exchange(port: int, head: str, body: bytes = b"") -> bytes:
    """Send a raw request; the response once its head and Content-Length body are in (or the connection ends)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5.0) as sock:
        sock.sendall(head.encode("latin-1") + body)
        received = b""
        while True:
            end = received.find(b"\r\n\r\n")
            if end >= 0:
                length = re.search(rb"(?im)^content-length:\s*(\d+)", received[:end])
                if received[end + 4:] and len(received) - end - 4 >= (int(length.group(1)) if length else 0) \
                        or length and int(length.group(1)) == 0:
                    return received
            try:
                chunk = sock.recv(65536)
            except (ConnectionResetError, TimeoutError):
                return received
            if not chunk:
                return received
            received += chunk


@pytest.mark.parametrize("case", ["websocket-key", "websocket-header", "gzip", "deep-json"])
async def test_bad_http_input_is_a_400_without_a_traceback(
    logged: tuple[GatewayThread, LogCapture], root_password: str, case: str
) -> None:
    gw, logs = logged
    auth = "Authorization: Basic " + base64.b64encode(f"{ROOT_USER}:{root_password}".encode()).decode() + "\r\n"
    upgrade = ("GET /mqtt HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n")
    if case == "websocket-key":
        port, head, body = gw.port("websocket"), upgrade + "Sec-WebSocket-Key: \xff\xff\xff\xff\r\n\r\n", b""
    elif case == "websocket-header":
        port, head, body = gw.port("websocket"), upgrade.replace("Upgrade: websocket", "Upgrade: websock\xe9t") + (
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"), b""
    elif case == "gzip":
        body = b"this is not gzip"
        port, head = gw.http_port, (f"POST /a/b HTTP/1.1\r\nHost: gw\r\n{auth}Content-Encoding: gzip\r\n"
                                    f"Content-Length: {len(body)}\r\n\r\n")
    else:
        body = b"[" * 100_000
        port, head = gw.http_port, f"POST /publish HTTP/1.1\r\nHost: gw\r\n{auth}Content-Length: {len(body)}\r\n\r\n"
    reply = await asyncio.to_thread(http_exchange, port, head, body)
    assert reply.split(b"\r\n", 1)[0].endswith(b"400 Bad Request"), reply[:120]
    assert_clean(logs, root_password)


def open_session(password: str, container: bytes, *, target: bytes = b"t/1") -> bytes:
    window = b"\x70" + struct.pack(">I", 100)
    attach = _described(0x12, [_str8(b"link"), ZERO, FALSE, NULL, NULL,
                               _described(0x28, [_str8(b"src")]), _described(0x29, [_str8(target)] if target else [])])
    frames = [_described(0x10, [_str8(container)]), _described(0x11, [NULL, ZERO, window, window]), attach]
    return (b"AMQP\x03\x01\x00\x00" + sasl_init(ROOT_USER, password) + b"AMQP\x00\x01\x00\x00"
            + b"".join(_amqp_frame(f) for f in frames))


def transfer_to(to: bytes) -> bytes:
    """One unsettled message whose properties' `to` is `to` (sent once the gateway granted credit)."""
    properties = _described(0x73, [NULL, NULL, _str8(to)])
    return _amqp_frame(_described(0x14, [ZERO, ZERO, _str8(b"t", 0xA0), ZERO, FALSE])
                       + properties + b"\x00\x53\x75" + _str8(b"x", 0xA0))


@pytest.mark.parametrize("case", ["container-id", "link-address", "to"])
async def test_amqp10_non_utf8_strings_are_protocol_errors(
    logged: tuple[GatewayThread, LogCapture], root_password: str, case: str
) -> None:
    gw, logs = logged
    bad = b"\xff\xfe\xc3\x28"
    data = {
        "container-id": open_session(root_password, bad),
        "link-address": open_session(root_password, b"fuzz", target=bad),
        "to": open_session(root_password, b"fuzz", target=b""),
    }[case]

    def run() -> bytes:
        with socket.create_connection(("127.0.0.1", gw.port("amqp")), timeout=3) as sock:
            sock.sendall(data)
            received = b""
            sent_transfer = case != "to"
            while b"amqp:decode-error" not in received:
                if not sent_transfer and b"\x00S\x13" in received:  # the gateway's Flow: credit
                    sock.sendall(transfer_to(bad))
                    sent_transfer = True
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
            return received

    reply = await asyncio.to_thread(run)
    assert b"amqp:decode-error" in reply
    assert_clean(logs, root_password)


def test_polygate_run_logs_no_sasl_password_in_json(
    tmp_path: Path, root_password: str, loop_name: str
) -> None:
    config = loopback_config(tmp_path, server={"amqp": {"plain": {"addr": "127.0.0.1:0"}}})
    gateway = GatewayProcess(tmp_path, config, loop=loop_name).start()
    try:
        exchange(gateway.port("amqp"), b"AMQP\x03\x01\x00\x00" + sasl_init("alice", SECRET) * 2)
        gateway.wait_for_log("Unknown protocol detected")
    finally:
        gateway.terminate()
    text = gateway.log_text()
    assert SECRET not in text and "Traceback" not in text

