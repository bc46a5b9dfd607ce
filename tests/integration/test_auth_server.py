"""The reference external auth service, called as the gateway calls it: real gRPC and HTTP clients."""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import grpc.aio
import pytest
import yaml

import gateway.auth_server as auth_server_module
from auth_providers.local_store import hash_password
from auth_providers.proto.broker.auth.v1 import auth_pb2 as broker_pb2
from auth_providers.proto.broker.auth.v1 import auth_pb2_grpc as broker_grpc
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2 as fluxmq_pb2
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2_grpc as fluxmq_grpc
from gateway.auth_server import (
    AUTHENTICATE,
    AUTHORIZE,
    AuthService,
    REASON_BAD_CREDENTIALS,
    REASON_CLIENT_ID_NOT_VALID,
    REASON_NOT_AUTHORIZED,
    RunningAuthServer,
    UsersFile,
    load_users,
    parse_users,
    start_auth_server,
)
from gateway.errors import ConfigError, PolygateError
from gateway.events import Secret

ROOT = Path(__file__).resolve().parents[2]
PASSWORDS = {"device-1": "pw-device-1", "plain": "pw-plain", "sensor": "pw-sensor"}
GRPC_MODULES = {"broker.auth.v1": (broker_pb2, broker_grpc), "fluxmq.auth.v1": (fluxmq_pb2, fluxmq_grpc)}
PROTOCOL_NUMBERS = {"mqtt": 1, "amqp_1_0": 2, "amqp_0_9_1": 3, "http": 4, "coap": 5}
ACTION_NUMBERS = {"publish": 1, "subscribe": 2, "": 0}


@pytest.fixture(scope="module")
def users_raw() -> dict[str, Any]:
    hashes = {name: hash_password(Secret(password)) for name, password in PASSWORDS.items()}
    return {
        "users": [
            {
                "username": "device-1",
                "password_hash": hashes["device-1"],
                "external_id": "ext-device-1",
                "publish": ["tenants/acme/#", "users/%u/out"],
                "subscribe": ["tenants/acme/+/status"],
            },
            {"username": "plain", "password_hash": hashes["plain"], "client_ids": ["plain-1", "plain-2"]},
            {
                "username": "sensor",
                "password_hash": hashes["sensor"],
                "client_ids": ["sensor-7", "sensor-8"],
                "publish": ["devices/%c/telemetry"],
                "subscribe": ["devices/%c/commands"],
            },
        ]
    }


@pytest.fixture(scope="module")
def users(users_raw: dict[str, Any]) -> UsersFile:
    return parse_users(users_raw)


# --------------------------------------------------------------------------- one caller per contract


@dataclass
class Refused:
    """A refusal answered with a status instead of a body."""

    status: object


class Caller:
    async def authenticate(self, client_id: str, username: str, password: str, protocol: str = "mqtt") -> Any: ...

    async def authorize(self, external_id: str, topic: str, action: str) -> Any: ...

    async def aclose(self) -> None: ...


class GrpcCaller(Caller):
    def __init__(self, port: int, package: str) -> None:
        self.pb2, pb2_grpc = GRPC_MODULES[package]
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = pb2_grpc.AuthServiceStub(self.channel)

    async def authenticate(self, client_id: str, username: str, password: str, protocol: str = "mqtt") -> Any:
        request = self.pb2.AuthnReq(
            client_id=client_id, username=username, password=password, protocol=PROTOCOL_NUMBERS[protocol]
        )
        try:
            response = await self.stub.Authenticate(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return Refused(exc.code())
        return {"authenticated": response.authenticated, "id": response.id,
                "reason_code": response.reason_code, "reason": response.reason}

    async def authorize(self, external_id: str, topic: str, action: str) -> Any:
        request = self.pb2.AuthzReq(external_id=external_id, topic=topic, action=ACTION_NUMBERS[action])
        try:
            response = await self.stub.Authorize(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            return Refused(exc.code())
        return {"authorized": response.authorized, "reason_code": response.reason_code, "reason": response.reason}

    async def aclose(self) -> None:
        await self.channel.close()


class HttpCaller(Caller):
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

    async def _post(self, path: str, body: object) -> Any:
        async with self.session.post(self.base + path, json=body) as response:
            if response.status in (401, 403):
                return Refused(response.status)
            assert response.status == 200, await response.text()
            return await response.json()

    async def authenticate(self, client_id: str, username: str, password: str, protocol: str = "mqtt") -> Any:
        body = {"client_id": client_id, "username": username, "password": password, "protocol": protocol}
        return await self._post("/auth/authenticate", body)

    async def authorize(self, external_id: str, topic: str, action: str) -> Any:
        return await self._post("/auth/authorize", {"external_id": external_id, "topic": topic, "action": action})

    async def aclose(self) -> None:
        await self.session.close()


CONTRACTS = ("grpc:broker.auth.v1", "grpc:fluxmq.auth.v1", "http")
Started = Callable[..., Awaitable[tuple[RunningAuthServer, Caller]]]


@pytest.fixture
async def start(users: UsersFile) -> AsyncIterator[Started]:
    """Start a server for a contract and a caller of it; both are closed after the test."""
    opened: list[tuple[RunningAuthServer, Caller]] = []

    async def run(contract: str, *, deny_with_status: bool = False, **kwargs: Any) -> tuple[RunningAuthServer, Caller]:
        transport, _, package = contract.partition(":")
        server = await start_auth_server(
            kwargs.pop("users", users), host="127.0.0.1", port=0, transport=transport,
            deny_with_status=deny_with_status, **kwargs,
        )
        caller: Caller = GrpcCaller(server.port, package) if transport == "grpc" else HttpCaller(server.port)
        opened.append((server, caller))
        return server, caller

    yield run
    for server, caller in opened:
        await caller.aclose()
        await server.stop()


# --------------------------------------------------------------------------- authentication


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_authenticate_returns_the_external_id(start: Started, contract: str) -> None:
    server, caller = await start(contract)
    answer = await caller.authenticate("c-1", "device-1", PASSWORDS["device-1"])
    assert answer == {"authenticated": True, "id": "ext-device-1", "reason_code": 0, "reason": ""}
    # Without external_id the identity is the username.
    answer = await caller.authenticate("plain-1", "plain", PASSWORDS["plain"], protocol="coap")
    assert answer["authenticated"] is True and answer["id"] == "plain"
    assert server.calls[AUTHENTICATE] == 2
    assert server.port > 0


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_wrong_password_and_unknown_user_are_refused_in_the_body(start: Started, contract: str) -> None:
    server, caller = await start(contract)
    for username, password in (("device-1", "wrong"), ("device-1", ""), ("nobody", "pw-device-1"), ("", "x")):
        answer = await caller.authenticate("c-1", username, password)
        assert answer["authenticated"] is False, (username, password)
        assert answer["id"] == ""
        assert answer["reason_code"] == REASON_BAD_CREDENTIALS
        assert answer["reason"] == "bad username or password"
    assert server.calls[AUTHENTICATE] == 4


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_deny_with_status_refuses_with_a_status(start: Started, contract: str) -> None:
    server, caller = await start(contract, deny_with_status=True)
    grpc_contract = contract.startswith("grpc")
    assert await caller.authenticate("c-1", "device-1", "wrong") == Refused(
        grpc.StatusCode.UNAUTHENTICATED if grpc_contract else 401
    )
    assert await caller.authenticate("c-1", "nobody", "x") == Refused(
        grpc.StatusCode.UNAUTHENTICATED if grpc_contract else 401
    )
    assert await caller.authorize("ext-device-1", "elsewhere", "publish") == Refused(
        grpc.StatusCode.PERMISSION_DENIED if grpc_contract else 403
    )
    # Allowed answers are unchanged.
    answer = await caller.authenticate("c-1", "device-1", PASSWORDS["device-1"])
    assert answer["authenticated"] is True and answer["id"] == "ext-device-1"
    assert (await caller.authorize("ext-device-1", "tenants/acme/x", "publish"))["authorized"] is True


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_client_ids_restrict_who_may_use_the_credentials(start: Started, contract: str) -> None:
    _, caller = await start(contract)
    assert (await caller.authenticate("plain-2", "plain", PASSWORDS["plain"]))["authenticated"] is True
    answer = await caller.authenticate("intruder", "plain", PASSWORDS["plain"])
    assert answer["authenticated"] is False
    assert answer["reason_code"] == REASON_CLIENT_ID_NOT_VALID


# --------------------------------------------------------------------------- authorization


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_publish_and_subscribe_decisions(start: Started, contract: str) -> None:
    server, caller = await start(contract)
    cases = [
        ("publish", "tenants/acme/dev-1/data", True),
        ("publish", "tenants/acme", True),  # `a/#` also matches its parent `a`
        ("publish", "tenants/other/dev-1/data", False),
        ("publish", "users/device-1/out", True),  # %u is the username
        ("publish", "users/someone-else/out", False),
        ("publish", "tenants/acme/+/data", False),  # not a topic name
        ("subscribe", "tenants/acme/dev-1/status", True),
        ("subscribe", "tenants/acme/+/status", True),
        # Wildcards that would widen the granted filter are refused, not narrowed.
        ("subscribe", "tenants/acme/#", False),
        ("subscribe", "tenants/acme/+/#", False),
        ("subscribe", "tenants/+/+/status", False),
        ("subscribe", "#", False),
        ("subscribe", "tenants/acme/dev-1/data", False),
        ("", "tenants/acme/dev-1/data", False),  # Action None
    ]
    for action, topic, allowed in cases:
        answer = await caller.authorize("ext-device-1", topic, action)
        assert answer["authorized"] is allowed, (action, topic, answer)
        assert (answer["reason_code"] == 0) is allowed
    assert server.calls[AUTHORIZE] == len(cases)


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_unknown_identity_is_not_authorized(start: Started, contract: str) -> None:
    _, caller = await start(contract)
    for identity in ("nobody", "device-1", "", "ext-device-1|c-1"):  # the username is not the identity
        answer = await caller.authorize(identity, "tenants/acme/x", "publish")
        assert answer == {
            "authorized": False,
            "reason_code": REASON_NOT_AUTHORIZED,
            "reason": f"unknown identity {identity!r}",
        }


@pytest.mark.parametrize("contract", CONTRACTS)
async def test_client_id_placeholder_binds_the_identity_to_the_client(start: Started, contract: str) -> None:
    _, caller = await start(contract)
    answer = await caller.authenticate("sensor-7", "sensor", PASSWORDS["sensor"])
    assert answer["authenticated"] is True
    identity = answer["id"]
    assert identity == "sensor|sensor-7"
    assert (await caller.authorize(identity, "devices/sensor-7/telemetry", "publish"))["authorized"] is True
    assert (await caller.authorize(identity, "devices/sensor-7/commands", "subscribe"))["authorized"] is True
    assert (await caller.authorize(identity, "devices/sensor-8/telemetry", "publish"))["authorized"] is False
    assert (await caller.authorize(identity, "devices/+/commands", "subscribe"))["authorized"] is False
    # Another listed client gets its own topics; an unlisted one is no identity at all.
    assert (await caller.authorize("sensor|sensor-8", "devices/sensor-8/telemetry", "publish"))["authorized"]
    assert not (await caller.authorize("sensor|intruder", "devices/intruder/telemetry", "publish"))["authorized"]
    # Without the client id, %c patterns match nothing.
    assert not (await caller.authorize("sensor", "devices/sensor-7/telemetry", "publish"))["authorized"]


# --------------------------------------------------------------------------- transports


async def test_grpc_serves_both_packages_on_one_port(start: Started) -> None:
    server, broker = await start("grpc:broker.auth.v1")
    fluxmq = GrpcCaller(server.port, "fluxmq.auth.v1")
    try:
        assert (await broker.authenticate("c", "device-1", PASSWORDS["device-1"]))["authenticated"]
        assert (await fluxmq.authenticate("c", "device-1", PASSWORDS["device-1"]))["authenticated"]
        assert (await fluxmq.authorize("ext-device-1", "tenants/acme/x", "publish"))["authorized"]
    finally:
        await fluxmq.aclose()
    assert server.calls["broker.auth.v1/authenticate"] == 1
    assert server.calls["fluxmq.auth.v1/authenticate"] == 1
    assert server.calls["fluxmq.auth.v1/authorize"] == 1
    assert server.calls[AUTHENTICATE] == 2
    assert server.url == f"127.0.0.1:{server.port}"


async def test_grpc_can_serve_only_the_old_package(start: Started) -> None:
    server, fluxmq = await start("grpc:fluxmq.auth.v1", grpc_packages=("fluxmq.auth.v1",))
    broker = GrpcCaller(server.port, "broker.auth.v1")
    try:
        assert await broker.authenticate("c", "device-1", PASSWORDS["device-1"]) == Refused(
            grpc.StatusCode.UNIMPLEMENTED
        )
        assert (await fluxmq.authenticate("c", "device-1", PASSWORDS["device-1"]))["authenticated"]
    finally:
        await broker.aclose()


async def test_http_rejects_malformed_bodies(start: Started) -> None:
    server, caller = await start("http")
    assert isinstance(caller, HttpCaller)
    assert server.url == f"http://127.0.0.1:{server.port}"
    for body in (b"not json", b"[1, 2]", b'{"username": 5, "password": "x"}'):
        async with caller.session.post(caller.base + "/auth/authenticate", data=body) as response:
            assert response.status == 400, body
            assert "error" in await response.json()
    async with caller.session.post(caller.base + "/auth/authorize", data=b'{"topic": []}') as response:
        assert response.status == 400
    async with caller.session.post(caller.base + "/auth/authorize", data=b"x" * (128 * 1024)) as response:
        assert response.status == 413
    async with caller.session.get(caller.base + "/auth/authorize") as response:
        assert response.status == 405


async def test_a_second_server_cannot_take_a_port_in_use(start: Started, users: UsersFile) -> None:
    for transport in ("grpc", "http"):
        server, _ = await start(transport if transport == "http" else "grpc:broker.auth.v1")
        with pytest.raises(PolygateError, match="cannot listen"):
            await start_auth_server(users, host="127.0.0.1", port=server.port, transport=transport)


# --------------------------------------------------------------------------- password checks


async def test_concurrent_identical_checks_run_argon2_once(
    start: Started, monkeypatch: pytest.MonkeyPatch
) -> None:
    runs: list[str] = []
    real = auth_server_module.verify_password

    def counting(phc: str, secret: Secret) -> bool:
        runs.append(phc)
        return real(phc, secret)

    monkeypatch.setattr(auth_server_module, "verify_password", counting)
    server, caller = await start("http")
    answers = await asyncio.gather(
        *(caller.authenticate(f"c-{i}", "device-1", PASSWORDS["device-1"]) for i in range(20))
    )
    assert all(answer["authenticated"] for answer in answers)
    assert len(runs) == 1
    assert (await caller.authenticate("c-x", "device-1", PASSWORDS["device-1"]))["authenticated"]
    assert len(runs) == 1  # remembered
    assert not (await caller.authenticate("c-x", "device-1", "wrong"))["authenticated"]
    assert not (await caller.authenticate("c-x", "device-1", "wrong"))["authenticated"]
    assert len(runs) == 3  # failures are never remembered
    # An unknown user costs a check too, so the answer time does not tell which users exist.
    assert not (await caller.authenticate("c-x", "nobody", "whatever"))["authenticated"]
    assert len(runs) == 4
    assert server.calls[AUTHENTICATE] == 24


async def test_a_caller_that_goes_away_does_not_cancel_the_check_of_others(
    users: UsersFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    real = auth_server_module.verify_password

    def slow(phc: str, secret: Secret) -> bool:
        release.wait(10)
        return real(phc, secret)

    monkeypatch.setattr(auth_server_module, "verify_password", slow)
    service = AuthService(users)
    password = Secret(PASSWORDS["device-1"])
    first = asyncio.create_task(service.authenticate(client_id="a", username="device-1", password=password, protocol="mqtt"))
    second = asyncio.create_task(service.authenticate(client_id="b", username="device-1", password=password, protocol="mqtt"))
    try:
        await asyncio.sleep(0)  # one loop turn: both now wait on the same check
        first.cancel()
        release.set()
        answer = await asyncio.wait_for(second, 10)
        assert answer.authenticated and answer.id == "ext-device-1"
        with pytest.raises(asyncio.CancelledError):
            await first
    finally:
        release.set()


async def test_replacing_users_forgets_remembered_passwords(start: Started, users_raw: dict[str, Any]) -> None:
    server, caller = await start("grpc:broker.auth.v1")
    assert (await caller.authenticate("c", "device-1", PASSWORDS["device-1"]))["authenticated"]
    changed = {"users": [{**users_raw["users"][0], "password_hash": hash_password(Secret("new-password"))}]}
    server.replace_users(parse_users(changed))
    assert not (await caller.authenticate("c", "device-1", PASSWORDS["device-1"]))["authenticated"]
    assert (await caller.authenticate("c", "device-1", "new-password"))["authenticated"]
    assert not (await caller.authorize("sensor|sensor-7", "devices/sensor-7/telemetry", "publish"))["authorized"]


async def test_secrets_stay_out_of_the_logs(start: Started, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    _, caller = await start("http")
    await caller.authenticate("c", "device-1", PASSWORDS["device-1"])
    await caller.authenticate("c", "device-1", "wrong-secret-xyz")
    await caller.authenticate("c", "nobody", "other-secret-xyz")
    assert "device-1" in caplog.text  # the calls were logged
    for secret in (PASSWORDS["device-1"], "wrong-secret-xyz", "other-secret-xyz", "$argon2id$"):
        assert secret not in caplog.text


# --------------------------------------------------------------------------- the users file


def test_the_example_users_file_loads() -> None:
    users = load_users(ROOT / "configs" / "auth-users.example.yaml")
    by_name = {user.username: user for user in users.users}
    assert by_name["device-1"].external_id == "ext-device-1"
    assert by_name["sensor"].external_id == "sensor"
    assert by_name["sensor"].binds_client_id and not by_name["device-1"].binds_client_id


def test_users_file_problems_carry_their_key_path(users_raw: dict[str, Any]) -> None:
    good = users_raw["users"][0]
    raw = {
        "users": [
            good,
            {**good, "external_id": "other"},  # same username
            {**good, "username": "u2"},  # same external id
            {"username": "u3", "password_hash": "$argon2id$secret-looking-garbage", "publish": ["a/#/b"]},
            {"username": "u4", "password_hash": "plaintext-password", "extra": 1, "client_ids": "c"},
            {"username": "u|5", "password_hash": good["password_hash"]},
            "not a mapping",
        ],
        "version": 2,
    }
    with pytest.raises(ConfigError) as caught:
        parse_users(raw)
    problems = "\n".join(caught.value.problems)
    for expected in (
        "version: unknown key",
        "users[1].username: 'device-1' appears twice",
        "users[2].external_id: 'ext-device-1' is already another user's",
        "users[3].password_hash: malformed hash",
        "users[3].publish[0]:",
        "users[4].password_hash: expected an Argon2id PHC string",
        "users[4].extra: unknown key",
        "users[4].client_ids: expected a list of strings",
        "users[5].username (the default external_id): must not contain '|'",
        "users[6]: expected a mapping",
    ):
        assert expected in problems
    assert "secret-looking-garbage" not in problems and "plaintext-password" not in problems
    with pytest.raises(ConfigError, match="users: required"):
        parse_users({})


def test_unreadable_or_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_users(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("users: [", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_users(bad)


# --------------------------------------------------------------------------- the command


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", "auth-server", *args]


async def test_the_command_serves_until_sigterm(tmp_path: Path, users_raw: dict[str, Any]) -> None:
    users_file = tmp_path / "users.yaml"
    users_file.write_text(yaml.safe_dump(users_raw), encoding="utf-8")
    process = await asyncio.create_subprocess_exec(
        *_cli("--users", str(users_file), "--listen", "127.0.0.1:0", "--transport", "http"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert process.stderr is not None
    try:
        port = 0
        deadline = time.monotonic() + 15
        lines: list[str] = []
        while not port:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no 'listening' line in time:\n{''.join(lines)}"
            line = (await asyncio.wait_for(process.stderr.readline(), remaining)).decode()
            assert line, f"the server exited early:\n{''.join(lines)}"
            lines.append(line)
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(found.group(1)) if found else 0
        caller = HttpCaller(port)
        try:
            answer = await caller.authenticate("c", "device-1", PASSWORDS["device-1"])
            assert answer["authenticated"] is True and answer["id"] == "ext-device-1"
        finally:
            await caller.aclose()
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 15) == 0
        rest = (await process.stderr.read()).decode()
        assert "shutting down" in rest
        assert PASSWORDS["device-1"] not in "".join(lines) + rest
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


def test_the_command_refuses_a_bad_users_file(tmp_path: Path) -> None:
    users_file = tmp_path / "users.yaml"
    users_file.write_text("users:\n  - username: a\n", encoding="utf-8")
    result = subprocess.run(
        _cli("--users", str(users_file), "--listen", "127.0.0.1:0"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "users[0].password_hash: required" in result.stderr
    result = subprocess.run(
        _cli("--users", str(users_file), "--listen", "nowhere"),
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )
    assert result.returncode == 2
    assert "--listen:" in result.stderr
