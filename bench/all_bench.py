"""`python -m bench all`: every benchmark, one after the other, in one run; one report, one JSON file.

The parts, each also runnable alone (`python -m bench <part> --help`):
- mqtt: the publish -> subscribe matrix (QoS 0/1, 100 B/4 KB, 1/50
  publishers) through Polygate with every provider and through the peers;
- auth: warm and cold callout auth against provider `none`, median of rounds;
- storm: 2,000 clients connecting at once with callout auth, beside RabbitMQ;
- authpath: the dispatcher alone: cache hit, miss, coalesced misses;
- memory: RSS per idle MQTT connection at 1,000 and 10,000, beside Mosquitto;
- latency: one message at a time across every pair of protocols;
- amqp: AMQP 0.9.1 publisher confirms, beside RabbitMQ;
- persist: QoS 1 to a persistent session with the store on and off, beside
  Mosquitto and RabbitMQ with persistence; fsync modes; RSS of queued messages.

Parts run one at a time so that none measures another's load. A part that
fails is reported as failed and the rest still run. The report ends with
every target the issues name, met or not, each a ratio from this run.
`--quick` runs each part for about a second (the smoke test uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.entry import Log, log_to_stderr, target_lines, terminate_on_sigterm
from bench import (amqp_bench, auth_bench, authpath_bench, latency_bench, memory_bench, mqtt_bench, mqtt_lineup,
                   peers, persist_bench, storm_bench, tls_bench)

DEFAULT_JSON = Path("bench-results.json")
PARTS = ("mqtt", "auth", "storm", "authpath", "memory", "latency", "amqp", "persist", "tls")
TARGET_IDLE_KB = 16.0


@dataclass(frozen=True, slots=True)
class Part:
    """How `bench all` runs one benchmark: measure, then its report text and its figures."""

    name: str
    measure: Callable[[Log], Any]
    report: Callable[[Any], str]
    figures: Callable[[Any], Any]
    targets: Callable[[Any], list[mqtt_bench.Target]] = lambda result: []


@dataclass(slots=True)
class PartResult:
    name: str
    seconds: float
    report: str
    figures: Any = None
    targets: list[mqtt_bench.Target] = field(default_factory=list)
    error: str | None = None


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _storm_targets(result: tuple[list[Any], list[str]]) -> list[mqtt_bench.Target]:
    runs, _ = result
    targets = []
    for run in runs:
        if run.broker != storm_bench.POLYGATE:
            continue
        description = (f"{run.clients}-client storm with callout auth over {run.transport}, {run.credentials} "
                       f"credentials, done in under {storm_bench.TARGET_STORM_S:g} s")
        met = run.connected == run.clients and run.elapsed_s < storm_bench.TARGET_STORM_S
        targets.append(mqtt_bench.Target(
            description=description, met=met,
            detail=f"{run.elapsed_s:.2f} s, {run.connected}/{run.clients} connected, p99 CONNACK {run.p99_ms:.0f} ms"))
    return targets


def _memory_targets(result: tuple[list[memory_bench.MemoryRun], list[str]]) -> list[mqtt_bench.Target]:
    runs, _ = result
    return [mqtt_bench.Target(
        description=f"{run.broker}: under {TARGET_IDLE_KB:g} KB RSS per idle connection at {run.connections:,}",
        met=run.kb_per_connection < TARGET_IDLE_KB, detail=f"{run.kb_per_connection:.1f} KB per connection")
        for run in runs if run.broker.startswith("polygate")]


def parts(*, quick: bool, setup: bool) -> dict[str, Part]:
    """Each part with the sizes of a full run, or (`quick`) of a one-second smoke run."""
    mqtt_options = mqtt_bench.BenchOptions(
        brokers=mqtt_lineup.DEFAULT, qos_levels=(0, 1), sizes=(100, 4096), publisher_counts=(1, 50),
        messages=2_000 if quick else 30_000, seconds=1.0 if quick else 10.0,
        warmup_messages=200 if quick else 2_000, warmup_seconds=1.0 if quick else 2.0, setup=setup)
    if quick:
        mqtt_options = dataclasses.replace(
            mqtt_options, brokers=(peers.POLYGATE_NONE, mqtt_lineup.POLYGATE_GRPC), qos_levels=(1,),
            sizes=(100,), publisher_counts=(2,))
    auth_options = auth_bench.AuthBenchOptions(
        rounds=1 if quick else 3, messages=500 if quick else 50_000, cold_messages=200 if quick else 3_000,
        seconds=1.0 if quick else 10.0, warmup_messages=100 if quick else 2_000,
        warmup_seconds=1.0 if quick else 2.0, storm_clients=5 if quick else 100, storm_messages=10 if quick else 100)
    latency_options = latency_bench.LatencyOptions(messages=50 if quick else 2_000, warmup=10 if quick else 200)
    if quick:
        latency_options = dataclasses.replace(latency_options, paths=(("mqtt", "mqtt"),))
    amqp_options = amqp_bench.AmqpOptions(messages=300 if quick else 20_000, warmup=50 if quick else 1_000,
                                          setup=setup)
    if quick:
        amqp_options = dataclasses.replace(amqp_options, brokers=(amqp_bench.POLYGATE,))
    persist_options = persist_bench.PersistOptions(setup=setup)
    if quick:
        # Polygate alone (its store on and off): the peers take longer to start than the part may.
        persist_options = persist_bench.quick_options(
            setup=setup, brokers=(persist_bench.POLYGATE_SQLITE, persist_bench.POLYGATE_MEMORY),
            rss_brokers=(persist_bench.POLYGATE_SQLITE, persist_bench.POLYGATE_MEMORY))
    tls_options = tls_bench.TLSOptions(**tls_bench.QUICK, setup=setup) if quick else tls_bench.TLSOptions(setup=setup)
    if quick:
        tls_options = dataclasses.replace(tls_options, brokers=(tls_bench.POLYGATE_TLS,))
    storm_clients = 20 if quick else storm_bench.DEFAULT_CLIENTS
    memory_counts = (50,) if quick else (1_000, 10_000)
    memory_brokers = (peers.POLYGATE_NONE,) if quick else (peers.POLYGATE_NONE, peers.MOSQUITTO)
    return {
        "mqtt": Part("mqtt", lambda log: mqtt_bench.run(mqtt_options, log=log), mqtt_bench.format_report,
                     lambda report: report.to_json(), lambda report: report.targets),
        "auth": Part("auth", lambda log: auth_bench.run(auth_options, log=log), auth_bench.format_report,
                     lambda report: report.to_json(), lambda report: report.targets),
        "storm": Part("storm", lambda log: storm_bench.run(storm_clients, list(auth_bench.TRANSPORTS), 2, None,
                                                           rabbitmq_peer=not quick, setup=setup, log=log),
                      lambda result: storm_bench.format_report(*result, None), _plain, _storm_targets),
        "authpath": Part("authpath", lambda log: authpath_bench.run(
                             hits=1_000 if quick else 200_000, misses=20 if quick else 2_000,
                             concurrency=50 if quick else 1_000, batches=2 if quick else 5, log=log),
                         authpath_bench.format_report, _plain),
        "memory": Part("memory", lambda log: memory_bench.run(memory_counts, memory_brokers, 2, log=log),
                       lambda result: memory_bench.format_report(*result), _plain, _memory_targets),
        "latency": Part("latency", lambda log: latency_bench.run(latency_options, log=log),
                        latency_bench.format_report, lambda report: report.to_json()),
        "amqp": Part("amqp", lambda log: amqp_bench.run(amqp_options, log=log), amqp_bench.format_report,
                     lambda report: report.to_json()),
        "persist": Part("persist", lambda log: persist_bench.run(persist_options, log=log),
                        persist_bench.format_report, lambda report: report.to_json(),
                        lambda report: report.targets),
        "tls": Part("tls", lambda log: tls_bench.run(tls_options, log=log), tls_bench.format_report,
                    lambda report: report.to_json(), lambda report: report.targets),
    }


def run_parts(names: Sequence[str], *, quick: bool, setup: bool, log: Log = lambda line: None) -> list[PartResult]:
    """Run the named parts in order; a part that fails is recorded as failed, the others still run."""
    available = parts(quick=quick, setup=setup)
    results = []
    for name in names:
        part = available[name]
        log(f"==== bench {name} ====")
        started = time.monotonic()
        try:
            outcome = part.measure(log)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # one broken part must not cost the others' figures
            log(f"bench {name} failed: {exc!r}")
            results.append(PartResult(name=name, seconds=time.monotonic() - started, report=f"FAILED: {exc!r}",
                                      error="".join(traceback.format_exception(exc, limit=5))))
            continue
        results.append(PartResult(name=name, seconds=time.monotonic() - started, report=part.report(outcome),
                                  figures=part.figures(outcome), targets=part.targets(outcome)))
    return results


def format_report(results: Sequence[PartResult], *, command: str, started: str) -> str:
    machine = mqtt_bench.machine_info()
    lines = [
        f"python -m bench all: {started} UTC",
        f"command: {command}",
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}; load average now {', '.join(f'{v:.2f}' for v in machine['loadavg'])}",
        f"polygate: {peers.polygate_version()}",
    ]
    for result in results:
        lines += ["", f"==== {result.name} ({result.seconds:.0f} s) ====", result.report]
    lines += ["", "==== targets (every one a ratio or figure from this run) ===="]
    for result in results:
        lines += target_lines(result.targets, prefix=f"{result.name}: ")
    failed = [result.name for result in results if result.error]
    if failed:
        lines.append(f"  failed parts: {', '.join(failed)} (their errors are in the JSON file)")
    return "\n".join(lines)


def figures(results: Sequence[PartResult], *, command: str, started: str) -> dict[str, Any]:
    return {"started_utc": started, "command": command, "machine": mqtt_bench.machine_info(),
            "polygate": peers.polygate_version(),
            "parts": {r.name: {"seconds": r.seconds, "figures": r.figures, "error": r.error,
                               "targets": [dataclasses.asdict(t) for t in r.targets]} for r in results}}


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench all", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset, in order "
                        "(default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="about a second per part (a smoke run, not figures)")
    parser.add_argument("--setup", action="store_true", help="install missing peers (apt-get install mosquitto "
                        "mosquitto-clients rabbitmq-server; pip install amqtt)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, metavar="FILE",
                        help="where the figures go (default: %(default)s)")
    args = parser.parse_args(list(argv))
    args.part_names = [part.strip() for part in args.parts.split(",") if part.strip()]
    unknown = [part for part in args.part_names if part not in PARTS]
    if unknown or not args.part_names:
        parser.error(f"--parts takes some of {', '.join(PARTS)}")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    terminate_on_sigterm()
    command = shlex.join(["python", "-m", "bench", "all", *argv])
    started = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M")
    try:
        results = run_parts(args.part_names, quick=args.quick, setup=args.setup, log=log_to_stderr)
    except KeyboardInterrupt:
        print("interrupted; every broker and load process was stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:
        print("terminated; every broker and load process was stopped", file=sys.stderr)
        return int(exc.code or 1)
    print(format_report(results, command=command, started=started))
    args.json.write_text(json.dumps(figures(results, command=command, started=started), indent=2,
                                    default=str) + "\n")
    print(f"\nfigures written to {args.json}")
    return 0 if results and not any(r.error for r in results) else 1
