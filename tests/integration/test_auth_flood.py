"""The `local` provider under a password-guessing flood, through a real gateway on each event loop.

Issue 19's reproducer: 1,000 wrong passwords, 150 at a time, got CONNACK 0x03
for 480 of them and for 4 of 59 legitimate connects, because Argon2 checks
queued past `auth.timeout` and the circuit breaker opened on the local store.
Here `auth.timeout` is 50 ms and the breaker opens after one failure, so any
local check cut by the timeout or counted by the breaker shows up as a 0x03.
The Argon2 parameters are lowered (`auth.local.argon2`) so the flood takes
seconds: the user's stored OWASP hash is re-made with them at its first login.

Clients: a raw MQTT 3.1.1 CONNECT over asyncio sockets (150 in parallel, far
cheaper than 150 paho threads), legitimate ones from 127.0.0.2 (Linux routes
all of 127/8 to lo) and the flood from 127.0.0.1; aiohttp for HTTP.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from auth_providers.local_store import LocalStore
from gateway.events import Secret
from tests.conftest import loopback_config
from tests.gateway_thread import GatewayThread

FLOOD = 1000
IN_PARALLEL = 150
LEGIT = 60
FAST_ARGON2 = {"memory": "1MiB", "time": 2, "parallelism": 1}
LEGIT_HOST = "127.0.0.2"
FLOOD_HOST = "127.0.0.1"
DEADLINE = 60.0


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def connect_packet(client_id: str, username: str, password: str) -> bytes:
    # MQTT 3.1.1 CONNECT: username, password, clean session, keepalive 30 s.
    body = _utf8("MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")
    body += _utf8(client_id) + _utf8(username) + _utf8(password)
    length, encoded = len(body), bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([0x10]) + bytes(encoded) + body


async def mqtt_connect(port: int, client_id: str, username: str, password: str, *, host: str) -> int:
    """The CONNACK return code."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(host, 0))
    try:
        writer.write(connect_packet(client_id, username, password))
        connack = await asyncio.wait_for(reader.readexactly(4), DEADLINE)
        assert connack[0] == 0x20, connack
        return connack[3]
    finally:
        writer.close()
        await writer.wait_closed()


def metrics(gw: GatewayThread) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def add_user(tmp_path: Path, username: str, password: str, *, publish: str = "") -> None:
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.add_user(username, Secret(password))
        if publish:
            store.grant(username, publish, {"publish"})


def flood_config(tmp_path: Path, *, authn_cache_ttl: str = "0s", **failed_logins: int) -> dict[str, Any]:
    return loopback_config(
        tmp_path,
        auth={
            "timeout": "50ms",
            "retries": 0,
            "authn_cache_ttl": authn_cache_ttl,
            "circuit_breaker": {"failures": 1, "open_for": "60s", "half_open_requests": 1},
            "local": {"argon2": FAST_ARGON2, "max_wait": "30s"},
        },
        limits={"failed_logins": {"per_ip": failed_logins.get("per_ip", 0),
                                  "per_username": failed_logins.get("per_username", 0)}},
    )


async def test_a_flood_of_wrong_passwords_refuses_no_legitimate_connect(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    add_user(tmp_path, "alice", "alice-right")
    gw = start_gateway(flood_config(tmp_path))
    port = gw.mqtt_port
    # The first login re-makes alice's stored OWASP hash with the test's cheap parameters.
    assert await mqtt_connect(port, "warm-up", "alice", "alice-right", host=LEGIT_HOST) == 0
    slots = asyncio.Semaphore(IN_PARALLEL)
    loop = asyncio.get_running_loop()
    slowest = 0.0

    async def guess(n: int) -> int:
        nonlocal slowest
        async with slots:
            # Half against alice, half against users that do not exist (the dummy hash).
            username = "alice" if n % 2 else f"nobody-{n}"
            started = loop.time()
            code = await mqtt_connect(port, f"flood-{n}", username, f"wrong-{n}", host=FLOOD_HOST)
            slowest = max(slowest, loop.time() - started)
            return code

    async def legit(n: int) -> int:
        # Spread over the flood, each a fresh check (authn_cache_ttl 0s).
        await asyncio.sleep(n * 0.02)
        return await mqtt_connect(port, f"legit-{n}", "alice", "alice-right", host=LEGIT_HOST)

    flood = asyncio.gather(*(guess(n) for n in range(FLOOD)))
    legits = asyncio.gather(*(legit(n) for n in range(LEGIT)))
    flood_codes, legit_codes = await asyncio.wait_for(asyncio.gather(flood, legits), DEADLINE)

    assert legit_codes == [0] * LEGIT
    # Every guess is refused as a wrong password (0x04), none as "server unavailable" (0x03).
    assert sorted(set(flood_codes)) == [4]
    samples = metrics(gw)
    assert samples['polygate_circuit_breaker_state{provider="local"}'] == 0
    assert samples['polygate_circuit_breaker_opened_total{provider="local"}'] == 0
    assert samples["polygate_local_password_busy_total"] == 0
    # Identical legitimate connects in flight together share one check; every guess has its own.
    assert samples["polygate_local_password_checks_total"] >= FLOOD
    # Checks really queued past auth.timeout (50 ms): cut there, they would have been 0x03.
    assert slowest > 0.05, slowest


async def test_an_http_storm_without_client_id_costs_one_check_per_credential(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    users = {f"dev{n}": f"pw-{n}" for n in range(3)}
    for username, password in users.items():
        add_user(tmp_path, username, password, publish="storm/#")
    gw = start_gateway(flood_config(tmp_path, authn_cache_ttl="30s"))
    before = metrics(gw)["polygate_local_password_checks_total"]
    url = f"http://127.0.0.1:{gw.http_port}/storm/t"

    async def post(session: aiohttp.ClientSession, username: str) -> int:
        async with session.post(url, data=b"x", auth=aiohttp.BasicAuth(username, users[username])) as response:
            return response.status

    # force_close: a new connection (so a new peer port and client id) for every request.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True, limit=20)) as session:
        statuses = await asyncio.wait_for(
            asyncio.gather(*(post(session, f"dev{n % 3}") for n in range(90))), DEADLINE
        )
    assert all(200 <= status < 300 for status in statuses), statuses
    assert metrics(gw)["polygate_local_password_checks_total"] - before == len(users)


async def test_the_limiter_locks_out_a_guessing_ip_and_lets_alice_in_from_another(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path
) -> None:
    add_user(tmp_path, "alice", "alice-right")
    gw = start_gateway(flood_config(tmp_path, per_ip=5))
    port = gw.mqtt_port
    for n in range(5):
        assert await mqtt_connect(port, f"g{n}", "alice", f"wrong-{n}", host=FLOOD_HOST) == 4
    checks = metrics(gw)["polygate_local_password_checks_total"]
    # Locked: even the right password from that IP is denied, unchecked.
    assert await mqtt_connect(port, "g-right", "alice", "alice-right", host=FLOOD_HOST) == 4
    assert await mqtt_connect(port, "g-other", "bob", "whatever", host=FLOOD_HOST) == 4
    samples = metrics(gw)
    assert samples["polygate_local_password_checks_total"] == checks
    assert samples['polygate_auth_lockouts_total{scope="ip"}'] == 1
    assert samples['polygate_auth_lockout_refused_total{scope="ip"}'] == 2
    assert await mqtt_connect(port, "alice-1", "alice", "alice-right", host=LEGIT_HOST) == 0
