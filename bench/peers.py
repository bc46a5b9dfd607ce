"""Starting and stopping the brokers under test, each on a free loopback port.

Every broker runs in its own process group so that stopping it also stops
anything it spawned; its output goes to a log file (a pipe nobody reads would
stall it) whose tail explains a failed start.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parent.parent

POLYGATE_LOCAL = "polygate"
POLYGATE_NONE = "polygate-none"
POLYGATE_ACL = "polygate-acl"
MOSQUITTO = "mosquitto"
AMQTT = "amqtt"
BROKER_NAMES = (POLYGATE_LOCAL, POLYGATE_NONE, POLYGATE_ACL, MOSQUITTO, AMQTT)

# The user the benchmark's clients connect as on the `local` provider.
BENCH_USERNAME = "bench"
# Topics the ACL user may use; the load always publishes below it.
BENCH_TOPIC_ROOT = "bench"
ACL_PATTERN = f"{BENCH_TOPIC_ROOT}/#"

START_DEADLINE_S = 20.0
STOP_GRACE_S = 3.0
LOG_TAIL_CHARS = 2000


class BrokerUnavailable(Exception):
    """A broker could not be installed or started; the message says why."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Credentials:
    username: str
    # A random password made for this run only; it protects nothing else.
    password: str = field(repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class TLSFiles:
    """A server certificate for "localhost" and its key, and the CA file a client trusts for it."""

    cert: Path
    key: Path
    ca: Path


@dataclass(slots=True, kw_only=True)
class RunningBroker:
    name: str
    port: int
    version: str
    credentials: Credentials | None
    process: subprocess.Popen[bytes]
    log_path: Path
    #: Polygate's health listener (`/metrics`), when it was started with one.
    health_port: int | None = None
    #: The CA file of its MQTT listener's certificate when that listener is TLS.
    tls_ca: str | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the broker and its live children."""
        return process_tree_cpu_seconds(self.process.pid)

    def log_tail(self) -> str:
        return read_tail(self.log_path)

    def stop(self) -> None:
        stop_process_group(self.process)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process and all its live descendants; empty once it is gone."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def process_tree_cpu_seconds(pid: int) -> float:
    total = 0.0
    for process in process_tree(pid):
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


def read_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-chars:].strip()


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the broker binds it a moment later)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stop_process_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after a grace period."""
    if process.poll() is not None:
        return
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    for sig, wait_s in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for_listener(process: subprocess.Popen[bytes], port: int, log_path: Path,
                      *, name: str, deadline_s: float = START_DEADLINE_S) -> None:
    """Poll until the broker accepts a TCP connection, it exits, or the deadline passes."""
    deadline = time.monotonic() + deadline_s
    while True:
        if process.poll() is not None:
            raise BrokerUnavailable(
                f"{name} exited with code {process.returncode} before accepting connections; "
                f"its output ends with:\n{read_tail(log_path)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BrokerUnavailable(
                f"{name} did not accept connections on 127.0.0.1:{port} within {deadline_s:.0f} s; "
                f"its output ends with:\n{read_tail(log_path)}")
        time.sleep(0.02)


def launch(argv: list[str], *, name: str, port: int, workdir: Path,
            env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_listener(process, port, log_path, name=name)
    except BaseException:
        stop_process_group(process)
        raise
    return process, log_path


# ---- installing the peers (only with --setup) ----

_apt_updated = False


def run_setup_command(argv: list[str]) -> None:
    print(f"setup: {' '.join(argv)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    result = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                            text=True, check=False, timeout=900)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:]
        raise BrokerUnavailable(f"`{' '.join(argv)}` failed with code {result.returncode}:\n{tail}")


def mosquitto_path() -> str | None:
    # Debian installs the broker in /usr/sbin, which is not on every PATH.
    return shutil.which("mosquitto") or shutil.which("mosquitto", path="/usr/sbin:/usr/local/sbin")


def ensure_mosquitto(*, setup: bool) -> str:
    global _apt_updated
    path = mosquitto_path()
    if path:
        return path
    if not setup:
        raise BrokerUnavailable(
            "mosquitto is not installed; run with --setup (apt-get install mosquitto mosquitto-clients)")
    if not _apt_updated:
        run_setup_command(["apt-get", "update"])
        _apt_updated = True
    run_setup_command(["apt-get", "install", "-y", "mosquitto", "mosquitto-clients"])
    path = mosquitto_path()
    if not path:
        raise BrokerUnavailable("apt-get installed mosquitto but no `mosquitto` binary was found")
    return path


def ensure_amqtt(*, setup: bool) -> None:
    if importlib.util.find_spec("amqtt") is not None:
        return
    if not setup:
        raise BrokerUnavailable("amqtt is not installed in this Python; run with --setup (pip install amqtt==0.12.1)")
    run_setup_command([sys.executable, "-m", "pip", "install", "amqtt==0.12.1"])
    importlib.invalidate_caches()
    if importlib.util.find_spec("amqtt") is None:
        raise BrokerUnavailable("pip installed amqtt but it is still not importable")


# ---- versions ----

def mosquitto_version(path: str) -> str:
    # `mosquitto -h` prints "mosquitto version X.Y.Z" and exits non-zero.
    result = subprocess.run([path, "-h"], capture_output=True, text=True, check=False, timeout=10)
    match = re.search(r"mosquitto version (\S+)", result.stdout + result.stderr)
    return match.group(1) if match else "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def polygate_version(source: Path | None = None) -> str:
    version = package_version("polygate")
    result = subprocess.run(["git", "-C", str(source or REPO_ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False, timeout=10)
    commit = result.stdout.strip()
    return f"{version} (git {commit})" if result.returncode == 0 and commit else version


# ---- the brokers ----

def start_mosquitto(workdir: Path, *, setup: bool, persistence: bool = False, tls: TLSFiles | None = None) -> RunningBroker:
    """Mosquitto on a free loopback port; `persistence` turns its persistence on, its database in `workdir`;
    `tls`: its listener is TLS with that certificate."""
    path = ensure_mosquitto(setup=setup)
    port = free_port()
    conf = workdir / "mosquitto.conf"
    tls_lines = f"certfile {tls.cert}\nkeyfile {tls.key}\n" if tls else ""
    if persistence:
        # Mosquitto keeps everything in memory and writes the whole database every
        # autosave_interval (default 1800 s) and at shutdown; those defaults are kept.
        data = workdir / "mosquitto-data"
        data.mkdir(parents=True, exist_ok=True)
        persistence_lines = f"persistence true\npersistence_location {data}/\n"
    else:
        persistence_lines = "persistence false\n"
    # As root it would switch to the `mosquitto` user, which can neither write into our temp
    # dirs (mode 0700) nor read a key there; `user root` keeps it as it was started.
    user_line = "user root\n" if os.geteuid() == 0 and (persistence or tls) else ""
    # log_dest stderr: mosquitto drops root privileges and could not open a log
    # file in our temp dir; stderr is the inherited log file descriptor.
    conf.write_text(
        f"listener {port} 127.0.0.1\n"
        + tls_lines + user_line +
        "allow_anonymous true\n"
        + persistence_lines +
        # Its default of 1000 queued messages per client drops QoS 1 messages a
        # busy subscriber cannot take yet; Polygate holds the publisher back
        # instead. A large bound keeps the two doing the same work.
        "max_queued_messages 1000000\n"
        "log_dest stderr\n"
        "log_type error\nlog_type warning\n")
    process, log_path = launch([path, "-c", str(conf)], name=MOSQUITTO, port=port, workdir=workdir)
    return RunningBroker(name=MOSQUITTO, port=port, version=mosquitto_version(path), credentials=None,
                         process=process, log_path=log_path, tls_ca=str(tls.ca) if tls else None)


def start_amqtt(workdir: Path, *, setup: bool) -> RunningBroker:
    ensure_amqtt(setup=setup)
    port = free_port()
    conf = workdir / "amqtt.yaml"
    # Only the anonymous auth plugin: without any auth plugin amqtt refuses
    # every CONNECT, and the logging/$SYS plugins would add work Mosquitto and
    # Polygate are not asked to do.
    conf.write_text(
        "listeners:\n"
        "  default:\n"
        "    type: tcp\n"
        f"    bind: 127.0.0.1:{port}\n"
        "plugins:\n"
        "  amqtt.plugins.authentication.AnonymousAuthPlugin:\n"
        "    allow_anonymous: true\n")
    argv = [sys.executable, "-m", "amqtt.scripts.broker_script", "-c", str(conf)]
    process, log_path = launch(argv, name=AMQTT, port=port, workdir=workdir)
    return RunningBroker(name=AMQTT, port=port, version=package_version("amqtt"), credentials=None,
                         process=process, log_path=log_path)


def gateway_env(extra: dict[str, str], *, source: Path | None = None) -> dict[str, str]:
    """The environment of a gateway process: `source` (default this working tree) first on its path."""
    env = dict(os.environ)
    # The working tree under test, whatever is installed in the venv.
    root = str(source or REPO_ROOT)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


def _gateway_cli(args: list[str], *, env: dict[str, str], workdir: Path, stdin: str | None = None) -> None:
    argv = [sys.executable, "-m", "gateway", *args]
    result = subprocess.run(argv, cwd=workdir, env=env, input=stdin, capture_output=True, text=True,
                            check=False, timeout=60)
    if result.returncode != 0:
        tail = (result.stdout + result.stderr)[-LOG_TAIL_CHARS:].strip()
        raise BrokerUnavailable(f"`python -m gateway {' '.join(args)}` failed with code "
                                f"{result.returncode}:\n{tail}")


def start_polygate(name: str, workdir: Path, *, extra_yaml: str = "", source: Path | None = None,
                   tls: TLSFiles | None = None) -> RunningBroker:
    """Polygate as `name` (its auth provider); `extra_yaml` is added to its config (e.g. a `storage:`
    block), `source` is the gateway tree to run (default this working tree)."""
    db = workdir / "auth.db"
    password = secrets.token_urlsafe(18)
    credentials: Credentials | None = Credentials(username=BENCH_USERNAME, password=password)
    if name == POLYGATE_NONE:
        auth_yaml = "auth: {provider: none}\n"
        env = gateway_env({}, source=source)
        credentials = None
    else:
        auth_yaml = f"auth: {{provider: local, local: {{db: \"{db}\"}}}}\n"
        if name == POLYGATE_LOCAL:
            # The root superuser: it bypasses ACLs.
            env = gateway_env({"POLYGATE_ROOT_USERNAME": BENCH_USERNAME, "POLYGATE_ROOT_PASSWORD": password},
                              source=source)
        else:
            # An ordinary user whose every operation goes through its ACL.
            env = gateway_env({"POLYGATE_ROOT_USERNAME": "benchroot",
                                "POLYGATE_ROOT_PASSWORD": secrets.token_urlsafe(18)}, source=source)
            _require_gateway_cli()
            _gateway_cli(["users", "add", BENCH_USERNAME, "--password-stdin", "--db", str(db)],
                         env=env, workdir=workdir, stdin=password + "\n")
            _gateway_cli(["acl", "grant", BENCH_USERNAME, ACL_PATTERN, "--ops", "publish,subscribe",
                          "--db", str(db)], env=env, workdir=workdir)
    return start_gateway(name, workdir, auth_yaml=auth_yaml + extra_yaml, credentials=credentials, env=env,
                         source=source, tls=tls)


def _require_gateway_cli() -> None:
    if importlib.util.find_spec("gateway.cli") is None:
        raise BrokerUnavailable("gateway.cli is not importable yet (the Polygate CLI is missing)")


def start_gateway(name: str, workdir: Path, *, auth_yaml: str, credentials: Credentials | None,
                  env: dict[str, str] | None = None, health: bool = False,
                  source: Path | None = None, tls: TLSFiles | None = None) -> RunningBroker:
    """`python -m gateway run` with MQTT on a free loopback port and the given `auth:` YAML block.

    `auth_yaml` may carry further top-level blocks (`storage:`, `limits:`). `health`
    also opens the health listener (`/metrics`) on another free port. `source`: the
    gateway tree to run (default this working tree); its version names its commit.
    `tls`: the MQTT listener is `server.tcp.tls` with that certificate instead of `plain`.
    """
    _require_gateway_cli()
    port = free_port()
    health_port = free_port() if health else None
    health_addr = f"127.0.0.1:{health_port}" if health_port else ""
    conf = workdir / "polygate.yaml"
    listener = (f"tls: {{addr: \"127.0.0.1:{port}\", cert_file: \"{tls.cert}\", key_file: \"{tls.key}\"}}" if tls
                else f"plain: {{addr: \"127.0.0.1:{port}\"}}")
    conf.write_text(f"server: {{tcp: {{{listener}}}, health_addr: \"{health_addr}\"}}\n" + auth_yaml)
    argv = [sys.executable, "-m", "gateway", "run", "--config", str(conf)]
    process, log_path = launch(argv, name=name, port=port, workdir=workdir,
                                env=env if env is not None else gateway_env({}, source=source))
    if health_port is not None:
        try:
            wait_for_listener(process, health_port, log_path, name=f"{name} (health listener)")
        except BaseException:
            stop_process_group(process)
            raise
    return RunningBroker(name=name, port=port, version=polygate_version(source), credentials=credentials,
                         process=process, log_path=log_path, health_port=health_port,
                         tls_ca=str(tls.ca) if tls else None)


def start_auth_service(name: str, workdir: Path, *, users_file: Path, transport: str) -> RunningBroker:
    """The reference external auth service (`python -m gateway auth-server`) on a free loopback port.

    A process of its own, so that its CPU time is never counted as the gateway's.
    """
    _require_gateway_cli()
    port = free_port()
    argv = [sys.executable, "-m", "gateway", "auth-server", "--users", str(users_file),
            "--listen", f"127.0.0.1:{port}", "--transport", transport, "--log-level", "warning"]
    process, log_path = launch(argv, name=name, port=port, workdir=workdir, env=gateway_env({}))
    return RunningBroker(name=name, port=port, version=polygate_version(), credentials=None,
                         process=process, log_path=log_path)


def fetch_metrics(health_port: int, *, timeout_s: float = 5.0) -> str:
    """The Prometheus text of a gateway's `/metrics`."""
    url = f"http://127.0.0.1:{health_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.read().decode()
    except OSError as exc:
        raise BrokerUnavailable(f"cannot read {url}: {exc}") from exc


def start_broker(name: str, workdir: Path, *, setup: bool = False) -> RunningBroker:
    """Start the named broker on a free loopback port; raises BrokerUnavailable with the reason."""
    if name in (POLYGATE_LOCAL, POLYGATE_NONE, POLYGATE_ACL):
        return start_polygate(name, workdir)
    if name == MOSQUITTO:
        return start_mosquitto(workdir, setup=setup)
    if name == AMQTT:
        return start_amqtt(workdir, setup=setup)
    raise ValueError(f"unknown broker {name!r}; choose from {', '.join(BROKER_NAMES)}")
