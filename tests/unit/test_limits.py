"""Connection limits on plain values: GatewayState.admit, allowed(), the refusal log, the fd budget."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
from typing import Any

import pytest
from hypothesis import given, strategies as st

from gateway.config import parse_config
from gateway.config_types import LimitsConfig
from gateway.errors import ConfigError
from gateway.server import AcceptErrorHandler, connection_budget
from gateway.state import GatewayState, RefusalLog, allowed


class Conn:
    def close(self, reason: str) -> None:
        pass


def test_per_ip_cap_counts_across_listeners_and_frees_on_unregister() -> None:
    state = GatewayState(LimitsConfig(max_connections_per_ip=2))
    a, b, c = Conn(), Conn(), Conn()
    assert state.admit("tcp", a, "10.0.0.1", "10.0.0.1:1") is None
    assert state.admit("amqp", b, "10.0.0.1", "10.0.0.1:2") is None
    assert state.admit("tcp", c, "10.0.0.1", "10.0.0.1:3") == "max_connections_per_ip"
    assert state.admit("tcp", c, "10.0.0.2", "10.0.0.2:3") is None
    state.unregister("amqp", b)
    assert state.admit("tcp", Conn(), "10.0.0.1", "10.0.0.1:4") is None


def test_ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() -> None:
    state = GatewayState(LimitsConfig(max_connections_per_ip=1))
    assert state.admit("tcp", Conn(), "2001:db8::1", "") is None
    assert state.admit("tcp", Conn(), "2001:db8::2", "") == "max_connections_per_ip"
    assert state.admit("tcp", Conn(), "10.1.1.1", "") is None
    assert state.admit("tcp", Conn(), "::ffff:10.1.1.1", "") == "max_connections_per_ip"


def test_listener_cap_total_budget_and_cidrs() -> None:
    state = GatewayState(LimitsConfig(max_connections_per_ip=0, allowed_cidrs=(ipaddress.ip_network("10.0.0.0/8"),)))
    state.set_limit("tcp", 1, (ipaddress.ip_network("10.1.0.0/16"),))
    assert state.admit("tcp", Conn(), "10.2.0.1", "") == "not_allowed"
    assert state.admit("tcp", Conn(), "192.168.0.1", "") == "not_allowed"
    assert state.admit("tcp", Conn(), "10.1.0.1", "") is None
    assert state.admit("tcp", Conn(), "10.1.0.2", "") == "max_connections"
    state.max_total = 2
    assert state.admit("other", Conn(), "10.3.0.1", "") is None
    assert state.admit("other", Conn(), "10.3.0.2", "") == "fd_reserve"
    state.shutting_down = True
    assert state.admit("other", Conn(), "10.3.0.3", "") == "shutting_down"


@given(st.ip_addresses())
def test_allowed_matches_ipaddress(address: Any) -> None:
    networks = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert allowed(str(address), networks) == any(address in n for n in networks if n.version == address.version)
    assert allowed(str(address), ())


def test_allowed_fails_closed_on_garbage() -> None:
    assert not allowed("not-an-ip", (ipaddress.ip_network("0.0.0.0/0"),))


async def test_refusal_log_is_one_line_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(interval=0.05)
    with caplog.at_level(logging.WARNING, logger="polygate.state"):
        for i in range(500):
            log.refused("server.tcp.plain", "max_connections_per_ip", f"10.0.0.1:{i}")
        await asyncio.sleep(0.12)
    lines = [r for r in caplog.records if r.name == "polygate.state"]
    assert len(lines) == 2
    assert getattr(lines[1], "count") == 499


def test_subscription_and_upload_refusals_are_metrics() -> None:
    state = GatewayState()
    for _ in range(3):
        state.note_refused("server.tcp.plain", "max_subscriptions_per_client", "10.0.0.1:1")
    state.note_refused("server.coap.plain", "uploads_per_ip", "10.0.0.2:1")
    state.note_refused("server.tcp.plain", "rate_limited", "10.0.0.3:1")  # a connection: the frontend counts it
    samples = {
        (s.labels["listener"], s.labels["what"], s.labels["reason"]): s.value
        for family in state.collect_metrics() for s in family.samples
    }
    assert samples == {
        ("server.tcp.plain", "subscription", "max_subscriptions_per_client"): 3,
        ("server.coap.plain", "block-wise upload", "uploads_per_ip"): 1,
    }


def test_accept_errors_are_logged_once_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    passed: list[dict[str, Any]] = []
    handler = AcceptErrorHandler(lambda loop, context: passed.append(context), interval=10, clock=lambda: now[0])
    loop: Any = None
    with caplog.at_level(logging.ERROR, logger="polygate.server"):
        for _ in range(1000):
            handler(loop, {"exception": OSError(errno.EMFILE, "Too many open files")})
        now[0] = 11.0
        handler(loop, {"exception": OSError(errno.ENFILE, "Too many open files in system")})
        handler(loop, {"exception": ValueError("other")})
    assert len([r for r in caplog.records if r.name == "polygate.server"]) == 2
    assert handler.total == 1001
    assert len(passed) == 1


def test_connection_budget_keeps_the_reserve() -> None:
    assert connection_budget(1024, LimitsConfig(fd_reserve=128, max_connections_per_ip=100)) == 896
    assert connection_budget(0, LimitsConfig()) == 0


@pytest.mark.parametrize(("limits", "path"), [
    ({"allowed_cidrs": ["10.0.0.1/8"]}, "limits.allowed_cidrs[0]"),
    ({"allowed_cidrs": "10.0.0.0/8"}, "limits.allowed_cidrs"),
    ({"max_connections_per_ip": -1}, "limits.max_connections_per_ip"),
    ({"max_subscriptions_per_client": "many"}, "limits.max_subscriptions_per_client"),
    ({"handshake_timeout": "0s"}, "limits.handshake_timeout"),
    ({"fd_reserve": 1}, "limits.fd_reserve"),
])
def test_bad_limits_name_their_key(limits: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError, match=path.replace("[", r"\[").replace("]", r"\]")):
        parse_config({"limits": limits})


def test_listener_allowed_cidrs_parse() -> None:
    config = parse_config({"server": {"tcp": {"plain": {"addr": ":0", "allowed_cidrs": ["192.168.0.0/16", "::1/128"]}}}})
    assert config.server.tcp[0].allowed_cidrs == (ipaddress.ip_network("192.168.0.0/16"), ipaddress.ip_network("::1/128"))
    assert parse_config({"ratelimit": {"subscribe": {"rate": 5, "burst": 10}}}).ratelimit.subscribe.burst == 10
