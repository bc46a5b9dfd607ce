"""The Atom provider against a fake Atom (tests/fake_atom.py) on loopback.

The first tests run the whole gateway (GatewayThread: the dispatcher wraps the
provider in its caches and `gateway.resilience`) and drive it with real
clients: paho for MQTT, aiohttp for HTTP, the `polygate` command for config
errors. The fake runs on a loop of its own so blocking clients never stall it.
The last tests call the provider directly for the details of the contract.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import queue
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from auth_providers.atom import AtomProvider, bearer_token
from gateway.config_types import AtomConfig, AuthConfig, CircuitBreakerConfig, LimitsConfig
from gateway.errors import ProviderError, ProviderUnavailable
from gateway.events import Action, AuthEvent, Identity, Outcome, Protocol, Secret
from gateway.metrics import Metrics
from gateway.providers import ProviderContext
from tests.callout_doubles import ServiceThread
from tests.conftest import cli_env, loopback_config
from tests.fake_atom import AtomData, Entity, FakeAtom
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

TOKEN_ENV = "POLYGATE_TEST_ATOM_SERVICE_TOKEN"
SERVICE_TOKEN = "svc-token-5d1e9b"

ACME = "6f1c0a52-3d4b-4c7e-9a51-0d2f7e8b9c10"
GLOBEX = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"
SENSORS = "0b9e8d7c-6a5b-4c3d-8e2f-1a0b9c8d7e6f"  # acme's channel "sensors"
OTHER = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f"  # acme's channel "other"
GLOBEX_SENSORS = "2d3e4f5a-6b7c-4d8e-9f0a-1b2c3d4e5f6a"  # globex's channel "sensors"

DEVICE = Entity("e-device-0001", ACME)
WATCHER = Entity("e-watcher-0002", ACME)
GLOBEX_WATCHER = Entity("e-globex-0003", GLOBEX)
DEVICE_ID, DEVICE_SECRET, DEVICE_TOKEN = "device-1", "dev1-Secret-4c1a", "tok-device-1-77ab"
WATCHER_ID, WATCHER_SECRET = "watcher", "watch-Secret-0b2c"
GLOBEX_ID, GLOBEX_SECRET = "globex-watcher", "globex-Secret-3d4e"

CONNACK_OK, CONNACK_UNAVAILABLE, CONNACK_BAD_CREDENTIALS = 0, 3, 4
SUBACK_FAILURE = 0x80
CONTEXT_KEYS = {"protocol", "raw_topic", "topic", "route_tenant", "route_channel"}


def atom_data() -> AtomData:
    data = AtomData(service_token=SERVICE_TOKEN)
    data.add_device(DEVICE_ID, DEVICE_SECRET, DEVICE)
    data.add_device(WATCHER_ID, WATCHER_SECRET, WATCHER)
    data.add_device(GLOBEX_ID, GLOBEX_SECRET, GLOBEX_WATCHER)
    data.tokens[DEVICE_TOKEN] = DEVICE
    data.tenant_aliases.update({"acme": ACME, "globex": GLOBEX})
    data.channel_aliases.update({(ACME, "sensors"): SENSORS, (ACME, "other"): OTHER, (GLOBEX, "sensors"): GLOBEX_SENSORS})
    data.grant(DEVICE, SENSORS)
    data.grant(WATCHER, SENSORS, "subscribe")
    data.grant(WATCHER, OTHER, "subscribe")
    data.grant(GLOBEX_WATCHER, GLOBEX_SENSORS, "subscribe")
    return data


# -- harness ----------------------------------------------------------------------------------------


@dataclass
class Atom:
    data: AtomData
    server: FakeAtom
    thread: ServiceThread

    @property
    def address(self) -> str:
        return self.server.address

    def start(self) -> None:
        self.thread.run(self.server.start())

    def stop(self) -> None:
        self.thread.run(self.server.stop())

    def read(self, fn: Callable[[AtomData], Any]) -> Any:
        return self.thread.call(lambda: fn(self.data))

    def calls(self, method: str) -> int:
        return int(self.read(lambda d: d.calls[method]))

    def checks(self, action: str) -> list[Any]:
        return list(self.read(lambda d: [r.request for r in d.recorded("Check") if r.request.action == action]))


def running_atom(data: AtomData) -> Iterator[Atom]:
    """A fake Atom serving `data` on its own loop thread, for a fixture to yield and then stop."""
    thread = ServiceThread()
    service = Atom(data, FakeAtom(data), thread)
    service.start()
    try:
        yield service
    finally:
        service.stop()
        thread.close()


@pytest.fixture
def token_env(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(TOKEN_ENV, SERVICE_TOKEN)
    return TOKEN_ENV


@pytest.fixture
def atom(token_env: str) -> Iterator[Atom]:
    yield from running_atom(atom_data())


@pytest.fixture
def atom_gateway(tmp_path: Path, start_gateway: Callable[..., GatewayThread], atom: Atom) -> Callable[..., GatewayThread]:
    def start(atom_options: dict[str, Any] | None = None, **auth: Any) -> GatewayThread:
        section = {
            "provider": "atom",
            "atom": {"grpc_addr": atom.address, "insecure": True, "service_token_env": TOKEN_ENV, **(atom_options or {})},
            **auth,
        }
        return start_gateway(loopback_config(tmp_path, auth=section))

    return start


def device(gw: GatewayThread, client_id: str, identifier: str = DEVICE_ID, secret: str = DEVICE_SECRET) -> PahoClient:
    return PahoClient(gw.mqtt_port, client_id=client_id, username=identifier, password=secret).connect_ok()


def connack(gw: GatewayThread, client_id: str, identifier: str = DEVICE_ID, secret: str = DEVICE_SECRET) -> int:
    client = PahoClient(gw.mqtt_port, client_id=client_id, username=identifier, password=secret)
    try:
        return client.connect()[0]
    finally:
        client.disconnect()


def http_publish(gw: GatewayThread, topic: str, token: str, body: bytes = b"payload") -> int:
    async def go() -> int:
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{gw.http_port}/{topic}"
            async with session.post(url, data=body, headers={"Authorization": f"Bearer {token}"}) as response:
                return response.status

    return asyncio.run(go())


def ready_status(gw: GatewayThread) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/ready", timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def nothing_more(client: PahoClient, wait: float = 0.3) -> bool:
    try:
        client.messages.get(timeout=wait)
    except queue.Empty:
        return True
    return False


# -- what it must show, with real clients -----------------------------------------------------------


def test_a_device_uses_its_channel_and_no_other_channel_or_tenant(atom: Atom, atom_gateway: Callable[..., GatewayThread]) -> None:
    gw = atom_gateway()
    watcher = device(gw, "watcher", WATCHER_ID, WATCHER_SECRET)
    globex = device(gw, "globex", GLOBEX_ID, GLOBEX_SECRET)
    dev = device(gw, "dev")
    try:
        assert watcher.subscribe(("m/acme/c/sensors/#", 1), ("m/acme/c/other/#", 1)) == [1, 1]
        assert globex.subscribe(("m/globex/c/sensors/#", 1), (f"m/{GLOBEX}/c/{GLOBEX_SENSORS}/#", 1)) == [1, 1]
        # The device may not even watch another tenant: alias (resolved, no Check) or id (no call at all).
        assert dev.subscribe(("m/globex/c/sensors/#", 1), (f"m/{GLOBEX}/c/{GLOBEX_SENSORS}", 1)) == [SUBACK_FAILURE] * 2

        dev.publish("m/acme/c/other/x", b"denied: no grant", qos=1)
        dev.publish("m/globex/c/sensors/x", b"denied: another tenant", qos=1)
        dev.publish(f"m/{GLOBEX}/c/{GLOBEX_SENSORS}/x", b"denied: another tenant", qos=1)
        dev.publish("m/acme/c/sensors/temp", b"21.5", qos=1)
        message = watcher.next_message(timeout=5)
        assert (message.topic, message.payload) == ("m/acme/c/sensors/temp", b"21.5")
        assert nothing_more(watcher) and nothing_more(globex)

        checks = atom.read(lambda d: [r.request for r in d.recorded("Check")])
        assert {c.object_id for c in checks if c.subject_id == DEVICE.entity_id} == {SENSORS, OTHER}
        aliases = atom.read(lambda d: [r.request for r in d.recorded("ResolveAlias")])
        # Cross-tenant by id: no call at all; by alias: only the lookup.
        assert not [a for a in aliases if a.tenant_id == GLOBEX]
        assert {(a.tenant_alias, a.object_alias) for a in aliases} == {("acme", "sensors"), ("acme", "other"), ("globex", "sensors")}
        assert all(a.object_kind == "resource" for a in aliases)
        assert connack(gw, "bad", DEVICE_ID, "wrong") == CONNACK_BAD_CREDENTIALS
    finally:
        for client in (watcher, globex, dev):
            client.disconnect()


@pytest.mark.parametrize("policy", ["deny", "allow"])
def test_wildcards_are_denied_and_unsupported_topics_follow_the_policy(
    policy: str, atom: Atom, atom_gateway: Callable[..., GatewayThread]
) -> None:
    gw = atom_gateway({"unsupported_topic_policy": policy})
    sub = device(gw, "sub")
    pub = device(gw, "pub")
    try:
        codes = sub.subscribe(("m/+/c/x", 1), ("m/acme/c/#", 1), ("#", 1), ("m/acme/+/sensors", 1), ("plain/topic", 1))
        allowed = policy == "allow"
        assert codes == [SUBACK_FAILURE] * 4 + [1 if allowed else SUBACK_FAILURE]
        assert sub.subscribe(("m/acme/c/sensors", 1)) == [1]
        pub.publish("plain/topic", b"outside the format", qos=1)
        pub.publish("m/acme/c/sensors", b"marker", qos=1)
        topics = [m.topic for m in sub.expect(2 if allowed else 1, timeout=5)]
        assert topics == (["plain/topic", "m/acme/c/sensors"] if allowed else ["m/acme/c/sensors"])
        denied_publishes = gw.call(
            lambda: gw.gateway.metrics.auth_decisions[(Protocol.MQTT, Action.PUBLISH, Outcome.DENY)]  # type: ignore[union-attr]
        )
        assert denied_publishes == (0 if allowed else 1)
        # Wildcards and unsupported topics never reach Atom: only the channel's lookup and Checks did.
        checks = atom.read(lambda d: [r.request for r in d.recorded("Check")])
        assert [c.object_id for c in checks] == [SENSORS, SENSORS]  # the marker's subscribe and publish
        assert atom.calls("ResolveAlias") == 1
    finally:
        sub.disconnect()
        pub.disconnect()


def test_check_requests_carry_the_contract_and_every_call_the_service_token(
    atom: Atom, atom_gateway: Callable[..., GatewayThread]
) -> None:
    gw = atom_gateway()
    sub = device(gw, "sub")
    try:
        assert sub.subscribe(("m/acme/c/sensors/+/temp", 1)) == [1]
        assert http_publish(gw, "m/acme/c/sensors/room1/temp", DEVICE_TOKEN, b"22") == 202
        message = sub.next_message(timeout=5)
        assert (message.topic, message.payload) == ("m/acme/c/sensors/room1/temp", b"22")
        assert http_publish(gw, "m/acme/c/other/x", DEVICE_TOKEN) == 403
        assert http_publish(gw, "m/acme/c/sensors/x", "not-a-token") == 401
    finally:
        sub.disconnect()

    (subscribe,) = atom.checks("subscribe")
    assert (subscribe.subject_id, subscribe.object_kind, subscribe.object_id, subscribe.resource_id) == (
        DEVICE.entity_id, "resource", SENSORS, "",
    )
    assert dict(subscribe.context) == {
        "protocol": "mqtt", "raw_topic": "m/acme/c/sensors/+/temp", "topic": "m/acme/c/sensors/+/temp",
        "route_tenant": "acme", "route_channel": "sensors", "filter": "+/temp",
    }
    publishes = atom.checks("publish")
    assert [c.object_id for c in publishes] == [SENSORS, OTHER]
    assert dict(publishes[0].context) == {
        "protocol": "http", "raw_topic": "m/acme/c/sensors/room1/temp", "topic": "m/acme/c/sensors/room1/temp",
        "route_tenant": "acme", "route_channel": "sensors", "subtopic": "room1/temp",
    }
    assert all(set(c.context) == CONTEXT_KEYS | {"subtopic"} for c in publishes)
    (token_call, *_) = atom.read(lambda d: [r.request for r in d.recorded("Authenticate")])
    assert token_call.token == DEVICE_TOKEN
    (credential,) = atom.read(lambda d: [r.request for r in d.recorded("AuthenticateCredential")])
    assert (credential.identifier, credential.secret, credential.kind) == (DEVICE_ID, DEVICE_SECRET, "password")
    metadata = atom.read(lambda d: [r.metadata.get("authorization") for r in d.requests])
    assert len(metadata) >= 6 and set(metadata) == {f"Bearer {SERVICE_TOKEN}"}


@pytest.mark.parametrize(("decision_cache_ttl", "checks"), [("0s", 100), ("60s", 1)])
def test_one_alias_lookup_and_checks_as_the_decision_cache_says(
    decision_cache_ttl: str, checks: int, atom: Atom, atom_gateway: Callable[..., GatewayThread]
) -> None:
    gw = atom_gateway({"decision_cache_ttl": decision_cache_ttl, "alias_cache_ttl": "5m"})
    sub = device(gw, "sub")
    pub = device(gw, "pub")
    try:
        assert sub.subscribe(("m/acme/c/sensors/temp", 1)) == [1]
        for n in range(100):
            pub.publish("m/acme/c/sensors/temp", str(n).encode(), qos=1)
        assert [m.payload for m in sub.expect(100, timeout=10)] == [str(n).encode() for n in range(100)]
        assert atom.calls("ResolveAlias") == 1
        assert len(atom.checks("publish")) == checks
    finally:
        sub.disconnect()
        pub.disconnect()


def test_a_missing_service_token_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    path = tmp_path / "atom.yaml"
    path.write_text(
        "server:\n  tcp:\n    plain: {addr: \"127.0.0.1:0\"}\n  health_addr: \"\"\n"
        f"auth:\n  provider: atom\n  atom:\n    grpc_addr: \"127.0.0.1:9\"\n    service_token_env: {TOKEN_ENV}\n"
    )
    for args in (["check-config", str(path)], ["run", "--config", str(path)]):
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60, env=cli_env()
        )
        assert result.returncode == 2, (args, result.stderr)
        assert "auth.atom.service_token_env" in result.stderr and TOKEN_ENV in result.stderr


def test_the_shipped_example_config_is_valid(token_env: str) -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "atom.yaml"
    env = {**cli_env(), "POLYGATE_ATOM_SERVICE_TOKEN": SERVICE_TOKEN}
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(example)], capture_output=True, text=True, timeout=60, env=env
    )
    assert result.returncode == 0, result.stderr


RESILIENCE = {"timeout": "500ms", "retries": 1, "circuit_breaker": {"failures": 2, "open_for": "500ms", "half_open_requests": 1}}


def test_atom_down_fails_closed_and_atom_back_recovers(atom: Atom, atom_gateway: Callable[..., GatewayThread]) -> None:
    atom.stop()  # the gateway starts while Atom is down
    gw = atom_gateway(**RESILIENCE)
    assert ready_status(gw) == 503
    assert connack(gw, "early") == CONNACK_UNAVAILABLE
    assert http_publish(gw, "m/acme/c/sensors/t", DEVICE_TOKEN) == 503

    atom.start()
    attempt = iter(range(1000))
    assert poll(lambda: connack(gw, f"up-{next(attempt)}") == CONNACK_OK, 5.0)
    assert poll(lambda: ready_status(gw) == 200, 5.0)
    sub = device(gw, "sub")
    pub = device(gw, "pub")
    try:
        assert sub.subscribe(("m/acme/c/sensors/#", 1)) == [1]
        pub.publish("m/acme/c/sensors/a", b"1", qos=1)
        assert sub.next_message(timeout=5).topic == "m/acme/c/sensors/a"

        atom.stop()
        # decision_cache_ttl is 0s: this publish needs Atom, which is gone, so it is dropped.
        # (QoS 0: an unanswerable QoS 1 publish closes the connection, the client keeping the message.)
        pub.publish("m/acme/c/sensors/lost", b"never", qos=0)
        for n in range(3):
            assert connack(gw, f"down-{n}") == CONNACK_UNAVAILABLE
        assert http_publish(gw, "m/acme/c/sensors/t", DEVICE_TOKEN) == 503
        assert ready_status(gw) == 503

        atom.start()
        assert poll(lambda: connack(gw, f"back-{next(attempt)}") == CONNACK_OK, 5.0)
        pub.publish("m/acme/c/sensors/back", b"2", qos=1)
        assert sub.next_message(timeout=5).topic == "m/acme/c/sensors/back"  # "lost" never came
        assert poll(lambda: ready_status(gw) == 200, 5.0)
    finally:
        sub.disconnect()
        pub.disconnect()


# -- the provider on its own ------------------------------------------------------------------------


def make_provider(address: str, *, timeout: float = 1.0, metrics: Metrics | None = None, **atom: Any) -> AtomProvider:
    auth = AuthConfig(
        provider="atom",
        timeout=timeout,
        circuit_breaker=CircuitBreakerConfig(open_for=1.0),
        atom=AtomConfig(grpc_addr=address, service_token_env=TOKEN_ENV, **atom),
    )
    return AtomProvider(ProviderContext(auth=auth, limits=LimitsConfig(), metrics=metrics))


def connect(protocol: Protocol = Protocol.MQTT, username: str = DEVICE_ID, secret: str | bytes = DEVICE_SECRET) -> AuthEvent:
    return AuthEvent(protocol=protocol, action=Action.CONNECT, client_id="c1", username=username, secret=Secret(secret))


def operation(topic: str, action: Action = Action.PUBLISH, protocol: Protocol = Protocol.MQTT) -> AuthEvent:
    return AuthEvent(protocol=protocol, action=action, client_id="c1", username=DEVICE_ID, topic=topic)


ME = Identity(external_id=DEVICE.entity_id, tenant=ACME, username=DEVICE_ID)


@pytest.fixture
async def local_atom(token_env: str) -> Any:
    server = await FakeAtom(atom_data()).start()
    yield server
    await server.stop()


async def test_credentials_tokens_and_empty_values(local_atom: FakeAtom) -> None:
    data = local_atom.data
    data.tokens["no-entity"] = Entity("", ACME)
    p = make_provider(local_atom.address)
    await p.start()
    try:
        allowed = await p.authenticate(connect())
        assert allowed.outcome is Outcome.ALLOW
        assert allowed.identity == Identity(external_id=DEVICE.entity_id, tenant=ACME, username=DEVICE_ID)
        for protocol in (Protocol.HTTP, Protocol.COAP, Protocol.AMQP, Protocol.AMQP091):
            for value in (DEVICE_TOKEN, f"Bearer {DEVICE_TOKEN}", f"bearer  {DEVICE_TOKEN} "):
                decision = await p.authenticate(connect(protocol, "anyone", value))
                assert decision.outcome is Outcome.ALLOW and decision.identity is not None
                assert decision.identity.external_id == DEVICE.entity_id
        assert {r.request.token for r in data.recorded("Authenticate")} == {DEVICE_TOKEN}
        data.reset()
        for event in (connect(username=""), connect(secret=""), connect(Protocol.HTTP, secret="Bearer "),
                      connect(secret=b"\xff\xfe"), connect(Protocol.HTTP, secret="")):
            assert (await p.authenticate(event)).outcome is Outcome.DENY
        assert not data.requests  # empty identifier, secret or token: denied without a call
        assert (await p.authenticate(connect(Protocol.HTTP, secret="no-entity"))).outcome is Outcome.DENY
        assert (await p.authenticate(connect(secret="wrong"))).outcome is Outcome.DENY
    finally:
        await p.aclose()


async def test_outcomes_of_each_status(local_atom: FakeAtom) -> None:
    data = local_atom.data
    p = make_provider(local_atom.address)
    await p.start()
    try:
        for status in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT):
            data.fail_with = status
            assert (await p.authenticate(connect())).outcome is Outcome.DENY
            assert (await p.authorize(operation(f"m/{ACME}/c/{SENSORS}"), ME)).outcome is Outcome.DENY
        for status, retryable in ((grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.DEADLINE_EXCEEDED, True),
                                  (grpc.StatusCode.INTERNAL, False), (grpc.StatusCode.NOT_FOUND, False),
                                  (grpc.StatusCode.UNIMPLEMENTED, False)):
            data.fail_with = status
            with pytest.raises(ProviderUnavailable, match=status.name) as info:
                await p.authenticate(connect())
            assert info.value.retryable is retryable
            with pytest.raises(ProviderUnavailable):
                await p.authorize(operation(f"m/{ACME}/c/{SENSORS}"), ME)
        data.fail_with = None
        # NOT_FOUND from ResolveAlias is a denial (an unknown alias), and is not cached.
        assert (await p.authorize(operation("m/acme/c/nosuch"), ME)).outcome is Outcome.DENY
        assert (await p.authorize(operation("m/acme/c/nosuch"), ME)).outcome is Outcome.DENY
        assert data.calls["ResolveAlias"] == 2
        data.delay = 0.5
        impatient = make_provider(local_atom.address, timeout=0.1)
        await impatient.start()
        try:
            with pytest.raises(ProviderUnavailable, match="DEADLINE_EXCEEDED") as info:
                await impatient.authorize(operation(f"m/{ACME}/c/{SENSORS}"), ME)
            assert info.value.retryable
        finally:
            await impatient.aclose()
    finally:
        await p.aclose()


async def test_routes_without_calls_and_the_alias_cache(local_atom: FakeAtom) -> None:
    data = local_atom.data
    p = make_provider(local_atom.address, alias_cache_ttl=60.0)
    await p.start()
    try:
        for topic in (f"m/acme/c/{SENSORS}", f"m/{GLOBEX}/c/sensors", f"m/{GLOBEX}/c/{GLOBEX_SENSORS}", "m/+/c/x", "x/y"):
            decision = await p.authorize(operation(topic, Action.SUBSCRIBE if "+" in topic else Action.PUBLISH), ME)
            assert decision.outcome is Outcome.DENY, topic
        assert not data.requests
        no_tenant = Identity(external_id=DEVICE.entity_id, tenant="", username=DEVICE_ID)
        assert (await p.authorize(operation(f"m/{ACME}/c/{SENSORS}"), no_tenant)).outcome is Outcome.DENY
        assert not data.requests
        # Uppercase ids are the same ids.
        assert (await p.authorize(operation(f"m/{ACME.upper()}/c/{SENSORS.upper()}"), ME)).outcome is Outcome.ALLOW
        assert data.recorded("Check")[-1].request.object_id == SENSORS

        data.reset()
        data.delay = 0.2
        results = await asyncio.gather(*(p.authorize(operation("m/acme/c/Sensors/t"), ME) for _ in range(20)))
        assert all(r.outcome is Outcome.ALLOW for r in results)
        assert data.calls["ResolveAlias"] == 1  # concurrent identical lookups share one call
        assert data.recorded("ResolveAlias")[0].request.object_alias == "sensors"
        assert (await p.authorize(operation(f"m/{ACME}/c/sensors/u"), ME)).outcome is Outcome.ALLOW
        assert data.calls["ResolveAlias"] == 2  # a tenant id and a tenant alias are distinct lookups
        assert data.recorded("ResolveAlias")[-1].request.tenant_id == ACME
    finally:
        await p.aclose()


async def test_ready_start_while_down_and_missing_token(unused_tcp_port: int, token_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    p = make_provider(f"127.0.0.1:{unused_tcp_port}", timeout=0.5)
    assert not p.ready()
    await p.start()
    try:
        assert not p.ready()
        with pytest.raises(ProviderUnavailable) as info:
            await p.authenticate(connect())
        assert info.value.retryable
        assert not p.ready()
        server = FakeAtom(atom_data())
        server.port = unused_tcp_port
        await server.start()
        try:
            # The channel reconnects within its backoff (at most open_for / 2).
            deadline = time.monotonic() + 5.0
            while True:
                try:
                    decision = await p.authenticate(connect())
                    break
                except ProviderUnavailable:
                    assert time.monotonic() < deadline, "no answer after Atom came up"
                    await asyncio.sleep(0.05)
            assert decision.outcome is Outcome.ALLOW
            assert p.ready()
        finally:
            await server.stop()
    finally:
        await p.aclose()
    monkeypatch.delenv(TOKEN_ENV)
    with pytest.raises(ProviderError, match="auth.atom.service_token_env"):
        make_provider("127.0.0.1:1")


async def test_tls_to_atom(tmp_path: Path, token_env: str) -> None:
    cert, key = _self_signed(tmp_path)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    server = await FakeAtom(atom_data(), credentials=credentials).start()
    trusted = make_provider(server.address, insecure=False, ca_file=str(cert))
    untrusted = make_provider(server.address, insecure=False)  # system CAs do not know the test certificate
    plaintext = make_provider(server.address)
    try:
        for p in (trusted, untrusted, plaintext):
            await p.start()
        assert (await trusted.authenticate(connect())).outcome is Outcome.ALLOW
        for p in (untrusted, plaintext):
            with pytest.raises(ProviderUnavailable):
                await p.authenticate(connect())
    finally:
        for p in (trusted, untrusted, plaintext):
            await p.aclose()
        await server.stop()


async def test_metrics_and_secrets(local_atom: FakeAtom) -> None:
    metrics = Metrics()
    p = make_provider(local_atom.address, metrics=metrics)
    await p.start()
    try:
        await p.authenticate(connect(secret="wrong-Secret-value"))
        await p.authorize(operation("m/acme/c/sensors"), ME)
        text = metrics.render().decode()
        assert 'polygate_atom_calls_total{method="AuthenticateCredential",outcome="deny"} 1.0' in text
        assert 'polygate_atom_calls_total{method="Check",outcome="allow"} 1.0' in text
        assert "polygate_atom_alias_cache_size 1.0" in text
        assert SERVICE_TOKEN not in repr(vars(p))  # the token sits in a redacting Secret
    finally:
        await p.aclose()


def test_bearer_token() -> None:
    assert bearer_token(Secret("Bearer abc")) == "abc"
    assert bearer_token(Secret("BEARER abc ")) == "abc"
    assert bearer_token(Secret("abc")) == "abc"
    assert bearer_token(Secret("Bearerabc")) == "Bearerabc"
    assert bearer_token(Secret(b"\xff")) == ""


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake-atom")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "atom.pem", directory / "atom_key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
