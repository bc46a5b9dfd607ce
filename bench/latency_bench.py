"""`python -m bench latency`: end-to-end latency across protocols, one message at a time.

One Polygate (provider `none`, every listener on a free loopback port) carries
each path in turn. A subscriber process and a publisher process (separate
processes, so neither shares a GIL with the other or with this one) connect;
the publisher sends a message carrying its sequence number and a
CLOCK_MONOTONIC send timestamp (system-wide on Linux, so comparable across
processes), the subscriber notes the arrival time and reports it over a pipe,
and only then does the publisher send the next one. Latency = arrival - send
timestamp, taken just before the client's send call, so synchronous
publishers (HTTP POST, CoAP POST, AMQP 1.0 settled send) include their own
request cost up to the moment the message reaches the subscriber.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import dataclasses
import http.client
import multiprocessing
import queue
import secrets
import signal
import socket
import statistics
import struct
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from bench.entry import bench_main
from bench import load, peers
from bench.mqtt_bench import machine_info

MQTT, AMQP091, HTTP, COAP, AMQP = "mqtt", "amqp091", "http", "coap", "amqp"
PROTOCOLS = (MQTT, AMQP091, HTTP, COAP, AMQP)
#: (publisher, subscriber); the first is the baseline every other p50 is divided by.
BASELINE = (MQTT, MQTT)
DEFAULT_PATHS = (BASELINE, (MQTT, AMQP091), (AMQP091, MQTT), (HTTP, MQTT), (COAP, MQTT), (AMQP, MQTT))
SUBSCRIBERS = (MQTT, AMQP091)
#: listener block of the gateway config each protocol needs
LISTENER = {MQTT: "tcp", AMQP091: "amqp091", HTTP: "http", COAP: "coap", AMQP: "amqp"}
#: client library each protocol's side needs (besides the standard library)
LIBRARY = {MQTT: None, AMQP091: "pika", HTTP: None, COAP: "aiocoap", AMQP: "python-qpid-proton"}

# Any credentials pass provider `none`; sent anyway so every client takes its authenticated path.
USERNAME = "bench"
PASSWORD = "bench"
PAYLOAD_SIZE = 64
READY_DEADLINE_S = 30.0
POLL_S = 0.2               # how often a blocked subscriber looks at the stop event
MAX_CONSECUTIVE_LOST = 5   # a path that loses this many in a row is broken, not slow
ARRIVAL = struct.Struct("!qq")   # sequence number, arrival time (ns)


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyOptions:
    paths: tuple[tuple[str, str], ...] = DEFAULT_PATHS
    messages: int = 2_000
    warmup: int = 200
    timeout_s: float = 5.0    # per message: no arrival by then counts it as lost

    def __post_init__(self) -> None:
        for publisher, subscriber in self.paths:
            if publisher not in PROTOCOLS or subscriber not in SUBSCRIBERS:
                raise ValueError(f"unknown path {publisher}->{subscriber}: publishers are {', '.join(PROTOCOLS)}, "
                                 f"subscribers {', '.join(SUBSCRIBERS)}")
        if not self.paths:
            raise ValueError("name at least one path")
        if self.messages < 1 or self.warmup < 0 or self.timeout_s <= 0:
            raise ValueError("--messages and --timeout must be positive, --warmup not negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class PathResult:
    path: str
    sent: int
    received: int
    lost: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    ratio_p50_to_baseline: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class LatencyReport:
    options: LatencyOptions
    machine: dict[str, Any]
    versions: dict[str, str]
    results: list[PathResult] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunFailed(Exception):
    """One path could not be measured; the message says why."""


def path_name(path: tuple[str, str]) -> str:
    return f"{path[0]} -> {path[1]}"


# ---- the gateway with every listener ----

def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_polygate_all(workdir: Path, kinds: Sequence[str]) -> tuple[peers.RunningBroker, dict[str, int]]:
    """Polygate, provider `none`, with the listener of every protocol in `kinds` on a free loopback port."""
    ports = {kind: (_free_udp_port() if kind == COAP else peers.free_port()) for kind in dict.fromkeys(kinds)}
    ports.setdefault(MQTT, peers.free_port())   # the listener launch waits for
    blocks = ", ".join(f"{LISTENER[kind]}: {{plain: {{addr: \"127.0.0.1:{port}\"}}}}" for kind, port in ports.items())
    (workdir / "polygate.yaml").write_text(f"server: {{{blocks}, health_addr: \"\"}}\nauth: {{provider: none}}\n")
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(workdir / "polygate.yaml")]
    process, log_path = peers.launch(argv, name="polygate-none", port=ports[MQTT], workdir=workdir,
                                      env=peers.gateway_env({}))
    broker = peers.RunningBroker(name="polygate-none", port=ports[MQTT], version=peers.polygate_version(),
                                 credentials=None, process=process, log_path=log_path)
    try:
        for kind, port in ports.items():
            if kind not in (MQTT, COAP):   # CoAP is UDP: its first request is retried instead
                peers.wait_for_listener(process, port, log_path, name=f"polygate ({kind} listener)")
    except BaseException:
        broker.stop()
        raise
    return broker, ports


# ---- payloads ----

def make_payload(seq: int) -> bytes:
    head = b"%d %d " % (seq, time.monotonic_ns())
    return head + b"x" * max(PAYLOAD_SIZE - len(head), 0)


def parse_payload(payload: bytes) -> tuple[int, int]:
    seq, sent_ns, _ = payload.split(b" ", 2)
    return int(seq), int(sent_ns)


# ---- subscriber processes ----

def _report_arrival(conn: Any, payload: bytes) -> None:
    arrived = time.monotonic_ns()
    seq, sent_ns = parse_payload(payload)
    conn.send_bytes(ARRIVAL.pack(seq, arrived - sent_ns))


def _mqtt_subscriber(port: int, topic: str, ready: Any, stop: Any, conn: Any) -> None:
    config = load.LoadConfig(host="127.0.0.1", port=port, client=load.CLIENT_RAW, client_id=f"lat-sub-{topic[-8:]}",
                             topic=topic, qos=0, size=0, username=USERNAME, password=PASSWORD)
    client = load.RawClient(config)
    try:
        client.sock.sendall(load.subscribe_packet(1, topic, 0))
        _, body = client.expect(0x90)
        if body[2] == 0x80:
            raise load.LoadError(f"SUBACK refused {topic}")
        ready.set()
        client.sock.settimeout(POLL_S)
        while not stop.is_set():
            try:
                packets = client.read_packets()
            except TimeoutError:
                continue
            for header, body in packets:
                if header & 0xF0 == 0x30:
                    topic_len = struct.unpack_from("!H", body)[0]
                    skip = 2 + topic_len + (2 if header & 0x06 else 0)
                    _report_arrival(conn, body[skip:])
    finally:
        client.close()


def _amqp091_subscriber(port: int, topic: str, ready: Any, stop: Any, conn: Any) -> None:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", port, credentials=pika.PlainCredentials(USERNAME, PASSWORD))
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        name = channel.queue_declare(queue="", exclusive=True).method.queue
        channel.queue_bind(queue=name, exchange="amq.topic", routing_key=topic.replace("/", "."))
        ready.set()
        for method, _props, body in channel.consume(name, auto_ack=True, inactivity_timeout=POLL_S):
            if method is not None:
                _report_arrival(conn, bytes(body))
            if stop.is_set():
                break
        channel.cancel()
    finally:
        connection.close()


def subscriber_main(kind: str, port: int, topic: str, ready: Any, stop: Any, conn: Any, errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the parent stops us; Ctrl-C goes to it
    try:
        {MQTT: _mqtt_subscriber, AMQP091: _amqp091_subscriber}[kind](port, topic, ready, stop, conn)
    except BaseException:
        errors.put(f"{kind} subscriber: {traceback.format_exc()}")


# ---- publisher processes ----

Send = Callable[[bytes], None]


def _coap_uri(port: int, topic: str) -> str:
    path = "/".join(quote(level, safe="") for level in topic.split("/"))
    return f"coap://127.0.0.1:{port}/{path}?" + urlencode({"username": USERNAME, "password": PASSWORD})


def _publish_loop(send: Send, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    """Warm-up, then the measured messages: each one sent only after the previous one arrived."""
    lost_in_row = 0
    for seq in range(options.warmup + options.messages):
        send(make_payload(seq))
        deadline = time.monotonic() + options.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not conn.poll(left):
                lost_in_row += 1
                if lost_in_row >= MAX_CONSECUTIVE_LOST:
                    raise load.LoadError(f"{lost_in_row} messages in a row did not arrive within "
                                         f"{options.timeout_s:g} s each (message {seq})")
                break
            arrived_seq, latency_ns = ARRIVAL.unpack(conn.recv_bytes())
            if arrived_seq == seq:   # an older one arriving late was already counted lost
                lost_in_row = 0
                if seq >= options.warmup:
                    latencies.append(latency_ns)
                break


def _run_mqtt_publisher(port: int, topic: str, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    config = load.LoadConfig(host="127.0.0.1", port=port, client=load.CLIENT_RAW, client_id=f"lat-pub-{topic[-8:]}",
                             topic=topic, qos=0, size=0, username=USERNAME, password=PASSWORD)
    client = load.RawClient(config)
    try:
        _publish_loop(lambda p: client.sock.sendall(load.publish_packet(topic, p)),
                      conn, options, latencies)
    finally:
        client.close()


def _run_amqp091_publisher(port: int, topic: str, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    import pika

    params = pika.ConnectionParameters("127.0.0.1", port, credentials=pika.PlainCredentials(USERNAME, PASSWORD))
    connection = pika.BlockingConnection(params)
    try:
        channel = connection.channel()
        key = topic.replace("/", ".")
        _publish_loop(lambda p: channel.basic_publish(exchange="amq.topic", routing_key=key, body=p),
                      conn, options, latencies)
    finally:
        connection.close()


def _run_http_publisher(port: int, topic: str, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=options.timeout_s)
    headers = {"Authorization": "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode(),
               "Content-Type": "application/octet-stream"}
    url = "/" + "/".join(quote(level, safe="") for level in topic.split("/"))

    def send(payload: bytes) -> None:
        client.request("POST", url, body=payload, headers=headers)
        response = client.getresponse()
        body = response.read()
        if response.status != 202:
            raise load.LoadError(f"POST {url} answered {response.status}: {body[:200]!r}")

    try:
        _publish_loop(send, conn, options, latencies)
    finally:
        client.close()


def _run_coap_publisher(port: int, topic: str, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    import aiocoap

    uri = _coap_uri(port, topic)
    # The loop runs only during a send: the wait for arrival needs nothing from it, and a
    # loop of our own in this thread hands nothing over to another thread.
    loop = asyncio.new_event_loop()
    context = loop.run_until_complete(aiocoap.Context.create_client_context(transports=["udp6"]))

    async def post(payload: bytes) -> None:
        request = context.request(aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload))
        response = await asyncio.wait_for(request.response, options.timeout_s)
        if response.code != aiocoap.CHANGED:
            raise load.LoadError(f"CoAP POST answered {response.code}: {bytes(response.payload)[:200]!r}")

    try:
        _publish_loop(lambda p: loop.run_until_complete(post(p)), conn, options, latencies)
    finally:
        loop.run_until_complete(context.shutdown())
        loop.close()


def _run_amqp_publisher(port: int, topic: str, conn: Any, options: LatencyOptions, latencies: list[int]) -> None:
    from proton import Message
    from proton.utils import BlockingConnection

    connection = BlockingConnection(f"amqp://127.0.0.1:{port}", user=USERNAME, password=PASSWORD,
                                    allowed_mechs="PLAIN", allow_insecure_mechs=True, timeout=options.timeout_s)
    try:
        sender = connection.create_sender(topic)
        _publish_loop(lambda p: sender.send(Message(body=p)), conn, options, latencies)
    finally:
        connection.close()


PUBLISHERS = {MQTT: _run_mqtt_publisher, AMQP091: _run_amqp091_publisher, HTTP: _run_http_publisher,
              COAP: _run_coap_publisher, AMQP: _run_amqp_publisher}


def publisher_main(kind: str, port: int, topic: str, conn: Any, options: LatencyOptions, results: Any,
                   errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    latencies: list[int] = []
    try:
        PUBLISHERS[kind](port, topic, conn, options, latencies)
    except BaseException:
        errors.put(f"{kind} publisher: {traceback.format_exc()}")
        return
    results.put(latencies)


# ---- orchestration ----

def _first_error(errors: Any) -> str | None:
    try:
        return str(errors.get_nowait()).strip()
    except queue.Empty:
        return None


def measure_path(path: tuple[str, str], ports: dict[str, int], broker: peers.RunningBroker,
                 options: LatencyOptions) -> PathResult:
    """Run one path's subscriber and publisher processes and return its latency figures (ratio unset)."""
    publisher, subscriber = path
    ctx = multiprocessing.get_context("spawn")
    topic = f"{peers.BENCH_TOPIC_ROOT}/lat/{publisher}-{subscriber}/{secrets.token_hex(4)}"
    ready, stop = ctx.Event(), ctx.Event()
    arrivals_in, arrivals_out = ctx.Pipe(duplex=False)
    results, errors = ctx.Queue(), ctx.Queue()
    sub = ctx.Process(target=subscriber_main, args=(subscriber, ports[subscriber], topic, ready, stop,
                                                    arrivals_out, errors), daemon=True)
    pub = ctx.Process(target=publisher_main, args=(publisher, ports[publisher], topic, arrivals_in, options,
                                                   results, errors), daemon=True)
    processes = [sub]
    try:
        sub.start()
        deadline = time.monotonic() + READY_DEADLINE_S
        while not ready.wait(0.05):
            error = _first_error(errors)
            if error or not sub.is_alive() or time.monotonic() > deadline:
                raise RunFailed(error or f"the {subscriber} subscriber did not subscribe within "
                                         f"{READY_DEADLINE_S:.0f} s; gateway output ends with:\n{broker.log_tail()}")
        processes.append(pub)
        pub.start()
        budget = READY_DEADLINE_S + (options.warmup + options.messages) * options.timeout_s
        deadline = time.monotonic() + budget
        while True:
            try:
                latencies: list[int] = results.get(timeout=0.1)
                break
            except queue.Empty:
                pass
            error = _first_error(errors)
            if error:
                raise RunFailed(error)
            if not pub.is_alive() and results.empty():
                raise RunFailed(f"the {publisher} publisher exited (code {pub.exitcode}) without results")
            if broker.process.poll() is not None:
                raise RunFailed(f"the gateway exited; its output ends with:\n{broker.log_tail()}")
            if time.monotonic() > deadline:
                raise RunFailed(f"no result within {budget:.0f} s")
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
                process.join(timeout=3)
    if not latencies:
        raise RunFailed(f"none of {options.messages} measured messages arrived")
    return summarise(path_name(path), options.messages, latencies)


def summarise(name: str, sent: int, latencies_ns: Sequence[int]) -> PathResult:
    ms = sorted(value / 1e6 for value in latencies_ns)
    # statistics.quantiles needs two points; one message is its own p50 and p99.
    p50 = statistics.median(ms)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) > 1 else ms[0]
    return PathResult(path=name, sent=sent, received=len(ms), lost=sent - len(ms), p50_ms=p50, p99_ms=p99,
                      max_ms=ms[-1], mean_ms=statistics.fmean(ms), ratio_p50_to_baseline=None)


def with_ratios(results: list[PathResult]) -> list[PathResult]:
    baseline = next((r for r in results if r.path == path_name(BASELINE)), None)
    if baseline is None or baseline.p50_ms <= 0:
        return results
    return [dataclasses.replace(r, ratio_p50_to_baseline=r.p50_ms / baseline.p50_ms) for r in results]


def _missing_library(path: tuple[str, str]) -> str | None:
    import importlib.util

    modules = {"pika": "pika", "aiocoap": "aiocoap", "python-qpid-proton": "proton"}
    for kind in path:
        library = LIBRARY[kind]
        if library and importlib.util.find_spec(modules[library]) is None:
            return f"{library} is not installed (the {kind} client)"
    return None


def run(options: LatencyOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> LatencyReport:
    """Start one gateway, measure every path, stop everything it started."""
    versions = {"polygate": peers.polygate_version(),
                **{name: peers.package_version(name) for name in ("pika", "aiocoap", "python-qpid-proton")}}
    results: list[PathResult] = []
    skipped: list[Skipped] = []
    runnable = []
    for path in options.paths:
        reason = _missing_library(path)
        if reason:
            skipped.append(Skipped(path=path_name(path), reason=reason))
        else:
            runnable.append(path)
    if not runnable:
        return LatencyReport(options=options, machine=machine_info(), versions=versions, skipped=skipped)
    with tempfile.TemporaryDirectory(prefix="polygate-latency-") as tmp:
        workdir = Path(tmp) if keep_dir is None else keep_dir
        workdir.mkdir(parents=True, exist_ok=True)
        log("starting polygate (provider none, every listener) ...")
        try:
            broker, ports = start_polygate_all(workdir, [kind for path in runnable for kind in path])
        except peers.BrokerUnavailable as exc:
            skipped += [Skipped(path=path_name(path), reason=str(exc)) for path in runnable]
            return LatencyReport(options=options, machine=machine_info(), versions=versions, skipped=skipped)
        try:
            for path in runnable:
                log(f"  {path_name(path)}: {options.warmup} warm-up + {options.messages} messages ...")
                try:
                    result = measure_path(path, ports, broker, options)
                except RunFailed as exc:
                    log(f"  {path_name(path)} failed: {exc}")
                    skipped.append(Skipped(path=path_name(path), reason=str(exc)))
                    continue
                log(f"  {path_name(path)}: p50 {result.p50_ms:.3f} ms, p99 {result.p99_ms:.3f} ms")
                results.append(result)
        finally:
            broker.stop()
    return LatencyReport(options=options, machine=machine_info(), versions=versions,
                         results=with_ratios(results), skipped=skipped)


# ---- output ----

def format_report(report: LatencyReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"load: per path, 1 subscriber process + 1 publisher process (separate processes); polygate provider none; "
        f"{PAYLOAD_SIZE}-byte payloads, {options.warmup} warm-up + {options.messages} measured messages, each sent "
        f"after the previous one arrived; MQTT QoS 0 (bench.load's raw client), AMQP 0.9.1 pika without confirms "
        f"(auto-ack consumer), HTTP keep-alive POST, CoAP confirmable POST (aiocoap), AMQP 1.0 settled send (proton)",
        "",
    ]
    header = ("path", "sent", "received", "lost", "p50 ms", "p99 ms", "max ms", "mean ms", "p50 / mqtt->mqtt")
    rows = [header]
    for r in report.results:
        ratio = f"{r.ratio_p50_to_baseline:.2f}x" if r.ratio_p50_to_baseline is not None else "-"
        rows.append((r.path, str(r.sent), str(r.received), str(r.lost), f"{r.p50_ms:.3f}", f"{r.p99_ms:.3f}",
                     f"{r.max_ms:.3f}", f"{r.mean_ms:.3f}", ratio))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    if report.skipped:
        lines += ["", "skipped:"]
        for skip in report.skipped:
            lines.append(f"  {skip.path}: " + skip.reason.replace("\n", "\n      "))
    return "\n".join(lines)


def _parse_path(text: str) -> tuple[str, str]:
    parts = [part.strip() for part in text.replace("->", ":").split(":")]
    if len(parts) != 2:
        raise ValueError(f"a path is publisher:subscriber, e.g. coap:mqtt, not {text!r}")
    return parts[0], parts[1]


def parse_args(argv: Sequence[str]) -> tuple[LatencyOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench latency", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=2_000, help="measured messages per path (default 2000)")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured messages first, per path (default 200)")
    parser.add_argument("--timeout", type=float, default=5.0,
                        help="seconds to wait for one message before counting it lost (default 5)")
    parser.add_argument("--paths", default=",".join(f"{p}:{s}" for p, s in DEFAULT_PATHS),
                        help="comma-separated publisher:subscriber pairs (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep the gateway's config and log under DIR")
    args = parser.parse_args(list(argv))
    try:
        paths = tuple(_parse_path(part) for part in args.paths.split(",") if part.strip())
        options = LatencyOptions(paths=paths, messages=args.messages, warmup=args.warmup, timeout_s=args.timeout)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.results), started="the gateway and every client process were",
    )
