"""The Eclipse Paho MQTT interoperability client tests (eclipse/paho.mqtt.testing), run against a gateway.

Upstream's code is never copied into this repository: it is found at test time
(`$POLYGATE_PAHO_TESTING`, a checkout or a git directory, then the mirror
path), its `interoperability` directory is extracted to a temporary directory,
and each upstream test runs in a subprocess of its own, with a time limit, by
the driver at the bottom of this file (`python tests/paho_testing.py ...`).

The driver imports nothing from this repository: the subprocess sees only the
standard library and upstream's own `mqtt` client package.
"""

from __future__ import annotations

import ast
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

ENV_VAR = "POLYGATE_PAHO_TESTING"
MIRROR = Path("/work/.mirror/eclipse+paho.mqtt.testing/repo")
INTEROP = "interoperability"

#: Suite name -> upstream module in the interoperability directory.
SUITES = {"3.1.1": "client_test", "5": "client_test5"}

#: The module globals each upstream file sets in its `__main__` block before `unittest.main()`
#: (client_test5's setUpClass then resets topics, wildtopics and nosubscribe_topics itself).
_V5_PREFIX = "client_test5/"
_TOPICS = ("TopicA", "TopicA/B", "Topic/C", "TopicA/C", "/TopicA")
_WILDTOPICS = ("TopicA/+", "+/C", "#", "/#", "/+", "+/+", "TopicA/#")
_NOSUBSCRIBE = ("test/nosubscribe",)
SUITE_GLOBALS: dict[str, dict[str, object]] = {
    "client_test": {"topics": _TOPICS, "wildtopics": _WILDTOPICS, "nosubscribe_topics": _NOSUBSCRIBE},
    "client_test5": {
        "topic_prefix": _V5_PREFIX,
        "topics": [_V5_PREFIX + topic for topic in _TOPICS],
        "wildtopics": [_V5_PREFIX + topic for topic in _WILDTOPICS],
        "nosubscribe_topics": _NOSUBSCRIBE,
    },
}


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Where upstream's files are: a directory holding `interoperability/`, or a git directory."""

    path: Path
    is_git: bool

    def read(self, name: str) -> str:
        """The text of `interoperability/<name>`."""
        if self.is_git:
            return _git(self.path, "show", f"HEAD:{INTEROP}/{name}").decode("utf-8")
        return (self.path / INTEROP / name).read_text(encoding="utf-8")

    def extract(self, dest: Path) -> Path:
        """Copy `interoperability/` below `dest`; its path (upstream's code then runs from there)."""
        if self.is_git:
            archive = _git(self.path, "archive", "--format=tar", "HEAD", INTEROP)
            with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
                tar.extractall(dest, filter="data")
        else:
            shutil.copytree(self.path / INTEROP, dest / INTEROP, ignore=shutil.ignore_patterns("__pycache__"))
        return dest / INTEROP


def _git(git_dir: Path, *args: str) -> bytes:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], check=True, capture_output=True,
                          timeout=60).stdout


def _source_at(path: Path) -> Source | None:
    if (path / INTEROP / "client_test5.py").is_file():
        return Source(path=path, is_git=False)
    if shutil.which("git") is None or not path.is_dir():
        return None
    try:
        _git(path, "cat-file", "-e", f"HEAD:{INTEROP}/client_test5.py")
    except (subprocess.SubprocessError, OSError):
        return None
    return Source(path=path, is_git=True)


def locate() -> tuple[Source | None, str]:
    """(the source, "") or (None, why there is none): $POLYGATE_PAHO_TESTING first, then the mirror."""
    tried = []
    given = os.environ.get(ENV_VAR, "")
    if given:
        source = _source_at(Path(given))
        if source is not None:
            return source, ""
        tried.append(f"${ENV_VAR}={given} (no {INTEROP}/client_test5.py there, as a checkout or a git dir)")
    source = _source_at(MIRROR)
    if source is not None:
        return source, ""
    tried.append(f"{MIRROR} (absent{'' if shutil.which('git') else ', or no git'})")
    return None, ("eclipse/paho.mqtt.testing is not on this machine: tried " + "; ".join(tried)
                  + f". Set ${ENV_VAR} to a checkout or a git directory of it to run these tests.")


def test_names(source_text: str) -> list[str]:
    """The test methods unittest would run in the file's TestCase classes, in file order."""
    names: list[str] = []
    for node in ast.parse(source_text).body:
        if isinstance(node, ast.ClassDef) and any(
            (isinstance(base, ast.Attribute) and base.attr == "TestCase")
            or (isinstance(base, ast.Name) and base.id == "TestCase") for base in node.bases
        ):
            names += [item.name for item in node.body
                      if isinstance(item, ast.FunctionDef) and item.name.startswith("test")]
    return names


@dataclass(frozen=True, slots=True, kw_only=True)
class UpstreamRun:
    """What one upstream test did in its subprocess."""

    module: str
    name: str
    #: None when the time limit killed it.
    returncode: int | None
    output: str
    seconds: float
    limit: float

    @property
    def passed(self) -> bool:
        return self.returncode == 0

    def first_failure(self) -> str:
        """Where it first failed: the upstream line and the exception of the first traceback printed.

        Upstream tests often catch an assertion, print its traceback and then fail
        on `assertEqual(succeeded, True)`, and its client prints the tracebacks of
        its receiver thread: the first traceback is the cause. When that one is
        not in the test's own file, the first one that is follows it.
        """
        if self.returncode is None:
            return f"no result within {self.limit:.0f} s (killed); last output: {_tail(self.output, 3)}"
        blocks = _tracebacks(self.output)
        if not blocks:
            return f"exit code {self.returncode}, no traceback; last output: {_tail(self.output, 3)}"
        first = blocks[0]
        summary = first.describe(self.module)
        if not first.in_file(self.module):
            own = next((block for block in blocks if block.in_file(self.module)), None)
            if own is not None:
                summary += "; then " + own.describe(self.module)
        return summary


@dataclass(frozen=True, slots=True)
class _Traceback:
    #: (file, line number, source line) of each frame, outermost first.
    frames: tuple[tuple[str, str, str], ...]
    exception: str

    def in_file(self, module: str) -> bool:
        return any(Path(file).stem == module for file, _, _ in self.frames)

    def describe(self, module: str) -> str:
        """`file:line code -> exception`, at the innermost frame of `module`'s file, else the innermost frame."""
        if not self.frames:
            return self.exception
        own = [frame for frame in self.frames if Path(frame[0]).stem == module]
        file, line, code = (own or list(self.frames))[-1]
        name = file.split(f"/{INTEROP}/", 1)[-1]
        return f"{name}:{line} {code} -> {self.exception}"


_FRAME = re.compile(r'\s+File "(?P<file>[^"]+)", line (?P<line>\d+), in ')


def _tracebacks(output: str) -> list[_Traceback]:
    """The tracebacks printed in `output`, in order."""
    lines = output.splitlines()
    found: list[_Traceback] = []
    index = 0
    while index < len(lines):
        if not lines[index].startswith("Traceback (most recent call last):"):
            index += 1
            continue
        frames: list[tuple[str, str, str]] = []
        index += 1
        while index < len(lines) and (not lines[index] or lines[index][0].isspace()):
            frame = _FRAME.match(lines[index])
            if frame:
                following = lines[index + 1] if index + 1 < len(lines) else ""
                is_code = following.startswith("    ") and not _FRAME.match(following)
                frames.append((frame["file"], frame["line"], following.strip() if is_code else ""))
            index += 1
        exception = lines[index] if index < len(lines) else "(traceback cut off)"
        found.append(_Traceback(tuple(frames), exception))
        index += 1
    return found


def _tail(text: str, count: int) -> str:
    return " | ".join(text.strip().splitlines()[-count:]) or "(none)"


def run_upstream(interop_dir: Path, module: str, name: str, host: str, port: int, *,
                 limit: float = 30.0) -> UpstreamRun:
    """Run one upstream test (`module`.Test.`name`, with its setUpClass) against host:port in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(interop_dir)
    env["PYTHONUNBUFFERED"] = "1"
    command = [sys.executable, str(Path(__file__).resolve()), str(interop_dir), module, name, host, str(port)]
    started = time.monotonic()
    try:
        done = subprocess.run(command, cwd=interop_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              timeout=limit, check=False)
    except subprocess.TimeoutExpired as expired:
        output = expired.output or b""
        return UpstreamRun(module=module, name=name, returncode=None, output=_text(output),
                           seconds=time.monotonic() - started, limit=limit)
    return UpstreamRun(module=module, name=name, returncode=done.returncode, output=_text(done.stdout),
                       seconds=time.monotonic() - started, limit=limit)


def _text(output: bytes | str) -> str:
    return output if isinstance(output, str) else output.decode("utf-8", "replace")


def _drive(argv: list[str]) -> NoReturn:
    """In the subprocess: set the upstream module's globals and run one of its tests."""
    import importlib
    import logging
    import unittest

    interop_dir, module_name, test_name, host, port = argv
    # Upstream's own `mqtt` package, not anything beside this file.
    sys.path[:] = [interop_dir] + [entry for entry in sys.path[1:] if entry != interop_dir]
    logging.getLogger().setLevel(logging.ERROR)  # as upstream's __main__
    module = importlib.import_module(module_name)
    for key, value in SUITE_GLOBALS[module_name].items():
        setattr(module, key, value)
    setattr(module, "host", host)
    setattr(module, "port", int(port))
    suite = unittest.TestSuite([module.Test(test_name)])  # with the class's setUpClass
    result = unittest.TextTestRunner(stream=sys.stdout, verbosity=2).run(suite)
    sys.stdout.flush()
    # Upstream clients leave receiver threads behind; do not wait for them.
    os._exit(0 if result.wasSuccessful() and result.testsRun == 1 else 1)


if __name__ == "__main__":
    _drive(sys.argv[1:])
