"""Test doubles of an external auth service: real gRPC and HTTP servers on loopback.

One `AuthServiceLogic` decides what the service answers and records what it
was asked; `GrpcAuthService` serves it as `broker.auth.v1`, `fluxmq.auth.v1` or
both, `HttpAuthService` as FluxMQ's JSON. Both listen on 127.0.0.1 port 0 and
can be stopped and started again on the same port (a service that goes away and
comes back). `ServiceThread` runs them on an event loop of their own so that
blocking clients in a test do not stall them.

The default rules: user U with password `users[U]` is identity `ext:U` and may
publish and subscribe under `U/`; everything else is denied.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

import grpc
import grpc.aio
from aiohttp import web

from auth_providers.proto.broker.auth.v1 import auth_pb2 as broker_pb2
from auth_providers.proto.fluxmq.auth.v1 import auth_pb2 as fluxmq_pb2

T = TypeVar("T")

BROKER = "broker.auth.v1"
FLUXMQ = "fluxmq.auth.v1"
PACKAGES: dict[str, ModuleType] = {BROKER: broker_pb2, FLUXMQ: fluxmq_pb2}

#: The contract's enums, for reading recorded gRPC requests.
GRPC_PROTOCOLS = {0: "", 1: "mqtt", 2: "amqp_1_0", 3: "amqp_0_9_1", 4: "http", 5: "coap"}
GRPC_ACTIONS = {0: "", 1: "publish", 2: "subscribe"}


class Refusal(Exception):
    """The service answers with a status instead of a message.

    `kind` "deny" is a gRPC UNAUTHENTICATED/HTTP 401; "fail" is `status`
    (a gRPC status code or an HTTP status), whatever it is.
    """

    def __init__(self, kind: str, message: str, status: grpc.StatusCode | int | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status


@dataclass
class Request:
    method: str  # "authenticate" | "authorize"
    fields: dict[str, Any]
    transport: str  # "grpc:<package>" | "http"


class AuthServiceLogic:
    """What the test service answers, and everything it was asked."""

    def __init__(self, users: dict[str, str] | None = None) -> None:
        self.users: dict[str, str] = dict(users or {})
        #: Username -> the id answered in AuthnRes.id ("" answers no id).
        self.ids: dict[str, str] = {}
        #: Answer a wrong password with a status (UNAUTHENTICATED / 401) instead of authenticated=false.
        self.deny_with_status = False
        #: Put the password the client sent into the denial's reason (a careless service).
        self.echo_password = False
        #: Answer every call with this gRPC status or HTTP status.
        self.fail_with: grpc.StatusCode | int | None = None
        #: Answer every HTTP call with this raw 200 body (a body that does not parse).
        self.raw_body: bytes | None = None
        #: Seconds to wait before answering.
        self.delay = 0.0
        #: HTTP Cache-Control header on every answer.
        self.cache_control: str | None = None
        self.requests: list[Request] = []
        self.calls: Counter[str] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0

    def reset_counts(self) -> None:
        self.requests.clear()
        self.calls.clear()
        self.max_in_flight = 0

    def identity_of(self, username: str) -> str:
        return self.ids.get(username, f"ext:{username}")

    async def authenticate(self, fields: dict[str, Any], transport: str) -> dict[str, Any]:
        async with self._call("authenticate", fields, transport):
            username, password = fields.get("username", ""), fields.get("password", "")
            if username in self.users and self.users[username] == password:
                return {"authenticated": True, "id": self.identity_of(username), "reason_code": 0, "reason": ""}
            reason = "bad username or password"
            if self.echo_password:
                reason += f" (got {password!r})"
            if self.deny_with_status:
                raise Refusal("deny", reason)
            return {"authenticated": False, "id": "", "reason_code": 4, "reason": reason}

    async def authorize(self, fields: dict[str, Any], transport: str) -> dict[str, Any]:
        async with self._call("authorize", fields, transport):
            external_id, topic = fields.get("external_id", ""), fields.get("topic", "")
            owner = next((u for u in self.users if self.identity_of(u) == external_id), None)
            if owner is not None and topic.startswith(f"{owner}/"):
                return {"authorized": True, "reason_code": 0, "reason": ""}
            return {"authorized": False, "reason_code": 5, "reason": f"{external_id} may not use {topic}"}

    def _call(self, method: str, fields: dict[str, Any], transport: str) -> _Call:
        return _Call(self, method, fields, transport)


class _Call:
    """Records one call and applies the delay and forced failure around its answer."""

    def __init__(self, logic: AuthServiceLogic, method: str, fields: dict[str, Any], transport: str) -> None:
        self.logic = logic
        self.method = method
        self.fields = fields
        self.transport = transport

    async def __aenter__(self) -> None:
        logic = self.logic
        logic.requests.append(Request(self.method, dict(self.fields), self.transport))
        logic.calls[self.method] += 1
        logic.in_flight += 1
        logic.max_in_flight = max(logic.max_in_flight, logic.in_flight)
        try:
            if logic.delay:
                await asyncio.sleep(logic.delay)
            if logic.fail_with is not None:
                raise Refusal("fail", "the test service was told to fail", logic.fail_with)
        except BaseException:
            logic.in_flight -= 1
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.logic.in_flight -= 1


# -- gRPC ---------------------------------------------------------------------------------------


class GrpcAuthService:
    """`AuthService` of the given packages; every other method is UNIMPLEMENTED (and counted in `paths`)."""

    def __init__(
        self,
        logic: AuthServiceLogic,
        packages: tuple[str, ...] = (BROKER,),
        *,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.logic = logic
        self.packages = packages
        self.credentials = credentials
        #: Every method path the service was asked for, served or not.
        self.paths: Counter[str] = Counter()
        self.port = 0
        self._server: grpc.aio.Server | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> GrpcAuthService:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_GenericHandler(self)])
        address = f"127.0.0.1:{self.port}"
        if self.credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, self.credentials)
        await server.start()
        self._server = server
        return self

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace=None)


class _GenericHandler(grpc.GenericRpcHandler):
    def __init__(self, service: GrpcAuthService) -> None:
        self.service_ = service

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        path: str = handler_call_details.method  # type: ignore[attr-defined]
        self.service_.paths[path] += 1
        package, _, method = path.lstrip("/").partition(".AuthService/")
        if package not in self.service_.packages:
            return None
        messages = PACKAGES[package]
        logic = self.service_.logic
        transport = f"grpc:{package}"
        if method == "Authenticate":

            async def authenticate(request: Any, context: grpc.aio.ServicerContext) -> Any:
                fields = {
                    "client_id": request.client_id,
                    "username": request.username,
                    "password": request.password,
                    "protocol": GRPC_PROTOCOLS.get(request.protocol, str(request.protocol)),
                }
                answer = await _grpc_answer(logic.authenticate(fields, transport), context)
                return messages.AuthnRes(**answer)

            return grpc.unary_unary_rpc_method_handler(
                authenticate,
                request_deserializer=messages.AuthnReq.FromString,
                response_serializer=messages.AuthnRes.SerializeToString,
            )
        if method == "Authorize":

            async def authorize(request: Any, context: grpc.aio.ServicerContext) -> Any:
                fields = {
                    "external_id": request.external_id,
                    "topic": request.topic,
                    "action": GRPC_ACTIONS.get(request.action, str(request.action)),
                }
                answer = await _grpc_answer(logic.authorize(fields, transport), context)
                return messages.AuthzRes(**answer)

            return grpc.unary_unary_rpc_method_handler(
                authorize,
                request_deserializer=messages.AuthzReq.FromString,
                response_serializer=messages.AuthzRes.SerializeToString,
            )
        return None


async def _grpc_answer(answer: Awaitable[dict[str, Any]], context: grpc.aio.ServicerContext) -> dict[str, Any]:
    try:
        return await answer
    except Refusal as refusal:
        if refusal.kind == "deny":
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(refusal))
        status = refusal.status if isinstance(refusal.status, grpc.StatusCode) else grpc.StatusCode.INTERNAL
        await context.abort(status, str(refusal))
        raise  # abort raises; this keeps type checkers content


# -- HTTP ---------------------------------------------------------------------------------------


class HttpAuthService:
    """FluxMQ's JSON callout under `prefix` (`POST {prefix}/auth/authenticate` and `/auth/authorize`)."""

    def __init__(self, logic: AuthServiceLogic, *, prefix: str = "", ssl_context: ssl.SSLContext | None = None) -> None:
        self.logic = logic
        self.prefix = prefix
        self.ssl_context = ssl_context
        self.port = 0
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://127.0.0.1:{self.port}{self.prefix}"

    async def start(self) -> HttpAuthService:
        app = web.Application()
        app.router.add_post(f"{self.prefix}/auth/authenticate", self._handler(self.logic.authenticate))
        app.router.add_post(f"{self.prefix}/auth/authorize", self._handler(self.logic.authorize))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", self.port, backlog=4096, ssl_context=self.ssl_context)
        await site.start()
        self._runner = runner
        self.port = runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def _handler(
        self, decide: Callable[[dict[str, Any], str], Awaitable[dict[str, Any]]]
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handle(request: web.Request) -> web.Response:
            headers = {"Cache-Control": self.logic.cache_control} if self.logic.cache_control else {}
            try:
                fields = await request.json()
                answer = await decide(fields, "http")
            except Refusal as refusal:
                if refusal.kind == "deny":
                    return web.json_response({"reason": str(refusal), "reason_code": 4}, status=401, headers=headers)
                status = refusal.status if isinstance(refusal.status, int) else 500
                return web.Response(status=status, text=str(refusal))
            if self.logic.raw_body is not None:
                return web.Response(status=200, body=self.logic.raw_body, content_type="application/json")
            return web.Response(status=200, body=json.dumps(answer), content_type="application/json", headers=headers)

        return handle


# -- an event loop of their own -----------------------------------------------------------------------


class ServiceThread:
    """An event loop in a daemon thread for the doubles, driven from synchronous tests."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="auth-service", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        async def wrapper() -> T:
            return fn()

        return self.run(wrapper(), timeout)

    def close(self) -> None:
        async def cancel_rest() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        if self._thread.is_alive():
            self.run(cancel_rest())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()
