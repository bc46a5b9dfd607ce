"""The CoAP frontend (RFC 7252 over UDP, on aiocoap): POST publishes, GET with Observe subscribes.

Requests (the topic is the Uri-Path segments joined by "/"; `#` travels as `%23`):
- `POST /<topic>` (also `POST /mqtt/publish/<topic>`; `/mqtt/publish` alone is the
  topic `mqtt/publish`) publishes the payload: 2.04 Changed. `?qos=0|1|2` (default 0),
  `?retain=true|false|1|0` (default false).
- `GET /<filter>` with Observe: 0 subscribes. The first response is an empty 2.05
  (Observe: 0); then every matching message, retained ones first, is one
  notification: 2.05, the payload as published, Location-Path = the message's
  topic (so an observer of a wildcard filter knows where it came from). A
  notification is confirmable when the message's delivery QoS is 1 or more,
  non-confirmable for QoS 0, and confirmable anyway once CON_CHECK_INTERVAL
  passed since the last one, so an observer that vanished is noticed. `?qos=`
  caps the delivery QoS (default 1). One notification is in flight per
  observation: the next one goes when a CON is acknowledged (a NON goes at once).
- `GET /<topic>` without Observe answers the retained message of that literal
  topic (2.05, Location-Path = topic), or 4.04 when nothing is retained there; a
  filter with a wildcard is 4.00 without Observe.
- Credentials: `?username=&password=`, or a bare secret in `?authorization=`
  (alias `?auth=`), optionally with `?username=`. Client id: `?client_id=`, else
  `coap:<peer ip:port>`. Unknown query parameters are ignored; a repeated one is 4.00.

Codes: 2.04 published, 2.05 content, 2.31 continue (Block1), 4.00 bad topic or
request, 4.01 bad credentials, 4.02 an unsupported critical option, 4.03 not
authorized, 4.04 no retained message, 4.05 another method, 4.08 a block-wise
transfer out of order or unknown, 4.13 too large (Size1 = limits.max_message_size),
4.29 rate limited or an observation over limits.max_subscriptions_per_client
(per client id), 5.03 auth service unavailable, a subscriber queue full,
gateway shutting down or the listener full (4.29 and 5.03 carry Max-Age, a
retry hint in seconds). The payload of an error is a diagnostic message.

What a publisher sees. Each POST is its own publisher for the router
(`gateway.backpressure`) and is answered by the flow contract every protocol
keeps ("acknowledged means delivered"):
    every matching queue took the message -> 2.04, only once the store has
        committed it when a durable queue (a persistent MQTT session, a durable
        AMQP 0.9.1 queue) or the retained store wrote it
    a subscriber's full queue refused it (`limits.queue_overflow` reject_new,
        the AMQP default) -> 5.03 with Max-Age 1 and the diagnostic "a subscriber
        queue is full ..."; counted in polygate_messages_refused
    a full `block` queue or the memory watermark holds it -> the 2.04 waits
        until no queue holds it any more
    the gateway is shutting down -> 5.03; nothing is routed
A full `drop_oldest` queue (MQTT sessions, SSE streams, CoAP observers by
default) takes the message and drops its own oldest one: the publisher sees
2.04 as usual.

An observation is a subscriber like any other: the notifications it has not
sent yet wait in a `MessageQueue` (limits.max_queued_messages and
max_queued_bytes, the CoAP overflow policy: drop_oldest by default, so an
observer that acknowledges slowly loses its oldest messages, a QoS 0 one
first, counted in polygate_queue_overflows and polygate_messages_dropped and
logged, and never holds a publisher back; under `block` it holds its
publishers until it has drained to half its bound). Observations are not kept
across a restart; at shutdown the gateway waits a bounded time for each to
send what it holds (`drained`).

An observation ends when the client deregisters (GET with Observe: 1 on its
token), answers a notification with RST, does not acknowledge a CON
notification within aiocoap's retransmission window, when an ICMP error comes
back from its address, and at shutdown (a final 5.03); its router subscription
goes with it.

Limits: `max_connections` of a CoAP listener caps its concurrent observations
(0 = no cap). aiocoap reads at most MAX_DATAGRAM bytes per datagram: a larger or
unparsable datagram is dropped and counted (`polygate_messages_dropped`), and
nothing else notices. Payloads larger than one block (1024 bytes) travel
block-wise (RFC 7959): Block1 uploads are authorized at their first block and
held up to limits.max_message_size, at most MAX_UPLOADS at once; large
responses and notifications are served by Block2 from the message itself, and
the next notification of that observation waits until the observer fetched the
last block (or TRANSFER_IDLE_TIMEOUT passed without a block request). Every
request counts against its source IP's rate limit except block-wise
continuations of a transfer already admitted; every publish counts against its
client id.

aiocoap's `Site` only hands a `PathCapable` child the paths below its prefix, so
the root here is `CatchAllSite`, which gives every request to one handler, and
the UDP stack is assembled by `open_udp_context` on a socket bound here (aiocoap
would set SO_REUSEPORT, so a second gateway on the same port would start
silently and share the traffic).

The socket is read by this module's `_RecvmsgTransport`, not aiocoap's: with
IP_RECVERR on, an ICMP error (a client that went away) makes the socket poll
POLLERR, which uvloop took for a dead descriptor and stopped reading the
listener for good, silently. The socket sits in an epoll set of its own that
the loop watches, queued ICMP errors end only the exchanges of the address
they came back from, a send that fails on an error pending for another peer
is retried, and `serving()` turns False (the gateway is then not ready) when
the socket is no longer read.
"""

from __future__ import annotations

import asyncio
import collections
import errno
import hashlib
import hmac
import ipaddress
import itertools
import logging
import math
import os
import secrets
import select
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import aiocoap
from aiocoap import error as coap_error
from aiocoap.message import Direction
from aiocoap.messagemanager import MessageManager
from aiocoap.numbers import codes
from aiocoap.numbers.constants import Reliable, TransportTuning, Unreliable
from aiocoap.numbers.optionnumbers import OptionNumber
from aiocoap.numbers.types import ACK, CON, RST
from aiocoap.pipe import Pipe, error_to_message
from aiocoap.tokenmanager import TokenManager
from aiocoap.transports.udp6 import MessageInterfaceUDP6, SockExtendedErr, UDP6EndpointAddress
from aiocoap.util import socknumbers
from aiocoap.util.asyncio.recvmsg import RecvmsgSelectorDatagramTransport

from gateway.backpressure import NO_PUBLISHER, Publisher
from gateway.config_types import ListenerConfig
from gateway.context import FrontendContext
from gateway.errors import InvalidTopic
from gateway.events import NO_SECRET, Action, AuthEvent, Outcome, Protocol, Secret
from gateway.frontends.flow import publish_request
from gateway.frontends.peers import format_peer, password_refused
from gateway.metrics import Metrics
from gateway.queues import MemoryBudget, MessageQueue, QueueLimits, limits_for
from gateway.router import Message as RouterMessage
from gateway.topics import is_wildcard, topic_matches, validate_topic_filter, validate_topic_name

log = logging.getLogger("polygate.coap")

#: aiocoap's receive buffer: a datagram longer than this arrives truncated and is dropped.
MAX_DATAGRAM: int = RecvmsgSelectorDatagramTransport.max_size
#: A QoS 0 notification is sent confirmable when the last CON is this old (RFC 7641 4.5).
CON_CHECK_INTERVAL = 60.0
#: A block-wise transfer with no block request for this long is forgotten.
TRANSFER_IDLE_TIMEOUT = 10.0
#: Large responses and notifications being fetched block by block, per listener.
MAX_TRANSFERS = 1024
#: Block1 uploads in progress per listener (each holds up to limits.max_message_size).
MAX_UPLOADS = 256
#: The 5.03 diagnostic of an observation a connection limit refused (GatewayState.admit's reasons).
_OBSERVE_REFUSED: dict[str, str] = {
    "shutting_down": "the gateway is shutting down",
    "max_connections": "too many observations on this listener",
    "max_connections_per_ip": "too many observations from your address",
    "not_allowed": "your address is not allowed",
    "fd_reserve": "too many observations",
}
#: Upper bound of a Max-Age retry hint, in seconds.
MAX_RETRY_AFTER = 3600
#: Max-Age (seconds) of a 4.29 for an observation over limits.max_subscriptions_per_client: a
#: slot frees only when one of the client's own observations ends, so retrying at once is useless.
RETRY_SUBSCRIPTIONS = 60.0
#: Bad datagrams: the first one is logged, then every this many.
DROP_LOG_EVERY = 1000
#: Max-Age (seconds) of a 5.03 for a publish a full subscriber queue refused.
RETRY_FULL = 1.0
#: Largest regular block (1024 bytes); BERT (7) exists only on CoAP over TCP.
MAX_BLOCK_SZX = 6

_RELIABLE = Reliable()
_UNRELIABLE = Unreliable()
#: Critical options this frontend acts on; any other critical option is 4.02 (RFC 7252 5.4.1).
_UNDERSTOOD_CRITICAL = frozenset(
    {
        OptionNumber.URI_HOST,
        OptionNumber.URI_PORT,
        OptionNumber.URI_PATH,
        OptionNumber.URI_QUERY,
        OptionNumber.ACCEPT,
        OptionNumber.BLOCK1,
        OptionNumber.BLOCK2,
    }
)
#: Options that differ between the blocks of one transfer (RFC 7959 2.4).
_PER_BLOCK_OPTIONS = (OptionNumber.BLOCK1, OptionNumber.BLOCK2, OptionNumber.OBSERVE)
_PUBLISH_PREFIX = ("mqtt", "publish")
_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_QUERY_KEYS = frozenset({"username", "password", "authorization", "auth", "client_id", "qos", "retain"})

Handler = Callable[[Pipe], Awaitable[None]]
V = TypeVar("V")


# -- errors: each carries its code; `to_message` renders any of them ---------------------------


class CoAPError(Exception):
    """An answer other than success; `str(exc)` is the diagnostic payload."""

    code: codes.Code = codes.INTERNAL_SERVER_ERROR

    def __init__(self, message: str, *, max_age: float | None = None, size1: int | None = None) -> None:
        super().__init__(message)
        self.max_age = max_age
        self.size1 = size1

    def to_message(self) -> aiocoap.Message:
        response = aiocoap.Message(code=self.code, payload=str(self).encode("utf-8"))
        if self.max_age is not None:
            # A limiter may answer inf (never); Max-Age still needs a finite number.
            response.opt.max_age = max(1, math.ceil(min(self.max_age, MAX_RETRY_AFTER)))
        if self.size1 is not None:
            response.opt.size1 = self.size1
        return response


class BadRequest(CoAPError):
    code = codes.BAD_REQUEST


class Unauthorized(CoAPError):
    code = codes.UNAUTHORIZED


class BadOption(CoAPError):
    code = codes.BAD_OPTION


class Forbidden(CoAPError):
    code = codes.FORBIDDEN


class NotFound(CoAPError):
    code = codes.NOT_FOUND


class MethodNotAllowed(CoAPError):
    code = codes.METHOD_NOT_ALLOWED


class Incomplete(CoAPError):
    code = codes.REQUEST_ENTITY_INCOMPLETE


class TooLarge(CoAPError):
    code = codes.REQUEST_ENTITY_TOO_LARGE

    def __init__(self, message: str, *, limit: int) -> None:
        super().__init__(message, size1=limit)


class TooManyRequests(CoAPError):
    code = codes.TOO_MANY_REQUESTS

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, max_age=retry_after)


class ServiceUnavailable(CoAPError):
    code = codes.SERVICE_UNAVAILABLE

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message, max_age=retry_after)


# -- what a request says about itself ------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestQuery:
    """The query parameters this frontend reads; None where a parameter was not given."""

    username: str = ""
    secret: Secret = NO_SECRET
    client_id: str = ""
    qos: int | None = None
    retain: bool | None = None


def _parse_qos(value: str) -> int:
    if value in ("0", "1", "2"):
        return int(value)
    raise BadRequest(f"qos must be 0, 1 or 2, not {value!r}")


def _parse_retain(value: str) -> bool:
    lowered = value.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise BadRequest(f"retain must be true, false, 1 or 0, not {value!r}")


def parse_query(uri_query: Sequence[str]) -> RequestQuery:
    """Read `username`, `password`/`authorization`/`auth`, `client_id`, `qos`, `retain`.

    aiocoap hands over each Uri-Query option already percent-decoded. A secret
    is wrapped in `Secret` at once; a parameter given twice is refused rather
    than guessed at.
    """
    values: dict[str, str] = {}
    for item in uri_query:
        key, _, value = item.partition("=")
        if key not in _QUERY_KEYS:
            continue
        if key in values:
            raise BadRequest(f"query parameter {key!r} is given more than once")
        values[key] = value
    given = [k for k in ("password", "authorization", "auth") if k in values]
    if len(given) > 1:
        raise BadRequest("give one of password, authorization or auth, not several")
    secret = Secret(values.pop(given[0])) if given else NO_SECRET
    return RequestQuery(
        username=values.get("username", ""),
        secret=secret,
        client_id=values.get("client_id", ""),
        qos=_parse_qos(values["qos"]) if "qos" in values else None,
        retain=_parse_retain(values["retain"]) if "retain" in values else None,
    )


def publish_topic(uri_path: Sequence[str]) -> str:
    """The topic a POST publishes to: the path, or what follows `/mqtt/publish/`."""
    path = tuple(uri_path)
    if len(path) > len(_PUBLISH_PREFIX) and path[: len(_PUBLISH_PREFIX)] == _PUBLISH_PREFIX:
        path = path[len(_PUBLISH_PREFIX):]
    if not path:
        raise BadRequest("give a topic in the path: POST /<topic>")
    return "/".join(path)


def _check_options(request: aiocoap.Message) -> None:
    for option in request.opt.option_list():
        number = option.number
        if number.is_critical() and number not in _UNDERSTOOD_CRITICAL:
            raise BadOption(f"critical option {int(number)} is not supported here")


def _peer(remote: Any) -> tuple[str, str]:
    """(ip, "ip:port") of a UDP remote, IPv4-mapped addresses shown as IPv4."""
    sockaddr = getattr(remote, "sockaddr", None)
    if not sockaddr:
        hostinfo = str(getattr(remote, "hostinfo", ""))
        return hostinfo, hostinfo
    host, port = str(sockaddr[0]), int(sockaddr[1])
    try:
        address = ipaddress.IPv6Address(host.partition("%")[0])
    except ValueError:
        return host, format_peer(host, port)
    mapped = address.ipv4_mapped
    ip = str(mapped) if mapped is not None else host
    return ip, format_peer(ip, port)


def _block_szx(request: aiocoap.Message) -> int:
    """The block size exponent for answers to `request`: the smaller of its wish and the remote's."""
    szx = min(MAX_BLOCK_SZX, int(request.remote.maximum_block_size_exp))
    wish = request.opt.block2
    if wish is not None:
        szx = min(szx, int(wish.size_exponent))
    return szx


def block_of(payload: bytes, etag: bytes, number: int, szx: int) -> aiocoap.Message:
    """Block `number` (size 2**(szx+4)) of a 2.05 representation, with its ETag."""
    size = 1 << (szx + 4)
    start = number * size
    if start >= len(payload):
        raise BadRequest(f"block {number} is beyond the end of the representation ({len(payload)} bytes)")
    end = min(start + size, len(payload))
    response = aiocoap.Message(code=codes.CONTENT, payload=payload[start:end])
    response.opt.block2 = (number, end < len(payload), szx)
    response.opt.etag = etag
    if number == 0:
        response.opt.size2 = len(payload)
    return response


# -- the UDP stack ---------------------------------------------------------------------------------

#: Room for the control messages of one datagram (PKTINFO, or an extended error), as aiocoap reads them.
_ANCILLARY_SIZE = 1024
#: Datagrams (and queued ICMP errors) read per wakeup: a flooded listener still lets the loop run others.
READ_BATCH = 64
#: Tries to put one datagram on the wire; see `_RecvmsgTransport.sendmsg` for why more than one.
SEND_ATTEMPTS = 3
#: How often the watchdog looks for input on the socket that nobody reads, in seconds.
WATCHDOG_INTERVAL = 1.0
#: errnos of a socket that is gone: reading it again cannot succeed.
_DEAD_SOCKET = frozenset({errno.EBADF, errno.ENOTSOCK, errno.EINVAL})
#: A protocol callback for one datagram read: (data, ancdata, flags, address).
_Deliver = Callable[[bytes, list[tuple[int, int, bytes]], int, Any], None]
#: The control messages that carry an ICMP error read from the error queue.
_RECVERR_CMSGS = (
    frozenset({(socket.IPPROTO_IPV6, socknumbers.IPV6_RECVERR), (socket.IPPROTO_IP, socknumbers.IP_RECVERR)})
    if socknumbers.HAS_RECVERR else frozenset()
)


class _RecvmsgTransport(asyncio.BaseTransport):
    """Reads and writes the listener's UDP socket, in place of aiocoap's `RecvmsgSelectorDatagramTransport`.

    aiocoap's transport registers the socket itself with `loop.add_reader`. With
    IP_RECVERR on (how ICMP errors reach aiocoap at all), an ICMP error queued on
    the socket makes it poll POLLERR, and libuv takes POLLERR on a polled
    descriptor for a dead one: `uv__poll_io` stops the watcher and uvloop's
    `UVPoll._fatal_error` closes it. One port-unreachable from a client that
    went away ended reading on uvloop for good, with nothing logged. Here the
    socket sits in an epoll set of its own and the loop watches that set: an
    epoll descriptor polls readable when the socket has data or errors, and
    never POLLERR, so both loops keep calling the reader.

    Errors never end reading: queued ICMP errors go to the protocol as
    `datagram_errqueue_received` with the address they came back from, an
    exception of the protocol is logged, and only a socket that is itself gone
    (EBADF) stops the reader. A watchdog notices input that waits while the
    reader is not called (the reader was removed from the loop) and `serving()`
    says so.
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: _UDPInterface, *, name: str
    ) -> None:
        super().__init__(extra={"socket": sock, "sockname": sock.getsockname()})
        self._loop = loop
        self._sock: socket.socket | None = sock
        self._protocol = protocol
        #: The listener's address, for logs.
        self._name = name
        self._errqueue = socknumbers.HAS_RECVERR
        self._epoll: select.epoll | None = None
        #: The descriptor registered with the loop: the epoll set's, else the socket's.
        self.reader_fd = -1
        self._reading = False
        self._failure = ""
        self._stalled = False
        self._wakeups = 0
        #: (wakeups, input waiting) when the watchdog last looked.
        self._last_look = (0, False)
        self._watchdog: asyncio.TimerHandle | None = None
        self._probe = select.poll()

    def start(self) -> None:
        sock = self._sock
        assert sock is not None
        sock.setblocking(False)
        if self._errqueue:
            # IP_RECVERR exists on Linux only, and so does epoll; elsewhere no ICMP
            # error reaches an unconnected socket, so it never polls POLLERR.
            self._epoll = select.epoll()
            self._epoll.register(sock.fileno(), select.EPOLLIN)
            self.reader_fd = self._epoll.fileno()
        else:
            self.reader_fd = sock.fileno()
        self._probe.register(self.reader_fd, select.POLLIN)
        self._protocol.connection_made(self)
        try:
            self._loop.add_reader(self.reader_fd, self._read_ready)
        except BaseException:
            if self._epoll is not None:
                self._epoll.close()
            raise
        self._reading = True
        self._watchdog = self._loop.call_later(WATCHDOG_INTERVAL, self._watch)

    def serving(self) -> bool:
        """True while the socket is open and its reader runs."""
        return self._sock is not None and not self._failure and not self._stalled

    def is_closing(self) -> bool:
        return self._sock is None

    def close(self) -> None:
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        self._stop_reading()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._epoll is not None:
            self._epoll.close()
        sock.close()
        if not self._loop.is_closed():
            # aiocoap's shutdown() waits for this.
            self._loop.call_soon(self._protocol.connection_lost, None)

    def sendmsg(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, address: Any) -> OSError | None:
        """Send one datagram; the error of the last try when it could not be sent.

        An ICMP error for any earlier datagram leaves an error pending on the
        socket (IP_RECVERR sets it), and the next send fails with it, whatever
        its destination, without sending. aiocoap blamed that send's remote and
        ended its exchanges and observations (an innocent observer missed its
        notification); the error belongs to the error queue's address and is
        reported from there. The failed send consumed it, so the datagram goes
        again: a failure that persists is this destination's own.
        """
        sock = self._sock
        if sock is None:
            return OSError(errno.EBADF, "the CoAP socket is closed")
        error: OSError | None = None
        for _ in range(SEND_ATTEMPTS):
            try:
                sock.sendmsg((data,), ancdata, flags, address)
                return None
            except BlockingIOError as exc:
                # The send buffer is full: trying again at once would fail the same way.
                return exc
            except OSError as exc:
                error = exc
        return error

    def _stop_reading(self) -> None:
        if self._reading:
            self._reading = False
            if not self._loop.is_closed():
                self._loop.remove_reader(self.reader_fd)

    def _fail(self, reason: str) -> None:
        self._stop_reading()
        if not self._failure:
            self._failure = reason
            log.error(
                "the CoAP listener on %s stopped reading its socket (%s): its requests go unanswered",
                self._name, reason,
            )

    def _read_ready(self) -> None:
        self._wakeups += 1
        if self._stalled:
            self._stalled = False
            log.warning("the CoAP listener on %s reads its socket again", self._name)
        sock = self._sock
        if sock is None:
            return
        errors = self._errqueue
        if self._epoll is not None:
            # Ask the set what woke us: the error queue is read only when it has something.
            try:
                events = 0
                for _, mask in self._epoll.poll(0):
                    events |= mask
            except OSError as exc:
                self._fail(f"its epoll set failed: {exc}")
                return
            errors = bool(events & select.EPOLLERR)
        if errors:
            # First, so a pending error does not fail the reads below.
            self._read_queue(sock, socknumbers.MSG_ERRQUEUE, self._protocol.datagram_errqueue_received)
        if not self._failure:
            self._read_queue(sock, 0, self._protocol.datagram_msg_received)

    def _read_queue(self, sock: socket.socket, flags: int, deliver: _Deliver) -> None:
        for _ in range(READ_BATCH):
            try:
                data, ancdata, msg_flags, address = sock.recvmsg(MAX_DATAGRAM, _ANCILLARY_SIZE, flags)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in _DEAD_SOCKET:
                    self._fail(f"reading it failed: {exc}")
                    return
                # An ICMP error pending on the socket, which the error queue reports
                # with its address; no datagram was read, the next one can be.
                continue
            try:
                deliver(data, ancdata, msg_flags, address)
            except Exception:
                log.exception("the CoAP listener on %s could not handle a datagram from %s", self._name, address)

    def _watch(self) -> None:
        self._watchdog = self._loop.call_later(WATCHDOG_INTERVAL, self._watch)
        if not self._reading or self._stalled:
            return
        waiting = bool(self._probe.poll(0))
        wakeups, was_waiting = self._last_look
        self._last_look = (self._wakeups, waiting)
        # Input present at two looks with no read in between: the loop polled
        # I/O in between (a look is a timer, set after the one before ran), so
        # the reader is no longer registered with it.
        if waiting and was_waiting and wakeups == self._wakeups:
            self._stalled = True
            log.error(
                "the CoAP listener on %s stopped reading its socket (the loop no longer calls its reader): "
                "its requests go unanswered", self._name,
            )


class _UDPInterface(MessageInterfaceUDP6):
    """aiocoap's UDP message interface on a socket bound here, over `_RecvmsgTransport`.

    aiocoap's own would decode the first MAX_DATAGRAM bytes of a longer datagram
    as if they were the whole message (and publish a truncated payload), let a
    non-UTF-8 option escape as an exception, and log a warning per garbage
    datagram, which any peer could use to flood the log. A send that fails ends
    the destination's exchanges on a later loop turn, not inside the send: see
    `send`.
    """

    def __init__(
        self, manager: MessageManager, log: logging.Logger, loop: asyncio.AbstractEventLoop,
        *, on_bad_datagram: Callable[[str], None],
    ) -> None:
        super().__init__(manager, log=log, loop=loop)
        self._manager = manager
        self._on_bad_datagram = on_bad_datagram

    @classmethod
    def open(
        cls, manager: MessageManager, sock: socket.socket, *, log: logging.Logger,
        loop: asyncio.AbstractEventLoop, on_bad_datagram: Callable[[str], None], name: str,
    ) -> tuple[_UDPInterface, _RecvmsgTransport]:
        # The same socket options aiocoap's udp6 sets: the local address per
        # datagram (answers leave from the address asked), and ICMP errors.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        if socknumbers.HAS_RECVERR:
            sock.setsockopt(socket.IPPROTO_IPV6, socknumbers.IPV6_RECVERR, 1)
            sock.setsockopt(socket.IPPROTO_IP, socknumbers.IP_RECVERR, 1)
        interface = cls(manager, log, loop, on_bad_datagram=on_bad_datagram)
        transport = _RecvmsgTransport(loop, sock, interface, name=name)
        transport.start()
        return interface, transport

    def send(self, message: aiocoap.Message) -> None:
        ancdata = []
        if message.remote.pktinfo is not None:
            ancdata.append((socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, message.remote.pktinfo))
        error = self.transport.sendmsg(message.encode(), ancdata, 0, message.remote.sockaddr)
        if error is not None:
            # Not now: this runs inside the Pipe.add_response that sends the
            # message, ending the remote's exchanges ends that pipe, and
            # aiocoap's pipe raises TypeError when it ends inside its own event.
            self.loop.call_soon(self._dispatch_error, error, message.remote)

    def _dispatch_error(self, error: OSError, remote: UDP6EndpointAddress) -> None:
        if self._shutting_down is not None:
            # aiocoap's message layer warns about errors after its shutdown.
            return
        try:
            self._manager.dispatch_error(error, remote)
        except Exception:
            log.exception("ending the CoAP exchanges with %s after %s failed", _peer(remote)[1], error)

    def datagram_errqueue_received(
        self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, address: Any
    ) -> None:
        # aiocoap's asserts every control message is IPv6's, and an ICMPv4 error
        # on this dual-stack socket may carry IPv4 ones as well.
        errno_value: int | None = None
        pktinfo = None
        for level, kind, value in ancdata:
            if (level, kind) in _RECVERR_CMSGS:
                try:
                    errno_value = SockExtendedErr.load(value).ee_errno
                except struct.error:
                    continue
            elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                pktinfo = value
        if not errno_value or not address:
            return
        remote = UDP6EndpointAddress(address, self, pktinfo=pktinfo)
        self._dispatch_error(OSError(errno_value, f"{os.strerror(errno_value)} (ICMP error)"), remote)

    def datagram_msg_received(self, data: bytes, ancdata: list[tuple[int, int, bytes]], flags: int, address: Any) -> None:
        if flags & socket.MSG_TRUNC:
            self._on_bad_datagram("datagram_too_large")
            return
        pktinfo = None
        for level, kind, value in ancdata:
            if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
                pktinfo = value
        try:
            message = aiocoap.Message.decode(data, UDP6EndpointAddress(address, self, pktinfo=pktinfo))
        except (coap_error.UnparsableMessage, ValueError):
            self._on_bad_datagram("malformed_datagram")
            return
        message.direction = Direction.INCOMING
        try:
            self._manager.dispatch_message(message)
        except Exception:
            log.exception("processing a CoAP datagram from %s failed", _peer(message.remote)[1])


class _MessageLayer(MessageManager):
    """aiocoap's RFC 7252 message layer that also tells when a CON was answered (ACK or RST).

    aiocoap queues every CON to a busy peer in an unbounded backlog; waiting for
    the answer before the next notification keeps the queue ours, and bounded.
    """

    def __init__(self, token_manager: TokenManager) -> None:
        super().__init__(token_manager)
        self._answers: dict[tuple[Any, int], asyncio.Future[None]] = {}

    def answered(self, message: aiocoap.Message) -> asyncio.Future[None] | None:
        """A future resolved when `message`, already handed to this layer, is answered; None unless a CON."""
        if message.mtype is not CON or message.mid is None:
            return None
        future: asyncio.Future[None] = self.loop.create_future()
        self._answers[(message.remote, message.mid)] = future
        return future

    def forget(self, message: aiocoap.Message) -> None:
        if message.mid is not None:
            self._answers.pop((message.remote, message.mid), None)

    def dispatch_message(self, message: aiocoap.Message) -> None:
        try:
            super().dispatch_message(message)
        finally:
            # Even when aiocoap's handling raised: the answer came, and a waiting
            # observation would otherwise stall until its deadline.
            if (message.mtype is ACK or message.mtype is RST) and self._answers:
                future = self._answers.pop((message.remote, message.mid), None)
                if future is not None and not future.done():
                    future.set_result(None)


class CatchAllSite:
    """The root resource of a listener: every request, whatever its path, goes to one handler.

    aiocoap's Context asks its server site for one thing, `render_to_pipe`
    (the stable Pipe interface), so nothing of `Site` is needed; the handler
    sees the request's whole Uri-Path, including an empty one.
    """

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def render_to_pipe(self, pipe: Pipe) -> None:
        await self._handler(pipe)


class _Context(aiocoap.Context):
    """aiocoap's Context, rendering each request in a task that makes its coroutine only once it runs.

    aiocoap's `render_to_pipe` creates the site's coroutine first and then a
    task that would await it; when the request loses interest before that task
    ever ran, the task is cancelled unstarted and the coroutine is never awaited
    (a RuntimeWarning, and a coroutine left for the garbage collector). A request
    loses interest that early when a second request with the same token comes
    from the same peer in the same read: `_RecvmsgTransport` reads up to
    READ_BATCH datagrams per wakeup, so one peer repeating a token in a burst
    (the fuzz test does) is enough. Here nothing exists to leak until the task runs.
    """

    def render_to_pipe(self, pipe: Pipe) -> None:
        # As aiocoap's: the site answers on `pipe`, an exception becomes an answer through `errors`,
        # and once nobody is interested any more the task is cancelled.
        errors = error_to_message(pipe, self.log)

        async def render() -> None:
            try:
                await self._render_to_pipe(pipe)
            except Exception as exc:
                errors.add_exception(exc)
            # Cancellation means the peer lost interest: nothing to send, as in aiocoap's run_driving_pipe.

        task = asyncio.create_task(render(), name=f"Rendering for {pipe.request!r}")
        errors.on_interest_end(task.cancel)


@dataclass(frozen=True, slots=True, kw_only=True, eq=False)
class UDPContext:
    """An aiocoap server context on one UDP socket, with the layer that reports answers."""

    context: aiocoap.Context
    layer: _MessageLayer
    #: Reads and writes the socket; `serving()` tells whether it still reads.
    transport: _RecvmsgTransport
    #: (host, port) actually bound, IPv4-mapped addresses shown as IPv4.
    bound: tuple[str, int]


async def _bind_udp(host: str, port: int) -> socket.socket:
    """A dual-stack UDP socket ("" = every interface); no SO_REUSEPORT, so a busy port is an error."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(
        host.strip("[]") or None, port, family=socket.AF_INET6, type=socket.SOCK_DGRAM,
        flags=socket.AI_PASSIVE | socket.AI_V4MAPPED,
    )
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(infos[0][4])
    except BaseException:
        sock.close()
        raise
    return sock


async def open_udp_context(
    site: CatchAllSite, host: str, port: int, *, on_bad_datagram: Callable[[str], None]
) -> UDPContext:
    """aiocoap's token and message layers over `_UDPInterface`, serving `site` on host:port.

    The same assembly `aiocoap.Context.create_server_context` makes for its
    "udp6" transport, with the two layers of this module in place of aiocoap's.
    """
    loop = asyncio.get_running_loop()
    sock = await _bind_udp(host, port)
    try:
        context = _Context(loop=loop, serversite=site, loggername="polygate.coap.aiocoap")
        tokens = TokenManager(context)
        layer = _MessageLayer(tokens)
        bound_host, bound_port = sock.getsockname()[:2]
        mapped = ipaddress.IPv6Address(bound_host.partition("%")[0]).ipv4_mapped
        bound = (str(mapped) if mapped else bound_host, bound_port)
        interface, transport = _UDPInterface.open(
            layer, sock, log=context.log, loop=loop, on_bad_datagram=on_bad_datagram, name=format_peer(*bound),
        )
    except BaseException:
        sock.close()
        raise
    layer.message_interface = interface
    tokens.token_interface = layer
    context.request_interfaces.append(tokens)
    return UDPContext(context=context, layer=layer, transport=transport, bound=bound)


# -- block-wise transfers ---------------------------------------------------------------------------


class _IdleStore(Generic[V]):
    """Entries forgotten after `idle_timeout` without use; at most `capacity` of them."""

    def __init__(self, capacity: int, idle_timeout: float) -> None:
        self.capacity = capacity
        self.idle_timeout = idle_timeout
        self._entries: collections.OrderedDict[Any, tuple[float, V]] = collections.OrderedDict()

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    def sweep(self) -> list[V]:
        """Drop expired entries (the idlest are at the front); return them."""
        now = self._now()
        gone: list[V] = []
        entries = self._entries
        while entries:
            key, (touched, value) = next(iter(entries.items()))
            if now - touched < self.idle_timeout:
                break
            del entries[key]
            gone.append(value)
        return gone

    def has_room(self) -> bool:
        return len(self._entries) < self.capacity

    def get(self, key: Any) -> V | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._now()
        if now - entry[0] >= self.idle_timeout:
            del self._entries[key]
            return None
        self._entries[key] = (now, entry[1])
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: Any, value: V) -> list[V]:
        """Store `value`; return what it displaced (an entry under the same key, the idlest when full)."""
        gone = self.sweep()
        previous = self._entries.pop(key, None)
        if previous is not None:
            gone.append(previous[1])
        while len(self._entries) >= self.capacity:
            gone.append(self._entries.popitem(last=False)[1][1])
        self._entries[key] = (self._now(), value)
        return gone

    def pop(self, key: Any) -> V | None:
        entry = self._entries.pop(key, None)
        return entry[1] if entry is not None else None

    def values(self) -> list[V]:
        return [value for _, value in self._entries.values()]

    def keys(self) -> list[Any]:
        return list(self._entries)


class _Transfer:
    """A representation larger than one block, served by Block2 until its last block was asked for."""

    __slots__ = ("payload", "etag", "finished", "_progress")

    def __init__(self, payload: bytes, etag: bytes) -> None:
        self.payload = payload
        self.etag = etag
        self.finished = False
        self._progress: asyncio.Future[None] | None = None

    def progress(self) -> asyncio.Future[None]:
        """Resolved at the next block request (or when the transfer ends)."""
        if self._progress is None or self._progress.done():
            self._progress = asyncio.get_running_loop().create_future()
        return self._progress

    def _wake(self) -> None:
        if self._progress is not None and not self._progress.done():
            self._progress.set_result(None)

    def served(self, last: bool) -> None:
        if last:
            self.finished = True
        self._wake()

    def finish(self) -> None:
        self.finished = True
        self._wake()


# -- the publisher side of one POST ------------------------------------------------------------------


# -- one observation ---------------------------------------------------------------------------------


def _is_qos0(meta: int) -> bool:
    """A queued notification of delivery QoS 0 (drop_oldest drops such an entry first)."""
    return meta == 0


class Observation:
    """One Observe registration: a router subscriber and a GatewayState connection.

    `deliver` only puts into the observation's bounded `MessageQueue` (whose
    policy decides what a full one does; the meta int of an entry is its
    delivery QoS); the request's own task (the one aiocoap runs for the
    Observe request) sends, one notification in flight.
    """

    __slots__ = (
        "client_id", "topic_filter", "close_reason", "_queue", "_entries", "_wakeup",
        "_closed", "_metrics", "_frontend", "_waiter", "_number", "_last_con",
    )

    def __init__(
        self, frontend: CoAPFrontend, *, client_id: str, topic_filter: str, limits: QueueLimits,
        budget: MemoryBudget, metrics: Metrics,
    ) -> None:
        self.client_id = client_id
        self.topic_filter = topic_filter
        self.close_reason = ""
        self._queue = MessageQueue(
            name=f"{client_id} {topic_filter}", protocol=Protocol.COAP, limits=limits, budget=budget,
            metrics=metrics, qos0_meta=_is_qos0,
        )
        self._entries = self._queue.entries
        self._wakeup = asyncio.Event()
        self._closed = False
        self._metrics = metrics
        self._frontend = frontend
        self._waiter: asyncio.Future[None] | None = None
        self._number = 0
        self._last_con = -math.inf

    def deliver(self, message: RouterMessage, qos: int, retain: bool, publisher: Publisher) -> int:
        if self._closed:
            # Between close() and unsubscribe_all: counted, not worth a warning.
            self._metrics.dropped(Protocol.COAP, "observation_closed")
            return 0
        status = self._queue.put(message, qos, publisher)
        self._wakeup.set()
        return status

    def drained(self) -> bool:
        """Nothing waits to be notified (the gateway's shutdown polls this)."""
        return not self._queue

    def close(self, reason: str) -> None:
        if not self._closed:
            self._closed = True
            self.close_reason = reason
            self._wakeup.set()
            if self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)

    @property
    def closed(self) -> bool:
        return self._closed

    def discard_queue(self) -> None:
        """The observation ended: what it still holds is lost (counted), and publishers it held go on."""
        lost = self._queue.clear()
        if lost:
            self._metrics.dropped(Protocol.COAP, "observation_closed", lost)

    async def run(self, pipe: Pipe, szx: int, block_key: Any) -> None:
        """Register (an empty 2.05, Observe 0), then notify until closed or the observer is gone."""
        first = aiocoap.Message(code=codes.CONTENT)
        first.opt.observe = 0
        pipe.add_response(first, is_last=False)
        queue = self._queue
        entries = self._entries
        while True:
            if self._closed:
                final = ServiceUnavailable(f"observation ended: {self.close_reason}").to_message()
                final.transport_tuning = _UNRELIABLE
                pipe.add_response(final, is_last=True)
                return
            if not entries:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            message, qos, _ = queue.popleft()
            if not await self._notify(pipe, message, qos, szx, block_key):
                final = ServiceUnavailable("observation ended: notifications were not acknowledged").to_message()
                final.transport_tuning = _UNRELIABLE
                pipe.add_response(final, is_last=True)
                return

    async def _notify(self, pipe: Pipe, message: RouterMessage, qos: int, szx: int, block_key: Any) -> bool:
        """Send one notification; False when a CON went unanswered past aiocoap's window."""
        frontend = self._frontend
        loop = asyncio.get_running_loop()
        now = loop.time()
        reliable = qos >= 1 or now - self._last_con >= CON_CHECK_INTERVAL
        transfer: _Transfer | None = None
        if len(message.payload) > 1 << (szx + 4):
            transfer = frontend.start_transfer(block_key, message.payload)
            notification = block_of(transfer.payload, transfer.etag, 0, szx)
        else:
            notification = aiocoap.Message(code=codes.CONTENT, payload=message.payload)
        notification.transport_tuning = frontend.reliable_tuning if reliable else _UNRELIABLE
        self._number = (self._number + 1) & 0xFFFFFF
        notification.opt.observe = self._number
        notification.opt.location_path = message.topic.split("/")
        pipe.add_response(notification, is_last=False)
        self._metrics.messages_out[Protocol.COAP] += 1
        if reliable:
            self._last_con = now
            answered = frontend.layer.answered(notification)
            if answered is not None:
                try:
                    if not await self._wait(answered, frontend.ack_deadline):
                        return False
                finally:
                    frontend.layer.forget(notification)
        while transfer is not None and not transfer.finished and not self._closed:
            if not await self._wait(transfer.progress(), TRANSFER_IDLE_TIMEOUT):
                frontend.end_transfer(block_key, transfer)
        return True

    async def _wait(self, future: asyncio.Future[None], timeout: float) -> bool:
        """Wait for `future` (close() resolves it too); False on timeout."""
        self._waiter = future
        try:
            async with asyncio.timeout(timeout):
                await future
            return True
        except TimeoutError:
            return False
        finally:
            self._waiter = None


# -- the frontend -----------------------------------------------------------------------------------


class CoAPFrontend:
    def __init__(
        self, ctx: FrontendContext, listener: ListenerConfig, *, reliable_tuning: TransportTuning | None = None
    ) -> None:
        """`reliable_tuning`: retransmission timing of CON notifications (tests shorten it)."""
        self._ctx = ctx
        self._listener = listener
        limits = ctx.config.limits
        self._max_message = limits.max_message_size
        self._max_topic = limits.max_topic_length
        #: Bound and overflow policy of each observation's queue.
        self._observer_limits = limits_for(limits, Protocol.COAP)
        self.reliable_tuning = reliable_tuning or _RELIABLE
        # aiocoap gives up on a CON after MAX_TRANSMIT_WAIT and ends the observation itself; this is a backstop.
        self.ack_deadline = float(self.reliable_tuning.MAX_TRANSMIT_WAIT) + 1.0
        self._udp: UDPContext | None = None
        self._accepting = False
        self._observations: set[Observation] = set()
        self._max_subscriptions = limits.max_subscriptions_per_client
        #: Open observations of each client id, across CoAP listeners (limits.max_subscriptions_per_client).
        self._subscriptions: dict[str, int] = ctx.state.shared("coap.subscriptions", dict)
        self._transfers: _IdleStore[_Transfer] = _IdleStore(MAX_TRANSFERS, TRANSFER_IDLE_TIMEOUT)
        self._uploads: _IdleStore[bytearray] = _IdleStore(MAX_UPLOADS, TRANSFER_IDLE_TIMEOUT)
        # Block-wise keys carry an HMAC of the request's options, which hold credentials.
        self._key_secret = secrets.token_bytes(32)
        self._etags = itertools.count(1)
        self._bad_datagrams = 0

    async def start(self) -> None:
        listener = self._listener
        self._ctx.state.set_limit(listener.name, listener.max_connections, listener.allowed_cidrs)
        self._udp = await open_udp_context(
            CatchAllSite(self._render), listener.host, listener.port, on_bad_datagram=self._bad_datagram
        )
        self._accepting = True

    @property
    def bound(self) -> tuple[str, int]:
        if self._udp is None:
            raise RuntimeError(f"{self._listener.name} is not started")
        return self._udp.bound

    @property
    def layer(self) -> _MessageLayer:
        assert self._udp is not None
        return self._udp.layer

    def serving(self) -> bool:
        """False when this listener's socket is no longer read (its reader failed or left the loop).

        A reader that left the loop is noticed once input waited unread for
        one to two WATCHDOG_INTERVALs; the transport logs the ERROR then. A
        listener not started, or closed, is not serving either.
        """
        udp = self._udp
        return udp is not None and udp.transport.serving()

    async def stop_accepting(self) -> None:
        # UDP has nothing to stop listening on: new requests are answered 5.03 from now on.
        self._accepting = False

    async def aclose(self) -> None:
        self._accepting = False
        for observation in list(self._observations):
            observation.close("gateway shutting down")
        if self._observations:
            # One loop turn lets each observation put its final 5.03 on the wire.
            await asyncio.sleep(0)
        udp, self._udp = self._udp, None
        if udp is not None:
            await udp.context.shutdown()
        for transfer in self._transfers.values():
            transfer.finish()

    def _bad_datagram(self, reason: str) -> None:
        self._ctx.metrics.dropped(Protocol.COAP, reason)
        self._bad_datagrams += 1
        count = self._bad_datagrams
        if count == 1 or count % DROP_LOG_EVERY == 0:
            log.warning(
                "dropped a CoAP datagram on %s (%s; at most %d bytes are read per datagram): %d so far",
                self._listener.name, reason, MAX_DATAGRAM, count,
            )

    # -- the one error boundary ------------------------------------------------------------------

    async def _render(self, pipe: Pipe) -> None:
        request = pipe.request
        try:
            await self._handle(pipe, request)
        except CoAPError as exc:
            pipe.add_response(exc.to_message(), is_last=True)
        except Exception:
            log.exception("CoAP %s from %s failed", request.code, _peer(request.remote)[1])
            pipe.add_response(aiocoap.Message(code=codes.INTERNAL_SERVER_ERROR, payload=b"internal server error"), is_last=True)

    async def _handle(self, pipe: Pipe, request: aiocoap.Message) -> None:
        if not self._accepting:
            raise ServiceUnavailable("the gateway is shutting down")
        _check_options(request)
        ip, peer = _peer(request.remote)
        if not self._ctx.state.allows(self._listener.name, ip):
            self._ctx.metrics.connection_refused(Protocol.COAP, "not_allowed", self._listener.name)
            self._ctx.state.note_refused(self._listener.name, "not_allowed", peer)
            raise Forbidden("your address is not allowed")
        method = request.code
        block1, block2 = request.opt.block1, request.opt.block2
        if method == codes.GET and block2 is not None and block2.block_number > 0:
            # A continuation of a transfer admitted (and authorized) at its first block.
            pipe.add_response(self._next_block(request), is_last=True)
            return
        continuation = method == codes.POST and block1 is not None and block1.block_number > 0
        if not continuation:
            wait = self._ctx.ratelimits.check_connection(ip)
            if wait > 0:
                raise TooManyRequests("too many requests from your address", retry_after=wait)
        if method == codes.POST:
            pipe.add_response(await self._post(request, peer), is_last=True)
        elif method == codes.GET:
            await self._get(pipe, request, peer)
        else:
            raise MethodNotAllowed("use POST /<topic> to publish and GET /<filter> with Observe to subscribe")

    def _client(self, query: RequestQuery, peer: str) -> AuthEvent:
        return AuthEvent(
            protocol=Protocol.COAP,
            action=Action.CONNECT,
            client_id=query.client_id or f"coap:{peer}",
            username=query.username,
            secret=query.secret,
            peer=peer,
        )

    async def _authorize(self, client: AuthEvent, action: Action, topic: str) -> tuple[str, ...]:
        """Raise the error a refusal maps to; else the decision's exclusions (for a subscribe)."""
        dispatcher = self._ctx.dispatcher
        if not dispatcher.requires_auth(Protocol.COAP):
            return ()
        if password_refused(self._ctx.config.auth, self._listener, client.secret) is not None:
            raise Unauthorized("passwords are refused on this plaintext listener")
        decision = await dispatcher.decide_stateless(client.for_operation(action, topic))
        if decision.outcome is Outcome.ALLOW:
            return decision.exclusions
        if decision.outcome is Outcome.UNAVAILABLE:
            raise ServiceUnavailable("auth service unavailable, try again later")
        if decision.identity is None:
            raise Unauthorized("bad credentials")
        raise Forbidden(f"not authorized to {action.value} {topic!r}")

    def _block_key(self, request: aiocoap.Message) -> tuple[Any, bytes]:
        """Equal for every block of one transfer: the peer and the options other than Block1/2 and Observe."""
        options = repr(request.get_cache_key(_PER_BLOCK_OPTIONS)).encode("utf-8", "surrogateescape")
        return request.remote.blockwise_key, hmac.new(self._key_secret, options, hashlib.sha256).digest()

    # -- publish ----------------------------------------------------------------------------------

    async def _post(self, request: aiocoap.Message, peer: str) -> aiocoap.Message:
        topic = publish_topic(request.opt.uri_path)
        try:
            validate_topic_name(topic, self._max_topic)
        except InvalidTopic as exc:
            raise BadRequest(str(exc)) from None
        query = parse_query(request.opt.uri_query)
        client = self._client(query, peer)
        limit = self._max_message
        block1 = request.opt.block1
        payload = request.payload
        if block1 is None:
            if len(payload) > limit:
                raise TooLarge(f"message of {len(payload)} bytes is larger than the limit of {limit} bytes", limit=limit)
            await self._authorize(client, Action.PUBLISH, topic)
        else:
            assembled = await self._assemble(request, client, topic, block1)
            if assembled is None:
                response = aiocoap.Message(code=codes.CONTINUE)
                response.opt.block1 = (block1.block_number, True, block1.size_exponent)
                return response
            payload = assembled
        # After authorization, so nobody can spend another client's budget by naming its id.
        wait = self._ctx.ratelimits.check_message(client.client_id)
        if wait > 0:
            raise TooManyRequests("too many messages from this client", retry_after=wait)
        await self._publish(client, RouterMessage(topic, payload, query.qos or 0, bool(query.retain)))
        response = aiocoap.Message(code=codes.CHANGED)
        if block1 is not None:
            response.opt.block1 = (block1.block_number, False, block1.size_exponent)
        return response

    async def _publish(self, client: AuthEvent, message: RouterMessage) -> None:
        """Route the message; return once every queue took it (and the store committed what it wrote)."""
        ctx = self._ctx
        # Checked again here: the gateway may have begun stopping while auth or an upload was awaited.
        if not self._accepting or ctx.state.shutting_down:
            raise ServiceUnavailable("the gateway is shutting down")
        if not await publish_request(ctx, message, Protocol.COAP, repr(client.client_id)):
            raise ServiceUnavailable(
                "a subscriber queue is full and refused the message: publish again later", retry_after=RETRY_FULL)

    async def _assemble(self, request: aiocoap.Message, client: AuthEvent, topic: str, block1: Any) -> bytes | None:
        """Add one Block1 block; the whole payload after the last one, None while more are due."""
        limit = self._max_message
        if block1.size_exponent > MAX_BLOCK_SZX:
            raise BadRequest("BERT blocks (size exponent 7) exist only on CoAP over TCP")
        payload = request.payload
        if block1.more and len(payload) != block1.size:
            raise BadRequest(f"block {block1.block_number} carries {len(payload)} bytes, not its size {block1.size}")
        ip = _peer(request.remote)[0]
        key = (ip, self._block_key(request))
        if block1.block_number == 0:
            declared = request.opt.size1
            if (declared is not None and declared > limit) or len(payload) > limit:
                size = declared if declared is not None and declared > limit else len(payload)
                raise TooLarge(f"message of {size} bytes is larger than the limit of {limit} bytes", limit=limit)
            await self._authorize(client, Action.PUBLISH, topic)
            if not block1.more:
                return payload
            self._uploads.sweep()
            if not self._uploads.has_room() and self._uploads.get(key) is None:
                raise ServiceUnavailable("too many block-wise uploads in progress, try again later")
            per_ip = self._ctx.config.limits.coap_uploads_per_ip
            # One source must not hold every slot (everyone else would get 5.03).
            if per_ip and self._uploads.get(key) is None and sum(k[0] == ip for k in self._uploads.keys()) >= per_ip:
                self._ctx.metrics.connection_refused(Protocol.COAP, "uploads_per_ip", self._listener.name)
                self._ctx.state.note_refused(self._listener.name, "uploads_per_ip", _peer(request.remote)[1])
                raise ServiceUnavailable("too many block-wise uploads from your address in progress, try again later")
            self._uploads.put(key, bytearray(payload))
            return None
        data = self._uploads.get(key)
        if data is None:
            raise Incomplete("no block-wise upload in progress for this request: start again at block 0")
        if block1.start != len(data):
            self._uploads.pop(key)
            raise Incomplete(f"block {block1.block_number} is out of order: start again at block 0")
        if len(data) + len(payload) > limit:
            self._uploads.pop(key)
            raise TooLarge(f"message is larger than the limit of {limit} bytes", limit=limit)
        data += payload
        if block1.more:
            return None
        self._uploads.pop(key)
        return bytes(data)

    # -- read and observe -------------------------------------------------------------------------

    async def _get(self, pipe: Pipe, request: aiocoap.Message, peer: str) -> None:
        path = request.opt.uri_path
        if not path:
            raise BadRequest("give a topic filter in the path: GET /<filter> with Observe")
        topic_filter = "/".join(path)
        try:
            validate_topic_filter(topic_filter, self._max_topic)
        except InvalidTopic as exc:
            raise BadRequest(str(exc)) from None
        query = parse_query(request.opt.uri_query)
        client = self._client(query, peer)
        if request.opt.observe == 0:
            exclusions = await self._authorize(client, Action.SUBSCRIBE, topic_filter)
            qos = 1 if query.qos is None else query.qos
            await self._observe(pipe, request, client, topic_filter, qos, exclusions)
            return
        if is_wildcard(topic_filter):
            raise BadRequest(
                "a GET without Observe reads the retained message of one topic: observe (Observe: 0) to use a filter"
            )
        exclusions = await self._authorize(client, Action.SUBSCRIBE, topic_filter)
        if any(topic_matches(excluded, topic_filter) for excluded in exclusions):
            raise Forbidden(f"not authorized to {Action.SUBSCRIBE.value} {topic_filter!r}")
        retained = self._ctx.router.retained(topic_filter)
        if not retained:
            raise NotFound(f"no retained message on {topic_filter!r}")
        payload = retained[0].payload
        szx = _block_szx(request)
        if len(payload) > 1 << (szx + 4):
            transfer = self.start_transfer(self._block_key(request), payload)
            response = block_of(transfer.payload, transfer.etag, 0, szx)
        else:
            response = aiocoap.Message(code=codes.CONTENT, payload=payload)
        response.opt.location_path = topic_filter.split("/")
        self._ctx.metrics.messages_out[Protocol.COAP] += 1
        pipe.add_response(response, is_last=True)

    async def _observe(
        self, pipe: Pipe, request: aiocoap.Message, client: AuthEvent, topic_filter: str, qos: int,
        exclusions: tuple[str, ...],
    ) -> None:
        ctx = self._ctx
        client_id = client.client_id
        listener = self._listener.name
        ip, peer = _peer(request.remote)
        held = self._subscriptions.get(client_id, 0)
        cap = self._max_subscriptions
        # Checked after authorization (the caller's), so nobody can use up another client's
        # subscriptions by naming its id; one observation is one subscription.
        if cap and held >= cap:
            ctx.state.note_refused(listener, "max_subscriptions_per_client", peer)
            raise TooManyRequests(
                f"this client holds {cap} observations (limits.max_subscriptions_per_client): deregister one first",
                retry_after=RETRY_SUBSCRIPTIONS,
            )
        observation = Observation(
            self, client_id=client_id, topic_filter=topic_filter, limits=self._observer_limits,
            budget=ctx.router.budget, metrics=ctx.metrics,
        )
        # An observation is CoAP's connection: the same limits, max_connections_per_ip among them.
        refused = ctx.state.admit(listener, observation, ip, peer)
        if refused is not None:
            ctx.metrics.connection_refused(Protocol.COAP, refused, listener)
            raise ServiceUnavailable(_OBSERVE_REFUSED.get(refused, "too many observations"))
        ctx.metrics.connection_opened(Protocol.COAP)
        self._observations.add(observation)
        self._subscriptions[client_id] = held + 1
        block_key = self._block_key(request)
        try:
            # Subscribed before the first response goes out: nothing published after it is missed.
            for message in ctx.router.subscribe(observation, topic_filter, qos, exclusions):
                observation.deliver(message, min(message.qos, qos), True, NO_PUBLISHER)
            await observation.run(pipe, _block_szx(request), block_key)
        finally:
            # Also when aiocoap cancels this task: a deregistration, a RST, an
            # unacknowledged CON, an ICMP error or the context shutting down.
            observation.close("observation ended")
            observation.discard_queue()
            ctx.router.unsubscribe_all(observation)
            ctx.state.unregister(listener, observation)
            self._observations.discard(observation)
            left = self._subscriptions[client_id] - 1
            if left:
                self._subscriptions[client_id] = left
            else:
                del self._subscriptions[client_id]
            ctx.metrics.connection_closed(Protocol.COAP)
            transfer = self._transfers.get(block_key)
            if transfer is not None:
                self.end_transfer(block_key, transfer)

    # -- Block2 -----------------------------------------------------------------------------------

    def start_transfer(self, key: Any, payload: bytes) -> _Transfer:
        transfer = _Transfer(payload, next(self._etags).to_bytes(8, "big"))
        for displaced in self._transfers.put(key, transfer):
            displaced.finish()
        return transfer

    def end_transfer(self, key: Any, transfer: _Transfer) -> None:
        if self._transfers.get(key) is transfer:
            self._transfers.pop(key)
        transfer.finish()

    def _next_block(self, request: aiocoap.Message) -> aiocoap.Message:
        key = self._block_key(request)
        transfer = self._transfers.get(key)
        if transfer is None:
            raise Incomplete("no block-wise transfer in progress for this request: ask for block 0 again")
        block2 = request.opt.block2
        if block2.size_exponent > MAX_BLOCK_SZX:
            raise BadRequest("BERT blocks (size exponent 7) exist only on CoAP over TCP")
        response = block_of(transfer.payload, transfer.etag, block2.block_number, block2.size_exponent)
        last = not response.opt.block2.more
        if last:
            self._transfers.pop(key)
        transfer.served(last)
        return response

