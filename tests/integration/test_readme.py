"""README.md's examples, run as written: a README example that no test runs does not stay in the README.

Every code block is read from README.md at test time, so an edit that breaks an
example breaks its test. Only what must change to run under test is
substituted: ports (the OS picks them, on 127.0.0.1), temporary paths and
certificates the test makes, credentials the test creates.
`test_every_code_block_has_its_test` fails when a block is added that no
test here runs. Which test runs which block:

- intro, sh (install + run; run the tests): `test_the_test_command_is_what_ci_runs`,
  `test_polygate_run_without_a_config_listens_on_the_documented_defaults`
- Configuration walkthrough, sh: `test_check_config_line_accepts_the_documented_config`
- Configuration walkthrough, yaml: `test_small_deployment_config_checks_and_serves_every_listener`
- Users and ACLs, sh: `test_users_and_acls_example_works_as_written`
- External auth (callout), yaml + sh: `test_callout_example_authenticates_against_the_reference_auth_server`
- Connecting, sh (mosquitto, curl): `test_mosquitto_and_curl_lines_publish_and_stream`
- Connecting, python (paho): `test_paho_example_publishes`
- Connecting, sh (aiocoap-client): `test_aiocoap_client_line_publishes`
- Connecting, python (aiocoap observe): `test_coap_observe_example_prints_each_message`
- Connecting, python (pika, proton): `test_amqp_examples_publish`
- inline commands in the prose: `test_inline_commands`; the benchmark commands (in the prose and in
  bench/README.md): `test_benchmark_commands_and_their_flags_exist` (they cannot run in a test: see its docstring)

Every test that starts a gateway runs it on both event loops (`loop_name`,
tests/integration/conftest.py): a gateway thread on that loop, or a real
`polygate run` process with POLYGATE_EVENT_LOOP set to it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

from auth_providers.local_store import LocalStore
from gateway.config import default_config
from gateway.events import Secret
from tests.conftest import ROOT_USER, cli_env, loopback_config
from tests.gateway_thread import GatewayThread
from tests.integration.test_websocket import _server_certificate
from tests.paho_client import PahoClient

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
#: The bin directory of this environment: its `polygate`, `aiocoap-client` and `python` are what the README runs.
VENV_BIN = Path(sys.executable).parent
DEADLINE = 10.0
LOOPBACK = {"addr": "127.0.0.1:0"}
#: Every protocol of the "Connecting" section, besides the MQTT and HTTP listeners of `loopback_config`.
EVERY_PROTOCOL = {"coap": {"plain": LOOPBACK}, "amqp": {"plain": LOOPBACK}, "amqp091": {"plain": LOOPBACK}}

#: (section, language) -> number of code blocks, each run by the test named in the module docstring.
BLOCKS = {
    ("", "sh"): 1,
    ("Configuration walkthrough", "sh"): 1,
    ("Configuration walkthrough", "yaml"): 1,
    ("Users and ACLs (provider `local`)", "sh"): 1,
    ("External auth: the `callout` provider", "yaml"): 1,
    ("External auth: the `callout` provider", "sh"): 1,
    ("Connecting", "sh"): 2,
    ("Connecting", "python"): 3,
}


@pytest.fixture(scope="module")
def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
    """No test here is a coroutine: only the tests that start a gateway take `loop_name` (and run twice)."""
    return asyncio.DefaultEventLoopPolicy()


# -- reading the README ---------------------------------------------------------------------------------------


def section(title: str) -> str:
    """The text of the README section under `## title`; "" is the text before the first section."""
    text = README.read_text()
    if not title:
        return text[:text.index("\n## ")]
    start = text.index(f"## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def commands(block: str) -> list[str]:
    """The commands of a shell block: continued lines joined, comment and blank lines left out."""
    joined = re.sub(r"\\\n\s*", "", block)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def substitute(text: str, replacements: dict[str, str]) -> str:
    """`text` with each key replaced; a key the README no longer has fails the test (and says which)."""
    for old, new in replacements.items():
        assert old in text, f"the README example no longer has {old!r}:\n{text}"
        text = text.replace(old, new)
    return text


# -- running README commands ----------------------------------------------------------------------------------


def readme_env(**extra: str) -> dict[str, str]:
    """The environment of a reader of the README: this environment's `polygate` first on PATH."""
    env = cli_env()
    env["PATH"] = f"{VENV_BIN}:{env.get('PATH', '')}"
    env.update(extra)
    return env


def shell(script: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run README shell lines with bash, this environment's `polygate` first on PATH."""
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd, env=env or readme_env(),
                          capture_output=True, text=True, timeout=60)


def need(*tools: str) -> None:
    """The README's client tools; CI installs them (.ci/run), so only a machine without them skips."""
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (.ci/run installs them)")


class Background:
    """A command that runs until it is stopped (a subscriber, a server): its output kept line by line."""

    def __init__(self, argv: list[str], *, cwd: Path, env: dict[str, str]) -> None:
        self.argv = argv
        self.out: list[str] = []
        self.err: list[str] = []
        self._changed = threading.Condition()
        self._open = 2
        self.process = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True, start_new_session=True)
        self._readers = [threading.Thread(target=self._read, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.out), (self.process.stderr, self.err))]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    def expect(self, pattern: str, *, count: int = 1, stream: str = "out", timeout: float = DEADLINE) -> re.Match[str]:
        """The `count`-th line of stdout (or stderr) that `pattern` matches, waited for up to `timeout`."""
        lines = self.out if stream == "out" else self.err
        regex = re.compile(pattern)

        def found() -> re.Match[str] | None:
            matches = [match for match in map(regex.search, lines) if match]
            return matches[count - 1] if len(matches) >= count else None

        with self._changed:
            self._changed.wait_for(lambda: found() is not None or self._open == 0, timeout)
            match = found()
        assert match is not None, (
            f"{shlex.join(self.argv)}: no {count} line(s) matching {pattern!r} on std{stream} within {timeout}s"
            f" (exit code {self.process.poll()})\nstdout:\n" + "\n".join(self.out[-30:])
            + "\nstderr:\n" + "\n".join(self.err[-30:])
        )
        return match

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, as an operator stops it, then SIGKILL to its whole group if it lingers; its exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        for reader in self._readers:
            reader.join(5)
        return self.process.returncode

    def __enter__(self) -> Background:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def metric(health_port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(f"{name} ")]
    assert len(values) == 1, f"{name} is not in /metrics"
    return values[0]


def wait_until(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        time.sleep(0.02)


def wait_for_subscriptions(gw: GatewayThread, count: int) -> None:
    """Until the router holds `count` subscriptions: a subscriber that runs on its own has subscribed."""
    wait_until(lambda: metric(gw.health_port, "polygate_subscriptions") == count, f"{count} subscription(s)")


@contextmanager
def subscriber(gw: GatewayThread, password: str, topic_filter: str = "tenants/alice/#") -> Iterator[PahoClient]:
    """An independent MQTT subscriber (paho, as root) that sees what an example published."""
    client = PahoClient(gw.mqtt_port, client_id="readme-check", username=ROOT_USER, password=password).connect_ok()
    try:
        assert client.subscribe((topic_filter, 1)) == [1]
        yield client
    finally:
        client.disconnect()


# -- every block has its test ---------------------------------------------------------------------------------


def test_every_code_block_has_its_test() -> None:
    text = README.read_text()
    titles = [""] + re.findall(r"^## (.+)$", text, re.M)
    found: Counter[tuple[str, str]] = Counter()
    for title in titles:
        for language in re.findall(r"^```(\S*)\n.*?^```", section(title), re.S | re.M):
            found[(title, language)] += 1
    assert dict(found) == BLOCKS, (
        "README.md's code blocks changed: every example must be run by a test in this file "
        "(then update BLOCKS), or leave the README"
    )


# -- the first two commands -----------------------------------------------------------------------------------


def first_commands() -> tuple[str, str]:
    install_and_run, run_tests = commands(code_blocks(section(""), "sh")[0])
    return install_and_run, run_tests


def test_the_test_command_is_what_ci_runs() -> None:
    """CI (.ci/run) runs the README's test command verbatim; the install command installs `polygate`."""
    install_and_run, run_tests = first_commands()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = ci.index("# The README's test command, verbatim:")
    assert ci[marker + 1] == run_tests
    # `pip install -e .` cannot run in a test; what it provides can be checked: the `polygate` script
    # (this environment was installed the same way), which the README then runs with no config.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["polygate"] == "gateway.cli:main"
    assert (VENV_BIN / "polygate").exists()
    steps = install_and_run.split(" && ")
    assert steps == ["python3 -m venv .venv", ".venv/bin/pip install -e .", ".venv/bin/polygate run"], steps
    assert run_tests.split(" && ")[:2] == ["python3 -m venv .venv", ".venv/bin/pip install -e '.[test]'"]
    assert "test" in pyproject["project"]["optional-dependencies"]


#: Runs in a network namespace of its own (or on the host): `polygate run` on its fixed default ports,
#: then one probe per listener. argv: the command (JSON), the listeners (JSON: [kind, host, port]).
DEFAULTS_PROBE = r'''
import fcntl, json, os, re, signal, socket, struct, subprocess, sys, threading, time, urllib.request
from tests.paho_client import PahoClient

command, listeners = json.loads(sys.argv[1]), json.loads(sys.argv[2])
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # `ip link set lo up` (down in a fresh namespace)
    flags = struct.unpack("16sH", fcntl.ioctl(s, 0x8913, struct.pack("16sH", b"lo", 0)))[1]
    if not flags & 1:
        fcntl.ioctl(s, 0x8914, struct.pack("16sH", b"lo", flags | 1))
gateway = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
lines, ready = [], threading.Event()
def read():
    for line in gateway.stderr:
        lines.append(line)
        if re.search(r"polygate \S+ ready", line):
            ready.set()
    ready.set()
threading.Thread(target=read, daemon=True).start()
try:
    assert ready.wait(30) and gateway.poll() is None, "not ready:\n" + "".join(lines)
    assert f"event loop: {os.environ['POLYGATE_EVENT_LOOP']}" in "".join(lines), "".join(lines)
    for kind, host, port in listeners:
        if kind == "coap":  # a CoAP ping (empty confirmable message) is answered with a reset
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                udp.settimeout(5)
                udp.sendto(b"\x40\x00\x12\x34", (host, port))
                answer = udp.recv(64)
            assert answer[0] & 0x30 == 0x30 and answer[2:4] == b"\x12\x34", (kind, answer)
        else:
            socket.create_connection((host, port), timeout=5).close()
    ports = {kind: (host, port) for kind, host, port in listeners}
    client = PahoClient(ports["tcp"][1], client_id="probe", username=os.environ["POLYGATE_ROOT_USERNAME"],
                        password=os.environ["POLYGATE_ROOT_PASSWORD"]).connect_ok()
    client.disconnect()
    with urllib.request.urlopen("http://%s:%d/ready" % ports["health"], timeout=5) as response:
        assert response.status == 200
finally:
    if gateway.poll() is None:
        gateway.send_signal(signal.SIGTERM)
    try:
        code = gateway.wait(20)
    finally:
        if gateway.poll() is None:
            gateway.kill()
assert code == 0, ("exit code", code, "".join(lines))
print("ok")
'''

#: The README's words for the default listeners, and their `server` kinds.
DEFAULT_NAMES = {"MQTT": "tcp", "HTTP": "http", "CoAP": "coap", "AMQP 1.0": "amqp", "AMQP 0.9.1": "amqp091",
                 "health": "health"}


def network_namespace() -> list[str] | None:
    """A prefix that runs a command in a network namespace of its own (a loopback no one else uses)."""
    if shutil.which("unshare") is None:
        return None
    for prefix in (["unshare", "--user", "--map-root-user", "--net"], ["unshare", "--net"]):
        if subprocess.run([*prefix, "true"], capture_output=True, timeout=10).returncode == 0:
            return prefix
    return None


def test_polygate_run_without_a_config_listens_on_the_documented_defaults(tmp_path: Path, loop_name: str) -> None:
    """The README's first command ends in `.venv/bin/polygate run`: no config, the defaults it lists.

    The defaults are fixed ports, so the gateway runs in a network namespace of its own where they are
    free whatever else runs on this machine. tests/integration/test_cli.py checks the rest of a first
    start (the root password banner, the database in the working directory, a clean SIGTERM).
    """
    comment = re.search(r"# Install and run on the defaults \((.*?)\):", section(""), re.S)
    assert comment, "the README no longer lists the defaults before its first command"
    listed = re.sub(r"\s*#\s*", " ", comment.group(1))
    host = re.fullmatch(r".*, all on (\S+)", listed)
    assert host, listed
    documented: dict[str, tuple[str, int]] = {}
    for name, port in re.findall(r"([A-Za-z][\w .]*?) :(\d+)(?:/udp)?(?:,|$)", listed.rsplit(", all on", 1)[0]):
        documented[DEFAULT_NAMES[name.strip()]] = (host.group(1), int(port))
    server = default_config().server
    actual = {kind: (listener.host, listener.port) for kind in ("tcp", "websocket", "http", "coap", "amqp", "amqp091")
              for listener in getattr(server, kind)}
    assert server.health is not None
    actual["health"] = (server.health.host, server.health.port)
    assert actual == documented

    command = first_commands()[0].split(" && ")[-1]
    argv = shlex.split(command.replace(".venv/bin/", f"{VENV_BIN}/"))
    assert argv == [str(VENV_BIN / "polygate"), "run"]
    prefix = network_namespace()
    if prefix is None:
        # No namespace here (a container without the privilege): the host's ports must then be free.
        for kind, (address, port) in documented.items():
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM if kind == "coap" else socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((address, port))
                except OSError:
                    pytest.skip(f"no network namespace to run in, and {address}:{port} is in use on this machine")
        prefix = []
    probe = tmp_path / "probe.py"
    probe.write_text(DEFAULTS_PROBE)
    env = readme_env(POLYGATE_EVENT_LOOP=loop_name, POLYGATE_ROOT_USERNAME=ROOT_USER,
                     POLYGATE_ROOT_PASSWORD="readme-defaults", PYTHONPATH=str(ROOT))
    listeners = json.dumps([[kind, address, port] for kind, (address, port) in documented.items()])
    result = subprocess.run([*prefix, sys.executable, str(probe), json.dumps(argv), listeners], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stdout + result.stderr
    assert (tmp_path / "polygate-auth.db").exists()


# -- Configuration walkthrough --------------------------------------------------------------------------------


def test_check_config_line_accepts_the_documented_config() -> None:
    (block,) = code_blocks(section("Configuration walkthrough"), "sh")
    result = shell(block, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "configs/polygate.yaml: ok\n"


def localized(config_text: str, tmp_path: Path) -> tuple[str, Path]:
    """A README config as written, but for what must change under test.

    Every listener on 127.0.0.1:0, TLS files this test makes, the database and the store in `tmp_path`.
    Returns the config and the (self-signed) server certificate.
    The text itself is edited (not a re-dump of the parsed YAML), so that `check-config` sees the README's
    YAML with its comments, quoting and any duplicate key.
    """
    data = yaml.safe_load(config_text)
    cert_file, key_file = _server_certificate(tmp_path)
    new: dict[str, str] = {}
    for kind, listeners in data.get("server", {}).items():
        if kind == "health_addr":
            new[listeners] = "127.0.0.1:0"
        elif isinstance(listeners, dict):
            for listener in listeners.values():
                new[listener["addr"]] = "127.0.0.1:0"
                for key, made in (("cert_file", cert_file), ("key_file", key_file), ("ca_file", cert_file)):
                    if key in listener:
                        new[listener[key]] = str(made)
    if "db" in data.get("auth", {}).get("local", {}):
        new[data["auth"]["local"]["db"]] = str(tmp_path / "auth.db")
    if "path" in data.get("storage", {}):
        new[data["storage"]["path"]] = str(tmp_path / "polygate-data")
    text = config_text
    for old in sorted(new, key=len, reverse=True):
        text, count = re.subn(rf"(?<![\w.:/-]){re.escape(old)}(?![\w.:/-])", new[old], text)
        assert count, f"{old!r} not found as written in:\n{config_text}"
    server = yaml.safe_load(text).get("server", {})
    addrs = [listener["addr"] for listeners in server.values() if isinstance(listeners, dict)
             for listener in listeners.values()] + [server.get("health_addr", "127.0.0.1:0")]
    assert set(addrs) == {"127.0.0.1:0"}, text
    return text, cert_file


def check_config(path: Path) -> None:
    result = subprocess.run([str(VENV_BIN / "polygate"), "check-config", str(path)], capture_output=True, text=True,
                            timeout=60, env=readme_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{path}: ok\n"


def test_small_deployment_config_checks_and_serves_every_listener(
    tmp_path: Path, root_password: str, start_gateway: Callable[..., GatewayThread]
) -> None:
    (block,) = code_blocks(section("Configuration walkthrough"), "yaml")
    config = tmp_path / "small.yaml"
    text, cert_file = localized(block, tmp_path)
    config.write_text(text)
    check_config(config)
    gw = start_gateway(yaml.safe_load(text))
    assert gw.gateway is not None
    tcp = dict(zip((listener.name for listener in gw.config.server.tcp), (port for _, port in gw.gateway.bound("tcp"))))
    assert set(tcp) == {"server.tcp.plain", "server.tcp.tls"}
    anonymous = PahoClient(tcp["server.tcp.plain"], client_id="anonymous")
    try:
        assert anonymous.connect()[0] == 5  # allow_anonymous: false
    finally:
        anonymous.disconnect()
    plain = PahoClient(tcp["server.tcp.plain"], client_id="plain", username=ROOT_USER, password=root_password)
    secure = PahoClient(tcp["server.tcp.tls"], client_id="tls", username=ROOT_USER, password=root_password)
    secure.client.tls_set(ca_certs=str(cert_file))
    try:
        plain.connect_ok()
        assert plain.subscribe(("tenants/#", 1)) == [1]
        secure.connect_ok()
        secure.publish("tenants/acme/tls", b"over tls", qos=1)
        assert plain.next_message().payload == b"over tls"
        request = urllib.request.Request(f"http://127.0.0.1:{gw.http_port}/tenants/acme/http?qos=1", data=b"over http",
                                         method="POST",
                                         headers={"Authorization": "Basic " + base64.b64encode(
                                             f"{ROOT_USER}:{root_password}".encode()).decode()})
        with urllib.request.urlopen(request, timeout=DEADLINE) as response:
            assert response.status == 202
        assert plain.next_message().payload == b"over http"
        with urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/ready", timeout=DEADLINE) as response:
            assert response.status == 200
    finally:
        secure.disconnect()
        plain.disconnect()
    assert (tmp_path / "auth.db").exists() and (tmp_path / "polygate-data").is_dir()


# -- Users and ACLs -------------------------------------------------------------------------------------------


def test_users_and_acls_example_works_as_written(
    tmp_path: Path, root_password: str, gateway_loop_factory: Callable[[], asyncio.AbstractEventLoop]
) -> None:
    """Deny entries narrow a wildcard: alice keeps `tenants/alice/#` but never sees its secrets."""
    lines = [line for line in code_blocks(section("Users and ACLs (provider `local`)"), "sh")[0].splitlines() if line]
    revoke = [line for line in lines if " acl revoke " in line]
    before = [line for line in lines if line not in revoke]
    result = shell("\n".join(before), tmp_path)
    assert result.returncode == 0, result.stderr
    assert "tenants/alice/secrets/#" in result.stdout  # `acl list alice` shows the deny entry

    config = loopback_config(tmp_path, auth={"local": {"db": str(tmp_path / "polygate-auth.db")}})
    with GatewayThread.from_dict(config, loop_factory=gateway_loop_factory) as gw:
        alice = PahoClient(gw.mqtt_port, client_id="alice-1", username="alice", password="s3cret").connect_ok()
        assert alice.subscribe(("tenants/alice/#", 1)) == [1]
        assert alice.subscribe(("tenants/alice/secrets/#", 1)) == [0x80]
        root = PahoClient(gw.mqtt_port, client_id="root", username=ROOT_USER, password=root_password).connect_ok()
        root.publish("tenants/alice/secrets/key", b"hidden", qos=1)
        root.publish("tenants/alice/temp", b"21.5", qos=1)
        received = alice.next_message()
        assert (received.topic, received.payload) == ("tenants/alice/temp", b"21.5")
        assert alice.messages.empty()
        alice.disconnect()

        result = shell("\n".join(revoke), tmp_path)
        assert result.returncode == 0, result.stderr
        again = PahoClient(gw.mqtt_port, client_id="alice-2", username="alice", password="s3cret").connect_ok()
        # README: changes apply to connected clients' next operations within 2 seconds.
        deadline = time.monotonic() + 2.5
        while again.subscribe(("tenants/alice/#", 1)) != [0x80]:
            assert time.monotonic() < deadline, "the revoke did not apply within 2 seconds"
            time.sleep(0.05)
        again.disconnect()
        root.disconnect()


# -- External auth: callout -----------------------------------------------------------------------------------

#: What my-callout.yaml adds to the README's `auth` block: listeners on loopback ports the OS picks
#: (without a `server` section the gateway would take its fixed default ports).
LOOPBACK_SERVER = """
server:
  tcp:
    plain: {addr: "127.0.0.1:0"}
  health_addr: "127.0.0.1:0"
  shutdown_timeout: 2s
"""


def test_callout_example_authenticates_against_the_reference_auth_server(tmp_path: Path, loop_name: str) -> None:
    """`polygate auth-server ... --transport grpc`, then `polygate run --config my-callout.yaml`, the config
    being the section's YAML block; clients are then checked against configs/auth-users.example.yaml."""
    text = section("External auth: the `callout` provider")
    (config_block,) = code_blocks(text, "yaml")
    as_written = tmp_path / "callout.yaml"
    as_written.write_text(config_block)
    check_config(as_written)

    (block,) = code_blocks(text, "sh")
    serve, run = commands(block)
    assert run == "polygate run --config my-callout.yaml"
    env = readme_env(POLYGATE_EVENT_LOOP=loop_name)
    serve_argv = shlex.split(substitute(serve, {"--listen 127.0.0.1:7016": "--listen 127.0.0.1:0"}), comments=True)
    with Background(serve_argv, cwd=ROOT, env=env) as auth_server:
        port = auth_server.expect(r"auth server listening on grpc://127\.0\.0\.1:(\d+)", stream="err").group(1)
        (tmp_path / "my-callout.yaml").write_text(
            substitute(config_block, {'url: "127.0.0.1:7016"': f'url: "127.0.0.1:{port}"'}) + LOOPBACK_SERVER
        )
        with Background(shlex.split(run), cwd=tmp_path, env=env) as gateway:
            gateway.expect(r"polygate \S+ ready", stream="err")
            gateway.expect(rf"event loop: {loop_name}", stream="err")
            mqtt = int(gateway.expect(r"listening on 127\.0\.0\.1:(\d+) \(server\.tcp\.plain\)", stream="err").group(1))
            # configs/auth-users.example.yaml: "device-1", password "device-1-secret" (in its comments).
            wrong = PahoClient(mqtt, client_id="d0", username="device-1", password="not-its-password")
            try:
                assert wrong.connect()[0] == 4
            finally:
                wrong.disconnect()
            device = PahoClient(mqtt, client_id="d1", username="device-1", password="device-1-secret").connect_ok()
            try:
                assert device.subscribe(("tenants/acme/+/status", 1)) == [1]
                assert device.subscribe(("tenants/acme/#", 1)) == [0x80]
                device.publish("tenants/acme/d1/status", b"up", qos=1)
                assert device.next_message().payload == b"up"
            finally:
                device.disconnect()
            assert gateway.stop() == 0, gateway.err[-20:]
        assert auth_server.stop() == 0, auth_server.err[-20:]


# -- Connecting -----------------------------------------------------------------------------------------------


@pytest.fixture
def connecting(start_gateway: Callable[..., GatewayThread], db_path: str) -> GatewayThread:
    """A gateway with every protocol on loopback and the README's user alice (as "Users and ACLs" makes her)."""
    users = LocalStore(db_path)
    users.add_user("alice", Secret("s3cret"))
    users.grant("alice", "tenants/alice/#", {"publish", "subscribe"})
    users.close()
    return start_gateway(server=EVERY_PROTOCOL)


def test_mosquitto_and_curl_lines_publish_and_stream(connecting: GatewayThread, tmp_path: Path) -> None:
    """mosquitto_sub and the SSE stream each get what mosquitto_pub and both curl POSTs publish (202 each)."""
    need("mosquitto_sub", "mosquitto_pub", "curl")
    gw = connecting
    block = code_blocks(section("Connecting"), "sh")[0]
    lines = commands(substitute(block, {"-p 1883 ": f"-p {gw.mqtt_port} ",
                                        "http://127.0.0.1:8080/": f"http://127.0.0.1:{gw.http_port}/"}))
    (sub,) = [line for line in lines if line.startswith("mosquitto_sub ")]
    (pub,) = [line for line in lines if line.startswith("mosquitto_pub ")]
    (sse,) = [line for line in lines if line.startswith("curl -N ")]
    posts = [line for line in lines if line.startswith("curl ") and line != sse]
    assert len(posts) == 2 and len(lines) == 5, lines
    # The lines run as written; the status each curl got is added by a curlrc of the test's own.
    (tmp_path / ".curlrc").write_text('write-out = "\\nHTTP %{http_code}\\n"\n')
    env = readme_env(CURL_HOME=str(tmp_path))
    before = metric(gw.health_port, "polygate_subscriptions")
    with Background(shlex.split(sub), cwd=tmp_path, env=env) as mqtt_sub, \
            Background(shlex.split(sse), cwd=tmp_path, env=env) as stream:
        wait_for_subscriptions(gw, int(before) + 2)
        for number, line in enumerate([pub, *posts], start=1):
            result = shell(line, tmp_path, env)
            assert result.returncode == 0, (line, result.stdout, result.stderr)
            if line.startswith("curl "):
                assert result.stdout.endswith("\nHTTP 202\n"), (line, result.stdout)
            mqtt_sub.expect(r"^tenants/alice/temp 21\.5$", count=number)
            event = json.loads(stream.expect(r"^data: (.*)$", count=number).group(1))
            assert (event["topic"], base64.b64decode(event["payload"])) == ("tenants/alice/temp", b"21.5")


def test_paho_example_publishes(connecting: GatewayThread, root_password: str, tmp_path: Path) -> None:
    code = substitute(code_blocks(section("Connecting"), "python")[0],
                      {'"127.0.0.1", 1883': f'"127.0.0.1", {connecting.mqtt_port}'})
    with subscriber(connecting, root_password) as check:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=readme_env(), capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        message = check.next_message()
        assert (message.topic, message.payload) == ("tenants/alice/temp", b"21.5")


def test_aiocoap_client_line_publishes(connecting: GatewayThread, root_password: str, tmp_path: Path) -> None:
    """aiocoap's own CLI (installed with Polygate's dependencies) publishes to an MQTT subscriber."""
    (line,) = commands(code_blocks(section("Connecting"), "sh")[1])
    assert line.startswith("aiocoap-client -m POST ")
    command = substitute(line, {"coap://127.0.0.1/": f"coap://127.0.0.1:{connecting.port('coap')}/"})
    with subscriber(connecting, root_password) as check:
        result = shell(command, tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == ""  # the 2.04 has no payload to print
        message = check.next_message()
        assert (message.topic, message.payload) == ("tenants/alice/temp", b"21.5")


def test_coap_observe_example_prints_each_message(connecting: GatewayThread, root_password: str,
                                                  tmp_path: Path) -> None:
    """The observer keeps printing: one line per message, its topic from Location-Path."""
    gw = connecting
    code = substitute(code_blocks(section("Connecting"), "python")[1],
                      {"coap://127.0.0.1/": f"coap://127.0.0.1:{gw.port('coap')}/"})
    before = metric(gw.health_port, "polygate_subscriptions")
    with Background([sys.executable, "-u", "-c", code], cwd=tmp_path, env=readme_env()) as observer:
        wait_for_subscriptions(gw, int(before) + 1)
        publisher = PahoClient(gw.mqtt_port, client_id="readme-publisher", username=ROOT_USER,
                               password=root_password).connect_ok()
        try:
            publisher.publish("tenants/alice/temp", b"21.5", qos=1)
            observer.expect(r"^tenants/alice/temp b'21\.5'$")
            publisher.publish("tenants/alice/hum", b"40", qos=0)
            observer.expect(r"^tenants/alice/hum b'40'$")
        finally:
            publisher.disconnect()


def test_amqp_examples_publish(connecting: GatewayThread, root_password: str, tmp_path: Path) -> None:
    """pika (AMQP 0.9.1, amq.topic) and python-qpid-proton (AMQP 1.0) each publish once."""
    code = substitute(code_blocks(section("Connecting"), "python")[2], {
        '"127.0.0.1", 5682': f'"127.0.0.1", {connecting.port("amqp091")}',
        "amqp://127.0.0.1:5672": f"amqp://127.0.0.1:{connecting.port('amqp')}",
    })
    with subscriber(connecting, root_password) as check:
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=readme_env(), capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result.stderr
        assert [(m.topic, m.payload) for m in check.expect(2)] == [("tenants/alice/temp", b"21.5")] * 2


# -- Benchmarks and inline commands ---------------------------------------------------------------------------


def test_benchmark_commands_and_their_flags_exist(capsys: pytest.CaptureFixture[str]) -> None:
    """The benchmarks are run by hand (minutes to half an hour, `--setup` installs Debian packages), never here;
    tests/test_bench_*.py run each for about a second. What this checks: every `python -m bench NAME --flags`
    command, in the README's prose and in bench/README.md, names a benchmark whose `--help` lists those flags
    (`[--flag VALUE]` is an optional one), and `all` runs every benchmark named but `hotpath`. `--help` goes through bench's
    own entry point (`bench.__main__.main`), in this process."""
    from bench.__main__ import main as bench_main
    from bench.all_bench import PARTS

    prose = re.sub(r"\s+", " ", section("Benchmarks"))
    lines = re.findall(r"`(python -m bench [^`]+)`", prose)
    assert lines == ["python -m bench all --setup"], lines
    for block in code_blocks((ROOT / "bench" / "README.md").read_text(), "sh"):
        lines += [line for line in commands(block) if line.startswith("python -m bench ")]
    runs: list[list[str]] = []
    for line in lines:
        argv = shlex.split(line.replace("[", " ").replace("]", " "), comments=True)
        assert argv[:3] == ["python", "-m", "bench"] and len(argv) >= 4, line
        runs.append([argv[3]] + [arg for arg in argv[4:] if arg.startswith("--")])
    # `hotpath` compares this tree with a checkout of another commit (`--base`), so `all` cannot run it.
    assert len(runs) > 20 and {name for name, *_ in runs} - {"all", "hotpath"} <= set(PARTS)
    for name, *flags in runs:
        with pytest.raises(SystemExit) as exit_code:
            bench_main([name, "--help"])
        assert exit_code.value.code == 0, (name, capsys.readouterr().err)
        usage = capsys.readouterr().out
        assert usage.startswith(f"usage: python -m bench {name} "), usage
        for flag in flags:
            assert re.search(rf"^\s+{re.escape(flag)}\b", usage, re.M), (name, flag, usage)


def test_inline_commands(tmp_path: Path) -> None:
    """Commands written inline in the prose: pip extras, the build packages, `polygate hash-password`."""
    text = README.read_text()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    extras = re.findall(r"pip install -e '\.\[(\w+)\]'", text)
    assert "fast" in extras
    for extra in extras:
        assert pyproject["project"]["optional-dependencies"][extra], extra
    # `pip install -e '.[fast]'` adds uvloop.
    assert any(req.startswith("uvloop") for req in pyproject["project"]["optional-dependencies"]["fast"])
    # `apt-get install gcc cmake libssl-dev`; `.ci/run` installs them when missing.
    (packages,) = re.findall(r"`apt-get\s+install ([^`]+)`", text)
    ci = (ROOT / ".ci" / "run").read_text()
    (ci_packages,) = re.findall(r"^for pkg in (.*); do$", ci, re.M)
    assert set(packages.split()) <= set(ci_packages.split())
    # `polygate hash-password` prints an Argon2id PHC hash of a password read from stdin (m=19 MiB, t=2, p=1).
    assert "`polygate hash-password`" in text
    result = shell("printf '%s' 's3cret' | polygate hash-password", tmp_path)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"\$argon2id\$v=19\$m=19456,t=2,p=1\$\S+\n", result.stdout), result.stdout
