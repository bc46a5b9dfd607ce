"""The reference auth service's RabbitMQ endpoints (rabbitmq_auth_backend_http), called as RabbitMQ calls them.

RabbitMQ 3.10's plugin sends GET with a query string or POST with a
form-encoded body (`auth_http.http_method`), each value `quote_plus`-encoded,
maps folded in as `variable_map.<key>`, and reads a 200 whose body is `allow`,
`allow <tags>` or `deny`. The last test runs a real RabbitMQ (when installed)
with its MQTT plugin and the cached HTTP backend pointed at the service.
"""

from __future__ import annotations

import logging
import queue
import secrets
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
import yaml

from auth_providers.local_store import hash_password
from bench.rabbitmq import rabbitmq_server_path
from gateway.auth_server import (
    RABBITMQ_DENIED,
    RABBITMQ_PATHS,
    RABBITMQ_RESOURCE,
    RABBITMQ_TOPIC,
    RABBITMQ_USER,
    RABBITMQ_VHOST,
    RunningAuthServer,
    UsersFile,
    mqtt_topic_from_routing_key,
    parse_users,
    start_auth_server,
)
from gateway.events import Secret

PASSWORDS = {"device-1": "pw+device 1&x=y", "plain": "pw-plain", "sensor": "pw-sensor"}
METHODS = ("GET", "POST")


@pytest.fixture(scope="module")
def users() -> UsersFile:
    return parse_users({"users": [
        {
            "username": "device-1",
            "password_hash": hash_password(Secret(PASSWORDS["device-1"])),
            "external_id": "ext-device-1",
            "publish": ["tenants/acme/#", "users/%u/out"],
            "subscribe": ["tenants/acme/+/status"],
        },
        {"username": "plain", "password_hash": hash_password(Secret(PASSWORDS["plain"])), "client_ids": ["plain-1"]},
        {
            "username": "sensor",
            "password_hash": hash_password(Secret(PASSWORDS["sensor"])),
            "client_ids": ["sensor-7", "sensor-8"],
            "publish": ["devices/%c/telemetry"],
            "subscribe": ["devices/%c/commands"],
        },
    ]})


class RabbitCaller:
    """Requests built the way rabbit_auth_backend_http builds them."""

    def __init__(self, port: int, method: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.method = method
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    @staticmethod
    def encode(params: Mapping[str, Any]) -> str:
        parts: list[str] = []
        for key, value in params.items():
            if isinstance(value, Mapping):
                parts += [f"{key}.{inner}={quote_plus(str(v))}" for inner, v in value.items()]
            else:
                parts.append(f"{key}={quote_plus(str(value))}")
        return "&".join(parts)

    async def raw(self, kind: str, **params: Any) -> tuple[int, str]:
        path, query = RABBITMQ_PATHS[f"{kind}_path"], self.encode(params)
        if self.method == "GET":
            request = self.session.get(f"{self.base}{path}?{query}")
        else:
            request = self.session.post(f"{self.base}{path}", data=query.encode(),
                                        headers={"Content-Type": "application/x-www-form-urlencoded"})
        async with request as response:
            return response.status, await response.text()

    async def ask(self, kind: str, **params: Any) -> str:
        status, body = await self.raw(kind, **params)
        assert status == 200, (status, body)
        return body

    async def user(self, username: str, password: str, client_id: str = "c-1") -> str:
        return await self.ask("user", username=username, password=password, vhost="/", client_id=client_id)

    async def topic(self, username: str, permission: str, routing_key: str, client_id: str = "c-1") -> str:
        return await self.ask("topic", username=username, vhost="/", resource="topic", name="amq.topic",
                              permission=permission, routing_key=routing_key, tags="",
                              variable_map={"username": username, "vhost": "/", "client_id": client_id})

    async def aclose(self) -> None:
        await self.session.close()


@pytest.fixture
async def service(users: UsersFile) -> AsyncIterator[RunningAuthServer]:
    server = await start_auth_server(users, host="127.0.0.1", port=0, transport="http")
    yield server
    await server.stop()


@pytest.fixture(params=METHODS)
async def rabbit(request: pytest.FixtureRequest, service: RunningAuthServer) -> AsyncIterator[RabbitCaller]:
    caller = RabbitCaller(service.port, request.param)
    yield caller
    await caller.aclose()


# --------------------------------------------------------------------------- the contract


async def test_user_path_checks_the_password(rabbit: RabbitCaller) -> None:
    # '+', ' ', '&' and '=' in the password survive RabbitMQ's quote_plus encoding.
    assert await rabbit.user("device-1", PASSWORDS["device-1"]) == "allow"
    assert await rabbit.user("device-1", "wrong") == "deny"
    assert await rabbit.user("nobody", "whatever") == "deny"
    # A login without a password (a certificate login) cannot be checked here.
    assert await rabbit.ask("user", username="device-1", vhost="/", client_id="c-1") == "deny"


async def test_user_path_binds_client_ids(rabbit: RabbitCaller) -> None:
    assert await rabbit.user("plain", PASSWORDS["plain"], client_id="plain-1") == "allow"
    assert await rabbit.user("plain", PASSWORDS["plain"], client_id="plain-2") == "deny"
    # An AMQP login sends no client id at all.
    assert await rabbit.ask("user", username="plain", password=PASSWORDS["plain"], vhost="/") == "deny"


async def test_vhost_and_resource_allow_known_users(rabbit: RabbitCaller) -> None:
    assert await rabbit.ask("vhost", username="device-1", vhost="/", ip="127.0.0.1", tags="",
                            client_id="c-1") == "allow"
    assert await rabbit.ask("vhost", username="nobody", vhost="/", ip="127.0.0.1") == "deny"
    for resource, name, permission in (("queue", "mqtt-subscription-c-1qos1", "configure"),
                                       ("queue", "mqtt-subscription-c-1qos1", "write"),
                                       ("exchange", "amq.topic", "read"), ("exchange", "amq.topic", "write")):
        assert await rabbit.ask("resource", username="device-1", vhost="/", resource=resource, name=name,
                                permission=permission, tags="") == "allow"
    assert await rabbit.ask("resource", username="nobody", vhost="/", resource="queue", name="q",
                            permission="read") == "deny"
    assert await rabbit.ask("resource", username="device-1", vhost="/", resource="queue", name="q",
                            permission="delete-everything") == "deny"


def test_routing_keys_map_back_to_mqtt_topics() -> None:
    # RabbitMQ 3.10's MQTT plugin writes '/' as '.' and '+' as '*'; '#' stays.
    assert mqtt_topic_from_routing_key("tenants.acme.x") == "tenants/acme/x"
    assert mqtt_topic_from_routing_key("tenants.acme.*.status") == "tenants/acme/+/status"
    assert mqtt_topic_from_routing_key("tenants.#") == "tenants/#"
    assert mqtt_topic_from_routing_key(".a..b") == "/a//b"


async def test_topic_write_is_publish_and_read_is_subscribe(rabbit: RabbitCaller) -> None:
    assert await rabbit.topic("device-1", "write", "tenants.acme.x") == "allow"
    assert await rabbit.topic("device-1", "write", "users.device-1.out") == "allow"
    assert await rabbit.topic("device-1", "write", "tenants.other.x") == "deny"
    # Subscribing: a filter is allowed only when a pattern covers it as written.
    assert await rabbit.topic("device-1", "read", "tenants.acme.*.status") == "allow"
    assert await rabbit.topic("device-1", "read", "tenants.acme.#") == "deny"
    assert await rabbit.topic("device-1", "read", "tenants.acme.x") == "deny"   # publish-only
    # A wildcard in a published routing key is not a topic name.
    assert await rabbit.topic("device-1", "write", "tenants.acme.*") == "deny"
    assert await rabbit.topic("nobody", "write", "tenants.acme.x") == "deny"
    assert await rabbit.topic("device-1", "configure", "tenants.acme.x") == "deny"


async def test_topic_fills_client_id_from_the_variable_map(rabbit: RabbitCaller) -> None:
    assert await rabbit.topic("sensor", "write", "devices.sensor-7.telemetry", client_id="sensor-7") == "allow"
    assert await rabbit.topic("sensor", "write", "devices.sensor-7.telemetry", client_id="sensor-8") == "deny"
    assert await rabbit.topic("sensor", "read", "devices.sensor-8.commands", client_id="sensor-8") == "allow"
    # A client id the user may not use, or none, never matches a %c pattern.
    assert await rabbit.topic("sensor", "write", "devices.sensor-9.telemetry", client_id="sensor-9") == "deny"
    assert await rabbit.ask("topic", username="sensor", vhost="/", resource="topic", name="amq.topic",
                            permission="write", routing_key="devices..telemetry") == "deny"


async def test_missing_parameters_are_a_bad_request(rabbit: RabbitCaller) -> None:
    status, body = await rabbit.raw("topic", username="device-1", vhost="/", resource="topic", name="amq.topic")
    assert status == 400 and "permission" in body and "routing_key" in body
    status, body = await rabbit.raw("user", password="x")
    assert status == 400 and "username" in body


async def test_refusals_stay_200_deny_even_with_deny_with_status(users: UsersFile) -> None:
    # RabbitMQ takes any other status as an error, not as a refusal.
    server = await start_auth_server(users, host="127.0.0.1", port=0, transport="http", deny_with_status=True)
    caller = RabbitCaller(server.port, "POST")
    try:
        assert await caller.user("device-1", "wrong") == "deny"
        assert await caller.topic("device-1", "write", "tenants.other.x") == "deny"
    finally:
        await caller.aclose()
        await server.stop()


async def test_stats_count_requests_per_kind_and_denials(service: RunningAuthServer) -> None:
    caller = RabbitCaller(service.port, "POST")
    try:
        await caller.user("device-1", PASSWORDS["device-1"])
        await caller.user("device-1", "wrong")
        await caller.ask("vhost", username="device-1", vhost="/", ip="127.0.0.1")
        await caller.ask("resource", username="device-1", vhost="/", resource="queue", name="q", permission="read")
        await caller.topic("device-1", "write", "tenants.acme.x")
        async with caller.session.get(f"{caller.base}/stats") as response:
            assert response.status == 200
            calls = (await response.json())["calls"]
    finally:
        await caller.aclose()
    assert calls == {RABBITMQ_USER: 2, RABBITMQ_VHOST: 1, RABBITMQ_RESOURCE: 1, RABBITMQ_TOPIC: 1,
                     RABBITMQ_DENIED: 1}
    assert service.calls == calls


async def test_passwords_stay_out_of_the_logs(rabbit: RabbitCaller, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    await rabbit.user("device-1", PASSWORDS["device-1"])
    await rabbit.user("device-1", "wrong-secret-xyz")
    await rabbit.user("nobody", "other-secret-xyz")
    await rabbit.topic("device-1", "write", "tenants.other.x")
    assert "device-1" in caplog.text and "tenants/other/x" in caplog.text   # the calls were logged
    for secret in (PASSWORDS["device-1"], quote_plus(PASSWORDS["device-1"]), "wrong-secret-xyz", "other-secret-xyz"):
        assert secret not in caplog.text


# --------------------------------------------------------------------------- a real RabbitMQ


@pytest.fixture
def rabbitmq_mqtt(tmp_path: Path) -> Iterator[tuple[int, int, dict[str, str]]]:
    """RabbitMQ's MQTT plugin whose cached HTTP backend calls `python -m gateway auth-server`.

    Yields (MQTT port, the service's port, passwords by user).
    """
    from bench import peers, rabbitmq

    passwords = {"alice": secrets.token_urlsafe(12), "eve": secrets.token_urlsafe(12)}
    users_file = tmp_path / "users.yaml"
    users_file.write_text(yaml.safe_dump({"users": [
        {"username": "alice", "password_hash": hash_password(Secret(passwords["alice"])),
         "publish": ["sensors/alice/#"], "subscribe": ["sensors/#"]},
        {"username": "eve", "password_hash": hash_password(Secret(passwords["eve"])),
         "publish": ["sensors/eve/#"], "subscribe": []},
    ]}))
    broker = rabbitmq.start_rabbitmq_mqtt_with_service(
        tmp_path, setup=False, users_file=users_file,
        credentials=peers.Credentials(username="alice", password=passwords["alice"]))
    try:
        assert broker.auth_service is not None
        yield broker.port, broker.auth_service.port, passwords
    finally:
        broker.stop()


@pytest.mark.skipif(rabbitmq_server_path() is None, reason="rabbitmq-server is not installed")
def test_rabbitmq_mqtt_logs_in_and_authorizes_through_the_service(
        rabbitmq_mqtt: tuple[int, int, dict[str, str]]) -> None:
    import json
    import urllib.request

    from tests.paho_client import PahoClient

    port, service_port, passwords = rabbitmq_mqtt
    bad = PahoClient(port, client_id="alice-bad", username="alice", password="not-" + passwords["alice"])
    try:
        assert bad.connect()[0] == 4      # bad username or password
    finally:
        bad.disconnect()
    subscriber = PahoClient(port, client_id="alice-sub", username="alice", password=passwords["alice"]).connect_ok()
    eve = PahoClient(port, client_id="eve-pub", username="eve", password=passwords["eve"]).connect_ok()
    alice = PahoClient(port, client_id="alice-pub", username="alice", password=passwords["alice"]).connect_ok()
    try:
        assert subscriber.subscribe(("sensors/#", 1)) == [1]
        # RabbitMQ 3.10 answers a denied publish by closing the connection: once closed, it was refused.
        eve.client.publish("sensors/alice/temp", b"forged", qos=1)
        assert eve.disconnected.wait(10), "RabbitMQ kept the connection of a denied publish"
        alice.publish("sensors/alice/temp", b"21.5", qos=1)
        received = subscriber.next_message()
        assert (received.topic, received.payload) == ("sensors/alice/temp", b"21.5")
        with pytest.raises(queue.Empty):
            subscriber.messages.get_nowait()
    finally:
        for client in (alice, eve, subscriber):
            client.disconnect()
    with urllib.request.urlopen(f"http://127.0.0.1:{service_port}/stats", timeout=5) as response:
        calls = json.load(response)["calls"]
    # The logins, the subscription's binding and both publishes went through the service.
    assert calls[RABBITMQ_USER] >= 4 and calls[RABBITMQ_TOPIC] >= 3 and calls[RABBITMQ_DENIED] >= 2
