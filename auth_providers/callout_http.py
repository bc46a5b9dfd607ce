"""The HTTP transport of the callout: FluxMQ's JSON over one pooled keep-alive session.

`POST {url}/auth/authenticate` with `{"client_id", "username", "password",
"protocol"}` answered by `{"authenticated", "id", "reason_code", "reason"}`;
`POST {url}/auth/authorize` with `{"external_id", "topic", "action"}` answered
by `{"authorized", "reason_code", "reason"}`. 401/403 are denials; 502/503/504,
connection errors and timeouts are retryable; any other status or a body that
does not parse is unavailable. `Cache-Control: max-age=N` (or `no-store`/
`no-cache`, meaning 0) sets how long the dispatcher may cache that answer.

One `aiohttp.ClientSession` with a connection pool of `auth.max_inflight`
connections is reused for every call: opening a connection per call is what
made other brokers' auth callouts collapse under connection storms.
"""

from __future__ import annotations

import dataclasses
import json
import ssl
from collections.abc import Iterable
from typing import Any

import aiohttp

from auth_providers.callout import (
    ACTION_NAMES,
    PROTOCOL_NAMES,
    AuthnRequest,
    AuthzRequest,
    CalloutAnswer,
    redact_url,
    scrub,
)
from gateway.config_types import AuthConfig
from gateway.errors import ProviderError, ProviderUnavailable
from gateway.events import NO_SECRET, Secret

#: Answers that are the service's "no".
DENIAL_STATUSES = frozenset({401, 403})
#: A gateway or proxy in front of the service failed: worth another try.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
#: An answer is a few small fields; anything far larger is not one.
MAX_BODY = 64 * 1024
_REASON_CODE_MAX = 2**32 - 1


def cache_ttl(values: Iterable[str]) -> float | None:
    """Seconds from `Cache-Control` header values; None when they say nothing about it."""
    ttl: float | None = None
    for value in values:
        for directive in value.split(","):
            name, _, argument = directive.strip().partition("=")
            name = name.strip().lower()
            seconds: float | None = None
            if name in ("no-store", "no-cache"):
                seconds = 0.0
            elif name == "max-age":
                argument = argument.strip().strip('"')
                if argument.isascii() and argument.isdigit():
                    seconds = float(argument)
            if seconds is not None:
                ttl = seconds if ttl is None else min(ttl, seconds)
    return ttl


def _client_ssl_context(auth: AuthConfig) -> ssl.SSLContext:
    tls = auth.tls
    try:
        context = ssl.create_default_context(cafile=tls.ca_file if tls is not None else None)
        if tls is not None and tls.cert_file:
            context.load_cert_chain(tls.cert_file, tls.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise ProviderError(f"auth.tls: cannot load the certificates for the auth service: {exc}") from exc
    return context


def _optional(data: dict[str, Any], key: str, kind: type) -> Any:
    value = data.get(key)
    if value is None:
        return kind()
    # JSON true is a Python bool, which is also an int: not a reason code.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProviderUnavailable(f"auth service answer has a {key!r} that is not a {kind.__name__}")
    return value


def _parse(body: bytes, granted_key: str, with_id: bool) -> CalloutAnswer:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ProviderUnavailable("auth service answered with a body that is not JSON") from None
    if not isinstance(data, dict):
        raise ProviderUnavailable("auth service answered with JSON that is not an object")
    granted = data.get(granted_key)
    if not isinstance(granted, bool):
        raise ProviderUnavailable(f"auth service answer has no boolean {granted_key!r}")
    reason_code = _optional(data, "reason_code", int)
    if not 0 <= reason_code <= _REASON_CODE_MAX:
        raise ProviderUnavailable("auth service answer has a 'reason_code' outside 0..2^32-1")
    return CalloutAnswer(
        granted=granted,
        external_id=_optional(data, "id", str) if with_id else "",
        reason_code=reason_code,
        reason=_optional(data, "reason", str),
    )


def _denial(body: bytes, status: int) -> CalloutAnswer:
    """A 401/403 is a denial whatever its body; use its reason when it has one."""
    reason, reason_code = "", 0
    try:
        data = json.loads(body) if body else None
    except (ValueError, UnicodeDecodeError):
        data = None
    if isinstance(data, dict):
        if isinstance(data.get("reason"), str):
            reason = data["reason"]
        code = data.get("reason_code")
        if isinstance(code, int) and not isinstance(code, bool) and 0 <= code <= _REASON_CODE_MAX:
            reason_code = code
    reason = reason or f"auth service answered HTTP {status}"
    return CalloutAnswer(granted=False, reason=reason, reason_code=reason_code)


class HttpTransport:
    name = "http"

    def __init__(self, auth: AuthConfig) -> None:
        if not auth.url.startswith(("http://", "https://")):
            shown = redact_url(auth.url)
            raise ProviderError(f"auth.url: transport http needs an http:// or https:// URL (got {shown!r})")
        base = auth.url.rstrip("/")
        self._authenticate_url = f"{base}/auth/authenticate"
        self._authorize_url = f"{base}/auth/authorize"
        self._auth = auth
        self._timeout = auth.timeout
        self._session: aiohttp.ClientSession | None = None
        #: The last call got an answer from the service (for `ready`).
        self._answered = True

    async def start(self) -> None:
        ssl_context: ssl.SSLContext | bool = True
        if self._auth.url.startswith("https://"):
            ssl_context = _client_ssl_context(self._auth)
        # No connection is opened here: the session starts while the service is down.
        connector = aiohttp.TCPConnector(limit=self._auth.max_inflight, ssl=ssl_context)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            headers={"User-Agent": "polygate"},
        )

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def ready(self) -> bool:
        return self._session is not None and not self._session.closed and self._answered

    async def authenticate(self, request: AuthnRequest) -> CalloutAnswer:
        body = {
            "client_id": request.client_id,
            "username": request.username,
            "password": request.password.reveal_str(),
            "protocol": PROTOCOL_NAMES[request.protocol],
        }
        return await self._post(self._authenticate_url, body, "authenticated", request.password)

    async def authorize(self, request: AuthzRequest) -> CalloutAnswer:
        body = {"external_id": request.external_id, "topic": request.topic, "action": ACTION_NAMES[request.action]}
        return await self._post(self._authorize_url, body, "authorized", NO_SECRET)

    async def _post(self, url: str, body: dict[str, Any], granted_key: str, secret: Secret) -> CalloutAnswer:
        session = self._session
        if session is None:
            raise ProviderUnavailable("auth provider 'callout' is not started")
        try:
            # Never follow a redirect: it would send the password wherever it points.
            async with session.post(url, json=body, allow_redirects=False) as response:
                status = response.status
                ttl = cache_ttl(response.headers.getall("Cache-Control", ()))
                raw = await _read_body(response)
        except TimeoutError:
            self._answered = False
            message = f"auth service did not answer within {self._timeout:g}s"
            raise ProviderUnavailable(message, retryable=True) from None
        except aiohttp.ClientPayloadError as exc:
            self._answered = False
            raise ProviderUnavailable(f"auth service sent a broken body: {scrub(str(exc), secret)}") from None
        except aiohttp.ClientError as exc:
            self._answered = False
            detail = scrub(str(exc), secret) or type(exc).__name__
            raise ProviderUnavailable(f"auth service unreachable: {detail}", retryable=True) from None
        if status in DENIAL_STATUSES:
            self._answered = True
            answer = _denial(raw, status)
        elif status == 200:
            try:
                answer = _parse(raw, granted_key, with_id=granted_key == "authenticated")
            except ProviderUnavailable:
                self._answered = False
                raise
            self._answered = True
        else:
            self._answered = False
            raise ProviderUnavailable(f"auth service answered HTTP {status}", retryable=status in RETRYABLE_STATUSES)
        return answer if ttl is None else dataclasses.replace(answer, ttl=ttl)


async def _read_body(response: aiohttp.ClientResponse) -> bytes:
    if response.content_length is not None and response.content_length > MAX_BODY:
        raise ProviderUnavailable(f"auth service answer is larger than {MAX_BODY} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_chunked(MAX_BODY):
        size += len(chunk)
        if size > MAX_BODY:
            raise ProviderUnavailable(f"auth service answer is larger than {MAX_BODY} bytes")
        chunks.append(chunk)
    return b"".join(chunks)
