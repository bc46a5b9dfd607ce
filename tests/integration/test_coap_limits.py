"""`limits.max_subscriptions_per_client` on CoAP observations, against the real gateway on both loops.

One observation is one subscription of its client id (`?client_id=`, else
`coap:<peer ip:port>`, as DESIGN.md says); one over the cap is answered 4.29
with Max-Age and logged like every limit. Raw datagrams (aiocoap's codec) so
that a test can deregister exactly the observation it means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from aiocoap.numbers import codes

from tests.gateway_thread import GatewayThread
from tests.conftest import ROOT_USER
from tests.integration.test_coap import COAP, RawPeer, raw_get, subscriptions, wait_for

StartGateway = Callable[..., GatewayThread]


@pytest.fixture
def root(root_password: str) -> dict[str, str]:
    return {"username": ROOT_USER, "password": root_password}


async def answer(peer: RawPeer, path: tuple[str, ...], query: dict[str, str], token: bytes, observe: int) -> codes.Code:
    peer.send(raw_get(path, query, token=token, observe=observe))
    response = await asyncio.to_thread(peer.response)
    assert response.token == token
    return response.code


async def test_observations_of_one_client_id_are_capped_with_4_29(
    start_gateway: StartGateway, root: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(server=COAP, limits={"max_subscriptions_per_client": 2})
    port = gw.port("coap")
    c1, c2 = {**root, "client_id": "c1"}, {**root, "client_id": "c2"}
    first, second = RawPeer(port), RawPeer(port)
    try:
        assert await answer(first, ("a", "#"), c1, b"\x01", 0) == codes.CONTENT
        # The same client id from another address: one client, one budget.
        assert await answer(second, ("b", "#"), c1, b"\x02", 0) == codes.CONTENT
        with caplog.at_level(logging.WARNING, logger="polygate.state"):
            second.send(raw_get(("c", "#"), c1, token=b"\x03", observe=0))
            refused = await asyncio.to_thread(second.response)
        assert refused.code == codes.TOO_MANY_REQUESTS
        assert refused.opt.max_age == 60
        assert b"max_subscriptions_per_client" in refused.payload
        assert any("refused a subscription" in r.getMessage() and "max_subscriptions_per_client" in r.getMessage()
                   for r in caplog.records)
        assert subscriptions(gw) == 2
        # Another client id has a budget of its own.
        assert await answer(first, ("d", "#"), c2, b"\x04", 0) == codes.CONTENT
        # Deregistering (Observe: 1 on its token) gives the slot back.
        assert await answer(first, ("a", "x"), c1, b"\x01", 1) == codes.NOT_FOUND
        await wait_for(lambda: subscriptions(gw) == 2, "the deregistered observation to go")
        assert await answer(second, ("c", "#"), c1, b"\x05", 0) == codes.CONTENT
    finally:
        first.close()
        second.close()


async def test_without_a_client_id_each_peer_is_its_own_client(
    start_gateway: StartGateway, root: dict[str, str]
) -> None:
    gw = start_gateway(server=COAP, limits={"max_subscriptions_per_client": 1})
    port = gw.port("coap")
    first, second = RawPeer(port), RawPeer(port)
    try:
        assert await answer(first, ("a", "#"), root, b"\x01", 0) == codes.CONTENT
        assert await answer(first, ("b", "#"), root, b"\x02", 0) == codes.TOO_MANY_REQUESTS
        assert await answer(second, ("b", "#"), root, b"\x03", 0) == codes.CONTENT
        assert subscriptions(gw) == 2
    finally:
        first.close()
        second.close()
