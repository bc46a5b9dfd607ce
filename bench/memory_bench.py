"""`python -m bench memory`: broker RSS per idle MQTT connection, Polygate against Mosquitto.

Each broker is started fresh for each connection count (memory a broker freed
is not always given back to the OS, so a reused broker would blur the next
figure). Worker processes open N connections (CONNECT, keepalive 600 s,
nothing else) and hold them; the broker's RSS (its process tree, psutil) is
read before and after, once it has stopped moving.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from bench.entry import bench_main
from bench import connections, mqtt_bench, peers

DEFAULT_COUNTS = (1000, 10000)
DEFAULT_BROKERS = (peers.POLYGATE_NONE, peers.MOSQUITTO)
TARGET_KB_PER_CONNECTION = 16.0
CONNECT_WINDOW = 100       # CONNECTs outstanding per worker: a steady open, not a storm
SETTLE_DEADLINE_S = 5.0
SETTLE_STEP_S = 0.2
FD_HEADROOM = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class MemoryRun:
    broker: str
    connections: int
    connected: int
    rss_before_kb: float
    rss_after_kb: float
    kb_per_connection: float
    broker_nofile_soft: int


def tree_rss_bytes(pid: int) -> int:
    total = 0
    for process in peers.process_tree(pid):
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


def settled_rss(pid: int) -> int:
    """RSS once two reads SETTLE_STEP_S apart agree within 1% (or the deadline passed)."""
    deadline = time.monotonic() + SETTLE_DEADLINE_S
    previous = tree_rss_bytes(pid)
    while time.monotonic() < deadline:
        time.sleep(SETTLE_STEP_S)
        current = tree_rss_bytes(pid)
        if abs(current - previous) <= previous * 0.01:
            return current
        previous = current
    return previous


def broker_nofile(broker: peers.RunningBroker) -> int:
    """The broker's soft open-files limit (-1: unlimited, 0: could not be read)."""
    try:
        soft, _hard = psutil.Process(broker.pid).rlimit(psutil.RLIMIT_NOFILE)
        return int(soft)
    except psutil.AccessDenied:
        pass  # prlimit on a process that dropped privileges (Mosquitto); /proc still tells
    try:
        for line in Path(f"/proc/{broker.pid}/limits").read_text().splitlines():
            if line.startswith("Max open files"):
                value = line.split()[3]
                return -1 if value == "unlimited" else int(value)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def measure(name: str, count: int, workers: int, root: Path) -> MemoryRun:
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-{count}-", dir=root))
    broker = peers.start_broker(name, workdir)
    try:
        nofile = broker_nofile(broker)
        if 0 < nofile < count + 64:
            raise mqtt_bench.RunFailed(f"{name} may open only {nofile} files, fewer than {count} connections")
        client_ids = tuple(f"idle-{i}" for i in range(count))
        plans = [connections.ConnectPlan(host="127.0.0.1", port=broker.port, client_ids=ids,
                                         window=CONNECT_WINDOW, sources=connections.loopback_sources(worker, len(ids)))
                 for worker, ids in enumerate(connections.split(client_ids, workers))]
        before = settled_rss(broker.pid)
        with connections.held_connections(broker, plans) as opened:
            if opened.refused:
                raise mqtt_bench.RunFailed(f"{name} refused {opened.refused} of {count} connections")
            after = settled_rss(broker.pid)
        return MemoryRun(broker=name, connections=count, connected=opened.connected,
                         rss_before_kb=before / 1024, rss_after_kb=after / 1024,
                         kb_per_connection=(after - before) / 1024 / opened.connected,
                         broker_nofile_soft=nofile)
    finally:
        broker.stop()


def run(counts: Sequence[int], brokers: Sequence[str], workers: int, *,
        log: Callable[[str], None] = lambda line: None) -> tuple[list[MemoryRun], list[str]]:
    # Brokers are spawned from here and inherit the raised limit (Mosquitto's
    # default max_connections is -1, unlimited: its file limit is what bounds it).
    nofile = connections.raise_nofile_limit(max(counts) + FD_HEADROOM)
    log(f"RLIMIT_NOFILE soft limit for the brokers: {nofile}")
    runs: list[MemoryRun] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="polygate-memory-bench-") as tmp:
        for name in brokers:
            for count in counts:
                log(f"{name}: {count} idle connections ...")
                try:
                    runs.append(measure(name, count, workers, Path(tmp)))
                except (peers.BrokerUnavailable, mqtt_bench.RunFailed) as exc:
                    log(f"{name} / {count} skipped: {exc}")
                    skipped.append(f"{name} / {count}: {str(exc).splitlines()[0]}")
    return runs, skipped


def format_report(runs: Sequence[MemoryRun], skipped: Sequence[str]) -> str:
    machine = mqtt_bench.machine_info()
    lines = [f"bench memory: RSS per idle MQTT connection (keepalive {connections.load.KEEPALIVE_S} s)",
             f"machine: {machine['nproc']} CPUs usable, {machine['cpu_model']}, Python {machine['python']}",
             "",
             f"{'broker':<16}{'conns':>8}{'RSS before':>13}{'RSS after':>13}{'KB/conn':>10}{'x mosquitto':>13}{'nofile':>9}"]
    mosquitto = {r.connections: r.kb_per_connection for r in runs if r.broker == peers.MOSQUITTO}
    for r in runs:
        ratio = mosquitto.get(r.connections)
        ratio_text = f"{r.kb_per_connection / ratio:.2f}" if ratio else "-"
        lines.append(f"{r.broker:<16}{r.connected:>8}{r.rss_before_kb / 1024:>10.1f} MB"
                     f"{r.rss_after_kb / 1024:>10.1f} MB{r.kb_per_connection:>10.1f}{ratio_text:>13}"
                     f"{_nofile_text(r.broker_nofile_soft):>9}")
    for name in sorted({r.broker for r in runs} - {peers.MOSQUITTO}):
        if not name.startswith("polygate"):
            continue
        worst = max(r.kb_per_connection for r in runs if r.broker == name)
        verdict = "MET" if worst < TARGET_KB_PER_CONNECTION else "NOT MET"
        lines.append(f"[{verdict}] {name}: under {TARGET_KB_PER_CONNECTION:g} KB RSS per idle connection "
                     f"(worst {worst:.1f} KB)")
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


def _nofile_text(value: int) -> str:
    return {-1: "unlim", 0: "?"}.get(value, str(value))


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench memory", description=__doc__.split("\n")[0])
    parser.add_argument("--connections", default=",".join(map(str, DEFAULT_COUNTS)),
                        help="comma-separated connection counts (default %(default)s)")
    parser.add_argument("--brokers", default=",".join(DEFAULT_BROKERS),
                        help="comma-separated, from %s (default %%(default)s)" % ", ".join(peers.BROKER_NAMES))
    parser.add_argument("--workers", type=int, default=4, help="client processes (default %(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(list(argv))
    try:
        args.counts = [int(c) for c in args.connections.split(",") if c.strip()]
    except ValueError:
        parser.error(f"--connections takes comma-separated integers, not {args.connections!r}")
    if not args.counts or min(args.counts) < 1:
        parser.error("--connections needs at least one positive count")
    args.broker_names = [b.strip() for b in args.brokers.split(",") if b.strip()]
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return bench_main(
        lambda log: run(args.counts, args.broker_names, args.workers, log=log),
        report=lambda result: format_report(*result),
        figures=lambda result: {"runs": [asdict(r) for r in result[0]], "skipped": list(result[1])},
        json_path=args.json, measured=lambda result: bool(result[0]),
        started="every broker and client process was",
    )
