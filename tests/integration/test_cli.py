"""The `polygate` command as a user runs it: a real process."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import cli_env
from tests.paho_client import PahoClient

BROKEN = """\
server:
  tcp:
    plain: {addr: "127.0.0.1:99999"}
  health_addr: 8081
auth:
  provider: ldap
  timeout: fast
  bogus_key: 1
limits:
  max_message_size: -5
"""


def polygate(*args: str, cwd: Path | None = None, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=60,
        cwd=cwd, env=cli_env(), **kwargs,  # type: ignore[arg-type]
    )


def test_check_config_lists_every_error_with_its_key_path(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = polygate("check-config", str(path))
    assert result.returncode == 2
    for key in ("server.tcp.plain.addr", "server.health_addr", "auth.provider", "auth.timeout",
                "auth.bogus_key", "limits.max_message_size"):
        assert re.search(rf"^\s*{re.escape(key)}: ", result.stderr, re.M), (key, result.stderr)


def test_check_config_accepts_the_documented_example() -> None:
    example = Path(__file__).resolve().parents[2] / "configs" / "polygate.yaml"
    result = polygate("check-config", str(example))
    assert result.returncode == 0, result.stderr


def test_run_refuses_bad_config_before_listening(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text(BROKEN)
    result = polygate("run", "--config", str(path))
    assert result.returncode == 2
    assert "auth.timeout" in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_run_on_defaults_prints_root_password_once_and_stops_cleanly(tmp_path: Path) -> None:
    """`polygate run` with no config: local provider, database in the working directory."""
    # The defaults use fixed ports; this test needs them free, so it uses a config
    # equal to the defaults but for the ports chosen at run time.
    mqtt_port, http_port, health_port = _free_port(), _free_port(), _free_port()
    config = tmp_path / "defaults.yaml"
    config.write_text(
        f'server:\n  tcp: {{plain: {{addr: "127.0.0.1:{mqtt_port}"}}}}\n'
        f'  http: {{plain: {{addr: "127.0.0.1:{http_port}"}}}}\n'
        f'  health_addr: "127.0.0.1:{health_port}"\n'
    )
    env = cli_env()
    env.pop("POLYGATE_ROOT_USERNAME", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "--config", str(config), "--log-format", "json"],
        cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        password = None
        deadline = time.monotonic() + 30
        lines = []
        assert process.stderr is not None
        while time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            found = re.search(r"password: (\S+)", line)
            if found:
                password = found.group(1)
            if '"event": "ready"' in line:
                break
        assert password, "".join(lines)
        assert (tmp_path / "polygate-auth.db").exists()
        client = PahoClient(mqtt_port, client_id="first", username="root", password=password)
        assert client.connect()[0] == 0
        client.disconnect()
        process.send_signal(signal.SIGTERM)
        _, rest = process.communicate(timeout=20)
        assert process.returncode == 0
        # The password was shown once, in the banner, and never logged.
        assert "".join(lines).count(password) + rest.count(password) == 1
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_python_dash_m_gateway_and_console_script_agree() -> None:
    result = polygate("--version")
    assert result.returncode == 0 and result.stdout.startswith("polygate ")
    script = Path(sys.executable).with_name("polygate")
    if script.exists():
        assert subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=30).stdout == result.stdout
    assert os.path.exists(Path(sys.executable))


def test_deploy_configs_are_valid(tmp_path: Path) -> None:
    import yaml

    root = Path(__file__).resolve().parents[2]
    assert polygate("check-config", str(root / "deploy" / "polygate.container.yaml")).returncode == 0
    documents = list(yaml.safe_load_all((root / "deploy" / "kubernetes" / "polygate.yaml").read_text()))
    embedded = tmp_path / "configmap.yaml"
    embedded.write_text(documents[0]["data"]["polygate.yaml"])
    result = polygate("check-config", str(embedded))
    assert result.returncode == 0, result.stderr
