"""`python -m bench hotpath`: the MQTT hot path of this tree against another checkout (before/after a change).

`--base DIR` is a checkout of the code before the change, e.g.
`git worktree add /tmp/polygate-base HEAD`. Each round starts, for every
broker (Polygate with provider `none` and `local`, as in bench mqtt), the base
gateway and this tree's gateway with `storage.backend: memory` and with the
default store (`sqlite`, fsync batch), one after the other in an order that
rotates per round, and drives each through bench mqtt's cells (QoS 0 and 1,
100 B and 4 KB, one publisher, clean sessions: nothing for the store to keep).
The report gives each variant's median CPU per delivered message over the
rounds and its ratio to the base's; the target: with `paced`, within 5% of
the base in every cell.

`paced` is this tree with `memory` and the base's queue behaviour: at most
1,000 queued messages per subscriber, then the publisher is held
(`limits.queue_overflow.mqtt: block`). This tree's defaults (`memory`,
`sqlite`) let a subscriber that is slower than its publisher queue up to
100,000 messages / 256 MB before anything holds or drops, so in cells where
the subscriber falls behind they run at another operating point: a long queue
(fresh memory: page faults, cache misses) instead of a held publisher. `paced`
compares the code at the base's operating point; `memory` shows what the
defaults cost.

The base runs with its own config defaults (no `storage:` block: a tree
without a store would refuse one). The load and the measurement are this
tree's bench.load / bench.mqtt_bench, the same for every variant.
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

from bench import mqtt_bench, peers
from bench.entry import bench_main, csv_items, target_lines
from bench.mqtt_bench import Target

BASE, PACED, MEMORY, SQLITE = "base", "paced", "memory", "sqlite"
VARIANTS = (BASE, PACED, MEMORY, SQLITE)
#: `paced`: the base's queue bound (its default max_queued_messages) and its full-queue behaviour (hold the publisher).
PACED_YAML = "storage: {backend: memory}\nlimits: {max_queued_messages: 1000, queue_overflow: {mqtt: block}}\n"
BROKERS = (peers.POLYGATE_NONE, peers.POLYGATE_LOCAL)
TARGET_MAX_VS_BASE = 1.05


@dataclass(frozen=True, slots=True, kw_only=True)
class HotpathOptions:
    base: Path
    brokers: tuple[str, ...] = BROKERS
    variants: tuple[str, ...] = VARIANTS
    qos_levels: tuple[int, ...] = (0, 1)
    sizes: tuple[int, ...] = (100, 4096)
    publishers: int = 1
    rounds: int = 3
    messages: int = 50_000
    seconds: float = 10.0
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0

    def __post_init__(self) -> None:
        if not (self.base / "gateway" / "__main__.py").is_file():
            raise ValueError(f"--base {self.base}: not a Polygate checkout (no gateway/__main__.py)")
        if any(b not in BROKERS for b in self.brokers) or not self.brokers:
            raise ValueError(f"--brokers takes some of {', '.join(BROKERS)}")
        if any(v not in VARIANTS for v in self.variants) or BASE not in self.variants:
            raise ValueError(f"--variants takes some of {', '.join(VARIANTS)}, base among them")
        if min(self.rounds, self.messages, self.publishers) < 1:
            raise ValueError("--rounds, --messages and --publishers must be positive")

    def cells(self) -> list[mqtt_bench.BenchOptions]:
        return mqtt_bench.BenchOptions(
            brokers=self.brokers, qos_levels=self.qos_levels, messages=self.messages, seconds=self.seconds,
            sizes=self.sizes, publisher_counts=(self.publishers,), warmup_messages=self.warmup_messages,
            warmup_seconds=self.warmup_seconds).cells()


@dataclass(frozen=True, slots=True, kw_only=True)
class HotpathRun:
    round: int
    variant: str
    measurement: mqtt_bench.Measurement


@dataclass(frozen=True, slots=True, kw_only=True)
class HotpathRow:
    broker: str
    qos: int
    size: int
    variant: str
    rounds: int
    cpu_us_per_msg: float      # median
    cpu_min: float
    cpu_max: float
    msgs_per_s: float          # median
    vs_base: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class HotpathReport:
    options: HotpathOptions
    machine: dict[str, Any]
    loadavg_end: list[float]
    versions: dict[str, str]
    runs: list[HotpathRun] = field(default_factory=list)
    rows: list[HotpathRow] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        figures = dataclasses.asdict(self)
        figures["options"]["base"] = str(self.options.base)
        return figures


def start(name: str, variant: str, workdir: Path, base: Path) -> peers.RunningBroker:
    workdir.mkdir(parents=True, exist_ok=True)
    if variant == BASE:
        return peers.start_polygate(name, workdir, source=base)
    if variant == PACED:
        return peers.start_polygate(name, workdir, extra_yaml=PACED_YAML)
    if variant == MEMORY:
        return peers.start_polygate(name, workdir, extra_yaml="storage: {backend: memory}\n")
    return peers.start_polygate(name, workdir, extra_yaml=f"storage: {{backend: sqlite, path: \"{workdir / 'data'}\"}}\n")


def run(options: HotpathOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> HotpathReport:
    machine = mqtt_bench.machine_info()
    versions = {BASE: peers.polygate_version(options.base), "current": peers.polygate_version() + " + working tree"}
    runs: list[HotpathRun] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="polygate-hotpath-") as tmp:
        root = Path(tmp) if keep_dir is None else keep_dir
        for round_no in range(1, options.rounds + 1):
            shift = (round_no - 1) % len(options.variants)
            order = [*options.variants[shift:], *options.variants[:shift]]
            for name in options.brokers:
                for variant in order:
                    label = f"[round {round_no}] {name} {variant}"
                    log(f"{label}: starting ...")
                    try:
                        broker = start(name, variant, root / f"r{round_no}" / name / variant, options.base)
                    except peers.BrokerUnavailable as exc:
                        log(f"{label}: skipped: {exc}")
                        skipped.append(f"{label}: {exc}")
                        continue
                    try:
                        for cell in options.cells():
                            for qos in options.qos_levels:
                                try:
                                    m = mqtt_bench.measure(broker, qos, cell)
                                except mqtt_bench.RunFailed as exc:
                                    log(f"{label} QoS {qos} {cell.size} B failed: {exc}")
                                    skipped.append(f"{label} QoS {qos} {cell.size} B: {exc}")
                                    continue
                                runs.append(HotpathRun(round=round_no, variant=variant, measurement=m))
                                log(f"{label} QoS {qos} {cell.size} B: {m.msgs_per_s:,.0f} msg/s, "
                                    f"{m.cpu_us_per_msg:.2f} µs CPU/msg")
                    finally:
                        broker.stop()
    rows = summarise(runs, options.variants)
    return HotpathReport(options=options, machine=machine, loadavg_end=list(os.getloadavg()), versions=versions,
                         runs=runs, rows=rows, skipped=skipped, targets=evaluate_targets(rows))


def summarise(runs: Sequence[HotpathRun], variants: Sequence[str]) -> list[HotpathRow]:
    groups: dict[tuple[str, int, int, str], list[mqtt_bench.Measurement]] = {}
    for r in runs:
        m = r.measurement
        groups.setdefault((m.broker, m.qos, m.size, r.variant), []).append(m)
    rows = []
    for (broker, qos, size, variant) in sorted(groups, key=lambda k: (k[0], k[1], k[2], variants.index(k[3]))):
        ms = groups[(broker, qos, size, variant)]
        cpus = [m.cpu_us_per_msg for m in ms]
        base = groups.get((broker, qos, size, BASE))
        median = statistics.median(cpus)
        base_median = statistics.median(m.cpu_us_per_msg for m in base) if base else None
        rows.append(HotpathRow(broker=broker, qos=qos, size=size, variant=variant, rounds=len(ms),
                               cpu_us_per_msg=median, cpu_min=min(cpus), cpu_max=max(cpus),
                               msgs_per_s=statistics.median(m.msgs_per_s for m in ms),
                               vs_base=median / base_median if base_median else None))
    return rows


def evaluate_targets(rows: Sequence[HotpathRow]) -> list[Target]:
    targets = []
    for row in rows:
        if row.variant != PACED:
            continue
        description = (f"{row.broker} QoS {row.qos}, {row.size} B, clean sessions: paced (the base's queue bound) CPU/msg <= "
                       f"{TARGET_MAX_VS_BASE:g}x the base's")
        if row.vs_base is None:
            targets.append(Target(description=description, met=None, detail="base not measured"))
            continue
        base = next(r for r in rows if r.variant == BASE and (r.broker, r.qos, r.size) == (row.broker, row.qos, row.size))
        targets.append(Target(description=description, met=row.vs_base <= TARGET_MAX_VS_BASE + mqtt_bench.RATIO_EPSILON,
                              detail=f"{row.cpu_us_per_msg:.2f} vs {base.cpu_us_per_msg:.2f} µs = {row.vs_base:.3f}x"))
    return targets


def format_report(report: HotpathReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        mqtt_bench.machine_line(machine, report.loadavg_end),
        f"base: {options.base} ({report.versions[BASE]}); current: {report.versions['current']}",
        f"load: bench mqtt's raw client, {options.publishers} publisher + 1 subscriber, clean sessions; "
        f"{options.messages:,} measured messages per run after {options.warmup_messages:,} warm-up; {options.rounds} "
        "rounds, variants started one after the other in an order rotating per round",
        "variants: base = the base checkout, its defaults; paced = this tree, storage memory, the base's queue bound "
        "(1,000, then the publisher is held); memory = this tree, storage.backend memory; sqlite = this tree, "
        "storage.backend sqlite (the default, fsync batch)",
        "",
    ]
    header = ("broker", "qos", "size", "variant", "msgs/s", "CPU µs/msg median", "(min-max)", "vs base")
    table = [(r.broker, str(r.qos), str(r.size), r.variant, f"{r.msgs_per_s:,.0f}", f"{r.cpu_us_per_msg:.2f}",
              f"({r.cpu_min:.2f}-{r.cpu_max:.2f})", "" if r.variant == BASE or r.vs_base is None else f"{r.vs_base:.3f}x")
             for r in report.rows]
    lines += mqtt_bench.format_table(header, table, left=(0, 3))
    lines += ["", "targets:"]
    lines += target_lines(report.targets)
    if report.skipped:
        lines += ["", "skipped:"] + [f"  {s}" for s in report.skipped]
    return "\n".join(lines)



def parse_args(argv: Sequence[str]) -> tuple[HotpathOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench hotpath", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="a checkout of the code before the change")
    parser.add_argument("--brokers", default=",".join(BROKERS), help="default: %(default)s")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="default: %(default)s")
    parser.add_argument("--qos", default="0,1", help="default: %(default)s")
    parser.add_argument("--size", default="100,4096", help="default: %(default)s")
    parser.add_argument("--publishers", type=int, default=1, help="default: %(default)s")
    parser.add_argument("--rounds", type=int, default=3, help="default: %(default)s")
    parser.add_argument("--messages", type=int, default=50_000, help="measured messages per run (default 50000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR", help="keep each gateway's config, data and log under DIR")
    args = parser.parse_args(list(argv))
    try:
        options = HotpathOptions(
            base=args.base.resolve(), brokers=csv_items(args.brokers), variants=csv_items(args.variants),
            qos_levels=tuple(int(q) for q in csv_items(args.qos)), sizes=tuple(int(s) for s in csv_items(args.size)),
            publishers=args.publishers, rounds=args.rounds, messages=args.messages, seconds=args.seconds)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.runs), started="every gateway and load process was",
    )
