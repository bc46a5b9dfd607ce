"""What the gateway knows about its live connections and background tasks.

Every frontend registers a connection when it is accepted and leaves when it
closes; shutdown then runs in one fixed order for all of them.

`admit` is where every connection limit is decided, the same way for every
protocol: allowed source networks (per listener and global), the listener's
`max_connections`, `limits.max_connections_per_ip` across all listeners, and a
total kept below the file-descriptor limit so that the health listener and
the gateway itself always have descriptors left. What it refuses is logged
once per interval with a count (`RefusalLog`), never once per connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol as TypingProtocol, TypeVar

from prometheus_client.core import CounterMetricFamily, Metric

from gateway.config_types import IPNetwork, LimitsConfig
from gateway.ratelimit import connection_key

log = logging.getLogger("polygate.state")

T = TypeVar("T")


class Connection(TypingProtocol):
    def close(self, reason: str) -> None:
        """Begin closing: tell the peer when the protocol allows, then drop the transport."""


#: Refusals of one kind are logged at most once per this many seconds, with their count.
REFUSAL_LOG_INTERVAL = 10.0

#: Why `admit` refused a connection (the `reason` label of polygate_connections_refused).
SHUTTING_DOWN = "shutting_down"
NOT_ALLOWED = "not_allowed"
MAX_CONNECTIONS = "max_connections"
MAX_CONNECTIONS_PER_IP = "max_connections_per_ip"
FD_RESERVE = "fd_reserve"

_WHY = {
    SHUTTING_DOWN: "the gateway is stopping",
    NOT_ALLOWED: "source address not in allowed_cidrs",
    MAX_CONNECTIONS: "the listener's max_connections reached",
    MAX_CONNECTIONS_PER_IP: "limits.max_connections_per_ip reached",
    FD_RESERVE: "file descriptors left are kept for the health listener (limits.fd_reserve)",
    "rate_limited": "ratelimit.connection exceeded",
    "uploads_per_ip": "limits.coap_uploads_per_ip block-wise uploads in progress",
    "max_subscriptions_per_client": "limits.max_subscriptions_per_client reached",
}
#: What was refused, when it is not a connection.
_WHAT = {"uploads_per_ip": "block-wise upload", "max_subscriptions_per_client": "subscription"}


def ip_key(ip: str) -> str:
    """What one source counts as: the IP itself, its IPv4 address when IPv4-mapped, or its IPv6 /64.

    The same key as the connection rate limit's, so both limits see one source alike.
    """
    return connection_key(ip)


def allowed(ip: str, networks: Sequence[IPNetwork]) -> bool:
    """True when `networks` is empty or holds `ip`; an address that does not parse is refused (fail closed)."""
    if not networks:
        return True
    try:
        address = ipaddress.ip_address(ip.partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address in network for network in networks)


class RefusalLog:
    """One WARNING per (listener, reason) and interval, with how many were refused and the last peer.

    The first refusal after a quiet interval is logged at once; the rest are
    counted and summed up when the interval ends, so a flood costs one line
    per interval, never one per connection.
    """

    def __init__(self, interval: float = REFUSAL_LOG_INTERVAL) -> None:
        self.interval = interval
        #: (listener, reason) -> [refused since the last line, last peer]; present while an interval runs.
        self._pending: dict[tuple[str, str], list[Any]] = {}

    def refused(self, listener: str, reason: str, peer: str) -> None:
        key = (listener, reason)
        pending = self._pending.get(key)
        if pending is not None:
            pending[0] += 1
            pending[1] = peer
            return
        self._emit(listener, reason, 1, peer, first=True)
        self._pending[key] = [0, peer]
        try:
            asyncio.get_running_loop().call_later(self.interval, self._flush, key)
        except RuntimeError:  # no loop (a unit test on plain values): log every refusal
            del self._pending[key]

    def _flush(self, key: tuple[str, str]) -> None:
        count, peer = self._pending.pop(key)
        if count:
            self._emit(key[0], key[1], count, peer, first=False)
            # Still refusing: keep summing up instead of logging the next one at once.
            self._pending[key] = [0, peer]
            asyncio.get_running_loop().call_later(self.interval, self._flush, key)

    def _emit(self, listener: str, reason: str, count: int, peer: str, *, first: bool) -> None:
        why = _WHY.get(reason, reason)
        what = _WHAT.get(reason, "connection")
        if first:
            log.warning("%s refused a %s from %s: %s (more are counted and logged every %gs)",
                        listener, what, peer, why, self.interval,
                        extra={"event": "connection_refused", "listener": listener, "reason": reason,
                               "peer": peer, "count": 1})
        else:
            log.warning("%s refused %d more %s(s) in the last %gs, the last from %s: %s",
                        listener, count, what, self.interval, peer, why,
                        extra={"event": "connection_refused", "listener": listener, "reason": reason,
                               "peer": peer, "count": count})


class GatewayState:
    def __init__(self, limits: LimitsConfig | None = None) -> None:
        self._connections: dict[str, set[Connection]] = {}
        self._limits: dict[str, int] = {}
        self._allowed: dict[str, tuple[IPNetwork, ...]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._shared: dict[str, Any] = {}
        self.shutting_down = False
        limits = limits or LimitsConfig()
        self._per_ip_cap = limits.max_connections_per_ip
        self._global_allowed = limits.allowed_cidrs
        #: Client connections of all listeners together (0 = no cap): descriptors minus the reserve.
        self.max_total = 0
        self._total = 0
        self._per_ip: dict[str, int] = {}
        #: The `ip_key` each admitted connection counts against.
        self._ip_of: dict[Connection, str] = {}
        self.refusals = RefusalLog()
        #: Refusals of what is not a connection (a subscription, an upload), by (listener, reason):
        #: connections are counted by the frontends in polygate_connections_refused.
        self.limit_refusals: dict[tuple[str, str], int] = {}

    def shared(self, key: str, factory: Callable[[], T]) -> T:
        """One object per gateway shared by listeners of one protocol (e.g. MQTT sessions)."""
        try:
            return self._shared[key]  # type: ignore[no-any-return]
        except KeyError:
            value = self._shared[key] = factory()
            return value

    def set_limit(self, listener: str, max_connections: int, allowed_cidrs: tuple[IPNetwork, ...] = ()) -> None:
        self._limits[listener] = max_connections
        self._allowed[listener] = allowed_cidrs

    def register(self, listener: str, connection: Connection) -> bool:
        """Add a connection; False when the gateway is stopping or the listener is full."""
        if self.shutting_down:
            return False
        conns = self._connections.setdefault(listener, set())
        cap = self._limits.get(listener, 0)
        if cap and len(conns) >= cap:
            return False
        conns.add(connection)
        return True

    def allows(self, listener: str, ip: str) -> bool:
        """`ip` is inside the listener's and the gateway's allowed_cidrs (requests of HTTP and CoAP)."""
        return allowed(ip, self._allowed.get(listener, ())) and allowed(ip, self._global_allowed)

    def refusal(self, listener: str, ip: str) -> str | None:
        """Why a connection from `ip` to `listener` would be refused now, or None."""
        if self.shutting_down:
            return SHUTTING_DOWN
        if not self.allows(listener, ip):
            return NOT_ALLOWED
        cap = self._limits.get(listener, 0)
        if cap and len(self._connections.get(listener, ())) >= cap:
            return MAX_CONNECTIONS
        if self._per_ip_cap and self._per_ip.get(ip_key(ip), 0) >= self._per_ip_cap:
            return MAX_CONNECTIONS_PER_IP
        if self.max_total and self._total >= self.max_total:
            return FD_RESERVE
        return None

    def admit(self, listener: str, connection: Connection, ip: str, peer: str) -> str | None:
        """Add a connection from `ip` unless a limit refuses it: None, or the reason (logged once per interval).

        The caller closes a refused connection at once and counts it; its descriptor is then free again.
        """
        reason = self.refusal(listener, ip)
        if reason is not None:
            self.refusals.refused(listener, reason, peer or ip or "an unknown peer")
            return reason
        self._connections.setdefault(listener, set()).add(connection)
        key = ip_key(ip)
        self._ip_of[connection] = key
        self._per_ip[key] = self._per_ip.get(key, 0) + 1
        self._total += 1
        return None

    def note_refused(self, listener: str, reason: str, peer: str) -> None:
        """A refusal decided elsewhere (a rate limit, a subscription cap): logged like those of `admit`."""
        if reason in _WHAT:
            key = (listener, reason)
            self.limit_refusals[key] = self.limit_refusals.get(key, 0) + 1
        self.refusals.refused(listener, reason, peer)

    def collect_metrics(self) -> Iterable[Metric]:
        """polygate_limit_refusals: what a limit refused that is not a connection."""
        family = CounterMetricFamily(
            "polygate_limit_refusals", "Subscriptions and uploads a limit refused (connections: polygate_connections_refused)",
            labels=["listener", "what", "reason"],
        )
        for (listener, reason), count in sorted(self.limit_refusals.items()):
            family.add_metric([listener, _WHAT[reason], reason], count)
        yield family

    def unregister(self, listener: str, connection: Connection) -> None:
        conns = self._connections.get(listener)
        if conns is not None:
            conns.discard(connection)
        key = self._ip_of.pop(connection, None)
        if key is not None:
            self._total -= 1
            left = self._per_ip[key] - 1
            if left:
                self._per_ip[key] = left
            else:
                del self._per_ip[key]

    def connections_from(self, ip: str) -> int:
        """Connections admitted from the source of `ip` (its `ip_key`), all listeners."""
        return self._per_ip.get(ip_key(ip), 0)

    def count(self, listener: str | None = None) -> int:
        if listener is not None:
            return len(self._connections.get(listener, ()))
        return sum(len(c) for c in self._connections.values())

    def connections(self) -> list[Connection]:
        return [c for conns in self._connections.values() for c in conns]

    def spawn(self, coro: Coroutine[Any, Any, Any], *, name: str) -> asyncio.Task[Any]:
        """A tracked background task: logged if it fails, cancelled at shutdown."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task %s failed", task.get_name(), exc_info=task.exception())

    def drain(self) -> None:
        """The gateway stops: every connection stops taking publishes (acknowledgements still flow)."""
        for conn in self.connections():
            drain = getattr(conn, "drain", None)
            if drain is not None:
                try:
                    drain()
                except Exception:
                    log.exception("draining a connection failed")

    def undrained(self) -> list[Connection]:
        """Connections still delivering what a restart would lose (a `drained()` that says False)."""
        waiting = []
        for conn in self.connections():
            drained = getattr(conn, "drained", None)
            if drained is not None and not drained():
                waiting.append(conn)
        return waiting

    async def wait_drained(self, timeout: float) -> list[Connection]:
        """Until every connection delivered what it holds for its client, or `timeout`; what still waits."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        waiting = self.undrained()
        while waiting and loop.time() < deadline:
            await asyncio.sleep(0.01)
            waiting = self.undrained()
        return waiting

    async def close_all(self, reason: str, timeout: float) -> None:
        """Ask every connection to close, wait up to `timeout`, then cancel tracked tasks."""
        self.shutting_down = True
        for conn in self.connections():
            try:
                conn.close(reason)
            except Exception:  # one broken connection must not stop the shutdown
                log.exception("closing a connection failed")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.count() and loop.time() < deadline:
            await asyncio.sleep(0.02)
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.1, deadline - loop.time()))
