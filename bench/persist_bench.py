"""`python -m bench persist`: what the durable store costs, Polygate beside Mosquitto and RabbitMQ with persistence.

Three parts, one run, every ratio between figures of that run:
- throughput: QoS 1 publish -> a persistent-session subscriber (clean
  session 0, subscribed at QoS 1, connected and acking), 100 B payloads, 1
  and 50 publishers (bench mqtt's load: bench.load's raw client, forkserver
  worker processes), through Polygate with `storage.backend: sqlite` (fsync
  batch) and with `memory`, Mosquitto with `persistence true`, and RabbitMQ's
  MQTT plugin (the subscriber's messages in a durable queue, QoS 1 messages
  persistent, PUBACK after the publisher confirm). msgs/s, p50/p99 end-to-end
  latency, and broker CPU (its process tree, psutil) per delivered message;
  for Polygate's store also the messages written and the commits.
- fsync: the same flow through Polygate at `storage.fsync` always, batch and never.
- rss: an offline persistent session (subscribed at QoS 1, disconnected)
  receives 100,000 QoS 1 messages of 100 B; the broker's RSS increase (its
  process tree), beside Mosquitto's; then the session reconnects and the
  messages delivered to it are counted.

Polygate runs with provider `none` (Mosquitto and RabbitMQ authenticate no
one here either: anonymous / guest) and `limits.max_queued_messages`
1,000,000, as Mosquitto's `max_queued_messages`. Each broker is started
fresh for each part and round; `--rounds` repeats the flow parts with the
broker order rotated, and the tables give the median (and min-max).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import secrets
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from bench import load, mqtt_bench, peers
from bench.entry import bench_main, csv_items, target_lines
from bench.mqtt_bench import Target

POLYGATE_SQLITE = "polygate-sqlite"
POLYGATE_MEMORY = "polygate-memory"
MOSQUITTO_PERSIST = "mosquitto-persist"
RABBITMQ_DURABLE = "rabbitmq-durable"
BROKERS = (POLYGATE_SQLITE, POLYGATE_MEMORY, MOSQUITTO_PERSIST, RABBITMQ_DURABLE)
RSS_BROKERS = (POLYGATE_SQLITE, POLYGATE_MEMORY, MOSQUITTO_PERSIST)
FSYNC_MODES = ("always", "batch", "never")
PARTS = ("throughput", "fsync", "rss")
#: Polygate's storage per broker name: (backend, fsync).
POLYGATE_STORAGE: dict[str, tuple[str, str]] = {
    POLYGATE_SQLITE: ("sqlite", "batch"),
    POLYGATE_MEMORY: ("memory", "batch"),
    **{f"polygate-fsync-{mode}": ("sqlite", mode) for mode in FSYNC_MODES},
}
ALL_NAMES = (*BROKERS, *(name for name in POLYGATE_STORAGE if name not in BROKERS))

QOS = 1
#: As Mosquitto's max_queued_messages in bench.peers: no queue bound is reached in any part.
MAX_QUEUED = 1_000_000
#: The RSS figure is given per this many queued messages.
RSS_PER = 100_000
TARGET_MAX_VS_MOSQUITTO = 1.5
TARGET_MAX_VS_RABBITMQ = 0.5
TARGET_MAX_VS_MEMORY = 1.3
RSS_SETTLE_S = 5.0          # RSS is read once two readings 0.25 s apart agree within 0.5%
DRAIN_IDLE_S = 3.0          # reconnected session: no message for this long ends the count
PUBLISH_DEADLINE_S = 300.0

METRIC_COMMITS = "polygate_store_commits_total"
METRIC_WRITTEN = "polygate_store_messages_written_total"
METRIC_SKIPPED = "polygate_store_writes_skipped_total"
METRIC_QUEUED = "polygate_queued_messages"


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistOptions:
    parts: tuple[str, ...] = PARTS
    brokers: tuple[str, ...] = BROKERS
    rss_brokers: tuple[str, ...] = RSS_BROKERS
    fsync_modes: tuple[str, ...] = FSYNC_MODES
    publisher_counts: tuple[int, ...] = (1, 50)
    fsync_publisher_counts: tuple[int, ...] = (1,)
    size: int = 100
    messages: int = 50_000
    seconds: float = 10.0
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0
    rounds: int = 3
    queued_messages: int = RSS_PER
    inflight: int = 100
    setup: bool = False

    def __post_init__(self) -> None:
        if not self.parts or any(part not in PARTS for part in self.parts):
            raise ValueError(f"--parts takes some of {', '.join(PARTS)}")
        for names, known in ((self.brokers, BROKERS), (self.rss_brokers, BROKERS)):
            unknown = [name for name in names if name not in known]
            if unknown:
                raise ValueError(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        if any(mode not in FSYNC_MODES for mode in self.fsync_modes):
            raise ValueError(f"--fsync takes some of {', '.join(FSYNC_MODES)}")
        if min(self.messages, self.rounds, self.queued_messages, self.inflight, self.size,
               *self.publisher_counts, *self.fsync_publisher_counts) < 1 or self.seconds <= 0:
            raise ValueError("--messages, --rounds, --queued, --publishers, --size and --seconds must be positive")

    def cell(self, publishers: int) -> mqtt_bench.BenchOptions:
        return mqtt_bench.BenchOptions(
            brokers=(peers.POLYGATE_NONE,), qos_levels=(QOS,), messages=self.messages, seconds=self.seconds,
            size=self.size, publishers=publishers, warmup_messages=self.warmup_messages,
            warmup_seconds=self.warmup_seconds, inflight=self.inflight)


QUICK = dict(rounds=1, messages=2_000, seconds=1.0, warmup_messages=200, warmup_seconds=1.0, publisher_counts=(1,),
             queued_messages=2_000)


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRun:
    """One measured window of the persistent-session flow through one broker."""

    part: str
    round: int
    measurement: mqtt_bench.Measurement
    #: Polygate with a durable store: deltas of its /metrics over the run (warm-up included).
    store_commits: int | None = None
    store_written: int | None = None
    store_skipped: int | None = None
    #: Messages published over the run, warm-up included: what the store counters are divided by.
    published: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class FlowRow:
    """The median of a broker's rounds in one part and cell."""

    part: str
    broker: str
    publishers: int
    size: int
    rounds: int
    msgs_per_s: float
    cpu_us_per_msg: float
    cpu_min: float
    cpu_max: float
    p50_ms: float | None
    p99_ms: float | None
    lost: int
    load_bound: bool
    #: Messages written to the store / delivered (the rest were acknowledged before their batch was written).
    written_per_msg: float | None = None
    msgs_per_commit: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class RssRun:
    broker: str
    messages: int              # published and acknowledged into the offline session
    rss_before_mb: float
    rss_after_mb: float
    mb_per_100k: float
    publish_msgs_per_s: float
    delivered: int             # to the session once it reconnected
    drain_msgs_per_s: float
    #: Polygate: where the queued messages were (polygate_queued_messages).
    in_memory: int | None = None
    in_store: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    part: str
    broker: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PersistReport:
    options: PersistOptions
    machine: dict[str, Any]
    loadavg_end: list[float]
    versions: dict[str, str]
    runs: list[FlowRun] = field(default_factory=list)
    rows: list[FlowRow] = field(default_factory=list)
    rss: list[RssRun] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the brokers ----

def polygate_yaml(workdir: Path, backend: str, fsync: str) -> str:
    """Provider none, the storage asked for, and no queue bound reached."""
    if backend == "memory":
        storage = "storage: {backend: memory}\n"
    else:
        storage = f"storage: {{backend: sqlite, path: \"{workdir / 'data'}\", fsync: {fsync}}}\n"
    return f"auth: {{provider: none}}\n{storage}limits: {{max_queued_messages: {MAX_QUEUED}}}\n"


def start_broker(name: str, workdir: Path, *, setup: bool) -> peers.RunningBroker:
    """Start `name` fresh in `workdir`; raises peers.BrokerUnavailable with the reason."""
    workdir.mkdir(parents=True, exist_ok=True)
    if name in POLYGATE_STORAGE:
        backend, fsync = POLYGATE_STORAGE[name]
        return peers.start_gateway(name, workdir, auth_yaml=polygate_yaml(workdir, backend, fsync), credentials=None,
                                   health=True)
    if name == MOSQUITTO_PERSIST:
        broker = peers.start_mosquitto(workdir, setup=setup, persistence=True)
        broker.name = name
        return broker
    if name == RABBITMQ_DURABLE:
        # Imported here: bench.rabbitmq imports bench.auth_bench, which imports bench.mqtt_bench's importers.
        from bench import rabbitmq

        return rabbitmq.start_rabbitmq_mqtt_guest(workdir, setup=setup, name=name)
    raise ValueError(f"unknown broker {name!r}")


def read_metrics(broker: peers.RunningBroker) -> dict[str, float]:
    """The store and queue figures of a Polygate's /metrics ({} for a broker without them)."""
    if broker.health_port is None:
        return {}
    from prometheus_client.parser import text_string_to_metric_families

    figures: dict[str, float] = {}
    for family in text_string_to_metric_families(peers.fetch_metrics(broker.health_port)):
        for sample in family.samples:
            if sample.name in (METRIC_COMMITS, METRIC_WRITTEN, METRIC_SKIPPED):
                figures[sample.name] = sample.value
            elif sample.name == METRIC_QUEUED:
                figures[f"{METRIC_QUEUED}:{sample.labels.get('where')}"] = sample.value
    return figures


def _delta(after: dict[str, float], before: dict[str, float], name: str) -> int | None:
    if name not in after:
        return None
    return int(after[name] - before.get(name, 0.0))


def rss_bytes(pid: int) -> int:
    total = 0
    for process in peers.process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def stable_rss(pid: int, deadline_s: float = RSS_SETTLE_S) -> int:
    """The RSS once two readings 0.25 s apart agree within 0.5% (or the last one at the deadline)."""
    deadline = time.monotonic() + deadline_s
    last = rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(0.25)
        now = rss_bytes(pid)
        if abs(now - last) <= 0.005 * max(last, 1):
            return now
        last = now
    return last


# ---- parts 1 and 2: the persistent-session flow ----

def _flow(name: str, part: str, round_no: int, root: Path, options: PersistOptions, publisher_counts: Sequence[int],
          skipped: list[Skipped], log: Callable[[str], None]) -> list[FlowRun]:
    workdir = root / part / f"r{round_no}" / name
    log(f"[{part} round {round_no}] starting {name} ...")
    try:
        broker = start_broker(name, workdir, setup=options.setup)
    except peers.BrokerUnavailable as exc:
        log(f"  skipping {name}: {exc}")
        skipped.append(Skipped(part=part, broker=name, reason=str(exc)))
        return []
    runs = []
    try:
        for publishers in publisher_counts:
            where = f"{name} QoS 1, {options.size} B, {publishers} pub, persistent subscriber"
            log(f"  {where}: warming up and measuring ...")
            try:
                before = read_metrics(broker)
                measurement = mqtt_bench.measure(broker, QOS, options.cell(publishers), clean_subscriber=False)
                after = read_metrics(broker)
            except (mqtt_bench.RunFailed, peers.BrokerUnavailable) as exc:
                log(f"  {where} failed: {exc}")
                skipped.append(Skipped(part=part, broker=f"{name} ({publishers} pub)", reason=str(exc)))
                continue
            runs.append(FlowRun(part=part, round=round_no, measurement=measurement,
                                store_commits=_delta(after, before, METRIC_COMMITS),
                                store_written=_delta(after, before, METRIC_WRITTEN),
                                store_skipped=_delta(after, before, METRIC_SKIPPED),
                                published=measurement.sent + _warm_sent(options, publishers)))
            log(f"  {where}: {measurement.received} delivered, {measurement.msgs_per_s:,.0f} msg/s, "
                f"{measurement.cpu_us_per_msg:.1f} µs CPU/msg")
    finally:
        broker.stop()
    return runs


def _rotated(names: Sequence[str], round_no: int) -> list[str]:
    shift = round_no % len(names) if names else 0
    return [*names[shift:], *names[:shift]]


def summarise(runs: Sequence[FlowRun]) -> list[FlowRow]:
    """One row per (part, broker, publishers): the median of its rounds."""
    groups: dict[tuple[str, str, int], list[FlowRun]] = {}
    for run in runs:
        m = run.measurement
        groups.setdefault((run.part, m.broker, m.publishers), []).append(run)
    rows = []
    for (part, broker, publishers), group in groups.items():
        ms = [run.measurement for run in group]
        cpus = [m.cpu_us_per_msg for m in ms]
        p50s = [m.latency_p50_ms for m in ms if m.latency_p50_ms is not None]
        p99s = [m.latency_p99_ms for m in ms if m.latency_p99_ms is not None]
        written = [(run.store_written, run.published) for run in group if run.store_written is not None]
        commits = [(run.store_commits, run.published) for run in group if run.store_commits]
        rows.append(FlowRow(
            part=part, broker=broker, publishers=publishers, size=ms[0].size, rounds=len(ms),
            msgs_per_s=statistics.median(m.msgs_per_s for m in ms), cpu_us_per_msg=statistics.median(cpus),
            cpu_min=min(cpus), cpu_max=max(cpus),
            p50_ms=statistics.median(p50s) if p50s else None, p99_ms=statistics.median(p99s) if p99s else None,
            lost=max(m.lost for m in ms), load_bound=any(m.load_saturated for m in ms),
            written_per_msg=statistics.median(w / n for w, n in written) if written else None,
            msgs_per_commit=statistics.median(n / c for c, n in commits) if commits else None))
    return rows


def _warm_sent(options: PersistOptions, publishers: int) -> int:
    """bench mqtt's warm-up: `warmup_messages` split across the publishers (at least one each)."""
    if not options.warmup_messages:
        return 0
    return max(options.warmup_messages // publishers, 1) * publishers


def _find(rows: Sequence[FlowRow], part: str, broker: str, publishers: int) -> FlowRow | None:
    return next((r for r in rows if r.part == part and r.broker == broker and r.publishers == publishers), None)


def _ratio_target(rows: Sequence[FlowRow], publishers: int, name: str, baseline: str, limit: float,
                  what: str) -> Target:
    description = (f"QoS 1, 100 B, {publishers} pub, persistent subscriber: {name} CPU/msg <= {limit:g}x "
                   f"{baseline}'s ({what})")
    top, bottom = _find(rows, "throughput", name, publishers), _find(rows, "throughput", baseline, publishers)
    if not top or not bottom or bottom.cpu_us_per_msg <= 0:
        return Target(description=description, met=None, detail=f"{name} or {baseline} not measured")
    ratio = top.cpu_us_per_msg / bottom.cpu_us_per_msg
    return Target(description=description, met=ratio <= limit + mqtt_bench.RATIO_EPSILON,
                  detail=f"{top.cpu_us_per_msg:.1f} vs {bottom.cpu_us_per_msg:.1f} µs = {ratio:.2f}x")


def evaluate_targets(rows: Sequence[FlowRow], options: PersistOptions) -> list[Target]:
    if "throughput" not in options.parts or POLYGATE_SQLITE not in options.brokers:
        return []
    targets = []
    for publishers in options.publisher_counts:
        for baseline, limit, what in ((MOSQUITTO_PERSIST, TARGET_MAX_VS_MOSQUITTO, "Mosquitto with persistence"),
                                      (RABBITMQ_DURABLE, TARGET_MAX_VS_RABBITMQ, "RabbitMQ durable + confirms"),
                                      (POLYGATE_MEMORY, TARGET_MAX_VS_MEMORY, "the store costs at most 30%")):
            if baseline in options.brokers:
                targets.append(_ratio_target(rows, publishers, POLYGATE_SQLITE, baseline, limit, what))
    return targets


# ---- part 3: RSS of an offline persistent session's queue ----

def _subscribe_and_leave(broker: peers.RunningBroker, client_id: str, topic: str) -> None:
    config = _config(broker, client_id, topic, clean=False)
    client = load.RawClient(config)
    try:
        client.sock.sendall(load.subscribe_packet(1, topic, QOS))
        _, suback = client.expect(0x90)
        if suback[2] == 0x80:
            raise mqtt_bench.RunFailed(f"{broker.name} refused the subscription to {topic!r}")
    finally:
        client.close()


def _config(broker: peers.RunningBroker, client_id: str, topic: str, *, clean: bool, messages: int = 0,
            inflight: int = 100) -> load.LoadConfig:
    creds = broker.credentials
    return load.LoadConfig(host="127.0.0.1", port=broker.port, client=load.CLIENT_RAW, client_id=client_id,
                           topic=topic, qos=QOS, size=100, messages=messages, seconds=PUBLISH_DEADLINE_S,
                           inflight=inflight, clean_session=clean,
                           username=creds.username if creds else None, password=creds.password if creds else None)


def _publish(broker: peers.RunningBroker, client_id: str, topic: str, messages: int, inflight: int) -> tuple[int, float]:
    """Publish `messages` QoS 1 messages with `inflight` unacknowledged at most; (acknowledged, seconds)."""
    config = _config(broker, client_id, topic, clean=True, messages=messages, inflight=inflight)
    counters = [0.0] * load.PUBLISHER_SLOTS
    client = load.RawClient(config)
    try:
        started = time.monotonic()
        phase = load._Phase(count=messages, seconds=PUBLISH_DEADLINE_S, **load.MEASURE_PHASE)
        load._raw_publish(client, config, phase, counters, [0.0] * load.SUBSCRIBER_SLOTS)
        return int(counters[load.P_ACKED]), time.monotonic() - started
    finally:
        client.close()


def _drain(broker: peers.RunningBroker, client_id: str, topic: str, expected: int) -> tuple[int, float]:
    """Reconnect the persistent session, acknowledge what it is sent; (measured messages delivered, seconds).

    Its own connect: a broker sends the queued messages right behind the CONNACK, in the same read.
    """
    config = _config(broker, client_id, topic, clean=False)
    reader = load.PacketReader()
    count = 0
    with socket.create_connection(("127.0.0.1", broker.port), timeout=load.CONNECT_TIMEOUT_S) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(load.connect_packet(client_id, config.username, config.password, clean=False))
        sock.settimeout(0.2)
        started = last = time.monotonic()
        while count < expected and time.monotonic() - last < DRAIN_IDLE_S:
            try:
                data = sock.recv(262144)
            except TimeoutError:
                continue
            if not data:
                raise load.LoadError(f"{client_id}: {broker.name} closed the connection while draining")
            last = time.monotonic()
            acks = []
            for header, body in reader.feed(data):
                if header & 0xF0 == 0x20 and body[1] != 0:
                    raise load.LoadError(f"{client_id}: CONNACK return code {body[1]} on reconnect")
                if header & 0xF0 != 0x30:
                    continue
                offset = 2 + ((body[0] << 8) | body[1])
                if header & 0x06:
                    acks.append(b"\x40\x02" + body[offset:offset + 2])
                    offset += 2
                if body[offset] == load.MEASURE:
                    count += 1
            if acks:
                sock.sendall(b"".join(acks))
        elapsed = max(last - started, 1e-9)
        try:
            sock.sendall(b"\xe0\x00")
        except OSError:
            pass
    return count, elapsed


def measure_rss(name: str, root: Path, options: PersistOptions, skipped: list[Skipped],
                log: Callable[[str], None]) -> RssRun | None:
    workdir = root / "rss" / name
    log(f"[rss] starting {name} ...")
    try:
        broker = start_broker(name, workdir, setup=options.setup)
    except peers.BrokerUnavailable as exc:
        log(f"  skipping {name}: {exc}")
        skipped.append(Skipped(part="rss", broker=name, reason=str(exc)))
        return None
    run_id = secrets.token_hex(4)
    topic, sub_id = f"{peers.BENCH_TOPIC_ROOT}/{run_id}/offline", f"bench-offline-{run_id}"
    try:
        _subscribe_and_leave(broker, sub_id, topic)
        time.sleep(0.5)
        before = stable_rss(broker.pid)
        log(f"  {name}: publishing {options.queued_messages:,} QoS 1 messages to an offline persistent session ...")
        acked, publish_s = _publish(broker, f"bench-pub-{run_id}", topic, options.queued_messages, options.inflight)
        if acked < options.queued_messages:
            raise mqtt_bench.RunFailed(f"{acked} of {options.queued_messages} publishes acknowledged")
        time.sleep(1.0)
        after = stable_rss(broker.pid)
        metrics = read_metrics(broker)
        delivered, drain_s = _drain(broker, sub_id, topic, options.queued_messages)
    except (mqtt_bench.RunFailed, peers.BrokerUnavailable, load.LoadError, OSError) as exc:
        log(f"  {name} failed: {exc}")
        skipped.append(Skipped(part="rss", broker=name, reason=f"{exc}\n{broker.log_tail()}".strip()))
        return None
    finally:
        broker.stop()
    in_memory, in_store = metrics.get(f"{METRIC_QUEUED}:memory"), metrics.get(f"{METRIC_QUEUED}:store")
    result = RssRun(
        broker=name, messages=acked, rss_before_mb=before / 1e6, rss_after_mb=after / 1e6,
        mb_per_100k=(after - before) / 1e6 * RSS_PER / acked, publish_msgs_per_s=acked / publish_s,
        delivered=delivered, drain_msgs_per_s=delivered / drain_s,
        in_memory=None if in_memory is None else int(in_memory), in_store=None if in_store is None else int(in_store))
    log(f"  {name}: RSS {result.rss_before_mb:.1f} -> {result.rss_after_mb:.1f} MB "
        f"({result.mb_per_100k:.1f} MB per {RSS_PER:,}); {delivered:,} delivered on reconnect")
    return result


# ---- the whole benchmark ----

def run(options: PersistOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> PersistReport:
    machine = mqtt_bench.machine_info()
    versions = {"psutil": peers.package_version("psutil"), "uvloop": peers.package_version("uvloop"),
                "polygate": peers.polygate_version()}
    if peers.mosquitto_path():
        versions["mosquitto"] = peers.mosquitto_version(peers.mosquitto_path() or "")
    runs: list[FlowRun] = []
    rss: list[RssRun] = []
    skipped: list[Skipped] = []
    fsync_names = [f"polygate-fsync-{mode}" for mode in options.fsync_modes]
    with tempfile.TemporaryDirectory(prefix="polygate-persist-") as tmp:
        root = Path(tmp) if keep_dir is None else keep_dir
        root.mkdir(parents=True, exist_ok=True)
        unavailable: set[str] = set()

        def flow(name: str, part: str, round_no: int, counts: Sequence[int]) -> None:
            if name in unavailable:
                return
            before = len(skipped)
            runs.extend(_flow(name, part, round_no, root, options, counts, skipped, log))
            # A broker that cannot start (not installed) is not tried again in later rounds.
            if any(s.broker == name for s in skipped[before:]):
                unavailable.add(name)

        for round_no in range(1, options.rounds + 1):
            if "throughput" in options.parts:
                for name in _rotated(options.brokers, round_no - 1):
                    flow(name, "throughput", round_no, options.publisher_counts)
            if "fsync" in options.parts:
                for name in _rotated(fsync_names, round_no - 1):
                    flow(name, "fsync", round_no, options.fsync_publisher_counts)
        if "rss" in options.parts:
            for name in options.rss_brokers:
                result = measure_rss(name, root, options, skipped, log)
                if result is not None:
                    rss.append(result)
    for run_ in runs:
        versions.setdefault(run_.measurement.broker, "")
    versions = {k: v for k, v in versions.items() if v}
    rows = summarise(runs)
    return PersistReport(options=options, machine=machine, loadavg_end=list(os.getloadavg()), versions=versions,
                         runs=runs, rows=rows, rss=rss, skipped=skipped, targets=evaluate_targets(rows, options))


# ---- output ----

def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _vs(row: FlowRow, rows: Sequence[FlowRow], baseline: str) -> str:
    other = _find(rows, row.part, baseline, row.publishers)
    if other is None or other.cpu_us_per_msg <= 0 or row.broker == baseline:
        return ""
    return f"{row.cpu_us_per_msg / other.cpu_us_per_msg:.2f}x"


def _cpu(row: FlowRow) -> str:
    if row.rounds == 1:
        return f"{row.cpu_us_per_msg:.1f}"
    return f"{row.cpu_us_per_msg:.1f} ({row.cpu_min:.1f}-{row.cpu_max:.1f})"


def format_report(report: PersistReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}; load average at start {', '.join(f'{v:.2f}' for v in machine['loadavg'])}, "
        f"at end {', '.join(f'{v:.2f}' for v in report.loadavg_end)}",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"flow: QoS 1, {options.size} B payloads, publisher processes (raw client, window {options.inflight}) -> 1 "
        f"subscriber process with a persistent session (clean session 0, subscribed at QoS 1, PUBACK per message); "
        f"{options.messages:,} measured messages per run (cap {options.seconds:g} s) after "
        f"{options.warmup_messages:,} warm-up; median of {options.rounds} round(s), (min-max) of CPU/msg",
        "polygate-*: provider none, limits.max_queued_messages 1,000,000; polygate-sqlite: storage sqlite, fsync batch; "
        "polygate-memory: storage memory; mosquitto-persist: persistence true (database in the workdir, autosave "
        "at its defaults), max_queued_messages 1,000,000; rabbitmq-durable: RabbitMQ's MQTT plugin as guest "
        "(durable queue for the session, QoS 1 published persistent, PUBACK after the confirm)",
    ]
    flow_header = ("broker", "pubs", "msgs/s", "p50 ms", "p99 ms", "CPU µs/msg", "vs memory", "vs mosquitto",
                   "vs rabbitmq", "written/msg", "msgs/commit", "lost", "note")
    throughput = [r for r in report.rows if r.part == "throughput"]
    for publishers in sorted({r.publishers for r in throughput}):
        rows = [(r.broker, str(r.publishers), f"{r.msgs_per_s:,.0f}", _opt(r.p50_ms, ".2f"), _opt(r.p99_ms, ".2f"),
                 _cpu(r), _vs(r, report.rows, POLYGATE_MEMORY), _vs(r, report.rows, MOSQUITTO_PERSIST),
                 _vs(r, report.rows, RABBITMQ_DURABLE), _opt(r.written_per_msg, ".2f"),
                 _opt(r.msgs_per_commit, ".1f"), str(r.lost), "load-bound" if r.load_bound else "")
                for name in options.brokers for r in throughput if r.broker == name and r.publishers == publishers]
        lines += ["", f"1. throughput: QoS 1 -> persistent session, {options.size} B, {publishers} publisher(s):"]
        lines += mqtt_bench.format_table(flow_header, rows, left=(0, 12))
    fsync_rows = [r for r in report.rows if r.part == "fsync"]
    if fsync_rows:
        header = ("storage.fsync", "pubs", "msgs/s", "vs batch msgs/s", "p50 ms", "p99 ms", "CPU µs/msg",
                  "written/msg", "msgs/commit", "lost", "note")
        fsync_table: list[tuple[str, ...]] = []
        for r in sorted(fsync_rows, key=lambda r: (r.publishers, FSYNC_MODES.index(r.broker.rsplit("-", 1)[1]))):
            batch = _find(report.rows, "fsync", "polygate-fsync-batch", r.publishers)
            fsync_table.append((r.broker.rsplit("-", 1)[1], str(r.publishers), f"{r.msgs_per_s:,.0f}",
                                f"{r.msgs_per_s / batch.msgs_per_s:.2f}x" if batch and batch.msgs_per_s else "",
                                _opt(r.p50_ms, ".2f"), _opt(r.p99_ms, ".2f"), _cpu(r),
                                _opt(r.written_per_msg, ".2f"), _opt(r.msgs_per_commit, ".1f"), str(r.lost),
                                "load-bound" if r.load_bound else ""))
        lines += ["", f"2. fsync: polygate storage sqlite, the same flow ({options.size} B, QoS 1, persistent session):"]
        lines += mqtt_bench.format_table(header, fsync_table, left=(0, 10))
    if report.rss:
        header = ("broker", "queued", "RSS before MB", "RSS after MB", f"MB per {RSS_PER:,}", "B/msg", "vs mosquitto",
                  "in memory / store", "publish msgs/s", "delivered", "drain msgs/s")
        mosquitto = next((r for r in report.rss if r.broker == MOSQUITTO_PERSIST), None)
        rss_table: list[tuple[str, ...]] = []
        for q in report.rss:
            where = "" if q.in_memory is None else f"{q.in_memory:,} / {q.in_store or 0:,}"
            vs = (f"{q.mb_per_100k / mosquitto.mb_per_100k:.2f}x"
                  if mosquitto and mosquitto.mb_per_100k > 0 and q is not mosquitto else "")
            rss_table.append((q.broker, f"{q.messages:,}", f"{q.rss_before_mb:.1f}", f"{q.rss_after_mb:.1f}",
                              f"{q.mb_per_100k:.1f}", f"{q.mb_per_100k * 1e6 / RSS_PER:.0f}", vs, where,
                              f"{q.publish_msgs_per_s:,.0f}", f"{q.delivered:,}", f"{q.drain_msgs_per_s:,.0f}"))
        lines += ["", f"3. rss: an offline persistent session (QoS 1) receives {options.queued_messages:,} QoS 1 "
                      f"messages of 100 B; the broker's RSS (process tree) before and after, scaled to {RSS_PER:,}:"]
        lines += mqtt_bench.format_table(header, rss_table)
        lines.append("in memory / store: Polygate's polygate_queued_messages (a durable queue keeps "
                     "10,000 in memory and pages the rest out to the store); delivered: measured messages the "
                     "session received once it reconnected")
    lines.append("written/msg: messages Polygate wrote to its store per message (warm-up included; the rest were "
                 "acknowledged by the subscriber before their batch was written); msgs/commit: messages per store "
                 "commit")
    if any(r.load_bound for r in report.rows):
        lines.append(f"load-bound: a publisher or the subscriber used >= {mqtt_bench.SATURATED_CPU_PCT:.0f}% of a CPU "
                     "while messages flowed, so msgs/s there is the load side's limit, not the broker's")
    lines += ["", "targets:"]
    lines += target_lines(report.targets)
    if report.skipped:
        lines += ["", "skipped:"]
        for skip in report.skipped:
            reason = skip.reason.replace("\n", "\n      ")
            lines.append(f"  [{skip.part}] {skip.broker}: {reason}")
    return "\n".join(lines)



def parse_args(argv: Sequence[str]) -> tuple[PersistOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench persist", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="throughput part (default: %(default)s)")
    parser.add_argument("--rss-brokers", default=",".join(RSS_BROKERS), help="rss part (default: %(default)s)")
    parser.add_argument("--fsync", default=",".join(FSYNC_MODES), help="fsync part (default: %(default)s)")
    parser.add_argument("--publishers", default="1,50", help="throughput part (default: %(default)s)")
    parser.add_argument("--fsync-publishers", default="1", help="fsync part (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=50_000, help="measured messages per run (default 50000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the flow parts (default 3)")
    parser.add_argument("--queued", type=int, default=RSS_PER, help="rss part: messages queued (default 100000)")
    parser.add_argument("--quick", action="store_true", help="about a second per part: a smoke run, not figures")
    parser.add_argument("--setup", action="store_true",
                        help="install missing peers (apt-get install mosquitto mosquitto-clients rabbitmq-server)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each broker's config, data and log under DIR")
    args = parser.parse_args(list(argv))
    try:
        values: dict[str, Any] = dict(
            parts=csv_items(args.parts), brokers=csv_items(args.brokers), rss_brokers=csv_items(args.rss_brokers),
            fsync_modes=csv_items(args.fsync), publisher_counts=tuple(int(p) for p in csv_items(args.publishers)),
            fsync_publisher_counts=tuple(int(p) for p in csv_items(args.fsync_publishers)), messages=args.messages,
            seconds=args.seconds, rounds=args.rounds, queued_messages=args.queued, setup=args.setup)
        if args.quick:
            values.update(QUICK)
        options = PersistOptions(**values)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def quick_options(**overrides: Any) -> PersistOptions:
    """The `--quick` sizes (bench all --quick and the smoke test)."""
    return PersistOptions(**{**QUICK, **overrides})


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.rows or report.rss), started="every broker and load process was",
    )
