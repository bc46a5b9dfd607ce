"""The HTTP frontend: publish with POST, subscribe with Server-Sent Events.

`POST /<topic>` publishes its raw body, `POST /publish` takes JSON with a
base64 payload, `GET /subscribe?topic=<filter>` streams `text/event-stream`.
Every request carries its own credentials; the dispatcher authenticates and
authorizes it (`decide_stateless`) and this module only maps the decision to a
status code. A raw body is read only once its request is authorized, and no
body is read beyond the size limit.

What a publisher sees. Each POST is its own publisher for the router
(`gateway.backpressure`); its answer follows the flow contract every protocol
keeps ("acknowledged means delivered"):
    every matching queue took the message -> 202, only once the store has
        committed it when a durable queue (a persistent MQTT session, a durable
        AMQP 0.9.1 queue) or the retained store wrote it
    a subscriber's full queue refused it -> 503 with Retry-After and a JSON
        error saying a subscriber queue is full (`limits.queue_overflow`
        reject_new, the AMQP default; counted in polygate_messages_refused)
    a full `block` queue or the memory watermark holds it -> the 202 waits
        until no queue holds it any more (or the client gives up)
    the gateway is shutting down -> 503 with Retry-After; nothing is routed
A full `drop_oldest` queue (MQTT sessions, SSE streams, CoAP observers by
default) takes the message and drops its own oldest one: the publisher sees
202 as usual.

An SSE stream is a subscriber like any other: its waiting events are a
`MessageQueue` with the HTTP overflow policy (drop_oldest by default, so a
slow reader loses its oldest events, counted in polygate_queue_overflows and
polygate_messages_dropped and logged, and never holds a publisher back; under
`block` it holds its publishers until it has drained to half its bound).
Streams are not kept across a restart. `limits.max_subscriptions_per_client`
caps the filters of one client id's open streams together; a stream that
would pass it is refused with 429 (Retry-After), as a whole.

The listening socket, TLS and runner come from `gateway.frontends.aiohttp_listener`
(shared with the health and WebSocket listeners); client-certificate identities
come from `gateway.frontends.peers`, as for every frontend.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable, Mapping
from urllib.parse import unquote

from aiohttp import web
from multidict import MultiMapping

from gateway.backpressure import Publisher
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.errors import InvalidTopic
from gateway.events import NO_SECRET, Action, AuthEvent, Outcome, Protocol, Secret
from gateway.frontends.aiohttp_listener import Admission, AiohttpListener
from gateway.frontends.flow import publish_request
from gateway.frontends.peers import NO_CERTIFICATE, format_peer, password_refused, peer_certificate
from gateway.metrics import Metrics
from gateway.queues import MemoryBudget, MessageQueue, QueueLimits, limits_for
from gateway.router import Message
from gateway.topics import validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.http")

#: Seconds an idle HTTP connection is kept open between requests.
HTTP_KEEPALIVE_TIMEOUT = 75.0

#: A comment line this often keeps proxies from closing an idle event stream.
KEEPALIVE_INTERVAL = 15.0
#: Retry-After, in seconds, of a publish refused by a full queue or made while the gateway stops.
RETRY_FULL = 1
#: Upper bound of a Retry-After header, in seconds.
MAX_RETRY_AFTER = 3600
#: Events written to the socket in one `write` (bounds one batch's memory).
EVENTS_PER_WRITE = 256
#: Retry-After, in seconds, of a stream refused by limits.max_subscriptions_per_client: a
#: slot frees only when one of the client's own streams ends, so retrying at once is useless.
RETRY_SUBSCRIPTIONS = 60
#: Connections from outside the allowed networks kept open at once to be told 403 (the rest are closed at once).
ANSWER_NOT_ALLOWED = 64

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REALM = 'Basic realm="polygate"'
_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    # nginx buffers responses unless told otherwise, which would hold events back.
    "X-Accel-Buffering": "no",
}
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})


# -- errors: each carries its status; `error_response` renders any of them -------------------


class HTTPError(Exception):
    """An answer to the client other than success; `str(exc)` is shown to it."""

    status = 500
    #: The connection cannot go on after this error (its byte stream is broken).
    close_connection = False

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.headers: dict[str, str] = dict(headers or {})


class BadRequest(HTTPError):
    status = 400


class Unauthorized(HTTPError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message, headers={"WWW-Authenticate": _REALM})


class Forbidden(HTTPError):
    status = 403


class NotAllowed(Forbidden):
    """A connection from outside the allowed networks: answered once, then closed."""

    close_connection = True


class MethodNotAllowed(HTTPError):
    status = 405

    def __init__(self, message: str, *, allow: str) -> None:
        super().__init__(message, headers={"Allow": allow})


class PayloadTooLarge(HTTPError):
    status = 413


class _RetryLater(HTTPError):
    def __init__(self, message: str, *, retry_after: float) -> None:
        # A limiter may answer inf (never); Retry-After still needs a finite number.
        seconds = max(1, math.ceil(min(retry_after, MAX_RETRY_AFTER)))
        super().__init__(message, headers={"Retry-After": str(seconds)})


class TooManyRequests(_RetryLater):
    status = 429


class ServiceUnavailable(_RetryLater):
    status = 503


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    response = web.json_response({"error": message}, status=status)
    if headers:
        response.headers.update(headers)
    return response


@web.middleware
async def error_boundary(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place an error becomes a response; anything unexpected is a logged 500."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except HTTPError as exc:
        response = error_response(exc.status, str(exc), exc.headers)
        if exc.close_connection:
            response.force_close()
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        allow = exc.headers.get("Allow")
        return error_response(exc.status, exc.reason, {"Allow": allow} if allow else None)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.rel_url.raw_path)
        return error_response(500, "internal server error")


# -- who is asking -------------------------------------------------------------------------------


def _credentials(headers: Mapping[str, str]) -> tuple[str, Secret]:
    """(username, secret) from Basic, or Bearer/Client with the user in a header."""
    username = headers.get("X-Username") or headers.get("X-FluxMQ-Username") or ""
    authorization = headers.get("Authorization", "").strip()
    if not authorization:
        return username, NO_SECRET
    scheme, _, value = authorization.partition(" ")
    scheme = scheme.lower()
    if scheme in ("bearer", "client"):
        return username, Secret(value.strip())
    if scheme != "basic":
        raise Unauthorized("unsupported Authorization scheme: use Basic, Bearer or Client")
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Unauthorized("malformed Basic credentials: not base64") from None
    user_bytes, colon, password = decoded.partition(b":")
    if not colon:
        raise Unauthorized("malformed Basic credentials: expected username:password")
    try:
        basic_user = user_bytes.decode("utf-8")
    except UnicodeDecodeError:
        raise Unauthorized("malformed Basic credentials: username is not UTF-8") from None
    return basic_user, Secret(password)


# -- the subscriber side of one event stream -------------------------------------------------------


def encode_event(message: Message) -> bytes:
    """One SSE event. json.dumps escapes control characters, so `data:` stays one line."""
    data = json.dumps(
        {"topic": message.topic, "payload": base64.b64encode(message.payload).decode("ascii")},
        separators=(",", ":"),
    )
    return b"data: " + data.encode("ascii") + b"\n\n"


class SSEStream:
    """One `GET /subscribe` stream: a router subscriber, attached to the connection it is served on
    (which GatewayState counts, drains and closes through it).

    `deliver` only puts into the stream's bounded `MessageQueue` (whose policy
    decides what a full one does); the request's own task writes.
    """

    __slots__ = ("client_id", "_queue", "_entries", "_wakeup", "_closed", "_metrics", "close_reason")

    def __init__(self, client_id: str, *, limits: QueueLimits, budget: MemoryBudget, metrics: Metrics) -> None:
        self.client_id = client_id
        self._queue = MessageQueue(name=client_id, protocol=Protocol.HTTP, limits=limits, budget=budget,
                                   metrics=metrics)
        self._entries = self._queue.entries
        self._wakeup = asyncio.Event()
        self._closed = False
        self._metrics = metrics
        self.close_reason = ""

    def deliver(self, message: Message, qos: int, retain: bool, publisher: Publisher) -> int:
        if self._closed:
            # Between close() and unsubscribe_all: counted, not worth a warning.
            self._metrics.dropped(Protocol.HTTP, "stream_closed")
            return 0
        status = self._queue.put(message, 0, publisher)
        self._wakeup.set()
        return status

    def drained(self) -> bool:
        """Nothing waits to be written to the client (the gateway's shutdown polls this)."""
        return not self._queue

    def discard(self) -> None:
        """The stream ended: what it still holds is lost (counted), and publishers it held go on."""
        lost = self._queue.clear()
        if lost:
            self._metrics.dropped(Protocol.HTTP, "stream_closed", lost)

    def close(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self.close_reason = reason
            self._wakeup.set()

    @property
    def closed(self) -> bool:
        return self._closed

    async def run(self, response: web.StreamResponse, first: Iterable[Message], keepalive: float) -> None:
        """Write `first`, then every delivered message, until closed; what is queued is flushed."""
        await self._send(response, list(first))
        queue = self._queue
        entries = self._entries
        while True:
            if entries:
                batch = [queue.popleft()[0] for _ in range(min(len(entries), EVENTS_PER_WRITE))]
                await self._send(response, batch)
                continue
            if self._closed:
                return
            self._wakeup.clear()
            try:
                async with asyncio.timeout(keepalive):
                    await self._wakeup.wait()
            except TimeoutError:
                await response.write(b": keepalive\n\n")

    async def _send(self, response: web.StreamResponse, messages: list[Message]) -> None:
        for start in range(0, len(messages), EVENTS_PER_WRITE):
            chunk = messages[start:start + EVENTS_PER_WRITE]
            await response.write(b"".join(encode_event(m) for m in chunk))
            self._metrics.messages_out[Protocol.HTTP] += len(chunk)


# -- the publisher side of one POST --------------------------------------------------------------------


# -- the frontend ------------------------------------------------------------------------------------


def _parse_qos(value: object) -> int:
    if isinstance(value, str) and value in ("0", "1", "2"):
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 2:
        return value
    raise BadRequest(f"qos must be 0, 1 or 2, not {value!r}")


def _parse_retain(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest(f"retain must be true, false, 1 or 0, not {value!r}")


class BadBody(BadRequest):
    """A body aiohttp could not read (a `Content-Encoding` that does not decode, broken chunks)."""

    close_connection = True


async def _read_body(request: web.Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body of {declared} bytes is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        # Chunked bodies have no declared length: count while reading.
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
            chunks.append(chunk)
    except web.RequestPayloadError:
        raise BadBody("the request body could not be read: check its Content-Encoding and framing") from None
    return b"".join(chunks)


class HTTPFrontend:
    def __init__(self, ctx: FrontendContext, listener: ListenerConfig, *, keepalive: float = KEEPALIVE_INTERVAL) -> None:
        self._ctx = ctx
        self._listener = listener
        self._keepalive = keepalive
        limits = ctx.config.limits
        self._max_message = limits.max_message_size
        self._max_topic = limits.max_topic_length
        # The JSON form carries the payload in base64 (4/3 larger) plus the topic, escaped.
        self._max_json_body = 4 * math.ceil(limits.max_message_size / 3) + 6 * limits.max_topic_length + 4096
        self._streams: set[SSEStream] = set()
        self._stream_limits = limits_for(limits, Protocol.HTTP)
        self._max_subscriptions = limits.max_subscriptions_per_client
        #: Filters held by the open streams of each client id, across HTTP listeners.
        self._subscriptions: dict[str, int] = ctx.state.shared("http.subscriptions", dict)
        app = web.Application(
            middlewares=[error_boundary],
            client_max_size=max(self._max_message, self._max_json_body),
        )
        app.router.add_route("*", r"/{tail:[\s\S]*}", self._handle)
        # Cancelling a request's task when its client goes away is how an idle
        # event stream learns of the disconnect without waiting for a keepalive.
        # An idle keep-alive connection is closed after HTTP_KEEPALIVE_TIMEOUT,
        # not aiohttp's default of an hour; request headers must be complete
        # within limits.handshake_timeout. Each TCP connection (not each request)
        # is admitted by the connection limits; polygate_connections{protocol="http"}
        # counts them.
        self._server = AiohttpListener(
            app,
            listener,
            shutdown_timeout=ctx.config.server.shutdown_timeout,
            handler_cancellation=True,
            keepalive_timeout=HTTP_KEEPALIVE_TIMEOUT,
            admission=Admission(ctx=ctx, protocol=Protocol.HTTP, answer_not_allowed=ANSWER_NOT_ALLOWED),
        )

    async def start(self) -> None:
        self._ctx.state.set_limit(self._listener.name, self._listener.max_connections, self._listener.allowed_cidrs)
        await self._server.start()

    @property
    def bound(self) -> tuple[str, int]:
        return self._server.bound

    async def stop_accepting(self) -> None:
        await self._server.stop_accepting()

    async def aclose(self) -> None:
        for stream in list(self._streams):
            stream.close("gateway shutting down")
        await self._server.aclose()

    # -- routing --------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        client_ip = request.remote or ""
        if self._server.not_allowed(request):
            # Counted and logged when the connection was accepted.
            raise NotAllowed("your address is not allowed")
        wait = self._ctx.ratelimits.check_connection(client_ip)
        if wait > 0:
            raise TooManyRequests("too many requests from your address", retry_after=wait)
        try:
            path = unquote(request.rel_url.raw_path[1:], errors="strict")
        except UnicodeDecodeError:
            raise BadRequest("the path is not valid percent-encoded UTF-8") from None
        if path == "subscribe" and request.method == "GET":
            return await self._subscribe(request)
        if request.method == "POST":
            self._check_running()
            if path == "publish":
                return await self._publish_json(request)
            return await self._publish_raw(request, path)
        if path == "subscribe":
            raise MethodNotAllowed("use GET /subscribe?topic=<filter> to subscribe", allow="GET")
        raise MethodNotAllowed("use POST /<topic> or POST /publish to publish", allow="POST")

    def _client(self, request: web.Request) -> AuthEvent:
        transport = request.transport
        peername = transport.get_extra_info("peername") if transport is not None else None
        peer = format_peer(peername[0], peername[1]) if peername else (request.remote or "")
        headers = request.headers
        client_id = headers.get("X-Client-ID") or headers.get("X-FluxMQ-Client-ID") or f"http:{peer}"
        certificate = (
            peer_certificate(transport, self._ctx.config.auth.mtls_identity)
            if transport is not None and self._listener.tls else NO_CERTIFICATE
        )
        if self._ctx.dispatcher.requires_auth(Protocol.HTTP):
            username, secret = _credentials(headers)
        else:
            username, secret = headers.get("X-Username") or headers.get("X-FluxMQ-Username") or "", NO_SECRET
        return AuthEvent(
            protocol=Protocol.HTTP, action=Action.CONNECT, client_id=client_id, username=username,
            secret=secret, peer=peer, tls_identity=certificate.identity, tls_serial=certificate.serial,
            tls_fingerprint=certificate.fingerprint,
        )

    async def _authorize(self, client: AuthEvent, action: Action, topic: str) -> tuple[str, ...]:
        """Raise the error a refusal maps to; else the decision's exclusions (for a subscribe)."""
        dispatcher = self._ctx.dispatcher
        if not dispatcher.requires_auth(Protocol.HTTP):
            return ()
        if password_refused(self._ctx.config.auth, self._listener, client.secret) is not None:
            # 403, not 401: no other password will do on this listener either.
            raise Forbidden("passwords are refused on this plaintext listener: use TLS")
        decision = await dispatcher.decide_stateless(client.for_operation(action, topic))
        if decision.outcome is Outcome.ALLOW:
            return decision.exclusions
        if decision.outcome is Outcome.UNAVAILABLE:
            raise ServiceUnavailable("auth service unavailable, try again later", retry_after=1)
        if decision.identity is None:
            raise Unauthorized("bad credentials")
        raise Forbidden(f"not authorized to {action.value} {topic!r}")

    # -- publish ---------------------------------------------------------------------------------

    def _check_topic(self, topic: str) -> None:
        try:
            validate_topic_name(topic, self._max_topic)
        except InvalidTopic as exc:
            raise BadRequest(str(exc)) from None

    async def _publish_raw(self, request: web.Request, topic: str) -> web.Response:
        query = request.query
        qos = _parse_qos(query["qos"]) if "qos" in query else 0
        retain = _parse_retain(query["retain"]) if "retain" in query else False
        self._check_topic(topic)
        declared = request.content_length
        if declared is not None and declared > self._max_message:
            raise PayloadTooLarge(
                f"message of {declared} bytes is larger than the limit of {self._max_message} bytes"
            )
        client = self._client(request)
        await self._authorize(client, Action.PUBLISH, topic)
        self._check_message_rate(client)
        payload = await self._read_body(request, self._max_message)
        return await self._publish(client, topic, payload, qos, retain)

    async def _publish_json(self, request: web.Request) -> web.Response:
        body = await self._read_body(request, self._max_json_body)
        topic, payload, qos, retain = self._parse_json(body)
        client = self._client(request)
        await self._authorize(client, Action.PUBLISH, topic)
        self._check_message_rate(client)
        return await self._publish(client, topic, payload, qos, retain)

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        try:
            return await _read_body(request, limit)
        except BadBody:
            # Logged as the listener logs requests it cannot parse: one throttled line.
            self._server.request_errors.bad_request(request.remote or "?", "unreadable body")
            raise

    def _parse_json(self, body: bytes) -> tuple[str, bytes, int, bool]:
        try:
            document = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("body is not valid JSON") from None
        except RecursionError:
            # Nesting deep enough to exhaust the parser's stack: no valid request nests at all.
            raise BadRequest("body is not valid JSON: nested too deeply") from None
        if not isinstance(document, dict):
            raise BadRequest('body must be a JSON object: {"topic", "payload" (base64), "qos", "retain"}')
        topic = document.get("topic")
        if not isinstance(topic, str):
            raise BadRequest('"topic" is required and must be a string')
        self._check_topic(topic)
        encoded = document.get("payload", "")
        if not isinstance(encoded, str):
            raise BadRequest('"payload" must be a base64 string')
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest('"payload" is not valid base64') from None
        if len(payload) > self._max_message:
            raise PayloadTooLarge(
                f"message of {len(payload)} bytes is larger than the limit of {self._max_message} bytes"
            )
        qos = _parse_qos(document.get("qos", 0))
        retain = document.get("retain", False)
        if not isinstance(retain, bool):
            raise BadRequest('"retain" must be true or false')
        return topic, payload, qos, retain

    def _check_message_rate(self, client: AuthEvent) -> None:
        # After authorization, so nobody can spend another client's budget by naming its id.
        wait = self._ctx.ratelimits.check_message(client.client_id)
        if wait > 0:
            raise TooManyRequests("too many messages from this client", retry_after=wait)

    def _check_running(self) -> None:
        if self._ctx.state.shutting_down:
            raise ServiceUnavailable("the gateway is shutting down: publish again later", retry_after=RETRY_FULL)

    async def _publish(self, client: AuthEvent, topic: str, payload: bytes, qos: int, retain: bool) -> web.Response:
        """Route the message; 202 once every queue took it (and the store committed what it wrote)."""
        # Checked again here: the gateway may have begun stopping while auth or the body was awaited.
        self._check_running()
        if not await publish_request(self._ctx, Message(topic, payload, qos, retain), Protocol.HTTP,
                                     repr(client.client_id)):
            raise ServiceUnavailable(
                "a subscriber queue is full and refused the message: publish again later", retry_after=RETRY_FULL)
        return web.json_response({"status": "accepted"}, status=202)

    # -- subscribe -------------------------------------------------------------------------------

    def _filters(self, query: MultiMapping[str]) -> list[str]:
        filters = list(dict.fromkeys(query.getall("topic", ())))
        if not filters:
            raise BadRequest("give at least one topic filter: GET /subscribe?topic=<filter>")
        for topic_filter in filters:
            try:
                validate_topic_filter(topic_filter, self._max_topic)
            except InvalidTopic as exc:
                raise BadRequest(str(exc)) from None
        return filters

    async def _subscribe(self, request: web.Request) -> web.StreamResponse:
        filters = self._filters(request.query)
        client = self._client(request)
        exclusions: dict[str, tuple[str, ...]] = {}
        for topic_filter in filters:
            exclusions[topic_filter] = await self._authorize(client, Action.SUBSCRIBE, topic_filter)
        ctx = self._ctx
        if ctx.state.shutting_down:
            raise ServiceUnavailable("the gateway is shutting down", retry_after=1)
        client_id = client.client_id
        held = self._subscriptions.get(client_id, 0)
        cap = self._max_subscriptions
        # After authorization, so nobody can use up another client's subscriptions by naming its id.
        # A stream is all or nothing: its filters are either all served or refused together.
        if cap and held + len(filters) > cap:
            ctx.state.note_refused(self._listener.name, "max_subscriptions_per_client", client.peer)
            raise TooManyRequests(
                f"this client holds {held} of its {cap} subscriptions (limits.max_subscriptions_per_client): "
                f"close a stream before opening one with {len(filters)} more",
                retry_after=RETRY_SUBSCRIPTIONS,
            )
        stream = SSEStream(client_id, limits=self._stream_limits, budget=ctx.router.budget, metrics=ctx.metrics)
        # The connection carries the stream: the gateway's shutdown closes and waits for it through it.
        connection = self._server.connection_of(request)
        if connection is not None:
            connection.attached = stream
        self._streams.add(stream)
        response = web.StreamResponse(status=200, headers=_SSE_HEADERS)
        # A finished stream ends its connection; keep-alive would only hold a socket.
        response.force_close()
        self._subscriptions[client_id] = held + len(filters)
        try:
            # Subscribed before the headers go out: once a client sees them, nothing published is missed.
            retained: dict[str, Message] = {}
            for topic_filter in filters:
                for message in ctx.router.subscribe(stream, topic_filter, 0, exclusions[topic_filter]):
                    retained.setdefault(message.topic, message)
            await response.prepare(request)
            await stream.run(response, retained.values(), self._keepalive)
        except ConnectionError:
            log.debug("event stream of client %r: the client went away", client.client_id)
        except Exception:
            if not response.prepared:
                raise
            # The status line is gone: the error boundary can only log, so log here and end the stream.
            log.exception("event stream of client %r failed", client.client_id)
        finally:
            stream.close("stream ended")
            ctx.router.unsubscribe_all(stream)
            stream.discard()
            if connection is not None and connection.attached is stream:
                connection.attached = None
            self._streams.discard(stream)
            left = self._subscriptions[client_id] - len(filters)
            if left:
                self._subscriptions[client_id] = left
            else:
                del self._subscriptions[client_id]
        return response
