"""What every `python -m bench <name>` does around its measurement, in one place.

SIGTERM and Ctrl-C end the run through every `finally` (so nothing started is
left running), the report goes to stdout, the figures to `--json FILE`, and the
exit code says whether anything was measured.
"""

from __future__ import annotations

import json
import signal
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar

R = TypeVar("R")
Log = Callable[[str], None]


class Verdict(Protocol):
    """A target of an issue as a benchmark judged it."""

    @property
    def met(self) -> bool | None: ...
    @property
    def description(self) -> str: ...
    @property
    def detail(self) -> str: ...


def verdict(met: bool | None) -> str:
    return {True: "MET", False: "NOT MET", None: "NOT MEASURED"}[met]


def target_lines(targets: Iterable[Verdict], prefix: str = "") -> list[str]:
    """One report line per target: `[MET] <prefix><description>: <detail>`."""
    return [f"  [{verdict(target.met)}] {prefix}{target.description}: {target.detail}" for target in targets]


def csv_items(text: str) -> tuple[str, ...]:
    """The items of a comma-separated command-line value, blanks left out."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def terminate_on_sigterm() -> None:
    """Turn SIGTERM into an exception so every `finally` stops what it started."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bench_main(
    measure: Callable[[Log], R],
    *,
    report: Callable[[R], str],
    figures: Callable[[R], Any],
    json_path: Path | None,
    measured: Callable[[R], bool],
    started: str,
    failures: tuple[type[BaseException], ...] = (),
) -> int:
    """Run `measure`, print its report, write its figures; `started` names what gets stopped."""
    terminate_on_sigterm()
    try:
        result = measure(log_to_stderr)
    except failures as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"interrupted; {started} stopped", file=sys.stderr)
        return 130
    except SystemExit as exc:
        print(f"terminated; {started} stopped", file=sys.stderr)
        return int(exc.code or 1)
    print(report(result))
    if json_path is not None:
        json_path.write_text(json.dumps(figures(result), indent=2) + "\n")
        print(f"\nfigures written to {json_path}")
    return 0 if measured(result) else 1
