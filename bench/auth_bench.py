"""`python -m bench auth`: what the callout provider costs the gateway, against provider `none`.

The reference auth service (`python -m gateway auth-server`, gRPC and HTTP)
runs as a process of its own, so its CPU time is never counted as the
gateway's. Gateways with provider `callout` (one per transport) and a baseline
with provider `none` are driven by the same MQTT load in the same run:

- warm: bench mqtt's publish -> subscribe load (QoS 1) with
  `decision_cache_ttl: 60s` and the default authn TTL: callouts are made only
  for what was never asked before;
- cold: the same load with every auth cache TTL at 0s: each PUBLISH is a callout;
- storm: N clients, each with its own identity and topic, connect at once and
  publish M messages each, with warm caches: one authenticate per identity and
  one authorize per topic.

Gateway CPU (user + sys, psutil) per delivered message is compared with
`none`'s; the callouts come from the gateway's own `/metrics`
(`polygate_callouts_total`), per 10,000 auth decisions it made
(`polygate_auth_decisions_total`: connects, subscribes, publishes). Each
scenario runs `--rounds` times with the providers interleaved (the order
rotates per round) and reports the median.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import multiprocessing
import os
import secrets
import statistics
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.entry import bench_main, csv_items, target_lines
from bench import load, mqtt_bench, peers

# The run harness (worker processes, polling with deadlines, CPU sampling, SIGTERM handling)
# is bench mqtt's, used as is (`mqtt_bench.worker_processes`, `poll_until`, ...) so the two cannot drift.

NONE = "none"
GRPC = "grpc"
HTTP = "http"
TRANSPORTS = (GRPC, HTTP)

WARM = "warm"
COLD = "cold"
STORM = "storm"
SCENARIOS = (WARM, COLD, STORM)

# The target: with warm caches the callout costs at most 5% more CPU per message than `none`.
TARGET_WARM_MAX_RATIO = 1.05
# CPU times come in 10 ms ticks, so ratios such as 16.8/16.0 land exactly on the target;
# float division must not turn that into 1.0500000000000003 > 1.05.
RATIO_EPSILON = 1e-9

#: The `auth:` keys that differ between the gateways of the warm (and storm) and the cold scenarios.
WARM_TTLS = {"decision_cache_ttl": "60s"}   # authn_cache_ttl and identity_cache_ttl: their defaults
COLD_TTLS = {"identity_cache_ttl": "0s", "authn_cache_ttl": "0s", "decision_cache_ttl": "0s",
             "negative_cache_ttl": "0s"}
STORM_USER_PREFIX = "bench-storm-"
METRIC_DECISIONS = "polygate_auth_decisions_total"
METRIC_CALLOUTS = "polygate_callouts_total"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthBenchOptions:
    transports: tuple[str, ...] = TRANSPORTS
    scenarios: tuple[str, ...] = SCENARIOS
    rounds: int = 5
    messages: int = 100_000         # warm: measured messages per round (psutil's 10 ms tick: 0.1 µs/msg)
    cold_messages: int = 5_000      # cold: every one of them is a callout, so fewer
    seconds: float = 10.0           # cap on each measured publishing window
    size: int = 100
    inflight: int = 100
    warmup_messages: int = 2_000
    warmup_seconds: float = 2.0
    storm_clients: int = 100
    storm_messages: int = 100       # per storm client
    # Per callout. A storm makes the service check many passwords at once (Argon2,
    # tens of ms each): the default 2s would turn a slow answer into a refused client.
    auth_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if not self.transports or any(t not in TRANSPORTS for t in self.transports):
            raise ValueError(f"--transports takes {' and/or '.join(TRANSPORTS)}")
        if not self.scenarios or any(s not in SCENARIOS for s in self.scenarios):
            raise ValueError(f"--scenarios takes some of {', '.join(SCENARIOS)}")
        if min(self.rounds, self.messages, self.cold_messages, self.inflight, self.storm_clients,
               self.storm_messages) < 1 or self.seconds <= 0 or self.auth_timeout_s <= 0:
            raise ValueError("--rounds, --messages, --cold-messages, --inflight, --storm-clients, "
                             "--storm-messages, --seconds and --auth-timeout must be positive")
        if self.size < 1:
            raise ValueError("--size must be at least 1 byte (the first byte marks warm-up vs measured)")
        if self.warmup_messages < 0 or self.warmup_seconds < 0:
            raise ValueError("warm-up count and time cannot be negative")

    @property
    def variants(self) -> tuple[str, ...]:
        return (NONE, *self.transports)

    def load_options(self, scenario: str) -> mqtt_bench.BenchOptions:
        """bench mqtt's load: one publisher and one subscriber process, the raw client, QoS 1."""
        return mqtt_bench.BenchOptions(
            brokers=(peers.POLYGATE_NONE,), qos_levels=(1,),
            messages=self.cold_messages if scenario == COLD else self.messages, seconds=self.seconds,
            size=self.size, publishers=1, warmup_messages=self.warmup_messages,
            warmup_seconds=self.warmup_seconds, client=load.CLIENT_RAW, inflight=self.inflight)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthCounts:
    """Counters read from a gateway's /metrics."""

    decisions: int = 0
    authenticate: int = 0
    authorize: int = 0
    not_allowed: int = 0            # callouts answered deny or unavailable

    def __sub__(self, other: AuthCounts) -> AuthCounts:
        return AuthCounts(decisions=self.decisions - other.decisions,
                          authenticate=self.authenticate - other.authenticate,
                          authorize=self.authorize - other.authorize,
                          not_allowed=self.not_allowed - other.not_allowed)


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthRun:
    """One round of one scenario on one provider."""

    scenario: str
    variant: str
    round: int
    sent: int
    received: int
    lost: int
    msgs_per_s: float
    gateway_cpu_s: float
    cpu_us_per_msg: float
    operations: int                 # auth decisions of the gateway during the run
    callouts_authenticate: int
    callouts_authorize: int
    callouts_not_allowed: int
    connects: int = 0               # storm: clients that connected in the window
    connect_s: float = 0.0          # storm: from the first CONNECT sent to the last CONNACK read
    load_saturated: bool = False

    @property
    def callouts(self) -> int:
        return self.callouts_authenticate + self.callouts_authorize


@dataclass(frozen=True, slots=True, kw_only=True)
class Summary:
    """The rounds of one scenario on one provider."""

    scenario: str
    variant: str
    rounds: int
    sent: int
    received: int
    lost: int
    msgs_per_s: float               # median
    cpu_us_per_msg: float           # median
    cpu_us_min: float
    cpu_us_max: float
    ratio_to_none: float | None
    added_us_per_msg: float | None
    operations: int
    callouts_authenticate: int
    callouts_authorize: int
    callouts_not_allowed: int
    connect_s: float | None         # storm: median
    load_saturated: bool

    def per_10k(self, callouts: int) -> float:
        return 10_000 * callouts / self.operations if self.operations else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Skipped:
    scenario: str | None
    variant: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthBenchReport:
    options: AuthBenchOptions
    machine: dict[str, Any]
    versions: dict[str, str]
    runs: list[AuthRun] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    targets: list[mqtt_bench.Target] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---- the identities and the processes ----

@dataclass(frozen=True, slots=True, kw_only=True)
class BenchUsers:
    load: peers.Credentials                  # the publisher and subscriber of warm/cold, the storm's subscriber
    #: The storm's clients, per round: identities the auth service has never checked before.
    storm: tuple[tuple[peers.Credentials, ...], ...]


def write_users(path: Path, storm_clients: int, rounds: int) -> BenchUsers:
    """A users file for the reference service: every bench identity may use `bench/#`.

    Each storm round has users of its own, so that every round is a storm of
    identities nobody has checked yet (the service remembers a good password
    for a minute). The storm users share one password (one Argon2 hash to
    make, not thousands); the service still checks each one's on its own.
    """
    from auth_providers.local_store import hash_password
    from gateway.events import Secret

    load_user = peers.Credentials(username=peers.BENCH_USERNAME, password=secrets.token_urlsafe(18))
    storm_password = secrets.token_urlsafe(18)
    storm = tuple(tuple(peers.Credentials(username=f"{STORM_USER_PREFIX}r{r}-{i:04d}", password=storm_password)
                        for i in range(storm_clients)) for r in range(rounds))
    storm_hash = hash_password(Secret(storm_password))
    grant = {"publish": [peers.ACL_PATTERN], "subscribe": [peers.ACL_PATTERN]}
    users = [{"username": load_user.username, "password_hash": hash_password(Secret(load_user.password)), **grant}]
    users += [{"username": user.username, "password_hash": storm_hash, **grant} for group in storm for user in group]
    path.write_text(yaml.safe_dump({"users": users}, sort_keys=False))
    return BenchUsers(load=load_user, storm=storm)


def auth_yaml(variant: str, ttls: dict[str, str], *, url: str, timeout_s: float) -> str:
    auth: dict[str, str] = {"provider": variant}
    if variant != NONE:
        auth = {"provider": "callout", "url": url, "transport": variant}
    auth |= {"timeout": f"{timeout_s:g}s", **ttls}
    return yaml.safe_dump({"auth": auth}, default_flow_style=None, sort_keys=False)


def read_service_counts(service: peers.RunningBroker) -> AuthCounts:
    """Calls to the reference service's RabbitMQ endpoints, as it counted them (`GET /stats`)."""
    from gateway.auth_server import RABBITMQ_DENIED, RABBITMQ_RESOURCE, RABBITMQ_TOPIC, RABBITMQ_USER, RABBITMQ_VHOST

    url = f"http://127.0.0.1:{service.port}/stats"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            calls = json.load(response)["calls"]
    except (OSError, ValueError, KeyError) as exc:
        raise peers.BrokerUnavailable(f"cannot read the auth service's {url}: {exc}") from exc
    return AuthCounts(
        authenticate=calls.get(RABBITMQ_USER, 0),
        authorize=sum(calls.get(key, 0) for key in (RABBITMQ_VHOST, RABBITMQ_RESOURCE, RABBITMQ_TOPIC)),
        not_allowed=calls.get(RABBITMQ_DENIED, 0))


def read_counts(gateway: peers.RunningBroker) -> AuthCounts:
    if gateway.health_port is None:
        raise peers.BrokerUnavailable(f"{gateway.name} was started without its health listener")
    return parse_counts(peers.fetch_metrics(gateway.health_port))


def parse_counts(metrics_text: str) -> AuthCounts:
    """The auth decisions and callouts in a gateway's Prometheus text (no callout family: provider none)."""
    decisions = authenticate = authorize = not_allowed = 0
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == METRIC_DECISIONS:
                decisions += int(sample.value)
            elif sample.name == METRIC_CALLOUTS:
                count = int(sample.value)
                if sample.labels.get("method") == "authenticate":
                    authenticate += count
                elif sample.labels.get("method") == "authorize":
                    authorize += count
                if sample.labels.get("outcome") != "allow":
                    not_allowed += count
    return AuthCounts(decisions=decisions, authenticate=authenticate, authorize=authorize,
                      not_allowed=not_allowed)


# ---- one round ----

def run_load(gateway: peers.RunningBroker, variant: str, scenario: str, round_index: int,
             options: AuthBenchOptions) -> AuthRun:
    """bench mqtt's measured run on one gateway, with the auth counters read around it."""
    before = read_counts(gateway)
    measurement = mqtt_bench.measure(gateway, 1, options.load_options(scenario))
    counts = read_counts(gateway) - before
    return AuthRun(
        scenario=scenario, variant=variant, round=round_index, sent=measurement.sent,
        received=measurement.received, lost=measurement.lost, msgs_per_s=measurement.msgs_per_s,
        gateway_cpu_s=measurement.broker_cpu_s, cpu_us_per_msg=measurement.cpu_us_per_msg,
        operations=counts.decisions, callouts_authenticate=counts.authenticate,
        callouts_authorize=counts.authorize, callouts_not_allowed=counts.not_allowed,
        load_saturated=measurement.load_saturated)


def run_storm(gateway: peers.RunningBroker, variant: str, round_index: int, options: AuthBenchOptions,
              users: BenchUsers) -> AuthRun:
    """N clients, each with its own identity and topic, connect at once and publish; one subscriber sees all.

    The window (gateway CPU, auth counters) holds the connects and the publishes;
    the subscriber connects and subscribes before it.
    """
    ctx = multiprocessing.get_context("spawn")
    run_id = secrets.token_hex(4)
    topic_root = f"{peers.BENCH_TOPIC_ROOT}/{run_id}/storm"
    common = {"host": "127.0.0.1", "port": gateway.port, "client": load.CLIENT_RAW, "qos": 1,
              "size": options.size, "inflight": options.inflight}
    sub_config = load.LoadConfig(client_id=f"bench-sub-{run_id}", topic=f"{topic_root}/#",
                                 username=users.load.username, password=users.load.password, **common)
    storm_configs = [
        load.LoadConfig(client_id=f"bench-storm{i}-{run_id}", topic=f"{topic_root}/{i}", username=user.username,
                        password=user.password, messages=options.storm_messages, seconds=options.seconds, **common)
        for i, user in enumerate(users.storm[round_index])]
    errors = ctx.Queue()
    stop, go = ctx.Event(), ctx.Event()
    sub_counters = ctx.RawArray("d", load.SUBSCRIBER_SLOTS)
    storm_counters = ctx.RawArray("d", load.STORM_SLOTS)
    targets = [(load.subscriber_main, (sub_config, sub_counters, stop, errors)),
               (load.storm_main, (storm_configs, storm_counters, go, stop, errors))]
    with mqtt_bench.worker_processes(ctx, targets, stop) as everyone:
        mqtt_bench.poll_until(lambda: sub_counters[load.S_READY] == 1 and storm_counters[load.C_READY] == 1,
                    mqtt_bench.READY_DEADLINE_S, "waiting for the subscriber and the storm process",
                    errors, everyone, gateway)
        before = read_counts(gateway)
        cpu_before = gateway.cpu_seconds()
        load_cpu_before = mqtt_bench.cpu_of(everyone)
        t_before = time.monotonic()
        go.set()
        mqtt_bench.poll_until(lambda: storm_counters[load.C_DONE] == 1,
                    load.STORM_CONNECT_S + options.seconds + load.ACK_DRAIN_S + 10,
                    "running the connection storm", errors, everyone, gateway)
        sent = int(storm_counters[load.C_SENT])
        mqtt_bench.wait_settled(lambda: sub_counters[load.S_COUNT], sent, options.seconds + 30, errors, everyone)
        t_after = time.monotonic()
        cpu_after = gateway.cpu_seconds()
        load_cpu_after = mqtt_bench.cpu_of(everyone)
        counts = read_counts(gateway) - before
        received = int(sub_counters[load.S_COUNT])
        first, last = sub_counters[load.S_FIRST], sub_counters[load.S_LAST]
        connects, connect_s = int(storm_counters[load.C_CONNECTED]), storm_counters[load.C_CONNECT_S]
        mqtt_bench.raise_worker_errors(errors, [])
    if received == 0:
        raise mqtt_bench.RunFailed(f"no storm message reached the subscriber ({sent} sent); "
                                   f"gateway output ends with:\n{gateway.log_tail()}")
    window = t_after - t_before
    cpu = max(cpu_after - cpu_before, 0.0)
    busiest = max(after - before for after, before in zip(load_cpu_after, load_cpu_before))
    return AuthRun(
        scenario=STORM, variant=variant, round=round_index, sent=sent, received=received, lost=sent - received,
        msgs_per_s=received / (last - first) if received > 1 and last > first else 0.0,
        gateway_cpu_s=cpu, cpu_us_per_msg=cpu / received * 1e6, operations=counts.decisions,
        callouts_authenticate=counts.authenticate, callouts_authorize=counts.authorize,
        callouts_not_allowed=counts.not_allowed, connects=connects, connect_s=connect_s,
        load_saturated=100.0 * busiest / window >= mqtt_bench.SATURATED_CPU_PCT)


# ---- the whole benchmark ----

def _rotated(items: Sequence[str], by: int) -> list[str]:
    # The order moves each round, so no provider always runs first (or right after another).
    by %= len(items)
    return [*items[by:], *items[:by]]


def _start_all(starters: dict[str, Callable[[], peers.RunningBroker]]) -> tuple[dict[str, peers.RunningBroker],
                                                                          dict[str, str]]:
    """Run the starters at once (each waits for its own listener): (started, reasons of those that failed).

    Python start-up dominates a short run; in parallel it is paid once. If this
    is interrupted, every starter is waited for and whatever started is stopped.
    """
    started: dict[str, peers.RunningBroker] = {}
    failed: dict[str, str] = {}
    pool = ThreadPoolExecutor(max_workers=max(len(starters), 1), thread_name_prefix="bench-start")
    futures = {name: pool.submit(start) for name, start in starters.items()}
    try:
        for name, future in futures.items():
            try:
                started[name] = future.result()
            except peers.BrokerUnavailable as exc:
                failed[name] = str(exc)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for future in futures.values():
            if not future.cancelled() and future.exception() is None:
                future.result().stop()
        raise
    pool.shutdown(wait=True)
    return started, failed


def _start_gateways(variants: Sequence[str], ttls: dict[str, str], label: str, root: Path,
                    urls: dict[str, str], users: BenchUsers, options: AuthBenchOptions,
                    skipped: list[Skipped], log: Callable[[str], None]) -> dict[str, peers.RunningBroker]:
    starters: dict[str, Callable[[], peers.RunningBroker]] = {}
    for variant in variants:
        name = f"polygate-{variant}-{label}"
        workdir = root / name
        workdir.mkdir(parents=True, exist_ok=True)
        yaml_text = auth_yaml(variant, ttls, url=urls.get(variant, ""), timeout_s=options.auth_timeout_s)
        starters[variant] = functools.partial(peers.start_gateway, name, workdir, credentials=users.load,
                                              health=True, auth_yaml=yaml_text)
    log(f"starting {', '.join(f'polygate-{v}-{label}' for v in variants)} ...")
    gateways, failed = _start_all(starters)
    for variant, reason in failed.items():
        log(f"skipping polygate-{variant}-{label}: {reason}")
        skipped.append(Skipped(scenario=label, variant=variant, reason=reason))
    return gateways


def _start_services(transports: Sequence[str], root: Path, users_file: Path, skipped: list[Skipped],
                    log: Callable[[str], None]) -> dict[str, peers.RunningBroker]:
    starters: dict[str, Callable[[], peers.RunningBroker]] = {}
    for transport in transports:
        name = f"auth-service-{transport}"
        workdir = root / name
        workdir.mkdir(parents=True, exist_ok=True)
        starters[transport] = functools.partial(peers.start_auth_service, name, workdir, users_file=users_file,
                                                transport=transport)
    log(f"starting the reference auth service ({', '.join(transports)}) ...")
    services, failed = _start_all(starters)
    for transport, reason in failed.items():
        log(f"skipping {transport}: {reason}")
        skipped.append(Skipped(scenario=None, variant=transport, reason=reason))
    return services


def service_url(service: peers.RunningBroker, transport: str) -> str:
    """What `auth.url` is for the service: host:port for gRPC, http://host:port for HTTP."""
    address = f"127.0.0.1:{service.port}"
    return address if transport == GRPC else f"http://{address}"


def run(options: AuthBenchOptions, *, log: Callable[[str], None] = lambda line: None,
        keep_dir: Path | None = None) -> AuthBenchReport:
    """Start the auth services and the gateways, run every scenario, stop everything; never leaves a process."""
    machine = mqtt_bench.machine_info() | {"loadavg_start": _loadavg()}
    versions = {"polygate": peers.polygate_version(),
                **{name: peers.package_version(name) for name in ("grpcio", "aiohttp", "psutil")}}
    runs: list[AuthRun] = []
    skipped: list[Skipped] = []
    with tempfile.TemporaryDirectory(prefix="polygate-auth-bench-") as tmp:
        root = Path(tmp) if keep_dir is None else keep_dir
        root.mkdir(parents=True, exist_ok=True)
        log("hashing the passwords of the bench identities ...")
        users = write_users(root / "auth-users.yaml", options.storm_clients, options.rounds)
        services: dict[str, peers.RunningBroker] = {}
        try:
            services = _start_services(options.transports, root, root / "auth-users.yaml", skipped, log)
            variants = [NONE, *services]
            urls = {transport: service_url(service, transport) for transport, service in services.items()}
            phases = [(WARM, WARM_TTLS, [s for s in (WARM, STORM) if s in options.scenarios]),
                      (COLD, COLD_TTLS, [COLD] if COLD in options.scenarios else [])]
            for label, ttls, scenarios in phases:
                if not scenarios:
                    continue
                gateways = _start_gateways(variants, ttls, label, root, urls, users, options, skipped, log)
                try:
                    for round_index in range(options.rounds):
                        for scenario in scenarios:
                            for variant in _rotated([v for v in variants if v in gateways], round_index):
                                result = _run_one(scenario, variant, round_index, gateways[variant], options,
                                                  users, skipped, log)
                                if result is not None:
                                    runs.append(result)
                finally:
                    for gateway in gateways.values():
                        gateway.stop()
        finally:
            for service in services.values():
                service.stop()
    machine["loadavg_end"] = _loadavg()
    summaries = summarise(runs)
    return AuthBenchReport(options=options, machine=machine, versions=versions, runs=runs, summaries=summaries,
                           skipped=skipped, targets=evaluate_targets(summaries, runs, options))


def _loadavg() -> list[float]:
    # Other work on the machine shifts every figure; the report says how busy it was.
    return [round(value, 2) for value in os.getloadavg()]


def _run_one(scenario: str, variant: str, round_index: int, gateway: peers.RunningBroker,
             options: AuthBenchOptions, users: BenchUsers, skipped: list[Skipped],
             log: Callable[[str], None]) -> AuthRun | None:
    log(f"  {scenario} / {variant}, round {round_index + 1} of {options.rounds} ...")
    try:
        if scenario == STORM:
            result = run_storm(gateway, variant, round_index, options, users)
        else:
            result = run_load(gateway, variant, scenario, round_index, options)
    except (mqtt_bench.RunFailed, peers.BrokerUnavailable) as exc:
        log(f"  {scenario} / {variant} failed: {exc}")
        skipped.append(Skipped(scenario=scenario, variant=variant, reason=str(exc)))
        return None
    log(f"  {scenario} / {variant}: {result.received} delivered, {result.cpu_us_per_msg:.1f} µs CPU/msg, "
        f"{result.callouts} callouts for {result.operations} auth decisions")
    return result


def summarise(runs: Sequence[AuthRun]) -> list[Summary]:
    summaries: list[Summary] = []
    medians: dict[tuple[str, str], float] = {}
    groups: dict[tuple[str, str], list[AuthRun]] = {}
    for run_ in runs:
        groups.setdefault((run_.scenario, run_.variant), []).append(run_)
    for (scenario, variant), group in groups.items():
        medians[(scenario, variant)] = statistics.median(r.cpu_us_per_msg for r in group)
    for scenario in SCENARIOS:
        for variant in (NONE, *TRANSPORTS):
            group = groups.get((scenario, variant))
            if not group:
                continue
            cpu = medians[(scenario, variant)]
            baseline = medians.get((scenario, NONE))
            storm = scenario == STORM
            summaries.append(Summary(
                scenario=scenario, variant=variant, rounds=len(group), sent=sum(r.sent for r in group),
                received=sum(r.received for r in group), lost=sum(r.lost for r in group),
                msgs_per_s=statistics.median(r.msgs_per_s for r in group), cpu_us_per_msg=cpu,
                cpu_us_min=min(r.cpu_us_per_msg for r in group), cpu_us_max=max(r.cpu_us_per_msg for r in group),
                ratio_to_none=cpu / baseline if baseline else None,
                added_us_per_msg=cpu - baseline if baseline is not None else None,
                operations=sum(r.operations for r in group),
                callouts_authenticate=sum(r.callouts_authenticate for r in group),
                callouts_authorize=sum(r.callouts_authorize for r in group),
                callouts_not_allowed=sum(r.callouts_not_allowed for r in group),
                connect_s=statistics.median(r.connect_s for r in group) if storm else None,
                load_saturated=any(r.load_saturated for r in group)))
    return summaries


def evaluate_targets(summaries: Sequence[Summary], runs: Sequence[AuthRun],
                     options: AuthBenchOptions) -> list[mqtt_bench.Target]:
    targets: list[mqtt_bench.Target] = []
    find = {(s.scenario, s.variant): s for s in summaries}
    if WARM in options.scenarios:
        baseline = find.get((WARM, NONE))
        for transport in options.transports:
            description = f"warm-cache callout ({transport}) CPU/msg <= {TARGET_WARM_MAX_RATIO:g}x none"
            summary = find.get((WARM, transport))
            if summary is None or baseline is None or summary.ratio_to_none is None:
                targets.append(mqtt_bench.Target(description=description, met=None,
                                                 detail=f"{transport} or none not measured"))
                continue
            targets.append(mqtt_bench.Target(
                description=description, met=summary.ratio_to_none <= TARGET_WARM_MAX_RATIO + RATIO_EPSILON,
                detail=f"{summary.cpu_us_per_msg:.1f} vs {baseline.cpu_us_per_msg:.1f} µs "
                       f"= {summary.ratio_to_none:.3f}x (medians of {summary.rounds} and {baseline.rounds})"))
    if STORM in options.scenarios:
        for transport in options.transports:
            description = (f"storm ({transport}): callouts = distinct identities + distinct topics "
                           f"({options.storm_clients} + {options.storm_clients} per round)")
            storm_runs = [r for r in runs if r.scenario == STORM and r.variant == transport]
            if not storm_runs:
                targets.append(mqtt_bench.Target(description=description, met=None,
                                                 detail=f"no storm round on {transport} completed"))
                continue
            met = all(r.connects == options.storm_clients and r.callouts_authenticate == options.storm_clients
                      and r.callouts_authorize == options.storm_clients for r in storm_runs)
            outcomes = {(r.callouts_authenticate, r.callouts_authorize, r.connects) for r in storm_runs}
            if len(outcomes) == 1:
                authn, authz, connects = outcomes.pop()
                detail = (f"{authn} authenticate + {authz} authorize for {connects} clients "
                          f"in each of {len(storm_runs)} round(s)")
            else:
                detail = "; ".join(f"round {r.round + 1}: {r.callouts_authenticate} authenticate + "
                                   f"{r.callouts_authorize} authorize for {r.connects} clients"
                                   for r in storm_runs)
            targets.append(mqtt_bench.Target(description=description, met=met, detail=detail))
    return targets


# ---- output ----

def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}x"


def _fmt_added(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def format_report(report: AuthBenchReport) -> str:
    options, machine = report.options, report.machine
    lines = [
        f"machine: {machine['nproc']} CPUs usable ({machine['cpu_model']}), Python {machine['python']}, "
        f"{machine['platform']}; load average (1/5/15 min) {_fmt_load(machine.get('loadavg_start'))} at start, "
        f"{_fmt_load(machine.get('loadavg_end'))} at end",
        "versions: " + ", ".join(f"{k} {v}" for k, v in report.versions.items()),
        f"load (warm, cold): 1 publisher + 1 subscriber process, raw client, QoS 1, {options.size}-byte payloads, "
        f"{options.messages} (warm) / {options.cold_messages} (cold) measured messages (cap {options.seconds:g} s) "
        f"after {options.warmup_messages} warm-up, window {options.inflight}",
        f"load (storm): {options.storm_clients} clients, each its own identity and topic, connect at once from one "
        f"process and publish {options.storm_messages} QoS 1 messages each; 1 subscriber (bench/<run>/storm/#)",
        f"auth: reference service (python -m gateway auth-server) in its own process, not counted; "
        f"warm/storm {_ttl_text(WARM_TTLS)} (authn_cache_ttl 30s default); cold {_ttl_text(COLD_TTLS)}; "
        f"timeout {options.auth_timeout_s:g}s",
        f"{options.rounds} round(s) per scenario, providers interleaved; CPU = gateway process, median (min-max); "
        "callouts from the gateway's /metrics per 10,000 auth decisions (connects + subscribes + publishes)",
        "",
    ]
    header = ("scenario", "provider", "rounds", "sent", "received", "lost", "msgs/s", "CPU µs/msg",
              "(min-max)", "x none", "added µs", "callouts/10k", "(authn+authz)", "note")
    rows = [header]
    for s in report.summaries:
        note = []
        if s.connect_s is not None:
            note.append(f"connects {s.connect_s:.2f}s")
        if s.callouts_not_allowed:
            note.append(f"{s.callouts_not_allowed} callouts not allowed")
        if s.load_saturated:
            note.append("load-bound")
        rows.append((s.scenario, s.variant, str(s.rounds), str(s.sent), str(s.received), str(s.lost),
                     f"{s.msgs_per_s:,.0f}", f"{s.cpu_us_per_msg:.1f}", f"({s.cpu_us_min:.1f}-{s.cpu_us_max:.1f})",
                     _fmt_ratio(s.ratio_to_none), _fmt_added(s.added_us_per_msg),
                     f"{s.per_10k(s.callouts_authenticate + s.callouts_authorize):,.1f}",
                     f"({s.per_10k(s.callouts_authenticate):,.1f}+{s.per_10k(s.callouts_authorize):,.1f})",
                     ", ".join(note)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    left = (0, 1, 8, 12, 13)
    for index, row in enumerate(rows):
        lines.append("  ".join(cell.ljust(width) if i in left else cell.rjust(width)
                               for i, (cell, width) in enumerate(zip(row, widths))).rstrip())
        if index == 0:
            lines.append("  ".join("-" * width for width in widths))
    if any(s.load_saturated for s in report.summaries):
        lines.append(f"load-bound: a load process used >= {mqtt_bench.SATURATED_CPU_PCT:.0f}% of a CPU, so msgs/s "
                     "there is the load side's limit, not the gateway's")
    lines += ["", "targets:"]
    lines += target_lines(report.targets)
    if report.skipped:
        lines += ["", "skipped:"]
        for skip in report.skipped:
            where = skip.variant if skip.scenario is None else f"{skip.scenario} / {skip.variant}"
            reason = skip.reason.replace("\n", "\n      ")
            lines.append(f"  {where}: {reason}")
    return "\n".join(lines)


def _fmt_load(values: Sequence[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"


def _ttl_text(ttls: dict[str, str]) -> str:
    return ", ".join(f"{key} {value}" for key, value in ttls.items())



def parse_args(argv: Sequence[str]) -> tuple[AuthBenchOptions, Path | None, Path | None]:
    parser = argparse.ArgumentParser(prog="python -m bench auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transports", default=",".join(TRANSPORTS),
                        help="callout transports to measure against none (default: grpc,http)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="some of warm, cold, storm (default: all)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per scenario; medians are reported (default 5)")
    parser.add_argument("--messages", type=int, default=100_000,
                        help="warm: measured messages per round (default 100000)")
    parser.add_argument("--cold-messages", type=int, default=5_000,
                        help="cold: measured messages per round, each one a callout (default 5000)")
    parser.add_argument("--seconds", type=float, default=10.0, help="cap on each measured window (default 10)")
    parser.add_argument("--size", type=int, default=100, help="payload bytes (default 100)")
    parser.add_argument("--inflight", type=int, default=100, help="QoS 1 publish window (default 100)")
    parser.add_argument("--warmup-messages", type=int, default=2_000, help="warm-up messages (default 2000)")
    parser.add_argument("--warmup-seconds", type=float, default=2.0, help="cap on the warm-up (default 2)")
    parser.add_argument("--storm-clients", type=int, default=100,
                        help="storm: clients, each with its own identity and topic (default 100)")
    parser.add_argument("--storm-messages", type=int, default=100,
                        help="storm: QoS 1 messages each client publishes (default 100)")
    parser.add_argument("--auth-timeout", type=float, default=10.0,
                        help="the gateways' auth.timeout in seconds (default 10: the storm queues Argon2 checks)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="keep configs, the users file and logs under DIR (default: a temp dir, removed)")
    args = parser.parse_args(list(argv))
    try:
        options = AuthBenchOptions(
            transports=csv_items(args.transports), scenarios=csv_items(args.scenarios), rounds=args.rounds,
            messages=args.messages, cold_messages=args.cold_messages, seconds=args.seconds, size=args.size,
            inflight=args.inflight, warmup_messages=args.warmup_messages, warmup_seconds=args.warmup_seconds,
            storm_clients=args.storm_clients, storm_messages=args.storm_messages,
            auth_timeout_s=args.auth_timeout)
    except ValueError as exc:
        parser.error(str(exc))
    return options, args.json, args.keep


def main(argv: Sequence[str]) -> int:
    options, json_path, keep_dir = parse_args(argv)
    return bench_main(
        lambda log: run(options, log=log, keep_dir=keep_dir),
        report=format_report, figures=lambda report: report.to_json(), json_path=json_path,
        measured=lambda report: bool(report.runs), started="every gateway, auth service and load process was",
    )
