"""POLYGATE_EVENT_LOOP: which event loop `polygate run` uses (gateway.cli._install_uvloop)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cli import _install_uvloop
from gateway.errors import ConfigError

uvloop = pytest.importorskip("uvloop")


@pytest.fixture(autouse=True)
def restore_policy() -> Iterator[None]:
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(policy)


@pytest.fixture
def without_uvloop(monkeypatch: pytest.MonkeyPatch) -> None:
    # A None entry makes `import uvloop` raise ImportError, as when it is not installed.
    monkeypatch.setitem(sys.modules, "uvloop", None)


def _loop_class() -> type:
    loop = asyncio.new_event_loop()
    try:
        return type(loop)
    finally:
        loop.close()


@pytest.mark.parametrize("value", [None, "", "auto", "AUTO", " uvloop "])
def test_auto_and_uvloop_choose_uvloop_when_installed(value: str | None) -> None:
    environ = {} if value is None else {"POLYGATE_EVENT_LOOP": value}
    assert _install_uvloop(environ) == "uvloop"
    assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    assert _loop_class() is uvloop.Loop


def test_asyncio_chooses_the_standard_loop_even_with_uvloop_installed() -> None:
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    assert _install_uvloop({"POLYGATE_EVENT_LOOP": "asyncio"}) == "asyncio"
    assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
    assert issubclass(_loop_class(), asyncio.BaseEventLoop)


@pytest.mark.usefixtures("without_uvloop")
def test_auto_falls_back_to_asyncio_without_uvloop() -> None:
    assert _install_uvloop({"POLYGATE_EVENT_LOOP": "auto"}) == "asyncio"
    assert _install_uvloop({}) == "asyncio"
    assert issubclass(_loop_class(), asyncio.BaseEventLoop)


@pytest.mark.usefixtures("without_uvloop")
def test_uvloop_required_but_missing_is_a_clear_error() -> None:
    with pytest.raises(ConfigError) as caught:
        _install_uvloop({"POLYGATE_EVENT_LOOP": "uvloop"})
    message = str(caught.value)
    assert "POLYGATE_EVENT_LOOP" in message and "not installed" in message and "polygate[fast]" in message


def test_unknown_value_is_refused_with_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"POLYGATE_EVENT_LOOP: 'tokio' is not one of auto, asyncio, uvloop"):
        _install_uvloop({"POLYGATE_EVENT_LOOP": "tokio"})


def test_polygate_run_refuses_an_unknown_loop_before_opening_anything(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "run"],
        env={"POLYGATE_EVENT_LOOP": "fastest", "PATH": "/usr/bin:/bin"},
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2  # a configuration error, like a bad YAML key
    assert "POLYGATE_EVENT_LOOP: 'fastest' is not one of auto, asyncio, uvloop" in result.stderr
    assert "listening on" not in result.stderr
