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
"""

from __future__ import annotations

import argparse
import secrets
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from argon2 import PasswordHasher, Type

from bench.entry import bench_main
from bench import auth_bench, connections, mqtt_bench, peers

DEFAULT_CLIENTS = 2000
TARGET_STORM_S = 2.0
DISTINCT = "distinct"
IDENTICAL = "identical"
FD_HEADROOM = 256


@dataclass(frozen=True, slots=True, kw_only=True)
class StormRun:
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
    callouts_authenticate: int
    callouts_authorize: int
    callouts_not_allowed: int


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


def storm(gateway: peers.RunningBroker, transport: str, kind: str, users: Sequence[peers.Credentials],
          workers: int) -> StormRun:
    run_id = secrets.token_hex(4)
    client_ids = tuple(f"storm-{kind}-{run_id}-{i}" for i in range(len(users)))
    pairs = tuple((u.username, u.password) for u in users)
    plans = [connections.ConnectPlan(host="127.0.0.1", port=gateway.port, client_ids=ids, credentials=creds)
             for ids, creds in zip(connections.split(client_ids, workers), connections.split(pairs, workers))]
    before = auth_bench.read_counts(gateway)
    with connections.held_connections(gateway, plans) as opened:
        counts = auth_bench.read_counts(gateway) - before
    elapsed = max(opened.elapsed_s, 1e-9)
    return StormRun(
        transport=transport, credentials=kind, clients=len(users), connected=opened.connected,
        refused=opened.refused, elapsed_s=elapsed, connects_per_s=opened.connected / elapsed,
        p50_ms=percentile(opened.latencies, 0.50) * 1e3, p99_ms=percentile(opened.latencies, 0.99) * 1e3,
        max_ms=max(opened.latencies, default=0.0) * 1e3, callouts_authenticate=counts.authenticate,
        callouts_authorize=counts.authorize, callouts_not_allowed=counts.not_allowed)


def run(clients: int, transports: Sequence[str], workers: int, max_inflight: int | None, *,
        full_argon2: bool = False, log: Callable[[str], None] = lambda line: None) -> tuple[list[StormRun], list[str]]:
    connections.raise_nofile_limit(clients + FD_HEADROOM)   # inherited by the gateways spawned below
    runs: list[StormRun] = []
    skipped: list[str] = []
    with tempfile.TemporaryDirectory(prefix="polygate-storm-bench-") as tmp:
        root = Path(tmp)
        log("hashing the storm users' password (one Argon2 hash shared by all) ...")
        users_file = root / "auth-users.yaml"
        users = auth_bench.write_users(users_file, clients, len(transports))
        if not full_argon2:
            cheapen_storm_hashes(users_file, users)
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
                    runs.append(storm(gateway, transport, kind, storm_users, workers))
            except (peers.BrokerUnavailable, mqtt_bench.RunFailed) as exc:
                log(f"{transport} skipped: {exc}")
                skipped.append(f"{transport}: {str(exc).splitlines()[0]}")
            finally:
                for process in (gateway, service):
                    if process is not None:
                        process.stop()
    return runs, skipped


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
        "",
        f"{'transport':<10}{'creds':<11}{'ok':>6}{'refused':>8}{'storm s':>9}{'conn/s':>9}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'authn callouts':>16}{'not allow':>11}",
    ]
    for r in runs:
        lines.append(f"{r.transport:<10}{r.credentials:<11}{r.connected:>6}{r.refused:>8}{r.elapsed_s:>9.2f}"
                     f"{r.connects_per_s:>9.0f}{r.p50_ms:>9.1f}{r.p99_ms:>9.1f}{r.max_ms:>9.1f}"
                     f"{r.callouts_authenticate:>16}{r.callouts_not_allowed:>11}")
    for r in runs:
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
                        full_argon2=args.full_argon2, log=log),
        report=lambda result: format_report(*result, args.max_inflight, full_argon2=args.full_argon2),
        figures=lambda result: {"runs": [asdict(r) for r in result[0]], "skipped": list(result[1])},
        json_path=args.json, measured=lambda result: bool(result[0]),
        started="every gateway, service and client process was",
    )
