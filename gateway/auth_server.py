"""The reference external auth service: both callout contracts, answered from a YAML users file.

`polygate auth-server` runs it; tests and benchmarks start it in-process with
`start_auth_server`. It is also meant to be read and adapted: the decisions
live in `AuthService` (no I/O besides hashing), and each transport is a thin
adapter around it.

- gRPC: `AuthService` of `broker.auth.v1` and of `fluxmq.auth.v1` on one server.
- HTTP: `POST /auth/authenticate` and `POST /auth/authorize` with JSON bodies;
  on the same listener, RabbitMQ's auth-backend-http contract under
  `/rabbitmq/auth/` (`user`, `vhost`, `resource`, `topic`; GET with a query
  string or POST form-encoded, answered `allow` or `deny` with status 200),
  and `GET /stats`, the request counts of `RunningAuthServer.calls` as JSON.

Authorization is by the identity handed out at authentication. The authorize
callout carries no client id, so a user whose patterns use `%c` is handed the
identity `<external_id>|<client_id>` and `%c` is filled from it; every other
user is handed its `external_id`. A subscription filter is allowed only when
one subscribe pattern covers all of it as written: a wildcard is never widened.

Successful password checks are remembered for a minute under an HMAC of the
password (keyed per process) and identical checks in flight are coalesced, so
a storm of connects does not queue thousands of Argon2 runs.

RabbitMQ (`rabbitmq_auth_backend_http`, usually behind
`rabbitmq_auth_backend_cache`) gets the same decisions: `user` is
`authenticate` (its MQTT plugin sends the client id, so `client_ids` bind as
for the gateway); `vhost` and `resource` (queues and exchanges: the MQTT
plugin needs its own queues and `amq.topic`) allow any known user; `topic`
turns the AMQP routing key back into the MQTT topic and asks `authorize`
(`write` is publish, `read` is subscribe), with the identity that
`authenticate` hands out for that username and `variable_map.client_id`.
RabbitMQ 3.10 writes an MQTT topic as a routing key by replacing `/` with `.`
and `+` with `*`, without escaping a `.` already in the topic, so the topic
authorized is the one RabbitMQ routes (`a.b/c` is `a/b/c` there).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import os
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import grpc
import yaml
from aiohttp import web
from argon2 import extract_parameters
from argon2.exceptions import InvalidHashError

from auth_providers.acl import CLIENT_ID_PLACEHOLDER, expand, validate_pattern
from auth_providers.local_store import hash_password, validate_username, verify_password
from gateway.cache import TTLCache
from gateway.errors import ConfigError, InvalidTopic, PolygateError, StoreError
from gateway.frontends.tcp_listener import LISTEN_BACKLOG
from gateway.events import Secret
from gateway.logging_setup import username_tag
from gateway.topics import filter_covers, topic_matches, validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.auth_server")

GRPC = "grpc"
HTTP = "http"
TRANSPORTS = (GRPC, HTTP)
BROKER_PACKAGE = "broker.auth.v1"
FLUXMQ_PACKAGE = "fluxmq.auth.v1"
GRPC_PACKAGES = (BROKER_PACKAGE, FLUXMQ_PACKAGE)

#: Keys of `RunningAuthServer.calls` (gRPC calls also count under "<package>/<key>").
AUTHENTICATE = "authenticate"
AUTHORIZE = "authorize"
#: RabbitMQ's requests count under "rabbitmq/<kind>", and every `deny` also under RABBITMQ_DENIED.
RABBITMQ_USER = "rabbitmq/user"
RABBITMQ_VHOST = "rabbitmq/vhost"
RABBITMQ_RESOURCE = "rabbitmq/resource"
RABBITMQ_TOPIC = "rabbitmq/topic"
RABBITMQ_DENIED = "rabbitmq/denied"

#: Where RabbitMQ's `auth_http.user_path` etc. point, below the service's base URL.
RABBITMQ_PATH_PREFIX = "/rabbitmq/auth"
RABBITMQ_PATHS: Mapping[str, str] = {
    "user_path": f"{RABBITMQ_PATH_PREFIX}/user",
    "vhost_path": f"{RABBITMQ_PATH_PREFIX}/vhost",
    "resource_path": f"{RABBITMQ_PATH_PREFIX}/resource",
    "topic_path": f"{RABBITMQ_PATH_PREFIX}/topic",
}
STATS_PATH = "/stats"

PUBLISH = "publish"
SUBSCRIBE = "subscribe"

#: Separates the external id from the client id in the identity of a `%c` user.
BOUND_ID_SEPARATOR = "|"

# Reason codes: MQTT 5's, which FluxMQ-style services use; for the audit log only.
REASON_CLIENT_ID_NOT_VALID = 0x85
REASON_BAD_CREDENTIALS = 0x86
REASON_NOT_AUTHORIZED = 0x87
REASON_TOPIC_FILTER_INVALID = 0x8F
REASON_TOPIC_NAME_INVALID = 0x90

#: The callout's protocol enum (both packages) as the HTTP callout writes it.
PROTOCOL_NAMES: Mapping[int, str] = {0: "", 1: "mqtt", 2: "amqp_1_0", 3: "amqp_0_9_1", 4: "http", 5: "coap"}
_ACTION_NAMES: Mapping[int, str] = {0: "", 1: PUBLISH, 2: SUBSCRIBE}

_MAX_HTTP_BODY = 64 * 1024
_VERIFIED_TTL = 60.0
_VERIFIED_MAX = 10_000
_USER_KEYS = frozenset({"username", "password_hash", "external_id", "client_ids", "publish", "subscribe"})


# --------------------------------------------------------------------------- the users file


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthUser:
    username: str
    password_hash: str = field(repr=False)
    #: `AuthnRes.id`, the identity the gateway sends back in every AuthzReq.
    external_id: str
    #: Empty: any client id may use these credentials.
    client_ids: frozenset[str] = frozenset()
    publish: tuple[str, ...] = ()
    subscribe: tuple[str, ...] = ()

    @property
    def binds_client_id(self) -> bool:
        """True when a pattern uses `%c`, so the identity handed out must carry the client id."""
        return any(
            CLIENT_ID_PLACEHOLDER in pattern.split("/") for pattern in (*self.publish, *self.subscribe)
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class UsersFile:
    users: tuple[AuthUser, ...] = ()


def load_users(path: str | os.PathLike[str]) -> UsersFile:
    """Read and check a users YAML file. Raises ConfigError listing every problem with its key path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read the users file: {exc.strerror or exc}"]) from exc
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_users(raw)


def parse_users(raw: object) -> UsersFile:
    """Check the parsed YAML of a users file (see configs/auth-users.example.yaml)."""
    problems: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError(["users file: expected a mapping with the key 'users'"])
    for key in sorted(set(raw) - {"users"}, key=str):
        problems.append(f"{key}: unknown key (expected 'users')")
    entries = raw.get("users")
    if entries is None:
        problems.append("users: required (a list of users; [] for none)")
        entries = []
    elif not isinstance(entries, list):
        problems.append(f"users: expected a list, got {type(entries).__name__}")
        entries = []
    users: list[AuthUser] = []
    seen_usernames: set[str] = set()
    seen_ids: set[str] = set()
    for index, entry in enumerate(entries):
        user = _parse_user(f"users[{index}]", entry, problems)
        if user is None:
            continue
        if user.username in seen_usernames:
            problems.append(f"users[{index}].username: {user.username!r} appears twice")
        if user.external_id in seen_ids:
            problems.append(f"users[{index}].external_id: {user.external_id!r} is already another user's")
        seen_usernames.add(user.username)
        seen_ids.add(user.external_id)
        users.append(user)
    if problems:
        raise ConfigError(problems)
    return UsersFile(users=tuple(users))


def _parse_user(path: str, entry: object, problems: list[str]) -> AuthUser | None:
    if not isinstance(entry, dict):
        problems.append(f"{path}: expected a mapping with username, password_hash, ...")
        return None
    count = len(problems)
    for key in sorted(set(entry) - _USER_KEYS, key=str):
        problems.append(f"{path}.{key}: unknown key (expected one of {', '.join(sorted(_USER_KEYS))})")
    username = _string(f"{path}.username", entry.get("username"), problems, required=True)
    if username:
        try:
            validate_username(username)
        except StoreError as exc:
            problems.append(f"{path}.username: {exc}")
    password_hash = _string(f"{path}.password_hash", entry.get("password_hash"), problems, required=True)
    if password_hash:
        _check_hash(f"{path}.password_hash", password_hash, problems)
    external_id = _string(f"{path}.external_id", entry.get("external_id"), problems) or username
    if BOUND_ID_SEPARATOR in external_id:
        where = "external_id" if entry.get("external_id") else "username (the default external_id)"
        problems.append(f"{path}.{where}: must not contain {BOUND_ID_SEPARATOR!r}; set another external_id")
    client_ids = _strings(f"{path}.client_ids", entry.get("client_ids"), problems)
    publish = _patterns(f"{path}.publish", entry.get("publish"), problems)
    subscribe = _patterns(f"{path}.subscribe", entry.get("subscribe"), problems)
    if len(problems) > count:
        return None
    return AuthUser(
        username=username,
        password_hash=password_hash,
        external_id=external_id,
        client_ids=frozenset(client_ids),
        publish=publish,
        subscribe=subscribe,
    )


def _string(path: str, value: object, problems: list[str], *, required: bool = False) -> str:
    if value is None:
        if required:
            problems.append(f"{path}: required")
        return ""
    if not isinstance(value, str):
        problems.append(f"{path}: expected a string, got {type(value).__name__}")
        return ""
    if required and not value:
        problems.append(f"{path}: must not be empty")
    return value


def _strings(path: str, value: object, problems: list[str]) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        problems.append(f"{path}: expected a list of strings, got {type(value).__name__}")
        return ()
    result: list[str] = []
    for index, item in enumerate(value):
        if not isinstance(item, str) or not item:
            problems.append(f"{path}[{index}]: expected a non-empty string")
        else:
            result.append(item)
    return tuple(result)


def _patterns(path: str, value: object, problems: list[str]) -> tuple[str, ...]:
    patterns = _strings(path, value, problems)
    for index, pattern in enumerate(patterns):
        try:
            validate_pattern(pattern)
        except StoreError as exc:
            problems.append(f"{path}[{index}]: {exc}")
    return tuple(dict.fromkeys(patterns))


def _check_hash(path: str, phc: str, problems: list[str]) -> None:
    # The message never repeats the value: it is a credential.
    hint = "expected an Argon2id PHC string from `polygate hash-password`"
    if not phc.startswith("$argon2id$"):
        problems.append(f"{path}: {hint}")
        return
    try:
        extract_parameters(phc)
    except InvalidHashError:
        problems.append(f"{path}: malformed hash; {hint}")


# --------------------------------------------------------------------------- the decisions


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthnAnswer:
    authenticated: bool
    id: str = ""
    reason_code: int = 0
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthzAnswer:
    authorized: bool
    reason_code: int = 0
    reason: str = ""


_BAD_CREDENTIALS = AuthnAnswer(
    authenticated=False, reason_code=REASON_BAD_CREDENTIALS, reason="bad username or password"
)
_AUTHORIZED = AuthzAnswer(authorized=True)


class AuthService:
    """The decisions of the reference service, independent of the transport."""

    def __init__(self, users: UsersFile) -> None:
        self._hmac_key = secrets.token_bytes(32)
        # Unknown usernames are checked against this hash so that the answer
        # takes as long as for a known user and does not reveal which exist.
        self._dummy_hash = hash_password(Secret(secrets.token_bytes(16)))
        self._verified: TTLCache[tuple[str, bytes], bool] = TTLCache(
            "verified", maxsize=_VERIFIED_MAX, ttl=_VERIFIED_TTL
        )
        self._inflight: dict[tuple[str, bytes], asyncio.Task[bool]] = {}
        self.replace_users(users)

    def replace_users(self, users: UsersFile) -> None:
        """Serve another users file from now on; remembered password checks are dropped."""
        self._by_username = {user.username: user for user in users.users}
        self._by_external_id = {user.external_id: user for user in users.users}
        self._verified.clear()
        # Checks in flight still answer their callers; new callers check anew.
        self._inflight.clear()

    async def authenticate(self, *, client_id: str, username: str, password: Secret, protocol: str) -> AuthnAnswer:
        user = self._by_username.get(username)
        if not password or not await self._password_ok(user, username, password) or user is None:
            answer = _BAD_CREDENTIALS
        elif user.client_ids and client_id not in user.client_ids:
            answer = AuthnAnswer(
                authenticated=False,
                reason_code=REASON_CLIENT_ID_NOT_VALID,
                reason=f"client id {client_id!r} may not use the credentials of {username!r}",
            )
        else:
            identity = user.external_id
            if user.binds_client_id and client_id:
                identity = f"{identity}{BOUND_ID_SEPARATOR}{client_id}"
            answer = AuthnAnswer(authenticated=True, id=identity)
        log.log(
            logging.DEBUG if answer.authenticated else logging.INFO,
            "authenticate username=%r client_id=%r protocol=%s: %s",
            # A refused "username" may be a password typed into the wrong field: only its tag.
            username if answer.authenticated else username_tag(username),
            client_id,
            protocol or "unspecified",
            "ok" if answer.authenticated else answer.reason,
            extra={"event": "authenticate", "outcome": "allow" if answer.authenticated else "deny"},
        )
        return answer

    async def _password_ok(self, user: AuthUser | None, username: str, password: Secret) -> bool:
        if user is None:
            await asyncio.to_thread(verify_password, self._dummy_hash, password)
            return False
        key = (username, hmac.new(self._hmac_key, password.reveal(), hashlib.sha256).digest())
        if self._verified.get(key):
            return True
        task = self._inflight.get(key)
        if task is None:
            # A task of its own, so that a caller that goes away (the client
            # hung up) does not cancel the check for the others waiting on it.
            task = asyncio.create_task(self._verify(key, user.password_hash, password))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget_inflight(key, done))
        return await asyncio.shield(task)

    def _forget_inflight(self, key: tuple[str, bytes], task: asyncio.Task[bool]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _verify(self, key: tuple[str, bytes], phc: str, password: Secret) -> bool:
        ok = await asyncio.to_thread(verify_password, phc, password)
        # Only a check against the hash still in force may be remembered.
        current = self._by_username.get(key[0])
        if ok and current is not None and current.password_hash == phc:
            self._verified.put(key, True)
        return ok

    def authorize(self, *, external_id: str, topic: str, action: str) -> AuthzAnswer:
        answer = self._authorize(external_id, topic, action)
        log.log(
            logging.DEBUG if answer.authorized else logging.INFO,
            "authorize external_id=%r %s %r: %s",
            external_id,
            action or "(no action)",
            topic,
            "ok" if answer.authorized else answer.reason,
            extra={"event": "authorize", "outcome": "allow" if answer.authorized else "deny"},
        )
        return answer

    def knows(self, username: str) -> bool:
        return username in self._by_username

    def authorize_user(self, *, username: str, client_id: str, topic: str, action: str) -> AuthzAnswer:
        """`authorize` for callers that name the user and client instead of the identity (RabbitMQ).

        The identity is the one `authenticate` hands out for that username and client id.
        """
        user = self._by_username.get(username)
        if user is None or (user.client_ids and client_id not in user.client_ids):
            # An unknown name is unchecked input (maybe a password): shown only as its tag.
            shown = username_tag(username) if user is None else username
            reason = f"unknown user {shown!r}" if user is None else (
                f"client id {client_id!r} may not use the credentials of {username!r}")
            log.info(
                "authorize username=%r client_id=%r %s %r: %s",
                shown,
                client_id,
                action or "(no action)",
                topic,
                reason,
                extra={"event": "authorize", "outcome": "deny"},
            )
            return _not_authorized(reason)
        identity = user.external_id
        if user.binds_client_id and client_id:
            identity = f"{identity}{BOUND_ID_SEPARATOR}{client_id}"
        return self.authorize(external_id=identity, topic=topic, action=action)

    def _authorize(self, external_id: str, topic: str, action: str) -> AuthzAnswer:
        user, client_id = self._resolve(external_id)
        if user is None:
            return _not_authorized(f"unknown identity {external_id!r}")
        if action == PUBLISH:
            try:
                validate_topic_name(topic)
            except InvalidTopic as exc:
                return AuthzAnswer(authorized=False, reason_code=REASON_TOPIC_NAME_INVALID, reason=str(exc))
            for pattern in _expanded(user.publish, user, client_id):
                if topic_matches(pattern, topic):
                    return _AUTHORIZED
            return _not_authorized(f"no publish pattern of {user.username!r} matches {topic!r}")
        if action == SUBSCRIBE:
            try:
                validate_topic_filter(topic)
            except InvalidTopic as exc:
                return AuthzAnswer(authorized=False, reason_code=REASON_TOPIC_FILTER_INVALID, reason=str(exc))
            for pattern in _expanded(user.subscribe, user, client_id):
                if filter_covers(pattern, topic):
                    return _AUTHORIZED
            return _not_authorized(f"no subscribe pattern of {user.username!r} covers {topic!r}")
        return _not_authorized(f"unknown action {action!r}; expected publish or subscribe")

    def _resolve(self, external_id: str) -> tuple[AuthUser | None, str]:
        user = self._by_external_id.get(external_id)
        if user is not None:
            return user, ""
        base, separator, client_id = external_id.partition(BOUND_ID_SEPARATOR)
        user = self._by_external_id.get(base) if separator else None
        if user is None or not user.binds_client_id or not client_id:
            return None, ""
        if user.client_ids and client_id not in user.client_ids:
            return None, ""
        return user, client_id


def _expanded(patterns: Sequence[str], user: AuthUser, client_id: str) -> list[str]:
    result: list[str] = []
    for pattern in patterns:
        concrete = expand(pattern, username=user.username, client_id=client_id, deny=False)
        if concrete is not None:
            result.append(concrete)
    return result


def _not_authorized(reason: str) -> AuthzAnswer:
    return AuthzAnswer(authorized=False, reason_code=REASON_NOT_AUTHORIZED, reason=reason)


# --------------------------------------------------------------------------- gRPC


def _grpc_modules(package: str) -> tuple[ModuleType, ModuleType]:
    if package == BROKER_PACKAGE:
        from auth_providers.proto.broker.auth.v1 import auth_pb2, auth_pb2_grpc
    elif package == FLUXMQ_PACKAGE:
        from auth_providers.proto.fluxmq.auth.v1 import auth_pb2, auth_pb2_grpc  # type: ignore[no-redef]
    else:
        raise ValueError(f"unknown gRPC package {package!r}; expected one of {', '.join(GRPC_PACKAGES)}")
    return auth_pb2, auth_pb2_grpc


def _add_grpc_service(
    server: grpc.aio.Server, package: str, service: AuthService, calls: Counter[str], deny_with_status: bool
) -> None:
    pb2, pb2_grpc = _grpc_modules(package)

    class Servicer(pb2_grpc.AuthServiceServicer):  # type: ignore[name-defined,misc]
        async def Authenticate(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
            calls[AUTHENTICATE] += 1
            calls[f"{package}/{AUTHENTICATE}"] += 1
            answer = await service.authenticate(
                client_id=request.client_id,
                username=request.username,
                password=Secret(request.password),
                protocol=PROTOCOL_NAMES.get(request.protocol, str(request.protocol)),
            )
            if deny_with_status and not answer.authenticated:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, answer.reason)
            return pb2.AuthnRes(
                authenticated=answer.authenticated,
                id=answer.id,
                reason_code=answer.reason_code,
                reason=answer.reason,
            )

        async def Authorize(self, request: Any, context: grpc.aio.ServicerContext) -> Any:  # noqa: N802
            calls[AUTHORIZE] += 1
            calls[f"{package}/{AUTHORIZE}"] += 1
            answer = service.authorize(
                external_id=request.external_id,
                topic=request.topic,
                action=_ACTION_NAMES.get(request.action, str(request.action)),
            )
            if deny_with_status and not answer.authorized:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, answer.reason)
            return pb2.AuthzRes(authorized=answer.authorized, reason_code=answer.reason_code, reason=answer.reason)

    pb2_grpc.add_AuthServiceServicer_to_server(Servicer(), server)


def _grpc_target(host: str, port: int) -> str:
    if not host:
        host = "::"  # every interface; gRPC falls back to IPv4 alone where IPv6 is off
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def _start_grpc(
    host: str, port: int, service: AuthService, calls: Counter[str], deny_with_status: bool, packages: Sequence[str]
) -> tuple[int, grpc.aio.Server]:
    # Without so_reuseport=0 gRPC would share a port another process listens on.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    for package in packages:
        _add_grpc_service(server, package, service, calls, deny_with_status)
    target = _grpc_target(host, port)
    try:
        bound = server.add_insecure_port(target)
    except RuntimeError as exc:
        raise PolygateError(f"auth server cannot listen on {target}: {exc}") from exc
    if bound == 0:
        raise PolygateError(f"auth server cannot listen on {target} (in use or not a local address)")
    await server.start()
    return bound, server


# --------------------------------------------------------------------------- HTTP


class _BadRequest(Exception):
    pass


async def _json_object(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, UnicodeDecodeError) as exc:
        raise _BadRequest(f"the body is not JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise _BadRequest("the body must be a JSON object")
    return body


def _field(body: Mapping[str, Any], name: str) -> str:
    value = body.get(name, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise _BadRequest(f"{name!r} must be a string")
    return value


def _http_app(service: AuthService, calls: Counter[str], deny_with_status: bool) -> web.Application:
    async def authenticate(request: web.Request) -> web.Response:
        calls[AUTHENTICATE] += 1
        try:
            body = await _json_object(request)
            client_id, username = _field(body, "client_id"), _field(body, "username")
            password = Secret(_field(body, "password"))
            protocol = _field(body, "protocol")
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        answer = await service.authenticate(client_id=client_id, username=username, password=password, protocol=protocol)
        status = 401 if deny_with_status and not answer.authenticated else 200
        return web.json_response(
            {
                "authenticated": answer.authenticated,
                "id": answer.id,
                "reason_code": answer.reason_code,
                "reason": answer.reason,
            },
            status=status,
        )

    async def authorize(request: web.Request) -> web.Response:
        calls[AUTHORIZE] += 1
        try:
            body = await _json_object(request)
            external_id, topic, action = _field(body, "external_id"), _field(body, "topic"), _field(body, "action")
        except _BadRequest as exc:
            return web.json_response({"error": str(exc)}, status=400)
        answer = service.authorize(external_id=external_id, topic=topic, action=action)
        status = 403 if deny_with_status and not answer.authorized else 200
        return web.json_response(
            {"authorized": answer.authorized, "reason_code": answer.reason_code, "reason": answer.reason},
            status=status,
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"calls": dict(sorted(calls.items()))})

    app = web.Application(client_max_size=_MAX_HTTP_BODY)
    app.router.add_post("/auth/authenticate", authenticate)
    app.router.add_post("/auth/authorize", authorize)
    app.router.add_get(STATS_PATH, stats)
    _add_rabbitmq_routes(app, service, calls)
    return app


# --------------------------------------------------------------------------- RabbitMQ's auth-backend-http

_RABBITMQ_ALLOW = "allow"
_RABBITMQ_DENY = "deny"
_RABBITMQ_RESOURCES = frozenset({"exchange", "queue", "topic"})
_RABBITMQ_PERMISSIONS = frozenset({"configure", "write", "read"})
#: Topic permissions as the MQTT actions they stand for (RabbitMQ checks `read` when a queue is bound).
_RABBITMQ_TOPIC_ACTIONS: Mapping[str, str] = {"write": PUBLISH, "read": SUBSCRIBE}


def mqtt_topic_from_routing_key(routing_key: str) -> str:
    """The MQTT topic (or filter) that RabbitMQ 3.10's MQTT plugin wrote as this routing key.

    The plugin replaces `/` with `.` and `+` with `*` (`#` stays); this undoes it.
    """
    return routing_key.replace(".", "/").replace("*", "+")


async def _rabbitmq_params(request: web.Request) -> Mapping[str, str]:
    """GET carries the parameters in the query string, POST in a form-encoded body (`auth_http.http_method`)."""
    if request.method == "POST":
        form = await request.post()
        return {key: value for key, value in form.items() if isinstance(value, str)}
    return request.query


def _required(params: Mapping[str, str], *names: str) -> tuple[str, ...]:
    missing = [name for name in names if name not in params]
    if missing:
        raise _BadRequest(f"missing parameter(s): {', '.join(missing)}")
    return tuple(params[name] for name in names)


def _add_rabbitmq_routes(app: web.Application, service: AuthService, calls: Counter[str]) -> None:
    # RabbitMQ takes any status but 200/201 as an error (the login or operation
    # fails), so a refusal is always `deny` with 200, whatever deny_with_status says.

    def answer(allowed: bool) -> web.Response:
        if not allowed:
            calls[RABBITMQ_DENIED] += 1
        return web.Response(text=_RABBITMQ_ALLOW if allowed else _RABBITMQ_DENY)

    async def user(request: web.Request) -> web.Response:
        calls[RABBITMQ_USER] += 1
        try:
            params = await _rabbitmq_params(request)
            (username,) = _required(params, "username")
        except _BadRequest as exc:
            return web.Response(status=400, text=str(exc))
        # A login without a password (a certificate login) cannot be checked here: authenticate refuses it.
        result = await service.authenticate(
            client_id=params.get("client_id", ""),
            username=username,
            password=Secret(params.get("password", "")),
            protocol="mqtt" if "client_id" in params else "",
        )
        return answer(result.authenticated)

    async def vhost(request: web.Request) -> web.Response:
        calls[RABBITMQ_VHOST] += 1
        try:
            username, vhost_name = _required(await _rabbitmq_params(request), "username", "vhost")
        except _BadRequest as exc:
            return web.Response(status=400, text=str(exc))
        allowed = service.knows(username)
        log.log(logging.DEBUG if allowed else logging.INFO, "rabbitmq vhost username=%r vhost=%r: %s",
                username if allowed else username_tag(username), vhost_name, _RABBITMQ_ALLOW if allowed else "unknown user",
                extra={"event": "rabbitmq_vhost", "outcome": "allow" if allowed else "deny"})
        return answer(allowed)

    async def resource(request: web.Request) -> web.Response:
        calls[RABBITMQ_RESOURCE] += 1
        try:
            username, _vhost, kind, name, permission = _required(
                await _rabbitmq_params(request), "username", "vhost", "resource", "name", "permission")
        except _BadRequest as exc:
            return web.Response(status=400, text=str(exc))
        # Queues and exchanges are RabbitMQ's plumbing for MQTT; topics are checked at topic_path.
        allowed = service.knows(username) and kind in _RABBITMQ_RESOURCES and permission in _RABBITMQ_PERMISSIONS
        log.log(logging.DEBUG if allowed else logging.INFO, "rabbitmq resource username=%r %s %r %s: %s",
                username if service.knows(username) else username_tag(username), kind, name, permission, _RABBITMQ_ALLOW if allowed else _RABBITMQ_DENY,
                extra={"event": "rabbitmq_resource", "outcome": "allow" if allowed else "deny"})
        return answer(allowed)

    async def topic(request: web.Request) -> web.Response:
        calls[RABBITMQ_TOPIC] += 1
        try:
            params = await _rabbitmq_params(request)
            username, _vhost, kind, _exchange, permission, routing_key = _required(
                params, "username", "vhost", "resource", "name", "permission", "routing_key")
        except _BadRequest as exc:
            return web.Response(status=400, text=str(exc))
        action = _RABBITMQ_TOPIC_ACTIONS.get(permission) if kind == "topic" else None
        if action is None:
            log.info("rabbitmq topic username=%r resource=%r permission=%r: not a topic read or write",
                     username, kind, permission, extra={"event": "rabbitmq_topic", "outcome": "deny"})
            return answer(False)
        result = service.authorize_user(
            username=username,
            client_id=params.get("variable_map.client_id", ""),
            topic=mqtt_topic_from_routing_key(routing_key),
            action=action,
        )
        return answer(result.authorized)

    for path, handler in (
        (RABBITMQ_PATHS["user_path"], user),
        (RABBITMQ_PATHS["vhost_path"], vhost),
        (RABBITMQ_PATHS["resource_path"], resource),
        (RABBITMQ_PATHS["topic_path"], topic),
    ):
        app.router.add_get(path, handler)
        app.router.add_post(path, handler)


async def _start_http(
    host: str, port: int, service: AuthService, calls: Counter[str], deny_with_status: bool
) -> tuple[int, web.AppRunner]:
    runner = web.AppRunner(_http_app(service, calls, deny_with_status), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host or None, port, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise PolygateError(f"auth server cannot listen on {host or '*'}:{port}: {exc.strerror or exc}") from exc
    return int(runner.addresses[0][1]), runner


# --------------------------------------------------------------------------- running


class RunningAuthServer:
    """A started auth server. `calls` counts requests per method ("authenticate", "authorize", "rabbitmq/user", ...)."""

    def __init__(
        self,
        *,
        transport: str,
        host: str,
        port: int,
        service: AuthService,
        calls: Counter[str],
        grpc_server: grpc.aio.Server | None = None,
        http_runner: web.AppRunner | None = None,
    ) -> None:
        self.transport = transport
        self.host = host
        self.port = port
        self.service = service
        self.calls = calls
        self._grpc_server = grpc_server
        self._http_runner = http_runner

    @property
    def url(self) -> str:
        """What to write in `auth.url`: host:port for gRPC, http://host:port for HTTP."""
        target = _grpc_target(self.host or "127.0.0.1", self.port)
        return target if self.transport == GRPC else f"http://{target}"

    def replace_users(self, users: UsersFile) -> None:
        self.service.replace_users(users)

    async def stop(self, grace: float = 1.0) -> None:
        if self._grpc_server is not None:
            server, self._grpc_server = self._grpc_server, None
            await server.stop(grace)
        if self._http_runner is not None:
            runner, self._http_runner = self._http_runner, None
            await runner.cleanup()

    async def __aenter__(self) -> RunningAuthServer:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def start_auth_server(
    users: UsersFile | str | os.PathLike[str],
    *,
    host: str,
    port: int,
    transport: str,
    deny_with_status: bool = False,
    grpc_packages: Sequence[str] = GRPC_PACKAGES,
) -> RunningAuthServer:
    """Start the reference auth service; port 0 picks a free port (see `.port`).

    `deny_with_status` answers a refusal with a status instead of a body
    (gRPC UNAUTHENTICATED / PERMISSION_DENIED, HTTP 401 / 403), as some
    services do. `grpc_packages` chooses which callout packages are served.
    """
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown transport {transport!r}; expected grpc or http")
    if not isinstance(users, UsersFile):
        users = load_users(users)
    service = AuthService(users)
    calls: Counter[str] = Counter()
    if transport == GRPC:
        if not grpc_packages:
            raise ValueError("serve at least one gRPC package")
        for package in grpc_packages:
            _grpc_modules(package)  # fail early on a misspelt package
        bound, grpc_server = await _start_grpc(host, port, service, calls, deny_with_status, grpc_packages)
        return RunningAuthServer(
            transport=transport, host=host, port=bound, service=service, calls=calls, grpc_server=grpc_server
        )
    bound, runner = await _start_http(host, port, service, calls, deny_with_status)
    return RunningAuthServer(
        transport=transport, host=host, port=bound, service=service, calls=calls, http_runner=runner
    )
