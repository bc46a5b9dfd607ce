"""Configuration parsing: defaults, the example files, every kind of error with its key path."""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction
from pathlib import Path
from types import MappingProxyType
from typing import Any
from unittest.mock import patch

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import config as config_module
from gateway.config import (
    check_config_file,
    default_config,
    format_duration,
    load_config,
    parse_addr,
    parse_config,
    parse_duration,
)
from gateway.config_types import GatewayConfig, ListenerConfig
from gateway.errors import ConfigError
from gateway.events import Protocol

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
ATOM_ENV = {"POLYGATE_ATOM_SERVICE_TOKEN": "token"}


def problems_of(data: object, **kwargs: Any) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, **kwargs)
    return info.value.problems


def only_tcp(**extra: Any) -> dict[str, Any]:
    """A `server` section with one ephemeral MQTT listener, plus `extra` keys."""
    return {"tcp": {"plain": {"addr": "127.0.0.1:0"}}, **extra}


@pytest.fixture
def all_providers(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend callout and atom are installed, to test their rules on their own."""
    monkeypatch.setattr("gateway.providers.available_providers", lambda: {"local", "none", "callout", "atom"})


@pytest.fixture
def all_kinds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend every frontend is built, to test listener rules on their own."""
    kinds = frozenset({"tcp", "websocket", "http", "coap", "amqp", "amqp091"})
    monkeypatch.setattr(config_module, "BUILT_LISTENER_KINDS", kinds)


@pytest.fixture
def core_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend only the core's frontends and providers are built (tcp, http; local, none)."""
    monkeypatch.setattr(config_module, "BUILT_LISTENER_KINDS", frozenset({"tcp", "http"}))
    monkeypatch.setattr("gateway.providers.available_providers", lambda: {"local", "none"})


@pytest.fixture
def pem_files(tmp_path: Path) -> dict[str, str]:
    files = {}
    for key in ("cert_file", "key_file", "ca_file"):
        path = tmp_path / f"{key}.pem"
        path.write_text("-----BEGIN PLACEHOLDER-----\n")
        files[key] = str(path)
    return files


# --------------------------------------------------------------------------- defaults and examples


def test_default_config_listens_on_loopback_with_built_frontends_only(core_only: None) -> None:
    config = default_config()
    assert [(lc.name, lc.host, lc.port) for lc in config.server.tcp] == [("server.tcp.plain", "127.0.0.1", 1883)]
    assert [(lc.name, lc.host, lc.port) for lc in config.server.http] == [("server.http.plain", "127.0.0.1", 8080)]
    assert config.server.health is not None
    assert (config.server.health.host, config.server.health.port) == ("127.0.0.1", 8081)
    assert config.server.coap == config.server.amqp == config.server.amqp091 == config.server.websocket == ()
    assert config.server.shutdown_timeout == 5.0
    assert config.auth.provider == "local"
    assert config.auth.local.db == "./polygate-auth.db"
    assert config.source is None


def test_defaults_open_a_frontend_once_it_is_built(all_kinds: None) -> None:
    config = default_config()
    assert [(lc.host, lc.port) for lc in config.server.coap] == [("127.0.0.1", 5683)]
    assert [lc.port for lc in config.server.amqp] == [5672]
    assert [lc.port for lc in config.server.amqp091] == [5682]
    assert config.server.websocket == ()  # DESIGN.md's defaults have no WebSocket listener


@pytest.mark.parametrize("data", [None, {}])
def test_empty_document_is_the_defaults(data: object) -> None:
    config = parse_config(data, source="empty.yaml")
    assert config == dataclasses.replace(default_config(), source="empty.yaml")


def test_empty_file_is_the_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(str(path)) == dataclasses.replace(default_config(), source=str(path))


@pytest.mark.parametrize("name", ["polygate.yaml", "minimal.yaml"])
def test_example_configs_are_valid_and_equal_the_defaults(name: str) -> None:
    path = str(CONFIGS / name)
    assert check_config_file(path) == []
    config = load_config(path)
    assert config.source == path
    assert dataclasses.replace(config, source=None) == default_config()


def test_example_config_documents_every_key() -> None:
    text = (CONFIGS / "polygate.yaml").read_text()
    keys = {"server", "auth", "ratelimit", "limits", "health_addr", "shutdown_timeout", "addr", "max_connections"}
    keys |= {"cert_file", "key_file", "ca_file", "client_auth", "path", "plain", "tls", "mtls"}
    keys |= {"min_version", "cipher_suites", "self_signed"}
    keys |= set(config_module._LISTENER_KINDS)
    keys |= set(config_module._AUTH) | set(config_module._RATELIMIT) | set(config_module._RATE)
    keys |= set(config_module._LIMITS)
    for section in ("atom", "local", "circuit_breaker", "tls"):
        keys |= {field.name for field in dataclasses.fields(type(getattr(GatewayConfig().auth, section) or config_module.TLSClientConfig()))}
    keys |= {protocol.value for protocol in Protocol}
    missing = sorted(key for key in keys if not re.search(rf"^\s*#?\s*{re.escape(key)}:", text, re.MULTILINE))
    assert missing == []


# --------------------------------------------------------------------------- every error names its key


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"auth": {"bogus": 1}}, "auth.bogus: unknown key"),
        ({"auth": {"timout": "1s"}}, "auth.timout: unknown key (did you mean 'timeout'?)"),
        ({"bogus": {}}, "bogus: unknown key"),
        ({"auth": {"timeout": "fast"}}, "auth.timeout: invalid duration 'fast' (use e.g. 500ms, 5s, 1h)"),
        ({"auth": {"timeout": 5}}, "auth.timeout: invalid duration 5 (a bare number has no unit; use e.g. 500ms, 5s, 1h)"),
        ({"auth": {"timeout": "0s"}}, "auth.timeout: must be longer than 0s (got '0s')"),
        ({"auth": {"authn_cache_ttl": "-1s"}}, "auth.authn_cache_ttl: negative duration '-1s' is not allowed"),
        ({"server": {"tcp": {"plain": {"addr": "127.0.0.1:70000"}}}}, "server.tcp.plain.addr: port 70000 out of range 0-65535"),
        ({"server": {"tcp": {"plain": {"addr": "nohost"}}}}, "server.tcp.plain.addr: address 'nohost' has no port"),
        ({"server": {"tcp": {"plain": {}}}}, 'server.tcp.plain.addr: required (write addr: "" to disable this listener)'),
        ({"server": {"tcp": {"plain": {"addr": 1883}}}}, "server.tcp.plain.addr: expected a string, got an integer (1883)"),
        ({"server": only_tcp(health_addr="8081")}, "server.health_addr: address '8081' has no port"),
        ({"server": only_tcp(shutdown_timeout="soon")}, "server.shutdown_timeout: invalid duration 'soon'"),
        ({"server": {"tcp": {"plain": {"addr": ":0", "max_connections": -1}}}}, "server.tcp.plain.max_connections: must be at least 0 (got -1)"),
        ({"server": {"tcp": {"plain": {"addr": ":0", "cert_file": "x"}}}}, "server.tcp.plain.cert_file: unknown key"),
        ({"server": {"tcp": {"quic": {"addr": ":0"}}}}, "server.tcp.quic: unknown key"),
        ({"server": {"tcp": {"plain": {"addr": ":0"}}, "http": []}}, "server.http: expected a mapping, got a list"),
        ({"auth": {"provider": "ldap"}}, "auth.provider: must be one of local, callout, atom, none"),
        ({"auth": {"provider": True}}, "auth.provider: expected a string, got a boolean (true) (YAML reads unquoted"),
        ({"auth": {"deny_publish_action": "kick"}}, "auth.deny_publish_action: must be one of drop, disconnect (got 'kick')"),
        ({"auth": {"deny_publish_action": False}}, "auth.deny_publish_action: expected one of drop, disconnect, got a boolean (false)"),
        ({"auth": {"transport": "amqp"}}, "auth.transport: must be one of grpc, http (got 'amqp')"),
        ({"auth": {"grpc_package": "x.v1"}}, "auth.grpc_package: must be one of auto, broker.auth.v1, fluxmq.auth.v1 (got 'x.v1')"),
        ({"auth": {"retries": -1}}, "auth.retries: must be at least 0 (got -1)"),
        ({"auth": {"retries": 1.5}}, "auth.retries: expected an integer, got a number (1.5)"),
        ({"auth": {"retries": True}}, "auth.retries: expected an integer, got a boolean (true)"),
        ({"auth": {"retries": "1"}}, "auth.retries: expected an integer, got a string ('1')"),
        ({"auth": {"url": 7016}}, "auth.url: expected a string, got an integer (7016)"),
        ({"auth": {"max_inflight": 0}}, "auth.max_inflight: must be at least 1 (got 0)"),
        ({"auth": {"stale_if_error": "later"}}, "auth.stale_if_error: invalid duration 'later'"),
        ({"auth": {"mtls_identity": "subject"}}, "auth.mtls_identity: must be one of common_name, san_dns, san_uri, san_email (got 'subject')"),
        ({"auth": {"require_tls_for_passwords": "yes"}}, "auth.require_tls_for_passwords: expected a boolean (true or false), got a string ('yes')"),
        ({"auth": {"identity_cache_size": 0}}, "auth.identity_cache_size: must be at least 1 (got 0)"),
        ({"auth": {"circuit_breaker": {"failures": 0}}}, "auth.circuit_breaker.failures: must be at least 1 (got 0)"),
        ({"auth": {"circuit_breaker": {"open_for": "0s"}}}, "auth.circuit_breaker.open_for: must be longer than 0s"),
        ({"auth": {"circuit_breaker": {"half_open": 1}}}, "auth.circuit_breaker.half_open: unknown key"),
        ({"auth": {"protocols": {"xmpp": True}}}, "auth.protocols.xmpp: unknown protocol (one of mqtt, http, coap, amqp, amqp091)"),
        ({"auth": {"protocols": {"mqtt": "off"}}}, "auth.protocols.mqtt: expected a boolean (true or false), got a string ('off')"),
        ({"auth": {"protocols": ["mqtt"]}}, "auth.protocols: expected a mapping, got a list"),
        ({"auth": {"atom": {"topic_format": "fluxmq"}}}, "auth.atom.topic_format: must be one of magistrala (got 'fluxmq')"),
        ({"auth": {"atom": {"unsupported_topic_policy": "ask"}}}, "auth.atom.unsupported_topic_policy: must be one of deny, allow"),
        ({"auth": {"atom": {"insecure": "yes"}}}, "auth.atom.insecure: expected a boolean (true or false), got a string ('yes')"),
        ({"auth": {"atom": {"service_token_env": "MY TOKEN"}}}, "auth.atom.service_token_env: 'MY TOKEN' is not an environment variable name"),
        ({"auth": {"local": {"db": ""}}}, "auth.local.db: required when auth.provider is local"),
        ({"auth": {"local": {"allow_anonymous": 1}}}, "auth.local.allow_anonymous: expected a boolean (true or false), got an integer (1)"),
        ({"auth": 5}, "auth: expected a mapping, got an integer (5)"),
        ({"ratelimit": {"enabled": "yes"}}, "ratelimit.enabled: expected a boolean (true or false), got a string ('yes')"),
        ({"ratelimit": {"connection": {"rate": 0}}}, "ratelimit.connection.rate: must be a number greater than 0 (got 0)"),
        ({"ratelimit": {"message": {"rate": float("inf")}}}, "ratelimit.message.rate: must be a number greater than 0 (got inf)"),
        ({"ratelimit": {"message": {"burst": 0}}}, "ratelimit.message.burst: must be at least 1 (got 0)"),
        ({"limits": {"max_message_size": -1}}, "limits.max_message_size: must be at least 1 (got -1)"),
        ({"limits": {"max_topic_length": 70000}}, "limits.max_topic_length: 70000 out of range 1-65535"),
        ({"limits": {"max_inflight_messages": 0}}, "limits.max_inflight_messages: 0 out of range 1-65535"),
        ({"limits": {"max_queued_messages": 0}}, "limits.max_queued_messages: must be at least 1 (got 0)"),
        ({"limits": {"max_retained_messages": -5}}, "limits.max_retained_messages: must be at least 0 (got -5)"),
        ({"limits": {1024: 1}}, "limits: key 1024 is not text"),
        (["server"], "(top level): expected a mapping"),
    ],
)
def test_each_problem_names_its_key_path(data: object, expected: str) -> None:
    problems = problems_of(data)
    assert any(problem.startswith(expected) for problem in problems), problems


def test_many_problems_are_reported_together(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(
        """
server:
  tcp:
    plain: {addr: "127.0.0.1:70000"}
  http:
    plain: {addr: ":8080", max_connections: -3}
  health_addr: ":8080"
auth:
  provider: ldap
  timeout: fast
  bogus: 1
  deny_publish_action: no
ratelimit:
  message: {rate: 0}
limits:
  max_topic_length: 0
"""
    )
    with pytest.raises(ConfigError) as info:
        load_config(str(path))
    expected = [
        "server.tcp.plain.addr: port 70000",
        "server.http.plain.max_connections:",
        "server.health_addr: port 8080 is already taken by server.http.plain",
        "auth.provider: must be one of",
        "auth.timeout: invalid duration 'fast'",
        "auth.bogus: unknown key",
        "auth.deny_publish_action: expected one of drop, disconnect, got a boolean (false)",
        "ratelimit.message.rate:",
        "limits.max_topic_length:",
    ]
    problems = info.value.problems
    for prefix in expected:
        assert any(p.startswith(prefix) for p in problems), (prefix, problems)
    assert len(problems) == len(expected)
    assert check_config_file(str(path)) == list(problems)
    assert all(f"  {p}" in str(info.value) for p in problems)


# --------------------------------------------------------------------------- files and YAML


def test_yaml_syntax_error_gives_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("auth:\n  provider: local\n  timeout: [2s\n")
    [problem] = check_config_file(str(path))
    assert problem.startswith(f"{path}: line ")
    assert re.search(r"line \d+, column \d+: YAML syntax error: ", problem), problem


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(str(missing))
    assert info.value.problems == (f"{missing}: cannot read the file: No such file or directory",)
    assert check_config_file(str(tmp_path))[0].startswith(f"{tmp_path}: cannot read the file")


def test_non_utf8_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"auth:\n  provider: \xe9\n")
    assert check_config_file(str(path)) == [f"{path}: not UTF-8 text (bad byte at offset 18)"]


def test_duplicate_keys_are_reported_with_their_path(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(
        "server:\n  tcp:\n    plain: {addr: '127.0.0.1:0'}\n    plain: {addr: '127.0.0.1:1'}\n"
        "defaults: &d {rate: 5}\n"
    )
    problems = check_config_file(str(path))
    assert "server.tcp.plain: duplicate key on line 4 (first on line 3); YAML would silently keep only the last" in problems
    assert "defaults: unknown key" in problems


def test_yaml_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    path = tmp_path / "merge.yaml"
    path.write_text(
        "ratelimit:\n  connection: &rate {enabled: true, rate: 5, burst: 10}\n"
        "  message:\n    <<: *rate\n    rate: 7\n"
    )
    config = load_config(str(path))
    assert (config.ratelimit.message.rate, config.ratelimit.message.burst) == (7.0, 10)


def test_yaml_yes_is_a_boolean_and_not_a_string(tmp_path: Path) -> None:
    path = tmp_path / "yes.yaml"
    path.write_text("auth:\n  provider: yes\n")
    [problem] = check_config_file(str(path))
    assert problem.startswith("auth.provider: expected a string, got a boolean (true)")
    assert "quote the value" in problem


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("500ms", 0.5),
        ("5s", 5.0),
        ("1m", 60.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1m30s500ms", 90.5),
        ("0s", 0.0),
        ("0", 0.0),
        (0, 0.0),
        ("250us", 0.00025),
        ("250µs", 0.00025),
        ("10ns", 1e-8),
        ("1.5h", 5400.0),
        (".5s", 0.5),
        ("2.s", 2.0),
    ],
)
def test_parse_duration_accepts_go_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["fast", "5", "1.5", 5, 0.0, 1.5, True, False, None, "", "s", "1h 30m", "1d", "5S", "1e3s", "+5s", "5s5"])
def test_parse_duration_refuses_bare_numbers_and_garbage(text: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["-5s", "-0s", "-1h30m"])
def test_parse_duration_refuses_negative(text: str) -> None:
    with pytest.raises(ValueError, match="negative duration"):
        parse_duration(text)


def test_parse_duration_refuses_absurdly_large() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_duration("9999999999999h")


UNITS = {"ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "ms": Fraction(1, 1000), "s": Fraction(1), "m": Fraction(60), "h": Fraction(3600)}


@given(st.lists(st.tuples(st.integers(0, 10**6), st.sampled_from(sorted(UNITS))), min_size=1, max_size=6))
def test_parse_duration_sums_concatenated_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{count}{unit}" for count, unit in parts)
    total = sum(count * UNITS[unit] for count, unit in parts)
    if total > config_module._MAX_DURATION:
        with pytest.raises(ValueError, match="too large"):
            parse_duration(text)
    else:
        assert parse_duration(text) == float(total)


@given(st.integers(0, 10**15))
def test_format_duration_round_trips(nanoseconds: int) -> None:
    seconds = nanoseconds / 10**9
    text = format_duration(seconds)
    assert re.fullmatch(r"(\d+(h|m|s|ms|us|ns))+", text)
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(("seconds", "text"), [(0, "0s"), (0.5, "500ms"), (5400, "1h30m"), (3600, "1h"), (1.5, "1s500ms")])
def test_format_duration_spelling(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (":1883", ("", 1883)),
        ("127.0.0.1:0", ("127.0.0.1", 0)),
        ("[::1]:1883", ("::1", 1883)),
        ("[::]:80", ("::", 80)),
        ("localhost:80", ("localhost", 80)),
        ("atom:8081", ("atom", 8081)),
        ("auth.example.com:65535", ("auth.example.com", 65535)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
    ],
)
def test_parse_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty address"),
        ("localhost", "has no port"),
        ("localhost:", "has no port"),
        ("[::1]", "has no port"),
        ("[::1", "no closing"),
        ("[nope]:1", "not an IPv6 address"),
        ("::1:1883", "needs brackets"),
        (":65536", "port 65536 out of range 0-65535"),
        (":-1", "port '-1' is not a number"),
        (":http", "port 'http' is not a number"),
        ("300.1.1.1:80", "not a valid host name or IPv4 address"),
        ("bad host:80", "not a valid host name or IPv4 address"),
    ],
)
def test_parse_addr_errors(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_addr(text)


@given(st.integers(0, 65535), st.sampled_from(["", "127.0.0.1", "localhost", "[::1]", "[fe80::1]"]))
def test_parse_addr_round_trips_ports(port: int, host: str) -> None:
    assert parse_addr(f"{host}:{port}") == (host.strip("[]"), port)


# --------------------------------------------------------------------------- auth.protocols


def test_protocols_omitted_or_empty_means_all_checked() -> None:
    for auth in ({}, {"protocols": {}}, {"protocols": None}):
        protocols = parse_config({"auth": auth}).auth.protocols
        assert isinstance(protocols, MappingProxyType)
        assert dict(protocols) == {protocol: True for protocol in Protocol}


def test_protocols_not_listed_stay_checked() -> None:
    protocols = parse_config({"auth": {"protocols": {"amqp091": False, "http": True}}}).auth.protocols
    assert dict(protocols) == {Protocol.MQTT: True, Protocol.HTTP: True, Protocol.COAP: True, Protocol.AMQP: True, Protocol.AMQP091: False}
    with pytest.raises(TypeError):
        protocols[Protocol.MQTT] = False  # type: ignore[index]


# --------------------------------------------------------------------------- listeners


def test_server_written_opens_only_the_blocks_written() -> None:
    server = parse_config({"server": only_tcp()}).server
    assert [lc.name for lc in server.tcp] == ["server.tcp.plain"]
    assert server.http == () and server.health is None


def test_empty_addr_disables_a_listener() -> None:
    server = parse_config({"server": {"tcp": {"plain": {"addr": ""}}, "http": {"plain": {"addr": "127.0.0.1:0"}}}}).server
    assert server.tcp == ()
    assert [lc.name for lc in server.http] == ["server.http.plain"]


def test_disabled_listener_of_an_unbuilt_kind_is_fine(core_only: None) -> None:
    server = parse_config({"server": only_tcp(coap={"plain": {"addr": ""}}, health_addr="")}).server
    assert server.coap == () and server.health is None


@pytest.mark.parametrize("server", [{}, None, {"tcp": {"plain": {"addr": ""}}, "health_addr": ""}])
def test_server_with_nothing_enabled_is_an_error(server: object) -> None:
    assert problems_of({"server": server}) == (
        "server: no listener is enabled (write a listener block, or leave out `server` for the defaults)",
    )


def test_a_bad_only_listener_is_reported_once() -> None:
    assert problems_of({"server": {"tcp": {"plain": {"addr": "127.0.0.1"}}}}) == (
        "server.tcp.plain.addr: address '127.0.0.1' has no port (use host:port, e.g. 127.0.0.1:1883, :1883 or [::1]:1883)",
    )


def test_listener_fields() -> None:
    server = parse_config({"server": {"tcp": {"plain": {"addr": "[::1]:0", "max_connections": 7}}, "health_addr": ":0"}}).server
    assert server.tcp == (ListenerConfig(name="server.tcp.plain", addr="[::1]:0", host="::1", port=0, max_connections=7),)
    assert server.health == ListenerConfig(name="server.health_addr", addr=":0", host="", port=0)
    assert not server.tcp[0].tls


def test_tls_and_mtls_listeners(pem_files: dict[str, str]) -> None:
    tls = {"addr": "127.0.0.1:0", "cert_file": pem_files["cert_file"], "key_file": pem_files["key_file"]}
    server = parse_config({"server": {"tcp": {"tls": tls, "mtls": {**tls, "ca_file": pem_files["ca_file"]}}}}).server
    by_name = {lc.name: lc for lc in server.tcp}
    assert by_name["server.tcp.tls"].tls and by_name["server.tcp.tls"].client_auth == "none"
    assert by_name["server.tcp.tls"].ca_file is None
    assert by_name["server.tcp.mtls"].client_auth == "require"
    assert by_name["server.tcp.mtls"].ca_file == pem_files["ca_file"]


def test_tls_listener_file_errors_name_the_key(pem_files: dict[str, str], tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.pem")
    tls = {"addr": ":0", "cert_file": missing, "key_file": str(tmp_path)}
    problems = problems_of({"server": {"tcp": {"tls": tls, "mtls": {"addr": ":0", **{k: v for k, v in pem_files.items() if k != "ca_file"}}}}})
    assert problems == (
        f"server.tcp.tls.cert_file: file not found: {missing!r}",
        f"server.tcp.tls.key_file: not a regular file: {str(tmp_path)!r}",
        "server.tcp.mtls.ca_file: required for an mTLS listener",
    )


def test_tls_client_auth_needs_a_ca(pem_files: dict[str, str]) -> None:
    tls = {"addr": ":0", "cert_file": pem_files["cert_file"], "key_file": pem_files["key_file"], "client_auth": "optional"}
    assert problems_of({"server": {"http": {"tls": tls}}}) == ("server.http.tls.ca_file: required when client_auth is optional",)
    assert problems_of({"server": {"tcp": {"tls": {**tls, "client_auth": "always"}}}}) == (
        "server.tcp.tls.client_auth: must be one of none, request, require (got 'always')",
    )


def test_disabled_tls_listener_does_not_need_files() -> None:
    server = parse_config({"server": only_tcp(http={"tls": {"addr": "", "cert_file": "/nonexistent.pem"}})}).server
    assert server.http == ()


def test_websocket_path(all_kinds: None) -> None:
    server = parse_config({"server": {"websocket": {"plain": {"addr": ":0"}, "tls": {"addr": "", "path": "/ws"}}}}).server
    assert [lc.path for lc in server.websocket] == ["/mqtt"]
    assert problems_of({"server": {"websocket": {"plain": {"addr": ":0", "path": "mqtt"}}}}) == (
        "server.websocket.plain.path: must be a URL path starting with '/' (got 'mqtt')",
    )


@pytest.mark.parametrize(
    ("first", "second"),
    [("127.0.0.1:1883", "127.0.0.1:1883"), (":1883", "127.0.0.1:1883"), ("127.0.0.1:1883", "0.0.0.0:1883"), ("[::1]:1883", "[::]:1883")],
)
def test_two_listeners_on_one_port_is_an_error(first: str, second: str) -> None:
    problems = problems_of({"server": {"tcp": {"plain": {"addr": first}}, "http": {"plain": {"addr": second}}}})
    assert problems == (f"server.http.plain.addr: port 1883 is already taken by server.tcp.plain ({first!r})",)


def test_listeners_may_share_port_zero_or_differ_by_host_or_transport(all_kinds: None) -> None:
    server = parse_config(
        {
            "server": {
                "tcp": {"plain": {"addr": "127.0.0.1:0"}},
                "http": {"plain": {"addr": "127.0.0.1:0"}},
                "amqp": {"plain": {"addr": "127.0.0.1:5672"}},
                "amqp091": {"plain": {"addr": "127.0.0.2:5672"}},
                "coap": {"plain": {"addr": ":5672"}},  # UDP: no clash with TCP listeners
                "health_addr": "127.0.0.1:0",
            }
        }
    ).server
    assert len(server.tcp + server.http + server.amqp + server.amqp091 + server.coap) == 5


@pytest.mark.parametrize(
    ("kind", "title"),
    [("coap", "CoAP"), ("amqp", "AMQP 1.0"), ("amqp091", "AMQP 0.9.1"), ("websocket", "MQTT over WebSocket")],
)
def test_unbuilt_frontend_is_a_startup_error(kind: str, title: str, core_only: None) -> None:
    problems = problems_of({"server": only_tcp(**{kind: {"plain": {"addr": "127.0.0.1:0"}}})})
    assert problems == (f"server.{kind}.plain: the {title} frontend is not available in this version yet",)


# --------------------------------------------------------------------------- providers


@pytest.mark.parametrize("provider", ["callout", "atom"])
def test_unbuilt_provider_is_a_startup_error(provider: str, core_only: None) -> None:
    problems = problems_of({"auth": {"provider": provider, "url": "127.0.0.1:7016", "atom": {"grpc_addr": "atom:8081"}}}, environ=ATOM_ENV)
    assert problems == (f"auth.provider: {provider!r} is not available in this version yet",)


def test_unknown_provider_lists_the_choices_with_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("gateway.providers.available_providers", lambda: {"local", "none", "jwt"})
    assert problems_of({"auth": {"provider": "ldap"}}) == ("auth.provider: must be one of local, callout, atom, none, jwt (got 'ldap')",)
    assert parse_config({"auth": {"provider": "jwt"}}).auth.provider == "jwt"


def test_provider_none_and_local() -> None:
    assert parse_config({"auth": {"provider": "none"}}).auth.provider == "none"
    assert parse_config({"auth": {"provider": "local"}}).auth.provider == "local"


@pytest.mark.parametrize("auth", [{"url": "127.0.0.1:7016"}, {"provider": "", "url": "http://auth:8080", "transport": "http"}])
def test_empty_provider_with_url_means_callout(all_providers: None, auth: dict[str, Any]) -> None:
    assert parse_config({"auth": auth}).auth.provider == "callout"


def test_empty_provider_without_url_means_local() -> None:
    assert parse_config({"auth": {"provider": ""}}).auth.provider == "local"


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ({"provider": "callout"}, "auth.url: required when auth.provider is callout"),
        ({"url": "127.0.0.1:7016", "transport": "http"}, "auth.url: transport http needs an http:// or https:// URL (got '127.0.0.1:7016')"),
        ({"url": "ftp://auth:21"}, "auth.url: scheme must be http or https (got 'ftp://auth:21')"),
        ({"url": "https://user:secret@auth:1/x?y=1", "transport": "http"}, "auth.url: must not have a query or fragment (got 'https://***@auth:1/x?y=1')"),
        ({"url": "auth:0"}, "auth.url: needs a host and a non-zero port, e.g. atom:8081 (got 'auth:0')"),
        ({"url": "http://auth:7016", "tls": {}}, "auth.tls: set, but auth.url 'http://auth:7016' is not TLS: use https://"),
        ({"url": "auth:7016", "tls": {"cert_file": "/x.pem"}}, "auth.tls.key_file: required when auth.tls.cert_file is set"),
        ({"url": "auth:7016", "tls": {"ca_file": "/nonexistent/ca.pem"}}, "auth.tls.ca_file: file not found: '/nonexistent/ca.pem'"),
    ],
)
def test_callout_rules(all_providers: None, auth: dict[str, Any], expected: str) -> None:
    problems = problems_of({"auth": auth})
    assert expected in problems
    assert not any("secret" in problem for problem in problems)


def test_callout_valid_with_tls(all_providers: None, pem_files: dict[str, str]) -> None:
    auth = parse_config({"auth": {"provider": "callout", "url": "https://auth:7016", "transport": "http", "tls": pem_files}}).auth
    assert auth.tls is not None and auth.tls.cert_file == pem_files["cert_file"]
    assert parse_config({"auth": {"url": "auth:7016", "tls": None}}).auth.tls is None


def test_atom_requires_its_address(all_providers: None) -> None:
    assert problems_of({"auth": {"provider": "atom"}}, environ=ATOM_ENV) == ("auth.atom.grpc_addr: required when auth.provider is atom",)


@pytest.mark.parametrize("environ", [{}, {"POLYGATE_ATOM_SERVICE_TOKEN": ""}])
def test_atom_token_env_var_must_be_set(all_providers: None, environ: dict[str, str]) -> None:
    problems = problems_of({"auth": {"provider": "atom", "atom": {"grpc_addr": "atom:8081"}}}, environ=environ)
    assert problems == (
        "auth.atom.service_token_env: environment variable POLYGATE_ATOM_SERVICE_TOKEN is not set or empty (Atom needs a service token)",
    )


def test_atom_valid(all_providers: None) -> None:
    auth = parse_config(
        {"auth": {"provider": "atom", "atom": {"grpc_addr": "atom:8081", "service_token_env": "TOK", "alias_cache_ttl": "1m"}}},
        environ={"TOK": "t"},
    ).auth
    assert (auth.provider, auth.atom.grpc_addr, auth.atom.alias_cache_ttl) == ("atom", "atom:8081", 60.0)


def test_atom_ca_file_needs_tls(all_providers: None) -> None:
    problems = problems_of({"auth": {"provider": "atom", "atom": {"grpc_addr": "atom:8081", "ca_file": "/ca.pem"}}}, environ=ATOM_ENV)
    assert problems == ("auth.atom.ca_file: only used with TLS: set auth.atom.insecure to false, or remove it",)


def test_other_providers_settings_are_not_checked() -> None:
    # auth.atom.* only matters when atom is chosen: a local setup keeps the example's values.
    auth = parse_config({"auth": {"provider": "local", "atom": {"grpc_addr": ""}}}, environ={}).auth
    assert auth.provider == "local"


# --------------------------------------------------------------------------- ratelimit and limits


def test_partial_rate_blocks_keep_their_own_defaults() -> None:
    ratelimit = parse_config({"ratelimit": {"enabled": True, "message": {"rate": 10}, "connection": {"enabled": False}}}).ratelimit
    assert ratelimit.enabled
    assert (ratelimit.message.enabled, ratelimit.message.rate, ratelimit.message.burst) == (True, 10.0, 2000)
    assert (ratelimit.connection.enabled, ratelimit.connection.rate, ratelimit.connection.burst) == (False, 50.0, 200)


def test_limits_values() -> None:
    limits = parse_config({"limits": {"max_message_size": 10, "max_topic_length": 65535, "max_retained_messages": 0}}).limits
    assert (limits.max_message_size, limits.max_topic_length, limits.max_retained_messages) == (10, 65535, 0)
    assert limits.max_inflight_messages == 100


# --------------------------------------------------------------------------- robustness

yaml_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
    max_leaves=12,
)
section_keys = st.sampled_from(["server", "auth", "ratelimit", "limits", "tcp", "plain", "addr", "provider", "timeout", "protocols", "message", "rate"])


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(section_keys, yaml_values | st.dictionaries(section_keys, yaml_values, max_size=4), max_size=4))
def test_any_document_parses_or_raises_config_error(data: dict[str, object]) -> None:
    # Scanning the installed entry points costs more than the parse; fix the answer.
    try:
        with patch("gateway.providers.available_providers", return_value={"local", "none"}):
            config = parse_config(data, environ={})
    except ConfigError as exc:
        assert exc.problems
        tops = ("(top level)", "server", "auth", "ratelimit", "limits", "tcp", "plain", "addr", "provider", "timeout", "protocols", "message", "rate")
        assert all(re.match(r"^(\[.*?\]|[^.:\[]+)", problem).group(0) in tops for problem in exc.problems), exc.problems
    else:
        assert isinstance(config, GatewayConfig)


def test_safe_load_round_trip_of_the_example() -> None:
    # The example must stay loadable by plain yaml.safe_load (other tools read it).
    data = yaml.safe_load((CONFIGS / "polygate.yaml").read_text())
    assert set(data) == {"server", "auth", "ratelimit", "limits", "storage", "mqtt"}


# -- delivery: queues, the memory watermark, storage, sessions ---------------------------------------


def test_delivery_defaults_are_the_documented_ones() -> None:
    config = default_config()
    limits = config.limits
    assert limits.max_queued_messages == 100_000
    assert limits.max_queued_bytes == 256_000_000
    assert dict(limits.queue_overflow) == {
        Protocol.MQTT: "drop_oldest", Protocol.AMQP091: "reject_new", Protocol.AMQP: "reject_new",
        Protocol.HTTP: "drop_oldest", Protocol.COAP: "drop_oldest",
    }
    assert limits.memory_high_watermark == int(0.4 * config_module.total_memory())
    assert (config.storage.backend, config.storage.path, config.storage.fsync) == ("sqlite", "./polygate-data", "batch")
    assert config.mqtt.session_expiry == 7200.0


def test_delivery_keys_parse_into_typed_values() -> None:
    config = parse_config({
        "limits": {"max_queued_bytes": "64MiB", "queue_overflow": {"mqtt": "block", "coap": "reject_new"},
                   "memory_high_watermark": "2GB"},
        "storage": {"backend": "memory", "path": "/var/lib/x", "fsync": "always"},
        "mqtt": {"session_expiry": "30m"},
    })
    assert config.limits.max_queued_bytes == 64 * 1024 * 1024
    assert config.limits.queue_overflow[Protocol.MQTT] == "block"
    assert config.limits.queue_overflow[Protocol.COAP] == "reject_new"
    assert config.limits.queue_overflow[Protocol.AMQP091] == "reject_new"  # the others keep their default
    assert config.limits.memory_high_watermark == 2_000_000_000
    assert (config.storage.backend, config.storage.fsync) == ("memory", "always")
    assert config.mqtt.session_expiry == 1800.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.storage.fsync = "never"  # type: ignore[misc]


@pytest.mark.parametrize("value, expected", [(0.5, 0.5), (0, 0.0), (1, 1.0)])
def test_memory_watermark_as_a_fraction_of_ram(value: float, expected: float) -> None:
    config = parse_config({"limits": {"memory_high_watermark": value}})
    assert config.limits.memory_high_watermark == int(expected * config_module.total_memory())


def test_delivery_key_errors_name_the_key() -> None:
    problems = problems_of({
        "limits": {"max_queued_bytes": "lots", "queue_overflow": {"mqt": "block", "amqp": "sometimes"},
                   "memory_high_watermark": 1.5},
        "storage": {"backend": "postgres", "fsync": "maybe", "path": 3},
        "mqtt": {"session_expiry": "0s", "keep": True},
    })
    expected = [
        "limits.max_queued_bytes: invalid size 'lots'",
        "limits.queue_overflow.mqt: unknown protocol (did you mean 'mqtt'?)",
        "limits.queue_overflow.amqp: must be one of drop_oldest, reject_new, block (got 'sometimes')",
        "limits.memory_high_watermark: a fraction of RAM must be between 0 and 1",
        "storage.backend: must be one of sqlite, memory (got 'postgres')",
        "storage.fsync: must be one of always, batch, never (got 'maybe')",
        "storage.path: expected a string",
        "mqtt.session_expiry: must be longer than 0s",
        "mqtt.keep: unknown key",
    ]
    for start in expected:
        assert any(problem.startswith(start) for problem in problems), (start, problems)


def test_sqlite_storage_needs_a_path() -> None:
    assert problems_of({"storage": {"path": ""}}) == (
        "storage.path: required when storage.backend is sqlite (a directory)",)


@given(st.integers(min_value=0, max_value=10**15), st.sampled_from(["", "B", "KB", "MB", "GB", "KiB", "MiB", "GiB"]))
def test_parse_size_reads_every_unit(number: int, unit: str) -> None:
    factors = {"": 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
    assert config_module.parse_size(f"{number}{unit}") == number * factors[unit]
    assert config_module.parse_size(f"{number} {unit.lower()}") == number * factors[unit]


@pytest.mark.parametrize("text", ["", "MB", "-1MB", "1.5.2MB", "10 parsecs", True, None, [1]])
def test_parse_size_refuses_what_is_no_size(text: object) -> None:
    with pytest.raises(ValueError):
        config_module.parse_size(text)


# --------------------------------------------------------------------------- listener TLS settings (issue 19)

_TCP_KINDS = ("tcp", "websocket", "http", "amqp", "amqp091")


def test_every_tcp_listener_kind_takes_tls_and_mtls(all_kinds: None, pem_files: dict[str, str]) -> None:
    files = {"cert_file": pem_files["cert_file"], "key_file": pem_files["key_file"]}
    server: dict[str, Any] = {}
    for index, kind in enumerate(_TCP_KINDS):
        server[kind] = {
            "tls": {"addr": f"127.0.0.1:{20000 + index}", **files, "ca_file": pem_files["ca_file"], "client_auth": "optional",
                    "min_version": "tls1.3", "cipher_suites": "ECDHE+AESGCM"},
            "mtls": {"addr": f"127.0.0.1:{21000 + index}", **files, "ca_file": pem_files["ca_file"]},
        }
    parsed = parse_config({"server": server}).server
    for kind in _TCP_KINDS:
        tls, mtls = getattr(parsed, kind)
        assert (tls.name, tls.client_auth, tls.min_version, tls.cipher_suites) == (f"server.{kind}.tls", "request", "tls1.3", "ECDHE+AESGCM")
        assert (mtls.name, mtls.client_auth, mtls.min_version, mtls.cipher_suites, mtls.self_signed) == (
            f"server.{kind}.mtls", "require", "tls1.2", "", False)
        assert tls.tls and mtls.tls


def test_self_signed_needs_no_certificate_files(all_kinds: None) -> None:
    server = parse_config({"server": {"amqp091": {"tls": {"addr": ":0", "self_signed": True}}}}).server
    (listener,) = server.amqp091
    assert listener.self_signed and listener.tls and listener.cert_file is None


def test_listener_tls_errors_name_the_key(all_kinds: None, pem_files: dict[str, str]) -> None:
    files = {"cert_file": pem_files["cert_file"], "key_file": pem_files["key_file"]}
    problems = problems_of({"server": {
        "http": {"tls": {"addr": ":0", **files, "min_version": "tls1.1"}},
        "amqp": {"tls": {"addr": ":1", **files, "cipher_suites": "NO-SUCH-CIPHER"}},
        "websocket": {"mtls": {"addr": ":2", **files, "ca_file": pem_files["ca_file"], "client_auth": "none"}},
        "tcp": {"tls": {"addr": ":3", "cert_file": pem_files["cert_file"], "self_signed": True}},
        "amqp091": {"tls": {"addr": ":4", "self_signed": "yes"}, "mtls": {"addr": ":5", "self_signed": True}},
    }})
    assert problems == (
        "server.tcp.tls.cert_file: not allowed with self_signed: true (the certificate is made at start)",
        "server.websocket.mtls.client_auth: an mtls listener always requires client certificates (leave it out, or use a tls block)",
        "server.http.tls.min_version: must be one of tls1.2, tls1.3 (got 'tls1.1')",
        "server.amqp.tls.cipher_suites: OpenSSL accepts no cipher in 'NO-SUCH-CIPHER' (see `openssl ciphers`)",
        "server.amqp091.tls.self_signed: expected a boolean (true or false), got a string ('yes')",
        "server.amqp091.tls.cert_file: required for a TLS listener",
        "server.amqp091.tls.key_file: required for a TLS listener",
        "server.amqp091.mtls.ca_file: required for an mTLS listener",
    )


_NO_DTLS = (
    "aiocoap's DTLS server side takes pre-shared keys only and is experimental; terminate DTLS in "
    "front of the gateway (a DTLS proxy) and forward plain CoAP to a `plain` listener"
)


def test_coap_dtls_is_refused_with_the_reason() -> None:
    dtls = {"addr": ":5684", "cert_file": "server.pem", "key_file": "server-key.pem"}
    assert problems_of({"server": only_tcp(coap={"plain": {"addr": ":0"}, "dtls": dtls})}) == (
        f"server.coap.dtls: CoAP over DTLS is not supported: {_NO_DTLS}",
    )


def test_coap_takes_no_tls_block() -> None:
    assert problems_of({"server": only_tcp(coap={"tls": {"addr": ":0", "self_signed": True}, "mtls": None})}) == (
        f"server.coap.tls: CoAP runs over UDP, where TLS does not apply, and CoAP over DTLS is not supported: {_NO_DTLS}",
        f"server.coap.mtls: CoAP runs over UDP, where TLS does not apply, and CoAP over DTLS is not supported: {_NO_DTLS}",
    )
    # Any other unknown block is still just that.
    assert problems_of({"server": only_tcp(coap={"plian": {"addr": ":0"}})}) == (
        "server.coap.plian: unknown key (did you mean 'plain'?)",
    )


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_any_cipher_string_is_accepted_or_named(cipher_suites: str) -> None:
    data = {"server": only_tcp(tcp={"tls": {"addr": ":0", "self_signed": True, "cipher_suites": cipher_suites}})}
    try:
        parse_config(data)
    except ConfigError as exc:
        assert len(exc.problems) == 1 and exc.problems[0].startswith("server.tcp.tls.cipher_suites: ")


def test_certificate_identity_and_plaintext_password_settings() -> None:
    defaults = parse_config({}).auth
    assert (defaults.mtls_identity, defaults.require_tls_for_passwords) == ("common_name", False)
    for field in ("common_name", "san_dns", "san_uri", "san_email"):
        auth = parse_config({"auth": {"mtls_identity": field, "require_tls_for_passwords": True}}).auth
        assert (auth.mtls_identity, auth.require_tls_for_passwords) == (field, True)
