"""`python -m bench mqtt`: publish -> subscribe through each broker, Polygate against its peers.

Each broker of the line-up (bench.mqtt_lineup: Polygate with providers none,
local, callout over gRPC and HTTP with warm caches and with every TTL at 0s;
Mosquitto, amqtt, and RabbitMQ's MQTT plugin with its cached HTTP auth
backend) is started on a free loopback port and driven by the same load in
every cell of the matrix (QoS x payload size x publishers): publisher
processes and one subscriber process (bench.load), a warm-up, then a measured
window. Per cell and broker it reports msgs/s, end-to-end latency p50/p99
(send stamp in the payload, read by the subscriber), and the broker's CPU
(user + sys of its process tree, psutil) per delivered message; the reference
auth service's CPU is shown apart. Ratios compare brokers measured in the same
run and cell only, so the machine's speed cancels out. A load process that
used >= 90% of a CPU marks its row "load-bound": msgs/s there is the load
side's limit, not the broker's.
"""

from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
import os
import platform
import queue
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.entry import bench_main, csv_items, target_lines
from bench import auth_bench, load, mqtt_lineup, peers

DEFAULT_BROKERS = mqtt_lineup.DEFAULT
SATURATED_CPU_PCT = 90.0   # a load process this busy may be what limits the rate
TARGET_QOS = 1
# Issue 10: Polygate with `local` against Mosquitto and amqtt.
TARGET_MAX_VS_MOSQUITTO = 1.5
TARGET_MIN_BELOW_AMQTT = 10.0
# Issue 14: Polygate with warm-cache callout auth against Mosquitto, RabbitMQ and `none`.
TARGET_CALLOUT_MAX_VS_MOSQUITTO = 1.2
TARGET_CALLOUT_MAX_VS_RABBITMQ = 0.5
TARGET_CALLOUT_MAX_VS_NONE = 1.05
WARM_CALLOUT = (mqtt_lineup.POLYGATE_GRPC, mqtt_lineup.POLYGATE_HTTP)
# CPU times come in 10 ms ticks; a ratio landing exactly on a target must not miss it by rounding.
RATIO_EPSILON = 1e-9

READY_DEADLINE_S = 60.0    # 50 publisher processes start at once on a small machine
WARM_DRAIN_DEADLINE_S = 20.0
SETTLE_S = 1.0             # no new delivery for this long: the rest is lost
POLL_S = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    brokers: tuple[str, ...] = DEFAULT_BROKERS
    qos_levels: tuple[int, ...] = (0, 1)
    messages: int = 50_000          # measured messages per run (split across publishers)
    seconds: float = 10.0           # cap on the measured publishing time per run
    size: int = 100                 # of the cell being measured
    publishers: int = 1             # of the cell being measured
    sizes: tuple[int, ...] = ()     # the matrix; () is (size,)
    publisher_counts: tuple[int, ...] = ()   # the matrix; () is (publishers,)
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0
    client: str = load.CLIENT_RAW
    inflight: int = 100
    batch: int = 1
    qos0_lead: int = 1_000
    setup: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.brokers if name not in mqtt_lineup.NAMES]
        if unknown:
            raise ValueError(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(mqtt_lineup.NAMES)}")
        if not self.brokers:
            raise ValueError("name at least one broker")
        if not self.qos_levels or any(qos not in (0, 1) for qos in self.qos_levels):
            raise ValueError("--qos takes 0 and/or 1")
        if self.client not in load.CLIENTS:
            raise ValueError(f"--client must be one of {', '.join(load.CLIENTS)}")
        if min(self.messages, self.publishers, self.inflight, self.batch, *self.publisher_counts) < 1 \
                or self.seconds <= 0:
            raise ValueError("--messages, --publishers, --inflight, --batch and --seconds must be positive")
        if self.qos0_lead < 0:
            raise ValueError("--qos0-lead cannot be negative (0 turns QoS 0 pacing off)")
        if min((self.size, *self.sizes)) < 1:
            raise ValueError("--size must be at least 1 byte (the first byte marks warm-up vs measured)")
        if self.warmup_messages < 0 or self.warmup_seconds < 0:
            raise ValueError("warm-up count and time cannot be negative")

    def cells(self) -> list[BenchOptions]:
        """One options object per (size, publishers) of the matrix."""
        return [dataclasses.replace(self, size=size, publishers=publishers, sizes=(), publisher_counts=())
                for size in self.sizes or (self.size,) for publishers in self.publisher_counts or (self.publishers,)]


@dataclass(frozen=True, slots=True, kw_only=True)
class Measurement:
    broker: str
    qos: int
    sent: int
    received: int
    lost: int
    window_s: float              # broker CPU sampling window
    delivery_s: float            # first to last measured delivery
    msgs_per_s: float
    broker_cpu_s: float
    cpu_us_per_msg: float
    broker_cpu_pct: float
    publisher_cpu_pct: float     # the busiest publisher process
    subscriber_cpu_pct: float
    load_saturated: bool
    size: int = 100
    publishers: int = 1
    latency_p50_ms: float | None = None   # None: payload too small to carry a send stamp
    latency_p99_ms: float | None = None
    #: The reference auth service's CPU per delivered message (brokers that call out).
    auth_service_cpu_us_per_msg: float | None = None
    #: Callouts made and auth decisions taken during warm-up and window (Polygate with callout).
    callouts: int | None = None
    auth_decisions: int | None = None
    #: Callouts expected from distinct identities and topics alone (warm caches).
    expected_callouts: int | None = None

    @property
    def cell(self) -> tuple[int, int, int]:
        return (self.qos, self.size, self.publishers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    broker: str
    qos: int | None
    reason: str
    size: int | None = None
    publishers: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Ratio:
    name: str
    qos: int
    value: float
    size: int = 100
    publishers: int = 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Target:
    description: str
    met: bool | None             # None: a broker it needs was not measured
    detail: str


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchReport:
    options: BenchOptions
    machine: dict[str, Any]
    versions: dict[str, str]
    measurements: list[Measurement] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class RunFailed(Exception):
    """One broker/QoS run could not be completed; the message says why."""


def machine_info() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()),
    }


def machine_line(machine: dict[str, Any], loadavg_end: Sequence[float]) -> str:
    """The report's first line: the machine and its load average when the run started and ended."""
    return (f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}; load "
            f"average at start {', '.join(f'{v:.2f}' for v in machine['loadavg'])}, at end "
            f"{', '.join(f'{v:.2f}' for v in loadavg_end)}")


# ---- one measured run ----

@contextmanager
def worker_processes(ctx: Any, targets: list[tuple[Callable[..., None], tuple[Any, ...]]],
             stop: Any) -> Iterator[list[Any]]:
    processes = [ctx.Process(target=target, args=args, daemon=True) for target, args in targets]
    try:
        for process in processes:
            process.start()
        yield processes
    finally:
        stop.set()
        for process in processes:
            process.join(timeout=3)
        for process in processes:
            if process.is_alive():
                process.kill()
                process.join(timeout=3)


def raise_worker_errors(errors: Any, processes: list[Any]) -> None:
    try:
        message = errors.get_nowait()
    except queue.Empty:
        dead = [p for p in processes if p.exitcode is not None]
        if dead:
            raise RunFailed(f"a load process exited early (exit code {dead[0].exitcode})") from None
        return
    raise RunFailed(message.strip())


def poll_until(condition: Callable[[], bool], deadline_s: float, what: str, errors: Any,
                processes: list[Any], broker: peers.RunningBroker) -> None:
    deadline = time.monotonic() + deadline_s
    while not condition():
        raise_worker_errors(errors, processes)
        if broker.process.poll() is not None:
            raise RunFailed(f"{broker.name} exited (code {broker.process.returncode}) while {what}; "
                            f"its output ends with:\n{broker.log_tail()}")
        if time.monotonic() > deadline:
            raise RunFailed(f"timed out after {deadline_s:.0f} s while {what}")
        time.sleep(POLL_S)


def wait_settled(count: Callable[[], float], expected: float, deadline_s: float, errors: Any,
                  processes: list[Any]) -> None:
    """Return once `expected` arrived, or nothing new arrived for SETTLE_S (the rest is lost)."""
    deadline = time.monotonic() + deadline_s
    last_value, last_change = count(), time.monotonic()
    while count() < expected:
        raise_worker_errors(errors, processes)
        now = time.monotonic()
        value = count()
        if value != last_value:
            last_value, last_change = value, now
        elif now - last_change > SETTLE_S or now > deadline:
            return
        time.sleep(POLL_S)


def cpu_of(processes: list[Any]) -> list[float]:
    return [peers.process_tree_cpu_seconds(p.pid) for p in processes]


def measure(broker: peers.RunningBroker, qos: int, options: BenchOptions, *,
            auth_service: peers.RunningBroker | None = None,
            callout_counts: Callable[[], auth_bench.AuthCounts] | None = None,
            clean_subscriber: bool = True) -> Measurement:
    """Drive one running broker at one QoS and return the figures of the measured window.

    `clean_subscriber=False`: the subscriber connects with a persistent session (clean
    session 0), so a broker that persists sessions keeps every QoS 1 message for it.

    `auth_service`: the reference service the broker calls out to, whose CPU is
    reported apart. `callout_counts`: read around the run for the callouts made
    (and, from Polygate's `/metrics`, the auth decisions taken).
    """
    ctx = multiprocessing.get_context("forkserver")
    # Up to 50 publishers start at once: fork them from one warm process, not 50 cold interpreters.
    ctx.set_forkserver_preload(["bench.load"])
    run_id = secrets.token_hex(4)
    topic = f"{peers.BENCH_TOPIC_ROOT}/{run_id}/q{qos}"
    creds = broker.credentials
    base = {
        "host": "127.0.0.1", "port": broker.port, "client": options.client, "topic": topic, "qos": qos,
        "size": options.size, "inflight": options.inflight, "batch": options.batch,
        "qos0_lead": options.qos0_lead, "publishers": options.publishers,
        "username": creds.username if creds else None, "password": creds.password if creds else None,
        "tls_ca": broker.tls_ca,
    }
    per_publisher = [options.messages // options.publishers + (1 if i < options.messages % options.publishers else 0)
                     for i in range(options.publishers)]
    warm_per_publisher = max(options.warmup_messages // options.publishers, 1 if options.warmup_messages else 0)
    errors = ctx.Queue()
    stop, go_warm, go_measure = ctx.Event(), ctx.Event(), ctx.Event()
    sub_counters = ctx.RawArray("d", load.SUBSCRIBER_SLOTS)
    pub_counters = [ctx.RawArray("d", load.PUBLISHER_SLOTS) for _ in range(options.publishers)]
    sub_config = load.LoadConfig(client_id=f"bench-sub-{run_id}", clean_session=clean_subscriber, **base)
    pub_configs = [
        load.LoadConfig(client_id=f"bench-pub{i}-{run_id}", warmup_messages=warm_per_publisher,
                        warmup_seconds=options.warmup_seconds, messages=count, seconds=options.seconds, **base)
        for i, count in enumerate(per_publisher)]
    counts_before = callout_counts() if callout_counts else None

    sub_target = (load.subscriber_main, (sub_config, sub_counters, stop, errors))
    pub_targets = [(load.publisher_main, (config, counters, sub_counters, go_warm, go_measure, stop, errors))
                   for config, counters in zip(pub_configs, pub_counters)]
    # All start at once; publishers send nothing before go_warm.
    with worker_processes(ctx, [sub_target, *pub_targets], stop) as everyone:
        subs, pubs = everyone[:1], everyone[1:]
        poll_until(lambda: sub_counters[load.S_READY] == 1
                    and all(c[load.P_CONNECTED] == 1 for c in pub_counters), READY_DEADLINE_S,
                    "waiting for the subscriber and publishers to connect", errors, everyone, broker)
        go_warm.set()
        poll_until(lambda: all(c[load.P_WARM_DONE] == 1 for c in pub_counters),
                    options.warmup_seconds + WARM_DRAIN_DEADLINE_S, "warming up", errors, everyone, broker)
        warm_sent = sum(c[load.P_WARM_SENT] for c in pub_counters)
        wait_settled(lambda: sub_counters[load.S_WARM], warm_sent, WARM_DRAIN_DEADLINE_S, errors, everyone)

        broker_cpu_before = broker.cpu_seconds()
        service_cpu_before = auth_service.cpu_seconds() if auth_service else 0.0
        pub_cpu_before, sub_cpu_before = cpu_of(pubs), cpu_of(subs)
        t_before = time.monotonic()
        go_measure.set()
        poll_until(lambda: all(c[load.P_DONE] == 1 for c in pub_counters),
                    options.seconds + load.ACK_DRAIN_S + 10, "publishing", errors, everyone, broker)
        sent = int(sum(c[load.P_SENT] for c in pub_counters))
        wait_settled(lambda: sub_counters[load.S_COUNT], sent, options.seconds + 30, errors, everyone)
        t_after = time.monotonic()
        broker_cpu_after = broker.cpu_seconds()
        service_cpu_after = auth_service.cpu_seconds() if auth_service else 0.0
        pub_cpu_after, sub_cpu_after = cpu_of(pubs), cpu_of(subs)
        received = int(sub_counters[load.S_COUNT])
        first, last = sub_counters[load.S_FIRST], sub_counters[load.S_LAST]
        raise_worker_errors(errors, [])
    # The subscriber writes its latency percentiles as it stops (the block above stopped it).
    latency_n = sub_counters[load.S_LAT_N]
    counts = callout_counts() - counts_before if callout_counts and counts_before is not None else None

    if received == 0:
        raise RunFailed(f"no measured message reached the subscriber ({sent} sent); "
                        f"broker output ends with:\n{broker.log_tail()}")
    window = t_after - t_before
    delivery = max(last - first, 1e-9)
    broker_cpu = max(broker_cpu_after - broker_cpu_before, 0.0)
    pub_pct = max(100.0 * (a - b) / window for a, b in zip(pub_cpu_after, pub_cpu_before))
    sub_pct = max(100.0 * (a - b) / window for a, b in zip(sub_cpu_after, sub_cpu_before))
    # Over the active delivery time, not the whole window, which ends with a settle wait when messages are lost.
    active = min(window, delivery + 0.05) if received > 1 else window
    pub_busy = max((a - b) / active * 100.0 for a, b in zip(pub_cpu_after, pub_cpu_before))
    sub_busy = max((a - b) / active * 100.0 for a, b in zip(sub_cpu_after, sub_cpu_before))
    return Measurement(
        broker=broker.name, qos=qos, size=options.size, publishers=options.publishers,
        sent=sent, received=received, lost=sent - received,
        window_s=window, delivery_s=delivery,
        msgs_per_s=received / delivery if received > 1 else 0.0,
        broker_cpu_s=broker_cpu, cpu_us_per_msg=broker_cpu / received * 1e6,
        broker_cpu_pct=100.0 * broker_cpu / window,
        publisher_cpu_pct=pub_pct, subscriber_cpu_pct=sub_pct,
        load_saturated=max(pub_busy, sub_busy) >= SATURATED_CPU_PCT,
        latency_p50_ms=sub_counters[load.S_LAT_P50_US] / 1000 if latency_n else None,
        latency_p99_ms=sub_counters[load.S_LAT_P99_US] / 1000 if latency_n else None,
        auth_service_cpu_us_per_msg=(max(service_cpu_after - service_cpu_before, 0.0) / received * 1e6
                                     if auth_service else None),
        callouts=counts.authenticate + counts.authorize if counts else None,
        auth_decisions=counts.decisions if counts and counts.decisions else None,
        # Polygate: one authenticate per connection (its key holds the client id), one authorize
        # per (identity, action, topic): the subscription and the publishers' topic.
        expected_callouts=options.publishers + 1 + 2 if counts and counts.decisions else None)


# ---- the whole benchmark ----

def _find(measurements: Sequence[Measurement], broker: str, cell: tuple[int, int, int]) -> Measurement | None:
    return next((m for m in measurements if m.broker == broker and m.cell == cell), None)


#: The baselines every row is compared with, in the table and in the ratios.
BASELINES = (peers.POLYGATE_NONE, peers.MOSQUITTO, mqtt_lineup.RABBITMQ_MQTT)
RATIO_PAIRS = (
    *((gateway, baseline) for gateway in WARM_CALLOUT for baseline in BASELINES),
    (peers.POLYGATE_LOCAL, peers.MOSQUITTO),
    (peers.POLYGATE_LOCAL, peers.AMQTT),
    (peers.POLYGATE_LOCAL, peers.POLYGATE_NONE),
    (peers.POLYGATE_ACL, peers.POLYGATE_LOCAL),
    (mqtt_lineup.POLYGATE_GRPC_TTL0, peers.POLYGATE_NONE),
    (mqtt_lineup.POLYGATE_HTTP_TTL0, peers.POLYGATE_NONE),
    (peers.POLYGATE_NONE, peers.MOSQUITTO),
    (peers.AMQTT, peers.MOSQUITTO),
    (mqtt_lineup.RABBITMQ_MQTT, peers.MOSQUITTO),
)


def _cells(measurements: Sequence[Measurement]) -> list[tuple[int, int, int]]:
    return sorted({m.cell for m in measurements})


def compute_ratios(measurements: Sequence[Measurement], qos_levels: Sequence[int] = (0, 1)) -> list[Ratio]:
    ratios = []
    for cell in _cells(measurements):
        qos, size, publishers = cell
        if qos not in qos_levels:
            continue
        for numerator, denominator in RATIO_PAIRS:
            top, bottom = _find(measurements, numerator, cell), _find(measurements, denominator, cell)
            if top and bottom and bottom.cpu_us_per_msg > 0:
                ratios.append(Ratio(name=f"{numerator}/{denominator}", qos=qos, size=size, publishers=publishers,
                                    value=top.cpu_us_per_msg / bottom.cpu_us_per_msg))
    return ratios


def _cell_text(cell: tuple[int, int, int]) -> str:
    qos, size, publishers = cell
    return f"QoS {qos}, {size} B, {publishers} pub"


def _ratio_target(measurements: Sequence[Measurement], cell: tuple[int, int, int], name: str, baseline: str,
                  limit: float, *, at_most: bool = True) -> Target:
    """`name`'s CPU per message over `baseline`'s in one cell, held to `limit`."""
    if at_most:
        description = f"{_cell_text(cell)}: {name} CPU/msg <= {limit:g}x {baseline}'s"
    else:
        description = f"{_cell_text(cell)}: {name} CPU/msg >= {limit:g}x below {baseline}'s"
    top, bottom = _find(measurements, name, cell), _find(measurements, baseline, cell)
    if not top or not bottom or top.cpu_us_per_msg <= 0 or bottom.cpu_us_per_msg <= 0:
        return Target(description=description, met=None, detail=f"{name} or {baseline} not measured")
    ratio = top.cpu_us_per_msg / bottom.cpu_us_per_msg
    if at_most:
        return Target(description=description, met=ratio <= limit + RATIO_EPSILON,
                      detail=f"{top.cpu_us_per_msg:.1f} vs {bottom.cpu_us_per_msg:.1f} µs = {ratio:.2f}x")
    return Target(description=description, met=1 / ratio >= limit - RATIO_EPSILON,
                  detail=f"{bottom.cpu_us_per_msg:.1f} vs {top.cpu_us_per_msg:.1f} µs = {1 / ratio:.1f}x below")


def _callout_target(measurements: Sequence[Measurement], cell: tuple[int, int, int], name: str) -> Target:
    description = f"{_cell_text(cell)}: {name} callouts = distinct identities and topics"
    m = _find(measurements, name, cell)
    if not m or m.callouts is None or m.expected_callouts is None:
        return Target(description=description, met=None, detail=f"{name} callouts not counted")
    per_10k = 10_000 * m.callouts / m.auth_decisions if m.auth_decisions else 0.0
    return Target(description=description, met=m.callouts <= m.expected_callouts,
                  detail=f"{m.callouts} callouts for {m.auth_decisions:,} auth decisions ({per_10k:.1f} per 10,000); "
                         f"{m.expected_callouts} distinct ({m.publishers + 1} connections + subscribe + publish)")


def evaluate_targets(measurements: Sequence[Measurement], brokers: Sequence[str] | None = None) -> list[Target]:
    """Every target the issues name, in each QoS 1 cell measured (none measured: the 100 B, 1-publisher cell).

    With `brokers` (those the run was asked for), targets about brokers nobody asked for are left out.
    """

    def asked(*names: str) -> bool:
        return brokers is None or all(name in brokers for name in names)

    targets: list[Target] = []
    cells = [cell for cell in _cells(measurements) if cell[0] == TARGET_QOS] or [(TARGET_QOS, 100, 1)]
    for cell in cells:
        if asked(peers.POLYGATE_LOCAL, peers.MOSQUITTO):
            targets.append(_ratio_target(measurements, cell, peers.POLYGATE_LOCAL, peers.MOSQUITTO,
                                         TARGET_MAX_VS_MOSQUITTO))
        if asked(peers.POLYGATE_LOCAL, peers.AMQTT):
            targets.append(_ratio_target(measurements, cell, peers.POLYGATE_LOCAL, peers.AMQTT,
                                         TARGET_MIN_BELOW_AMQTT, at_most=False))
        for gateway in WARM_CALLOUT:
            for baseline, limit in ((peers.MOSQUITTO, TARGET_CALLOUT_MAX_VS_MOSQUITTO),
                                    (mqtt_lineup.RABBITMQ_MQTT, TARGET_CALLOUT_MAX_VS_RABBITMQ),
                                    (peers.POLYGATE_NONE, TARGET_CALLOUT_MAX_VS_NONE)):
                if asked(gateway, baseline):
                    targets.append(_ratio_target(measurements, cell, gateway, baseline, limit))
            if asked(gateway):
                targets.append(_callout_target(measurements, cell, gateway))
    return targets


def run(options: BenchOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> BenchReport:
    """Start each broker in turn, measure it in every cell, stop it; never leaves a process behind.

    `keep_dir` keeps each broker's working files (config, database, log) there instead of in a
    temporary directory removed at the end.
    """
    machine = machine_info()
    versions = {"paho-mqtt": peers.package_version("paho-mqtt"), "psutil": peers.package_version("psutil"),
                "uvloop": peers.package_version("uvloop")}
    measurements: list[Measurement] = []
    skipped: list[Skipped] = []
    cells = options.cells()
    with tempfile.TemporaryDirectory(prefix="polygate-bench-") as tmp:
        root = Path(tmp) if keep_dir is None else keep_dir
        root.mkdir(parents=True, exist_ok=True)
        with mqtt_lineup.lineup(root, setup=options.setup) as brokers:
            for name in options.brokers:
                log(f"starting {name} ...")
                try:
                    started = brokers.start(name)
                except peers.BrokerUnavailable as exc:
                    log(f"skipping {name}: {exc}")
                    skipped.append(Skipped(broker=name, qos=None, reason=str(exc)))
                    continue
                try:
                    versions[name] = started.broker.version
                    for cell in cells:
                        for qos in options.qos_levels:
                            result = _measure_cell(started, qos, cell, skipped, log)
                            if result is not None:
                                measurements.append(result)
                finally:
                    started.broker.stop()
    return BenchReport(options=options, machine=machine, versions=versions, measurements=measurements,
                       skipped=skipped, ratios=compute_ratios(measurements, options.qos_levels),
                       targets=evaluate_targets(measurements, options.brokers))


def _measure_cell(started: mqtt_lineup.Started, qos: int, cell: BenchOptions, skipped: list[Skipped],
                  log: Callable[[str], None]) -> Measurement | None:
    name = started.broker.name
    where = f"{name} {_cell_text((qos, cell.size, cell.publishers))}"
    log(f"  {where}: warming up and measuring ...")
    try:
        result = measure(started.broker, qos, cell, auth_service=started.auth_service,
                         callout_counts=started.callout_counts)
    except (RunFailed, peers.BrokerUnavailable) as exc:
        log(f"  {where} failed: {exc}")
        skipped.append(Skipped(broker=name, qos=qos, size=cell.size, publishers=cell.publishers, reason=str(exc)))
        return None
    log(f"  {where}: {result.received} delivered, {result.msgs_per_s:,.0f} msg/s, "
        f"{result.cpu_us_per_msg:.1f} µs CPU/msg")
    return result


# ---- output ----

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _vs(m: Measurement, measurements: Sequence[Measurement], baseline: str) -> str:
    other = _find(measurements, baseline, m.cell)
    if other is None or other.cpu_us_per_msg <= 0 or m.broker == baseline:
        return ""
    return f"{m.cpu_us_per_msg / other.cpu_us_per_msg:.2f}x"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], left: Sequence[int] = (0,)) -> list[str]:
    """Columns padded to their widest cell; the `left` ones left-aligned, the rest right-aligned."""
    everything = [tuple(header), *(tuple(row) for row in rows)]
    widths = [max(len(row[i]) for row in everything) for i in range(len(header))]
    lines = []
    for index, row in enumerate(everything):
        lines.append("  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    return lines


def format_report(report: BenchReport) -> str:
    options, machine = report.options, report.machine
    if options.client == load.CLIENT_PAHO:
        client = f"paho-mqtt {report.versions.get('paho-mqtt', '?')} (CallbackAPIVersion.VERSION2)"
    else:
        client = f"raw (bench.load's own blocking-socket client, {options.batch} packet(s) per write)"
    lines = [
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"load: publisher processes (one connection each) + 1 subscriber process, client {client}; "
        f"{options.messages} measured messages per run (cap {options.seconds:g} s) after "
        f"{options.warmup_messages} warm-up; QoS 1 window {options.inflight} per publisher",
        "CPU µs/msg: the broker's process tree per delivered message; auth µs/msg: the reference auth "
        "service's, apart; vs-columns: CPU/msg over that baseline's in the same cell",
    ]
    header = ("broker", "qos", "size", "pubs", "msgs/s", "p50 ms", "p99 ms", "CPU µs/msg", "auth µs/msg",
              "vs none", "vs mosquitto", "vs rabbitmq", "callouts", "lost", "note")
    for cell in _cells(report.measurements):
        rows = []
        for m in (m for m in report.measurements if m.cell == cell):
            rows.append((m.broker, str(m.qos), str(m.size), str(m.publishers), f"{m.msgs_per_s:,.0f}",
                         _ms(m.latency_p50_ms), _ms(m.latency_p99_ms), f"{m.cpu_us_per_msg:.1f}",
                         "" if m.auth_service_cpu_us_per_msg is None else f"{m.auth_service_cpu_us_per_msg:.1f}",
                         _vs(m, report.measurements, peers.POLYGATE_NONE),
                         _vs(m, report.measurements, peers.MOSQUITTO),
                         _vs(m, report.measurements, mqtt_lineup.RABBITMQ_MQTT),
                         "" if m.callouts is None else f"{m.callouts}/{m.auth_decisions or '-'}",
                         str(m.lost), "load-bound" if m.load_saturated else ""))
        lines += ["", f"{_cell_text(cell)}:"] + format_table(header, rows, left=(0, 14))
    if any(m.load_saturated for m in report.measurements):
        lines.append(f"load-bound: a publisher or the subscriber used >= {SATURATED_CPU_PCT:.0f}% of a CPU while "
                     "messages flowed, so msgs/s there is the load side's limit, not the broker's")
    if any(m.callouts is not None for m in report.measurements):
        lines.append("callouts: callouts made / auth decisions taken (connects, subscribes, publishes), "
                     "warm-up included, from the gateway's /metrics; rabbitmq-mqtt: the calls the auth service "
                     "counted (its decisions are not exported)")
    lines += ["", "targets:"]
    lines += target_lines(report.targets)
    if report.skipped:
        lines += ["", "skipped:"]
        for skip in report.skipped:
            where = skip.broker
            if skip.qos is not None:
                where += f" QoS {skip.qos}"
            if skip.size is not None:
                where += f", {skip.size} B, {skip.publishers} pub"
            reason = skip.reason.replace("\n", "\n      ")
            lines.append(f"  {where}: {reason}")
    return "\n".join(lines)



def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in csv_items(text))


def parse_args(argv: Sequence[str]) -> tuple[BenchOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench mqtt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--messages", type=int, default=50_000,
                        help="measured messages per run, split across publishers (default 50000)")
    parser.add_argument("--qos", default="0,1", help="QoS levels, e.g. 0,1 (default)")
    parser.add_argument("--size", default="100", help="payload bytes, one or more: e.g. 100,4096 (default 100)")
    parser.add_argument("--publishers", default="1",
                        help="publisher processes, one or more: e.g. 1,50 (default 1)")
    parser.add_argument("--matrix", action="store_true",
                        help="the issue's matrix: --size 100,4096 --publishers 1,50 (QoS from --qos)")
    parser.add_argument("--brokers", default=",".join(DEFAULT_BROKERS),
                        help=f"comma-separated, from {', '.join(mqtt_lineup.NAMES)} (default: %(default)s)")
    parser.add_argument("--acl-user", action="store_true",
                        help=f"also run {peers.POLYGATE_ACL}: local provider, a non-superuser with an ACL")
    parser.add_argument("--client", choices=load.CLIENTS, default=load.CLIENT_RAW,
                        help="load client: raw (default; bench.load's lean socket client) or paho (paho-mqtt 2.x)")
    parser.add_argument("--inflight", type=int, default=100, help="QoS 1 publish window (default 100)")
    parser.add_argument("--batch", type=int, default=1,
                        help="raw client: packets gathered per write (default 1: one write per packet)")
    parser.add_argument("--qos0-lead", type=int, default=1_000,
                        help="QoS 0: most messages a publisher may run ahead of the subscriber (0: unpaced)")
    parser.add_argument("--warmup-messages", type=int, default=2_000, help="warm-up messages (default 2000)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="cap on the warm-up (default 2)")
    parser.add_argument("--setup", action="store_true",
                        help="install missing peers (apt-get install mosquitto mosquitto-clients rabbitmq-server; "
                             "pip install amqtt)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each broker's config, database and log under DIR (default: a temp dir, removed)")
    args = parser.parse_args(list(argv))
    brokers = list(csv_items(args.brokers))
    if args.acl_user and peers.POLYGATE_ACL not in brokers:
        brokers.insert(brokers.index(peers.POLYGATE_LOCAL) + 1 if peers.POLYGATE_LOCAL in brokers else 0,
                       peers.POLYGATE_ACL)
    try:
        sizes = (100, 4096) if args.matrix else _ints(args.size)
        publisher_counts = (1, 50) if args.matrix else _ints(args.publishers)
        options = BenchOptions(
            brokers=tuple(brokers), qos_levels=_ints(args.qos), messages=args.messages, seconds=args.seconds,
            size=sizes[0], publishers=publisher_counts[0], sizes=sizes, publisher_counts=publisher_counts,
            warmup_messages=args.warmup_messages, warmup_seconds=args.warmup_seconds, client=args.client,
            inflight=args.inflight, batch=args.batch, qos0_lead=args.qos0_lead, setup=args.setup)
    except (ValueError, IndexError) as exc:
        parser.error(str(exc) or "--size and --publishers need at least one value")
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.measurements), started="every broker and load process was",
    )
