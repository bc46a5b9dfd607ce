"""`python -m bench authpath`: the auth path of one process, decision by decision.

A `gateway.dispatcher.Dispatcher` is built in this process, as the gateway
builds it, and driven directly (no MQTT, no sockets but the callout's):

- hit: `SessionAuth.publish_now` answered from the decision cache
  (`decision_cache_ttl: 60s`), with provider `none` and with `callout`;
- miss: `await SessionAuth.publish` with `decision_cache_ttl: 0s` against the
  reference auth service over gRPC on loopback: one authorize callout each,
  one at a time;
- coalesced: `--concurrency` identical `publish` decisions at once, still
  uncached: they share one callout.

Wall time (time.perf_counter) and this process's CPU time (time.process_time)
per decision; the reference service is a process of its own, so its CPU is
not counted. Callouts come from the dispatcher's own metrics registry.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from prometheus_client import generate_latest

from bench.entry import bench_main
from bench import auth_bench, mqtt_bench, peers
from gateway.config_types import AuthConfig, LimitsConfig
from gateway.dispatcher import Dispatcher, SessionAuth
from gateway.events import Action, AuthEvent, Outcome, Protocol, Secret
from gateway.metrics import Metrics

TOPIC = f"{peers.BENCH_TOPIC_ROOT}/authpath"


@dataclass(frozen=True, slots=True, kw_only=True)
class PathRun:
    case: str
    provider: str
    decisions: int
    wall_s: float
    cpu_s: float
    callouts: int

    @property
    def decisions_per_s(self) -> float:
        return self.decisions / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def wall_us(self) -> float:
        return self.wall_s / self.decisions * 1e6

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.decisions * 1e6


def callouts(metrics: Metrics) -> int:
    counts = auth_bench.parse_counts(generate_latest(metrics.registry).decode())
    return counts.authenticate + counts.authorize


async def open_session(auth: AuthConfig, credentials: peers.Credentials) -> tuple[Dispatcher, Metrics, SessionAuth]:
    metrics = Metrics()
    dispatcher = Dispatcher(auth, limits=LimitsConfig(), metrics=metrics)
    await dispatcher.start()
    connect = AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id=f"authpath-{secrets.token_hex(4)}",
                        username=credentials.username, secret=Secret(credentials.password), peer="127.0.0.1:1")
    decision = await dispatcher.decide(connect)
    if decision.outcome is not Outcome.ALLOW or decision.identity is None:
        await dispatcher.aclose()
        raise mqtt_bench.RunFailed(f"CONNECT as {credentials.username!r} was not allowed: {decision.reason}")
    return dispatcher, metrics, dispatcher.session(connect, decision.identity)


async def timed(case: str, provider: str, decisions: int, metrics: Metrics,
                body: Callable[[], Awaitable[None]]) -> PathRun:
    calls_before = callouts(metrics)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await body()
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    return PathRun(case=case, provider=provider, decisions=decisions, wall_s=wall, cpu_s=cpu,
                   callouts=callouts(metrics) - calls_before)


def _require_allow(outcomes: Sequence[object]) -> None:
    bad = [d for d in outcomes if getattr(d, "outcome", None) is not Outcome.ALLOW]
    if bad:
        raise mqtt_bench.RunFailed(f"{len(bad)} decision(s) were not allow: {getattr(bad[0], 'reason', bad[0])}")


async def hit_case(auth: AuthConfig, provider: str, credentials: peers.Credentials, count: int) -> PathRun:
    dispatcher, metrics, session = await open_session(auth, credentials)
    try:
        _require_allow([await session.publish(TOPIC)])   # the one miss that fills the cache

        async def body() -> None:
            publish_now = session.publish_now
            last = None
            for _ in range(count):
                last = publish_now(TOPIC)
            _require_allow([last])

        return await timed("hit (publish_now)", provider, count, metrics, body)
    finally:
        await dispatcher.aclose()


async def miss_case(auth: AuthConfig, credentials: peers.Credentials, count: int) -> PathRun:
    dispatcher, metrics, session = await open_session(auth, credentials)
    try:
        _require_allow([await session.publish(TOPIC)])   # connections and channels warm

        async def body() -> None:
            for _ in range(count):
                decision = await session.publish(TOPIC)
                if decision.outcome is not Outcome.ALLOW:
                    _require_allow([decision])

        return await timed("miss (await publish)", auth.provider, count, metrics, body)
    finally:
        await dispatcher.aclose()


async def coalesced_case(auth: AuthConfig, credentials: peers.Credentials, concurrency: int,
                         batches: int) -> PathRun:
    dispatcher, metrics, session = await open_session(auth, credentials)
    try:
        _require_allow([await session.publish(TOPIC)])

        async def body() -> None:
            for _ in range(batches):
                _require_allow(await asyncio.gather(*(session.publish(TOPIC) for _ in range(concurrency))))

        return await timed(f"coalesced ({concurrency} at once)", auth.provider, concurrency * batches, metrics, body)
    finally:
        await dispatcher.aclose()


async def run_cases(url: str, credentials: peers.Credentials, hits: int, misses: int, concurrency: int,
                    batches: int, log: Callable[[str], None]) -> list[PathRun]:
    cached = {"decision_cache_ttl": 60.0}
    uncached = {"decision_cache_ttl": 0.0, "negative_cache_ttl": 0.0}
    callout = {"provider": "callout", "url": url, "transport": auth_bench.GRPC}
    runs: list[PathRun] = []
    log("hit: provider none ...")
    runs.append(await hit_case(AuthConfig(provider="none", **cached), "none", credentials, hits))
    log("hit: provider callout (grpc) ...")
    runs.append(await hit_case(AuthConfig(**callout, **cached), "callout", credentials, hits))
    log("miss: provider callout (grpc) ...")
    runs.append(await miss_case(AuthConfig(**callout, **uncached), credentials, misses))
    log("coalesced: provider callout (grpc) ...")
    runs.append(await coalesced_case(AuthConfig(**callout, **uncached), credentials, concurrency, batches))
    return runs


def run(hits: int, misses: int, concurrency: int, batches: int, *,
        log: Callable[[str], None] = lambda line: None) -> list[PathRun]:
    with tempfile.TemporaryDirectory(prefix="polygate-authpath-bench-") as tmp:
        root = Path(tmp)
        users = auth_bench.write_users(root / "auth-users.yaml", 0, 0)
        log("starting the reference auth service (grpc) ...")
        service = peers.start_auth_service("auth-service-grpc", root, users_file=root / "auth-users.yaml",
                                           transport=auth_bench.GRPC)
        try:
            return asyncio.run(run_cases(f"127.0.0.1:{service.port}", users.load, hits, misses, concurrency,
                                         batches, log))
        finally:
            service.stop()


def format_report(runs: Sequence[PathRun]) -> str:
    machine = mqtt_bench.machine_info()
    lines = ["bench authpath: gateway.dispatcher decisions in one process (callout: reference service, gRPC, "
             "loopback, its own process)",
             f"machine: {machine['nproc']} CPUs usable, {machine['cpu_model']}, Python {machine['python']}",
             "",
             f"{'case':<26}{'provider':<10}{'decisions':>10}{'decisions/s':>13}{'µs/decision':>13}"
             f"{'CPU µs/dec':>12}{'callouts':>10}"]
    for r in runs:
        lines.append(f"{r.case:<26}{r.provider:<10}{r.decisions:>10}{r.decisions_per_s:>13,.0f}{r.wall_us:>13.2f}"
                     f"{r.cpu_us:>12.2f}{r.callouts:>10}")
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench authpath", description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=200_000, help="publish_now calls per hit case (%(default)s)")
    parser.add_argument("--misses", type=int, default=2000, help="sequential uncached decisions (%(default)s)")
    parser.add_argument("--concurrency", type=int, default=1000, help="identical decisions at once (%(default)s)")
    parser.add_argument("--batches", type=int, default=10, help="coalesced batches (%(default)s)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(list(argv))
    if min(args.hits, args.misses, args.concurrency, args.batches) < 1:
        parser.error("--hits, --misses, --concurrency and --batches must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return bench_main(
        lambda log: run(args.hits, args.misses, args.concurrency, args.batches, log=log),
        report=format_report,
        figures=lambda runs: {"runs": [
            asdict(r) | {"decisions_per_s": r.decisions_per_s, "wall_us": r.wall_us, "cpu_us": r.cpu_us} for r in runs
        ]},
        json_path=args.json, measured=bool, started="the auth service was",
        failures=(peers.BrokerUnavailable, mqtt_bench.RunFailed),
    )
