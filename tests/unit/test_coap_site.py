"""The CoAP frontend's root site, UDP stack and request parsing, without a gateway.

Every test runs on asyncio and on uvloop (the UDP stack reads its socket
through the loop, and uvloop's polling differs).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator

import aiocoap
import pytest
from aiocoap import GET, POST, Message
from aiocoap.numbers import codes
from aiocoap.pipe import Pipe
from hypothesis import given
from hypothesis import strategies as st

from gateway.events import NO_SECRET, Secret
from gateway.frontends.coap import (
    MAX_DATAGRAM,
    BadRequest,
    CatchAllSite,
    UDPContext,
    block_of,
    open_udp_context,
    parse_query,
    publish_topic,
)
from tests.conftest import settle

DEADLINE = 5.0


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def event_loop_policy(request: pytest.FixtureRequest) -> asyncio.AbstractEventLoopPolicy:
    """pytest-asyncio's: each test once per loop."""
    if request.param == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    return pytest.importorskip("uvloop").EventLoopPolicy()  # type: ignore[no-any-return]


class Recorder:
    """A handler that answers every request with its Uri-Path, and remembers the paths.

    A request for `/hold` is answered once `release` is set.
    """

    def __init__(self) -> None:
        self.paths: list[tuple[str, ...]] = []
        self.bad: list[str] = []
        self.release = asyncio.Event()

    async def handle(self, pipe: Pipe) -> None:
        path = tuple(pipe.request.opt.uri_path)
        self.paths.append(path)
        if path == ("hold",):
            await self.release.wait()
        pipe.add_response(Message(code=codes.CONTENT, payload="/".join(path).encode()), is_last=True)


@pytest.fixture
async def served() -> AsyncIterator[tuple[Recorder, UDPContext, aiocoap.Context]]:
    recorder = Recorder()
    udp = await open_udp_context(CatchAllSite(recorder.handle), "127.0.0.1", 0, on_bad_datagram=recorder.bad.append)
    client = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield recorder, udp, client
    await client.shutdown()
    await udp.context.shutdown()


async def ask(client: aiocoap.Context, uri: str) -> Message:
    async with asyncio.timeout(DEADLINE):
        return await client.request(Message(code=GET, uri=uri)).response


async def test_every_path_reaches_the_one_handler_whole(served: tuple[Recorder, UDPContext, aiocoap.Context]) -> None:
    recorder, udp, client = served
    host, port = udp.bound
    assert host == "127.0.0.1" and port > 0
    base = f"coap://127.0.0.1:{port}"
    cases = {
        "/": (),
        "/a": ("a",),
        "/a/b/c": ("a", "b", "c"),
        "/.well-known/core": (".well-known", "core"),
        "/a/%23": ("a", "#"),
        "/+/x": ("+", "x"),
        "//lead": ("", "lead"),
        "/trail/": ("trail", ""),
    }
    for suffix, path in cases.items():
        response = await ask(client, base + suffix)
        assert (response.code, response.payload) == (codes.CONTENT, "/".join(path).encode()), suffix
    assert recorder.paths == list(cases.values())


async def test_bad_datagrams_are_dropped_quietly_and_counted(
    served: tuple[Recorder, UDPContext, aiocoap.Context],
) -> None:
    recorder, udp, client = served
    port = udp.bound[1]
    long_post = Message(code=POST, uri_path=("cut",), payload=b"x" * MAX_DATAGRAM)
    long_post.mtype, long_post.mid = aiocoap.CON, 9
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw.sendto(long_post.encode(), ("127.0.0.1", port))
        raw.sendto(b"\x40\x01\x00\x02\xb2\xc3\x28", ("127.0.0.1", port))  # Uri-Path bytes that are not UTF-8
        raw.sendto(os.urandom(MAX_DATAGRAM + 1), ("127.0.0.1", port))
    finally:
        raw.close()
    # The socket reads in order: once a later request is answered, the three were handled.
    assert (await ask(client, f"coap://127.0.0.1:{port}/after")).payload == b"after"
    assert sorted(recorder.bad) == ["datagram_too_large", "datagram_too_large", "malformed_datagram"]
    assert recorder.paths == [("after",)]


def closed_port() -> int:
    """A loopback UDP port nobody listens on: a datagram to it comes back as an ICMP port-unreachable."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_peer_gone_before_its_reply_does_not_stop_the_reading(
    served: tuple[Recorder, UDPContext, aiocoap.Context],
) -> None:
    recorder, udp, client = served
    port = udp.bound[1]
    held = Message(code=GET, uri_path=("hold",))
    held.mtype, held.mid, held.token = aiocoap.CON, 7, b"\x01"
    raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        raw.sendto(held.encode(), ("127.0.0.1", port))
        await settle(lambda: ("hold",) in recorder.paths, DEADLINE)
    finally:
        raw.close()
    # The reply goes to the closed port; its ICMP error is queued on the listener's socket.
    recorder.release.set()
    for index in range(3):
        assert (await ask(client, f"coap://127.0.0.1:{port}/after/{index}")).payload == f"after/{index}".encode()
    assert udp.transport.serving()


async def test_a_send_right_after_an_icmp_error_for_another_peer_goes_out(
    served: tuple[Recorder, UDPContext, aiocoap.Context],
) -> None:
    _, udp, client = served
    transport = udp.layer.message_interface.transport
    closed = ("::ffff:127.0.0.1", closed_port())
    live = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        live.bind(("127.0.0.1", 0))
        live.settimeout(DEADLINE)
        address = ("::ffff:127.0.0.1", live.getsockname()[1])
        for index in range(3):
            # Over loopback the ICMP error is back within the first send, pending on the socket.
            transport.sendmsg(b"to a closed port", [], 0, closed)
            transport.sendmsg(b"%d" % index, [], 0, address)
        assert [await asyncio.to_thread(live.recv, 100) for _ in range(3)] == [b"0", b"1", b"2"]
    finally:
        live.close()
    assert (await ask(client, f"coap://127.0.0.1:{udp.bound[1]}/still")).payload == b"still"


async def test_a_busy_port_is_an_error_not_a_shared_socket(
    served: tuple[Recorder, UDPContext, aiocoap.Context],
) -> None:
    _, udp, _ = served
    with pytest.raises(OSError):
        await open_udp_context(CatchAllSite(Recorder().handle), "127.0.0.1", udp.bound[1], on_bad_datagram=print)


# -- parsing -----------------------------------------------------------------------------------------

_values = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(username=_values, password=_values, client_id=_values, qos=st.sampled_from(["0", "1", "2"]),
       retain=st.sampled_from(["true", "false", "1", "0", "TRUE"]), other=st.lists(_values, max_size=3))
def test_query_parameters_are_read_and_unknown_ones_ignored(
    username: str, password: str, client_id: str, qos: str, retain: str, other: list[str]
) -> None:
    extra = [f"x{index}={value}" for index, value in enumerate(other)]
    query = parse_query([*extra, f"username={username}", f"password={password}", f"client_id={client_id}",
                         f"qos={qos}", f"retain={retain}"])
    assert (query.username, query.client_id, query.qos) == (username, client_id, int(qos))
    assert query.secret == Secret(password)
    assert query.retain is (retain.lower() in ("true", "1"))
    if password:
        assert "Secret('***')" in repr(query)


@given(secret=_values, key=st.sampled_from(["authorization", "auth"]))
def test_a_bare_secret_is_the_secret(secret: str, key: str) -> None:
    query = parse_query([f"{key}={secret}"])
    assert query.secret == Secret(secret) and query.username == ""


def test_defaults_and_refusals() -> None:
    empty = parse_query([])
    assert (empty.username, empty.secret, empty.client_id, empty.qos, empty.retain) == ("", NO_SECRET, "", None, None)
    assert parse_query(["password=a=b"]).secret == Secret("a=b")
    for bad in (["qos=3"], ["qos="], ["retain=yes"], ["qos=1", "qos=1"], ["password=a", "auth=b"],
                ["authorization=a", "auth=a"], ["username=a", "username=b"]):
        with pytest.raises(BadRequest):
            parse_query(bad)


def test_publish_topic_from_the_path() -> None:
    assert publish_topic(("a", "b")) == "a/b"
    assert publish_topic(("mqtt", "publish", "a", "b")) == "a/b"
    assert publish_topic(("mqtt", "publish")) == "mqtt/publish"
    assert publish_topic(("", "x", "")) == "/x/"
    with pytest.raises(BadRequest):
        publish_topic(())


@given(payload=st.binary(min_size=1, max_size=5000), szx=st.integers(0, 6))
def test_blocks_put_back_together_are_the_payload(payload: bytes, szx: int) -> None:
    blocks = []
    number = 0
    while True:
        block = block_of(payload, b"tag", number, szx)
        assert block.opt.etag == b"tag" and block.opt.block2.block_number == number
        blocks.append(block.payload)
        if not block.opt.block2.more:
            break
        assert len(block.payload) == 1 << (szx + 4)
        number += 1
    assert b"".join(blocks) == payload
    with pytest.raises(BadRequest):
        block_of(payload, b"tag", number + 1, szx)
