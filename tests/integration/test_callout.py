"""The callout provider against real auth services on loopback (tests/callout_doubles.py).

Most tests run the whole gateway (GatewayThread: the dispatcher wraps the
provider in its caches and `gateway.resilience`) and drive it with real
clients: paho for MQTT, aiohttp for HTTP, raw sockets for connection storms.
The doubles run on a loop of their own (`ServiceThread`) so blocking clients
never stall them. The last tests call the provider directly for the details of
the wire contract.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from auth_providers.callout import CalloutProvider, Durations, scrub
from auth_providers.callout_grpc import GrpcTransport, channel_options, grpc_target
from auth_providers.callout_http import cache_ttl
from gateway.coalescing import WAITING_PER_SLOT
from gateway.config_types import AuthConfig, CircuitBreakerConfig, LimitsConfig, TLSClientConfig
from gateway.errors import ProviderUnavailable
from gateway.events import Action, AuthEvent, Decision, Identity, Outcome, Protocol, Secret
from gateway.metrics import Metrics
from gateway.providers import ProviderContext
from tests.callout_doubles import (
    BROKER,
    FLUXMQ,
    AuthServiceLogic,
    GrpcAuthService,
    HttpAuthService,
    ServiceThread,
)
from tests.conftest import loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

ALICE_PW = "alice-Pa55word-7f3a"
BOB_PW = "bob-Pa55word-91c2"
USERS = {"alice": ALICE_PW, "bob": BOB_PW}
CONNACK_OK, CONNACK_UNAVAILABLE, CONNACK_BAD_CREDENTIALS, CONNACK_NOT_AUTHORIZED = 0, 3, 4, 5
SUBACK_FAILURE = 0x80
KINDS = ["grpc-broker", "grpc-fluxmq", "http"]


# -- harness ----------------------------------------------------------------------------------------


@dataclass
class Service:
    """A running auth service double, how the gateway reaches it, and how to stop/start it."""

    kind: str
    logic: AuthServiceLogic
    server: GrpcAuthService | HttpAuthService
    thread: ServiceThread

    @property
    def transport(self) -> str:
        return "http" if self.kind == "http" else "grpc"

    @property
    def url(self) -> str:
        if isinstance(self.server, HttpAuthService):
            return self.server.url
        return self.server.address

    def stop(self) -> None:
        self.thread.run(self.server.stop())

    def start(self) -> None:
        self.thread.run(self.server.start())

    def calls(self, method: str) -> int:
        return self.thread.call(lambda: self.logic.calls[method])


@pytest.fixture
def service_thread() -> Iterator[ServiceThread]:
    thread = ServiceThread()
    yield thread
    thread.close()


@pytest.fixture
def make_service(service_thread: ServiceThread) -> Iterator[Callable[[str], Service]]:
    started: list[Service] = []

    def make(kind: str) -> Service:
        logic = AuthServiceLogic(USERS)
        server: GrpcAuthService | HttpAuthService
        if kind == "http":
            server = HttpAuthService(logic, prefix="/polygate")
        else:
            server = GrpcAuthService(logic, (FLUXMQ,) if kind == "grpc-fluxmq" else (BROKER,))
        service = Service(kind, logic, server, service_thread)
        service.start()
        started.append(service)
        return service

    yield make
    for service in started:
        service.stop()


@pytest.fixture
def callout_gateway(
    tmp_path: Path, start_gateway: Callable[..., GatewayThread]
) -> Callable[..., GatewayThread]:
    def start(service: Service, **auth: Any) -> GatewayThread:
        section = {"provider": "callout", "url": service.url, "transport": service.transport, **auth}
        return start_gateway(loopback_config(tmp_path, auth=section))

    return start


def connack(gw: GatewayThread, username: str | None, password: str | None, client_id: str) -> int:
    client = PahoClient(gw.mqtt_port, client_id=client_id, username=username, password=password)
    try:
        code, _ = client.connect()
        return code
    finally:
        client.disconnect()


def connected(gw: GatewayThread, username: str, password: str, client_id: str) -> PahoClient:
    return PahoClient(gw.mqtt_port, client_id=client_id, username=username, password=password).connect_ok()


def http(
    gw: GatewayThread, method: str, path: str, *, user: tuple[str, str] | None = None, data: bytes = b"", client_id: str = ""
) -> int:
    """Status of one HTTP request to the gateway, made with aiohttp on a loop of its own."""

    async def go() -> int:
        headers = {"X-Client-ID": client_id} if client_id else {}
        auth = aiohttp.BasicAuth(*user) if user else None
        async with aiohttp.ClientSession() as session:
            url = f"http://127.0.0.1:{gw.http_port}{path}"
            async with session.request(method, url, data=data, auth=auth, headers=headers) as response:
                return response.status

    return asyncio.run(go())


def scrape(gw: GatewayThread, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def poll(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def dropped(gw: GatewayThread, reason: str) -> int:
    return gw.call(lambda: gw.gateway.metrics.messages_dropped[(Protocol.MQTT, reason)])  # type: ignore[union-attr]


def expect_next(client: PahoClient, topic: str) -> None:
    """The next message the client receives is on `topic`: nothing else came before it."""
    assert client.next_message(timeout=5).topic == topic


# -- allowed and denied, on every transport and both package names ----------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_connect_publish_and_subscribe_are_decided_by_the_service(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    gw = callout_gateway(service)

    assert connack(gw, "alice", "wrong-password-x", "a-bad") == CONNACK_BAD_CREDENTIALS
    assert connack(gw, "mallory", "whatever-pw", "m-1") == CONNACK_BAD_CREDENTIALS
    alice = connected(gw, "alice", ALICE_PW, "alice-1")
    try:
        assert alice.subscribe(("alice/#", 1), ("bob/#", 1)) == [1, SUBACK_FAILURE]
        alice.publish("bob/x", b"denied", qos=1)
        alice.publish("alice/x", b"allowed", qos=1)
        expect_next(alice, "alice/x")

        assert http(gw, "POST", "/alice/h", user=("alice", ALICE_PW), data=b"1", client_id="web-1") == 202
        expect_next(alice, "alice/h")
        assert http(gw, "POST", "/alice/h", user=("alice", "not-her-password")) == 401
        assert http(gw, "POST", "/bob/h", user=("alice", ALICE_PW), data=b"2") == 403
        assert http(gw, "GET", "/subscribe?topic=bob/%23", user=("alice", ALICE_PW)) == 403
    finally:
        alice.disconnect()

    status, metrics = scrape(gw)
    assert status == 200
    labels = f'method="authenticate",outcome="deny",transport="{service.transport}"'
    assert f"polygate_callouts_total{{{labels}}} 3.0" in metrics  # two MQTT connects and one HTTP request
    assert f'polygate_callout_duration_seconds_count{{method="authorize",transport="{service.transport}"}}' in metrics
    assert 'polygate_circuit_breaker_state{provider="callout"} 0.0' in metrics

    requests = service.thread.call(lambda: list(service.logic.requests))
    mqtt_connect = next(r for r in requests if r.fields.get("client_id") == "alice-1")
    assert mqtt_connect.fields == {"client_id": "alice-1", "username": "alice", "password": ALICE_PW, "protocol": "mqtt"}
    web = next(r for r in requests if r.fields.get("client_id") == "web-1")
    assert web.fields["protocol"] == "http"
    authz = {(r.fields["external_id"], r.fields["topic"], r.fields["action"]) for r in requests if r.method == "authorize"}
    assert {
        ("ext:alice", "alice/#", "subscribe"),
        ("ext:alice", "bob/#", "subscribe"),
        ("ext:alice", "alice/x", "publish"),
        ("ext:alice", "bob/x", "publish"),
        ("ext:alice", "bob/h", "publish"),
    } <= authz
    if kind == "grpc-fluxmq":
        paths = service.thread.call(lambda: dict(service.server.paths))  # type: ignore[union-attr]
        # One UNIMPLEMENTED from broker.auth.v1, then fluxmq.auth.v1 for everything.
        assert sum(n for p, n in paths.items() if p.startswith("/broker.")) == 1
        assert paths["/fluxmq.auth.v1.AuthService/Authenticate"] >= 4
    else:
        assert {r.transport for r in requests} == {"http" if kind == "http" else f"grpc:{BROKER}"}


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_statuses_map_to_denials_or_unavailable(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    logic = service.logic
    gw = callout_gateway(service, circuit_breaker={"failures": 100})

    def set_(**values: Any) -> None:
        def apply() -> None:
            for key, value in values.items():
                setattr(logic, key, value)
            logic.reset_counts()

        service.thread.call(apply)

    # A wrong password answered by status is "bad credentials", not "unavailable".
    set_(deny_with_status=True)
    assert connack(gw, "alice", "wrong-password-1", "s-1") == CONNACK_BAD_CREDENTIALS
    assert http(gw, "POST", "/alice/x", user=("alice", "wrong-password-2")) == 401
    set_(deny_with_status=False)

    if kind == "http":
        denials, retried, fatal = [401, 403], [502, 503, 504], [500, 404, 204]
    else:
        denials = [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.INVALID_ARGUMENT]
        retried = [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED]
        # (UNIMPLEMENTED is the signal to fall back to fluxmq.auth.v1: see the fluxmq tests.)
        fatal = [grpc.StatusCode.INTERNAL, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNKNOWN]
    for n, status in enumerate(denials):
        set_(fail_with=status)
        assert connack(gw, "alice", ALICE_PW, f"d-{n}") == CONNACK_BAD_CREDENTIALS, status
        assert service.calls("authenticate") == 1, status
    for n, status in enumerate(retried):
        set_(fail_with=status)
        assert connack(gw, "alice", ALICE_PW, f"r-{n}") == CONNACK_UNAVAILABLE, status
        assert service.calls("authenticate") == 2, status  # retries: 1
    for n, status in enumerate(fatal):
        set_(fail_with=status)
        assert connack(gw, "alice", ALICE_PW, f"f-{n}") == CONNACK_UNAVAILABLE, status
        assert service.calls("authenticate") == 1, status
    set_(fail_with=500)
    assert http(gw, "POST", "/alice/x", user=("alice", ALICE_PW), client_id="h-500") == 503
    if kind == "http":
        set_(fail_with=None, raw_body=b"{not json")
        assert connack(gw, "alice", ALICE_PW, "garbage") == CONNACK_UNAVAILABLE
        set_(raw_body=b'{"authenticated": "yes"}')
        assert connack(gw, "alice", ALICE_PW, "wrong-type") == CONNACK_UNAVAILABLE
    set_(fail_with=None, raw_body=None)
    assert connack(gw, "alice", ALICE_PW, "fine") == CONNACK_OK


def test_an_empty_provider_with_a_url_is_the_callout_and_unchecked_protocols_pass(
    make_service: Callable[[str], Service], tmp_path: Path, start_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service("grpc-broker")
    auth = {"provider": "", "url": service.url, "protocols": {"http": False}}
    gw = start_gateway(loopback_config(tmp_path, auth=auth))
    assert http(gw, "POST", "/anything/at/all", data=b"x") == 202
    assert service.calls("authenticate") == 0 and service.calls("authorize") == 0
    assert connack(gw, None, None, "anonymous") == CONNACK_NOT_AUTHORIZED
    assert connack(gw, "alice", "wrong-password-3", "m-1") == CONNACK_BAD_CREDENTIALS
    assert connack(gw, "alice", ALICE_PW, "m-2") == CONNACK_OK
    assert service.calls("authenticate") == 3


# -- calls counted at the service --------------------------------------------------------------------


def _connect_packet(client_id: str, username: str, password: str) -> bytes:
    def string(value: str) -> bytes:
        raw = value.encode()
        return len(raw).to_bytes(2, "big") + raw

    body = string("MQTT") + bytes([4, 0xC2]) + (60).to_bytes(2, "big")
    body += string(client_id) + string(username) + string(password)
    length, encoded = len(body), b""
    while True:
        byte, length = length % 128, length // 128
        encoded += bytes([byte | (0x80 if length else 0)])
        if not length:
            break
    return b"\x10" + encoded + body


async def _connect_storm(port: int, count: int, client_id: str) -> list[int | None]:
    """Raw-socket CONNECTs, all at once; the CONNACK code of each (None: closed first, taken over)."""
    packet = _connect_packet(client_id, "alice", ALICE_PW)

    async def one() -> int | None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(packet)
            try:
                answer = await asyncio.wait_for(reader.readexactly(4), 10)
            except asyncio.IncompleteReadError:
                return None
            assert answer[0] == 0x20
            return answer[3]
        finally:
            writer.close()

    return await asyncio.gather(*(one() for _ in range(count)))


def test_two_hundred_concurrent_connects_make_one_call(
    make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service("grpc-broker")
    service.logic.delay = 0.2  # the storm arrives while the first call is in flight
    gw = callout_gateway(service)
    codes = asyncio.run(_connect_storm(gw.mqtt_port, 200, "same-client"))
    assert CONNACK_OK in codes and set(codes) <= {CONNACK_OK, None}
    assert service.calls("authenticate") == 1


def test_ten_thousand_publishes_make_one_authorize_call(
    make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service("grpc-broker")
    gw = callout_gateway(service, decision_cache_ttl="60s")
    publisher = connected(gw, "alice", ALICE_PW, "pub")
    try:
        for n in range(10_000):
            publisher.client.publish("alice/t", b"%d" % n, 0)
        publisher.publish("alice/t", b"marker", qos=1, timeout=20)  # acknowledged after every earlier publish
        assert gw.call(lambda: gw.gateway.metrics.messages_in[Protocol.MQTT]) == 10_001  # type: ignore[union-attr]
        assert service.calls("authorize") == 1
    finally:
        publisher.disconnect()


def test_with_every_ttl_zero_every_operation_calls_out(
    make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service("grpc-broker")
    gw = callout_gateway(service, authn_cache_ttl="0s", decision_cache_ttl="0s", negative_cache_ttl="0s")
    for _ in range(3):
        assert connack(gw, "alice", ALICE_PW, "same") == CONNACK_OK
    for _ in range(2):
        assert connack(gw, "alice", "wrong-password-4", "same") == CONNACK_BAD_CREDENTIALS
    assert service.calls("authenticate") == 5
    client = connected(gw, "alice", ALICE_PW, "same")
    try:
        for _ in range(4):
            client.publish("alice/t", b"x", qos=1)
        for _ in range(2):
            assert client.subscribe(("alice/t", 0)) == [0]
        for _ in range(2):
            client.publish("bob/t", b"x", qos=1)
    finally:
        client.disconnect()
    assert service.calls("authorize") == 8
    for _ in range(2):
        assert http(gw, "POST", "/alice/t", user=("alice", ALICE_PW), client_id="web") == 202
    assert service.calls("authenticate") == 8 and service.calls("authorize") == 10


def test_max_age_zero_from_the_http_service_disables_caching_of_that_answer(
    make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service("http")
    service.logic.cache_control = "max-age=0"
    gw = callout_gateway(service, authn_cache_ttl="60s", decision_cache_ttl="60s")
    for _ in range(3):
        assert http(gw, "POST", "/alice/t", user=("alice", ALICE_PW), client_id="web") == 202
    assert service.calls("authenticate") == 3 and service.calls("authorize") == 3

    service.thread.call(lambda: setattr(service.logic, "cache_control", "max-age=60"))
    for _ in range(3):
        assert http(gw, "POST", "/alice/u", user=("alice", ALICE_PW), client_id="web") == 202
    assert service.calls("authenticate") == 4 and service.calls("authorize") == 4


# -- an unreachable, failing or slow service ---------------------------------------------------------

RESILIENCE = {"timeout": "500ms", "retries": 1, "circuit_breaker": {"failures": 3, "open_for": "1s", "half_open_requests": 1}}


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_the_service_going_away_and_coming_back(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    gw = callout_gateway(service, **RESILIENCE)
    subscriber = connected(gw, "alice", ALICE_PW, "sub")
    publisher = connected(gw, "alice", ALICE_PW, "pub")
    try:
        assert subscriber.subscribe(("alice/#", 1)) == [1]
        service.stop()

        started = time.monotonic()
        assert connack(gw, "alice", ALICE_PW, "while-down-0") == CONNACK_UNAVAILABLE
        # timeout x (retries + 1) + the longest backoff, and some slack for the clients.
        assert time.monotonic() - started < 0.5 * 2 + 0.1 + 1.0
        publisher.publish("alice/lost", b"never", qos=0)
        # Its check must be over before the service returns (a retry could otherwise reach it).
        assert poll(lambda: dropped(gw, "auth_unavailable") == 1, 3.0)
        for n in range(1, 3):
            assert connack(gw, "alice", ALICE_PW, f"while-down-{n}") == CONNACK_UNAVAILABLE
        status, metrics = scrape(gw)
        assert status == 200
        assert 'polygate_circuit_breaker_state{provider="callout"} 2.0' in metrics
        assert scrape(gw, "/ready")[0] == 503
        started = time.monotonic()
        assert connack(gw, "alice", ALICE_PW, "while-open") == CONNACK_UNAVAILABLE
        assert time.monotonic() - started < 0.4  # answered by the open circuit, without waiting

        service.start()
        back = time.monotonic()
        attempt = iter(range(1000))
        assert poll(lambda: connack(gw, "alice", ALICE_PW, f"after-{next(attempt)}") == CONNACK_OK, 5.0, 0.05)
        # Within one breaker interval, plus a reconnect backoff and the clients' own time.
        assert time.monotonic() - back < 1.0 + 1.0
        publisher.publish("alice/back", b"again", qos=1)
        expect_next(subscriber, "alice/back")
        assert scrape(gw, "/ready")[0] == 200
    finally:
        subscriber.disconnect()
        publisher.disconnect()


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_a_slow_service_is_unavailable_and_leaves_no_connection_behind(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    gw = callout_gateway(service, timeout="300ms", retries=1)
    publisher = connected(gw, "alice", ALICE_PW, "pub")
    service.thread.call(lambda: setattr(service.logic, "delay", 5.0))
    try:
        started = time.monotonic()
        assert connack(gw, "alice", ALICE_PW, "slow") == CONNACK_UNAVAILABLE
        assert time.monotonic() - started < 0.3 * 2 + 0.1 + 1.0
        # A QoS 1 publish whose check times out is not acknowledged: the gateway
        # closes the connection so the client resends once auth answers again.
        publisher.client.publish("alice/slow", b"x", 1)
        assert publisher.disconnected.wait(3.0)
    finally:
        publisher.disconnect()
    assert poll(lambda: gw.call(lambda: gw.gateway.metrics.connections_open[Protocol.MQTT]) == 0, 3.0)  # type: ignore[union-attr]
    assert service.calls("authenticate") == 3  # two connects, the second one retried once


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_a_miss_storm_never_holds_more_than_max_inflight_calls(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    service.logic.delay = 0.05
    gw = callout_gateway(service, max_inflight=25)

    async def storm() -> list[Decision]:
        assert gw.gateway is not None
        dispatcher = gw.gateway.dispatcher
        events = [
            AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id=f"c{n}", username="alice", secret=Secret(ALICE_PW))
            for n in range(5000)
        ]
        return await asyncio.gather(*(dispatcher.decide(event) for event in events))

    decisions = gw.run(storm(), timeout=30)
    outcomes = {d.outcome for d in decisions}
    assert outcomes <= {Outcome.ALLOW, Outcome.UNAVAILABLE}
    assert sum(d.outcome is Outcome.ALLOW for d in decisions) >= 25
    maximum = service.thread.call(lambda: service.logic.max_in_flight)
    assert 1 < maximum <= 25


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_a_connect_storm_beyond_max_inflight_waits_its_turn_instead_of_being_refused(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    service = make_service(kind)
    service.logic.delay = 0.05
    gw = callout_gateway(service, max_inflight=4)
    clients = 4 + WAITING_PER_SLOT * 4  # every slot busy and the line full, nobody beyond it
    with ThreadPoolExecutor(max_workers=clients) as pool:
        codes = list(pool.map(lambda n: connack(gw, "alice", ALICE_PW, f"storm-{n}"), range(clients)))
    assert codes == [0] * clients
    assert 1 < service.thread.call(lambda: service.logic.max_in_flight) <= 4


# -- secrets ------------------------------------------------------------------------------------------


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record) + " " + repr(record.__dict__))


@pytest.mark.parametrize("kind", ["grpc-broker", "http"])
def test_no_password_reaches_any_log_line(
    kind: str, make_service: Callable[[str], Service], callout_gateway: Callable[..., GatewayThread]
) -> None:
    wrong = "Wr0ng-guess-5d1e"
    service = make_service(kind)
    service.logic.echo_password = True  # a careless service puts the password into its reason
    capture = _Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    try:
        gw = callout_gateway(service, **RESILIENCE)
        client = connected(gw, "alice", ALICE_PW, "ok")
        client.publish("alice/x", b"1", qos=1)
        client.publish("bob/x", b"1", qos=1)
        assert connack(gw, "alice", wrong, "bad") == CONNACK_BAD_CREDENTIALS
        service.thread.call(lambda: setattr(service.logic, "deny_with_status", True))
        assert connack(gw, "alice", wrong, "bad-status") == CONNACK_BAD_CREDENTIALS
        assert http(gw, "POST", "/alice/x", user=("alice", ALICE_PW), data=b"1") == 202
        assert http(gw, "POST", "/alice/x", user=("alice", wrong), data=b"1") == 401
        service.stop()
        assert connack(gw, "alice", ALICE_PW, "down") == CONNACK_UNAVAILABLE
        client.disconnect()
        gw.stop()
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
    assert any("polygate" in line for line in capture.lines)
    assert any("bad username or password" in line for line in capture.lines)  # the service's reasons were logged
    leaks = [line for line in capture.lines if ALICE_PW in line or wrong in line]
    assert leaks == []


# -- the provider on its own: details of the wire contract -----------------------------------------------


def provider(url: str, transport: str, metrics: Metrics | None = None, **auth: Any) -> CalloutProvider:
    config = AuthConfig(provider="callout", url=url, transport=transport, **auth)
    return CalloutProvider(ProviderContext(auth=config, limits=LimitsConfig(), metrics=metrics or Metrics()))


def connect_event(password: str = ALICE_PW, protocol: Protocol = Protocol.MQTT) -> AuthEvent:
    return AuthEvent(protocol=protocol, action=Action.CONNECT, client_id="c-1", username="alice", secret=Secret(password))


ALICE = Identity(external_id="ext:alice", username="alice")
PUBLISH = AuthEvent(protocol=Protocol.MQTT, action=Action.PUBLISH, client_id="c-1", topic="alice/x")


@pytest.mark.parametrize(
    ("package", "served"), [(BROKER, (FLUXMQ,)), (FLUXMQ, (BROKER,))], ids=["broker-only", "fluxmq-only"]
)
async def test_a_fixed_grpc_package_does_not_fall_back(package: str, served: tuple[str, ...]) -> None:
    service = await GrpcAuthService(AuthServiceLogic(USERS), served).start()
    p = provider(service.address, "grpc", grpc_package=package)
    await p.start()
    try:
        with pytest.raises(ProviderUnavailable, match="does not implement Authenticate") as info:
            await p.authenticate(connect_event())
        assert not info.value.retryable
        assert list(service.paths) == [f"/{package}.AuthService/Authenticate"]
    finally:
        await p.aclose()
        await service.stop()


async def test_auto_falls_back_to_fluxmq_once_and_says_so_once(caplog: pytest.LogCaptureFixture) -> None:
    service = await GrpcAuthService(AuthServiceLogic(USERS), (FLUXMQ,)).start()
    p = provider(service.address, "grpc")
    await p.start()
    try:
        with caplog.at_level(logging.WARNING, logger="polygate.auth.callout"):
            first = await asyncio.gather(*(p.authenticate(connect_event()) for _ in range(5)))
            assert (await p.authorize(PUBLISH, ALICE)).allowed
        assert all(d.allowed for d in first)
        assert isinstance(p.transport, GrpcTransport) and p.transport.package == FLUXMQ
        assert len([r for r in caplog.records if "using fluxmq.auth.v1 from now on" in r.getMessage()]) == 1
        assert service.paths["/broker.auth.v1.AuthService/Authorize"] == 0
        assert service.paths["/fluxmq.auth.v1.AuthService/Authenticate"] == 5
    finally:
        await p.aclose()
        await service.stop()


async def test_every_protocol_and_action_is_sent_as_the_contract_says() -> None:
    logic = AuthServiceLogic(USERS)
    grpc_service = await GrpcAuthService(logic).start()
    http_service = await HttpAuthService(logic).start()
    providers = [provider(grpc_service.address, "grpc"), provider(http_service.url, "http")]
    try:
        for p in providers:
            await p.start()
            for protocol in Protocol:
                assert (await p.authenticate(connect_event(protocol=protocol))).allowed
            sub = AuthEvent(protocol=Protocol.COAP, action=Action.SUBSCRIBE, client_id="c", topic="alice/+")
            assert (await p.authorize(sub, ALICE)).allowed
        expected = ["mqtt", "http", "coap", "amqp_1_0", "amqp_0_9_1"]
        for transport in (f"grpc:{BROKER}", "http"):
            sent = [r.fields for r in logic.requests if r.transport == transport]
            assert [f["protocol"] for f in sent if "protocol" in f] == expected
            assert sent[-1] == {"external_id": "ext:alice", "topic": "alice/+", "action": "subscribe"}
    finally:
        for p in providers:
            await p.aclose()
        await grpc_service.stop()
        await http_service.stop()


async def test_the_identity_is_the_answered_id_or_the_client_id() -> None:
    logic = AuthServiceLogic(USERS)
    logic.ids["bob"] = ""
    service = await HttpAuthService(logic).start()
    p = provider(service.url, "http")
    await p.start()
    try:
        alice = await p.authenticate(connect_event())
        assert alice.identity == Identity(external_id="ext:alice", username="alice")
        bob = AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id="bob-dev", username="bob", secret=Secret(BOB_PW))
        assert (await p.authenticate(bob)).identity == Identity(external_id="bob-dev", username="bob")
    finally:
        await p.aclose()
        await service.stop()


async def test_http_answers_statuses_bodies_and_cache_control() -> None:
    logic = AuthServiceLogic(USERS)
    service = await HttpAuthService(logic, prefix="/v1").start()
    p = provider(service.url + "/", "http")
    await p.start()
    try:
        logic.cache_control = "private, max-age=17"
        decision = await p.authenticate(connect_event())
        assert decision.allowed and decision.ttl == 17.0
        denied = await p.authenticate(connect_event("wrong-password-5"))
        assert denied.outcome is Outcome.DENY and denied.reason_code == 4 and denied.ttl == 17.0
        logic.cache_control = None
        logic.deny_with_status = True
        denied = await p.authenticate(connect_event("wrong-password-6"))
        assert denied.outcome is Outcome.DENY and denied.reason == "bad username or password" and denied.ttl is None
        for status, retryable in ((503, True), (502, True), (504, True), (500, False), (404, False), (302, False)):
            logic.fail_with = status
            with pytest.raises(ProviderUnavailable, match=f"HTTP {status}") as info:
                await p.authorize(PUBLISH, ALICE)
            assert info.value.retryable is retryable
        logic.fail_with = None
        for body in (b"<html>", b"[]", b'{"authorized": 1}', b'{"authorized": true, "reason_code": -1}'):
            logic.raw_body = body
            with pytest.raises(ProviderUnavailable) as info:
                await p.authorize(PUBLISH, ALICE)
            assert not info.value.retryable
        assert not p.ready()
        logic.raw_body = None
        assert (await p.authorize(PUBLISH, ALICE)).allowed
        assert p.ready()
    finally:
        await p.aclose()
        await service.stop()


async def test_grpc_statuses_and_deadlines() -> None:
    logic = AuthServiceLogic(USERS)
    service = await GrpcAuthService(logic).start()
    p = provider(service.address, "grpc", timeout=0.2)
    await p.start()
    try:
        logic.fail_with = grpc.StatusCode.INTERNAL
        with pytest.raises(ProviderUnavailable, match="INTERNAL") as info:
            await p.authorize(PUBLISH, ALICE)
        assert not info.value.retryable
        logic.fail_with = None
        logic.deny_with_status = True
        logic.echo_password = True
        denied = await p.authenticate(connect_event("wrong-password-7"))
        assert denied.outcome is Outcome.DENY
        assert "bad username or password" in denied.reason and "wrong-password-7" not in denied.reason
        logic.delay = 1.0
        with pytest.raises(ProviderUnavailable, match="DEADLINE_EXCEEDED") as info:
            await p.authorize(PUBLISH, ALICE)
        assert info.value.retryable
        logic.delay = 0.0
        await service.stop()
        with pytest.raises(ProviderUnavailable, match="UNAVAILABLE") as info:
            await p.authorize(PUBLISH, ALICE)
        assert info.value.retryable
        assert not p.ready()
    finally:
        await p.aclose()
        await service.stop()


@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_start_succeeds_while_the_service_is_down(transport: str, unused_tcp_port: int) -> None:
    url = f"http://127.0.0.1:{unused_tcp_port}" if transport == "http" else f"127.0.0.1:{unused_tcp_port}"
    metrics = Metrics()
    p = provider(url, transport, metrics)
    await p.start()
    try:
        with pytest.raises(ProviderUnavailable) as info:
            await p.authenticate(connect_event())
        assert info.value.retryable
        assert not p.ready()
        text = metrics.render().decode()
        assert f'polygate_callouts_total{{method="authenticate",outcome="unavailable",transport="{transport}"}} 1.0' in text
        assert f'polygate_callout_duration_seconds_count{{method="authenticate",transport="{transport}"}} 1.0' in text
        assert f'polygate_callout_duration_seconds_bucket{{le="+Inf",method="authenticate",transport="{transport}"}} 1.0' in text
    finally:
        await p.aclose()


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _write_pki(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for 127.0.0.1 and a client certificate."""
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl(
        "req", "-x509", *ec, "-keyout", "ca_key.pem", "-out", "ca.pem", "-days", "1", "-subj", "/CN=Test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )
    (directory / "server.ext").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    (directory / "client.ext").write_text("basicConstraints=CA:FALSE\n")
    for name in ("server", "client"):
        _openssl("req", *ec, "-keyout", f"{name}_key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=directory)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca_key.pem", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "1", "-extfile", f"{name}.ext", cwd=directory,
        )
    return {name: directory / f"{name}.pem" for name in ("ca", "server", "server_key", "client", "client_key")}


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool")
@pytest.mark.parametrize("transport", ["grpc", "http"])
async def test_mtls_to_the_service(transport: str, tmp_path: Path) -> None:
    pki = _write_pki(tmp_path)
    logic = AuthServiceLogic(USERS)
    service: GrpcAuthService | HttpAuthService
    if transport == "grpc":
        credentials = grpc.ssl_server_credentials(
            [(pki["server_key"].read_bytes(), pki["server"].read_bytes())],
            root_certificates=pki["ca"].read_bytes(),
            require_client_auth=True,
        )
        service = await GrpcAuthService(logic, credentials=credentials).start()
        url = f"https://{service.address}"
    else:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
        context.load_cert_chain(pki["server"], pki["server_key"])
        context.verify_mode = ssl.CERT_REQUIRED
        service = await HttpAuthService(logic, ssl_context=context).start()
        url = service.url
    with_cert = TLSClientConfig(ca_file=str(pki["ca"]), cert_file=str(pki["client"]), key_file=str(pki["client_key"]))
    good = provider(url, transport, tls=with_cert, timeout=1.0)
    without_cert = provider(url, transport, tls=TLSClientConfig(ca_file=str(pki["ca"])), timeout=1.0)
    untrusted = provider(url, transport, timeout=1.0)  # system CAs do not know the test CA
    try:
        for p in (good, without_cert, untrusted):
            await p.start()
        assert (await good.authenticate(connect_event())).allowed
        for p in (without_cert, untrusted):
            with pytest.raises(ProviderUnavailable):
                await p.authenticate(connect_event())
        assert logic.calls["authenticate"] == 1
    finally:
        for p in (good, without_cert, untrusted):
            await p.aclose()
        await service.stop()


# -- small pure functions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "ttl"),
    [
        ([], None),
        (["max-age=30"], 30.0),
        (["public, MAX-AGE=0"], 0.0),
        (['max-age="12"'], 12.0),
        (["no-store"], 0.0),
        (["no-cache, max-age=60"], 0.0),
        (["max-age=60", "max-age=5"], 5.0),
        (["max-age=-1"], None),
        (["max-age=soon"], None),
        (["private"], None),
    ],
)
def test_cache_control(headers: list[str], ttl: float | None) -> None:
    assert cache_ttl(headers) == ttl


def test_grpc_targets() -> None:
    assert grpc_target("auth:7016") == ("auth:7016", False)
    assert grpc_target("auth:7016", TLSClientConfig(ca_file="ca.pem")) == ("auth:7016", True)
    assert grpc_target("http://auth:7016") == ("auth:7016", False)
    assert grpc_target("https://auth:7016/") == ("auth:7016", True)
    assert grpc_target("https://auth") == ("auth:443", True)
    assert grpc_target("http://[::1]:7016") == ("[::1]:7016", False)


def test_reconnect_backoff_fits_the_breaker_interval() -> None:
    assert dict(channel_options(10.0))["grpc.max_reconnect_backoff_ms"] == 1000
    assert dict(channel_options(1.0))["grpc.max_reconnect_backoff_ms"] == 500
    assert dict(channel_options(0.05))["grpc.max_reconnect_backoff_ms"] == 100
    assert GrpcTransport(AuthConfig(url="a:1", circuit_breaker=CircuitBreakerConfig(open_for=1.0)))._options == channel_options(1.0)


def test_durations_are_a_cumulative_histogram() -> None:
    durations = Durations(buckets=(0.01, 0.1))
    for seconds in (0.005, 0.01, 0.05, 3.0):
        durations.observe("authorize", seconds)
    samples = {(s.name, s.labels.get("le")): s.value for s in durations.family("http").samples}
    assert samples[("polygate_callout_duration_seconds_bucket", "0.01")] == 2
    assert samples[("polygate_callout_duration_seconds_bucket", "0.1")] == 3
    assert samples[("polygate_callout_duration_seconds_bucket", "+Inf")] == 4
    assert samples[("polygate_callout_duration_seconds_count", None)] == 4
    assert samples[("polygate_callout_duration_seconds_sum", None)] == pytest.approx(3.065)


def test_two_providers_can_share_one_metrics() -> None:
    metrics = Metrics()
    for _ in range(2):
        provider("127.0.0.1:1", "grpc", metrics)
    assert b"polygate_callouts" in metrics.render()


def test_scrub_removes_the_secret_and_credentials_in_urls() -> None:
    secret = Secret("hunter2-long")
    assert scrub("wrong password hunter2-long for alice", secret) == "wrong password *** for alice"
    assert scrub("cannot reach http://user:pw@auth:80/x") == "cannot reach http://***@auth:80/x"
    assert scrub("two\nlines") == "two lines"
    assert len(scrub("x" * 1000)) == 200
