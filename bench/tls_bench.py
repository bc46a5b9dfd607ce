"""`python -m bench tls`: MQTT over TLS, Polygate beside Mosquitto with TLS, in one run.

Two parts, every ratio between figures of that run:
- throughput: QoS 1 publish -> subscribe over TLS (bench mqtt's raw client,
  its socket wrapped by Python's ssl with the default client context: TLS 1.3
  here), 100 B and 4 KB payloads, 1 publisher: msgs/s, p50/p99 latency and
  the broker's CPU per delivered message (its process tree, psutil).
- storm: `--clients` clients (default 2,000) open TLS connections and send
  CONNECT at once, from `--workers` processes, every handshake of a worker in
  flight at once: time from the start to the last CONNACK, CONNACK latency
  p50/p99 (TLS handshake included), the broker's CPU per connection.

Both brokers use the same server certificate (ECDSA P-256, signed by a CA
made for the run, for "localhost"); Polygate runs with provider `none` and
Mosquitto anonymous, so neither checks a password: what is measured is MQTT
over TLS. Target (issue 19): Polygate's CPU per message over TLS at most 1.2x
Mosquitto's. Each broker is started fresh for each part and round;
`--rounds` repeats with the order rotated, the tables give the median (and
min-max).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import connections, load, mqtt_bench, peers
from bench.entry import bench_main, csv_items, target_lines
from bench.mqtt_bench import Target

POLYGATE_TLS = "polygate-tls"
MOSQUITTO_TLS = "mosquitto-tls"
BROKERS = (POLYGATE_TLS, MOSQUITTO_TLS)
THROUGHPUT, STORM = "throughput", "storm"
PARTS = (THROUGHPUT, STORM)
QOS = 1
TARGET_MAX_VS_MOSQUITTO = 1.2
#: Descriptors beyond the storm's sockets, for the broker's listeners, files and the load's pipes.
FD_HEADROOM = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSOptions:
    parts: tuple[str, ...] = PARTS
    brokers: tuple[str, ...] = BROKERS
    sizes: tuple[int, ...] = (100, 4096)
    messages: int = 50_000
    seconds: float = 10.0
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0
    rounds: int = 3
    clients: int = 2_000
    workers: int = 4
    setup: bool = False

    def __post_init__(self) -> None:
        if not self.parts or any(part not in PARTS for part in self.parts):
            raise ValueError(f"--parts takes some of {', '.join(PARTS)}")
        unknown = [name for name in self.brokers if name not in BROKERS]
        if unknown or not self.brokers:
            raise ValueError(f"--brokers takes some of {', '.join(BROKERS)}")
        if min(self.messages, self.rounds, self.clients, self.workers, *self.sizes) < 1 or self.seconds <= 0:
            raise ValueError("--messages, --rounds, --clients, --workers, --size and --seconds must be positive")

    def cell(self, size: int) -> mqtt_bench.BenchOptions:
        return mqtt_bench.BenchOptions(
            brokers=(peers.POLYGATE_NONE,), qos_levels=(QOS,), messages=self.messages, seconds=self.seconds,
            size=size, publishers=1, warmup_messages=self.warmup_messages, warmup_seconds=self.warmup_seconds)


QUICK = dict(rounds=1, messages=2_000, seconds=1.0, warmup_messages=200, warmup_seconds=1.0, sizes=(100,),
             clients=50, workers=2)


@dataclass(frozen=True, slots=True, kw_only=True)
class ThroughputRun:
    round: int
    measurement: mqtt_bench.Measurement


@dataclass(frozen=True, slots=True, kw_only=True)
class StormRun:
    round: int
    broker: str
    clients: int
    connected: int
    refused: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float
    cpu_ms_per_connect: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Row:
    """The median of a broker's rounds in one part and cell."""

    part: str
    broker: str
    size: int | None
    rounds: int
    cpu: float          # throughput: µs per message; storm: ms per connection
    cpu_min: float
    cpu_max: float
    rate: float         # throughput: msgs/s; storm: connections/s
    p50_ms: float | None
    p99_ms: float | None
    lost: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSReport:
    options: TLSOptions
    machine: dict[str, Any]
    loadavg_end: list[float]
    versions: dict[str, str]
    throughput: list[ThroughputRun] = field(default_factory=list)
    storms: list[StormRun] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def make_certificates(directory: Path) -> peers.TLSFiles:
    """A CA and a server certificate for "localhost" and 127.0.0.1 (`polygate gen-cert`'s own code)."""
    from gateway import certs

    certs.generate(directory, hosts=("localhost", "127.0.0.1"), clients=())
    return peers.TLSFiles(cert=directory / "server.pem", key=directory / "server-key.pem", ca=directory / "ca.pem")


def start_broker(name: str, workdir: Path, tls: peers.TLSFiles, *, setup: bool) -> peers.RunningBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    if name == POLYGATE_TLS:
        broker = peers.start_polygate(peers.POLYGATE_NONE, workdir, tls=tls)
    else:
        broker = peers.start_mosquitto(workdir, setup=setup, tls=tls)
    broker.name = name
    return broker


def storm(broker: peers.RunningBroker, options: TLSOptions, round_number: int) -> StormRun:
    run_id = f"tls-storm-{round_number}-{broker.name}"
    client_ids = tuple(f"{run_id}-{i}" for i in range(options.clients))
    plans = [connections.ConnectPlan(host="127.0.0.1", port=broker.port, client_ids=ids, tls_ca=broker.tls_ca,
                                     sources=connections.loopback_sources(worker, len(ids)))
             for worker, ids in enumerate(connections.split(client_ids, options.workers))]
    cpu_before = broker.cpu_seconds()
    with connections.held_connections(broker, plans) as opened:
        cpu = broker.cpu_seconds() - cpu_before
    latencies = sorted(opened.latencies)
    return StormRun(
        round=round_number, broker=broker.name, clients=options.clients, connected=opened.connected,
        refused=opened.refused, elapsed_s=opened.elapsed_s,
        p50_ms=_percentile(latencies, 0.50) * 1e3, p99_ms=_percentile(latencies, 0.99) * 1e3,
        cpu_ms_per_connect=cpu / max(opened.connected, 1) * 1e3)


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else 0.0


def run(options: TLSOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> TLSReport:
    machine = mqtt_bench.machine_info()
    # The storm's sockets in the worker processes, and the broker's, which inherits this limit.
    connections.raise_nofile_limit(options.clients + FD_HEADROOM)
    throughput: list[ThroughputRun] = []
    storms: list[StormRun] = []
    skipped: list[str] = []
    versions: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="polygate-tls-bench-") as tmp:
        root = keep_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        tls = make_certificates(root / "certs")
        for round_number in range(1, options.rounds + 1):
            shift = (round_number - 1) % len(options.brokers)
            order = options.brokers[shift:] + options.brokers[:shift]
            for part in options.parts:
                for name in order:
                    workdir = root / f"r{round_number}" / part / name
                    log(f"[{part} round {round_number}] starting {name} ...")
                    try:
                        broker = start_broker(name, workdir, tls, setup=options.setup)
                    except peers.BrokerUnavailable as exc:
                        skipped.append(f"{name}: {exc}")
                        log(f"  {name} skipped: {exc}")
                        continue
                    try:
                        versions[name] = broker.version
                        if part == THROUGHPUT:
                            for size in options.sizes:
                                measurement = mqtt_bench.measure(broker, QOS, options.cell(size))
                                throughput.append(ThroughputRun(round=round_number, measurement=measurement))
                                log(f"  {name} QoS 1 {size} B over TLS: {measurement.msgs_per_s:,.0f} msg/s, "
                                    f"{measurement.cpu_us_per_msg:.1f} µs CPU/msg")
                        else:
                            result = storm(broker, options, round_number)
                            storms.append(result)
                            log(f"  {name}: {result.connected} TLS connects in {result.elapsed_s:.2f} s, "
                                f"{result.cpu_ms_per_connect:.2f} ms CPU each")
                    except (mqtt_bench.RunFailed, peers.BrokerUnavailable, load.LoadError, OSError) as exc:
                        skipped.append(f"{name} ({part}, round {round_number}): {exc}\n{broker.log_tail()}")
                        log(f"  {name} failed: {exc}")
                    finally:
                        broker.stop()
    rows = summarize(throughput, storms)
    return TLSReport(options=options, machine=machine, loadavg_end=list(os.getloadavg()),
                     versions=versions, throughput=throughput, storms=storms, rows=rows, skipped=skipped,
                     targets=evaluate_targets(rows))


def summarize(throughput: Sequence[ThroughputRun], storms: Sequence[StormRun]) -> list[Row]:
    rows: list[Row] = []
    cells = sorted({(r.measurement.broker, r.measurement.size) for r in throughput},
                   key=lambda cell: (cell[1], BROKERS.index(cell[0])))
    for broker, size in cells:
        ms = [r.measurement for r in throughput if (r.measurement.broker, r.measurement.size) == (broker, size)]
        cpus = [m.cpu_us_per_msg for m in ms]
        p50s = [m.latency_p50_ms for m in ms if m.latency_p50_ms is not None]
        p99s = [m.latency_p99_ms for m in ms if m.latency_p99_ms is not None]
        rows.append(Row(part=THROUGHPUT, broker=broker, size=size, rounds=len(ms), cpu=statistics.median(cpus),
                        cpu_min=min(cpus), cpu_max=max(cpus), rate=statistics.median(m.msgs_per_s for m in ms),
                        p50_ms=statistics.median(p50s) if p50s else None,
                        p99_ms=statistics.median(p99s) if p99s else None, lost=sum(m.lost for m in ms)))
    for broker in sorted({s.broker for s in storms}, key=BROKERS.index):
        runs = [s for s in storms if s.broker == broker]
        cpus = [s.cpu_ms_per_connect for s in runs]
        rows.append(Row(part=STORM, broker=broker, size=None, rounds=len(runs), cpu=statistics.median(cpus),
                        cpu_min=min(cpus), cpu_max=max(cpus),
                        rate=statistics.median(s.connected / max(s.elapsed_s, 1e-9) for s in runs),
                        p50_ms=statistics.median(s.p50_ms for s in runs),
                        p99_ms=statistics.median(s.p99_ms for s in runs),
                        lost=sum(s.clients - s.connected for s in runs)))
    return rows


def evaluate_targets(rows: Sequence[Row]) -> list[Target]:
    targets = []
    for row in rows:
        if row.part != THROUGHPUT or row.broker != POLYGATE_TLS:
            continue
        description = (f"QoS 1, {row.size} B over TLS: Polygate CPU/msg <= {TARGET_MAX_VS_MOSQUITTO:g}x "
                       "Mosquitto's with TLS")
        peer = next((r for r in rows if (r.part, r.broker, r.size) == (THROUGHPUT, MOSQUITTO_TLS, row.size)), None)
        if peer is None:
            targets.append(Target(description=description, met=None, detail="Mosquitto not measured"))
            continue
        ratio = row.cpu / peer.cpu
        targets.append(Target(description=description,
                              met=ratio <= TARGET_MAX_VS_MOSQUITTO + mqtt_bench.RATIO_EPSILON,
                              detail=f"{row.cpu:.1f} vs {peer.cpu:.1f} µs = {ratio:.2f}x"))
    return targets


def format_report(report: TLSReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        mqtt_bench.machine_line(machine, report.loadavg_end),
        "versions: " + ", ".join(f"{name} {version}" for name, version in sorted(report.versions.items())),
        f"polygate-tls: provider none, server.tcp.tls; mosquitto-tls: a TLS listener, anonymous; one server "
        f"certificate for both; {options.rounds} round(s), broker order rotated, median (min-max)",
        "",
    ]
    throughput = [r for r in report.rows if r.part == THROUGHPUT]
    if throughput:
        lines.append(f"1. throughput: QoS 1 publish -> subscribe over TLS, 1 publisher (raw client, window 100), "
                     f"{options.messages:,} measured messages per run after {options.warmup_messages:,} warm-up:")
        header = ("broker", "size", "msgs/s", "p50 ms", "p99 ms", "CPU µs/msg", "(min-max)", "vs mosquitto", "lost")
        table = []
        for row in throughput:
            peer = next((r for r in throughput if r.broker == MOSQUITTO_TLS and r.size == row.size), None)
            vs = f"{row.cpu / peer.cpu:.2f}x" if peer is not None and row.broker != MOSQUITTO_TLS else ""
            table.append((row.broker, str(row.size), f"{row.rate:,.0f}", _ms(row.p50_ms), _ms(row.p99_ms),
                          f"{row.cpu:.1f}", f"({row.cpu_min:.1f}-{row.cpu_max:.1f})", vs, str(row.lost)))
        lines += mqtt_bench.format_table(header, table) + [""]
    storm_rows = [r for r in report.rows if r.part == STORM]
    if storm_rows:
        lines.append(f"2. storm: {options.clients:,} clients open TLS connections and CONNECT at once "
                     f"({options.workers} worker processes):")
        header = ("broker", "connects/s", "CONNACK p50 ms", "p99 ms", "CPU ms/connect", "(min-max)", "vs mosquitto",
                  "not connected")
        peer = next((r for r in storm_rows if r.broker == MOSQUITTO_TLS), None)
        table = [(row.broker, f"{row.rate:,.0f}", _ms(row.p50_ms), _ms(row.p99_ms), f"{row.cpu:.2f}",
                  f"({row.cpu_min:.2f}-{row.cpu_max:.2f})",
                  f"{row.cpu / peer.cpu:.2f}x" if peer is not None and row.broker != MOSQUITTO_TLS else "",
                  str(row.lost)) for row in storm_rows]
        lines += mqtt_bench.format_table(header, table) + [""]
    lines += ["targets:"] + target_lines(report.targets)
    if report.skipped:
        lines += ["", "skipped:"] + [f"  {reason}" for reason in report.skipped]
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def parse_args(argv: Sequence[str]) -> tuple[TLSOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench tls", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="default: %(default)s")
    parser.add_argument("--size", default="100,4096", help="throughput payload sizes (default: %(default)s)")
    parser.add_argument("--messages", type=int, default=50_000, help="measured messages per run (default 50000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--rounds", type=int, default=3, help="default 3")
    parser.add_argument("--clients", type=int, default=2_000, help="storm clients (default 2000)")
    parser.add_argument("--workers", type=int, default=4, help="storm worker processes (default 4)")
    parser.add_argument("--quick", action="store_true", help="one short round: a smoke run, not figures")
    parser.add_argument("--setup", action="store_true", help="install Mosquitto when missing (apt-get)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep certificates, configs and logs under DIR")
    args = parser.parse_args(list(argv))
    try:
        given: dict[str, Any] = dict(
            parts=csv_items(args.parts), brokers=csv_items(args.brokers),
            sizes=tuple(int(s) for s in csv_items(args.size)), messages=args.messages, seconds=args.seconds,
            rounds=args.rounds, clients=args.clients, workers=args.workers, setup=args.setup)
        if args.quick:
            given.update(QUICK)
        options = TLSOptions(**given)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.throughput or report.storms),
        started="every broker and load process was",
    )
