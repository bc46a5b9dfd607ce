"""A real `polygate run` process, for tests that stop it the way an operator or a crash does (SIGTERM, kill -9)."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import yaml



class GatewayProcess:
    """`python -m gateway run --config FILE` on loopback ports the OS picks; its JSON log is collected."""

    def __init__(self, workdir: Path, config: dict[str, Any], *, loop: str = "asyncio",
                 nofile: int | None = None) -> None:
        self.workdir = workdir
        #: RLIMIT_NOFILE (soft = hard) of the process, when given: a test of what a descriptor shortage does.
        self.nofile = nofile
        self.config_path = workdir / "polygate.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        # The test's root credentials (tests.conftest.root_password) reach the process.
        self.env = dict(os.environ)
        self.env["POLYGATE_EVENT_LOOP"] = loop
        self.lines: list[str] = []
        self.ports: dict[str, int] = {}
        self.process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, timeout: float = 30.0) -> GatewayProcess:
        self.lines.clear()
        self.ports.clear()
        self._ready.clear()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "--config", str(self.config_path), "--log-format", "json"],
            cwd=self.workdir, env=self.env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            preexec_fn=self._limit_descriptors if self.nofile else None,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if not self._ready.wait(timeout):
            self.kill()
            raise AssertionError("the gateway did not become ready:\n" + "".join(self.lines[-30:]))
        return self

    def _limit_descriptors(self) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.nofile, self.nofile))

    def _read(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        for line in self.process.stderr:
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == "listening":
                name = str(record.get("listener", ""))
                kind = "health" if name == "server.health_addr" else name.split(".")[1]
                self.ports.setdefault(kind, int(record["port"]))
            elif record.get("event") == "ready":
                self._ready.set()

    def port(self, kind: str) -> int:
        return self.ports[kind]

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, then wait for the process to exit; its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        if self._reader is not None:
            self._reader.join(5)
        return code

    def kill(self) -> None:
        """kill -9: no shutdown at all."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._reader is not None:
            self._reader.join(5)

    def log_text(self) -> str:
        return "".join(self.lines)

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.log_text():
            if time.monotonic() > deadline:
                raise AssertionError(f"{needle!r} not logged")
            time.sleep(0.01)
