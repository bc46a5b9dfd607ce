"""Every frontend test runs on both event loops: asyncio, and uvloop (what users get when it is installed).

`loop_name` is module-scoped so that one module runs all its tests on one loop, then on the other:
every gateway a test starts (`start_gateway`) and the test's own asyncio loop (pytest-asyncio's
`event_loop_policy`) are of that kind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from tests.conftest import LOOPS, loop_factory_of


@pytest.fixture(scope="module", params=LOOPS)
def loop_name(request: pytest.FixtureRequest) -> str:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def event_loop_policy(loop_name: str) -> asyncio.AbstractEventLoopPolicy:
    """pytest-asyncio's: the test's own loop is of the module's kind too."""
    if loop_name == "asyncio":
        return asyncio.DefaultEventLoopPolicy()
    return pytest.importorskip("uvloop").EventLoopPolicy()  # type: ignore[no-any-return]


@pytest.fixture
def gateway_loop_factory(loop_name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    return loop_factory_of(loop_name)
