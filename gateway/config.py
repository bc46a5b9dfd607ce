"""Parse and validate the YAML configuration into the frozen objects of `gateway.config_types`.

One pass collects every problem with its YAML key path, so `polygate
check-config` shows them all at once and `polygate run` never starts a
half-configured gateway. The shape of each section is a table of converters;
rules that involve several keys (the chosen provider's requirements, listener
ports that clash, features not built yet) run after the tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from fractions import Fraction
from types import MappingProxyType
from typing import Any, Final

import yaml

from gateway import providers as _providers
from gateway.frontends.registry import built_kinds
from gateway.config_types import (
    AtomConfig,
    AuthConfig,
    CircuitBreakerConfig,
    GatewayConfig,
    LimitsConfig,
    ListenerConfig,
    LocalConfig,
    MQTTConfig,
    OVERFLOW_POLICIES,
    RateConfig,
    RatelimitConfig,
    ServerConfig,
    StorageConfig,
    TLSClientConfig,
    total_memory,
)
from gateway.config_types import Argon2Config, FailedLoginsConfig
from gateway.errors import ConfigError
from gateway.events import Protocol

__all__ = [
    "BUILT_LISTENER_KINDS",
    "AtomConfig",
    "AuthConfig",
    "CircuitBreakerConfig",
    "ConfigError",
    "GatewayConfig",
    "LimitsConfig",
    "ListenerConfig",
    "LocalConfig",
    "MQTTConfig",
    "RateConfig",
    "RatelimitConfig",
    "ServerConfig",
    "StorageConfig",
    "TLSClientConfig",
    "check_config_file",
    "default_config",
    "format_duration",
    "load_config",
    "parse_addr",
    "parse_config",
    "parse_duration",
    "parse_size",
]

#: Listener kinds whose frontend exists. Enabling any other kind is a startup
#: error, and the built-in defaults only open these.
BUILT_LISTENER_KINDS: frozenset[str] = built_kinds()

#: Providers DESIGN.md names; third-party names come from the entry-point group.
KNOWN_PROVIDERS: Final = ("local", "callout", "atom", "none")

_HEALTH_NAME: Final = "server.health_addr"


@dataclass(frozen=True, slots=True)
class _ListenerKind:
    #: How users call the frontend, for "the CoAP frontend is not available...".
    title: str
    #: Listener blocks the section accepts, in the order they are read.
    names: tuple[str, ...]
    #: "udp" listeners cannot clash with TCP ones on the same port.
    transport: str
    #: Address of the built-in default `plain` listener ("" = none by default).
    default_addr: str


_LISTENER_KINDS: Final[Mapping[str, _ListenerKind]] = MappingProxyType(
    {
        "tcp": _ListenerKind("MQTT", ("plain", "tls", "mtls"), "tcp", "127.0.0.1:1883"),
        "websocket": _ListenerKind("MQTT over WebSocket", ("plain", "tls", "mtls"), "tcp", ""),
        "http": _ListenerKind("HTTP", ("plain", "tls", "mtls"), "tcp", "127.0.0.1:8080"),
        "coap": _ListenerKind("CoAP", ("plain",), "udp", "127.0.0.1:5683"),
        "amqp": _ListenerKind("AMQP 1.0", ("plain", "tls", "mtls"), "tcp", "127.0.0.1:5672"),
        "amqp091": _ListenerKind("AMQP 0.9.1", ("plain", "tls", "mtls"), "tcp", "127.0.0.1:5682"),
    }
)
_DEFAULT_HEALTH_ADDR: Final = "127.0.0.1:8081"


# --------------------------------------------------------------------------- durations

_DURATION_UNITS: Final[Mapping[str, Fraction]] = MappingProxyType(
    {
        "ns": Fraction(1, 10**9),
        "us": Fraction(1, 10**6),
        "µs": Fraction(1, 10**6),  # U+00B5, as Go writes it
        "μs": Fraction(1, 10**6),  # U+03BC, the Greek letter
        "ms": Fraction(1, 1000),
        "s": Fraction(1),
        "m": Fraction(60),
        "h": Fraction(3600),
    }
)
# Longer units first so "ms" is not read as "m" followed by garbage.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", re.ASCII)
# Go's limit (int64 nanoseconds); beyond it a value is surely a typo.
_MAX_DURATION: Final = Fraction(2**63 - 1, 10**9)
_DURATION_HINT: Final = "use e.g. 500ms, 5s, 1h"


def parse_duration(text: object) -> float:
    """Seconds in a Go-style duration ("500ms", "5s", "1h30m", "250us").

    A bare number has no unit and is refused, except 0 (YAML `0` or "0").
    Raises ValueError with a message that says what to write instead.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"invalid duration {_show(text)} ({_DURATION_HINT})")
    if isinstance(text, int):
        if text == 0:
            return 0.0
        raise ValueError(f"invalid duration {text} (a bare number has no unit; {_DURATION_HINT})")
    value = text.strip()
    if value == "0":
        return 0.0
    if value.startswith("-"):
        raise ValueError(f"negative duration {_quote(text)} is not allowed")
    total = Fraction(0)
    position = 0
    while position < len(value):
        match = _DURATION_PART.match(value, position)
        if match is None:
            break
        total += Fraction(match.group(1)) * _DURATION_UNITS[match.group(2)]
        position = match.end()
    if not value or position != len(value):
        raise ValueError(f"invalid duration {_quote(text)} ({_DURATION_HINT})")
    if total > _MAX_DURATION:
        raise ValueError(f"duration {_quote(text)} is too large")
    return float(total)


def format_duration(seconds: float) -> str:
    """The shortest Go-style spelling of `seconds`, rounded to nanoseconds ("1h30m", "500ms")."""
    if seconds < 0 or not math.isfinite(seconds):
        raise ValueError(f"cannot format {seconds!r} as a duration")
    remaining = round(seconds * 10**9)
    if remaining == 0:
        return "0s"
    parts: list[str] = []
    for unit, size in (("h", 3600 * 10**9), ("m", 60 * 10**9), ("s", 10**9), ("ms", 10**6), ("us", 10**3), ("ns", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


# --------------------------------------------------------------------------- sizes

_SIZE_UNITS: Final[Mapping[str, int]] = MappingProxyType(
    {
        "": 1, "b": 1,
        "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
        "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
    }
)
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([A-Za-z]*)", re.ASCII)
_SIZE_HINT: Final = "use e.g. 256MB, 64KiB, 1GB or a number of bytes"


def parse_size(text: object) -> int:
    """Bytes in a size: an integer, or "256MB" (1000-based), "64KiB" (1024-based). Raises ValueError."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"invalid size {_show(text)} ({_SIZE_HINT})")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"negative size {text} is not allowed")
        return text
    match = _SIZE.fullmatch(text.strip())
    unit = _SIZE_UNITS.get(match.group(2).lower()) if match else None
    if match is None or unit is None:
        raise ValueError(f"invalid size {_quote(text)} ({_SIZE_HINT})")
    return int(Fraction(match.group(1)) * unit)


# --------------------------------------------------------------------------- addresses

_HOSTNAME_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", re.ASCII)


def parse_addr(text: str) -> tuple[str, int]:
    """Split "host:port" into (host, port). ":1883" -> ("", 1883), every interface.

    IPv6 hosts are written in brackets ("[::1]:1883") and returned without them.
    Port 0 asks the OS for a free port. "" (a disabled listener) is the caller's
    business and is refused here. Raises ValueError.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected an address string such as 127.0.0.1:1883, got {_describe(text)}")
    if not text:
        raise ValueError("empty address")
    example = "use host:port, e.g. 127.0.0.1:1883, :1883 or [::1]:1883"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"address {_quote(text)} has no closing ']' ({example})")
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_quote(host)} in {_quote(text)} is not an IPv6 address") from None
        if not rest.startswith(":"):
            raise ValueError(f"address {_quote(text)} has no port ({example})")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"address {_quote(text)} has no port ({example})")
        if ":" in host:
            raise ValueError(f"IPv6 address {_quote(text)} needs brackets, e.g. [::1]:1883")
        if host and not _valid_host(host):
            raise ValueError(f"{_quote(host)} is not a valid host name or IPv4 address")
    if not port_text:
        raise ValueError(f"address {_quote(text)} has no port ({example})")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"port {_quote(port_text)} is not a number")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port {port} out of range 0-65535")
    return host, port


def _valid_host(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    if all(label.isascii() and label.isdigit() for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            return False
        return True
    return len(host) <= 253 and all(_HOSTNAME_LABEL.fullmatch(label) for label in labels)


# --------------------------------------------------------------------------- describing values


def _quote(text: str, limit: int = 60) -> str:
    shown = text if len(text) <= limit else text[: limit - 3] + "..."
    return repr(shown)


def _show(value: object) -> str:
    if isinstance(value, str):
        return _quote(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return str(value)
    return type(value).__name__


def _describe(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"a boolean ({_show(value)})"
    if isinstance(value, int):
        return f"an integer ({value})"
    if isinstance(value, float):
        return f"a number ({value:g})"
    if isinstance(value, str):
        return f"a string ({_quote(value)})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({_quote(str(value))})"


def _redact_url(url: str) -> str:
    # A URL may carry user:password@; an error message must not repeat it.
    return re.sub(r"(//)[^/@]*@", r"\1***@", url)


# --------------------------------------------------------------------------- the reader

#: Returned by a converter whose value was wrong (the problem is already recorded).
_INVALID: Final = object()

Converter = Callable[["_Reader", str, object], Any]


class _Reader:
    """Walks the parsed YAML, converting values and collecting every problem with its key path."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def problem(self, path: str, message: str) -> None:
        self.problems.append(f"{path}: {message}")

    def wrong_type(self, path: str, expected: str, value: object) -> object:
        hint = ""
        if isinstance(value, bool) and "boolean" not in expected:
            hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)"
        self.problem(path, f"expected {expected}, got {_describe(value)}{hint}")
        return _INVALID

    def mapping(self, path: str, raw: object) -> dict[str, object] | None:
        """`raw` as a dict with text keys (null reads as empty); None after reporting anything else."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.wrong_type(path, "a mapping", raw)
            return None
        result: dict[str, object] = {}
        for key, value in raw.items():
            if isinstance(key, str):
                result[key] = value
            else:
                self.problem(path, f"key {_show(key)} is not text (YAML read it as {_describe(key)}; quote it)")
        return result

    def unknown_keys(self, path: str, given: Mapping[str, object], allowed: Collection[str]) -> None:
        for key in given:
            if key in allowed:
                continue
            close = difflib.get_close_matches(key, list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.problem(_join(path, key), f"unknown key{hint}")

    def fields(self, path: str, raw: object, spec: Mapping[str, Converter]) -> tuple[dict[str, object], dict[str, Any]] | None:
        """(keys as written, converted values of the valid ones), or None when `raw` is no mapping."""
        given = self.mapping(path, raw)
        if given is None:
            return None
        self.unknown_keys(path, given, spec)
        values: dict[str, Any] = {}
        for key, convert in spec.items():
            if key in given:
                value = convert(self, _join(path, key), given[key])
                if value is not _INVALID:
                    values[key] = value
        return given, values

    def file(self, path: str, filename: str) -> None:
        """Report `filename` (already known to be a non-empty string) unless it is a readable file."""
        if not os.path.exists(filename):
            self.problem(path, f"file not found: {filename!r}")
        elif not os.path.isfile(filename):
            self.problem(path, f"not a regular file: {filename!r}")
        elif not os.access(filename, os.R_OK):
            self.problem(path, f"file is not readable: {filename!r}")


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+", re.ASCII)


def _join(path: str, key: str) -> str:
    if not _PLAIN_KEY.fullmatch(key):
        # Quoted, so a key such as "tcp.plain" or "a: b" cannot pass for a path.
        return f"{path}[{key!r}]"
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- converters


def _string(reader: _Reader, path: str, raw: object) -> object:
    return raw if isinstance(raw, str) else reader.wrong_type(path, "a string", raw)


def _boolean(reader: _Reader, path: str, raw: object) -> object:
    return raw if isinstance(raw, bool) else reader.wrong_type(path, "a boolean (true or false)", raw)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*", re.ASCII)


def _env_name(reader: _Reader, path: str, raw: object) -> object:
    if not isinstance(raw, str):
        return reader.wrong_type(path, "an environment variable name", raw)
    if raw and not _ENV_NAME.fullmatch(raw):
        reader.problem(path, f"{_quote(raw)} is not an environment variable name (letters, digits, _)")
        return _INVALID
    return raw


def _optional_path(reader: _Reader, path: str, raw: object) -> object:
    """A file name where "" means unset (None)."""
    if not isinstance(raw, str):
        return reader.wrong_type(path, "a file name", raw)
    return raw or None


def _integer(minimum: int, maximum: int | None = None) -> Converter:
    def convert(reader: _Reader, path: str, raw: object) -> object:
        if isinstance(raw, bool) or not isinstance(raw, int):
            return reader.wrong_type(path, "an integer", raw)
        if maximum is not None and not minimum <= raw <= maximum:
            reader.problem(path, f"{raw} out of range {minimum}-{maximum}")
            return _INVALID
        if raw < minimum:
            reader.problem(path, f"must be at least {minimum} (got {raw})")
            return _INVALID
        return raw

    return convert


def _positive_number(reader: _Reader, path: str, raw: object) -> object:
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        return reader.wrong_type(path, "a number", raw)
    if not (math.isfinite(raw) and raw > 0):
        reader.problem(path, f"must be a number greater than 0 (got {_show(raw)})")
        return _INVALID
    return float(raw)


def _duration(*, positive: bool = False) -> Converter:
    def convert(reader: _Reader, path: str, raw: object) -> object:
        try:
            seconds = parse_duration(raw)
        except ValueError as exc:
            reader.problem(path, str(exc))
            return _INVALID
        if positive and seconds <= 0:
            reader.problem(path, f"must be longer than 0s (got {_show(raw)})")
            return _INVALID
        return seconds

    return convert


def _size(*, minimum: int = 0) -> Converter:
    def convert(reader: _Reader, path: str, raw: object) -> object:
        try:
            size = parse_size(raw)
        except ValueError as exc:
            reader.problem(path, str(exc))
            return _INVALID
        if size < minimum:
            reader.problem(path, f"must be at least {minimum} bytes (got {_show(raw)})")
            return _INVALID
        return size

    return convert


def _watermark(reader: _Reader, path: str, raw: object) -> object:
    """A fraction of RAM (0 < x <= 1; 0 turns the watermark off) or a size in bytes ("2GB")."""
    if isinstance(raw, float) or (isinstance(raw, int) and not isinstance(raw, bool) and raw in (0, 1)):
        if not 0 <= raw <= 1:
            reader.problem(path, f"a fraction of RAM must be between 0 and 1 (got {_show(raw)}); write a size such as 2GB for bytes")
            return _INVALID
        return int(raw * total_memory())
    return _size()(reader, path, raw)


def _choice(*options: str) -> Converter:
    def convert(reader: _Reader, path: str, raw: object) -> object:
        if not isinstance(raw, str):
            return reader.wrong_type(path, f"one of {', '.join(options)}", raw)
        if raw not in options:
            reader.problem(path, f"must be one of {', '.join(options)} (got {_quote(raw)})")
            return _INVALID
        return raw

    return convert


def _section(default: Any, spec: Mapping[str, Converter]) -> Converter:
    """A nested block: the keys written replace those of `default` (a frozen dataclass)."""

    def convert(reader: _Reader, path: str, raw: object) -> object:
        read = reader.fields(path, raw, spec)
        if read is None:
            return _INVALID
        return dataclasses.replace(default, **read[1])

    return convert


def _optional_section(default: Any, spec: Mapping[str, Converter]) -> Converter:
    """Like `_section`, but `key:` with no value leaves the feature off (None)."""
    inner = _section(default, spec)

    def convert(reader: _Reader, path: str, raw: object) -> object:
        return None if raw is None else inner(reader, path, raw)

    return convert


_PROTOCOLS_BY_NAME: Final[Mapping[str, Protocol]] = MappingProxyType({p.value: p for p in Protocol})


def _protocols(reader: _Reader, path: str, raw: object) -> object:
    given = reader.mapping(path, raw)
    if given is None:
        return _INVALID
    result = {protocol: True for protocol in Protocol}
    for key, value in given.items():
        protocol = _PROTOCOLS_BY_NAME.get(key)
        if protocol is None:
            reader.problem(_join(path, key), f"unknown protocol (one of {', '.join(_PROTOCOLS_BY_NAME)})")
        elif not isinstance(value, bool):
            reader.wrong_type(_join(path, key), "a boolean (true or false)", value)
        else:
            result[protocol] = value
    return MappingProxyType(result)


def _cidrs(reader: _Reader, path: str, raw: object) -> object:
    """A list of source networks ("10.0.0.0/8", "2001:db8::/32", a bare address is its /32 or /128)."""
    if raw is None:
        return ()
    if not isinstance(raw, list):
        return reader.wrong_type(path, 'a list of networks such as ["10.0.0.0/8"]', raw)
    networks = []
    for index, item in enumerate(raw):
        item_path = f"{path}[{index}]"
        if not isinstance(item, str):
            reader.wrong_type(item_path, 'a network such as "10.0.0.0/8"', item)
            continue
        try:
            # strict: "10.0.0.1/8" is more likely a typo than a wish for 10.0.0.0/8.
            networks.append(ipaddress.ip_network(item.strip(), strict=True))
        except ValueError as exc:
            reader.problem(item_path, f"not a network ({exc})")
    return tuple(networks)


# --------------------------------------------------------------------------- listeners

_CLIENT_AUTH: Final = ("none", "request", "require")
#: Earlier spellings still read, so existing files keep working.
_CLIENT_AUTH_SYNONYMS: Final[Mapping[str, str]] = MappingProxyType({"optional": "request"})
_TLS_VERSIONS: Final = ("tls1.2", "tls1.3")


def _client_auth(reader: _Reader, path: str, raw: object) -> object:
    if isinstance(raw, str) and raw in _CLIENT_AUTH_SYNONYMS:
        return _CLIENT_AUTH_SYNONYMS[raw]
    return _choice(*_CLIENT_AUTH)(reader, path, raw)


def _cipher_suites(reader: _Reader, path: str, raw: object) -> object:
    """An OpenSSL cipher string, checked here so a typo stops `check-config`, not the first handshake."""
    if not isinstance(raw, str):
        return reader.wrong_type(path, "an OpenSSL cipher string such as ECDHE+AESGCM", raw)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(raw)
    except (ssl.SSLError, ValueError, UnicodeError):  # ValueError: a NUL; UnicodeError: a lone surrogate
        reader.problem(path, f"OpenSSL accepts no cipher in {_quote(raw)} (see `openssl ciphers`)")
        return _INVALID
    return raw


def _listener_spec(kind: str, name: str) -> Mapping[str, Converter]:
    spec: dict[str, Converter] = {"addr": _string, "max_connections": _integer(0), "allowed_cidrs": _cidrs}
    if name in ("tls", "mtls"):
        spec |= {
            "cert_file": _string,
            "key_file": _string,
            "ca_file": _string,
            "client_auth": _client_auth,
            "min_version": _choice(*_TLS_VERSIONS),
            "cipher_suites": _cipher_suites,
            "self_signed": _boolean,
        }
    if kind == "websocket":
        spec["path"] = _string
    return MappingProxyType(spec)


def _listener_block(kind: str, name: str) -> Callable[[_Reader, str, object], ListenerConfig | None | object]:
    spec = _listener_spec(kind, name)

    def convert(reader: _Reader, path: str, raw: object) -> ListenerConfig | None | object:
        read = reader.fields(path, raw, spec)
        if read is None:
            return _INVALID
        given, values = read
        if "addr" not in given:
            reader.problem(_join(path, "addr"), 'required (write addr: "" to disable this listener)')
            return _INVALID
        addr = values.get("addr")
        if addr is None:
            return _INVALID
        if addr == "":
            return None  # disabled on purpose; its other settings do not matter
        try:
            host, port = parse_addr(addr)
        except ValueError as exc:
            reader.problem(_join(path, "addr"), str(exc))
            return _INVALID
        settings: dict[str, Any] = {}
        if name in ("tls", "mtls"):
            settings = _tls_settings(reader, path, name, given, values)
        if kind == "websocket":
            ws_path = values.get("path", "/mqtt")
            if not ws_path.startswith("/") or any(c in ws_path for c in "?# \t"):
                reader.problem(_join(path, "path"), f"must be a URL path starting with '/' (got {_quote(ws_path)})")
            settings["path"] = ws_path
        return ListenerConfig(
            name=path,
            addr=addr,
            host=host,
            port=port,
            max_connections=values.get("max_connections", 0),
            allowed_cidrs=values.get("allowed_cidrs", ()),
            **settings,
        )

    return convert


def _tls_settings(reader: _Reader, path: str, name: str, given: Mapping[str, object], values: Mapping[str, Any]) -> dict[str, Any]:
    client_auth = values.get("client_auth", "require" if name == "mtls" else "none")
    if name == "mtls" and client_auth != "require":
        # An mtls block that lets clients in without a certificate would fail open.
        reader.problem(_join(path, "client_auth"), "an mtls listener always requires client certificates (leave it out, or use a tls block)")
    self_signed = values.get("self_signed", False)
    required = [] if self_signed else ["cert_file", "key_file"]
    if name == "mtls" or client_auth != "none":
        required.append("ca_file")
    files: dict[str, str | None] = {}
    for key in ("cert_file", "key_file", "ca_file"):
        filename = values.get(key, "")
        key_path = _join(path, key)
        if filename and self_signed and key != "ca_file":
            reader.problem(key_path, "not allowed with self_signed: true (the certificate is made at start)")
        elif filename:
            reader.file(key_path, filename)
        elif key in required and (key not in given or key in values):
            why = "for a TLS listener" if key != "ca_file" else (
                "for an mTLS listener" if name == "mtls" else f"when client_auth is {given.get('client_auth')}"
            )
            reader.problem(key_path, f"required {why}")
        files[key] = filename or None
    return {
        **files,
        "client_auth": client_auth,
        "min_version": values.get("min_version", "tls1.2"),
        "cipher_suites": values.get("cipher_suites", ""),
        "self_signed": self_signed,
    }


#: Listener blocks a kind refuses with the reason, rather than as unknown keys. DESIGN.md:
#: "`coap` takes `dtls` where supported"; aiocoap's DTLS server is not fit to offer.
_NO_DTLS: Final = (
    "aiocoap's DTLS server side takes pre-shared keys only and is experimental; terminate DTLS in "
    "front of the gateway (a DTLS proxy) and forward plain CoAP to a `plain` listener"
)
_REFUSED_BLOCKS: Final[Mapping[str, Mapping[str, str]]] = MappingProxyType({
    "coap": MappingProxyType({
        "dtls": f"CoAP over DTLS is not supported: {_NO_DTLS}",
        "tls": f"CoAP runs over UDP, where TLS does not apply, and CoAP over DTLS is not supported: {_NO_DTLS}",
        "mtls": f"CoAP runs over UDP, where TLS does not apply, and CoAP over DTLS is not supported: {_NO_DTLS}",
    }),
})


def _listener_group(kind: str) -> Converter:
    """One `server.<kind>` section: its enabled listeners, in the order of the kind's names."""
    blocks = {name: _listener_block(kind, name) for name in _LISTENER_KINDS[kind].names}
    refused = _REFUSED_BLOCKS.get(kind, {})

    def convert(reader: _Reader, path: str, raw: object) -> object:
        if refused and isinstance(raw, dict):
            for key, why in refused.items():
                if key in raw:
                    reader.problem(_join(path, key), why)
            raw = {key: value for key, value in raw.items() if key not in refused}
        read = reader.fields(path, raw, blocks)
        if read is None:
            return _INVALID
        return tuple(listener for listener in read[1].values() if isinstance(listener, ListenerConfig))

    return convert


_SERVER: Final[Mapping[str, Converter]] = MappingProxyType(
    {
        **{kind: _listener_group(kind) for kind in _LISTENER_KINDS},
        "health_addr": _string,
        "shutdown_timeout": _duration(),
    }
)


def _make_listener(name: str, addr: str) -> ListenerConfig:
    host, port = parse_addr(addr)
    return ListenerConfig(name=name, addr=addr, host=host, port=port)


def _default_server() -> ServerConfig:
    listeners = {
        kind: (_make_listener(f"server.{kind}.plain", spec.default_addr),)
        for kind, spec in _LISTENER_KINDS.items()
        if spec.default_addr and kind in BUILT_LISTENER_KINDS
    }
    return ServerConfig(**listeners, health=_make_listener(_HEALTH_NAME, _DEFAULT_HEALTH_ADDR))


def _read_server(reader: _Reader, raw: object) -> ServerConfig:
    problems_before = len(reader.problems)
    read = reader.fields("server", raw, _SERVER)
    if read is None:
        return ServerConfig()
    values = read[1]
    health = None
    health_addr = values.pop("health_addr", "")
    if health_addr:
        try:
            health = _make_listener(_HEALTH_NAME, health_addr)
        except ValueError as exc:
            reader.problem(_HEALTH_NAME, str(exc))
    server = ServerConfig(**values, health=health)
    # A listener dropped for a bad value has been reported already; "none is
    # enabled" would then only add noise.
    _check_listeners(reader, server, report_none=len(reader.problems) == problems_before)
    return server


def _enabled_listeners(server: ServerConfig) -> list[tuple[str, ListenerConfig]]:
    found = [(kind, listener) for kind in _LISTENER_KINDS for listener in getattr(server, kind)]
    if server.health is not None:
        found.append(("health", server.health))
    return found


def _check_listeners(reader: _Reader, server: ServerConfig, *, report_none: bool) -> None:
    enabled = _enabled_listeners(server)
    if not enabled and report_none:
        reader.problem("server", "no listener is enabled (write a listener block, or leave out `server` for the defaults)")
    bound: list[tuple[str, ListenerConfig]] = []
    for kind, listener in enabled:
        if kind != "health" and kind not in BUILT_LISTENER_KINDS:
            reader.problem(listener.name, f"the {_LISTENER_KINDS[kind].title} frontend is not available in this version yet")
        transport = _LISTENER_KINDS[kind].transport if kind in _LISTENER_KINDS else "tcp"
        if listener.port == 0:
            continue  # every port-0 listener gets its own free port
        for other_transport, other in bound:
            if other_transport == transport and other.port == listener.port and _hosts_overlap(other.host, listener.host):
                reader.problem(
                    _addr_path(listener), f"port {listener.port} is already taken by {other.name} ({_quote(other.addr)})"
                )
                break
        bound.append((transport, listener))


def _addr_path(listener: ListenerConfig) -> str:
    return listener.name if listener.name == _HEALTH_NAME else f"{listener.name}.addr"


_WILDCARD_HOSTS: Final = frozenset({"", "0.0.0.0", "::"})


def _hosts_overlap(a: str, b: str) -> bool:
    # A wildcard bind takes the port on every interface; distinct names might
    # still resolve alike, but only the OS can tell, at bind time.
    return a.lower() == b.lower() or a in _WILDCARD_HOSTS or b in _WILDCARD_HOSTS


# --------------------------------------------------------------------------- auth

_TLS_CLIENT: Final[Mapping[str, Converter]] = MappingProxyType(
    {"ca_file": _optional_path, "cert_file": _optional_path, "key_file": _optional_path}
)

_AUTH: Final[Mapping[str, Converter]] = MappingProxyType(
    {
        "provider": _string,
        "timeout": _duration(positive=True),
        "protocols": _protocols,
        "identity_cache_size": _integer(1),
        "identity_cache_ttl": _duration(),
        "authn_cache_ttl": _duration(),
        "decision_cache_ttl": _duration(),
        "negative_cache_ttl": _duration(),
        "deny_publish_action": _choice("drop", "disconnect"),
        "url": _string,
        "transport": _choice("grpc", "http"),
        "grpc_package": _choice("auto", "broker.auth.v1", "fluxmq.auth.v1"),
        "retries": _integer(0),
        "circuit_breaker": _section(
            CircuitBreakerConfig(),
            {"failures": _integer(1), "open_for": _duration(positive=True), "half_open_requests": _integer(1)},
        ),
        "tls": _optional_section(TLSClientConfig(), _TLS_CLIENT),
        "max_inflight": _integer(1),
        "stale_if_error": _duration(),
        "mtls_identity": _choice("common_name", "san_dns", "san_uri", "san_email"),
        "require_tls_for_passwords": _boolean,
        "atom": _section(
            AtomConfig(),
            {
                "grpc_addr": _string,
                "insecure": _boolean,
                "ca_file": _string,
                "service_token_env": _env_name,
                "topic_format": _choice("magistrala"),
                "authn_cache_ttl": _duration(),
                "alias_cache_ttl": _duration(),
                "decision_cache_ttl": _duration(),
                "unsupported_topic_policy": _choice("deny", "allow"),
            },
        ),
        "local": _section(
            LocalConfig(),
            {
                "db": _string,
                "allow_anonymous": _boolean,
                "root_username_env": _env_name,
                "root_password_env": _env_name,
                "max_wait": _duration(positive=True),
                "argon2": _section(
                    Argon2Config(),
                    # argon2 needs at least 8 KiB per lane; 255 lanes is RFC 9106's practical cap here.
                    {"memory": _size(minimum=8192), "time": _integer(1, 100), "parallelism": _integer(1, 255)},
                ),
            },
        ),
    }
)


def _read_auth(reader: _Reader, raw: object) -> AuthConfig:
    read = reader.fields("auth", raw, _AUTH)
    if read is None:
        return AuthConfig()
    given, values = read
    if "provider" in given and "provider" not in values:
        return AuthConfig(**values)  # the provider's type is wrong: its rules cannot apply
    provider = values.get("provider", "")
    url = values.get("url", "")
    if not provider:
        # FluxMQ's convention: an auth URL with no provider named means the callout.
        provider = "callout" if url else "local"
    values["provider"] = provider
    auth = AuthConfig(**values)
    _check_provider(reader, auth)
    return auth


def _check_provider(reader: _Reader, auth: AuthConfig) -> None:
    available = _providers.available_providers()
    if auth.provider not in KNOWN_PROVIDERS and auth.provider not in available:
        extra = sorted(available - set(KNOWN_PROVIDERS))
        names = ", ".join([*KNOWN_PROVIDERS, *extra])
        reader.problem("auth.provider", f"must be one of {names} (got {_quote(auth.provider)})")
        return
    if auth.provider not in available:
        reader.problem("auth.provider", f"{auth.provider!r} is not available in this version yet")
    check = _PROVIDER_CHECKS.get(auth.provider)
    if check is not None:
        check(reader, auth)


def _check_callout(reader: _Reader, auth: AuthConfig) -> None:
    if not auth.url:
        reader.problem("auth.url", "required when auth.provider is callout")
    else:
        problem = _url_problem(auth.url, auth.transport)
        if problem:
            reader.problem("auth.url", problem)
        elif auth.tls is not None and auth.url.startswith("http://"):
            reader.problem("auth.tls", f"set, but auth.url {_quote(_redact_url(auth.url))} is not TLS: use https://")
    tls = auth.tls
    if tls is None:
        return
    if (tls.cert_file is None) != (tls.key_file is None):
        missing = "key_file" if tls.key_file is None else "cert_file"
        present = "cert_file" if missing == "key_file" else "key_file"
        reader.problem(f"auth.tls.{missing}", f"required when auth.tls.{present} is set")
    for key in ("ca_file", "cert_file", "key_file"):
        filename = getattr(tls, key)
        if filename:
            reader.file(f"auth.tls.{key}", filename)


def _url_problem(url: str, transport: str) -> str | None:
    shown = _quote(_redact_url(url))
    if "://" not in url:
        if transport == "http":
            return f"transport http needs an http:// or https:// URL (got {shown})"
        return _remote_addr_problem(url, shown)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"scheme must be http or https (got {shown})"
    if transport == "grpc" and parts.path not in ("", "/"):
        return f"a gRPC URL has no path (got {shown})"
    if parts.query or parts.fragment:
        return f"must not have a query or fragment (got {shown})"
    try:
        port = parts.port
    except ValueError:
        return f"invalid port in {shown}"
    if not parts.hostname:
        return f"has no host (got {shown})"
    if port == 0:
        return f"port 0 is not a service port (got {shown})"
    return None


def _remote_addr_problem(addr: str, shown: str) -> str | None:
    try:
        host, port = parse_addr(addr)
    except ValueError as exc:
        return str(exc)
    if not host or port == 0:
        return f"needs a host and a non-zero port, e.g. atom:8081 (got {shown})"
    return None


def _check_atom(reader: _Reader, auth: AuthConfig) -> None:
    atom = auth.atom
    if not atom.grpc_addr:
        reader.problem("auth.atom.grpc_addr", "required when auth.provider is atom")
    else:
        problem = _remote_addr_problem(atom.grpc_addr, _quote(atom.grpc_addr))
        if problem:
            reader.problem("auth.atom.grpc_addr", problem)
    if not atom.service_token_env:
        reader.problem("auth.atom.service_token_env", "required when auth.provider is atom")
    elif not reader.environ.get(atom.service_token_env):
        reader.problem(
            "auth.atom.service_token_env",
            f"environment variable {atom.service_token_env} is not set or empty (Atom needs a service token)",
        )
    if atom.ca_file:
        if atom.insecure:
            reader.problem("auth.atom.ca_file", "only used with TLS: set auth.atom.insecure to false, or remove it")
        else:
            reader.file("auth.atom.ca_file", atom.ca_file)


def _check_local(reader: _Reader, auth: AuthConfig) -> None:
    if not auth.local.db:
        reader.problem("auth.local.db", "required when auth.provider is local")
    argon2 = auth.local.argon2
    if argon2.memory < 8192 * argon2.parallelism:
        reader.problem(
            "auth.local.argon2.memory", f"Argon2 needs at least 8KiB per lane: {8 * argon2.parallelism}KiB or more"
        )


_PROVIDER_CHECKS: Final[Mapping[str, Callable[[_Reader, AuthConfig], None]]] = MappingProxyType(
    {"callout": _check_callout, "atom": _check_atom, "local": _check_local}
)


# --------------------------------------------------------------------------- the document

_OVERFLOW_KEYS: Final = (Protocol.MQTT, Protocol.AMQP091, Protocol.AMQP, Protocol.HTTP, Protocol.COAP)


def _overflow(reader: _Reader, path: str, raw: object) -> object:
    given = reader.mapping(path, raw)
    if given is None:
        return _INVALID
    result = dict(LimitsConfig().queue_overflow)
    names = {p.value: p for p in _OVERFLOW_KEYS}
    for key, value in given.items():
        protocol = names.get(key)
        if protocol is None:
            close = difflib.get_close_matches(key, list(names), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (one of {', '.join(names)})"
            reader.problem(_join(path, key), f"unknown protocol{hint}")
            continue
        policy = _choice(*OVERFLOW_POLICIES)(reader, _join(path, key), value)
        if policy is not _INVALID:
            result[protocol] = policy  # type: ignore[assignment]
    return MappingProxyType(result)


_RATE: Final[Mapping[str, Converter]] = MappingProxyType(
    {"enabled": _boolean, "rate": _positive_number, "burst": _integer(1)}
)
_RATELIMIT_DEFAULTS: Final = RatelimitConfig()
_RATELIMIT: Final[Mapping[str, Converter]] = MappingProxyType(
    {
        "enabled": _boolean,
        "connection": _section(_RATELIMIT_DEFAULTS.connection, _RATE),
        "message": _section(_RATELIMIT_DEFAULTS.message, _RATE),
        "subscribe": _section(_RATELIMIT_DEFAULTS.subscribe, _RATE),
    }
)
_LIMITS: Final[Mapping[str, Converter]] = MappingProxyType(
    {
        "max_message_size": _integer(1),
        "max_topic_length": _integer(1, 65535),
        "max_queued_messages": _integer(1),
        "max_inflight_messages": _integer(1, 65535),
        "max_retained_messages": _integer(0),
        "max_queued_bytes": _size(minimum=1),
        "queue_overflow": _overflow,
        "memory_high_watermark": _watermark,
        "max_connections_per_ip": _integer(0),
        "max_subscriptions_per_client": _integer(0),
        "allowed_cidrs": _cidrs,
        "handshake_timeout": _duration(positive=True),
        "fd_reserve": _integer(16),
        "coap_uploads_per_ip": _integer(0),
        "failed_logins": _section(
            FailedLoginsConfig(),
            {
                "per_ip": _integer(0),
                "per_username": _integer(0),
                "window": _duration(positive=True),
                "lockout": _duration(positive=True),
            },
        ),
    }
)
_STORAGE: Final[Mapping[str, Converter]] = MappingProxyType(
    {"backend": _choice("sqlite", "memory"), "path": _string, "fsync": _choice("always", "batch", "never")}
)
_MQTT: Final[Mapping[str, Converter]] = MappingProxyType({"session_expiry": _duration(positive=True)})
_TOP_LEVEL: Final = ("server", "auth", "ratelimit", "limits", "storage", "mqtt")


def _read_document(reader: _Reader, data: object, source: str | None) -> GatewayConfig:
    if data is not None and not isinstance(data, dict):
        reader.problem("(top level)", f"expected a mapping with the sections {', '.join(_TOP_LEVEL)}, got {_describe(data)}")
        return GatewayConfig(server=_default_server(), source=source)
    given = reader.mapping("(top level)", data) or {}
    reader.unknown_keys("", given, _TOP_LEVEL)
    server = _read_server(reader, given["server"]) if "server" in given else _default_server()
    auth = _read_auth(reader, given.get("auth"))
    ratelimit = _section(_RATELIMIT_DEFAULTS, _RATELIMIT)(reader, "ratelimit", given.get("ratelimit"))
    limits = _section(LimitsConfig(), _LIMITS)(reader, "limits", given.get("limits"))
    storage = _section(StorageConfig(), _STORAGE)(reader, "storage", given.get("storage"))
    if isinstance(storage, StorageConfig) and storage.backend == "sqlite" and not storage.path:
        reader.problem("storage.path", "required when storage.backend is sqlite (a directory)")
    mqtt = _section(MQTTConfig(), _MQTT)(reader, "mqtt", given.get("mqtt"))
    return GatewayConfig(
        server=server,
        auth=auth,
        ratelimit=ratelimit if isinstance(ratelimit, RatelimitConfig) else _RATELIMIT_DEFAULTS,
        limits=limits if isinstance(limits, LimitsConfig) else LimitsConfig(),
        storage=storage if isinstance(storage, StorageConfig) else StorageConfig(),
        mqtt=mqtt if isinstance(mqtt, MQTTConfig) else MQTTConfig(),
        source=source,
    )


def parse_config(data: object, *, source: str | None = None, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Validate `data` (what `yaml.safe_load` returned; None for an empty file).

    `environ` is where environment variables named by the config are looked up
    (default `os.environ`). Raises ConfigError listing every problem found.
    """
    reader = _Reader(os.environ if environ is None else environ)
    config = _read_document(reader, data, source)
    if reader.problems:
        raise ConfigError(reader.problems)
    return config


def default_config() -> GatewayConfig:
    """The configuration of `polygate run` without `--config`: loopback listeners, local provider."""
    return GatewayConfig(server=_default_server())


# --------------------------------------------------------------------------- files


def _load_yaml(path: str) -> tuple[object, list[str]]:
    """The parsed document and problems YAML itself hides (duplicate keys). Raises ConfigError."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the file: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"{path}: not UTF-8 text (bad byte at offset {exc.start})"]) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node)
        data = loader.construct_document(node) if node is not None else None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = exc.problem or exc.context or "malformed YAML"
        raise ConfigError([f"{path}: {where}YAML syntax error: {what}"]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax error: {exc}"]) from None
    finally:
        loader.dispose()
    return data, duplicates


_MERGE_TAG: Final = "tag:yaml.org,2002:merge"


def _duplicate_keys(root: yaml.Node | None) -> list[str]:
    # PyYAML keeps the last of two equal keys without a word; a second
    # `plain:` under `tcp:` would silently replace the first listener.
    problems: list[str] = []
    seen_nodes: set[int] = set()
    stack: list[tuple[str, yaml.Node]] = [("", root)] if root is not None else []
    while stack:
        path, node = stack.pop()
        if id(node) in seen_nodes:
            continue  # anchors and aliases share nodes
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE_TAG:
                    key = (key_node.tag, key_node.value)
                    key_path = _join(path, key_node.value)
                    line = key_node.start_mark.line + 1
                    if key in first_line:
                        problems.append(
                            f"{key_path}: duplicate key on line {line} (first on line {first_line[key]}); "
                            "YAML would silently keep only the last"
                        )
                    else:
                        first_line[key] = line
                    stack.append((key_path, value_node))
                else:
                    stack.append((path, value_node))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((f"{path}[{index}]", item) for index, item in enumerate(node.value))
    problems.sort()
    return problems


def load_config(path: str) -> GatewayConfig:
    """Read, parse and validate the YAML file at `path`. Raises ConfigError listing every problem."""
    data, problems = _load_yaml(path)
    try:
        config = parse_config(data, source=path)
    except ConfigError as exc:
        raise ConfigError([*problems, *exc.problems]) from None
    if problems:
        raise ConfigError(problems)
    return config


def check_config_file(path: str) -> list[str]:
    """The problem lines of the file at `path` (for `polygate check-config`); empty when valid."""
    try:
        load_config(path)
    except ConfigError as exc:
        return list(exc.problems)
    return []
