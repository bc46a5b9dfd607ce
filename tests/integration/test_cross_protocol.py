"""Messages crossing protocols through one gateway, seen from independent clients."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import aiohttp
import pytest
from amqtt.client import MQTTClient
from amqtt.errors import ConnectError

from auth_providers.local_store import LocalStore
from gateway.events import Secret
from tests.conftest import ROOT_USER
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient


def test_http_post_reaches_mqtt_subscriber(gateway: GatewayThread, root_password: str) -> None:
    sub = PahoClient(gateway.mqtt_port, client_id="sub", username=ROOT_USER, password=root_password).connect_ok()
    try:
        sub.subscribe(("sensors/+/temp", 1))

        async def post() -> int:
            async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(ROOT_USER, root_password)) as http:
                url = f"http://127.0.0.1:{gateway.http_port}/sensors/s1/temp?qos=1"
                async with http.post(url, data=b"\x00\x01binary") as response:
                    return response.status

        assert asyncio.run(post()) == 202
        message = sub.next_message()
        assert (message.topic, message.payload, message.qos) == ("sensors/s1/temp", b"\x00\x01binary", 1)
    finally:
        sub.disconnect()


def test_mqtt_publish_reaches_sse_subscriber(gateway: GatewayThread, root_password: str) -> None:
    pub = PahoClient(gateway.mqtt_port, client_id="pub", username=ROOT_USER, password=root_password).connect_ok()

    async def stream() -> dict[str, Any]:
        async with aiohttp.ClientSession(auth=aiohttp.BasicAuth(ROOT_USER, root_password)) as http:
            url = f"http://127.0.0.1:{gateway.http_port}/subscribe"
            async with http.get(url, params={"topic": "dash/#"}) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/event-stream")
                # The stream is open (subscribed before the headers were sent): publish now.
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: pub.publish("dash/room1", b"hello sse", qos=1)
                )
                async with asyncio.timeout(10):
                    async for raw in response.content:
                        line = raw.decode().strip()
                        if line.startswith("data:"):
                            return json.loads(line[5:])
        raise AssertionError("stream ended")

    try:
        event = asyncio.run(stream())
    finally:
        pub.disconnect()
    assert event["topic"] == "dash/room1"
    assert base64.b64decode(event["payload"]) == b"hello sse"


def test_amqtt_client_auth_publish_subscribe(start_gateway: Any, root_password: str, db_path: str) -> None:
    store = LocalStore(db_path)
    store.add_user("bob", Secret("bob-pw"))
    store.grant("bob", "tenants/bob/#", {"publish", "subscribe"})
    store.close()
    port = start_gateway().mqtt_port

    async def scenario() -> None:
        bad = MQTTClient(client_id="amqtt-bad", config={"auto_reconnect": False})
        with pytest.raises(ConnectError) as refused:
            await bad.connect(f"mqtt://bob:wrong@127.0.0.1:{port}/")
        assert refused.value.return_code == 4

        client = MQTTClient(client_id="amqtt-bob", config={"auto_reconnect": False})
        await client.connect(f"mqtt://bob:bob-pw@127.0.0.1:{port}/")
        try:
            granted = await client.subscribe([("tenants/bob/#", 1), ("tenants/alice/#", 1)])
            assert granted == [1, 0x80]
            await client.publish("tenants/alice/x", b"denied", qos=1)
            await client.publish("tenants/bob/x", b"allowed", qos=1)
            message = await client.deliver_message(timeout_duration=10)
            assert message is not None
            assert (message.topic, bytes(message.data)) == ("tenants/bob/x", b"allowed")
        finally:
            await client.disconnect()

    asyncio.run(scenario())
