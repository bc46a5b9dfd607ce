"""RabbitMQ as a benchmark peer: installing it, and running private nodes on free loopback ports.

Every node is our own: its own node name, Erlang cookie (HOME), epmd
(`ERL_EPMD_PORT`), distribution port, data and log directories and config
files, all in the caller's workdir, so it neither sees nor disturbs a system
RabbitMQ or another benchmark's node.

- `start_rabbitmq`: AMQP 0.9.1 only, no plugins, `guest` (bench amqp).
- `start_rabbitmq_mqtt`: the MQTT plugin with `rabbitmq_auth_backend_http`
  behind `rabbitmq_auth_backend_cache`, pointed at the reference auth
  service's RabbitMQ endpoints: the like-for-like peer of Polygate's
  `callout` provider. The caller runs the auth service (a process of its
  own, never counted in the broker's CPU); `start_rabbitmq_mqtt_with_service`
  starts both.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from bench import auth_bench, load, peers

RABBITMQ = "rabbitmq"
RABBITMQ_MQTT = "rabbitmq-mqtt"
RABBITMQ_START_S = 60.0
#: The reference service's RabbitMQ endpoints (gateway.auth_server.RABBITMQ_PATHS), below its base URL.
AUTH_PATHS = {
    "user_path": "/rabbitmq/auth/user",
    "vhost_path": "/rabbitmq/auth/vhost",
    "resource_path": "/rabbitmq/auth/resource",
    "topic_path": "/rabbitmq/auth/topic",
}
MQTT_PLUGINS = ("rabbitmq_mqtt", "rabbitmq_auth_backend_http", "rabbitmq_auth_backend_cache")
#: Ours and the reference service's (LIBRARIES.md: a backlog of 128 overflowed in a 2,000-client storm).
LISTEN_BACKLOG = 4096
#: Per HTTP callout, as the storm gives the gateway (`auth.timeout: 10s`).
AUTH_HTTP_TIMEOUT_MS = 10_000
#: CONNACK "server unavailable": the node accepts TCP before its MQTT plugin can log anyone in.
_CONNACK_SERVER_UNAVAILABLE = 3
_CONNACK_MEANINGS = {1: "unacceptable protocol version", 2: "client id rejected",
                     4: "bad username or password", 5: "not authorized"}


# ---- installing ----

def rabbitmq_server_path() -> str | None:
    # The plain script, not Debian's /usr/sbin wrapper, which switches to the rabbitmq user
    # and could not write to our temp dir.
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server",):
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("rabbitmq-server") or shutil.which("rabbitmq-server", path="/usr/sbin")


def ensure_rabbitmq(*, setup: bool) -> str:
    path = rabbitmq_server_path()
    if path:
        return path
    if not setup:
        raise peers.BrokerUnavailable("rabbitmq-server is not installed; run with --setup "
                                      "(apt-get install -y rabbitmq-server)")
    peers.run_setup_command(["apt-get", "update"])
    peers.run_setup_command(["apt-get", "install", "-y", "rabbitmq-server"])
    # Debian starts the packaged service; the benchmarks run nodes of their own instead.
    subprocess.run(["service", "rabbitmq-server", "stop"], capture_output=True, check=False, timeout=60)
    path = rabbitmq_server_path()
    if not path:
        raise peers.BrokerUnavailable("apt-get installed rabbitmq-server but no rabbitmq-server script was found")
    return path


def _epmd_pids(port: int) -> set[int]:
    """The epmd daemons serving `port`: the node starts one from its environment's ERL_EPMD_PORT."""
    pids = set()
    for process in psutil.process_iter(["name"]):
        if process.info["name"] != "epmd":
            continue
        try:
            if process.environ().get("ERL_EPMD_PORT") == str(port):
                pids.add(process.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return pids


def rabbitmq_version() -> str:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "rabbitmq-server"], capture_output=True,
                            text=True, check=False, timeout=10)
    return result.stdout.strip() or "unknown"


# ---- a private node ----

@dataclass(slots=True, kw_only=True)
class RunningRabbitMQ(peers.RunningBroker):
    """A RabbitMQ node of ours; `port` is the listener the benchmark uses (AMQP or MQTT).

    `cpu_seconds()` is the process tree of the start script: beam.smp and its
    helpers (erl_child_setup, inet_gethost), not epmd (a daemon) and never the
    auth service (a process of the caller's).
    """

    node: str
    amqp_port: int
    epmd_port: int
    #: The node's environment (RABBITMQ_*, ERL_EPMD_PORT, HOME with its cookie): what rabbitmqctl needs to reach it.
    env: dict[str, str] = field(repr=False)
    #: Stopped with the node: the auth service `start_rabbitmq_mqtt_with_service` started for it.
    auth_service: peers.RunningBroker | None = None

    def stop(self) -> None:
        # SIGTERM makes the start script and beam stop the node cleanly (init:stop) in about a second;
        # `rabbitmqctl stop` would first boot a CLI node of its own for as long.
        peers.stop_process_group(self.process)
        for pid in _epmd_pids(self.epmd_port):
            try:
                psutil.Process(pid).terminate()
            except psutil.NoSuchProcess:
                pass
        if self.auth_service is not None:
            service, self.auth_service = self.auth_service, None
            service.stop()


def _node_env(workdir: Path, node: str, *, conf: Path, plugins: Path, epmd_port: int,
              dist_port: int) -> dict[str, str]:
    return {
        **os.environ,
        "RABBITMQ_NODENAME": node,
        "RABBITMQ_CONFIG_FILE": str(conf),
        # Neither /etc/rabbitmq/rabbitmq-env.conf nor advanced.config: only what is written here.
        "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
        "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(plugins),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_PID_FILE": str(workdir / "rabbit.pid"),
        # Into the start script's output, which is our log file: a failed start explains itself.
        "RABBITMQ_LOGS": "-",
        # Erlang distribution and epmd on loopback only, like the client listeners.
        "RABBITMQ_DIST_PORT": str(dist_port),
        "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": "127.0.0.1",
        "ERL_CRASH_DUMP": str(workdir / "erl_crash.dump"),
        # The Erlang cookie lives in $HOME; ours is the workdir's.
        "HOME": str(workdir),
    }


def _start_node(workdir: Path, *, setup: bool, name: str, conf_lines: list[str], plugins: tuple[str, ...],
                amqp_port: int, wait_port: int, credentials: peers.Credentials | None) -> RunningRabbitMQ:
    path = ensure_rabbitmq(setup=setup)
    workdir.mkdir(parents=True, exist_ok=True)
    node = f"polygate-bench-{secrets.token_hex(4)}@localhost"
    epmd_port, dist_port = peers.free_port(), peers.free_port()
    conf = workdir / "rabbitmq.conf"
    conf.write_text("\n".join([f"listeners.tcp.default = 127.0.0.1:{amqp_port}", *conf_lines]) + "\n")
    plugins_file = workdir / "enabled_plugins"
    plugins_file.write_text(f"[{','.join(plugins)}].\n")
    env = _node_env(workdir, node, conf=conf, plugins=plugins_file, epmd_port=epmd_port, dist_port=dist_port)
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([path], cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    broker = RunningRabbitMQ(name=name, port=wait_port, version=rabbitmq_version(), credentials=credentials,
                             process=process, log_path=log_path, node=node, amqp_port=amqp_port,
                             epmd_port=epmd_port, env=env)
    try:
        peers.wait_for_listener(process, wait_port, log_path, name=name, deadline_s=RABBITMQ_START_S)
    except BaseException:
        broker.stop()
        raise
    return broker


def start_rabbitmq(workdir: Path, *, setup: bool) -> RunningRabbitMQ:
    """AMQP 0.9.1 on a free loopback port, no plugins; clients log in as guest/guest (internal backend)."""
    port = peers.free_port()
    return _start_node(workdir, setup=setup, name=RABBITMQ, conf_lines=[], plugins=(), amqp_port=port,
                       wait_port=port, credentials=peers.Credentials(username="guest", password="guest"))


def cache_ttl_ms() -> int:
    """RabbitMQ's one cache TTL (logins and permission checks alike): the gateway's warm decision TTL."""
    ttl = auth_bench.WARM_TTLS["decision_cache_ttl"]
    if not ttl.endswith("s") or not ttl[:-1].isdigit():
        raise ValueError(f"auth_bench.WARM_TTLS decision_cache_ttl {ttl!r}: expected whole seconds like '60s'")
    return int(ttl[:-1]) * 1000


def mqtt_conf_lines(*, mqtt_port: int, auth_url: str) -> list[str]:
    """rabbitmq.conf for the MQTT peer (besides the AMQP listener)."""
    base = auth_url.rstrip("/")
    return [
        f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
        "mqtt.allow_anonymous = false",
        # Setting one listen option replaces RabbitMQ's defaults, so nodelay is spelled out too.
        f"mqtt.tcp_listen_options.backlog = {LISTEN_BACKLOG}",
        "mqtt.tcp_listen_options.nodelay = true",
        "auth_backends.1 = cache",
        "auth_cache.cached_backend = http",
        f"auth_cache.cache_ttl = {cache_ttl_ms()}",
        # POST keeps passwords out of URLs (RabbitMQ's own advice).
        "auth_http.http_method = post",
        *(f"auth_http.{key} = {base}{path}" for key, path in AUTH_PATHS.items()),
        f"auth_http.request_timeout = {AUTH_HTTP_TIMEOUT_MS}",
        f"auth_http.connection_timeout = {AUTH_HTTP_TIMEOUT_MS}",
        # Warnings and errors only: RabbitMQ logs every MQTT connection at info, Polygate does not.
        "log.console = true",
        "log.console.level = warning",
    ]


def start_rabbitmq_mqtt(workdir: Path, *, setup: bool, auth_url: str,
                        credentials: peers.Credentials) -> RunningRabbitMQ:
    """RabbitMQ's MQTT plugin on a free loopback port, its logins and checks made by the service at `auth_url`.

    `auth_url` is the reference auth service's base URL (`http://127.0.0.1:PORT`,
    `python -m gateway auth-server --transport http`); RabbitMQ calls its
    `/rabbitmq/auth/{user,vhost,resource,topic}` by POST through
    `rabbitmq_auth_backend_cache` (TTL: `cache_ttl_ms()`). Returns once an MQTT
    CONNECT with `credentials` is accepted, which proves the whole chain; the
    service must therefore be up and know these credentials. `port` is the
    MQTT port, `name` RABBITMQ_MQTT, `cpu_seconds()` RabbitMQ's alone.
    """
    amqp_port, mqtt_port = peers.free_port(), peers.free_port()
    broker = _start_node(workdir, setup=setup, name=RABBITMQ_MQTT,
                         conf_lines=mqtt_conf_lines(mqtt_port=mqtt_port, auth_url=auth_url), plugins=MQTT_PLUGINS,
                         amqp_port=amqp_port, wait_port=mqtt_port, credentials=credentials)
    try:
        wait_for_mqtt_login(broker, credentials)
    except BaseException:
        broker.stop()
        raise
    return broker


def start_rabbitmq_mqtt_guest(workdir: Path, *, setup: bool, name: str = RABBITMQ_MQTT) -> RunningRabbitMQ:
    """RabbitMQ's MQTT plugin on a free loopback port, logins by its internal backend as guest/guest.

    No auth service: bench persist compares what each broker does to keep
    messages, not auth. The plugin keeps a clean-session-0 subscriber's
    messages in a durable classic queue, publishes QoS 1 messages as
    persistent (delivery mode 2), and sends a PUBACK once the queue confirmed
    the message (publisher confirms). Its other settings are its defaults.
    """
    amqp_port, mqtt_port = peers.free_port(), peers.free_port()
    credentials = peers.Credentials(username="guest", password="guest")
    conf_lines = [
        f"mqtt.listeners.tcp.default = 127.0.0.1:{mqtt_port}",
        "mqtt.allow_anonymous = false",
        f"mqtt.tcp_listen_options.backlog = {LISTEN_BACKLOG}",
        "mqtt.tcp_listen_options.nodelay = true",
        "log.console = true",
        "log.console.level = warning",
    ]
    broker = _start_node(workdir, setup=setup, name=name, conf_lines=conf_lines, plugins=("rabbitmq_mqtt",),
                         amqp_port=amqp_port, wait_port=mqtt_port, credentials=credentials)
    try:
        wait_for_mqtt_login(broker, credentials)
    except BaseException:
        broker.stop()
        raise
    return broker


def wait_for_mqtt_login(broker: peers.RunningBroker, credentials: peers.Credentials,
                        deadline_s: float = RABBITMQ_START_S) -> None:
    """Poll with MQTT CONNECTs until one is accepted; a refusal other than "server unavailable" is final.

    Each try uses a client id of its own, so it leaves nothing the benchmark's clients could hit in a cache.
    """
    deadline = time.monotonic() + deadline_s
    while True:
        code = _try_mqtt_login(broker.port, f"bench-probe-{secrets.token_hex(4)}", credentials)
        if code == 0:
            return
        if code is not None and code != _CONNACK_SERVER_UNAVAILABLE:
            raise peers.BrokerUnavailable(
                f"{broker.name} refused the bench credentials (CONNACK {code}: {_CONNACK_MEANINGS.get(code, '?')}); "
                f"does the auth service know user {credentials.username!r}? Its output ends with:\n"
                f"{broker.log_tail()}")
        if broker.process.poll() is not None or time.monotonic() > deadline:
            raise peers.BrokerUnavailable(
                f"{broker.name} did not log in an MQTT client within {deadline_s:.0f} s (last CONNACK: {code}); "
                f"its output ends with:\n{broker.log_tail()}")
        time.sleep(0.1)


def _try_mqtt_login(port: int, client_id: str, credentials: peers.Credentials) -> int | None:
    """The CONNACK return code, or None when the connection closed or timed out without one."""
    reader = load.PacketReader()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=load.CONNECT_TIMEOUT_S) as sock:
            sock.sendall(load.connect_packet(client_id, credentials.username, credentials.password))
            while True:
                data = sock.recv(4096)
                if not data:
                    return None
                for header, body in reader.feed(data):
                    if header & 0xF0 == 0x20:
                        sock.sendall(b"\xe0\x00")
                        return body[1]
    except OSError:
        return None


def write_bench_users(path: Path) -> peers.Credentials:
    """A users file for the reference service with one user allowed `bench/#`; returns its credentials."""
    from auth_providers.local_store import hash_password
    from gateway.events import Secret

    credentials = peers.Credentials(username=peers.BENCH_USERNAME, password=secrets.token_urlsafe(18))
    user = {"username": credentials.username, "password_hash": hash_password(Secret(credentials.password)),
            "publish": [peers.ACL_PATTERN], "subscribe": [peers.ACL_PATTERN]}
    path.write_text(yaml.safe_dump({"users": [user]}, sort_keys=False))
    return credentials


def start_rabbitmq_mqtt_with_service(workdir: Path, *, setup: bool, users_file: Path | None = None,
                                     credentials: peers.Credentials | None = None) -> RunningRabbitMQ:
    """The reference auth service (HTTP, its own process) and `start_rabbitmq_mqtt` pointed at it.

    Without `users_file` (and `credentials`), a users file with one user
    allowed `bench/#` is written in `workdir`, as bench mqtt's topics need.
    Stopping the broker stops the service too; `cpu_seconds()` stays RabbitMQ's.
    """
    if (users_file is None) != (credentials is None):
        raise ValueError("give users_file and credentials together, or neither")
    workdir.mkdir(parents=True, exist_ok=True)
    if users_file is None or credentials is None:
        users_file = workdir / "auth-users.yaml"
        credentials = write_bench_users(users_file)
    service = peers.start_auth_service(f"{RABBITMQ_MQTT}-auth-service", workdir, users_file=users_file,
                                       transport="http")
    try:
        broker = start_rabbitmq_mqtt(workdir / "rabbitmq", setup=setup, auth_url=f"http://127.0.0.1:{service.port}",
                                     credentials=credentials)
    except BaseException:
        service.stop()
        raise
    broker.auth_service = service
    return broker
