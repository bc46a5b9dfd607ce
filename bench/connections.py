"""Worker processes that open many raw MQTT connections and hold them.

Used by `bench memory` (idle connections: CONNECT with keepalive 600, then
nothing) and `bench storm` (every CONNECT at once, CONNACK latency per
client). The packets are bench.load's; what is new here is opening thousands
of sockets from one process with a bounded number of CONNECTs outstanding,
and reporting each client's CONNACK time.
"""

from __future__ import annotations

import multiprocessing
import queue
import resource
import selectors
import socket
import ssl
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from bench import load, mqtt_bench, peers

# Counter slots of one worker (a shared RawArray of doubles).
W_READY, W_CONNECTED, W_REFUSED, W_DONE, W_LAST = range(5)
WORKER_SLOTS = 5
CONNACK_DEADLINE_S = 60.0
#: Clients per loopback source address: below Polygate's default limits.max_connections_per_ip (1,000),
#: so that thousands of clients look like what they stand for, many devices, not one host.
CLIENTS_PER_SOURCE = 500


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectPlan:
    host: str
    port: int
    client_ids: tuple[str, ...]
    #: One (username, password) per client id, or None for anonymous clients.
    credentials: tuple[tuple[str, str], ...] | None = field(default=None, repr=False)
    #: CONNECTs sent and not yet answered, at most (0: all at once, a storm).
    window: int = 0
    #: The CA file of the broker's certificate: connect over TLS. Every handshake of a worker runs at
    #: once (non-blocking), each client's CONNECT goes out as soon as its handshake is done.
    tls_ca: str | None = None
    #: Source addresses the clients connect from, in turn (Linux routes all of 127/8 to lo); () lets the OS pick.
    sources: tuple[str, ...] = ()


def loopback_sources(worker: int, clients: int) -> tuple[str, ...]:
    """Source addresses for `clients` clients of worker number `worker`: CLIENTS_PER_SOURCE each, none shared
    with another worker (127.<worker + 1>.<n>.1)."""
    count = max(1, -(-clients // CLIENTS_PER_SOURCE))
    return tuple(f"127.{worker + 1}.{n // 250}.{n % 250 + 1}" for n in range(count))


def raise_nofile_limit(wanted: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE towards `wanted` (capped at the hard limit); returns it.

    Children spawned afterwards inherit it, which is how a broker subprocess gets it too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def open_connections(plan: ConnectPlan, counters: Any) -> tuple[list[socket.socket], list[float], int]:
    """Connect every client of `plan`; returns the sockets, CONNACK latencies (s) and refusals.

    A client's latency runs from the start of its TCP connect to its CONNACK (its TLS
    handshake included). Refused clients (CONNACK return code != 0) are closed and counted, not raised:
    a storm reports how many the gateway turned away.
    """
    selector = selectors.DefaultSelector()
    sockets: list[socket.socket] = []
    latencies: list[float] = []
    refused = 0
    pending: dict[socket.socket, tuple[float, load.PacketReader]] = {}
    #: TLS sockets whose handshake is under way -> the CONNECT to send once it is done.
    handshaking: dict[socket.socket, bytes] = {}
    deadline = time.monotonic() + CONNACK_DEADLINE_S

    def go_on_handshake(sock: ssl.SSLSocket) -> None:
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            selector.modify(sock, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            selector.modify(sock, selectors.EVENT_WRITE)
            return
        sock.settimeout(load.CONNECT_TIMEOUT_S)
        sock.sendall(handshaking.pop(sock))
        selector.modify(sock, selectors.EVENT_READ)

    def drain(until_pending: int, *, poll_only: bool = False) -> None:
        nonlocal refused
        while len(pending) > until_pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise load.LoadError(f"timed out waiting for {len(pending)} CONNACK(s)")
            ready = selector.select(0 if poll_only else min(remaining, 0.5))
            if poll_only and not ready:
                return
            for key, _ in ready:
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                if sock in handshaking:
                    go_on_handshake(sock)  # type: ignore[arg-type]
                    continue
                started, reader = pending[sock]
                data = load.recv_all(sock, 65536)
                if not data:
                    raise load.LoadError("the broker closed a connection before its CONNACK")
                for header, body in reader.feed(data):
                    if header & 0xF0 != 0x20:
                        continue
                    now = time.monotonic()
                    selector.unregister(sock)
                    del pending[sock]
                    if body[1] != 0:
                        refused += 1
                        sock.close()
                    else:
                        latencies.append(now - started)
                        sockets.append(sock)
                    counters[W_CONNECTED] = len(sockets)
                    counters[W_REFUSED] = refused
                    # time.monotonic is CLOCK_MONOTONIC, the same clock in every process.
                    counters[W_LAST] = now
                    break

    try:
        for index, client_id in enumerate(plan.client_ids):
            username, password = plan.credentials[index] if plan.credentials else (None, None)
            started = time.monotonic()
            source = (plan.sources[index % len(plan.sources)], 0) if plan.sources else None
            sock = socket.create_connection((plan.host, plan.port), timeout=load.CONNECT_TIMEOUT_S,
                                            source_address=source)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            connect = load.connect_packet(client_id, username, password)
            if plan.tls_ca:
                sock.setblocking(False)
                sock = load.tls_context(plan.tls_ca).wrap_socket(
                    sock, server_hostname=load.TLS_SERVER_NAME, do_handshake_on_connect=False)
                handshaking[sock] = connect
                selector.register(sock, selectors.EVENT_WRITE)
            else:
                sock.sendall(connect)
                selector.register(sock, selectors.EVENT_READ)
            pending[sock] = (started, load.PacketReader())
            if plan.window:
                drain(plan.window - 1)
            else:
                # A storm never waits before its next CONNECT, but a CONNACK already
                # here is timestamped now, not after the last CONNECT went out.
                drain(0, poll_only=True)
        drain(0)
    except BaseException:
        for sock in [*sockets, *pending]:
            sock.close()
        raise
    finally:
        selector.close()
    return sockets, latencies, refused


def hold_main(plan: ConnectPlan, counters: Any, go: Any, stop: Any, results: Any, errors: Any) -> None:
    """Worker process: on `go`, open every connection of `plan`, report, hold them until `stop`."""
    sockets: list[socket.socket] = []
    try:
        # Every socket is a descriptor: thousands per process need more than the usual 1024.
        raise_nofile_limit(len(plan.client_ids) + 64)
        counters[W_READY] = 1
        while not go.wait(0.05):
            if stop.is_set():
                return
        sockets, latencies, refused = open_connections(plan, counters)
        results.put((latencies, refused))
        counters[W_DONE] = 1
        stop.wait()
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the parent reports it once
    except Exception as exc:  # reported to the parent, which decides what to do
        errors.put(f"connections: {exc!r}\n{traceback.format_exc(limit=3)}")
    finally:
        for sock in sockets:
            try:
                sock.sendall(b"\xe0\x00")
            except OSError:
                pass
            sock.close()


def split(items: tuple[Any, ...] | list[Any], parts: int) -> list[tuple[Any, ...]]:
    """`items` in `parts` contiguous slices of nearly equal size (none empty unless items is)."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(tuple(items[start:end]))
        start = end
    return out


@dataclass(frozen=True, slots=True, kw_only=True)
class Opened:
    connected: int
    refused: int
    #: CONNACK latency of every accepted client, seconds.
    latencies: tuple[float, ...]
    #: From `go` to the last CONNACK of any worker, seconds.
    elapsed_s: float


@contextmanager
def held_connections(broker: peers.RunningBroker, plans: Sequence[ConnectPlan],
                     deadline_s: float = CONNACK_DEADLINE_S + 10) -> Iterator[Opened]:
    """One worker process per plan; all start connecting at once; the connections stay open inside the block."""
    ctx = multiprocessing.get_context("spawn")
    errors, results = ctx.Queue(), ctx.Queue()
    stop, go = ctx.Event(), ctx.Event()
    counters = [ctx.RawArray("d", WORKER_SLOTS) for _ in plans]
    targets = [(hold_main, (plan, c, go, stop, results, errors)) for plan, c in zip(plans, counters)]
    with mqtt_bench.worker_processes(ctx, targets, stop) as workers:
        mqtt_bench.poll_until(lambda: all(c[W_READY] == 1 for c in counters), mqtt_bench.READY_DEADLINE_S,
                              "waiting for the connection workers", errors, workers, broker)
        started = time.monotonic()
        go.set()
        mqtt_bench.poll_until(lambda: all(c[W_DONE] == 1 for c in counters), deadline_s,
                              "opening the connections", errors, workers, broker)
        # The last CONNACK as the worker saw it, not when this poll noticed (polls are 10 ms apart).
        elapsed = max(c[W_LAST] for c in counters) - started
        latencies: list[float] = []
        refused = 0
        for _ in plans:
            try:
                worker_latencies, worker_refused = results.get(timeout=10)
            except queue.Empty:
                raise mqtt_bench.RunFailed("a connection worker finished without reporting") from None
            latencies += worker_latencies
            refused += worker_refused
        yield Opened(connected=len(latencies), refused=refused, latencies=tuple(latencies), elapsed_s=elapsed)
