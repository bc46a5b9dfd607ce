"""`python -m bench amqp`: AMQP 0.9.1 publish-with-confirms throughput, Polygate against RabbitMQ.

Each broker runs on a free loopback port. One publisher process (pika
BlockingConnection, confirm_delivery: every basic_publish waits for its
confirm) sends 100-byte messages to amq.topic; one consumer process (prefetch
100, manual ack of every message) drains a queue bound to the routing key.
After a warm-up, the broker's CPU time (user + sys of its process tree, from
psutil) is sampled around the measured messages and divided by them.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import queue
import secrets
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.entry import bench_main
from bench import peers, rabbitmq
from bench.mqtt_bench import machine_info

POLYGATE = "polygate-none"
RABBITMQ = rabbitmq.RABBITMQ
BROKERS = (POLYGATE, RABBITMQ)
READY_DEADLINE_S = 30.0
SETTLE_S = 2.0          # no new delivery for this long: the rest is lost
POLL_S = 0.01
WARM, MEASURE = ord("W"), ord("M")
# Shared counters: publisher
P_CONNECTED, P_WARM_DONE, P_SENT, P_T_START, P_DONE = range(5)
# consumer
C_READY, C_WARM, C_COUNT, C_LAST = range(4)


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpOptions:
    brokers: tuple[str, ...] = BROKERS
    messages: int = 20_000
    warmup: int = 1_000
    size: int = 100
    prefetch: int = 100
    setup: bool = False

    def __post_init__(self) -> None:
        unknown = [b for b in self.brokers if b not in BROKERS]
        if unknown or not self.brokers:
            raise ValueError(f"--brokers takes one or more of {', '.join(BROKERS)}")
        if min(self.messages, self.size, self.prefetch) < 1 or self.warmup < 0:
            raise ValueError("--messages, --size and --prefetch must be positive, --warmup not negative")


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpMeasurement:
    broker: str
    sent: int
    received: int
    lost: int
    seconds: float           # first measured publish to last measured delivery
    msgs_per_s: float
    broker_cpu_s: float
    cpu_us_per_msg: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    broker: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AmqpReport:
    options: AmqpOptions
    machine: dict[str, Any]
    versions: dict[str, str]
    measurements: list[AmqpMeasurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ratios: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunFailed(Exception):
    """One broker's run could not be completed; the message says why."""


@dataclass(slots=True, kw_only=True)
class Target:
    """A running broker the load connects to."""
    name: str
    port: int
    username: str
    password: str
    version: str
    cpu_seconds: Callable[[], float]
    alive: Callable[[], bool]
    log_tail: Callable[[], str]
    stop: Callable[[], None]


# ---- load processes ----

def _params(port: int, username: str, password: str) -> Any:
    import pika

    return pika.ConnectionParameters("127.0.0.1", port, credentials=pika.PlainCredentials(username, password),
                                     heartbeat=0)


def publisher_main(port: int, username: str, password: str, key: str, options: AmqpOptions, counters: Any,
                   go_warm: Any, go_measure: Any, stop: Any, errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import pika

        connection = pika.BlockingConnection(_params(port, username, password))
        try:
            channel = connection.channel()
            channel.confirm_delivery()
            counters[P_CONNECTED] = 1
            for marker, count, go in ((WARM, options.warmup, go_warm), (MEASURE, options.messages, go_measure)):
                while not go.wait(0.1):
                    if stop.is_set():
                        return
                body = bytes([marker]) + b"x" * (options.size - 1)
                if marker == MEASURE:
                    counters[P_T_START] = time.monotonic()
                for sent in range(1, count + 1):
                    # Raises if the broker nacks or returns the message.
                    channel.basic_publish(exchange="amq.topic", routing_key=key, body=body)
                    if marker == MEASURE:
                        counters[P_SENT] = sent
                if marker == WARM:
                    counters[P_WARM_DONE] = 1
            counters[P_DONE] = 1
        finally:
            connection.close()
    except BaseException:
        errors.put(f"publisher: {traceback.format_exc()}")


def consumer_main(port: int, username: str, password: str, key: str, prefetch: int, counters: Any, stop: Any,
                  errors: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import pika

        connection = pika.BlockingConnection(_params(port, username, password))
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=prefetch)
            name = channel.queue_declare(queue="", exclusive=True).method.queue
            channel.queue_bind(queue=name, exchange="amq.topic", routing_key=key)
            counters[C_READY] = 1
            warm = measured = 0
            for method, _props, body in channel.consume(name, auto_ack=False, inactivity_timeout=0.1):
                if method is not None:
                    channel.basic_ack(method.delivery_tag)
                    if body[0] == MEASURE:
                        measured += 1
                        counters[C_COUNT] = measured
                        counters[C_LAST] = time.monotonic()
                    else:
                        warm += 1
                        counters[C_WARM] = warm
                if stop.is_set():
                    break
            channel.cancel()
        finally:
            connection.close()
    except BaseException:
        errors.put(f"consumer: {traceback.format_exc()}")


def measure(target: Target, options: AmqpOptions) -> AmqpMeasurement:
    ctx = multiprocessing.get_context("spawn")
    key = f"bench.amqp.{secrets.token_hex(4)}"
    pub, con = ctx.RawArray("d", 5), ctx.RawArray("d", 4)
    stop, go_warm, go_measure, errors = ctx.Event(), ctx.Event(), ctx.Event(), ctx.Queue()
    auth = (target.port, target.username, target.password, key)
    processes = [
        ctx.Process(target=consumer_main, args=(*auth, options.prefetch, con, stop, errors), daemon=True),
        ctx.Process(target=publisher_main, args=(*auth, options, pub, go_warm, go_measure, stop, errors),
                    daemon=True)]

    def wait(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
        deadline = time.monotonic() + deadline_s
        while not condition():
            try:
                raise RunFailed(str(errors.get_nowait()).strip())
            except queue.Empty:
                pass
            if not target.alive():
                raise RunFailed(f"{target.name} exited while {what}; its output ends with:\n{target.log_tail()}")
            if any(p.exitcode not in (None, 0) for p in processes):
                raise RunFailed(f"a load process died while {what}")
            if time.monotonic() > deadline:
                raise RunFailed(f"timed out after {deadline_s:.0f} s while {what}")
            time.sleep(POLL_S)

    def settle(count: Callable[[], float], expected: float) -> None:
        last_value, last_change = count(), time.monotonic()
        while count() < expected and time.monotonic() - last_change < SETTLE_S:
            if count() != last_value:
                last_value, last_change = count(), time.monotonic()
            time.sleep(POLL_S)

    try:
        for process in processes:
            process.start()
        wait(lambda: con[C_READY] == 1 and pub[P_CONNECTED] == 1, READY_DEADLINE_S, "connecting")
        go_warm.set()
        wait(lambda: pub[P_WARM_DONE] == 1, READY_DEADLINE_S + options.warmup * 0.01, "warming up")
        settle(lambda: con[C_WARM], options.warmup)
        cpu_before = target.cpu_seconds()
        go_measure.set()
        wait(lambda: pub[P_DONE] == 1, READY_DEADLINE_S + options.messages * 0.01, "publishing")
        settle(lambda: con[C_COUNT], options.messages)
        cpu_after = target.cpu_seconds()
        received, started, last = int(con[C_COUNT]), pub[P_T_START], con[C_LAST]
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=3)
            if process.is_alive():
                process.kill()
                process.join(timeout=3)
    if received == 0:
        raise RunFailed(f"no measured message reached the consumer; {target.name} output ends with:\n"
                        f"{target.log_tail()}")
    seconds = max(last - started, 1e-9)
    cpu = max(cpu_after - cpu_before, 0.0)
    return AmqpMeasurement(broker=target.name, sent=options.messages, received=received,
                           lost=options.messages - received, seconds=seconds, msgs_per_s=received / seconds,
                           broker_cpu_s=cpu, cpu_us_per_msg=cpu / received * 1e6)


# ---- the brokers ----

def start_polygate(workdir: Path) -> Target:
    port = peers.free_port()
    conf = workdir / "polygate.yaml"
    conf.write_text(f"server: {{amqp091: {{plain: {{addr: \"127.0.0.1:{port}\"}}}}, health_addr: \"\"}}\n"
                    "auth: {provider: none}\n")
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
    process, log_path = peers.launch(argv, name=POLYGATE, port=port, workdir=workdir, env=peers.gateway_env({}))
    return Target(name=POLYGATE, port=port, username="bench", password="bench", version=peers.polygate_version(),
                  cpu_seconds=lambda: peers.process_tree_cpu_seconds(process.pid),
                  alive=lambda: process.poll() is None, log_tail=lambda: peers.read_tail(log_path),
                  stop=lambda: peers.stop_process_group(process))


def start_rabbitmq(workdir: Path, *, setup: bool) -> Target:
    """bench.rabbitmq's AMQP-only node, as this benchmark's Target."""
    broker = rabbitmq.start_rabbitmq(workdir, setup=setup)
    credentials = broker.credentials or peers.Credentials(username="guest", password="guest")
    return Target(name=RABBITMQ, port=broker.port, username=credentials.username, password=credentials.password,
                  version=broker.version, cpu_seconds=broker.cpu_seconds, alive=lambda: broker.process.poll() is None,
                  log_tail=broker.log_tail, stop=broker.stop)


# ---- the whole benchmark ----

def run(options: AmqpOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> AmqpReport:
    versions = {"pika": peers.package_version("pika"), "psutil": peers.package_version("psutil")}
    measurements: list[AmqpMeasurement] = []
    skipped: list[Skipped] = []
    with tempfile.TemporaryDirectory(prefix="polygate-amqp-") as tmp:
        for name in options.brokers:
            workdir = (Path(tmp) if keep_dir is None else keep_dir) / name
            workdir.mkdir(parents=True, exist_ok=True)
            log(f"starting {name} ...")
            try:
                target = start_polygate(workdir) if name == POLYGATE else start_rabbitmq(workdir, setup=options.setup)
            except peers.BrokerUnavailable as exc:
                log(f"skipping {name}: {exc}")
                skipped.append(Skipped(broker=name, reason=str(exc)))
                continue
            try:
                versions[name] = target.version
                result = measure(target, options)
            except RunFailed as exc:
                log(f"  {name} failed: {exc}")
                skipped.append(Skipped(broker=name, reason=str(exc)))
                continue
            finally:
                target.stop()
            log(f"  {name}: {result.msgs_per_s:,.0f} msg/s, {result.cpu_us_per_msg:.1f} µs CPU/msg")
            measurements.append(result)
    by_name = {m.broker: m for m in measurements}
    ratios = {}
    if POLYGATE in by_name and RABBITMQ in by_name:
        ours, theirs = by_name[POLYGATE], by_name[RABBITMQ]
        ratios["msgs/s polygate/rabbitmq"] = ours.msgs_per_s / theirs.msgs_per_s
        if theirs.cpu_us_per_msg > 0:
            ratios["CPU/msg polygate/rabbitmq"] = ours.cpu_us_per_msg / theirs.cpu_us_per_msg
    return AmqpReport(options=options, machine=machine_info(), versions=versions, measurements=measurements,
                      skipped=skipped, ratios=ratios)


def format_report(report: AmqpReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"load: 1 publisher process (pika BlockingConnection, confirm_delivery: one publish in flight) + 1 consumer "
        f"process (prefetch {options.prefetch}, manual ack per message); {options.size}-byte payloads, "
        f"{options.warmup} warm-up + {options.messages} measured messages; polygate with provider none, "
        "rabbitmq as guest with no plugins",
        "",
    ]
    header = ("broker", "sent", "received", "lost", "seconds", "msgs/s", "CPU µs/msg")
    rows = [header] + [(m.broker, str(m.sent), str(m.received), str(m.lost), f"{m.seconds:.2f}",
                        f"{m.msgs_per_s:,.0f}", f"{m.cpu_us_per_msg:.1f}") for m in report.measurements]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                               for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    if report.ratios:
        lines += ["", "ratios (same run):"] + [f"  {name:<28} {value:6.2f}x" for name, value in report.ratios.items()]
    if report.skipped:
        lines += ["", "skipped:"] + [f"  {s.broker}: " + s.reason.replace("\n", "\n      ") for s in report.skipped]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> tuple[AmqpOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench amqp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20_000, help="measured messages (default 20000)")
    parser.add_argument("--warmup", type=int, default=1_000, help="warm-up messages (default 1000)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--setup", action="store_true", help="install RabbitMQ if missing (apt-get install -y "
                                                             "rabbitmq-server)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each broker's config, data and log under DIR")
    args = parser.parse_args(list(argv))
    try:
        options = AmqpOptions(brokers=tuple(b.strip() for b in args.brokers.split(",") if b.strip()),
                              messages=args.messages, warmup=args.warmup, size=args.size, setup=args.setup)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.measurements), started="every broker and load process was",
    )
