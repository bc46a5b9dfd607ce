"""The brokers `python -m bench mqtt` drives, each by name, and what each needs started beside it.

Polygate runs once per auth provider: `none` (the baseline), `local` (the
root superuser, or an ACL user), and `callout` to the reference auth service
over gRPC and over HTTP, with warm caches or with every TTL at 0s (each
PUBLISH a callout). The peers are Mosquitto (no auth), amqtt's broker, and
RabbitMQ's MQTT plugin with its cached HTTP auth backend pointed at the same
reference service: the like-for-like peer of `callout`.

The reference service is a process of its own, started once per transport
and shared by every broker that needs it; its CPU is reported apart, never
counted as the broker's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench import auth_bench, peers

POLYGATE_GRPC = "polygate-grpc"
POLYGATE_HTTP = "polygate-http"
POLYGATE_GRPC_TTL0 = "polygate-grpc-ttl0"
POLYGATE_HTTP_TTL0 = "polygate-http-ttl0"
RABBITMQ_MQTT = "rabbitmq-mqtt"

WARM = "warm"
TTL0 = "ttl0"
#: name -> (callout transport, warm caches or every TTL at 0s). Plain strings: bench.auth_bench
#: imports this module's importer, so its attributes are read only once a broker starts.
CALLOUT_GATEWAYS = {
    POLYGATE_GRPC: ("grpc", WARM),
    POLYGATE_HTTP: ("http", WARM),
    POLYGATE_GRPC_TTL0: ("grpc", TTL0),
    POLYGATE_HTTP_TTL0: ("http", TTL0),
}
NAMES = (peers.POLYGATE_NONE, peers.POLYGATE_LOCAL, peers.POLYGATE_ACL, *CALLOUT_GATEWAYS,
         peers.MOSQUITTO, peers.AMQTT, RABBITMQ_MQTT)
#: What `bench mqtt` runs when not told otherwise: every provider and every peer.
DEFAULT = (peers.POLYGATE_NONE, peers.POLYGATE_LOCAL, POLYGATE_GRPC, POLYGATE_HTTP, POLYGATE_GRPC_TTL0,
           POLYGATE_HTTP_TTL0, peers.MOSQUITTO, peers.AMQTT, RABBITMQ_MQTT)
#: Per callout; the default 2s is for production, a loaded bench machine needs slack.
AUTH_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class Started:
    broker: peers.RunningBroker
    #: The reference auth service this broker calls out to, if any (its CPU is reported apart).
    auth_service: peers.RunningBroker | None = None
    #: Reads the callouts made so far: the gateway's `/metrics`, or for RabbitMQ the service's `/stats`.
    callout_counts: Callable[[], auth_bench.AuthCounts] | None = None


class Lineup:
    """Starts brokers by name under `root`; the auth services they share live until `close`."""

    def __init__(self, root: Path, *, setup: bool) -> None:
        self.root = root
        self.setup = setup
        self._services: dict[str, peers.RunningBroker] = {}
        self._users: auth_bench.BenchUsers | None = None

    def start(self, name: str) -> Started:
        """Start `name` on a free loopback port; raises peers.BrokerUnavailable with the reason."""
        workdir = self.root / name
        workdir.mkdir(parents=True, exist_ok=True)
        if name in CALLOUT_GATEWAYS:
            transport, caches = CALLOUT_GATEWAYS[name]
            ttls = auth_bench.WARM_TTLS if caches == WARM else auth_bench.COLD_TTLS
            service = self._service(transport)
            auth_yaml = auth_bench.auth_yaml(transport, ttls, url=auth_bench.service_url(service, transport),
                                             timeout_s=AUTH_TIMEOUT_S)
            broker = peers.start_gateway(name, workdir, auth_yaml=auth_yaml, credentials=self.users.load,
                                         health=True)
            return Started(broker, service, lambda: auth_bench.read_counts(broker))
        if name == RABBITMQ_MQTT:
            # Imported here: bench.rabbitmq imports bench.auth_bench, which imports this module's importer.
            from bench import rabbitmq

            service = self._service("http")
            broker = rabbitmq.start_rabbitmq_mqtt(workdir, setup=self.setup,
                                                  auth_url=auth_bench.service_url(service, "http"),
                                                  credentials=self.users.load)
            return Started(broker, service, lambda: auth_bench.read_service_counts(service))
        return Started(peers.start_broker(name, workdir, setup=self.setup))

    @property
    def users(self) -> auth_bench.BenchUsers:
        self._users_file()
        assert self._users is not None
        return self._users

    def _users_file(self) -> Path:
        """The users file the auth services read at start, written on first use."""
        path = self.root / "auth-users.yaml"
        if self._users is None:
            self._users = auth_bench.write_users(path, storm_clients=0, rounds=0)
        return path

    def _service(self, transport: str) -> peers.RunningBroker:
        service = self._services.get(transport)
        if service is None or service.process.poll() is not None:
            name = f"auth-service-{transport}"
            workdir = self.root / name
            workdir.mkdir(parents=True, exist_ok=True)
            service = peers.start_auth_service(name, workdir, users_file=self._users_file(), transport=transport)
            self._services[transport] = service
        return service

    def close(self) -> None:
        for service in self._services.values():
            service.stop()
        self._services.clear()


@contextlib.contextmanager
def lineup(root: Path, *, setup: bool) -> Iterator[Lineup]:
    started = Lineup(root, setup=setup)
    try:
        yield started
    finally:
        started.close()
