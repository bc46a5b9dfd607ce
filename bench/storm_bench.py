"""`python -m bench storm`: N MQTT clients connect at once to Polygate with callout auth, cold caches.

For each callout transport (the reference auth service over gRPC and HTTP, a
process of its own) one gateway with `provider: callout` runs with its health
listener on. Two storms hit it, each with client ids never seen before, so the
gateway's authn cache starts cold:

- distinct: every client is its own user;
- identical: every client sends the same username and password. The authn
  cache key holds the client id (DESIGN), so these are still N distinct keys
  and N authenticate callouts: no coalescing is possible, and the figures say so.

Every storm user shares ONE Argon2 hash (bench auth's users file). The
reference service caches a good check per (username, password HMAC), so in the
identical storm it runs Argon2 about once, but in the distinct storm it
verifies every user once, and at the production parameters (19 MiB, t=2:
tens of ms each) that alone takes many seconds for 2,000 users. So by default
the shared hash is replaced by a cheap Argon2id one (8 KiB, t=1), which
keeps the service from being the bottleneck; `--full-argon2` keeps the
production hash. The report says which.

The peer: the same two storms against RabbitMQ's MQTT plugin with
`rabbitmq_auth_backend_http` behind `rabbitmq_auth_backend_cache` (TTL as the
gateway's warm caches), pointed at the same reference service (its RabbitMQ
endpoints, over HTTP), one node reused for both storms; fresh client ids keep
its cache cold (RabbitMQ's cache keys hold the client id). Its callouts are
counted by the service (`GET /stats`). RabbitMQ is skipped with the reason
when it is not installed (`--setup` installs it) or with `--no-rabbitmq`.
Between storms each broker is given time to close the previous storm's
connections, so a storm does not pay for the last one's teardown.
"""

from __future__ import annotations

import argparse
import functools
import secrets
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import yaml
from argon2 import PasswordHasher, Type

from bench.entry import bench_main
from bench import auth_bench, connections, mqtt_bench, peers, rabbitmq

DEFAULT_CLIENTS = 2000
TARGET_STORM_S = 2.0
DISTINCT = "distinct"
IDENTICAL = "identical"
FD_HEADROOM = 256
POLYGATE = "polygate"
RABBITMQ_MQTT = rabbitmq.RABBITMQ_MQTT
#: Signs RabbitMQ in to prove it is ready; a user of its own, so the storms' users stay unchecked.
PROBE_USERNAME = "bench-rabbitmq-probe"
SETTLE_DEADLINE_S = 30.0


@dataclass(frozen=True, slots=True, kw_only=True)
class StormRun:
    broker: str
    transport: str
    credentials: str
    clients: int
    connected: int
    refused: int
    elapsed_s: float
    connects_per_s: float
    p50_ms: float
    p99_ms: float
    max_ms: float
    #: Polygate: the gateway's authenticate/authorize callouts. RabbitMQ: `user` requests, and
    #: `vhost` + `resource` + `topic` requests, as the service counted them.
    callouts_authenticate: int
    callouts_authorize: int
    callouts_not_allowed: int
    callouts_per_connect: float


def percentile(values: Sequence[float], fraction: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def gateway_auth_yaml(transport: str, url: str, max_inflight: int | None) -> str:
    auth = yaml.safe_load(auth_bench.auth_yaml(transport, auth_bench.WARM_TTLS, url=url, timeout_s=10.0))
    if max_inflight is not None:
        auth["auth"]["max_inflight"] = max_inflight
    return yaml.safe_dump(auth, default_flow_style=None, sort_keys=False)


def cheapen_storm_hashes(users_file: Path, users: auth_bench.BenchUsers) -> None:
    """Give the storm users one low-cost Argon2id hash of their shared password (bench only)."""
    password = users.storm[0][0].password if users.storm and users.storm[0] else ""
    if not password:
        return
    cheap = PasswordHasher(time_cost=1, memory_cost=8, parallelism=1, type=Type.ID).hash(password)
    document = yaml.safe_load(users_file.read_text())
    for entry in document["users"]:
        if entry["username"].startswith(auth_bench.STORM_USER_PREFIX):
            entry["password_hash"] = cheap
    users_file.write_text(yaml.safe_dump(document, sort_keys=False))


def add_probe_user(users_file: Path) -> peers.Credentials:
    """Append PROBE_USERNAME (allowed nothing but to log in) to the users file; returns its credentials."""
    from auth_providers.local_store import hash_password
    from gateway.events import Secret

    probe = peers.Credentials(username=PROBE_USERNAME, password=secrets.token_urlsafe(18))
    document = yaml.safe_load(users_file.read_text())
    document["users"].append({"username": probe.username, "password_hash": hash_password(Secret(probe.password))})
    users_file.write_text(yaml.safe_dump(document, sort_keys=False))
    return probe


def open_client_connections(broker: peers.RunningBroker) -> int:
    """TCP connections to the broker's client port still held by its process tree."""
    count = 0
    for process in peers.process_tree(broker.pid):
        try:
            count += sum(1 for c in process.net_connections(kind="tcp")
                         if c.laddr and c.laddr.port == broker.port and c.raddr)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return count


def settle_connections(broker: peers.RunningBroker, deadline_s: float = SETTLE_DEADLINE_S) -> None:
    """Wait (bounded) until the broker has closed the last storm's connections."""
    deadline = time.monotonic() + deadline_s
    while open_client_connections(broker) and time.monotonic() < deadline:
        time.sleep(0.1)


def storm(broker: peers.RunningBroker, transport: str, kind: str, users: Sequence[peers.Credentials],
          workers: int, *, read_counts: Callable[[], auth_bench.AuthCounts], broker_kind: str = POLYGATE) -> StormRun:
    run_id = secrets.token_hex(4)
    client_ids = tuple(f"storm-{kind}-{run_id}-{i}" for i in range(len(users)))
    pairs = tuple((u.username, u.password) for u in users)
    plans = [connections.ConnectPlan(host="127.0.0.1", port=broker.port, client_ids=ids, credentials=creds,
                                     sources=connections.loopback_sources(worker, len(ids)))
             for worker, (ids, creds) in enumerate(zip(connections.split(client_ids, workers),
                                                       connections.split(pairs, workers)))]
    settle_connections(broker)
    before = read_counts()
    with connections.held_connections(broker, plans) as opened:
        counts = read_counts() - before
    elapsed = max(opened.elapsed_s, 1e-9)
    return StormRun(
        broker=broker_kind, transport=transport, credentials=kind, clients=len(users), connected=opened.connected,
        refused=opened.refused, elapsed_s=elapsed, connects_per_s=opened.connected / elapsed,
        p50_ms=percentile(opened.latencies, 0.50) * 1e3, p99_ms=percentile(opened.latencies, 0.99) * 1e3,
        max_ms=max(opened.latencies, default=0.0) * 1e3, callouts_authenticate=counts.authenticate,
        callouts_authorize=counts.authorize, callouts_not_allowed=counts.not_allowed,
        callouts_per_connect=(counts.authenticate + counts.authorize) / max(opened.connected + opened.refused, 1))


def storm_rabbitmq(root: Path, users_file: Path, users: auth_bench.BenchUsers, storm_users: Sequence[peers.Credentials],
                   probe: peers.Credentials, workers: int, runs: list[StormRun], *, setup: bool,
                   log: Callable[[str], None]) -> None:
    """Both storms against one RabbitMQ MQTT node whose cached HTTP backend calls a fresh reference service.

    Each storm's figures are appended to `runs` as soon as it is done, so a failure keeps the earlier one.
    """
    rabbitmq.ensure_rabbitmq(setup=setup)     # before starting anything: a missing RabbitMQ is skipped at once
    clients = len(storm_users)
    workdir = root / RABBITMQ_MQTT
    workdir.mkdir()
    service: peers.RunningBroker | None = None
    broker: peers.RunningBroker | None = None
    try:
        service = peers.start_auth_service(f"auth-service-{RABBITMQ_MQTT}", workdir, users_file=users_file,
                                           transport=auth_bench.HTTP)
        log(f"{RABBITMQ_MQTT}: starting RabbitMQ ...")
        broker = rabbitmq.start_rabbitmq_mqtt(workdir / "node", setup=setup,
                                              auth_url=f"http://127.0.0.1:{service.port}", credentials=probe)
        for kind, group in ((DISTINCT, storm_users), (IDENTICAL, (users.load,) * clients)):
            log(f"{RABBITMQ_MQTT}: {clients} clients, {kind} credentials ...")
            runs.append(storm(broker, auth_bench.HTTP, kind, group, workers, broker_kind=RABBITMQ_MQTT,
                              read_counts=functools.partial(auth_bench.read_service_counts, service)))
    finally:
        for process in (broker, service):
            if process is not None:
                process.stop()


def run(clients: int, transports: Sequence[str], workers: int, max_inflight: int | None, *,
        rabbitmq_peer: bool = False, setup: bool = False, full_argon2: bool = False,
        log: Callable[[str], None] = lambda line: None) -> tuple[list[StormRun], list[str]]:
    """Polygate's storms per transport, then (with `rabbitmq_peer`) RabbitMQ's; returns runs and skip reasons."""
    connections.raise_nofile_limit(clients + FD_HEADROOM)   # inherited by the brokers spawned below
    runs: list[StormRun] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="polygate-storm-bench-") as tmp:
        root = Path(tmp)
        log("hashing the storm users' password (one Argon2 hash shared by all) ...")
        users_file = root / "auth-users.yaml"
        # A round of storm users per transport, and one for RabbitMQ: each storm's users are new to its service.
        users = auth_bench.write_users(users_file, clients, len(transports) + (1 if rabbitmq_peer else 0))
        if not full_argon2:
            cheapen_storm_hashes(users_file, users)
        probe = add_probe_user(users_file) if rabbitmq_peer else None
        for index, transport in enumerate(transports):
            service: peers.RunningBroker | None = None
            gateway: peers.RunningBroker | None = None
            try:
                workdir = root / transport
                workdir.mkdir()
                service = peers.start_auth_service(f"auth-service-{transport}", workdir, users_file=users_file,
                                                   transport=transport)
                address = f"127.0.0.1:{service.port}"
                url = address if transport == auth_bench.GRPC else f"http://{address}"
                gateway = peers.start_gateway(f"polygate-callout-{transport}", workdir,
                                              auth_yaml=gateway_auth_yaml(transport, url, max_inflight),
                                              credentials=None, health=True)
                for kind, storm_users in ((DISTINCT, users.storm[index]), (IDENTICAL, (users.load,) * clients)):
                    log(f"{transport}: {clients} clients, {kind} credentials ...")
                    runs.append(storm(gateway, transport, kind, storm_users, workers,
                                      read_counts=functools.partial(auth_bench.read_counts, gateway)))
            except (peers.BrokerUnavailable, mqtt_bench.RunFailed) as exc:
                log(f"{transport} skipped: {exc}")
                skipped.append(f"{transport}: {str(exc).splitlines()[0]}")
            finally:
                for process in (gateway, service):
                    if process is not None:
                        process.stop()
        if rabbitmq_peer and probe is not None:
            try:
                storm_rabbitmq(root, users_file, users, users.storm[len(transports)], probe, workers, runs,
                               setup=setup, log=log)
            except (peers.BrokerUnavailable, mqtt_bench.RunFailed) as exc:
                log(f"{RABBITMQ_MQTT} skipped: {exc}")
                skipped.append(f"{RABBITMQ_MQTT}: {str(exc).splitlines()[0]}")
    return runs, skipped


def rabbitmq_ratios(runs: Sequence[StormRun]) -> list[str]:
    """Each Polygate storm beside RabbitMQ's storm of the same kind, as ratios."""
    theirs = {r.credentials: r for r in runs if r.broker == RABBITMQ_MQTT}
    lines: list[str] = []
    for ours in (r for r in runs if r.broker == POLYGATE and r.credentials in theirs):
        peer = theirs[ours.credentials]
        speed = ours.connects_per_s / peer.connects_per_s if peer.connects_per_s else float("inf")
        p99 = ours.p99_ms / peer.p99_ms if peer.p99_ms else float("inf")
        lines.append(f"  {ours.transport + ' callout':<14}{ours.credentials:<11}{speed:>10.2f}x{p99:>11.2f}x"
                     f"   {ours.callouts_per_connect:.2f} vs {peer.callouts_per_connect:.2f}")
    if lines:
        lines.insert(0, f"  {'polygate':<14}{'creds':<11}{'conn/s':>11}{'p99':>12}   callouts per connect")
        lines.insert(0, "polygate / rabbitmq-mqtt, same storm (conn/s above 1x: Polygate faster; "
                        "p99 below 1x: Polygate's tail shorter):")
    return lines


def format_report(runs: Sequence[StormRun], skipped: Sequence[str], max_inflight: int | None, *,
                  full_argon2: bool = False) -> str:
    machine = mqtt_bench.machine_info()
    inflight = "default" if max_inflight is None else str(max_inflight)
    lines = [
        "bench storm: MQTT clients connecting at once, provider callout, cold gateway caches",
        f"machine: {machine['nproc']} CPUs usable, {machine['cpu_model']}, Python {machine['python']}; "
        f"auth.max_inflight {inflight}",
        "every storm user shares ONE Argon2id hash, "
        + ("at the production parameters (19 MiB, t=2): the distinct storm is bound by the service's Argon2 "
           "(one verify per user)" if full_argon2 else
           "a cheap one (8 KiB, t=1) so the service's Argon2 is not the bottleneck (--full-argon2: production "
           "parameters)")
        + "; the service caches a good check per (username, password HMAC)",
        "identical = same username/password, a distinct client id per client: the authn cache key holds the "
        "client id, so these are distinct keys (one authenticate callout each, nothing to coalesce)",
    ]
    if any(r.broker == RABBITMQ_MQTT for r in runs):
        lines.append(
            f"{RABBITMQ_MQTT}: RabbitMQ {rabbitmq.rabbitmq_version()} MQTT plugin, rabbitmq_auth_backend_http "
            f"(POST) behind rabbitmq_auth_backend_cache (TTL {rabbitmq.cache_ttl_ms() // 1000} s, cold: its keys "
            "hold the client id), calling the same reference service; callouts counted by the service: "
            "authn = `user` requests, other = `vhost` + `resource` + `topic`")
    lines += [
        "",
        f"{'broker':<15}{'transport':<10}{'creds':<11}{'ok':>6}{'refused':>8}{'storm s':>9}{'conn/s':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'authn':>7}{'other':>7}{'per conn':>9}{'not allow':>10}",
    ]
    for r in runs:
        lines.append(f"{r.broker:<15}{r.transport:<10}{r.credentials:<11}{r.connected:>6}{r.refused:>8}"
                     f"{r.elapsed_s:>9.2f}{r.connects_per_s:>9.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}"
                     f"{r.callouts_authenticate:>7}{r.callouts_authorize:>7}{r.callouts_per_connect:>9.2f}"
                     f"{r.callouts_not_allowed:>10}")
    ratios = rabbitmq_ratios(runs)
    if ratios:
        lines += ["", *ratios]
    lines.append("")
    for r in runs:
        if r.broker != POLYGATE:
            continue
        ok = r.refused == 0 and r.connected == r.clients and r.elapsed_s < TARGET_STORM_S
        lines.append(f"[{'MET' if ok else 'NOT MET'}] {r.transport}/{r.credentials}: {r.clients}-client storm "
                     f"done in under {TARGET_STORM_S:g} s ({r.elapsed_s:.2f} s, {r.refused} refused)")
    lines += [f"skipped: {s}" for s in skipped]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench storm", description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=DEFAULT_CLIENTS, help="clients per storm (default %(default)s)")
    parser.add_argument("--transports", default=",".join(auth_bench.TRANSPORTS),
                        help="comma-separated callout transports (default %(default)s)")
    parser.add_argument("--workers", type=int, default=4, help="client processes (default %(default)s)")
    parser.add_argument("--max-inflight", type=int, default=None,
                        help="the gateway's auth.max_inflight (default: the gateway's own default)")
    parser.add_argument("--full-argon2", action="store_true",
                        help="keep the production Argon2 parameters for the storm users' hash")
    parser.add_argument("--no-rabbitmq", dest="rabbitmq", action="store_false",
                        help="leave out the RabbitMQ MQTT peer (cached HTTP auth backend)")
    parser.add_argument("--setup", action="store_true",
                        help="install RabbitMQ when it is missing (apt-get install -y rabbitmq-server)")
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args(list(argv))
    args.transport_names = [t.strip() for t in args.transports.split(",") if t.strip()]
    unknown = set(args.transport_names) - set(auth_bench.TRANSPORTS)
    if unknown or not args.transport_names:
        parser.error(f"--transports takes {', '.join(auth_bench.TRANSPORTS)}, not {args.transports!r}")
    if args.clients < 1 or args.workers < 1:
        parser.error("--clients and --workers must be at least 1")
    return args


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    return bench_main(
        lambda log: run(args.clients, args.transport_names, args.workers, args.max_inflight,
                        rabbitmq_peer=args.rabbitmq, setup=args.setup, full_argon2=args.full_argon2, log=log),
        report=lambda result: format_report(*result, args.max_inflight, full_argon2=args.full_argon2),
        figures=lambda result: {"runs": [asdict(r) for r in result[0]], "skipped": list(result[1])},
        json_path=args.json, measured=lambda result: bool(result[0]),
        started="every gateway, RabbitMQ node, service and client process was",
    )
