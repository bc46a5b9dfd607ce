"""`python -m bench mqtt`: broker CPU per delivered message, Polygate against its peers.

Each broker is started on a free loopback port and driven by the same load:
publisher and subscriber processes (bench.load), a warm-up, then a measured
window. Broker CPU (user + sys, from psutil) is sampled right before and after
the window and divided by the messages delivered in it. Ratios compare brokers
measured in the same run only, so the machine's speed cancels out.
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

from bench.entry import bench_main
from bench import load, peers

DEFAULT_BROKERS = (peers.POLYGATE_LOCAL, peers.POLYGATE_NONE, peers.MOSQUITTO, peers.AMQTT)
SATURATED_CPU_PCT = 90.0   # a load process this busy may be what limits the rate
# Targets named by the issue, at QoS 1 with the local provider and warm caches.
TARGET_QOS = 1
TARGET_MAX_VS_MOSQUITTO = 1.5
TARGET_MIN_BELOW_AMQTT = 10.0

READY_DEADLINE_S = 20.0
WARM_DRAIN_DEADLINE_S = 20.0
SETTLE_S = 1.0             # no new delivery for this long: the rest is lost
POLL_S = 0.01


@dataclass(frozen=True, slots=True, kw_only=True)
class BenchOptions:
    brokers: tuple[str, ...] = DEFAULT_BROKERS
    qos_levels: tuple[int, ...] = (0, 1)
    messages: int = 50_000          # measured messages per run (split across publishers)
    seconds: float = 10.0           # cap on the measured publishing time per run
    size: int = 100
    publishers: int = 1
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0
    client: str = load.CLIENT_RAW
    inflight: int = 100
    batch: int = 1
    qos0_lead: int = 1_000
    setup: bool = False

    def __post_init__(self) -> None:
        unknown = [name for name in self.brokers if name not in peers.BROKER_NAMES]
        if unknown:
            raise ValueError(f"unknown broker(s) {', '.join(unknown)}; choose from {', '.join(peers.BROKER_NAMES)}")
        if not self.brokers:
            raise ValueError("name at least one broker")
        if not self.qos_levels or any(qos not in (0, 1) for qos in self.qos_levels):
            raise ValueError("--qos takes 0 and/or 1")
        if self.client not in load.CLIENTS:
            raise ValueError(f"--client must be one of {', '.join(load.CLIENTS)}")
        if min(self.messages, self.publishers, self.inflight, self.batch) < 1 or self.seconds <= 0:
            raise ValueError("--messages, --publishers, --inflight, --batch and --seconds must be positive")
        if self.qos0_lead < 0:
            raise ValueError("--qos0-lead cannot be negative (0 turns QoS 0 pacing off)")
        if self.size < 1:
            raise ValueError("--size must be at least 1 byte (the first byte marks warm-up vs measured)")
        if self.warmup_messages < 0 or self.warmup_seconds < 0:
            raise ValueError("warm-up count and time cannot be negative")


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


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    broker: str
    qos: int | None
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ratio:
    name: str
    qos: int
    value: float


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
    }


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


def measure(broker: peers.RunningBroker, qos: int, options: BenchOptions) -> Measurement:
    """Drive one running broker at one QoS and return the figures of the measured window."""
    ctx = multiprocessing.get_context("spawn")
    run_id = secrets.token_hex(4)
    topic = f"{peers.BENCH_TOPIC_ROOT}/{run_id}/q{qos}"
    creds = broker.credentials
    base = {
        "host": "127.0.0.1", "port": broker.port, "client": options.client, "topic": topic, "qos": qos,
        "size": options.size, "inflight": options.inflight, "batch": options.batch,
        "qos0_lead": options.qos0_lead, "publishers": options.publishers,
        "username": creds.username if creds else None, "password": creds.password if creds else None,
    }
    per_publisher = [options.messages // options.publishers + (1 if i < options.messages % options.publishers else 0)
                     for i in range(options.publishers)]
    warm_per_publisher = max(options.warmup_messages // options.publishers, 0)
    errors = ctx.Queue()
    stop, go_warm, go_measure = ctx.Event(), ctx.Event(), ctx.Event()
    sub_counters = ctx.RawArray("d", load.SUBSCRIBER_SLOTS)
    pub_counters = [ctx.RawArray("d", load.PUBLISHER_SLOTS) for _ in range(options.publishers)]
    sub_config = load.LoadConfig(client_id=f"bench-sub-{run_id}", **base)
    pub_configs = [
        load.LoadConfig(client_id=f"bench-pub{i}-{run_id}", warmup_messages=warm_per_publisher,
                        warmup_seconds=options.warmup_seconds, messages=count, seconds=options.seconds, **base)
        for i, count in enumerate(per_publisher)]

    sub_target = (load.subscriber_main, (sub_config, sub_counters, stop, errors))
    pub_targets = [(load.publisher_main, (config, counters, sub_counters, go_warm, go_measure, stop, errors))
                   for config, counters in zip(pub_configs, pub_counters)]
    # All start at once (each spawn costs a Python start-up); publishers send nothing before go_warm.
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
        pub_cpu_before, sub_cpu_before = cpu_of(pubs), cpu_of(subs)
        t_before = time.monotonic()
        go_measure.set()
        poll_until(lambda: all(c[load.P_DONE] == 1 for c in pub_counters),
                    options.seconds + load.ACK_DRAIN_S + 10, "publishing", errors, everyone, broker)
        sent = int(sum(c[load.P_SENT] for c in pub_counters))
        wait_settled(lambda: sub_counters[load.S_COUNT], sent, options.seconds + 30, errors, everyone)
        t_after = time.monotonic()
        broker_cpu_after = broker.cpu_seconds()
        pub_cpu_after, sub_cpu_after = cpu_of(pubs), cpu_of(subs)
        received = int(sub_counters[load.S_COUNT])
        first, last = sub_counters[load.S_FIRST], sub_counters[load.S_LAST]
        raise_worker_errors(errors, [])

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
        broker=broker.name, qos=qos, sent=sent, received=received, lost=sent - received,
        window_s=window, delivery_s=delivery,
        msgs_per_s=received / delivery if received > 1 else 0.0,
        broker_cpu_s=broker_cpu, cpu_us_per_msg=broker_cpu / received * 1e6,
        broker_cpu_pct=100.0 * broker_cpu / window,
        publisher_cpu_pct=pub_pct, subscriber_cpu_pct=sub_pct,
        load_saturated=max(pub_busy, sub_busy) >= SATURATED_CPU_PCT)


# ---- the whole benchmark ----

def _find(measurements: list[Measurement], broker: str, qos: int) -> Measurement | None:
    return next((m for m in measurements if m.broker == broker and m.qos == qos), None)


RATIO_PAIRS = (
    (peers.POLYGATE_LOCAL, peers.MOSQUITTO),
    (peers.POLYGATE_LOCAL, peers.AMQTT),
    (peers.POLYGATE_LOCAL, peers.POLYGATE_NONE),
    (peers.POLYGATE_ACL, peers.POLYGATE_LOCAL),
    (peers.POLYGATE_NONE, peers.MOSQUITTO),
    (peers.AMQTT, peers.MOSQUITTO),
)


def compute_ratios(measurements: list[Measurement], qos_levels: Sequence[int]) -> list[Ratio]:
    ratios = []
    for qos in qos_levels:
        for numerator, denominator in RATIO_PAIRS:
            top, bottom = _find(measurements, numerator, qos), _find(measurements, denominator, qos)
            if top and bottom and bottom.cpu_us_per_msg > 0:
                ratios.append(Ratio(name=f"{numerator}/{denominator}", qos=qos,
                                    value=top.cpu_us_per_msg / bottom.cpu_us_per_msg))
    return ratios


def evaluate_targets(measurements: list[Measurement]) -> list[Target]:
    polygate = _find(measurements, peers.POLYGATE_LOCAL, TARGET_QOS)
    mosquitto = _find(measurements, peers.MOSQUITTO, TARGET_QOS)
    amqtt = _find(measurements, peers.AMQTT, TARGET_QOS)
    targets = []
    description = (f"QoS {TARGET_QOS}: polygate (local) CPU/msg <= {TARGET_MAX_VS_MOSQUITTO}x mosquitto's")
    if polygate and mosquitto:
        ratio = polygate.cpu_us_per_msg / mosquitto.cpu_us_per_msg
        targets.append(Target(description=description, met=ratio <= TARGET_MAX_VS_MOSQUITTO,
                              detail=f"{polygate.cpu_us_per_msg:.1f} vs {mosquitto.cpu_us_per_msg:.1f} µs "
                                     f"= {ratio:.2f}x"))
    else:
        targets.append(Target(description=description, met=None, detail="polygate or mosquitto not measured"))
    description = f"QoS {TARGET_QOS}: polygate (local) CPU/msg >= {TARGET_MIN_BELOW_AMQTT:.0f}x below amqtt's"
    if polygate and amqtt:
        factor = amqtt.cpu_us_per_msg / polygate.cpu_us_per_msg
        targets.append(Target(description=description, met=factor >= TARGET_MIN_BELOW_AMQTT,
                              detail=f"{amqtt.cpu_us_per_msg:.1f} vs {polygate.cpu_us_per_msg:.1f} µs "
                                     f"= {factor:.1f}x below"))
    else:
        targets.append(Target(description=description, met=None, detail="polygate or amqtt not measured"))
    return targets


def run(options: BenchOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> BenchReport:
    """Start each broker in turn, measure it at each QoS, stop it; never leaves a process behind.

    `keep_dir` keeps each broker's working files (config, database, log) there instead of in a
    temporary directory removed at the end.
    """
    machine = machine_info()
    versions = {"paho-mqtt": peers.package_version("paho-mqtt"), "psutil": peers.package_version("psutil")}
    measurements: list[Measurement] = []
    skipped: list[Skipped] = []
    with tempfile.TemporaryDirectory(prefix="polygate-bench-") as tmp:
        root = Path(tmp) if keep_dir is None else keep_dir
        for name in options.brokers:
            workdir = root / name
            workdir.mkdir(parents=True, exist_ok=keep_dir is None)
            log(f"starting {name} ...")
            try:
                broker = peers.start_broker(name, workdir, setup=options.setup)
            except peers.BrokerUnavailable as exc:
                log(f"skipping {name}: {exc}")
                skipped.append(Skipped(broker=name, qos=None, reason=str(exc)))
                continue
            try:
                versions[name] = broker.version
                for qos in options.qos_levels:
                    log(f"  {name} QoS {qos}: warming up and measuring ...")
                    try:
                        result = measure(broker, qos, options)
                    except RunFailed as exc:
                        log(f"  {name} QoS {qos} failed: {exc}")
                        skipped.append(Skipped(broker=name, qos=qos, reason=str(exc)))
                        continue
                    measurements.append(result)
                    log(f"  {name} QoS {qos}: {result.received} delivered, {result.msgs_per_s:,.0f} msg/s, "
                        f"{result.cpu_us_per_msg:.1f} µs CPU/msg")
            finally:
                broker.stop()
    return BenchReport(options=options, machine=machine, versions=versions, measurements=measurements,
                       skipped=skipped, ratios=compute_ratios(measurements, options.qos_levels),
                       targets=evaluate_targets(measurements))


# ---- output ----

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
        f"load: {options.publishers} publisher process(es) + 1 subscriber process, client {client}; "
        f"{options.size}-byte payloads, {options.messages} measured messages (cap {options.seconds:g} s) after "
        f"{options.warmup_messages} warm-up, QoS 1 window {options.inflight}",
        "",
    ]
    header = ("broker", "qos", "sent", "received", "lost", "msgs/s", "CPU µs/msg", "broker CPU%",
              "pub CPU%", "sub CPU%", "note")
    rows = [header]
    for m in report.measurements:
        rows.append((m.broker, str(m.qos), str(m.sent), str(m.received), str(m.lost), f"{m.msgs_per_s:,.0f}",
                     f"{m.cpu_us_per_msg:.1f}", f"{m.broker_cpu_pct:.0f}", f"{m.publisher_cpu_pct:.0f}",
                     f"{m.subscriber_cpu_pct:.0f}", "load-bound" if m.load_saturated else ""))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) if i in (0, 10) else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    if any(m.load_saturated for m in report.measurements):
        lines.append(f"load-bound: a publisher or the subscriber used >= {SATURATED_CPU_PCT:.0f}% of a CPU while "
                     "messages flowed, so msgs/s there is the load side's limit, not the broker's")
    if report.ratios:
        lines += ["", "CPU-per-message ratios (same run):"]
        lines += [f"  QoS {r.qos}  {r.name:<28} {r.value:6.2f}x" for r in report.ratios]
    lines += ["", "targets:"]
    for target in report.targets:
        verdict = {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[target.met]
        lines.append(f"  [{verdict}] {target.description}: {target.detail}")
    if report.skipped:
        lines += ["", "skipped:"]
        for skip in report.skipped:
            where = skip.broker if skip.qos is None else f"{skip.broker} QoS {skip.qos}"
            reason = skip.reason.replace("\n", "\n      ")
            lines.append(f"  {where}: {reason}")
    return "\n".join(lines)


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_args(argv: Sequence[str]) -> tuple[BenchOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench mqtt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--messages", type=int, default=50_000,
                        help="measured messages per run, split across publishers (default 50000)")
    parser.add_argument("--qos", default="0,1", help="QoS levels, e.g. 0,1 (default)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes (default 1)")
    parser.add_argument("--brokers", default=",".join(DEFAULT_BROKERS),
                        help=f"comma-separated, from {', '.join(peers.BROKER_NAMES)} (default: %(default)s)")
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
                        help="install missing peers (apt-get install mosquitto; pip install amqtt)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep each broker's config, database and log under DIR (default: a temp dir, removed)")
    args = parser.parse_args(list(argv))
    brokers = _csv(args.brokers)
    if args.acl_user and peers.POLYGATE_ACL not in brokers:
        brokers.insert(brokers.index(peers.POLYGATE_LOCAL) + 1 if peers.POLYGATE_LOCAL in brokers else 0,
                       peers.POLYGATE_ACL)
    try:
        qos_levels = tuple(int(q) for q in _csv(args.qos))
        options = BenchOptions(
            brokers=tuple(brokers), qos_levels=qos_levels, messages=args.messages, seconds=args.seconds,
            size=args.size, publishers=args.publishers, warmup_messages=args.warmup_messages,
            warmup_seconds=args.warmup_seconds, client=args.client, inflight=args.inflight, batch=args.batch,
            qos0_lead=args.qos0_lead, setup=args.setup)
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
