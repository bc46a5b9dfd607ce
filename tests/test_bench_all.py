"""`python -m bench all --quick`: every part runs for about a second and lands in one report; no speed asserts."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import all_bench

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(importlib.util.find_spec("gateway.cli") is None, reason="gateway.cli missing")
def test_bench_all_quick_runs_every_part_into_one_report_and_json(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run([sys.executable, "-m", "bench", "all", "--quick", "--json", str(out)], cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                            timeout=240, check=False)

    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for part in all_bench.PARTS:
        assert f"==== {part} (" in result.stdout
    targets = result.stdout.split("==== targets")[1]
    assert "MET]" in targets and "failed parts" not in targets
    figures = json.loads(out.read_text())
    assert set(figures["parts"]) == set(all_bench.PARTS)
    assert all(part["error"] is None for part in figures["parts"].values())
    assert figures["parts"]["mqtt"]["figures"]["measurements"]
    assert figures["parts"]["mqtt"]["targets"]


def test_unknown_parts_are_refused() -> None:
    with pytest.raises(SystemExit):
        all_bench.parse_args(["--parts", "mqtt,nope"])
    assert all_bench.parse_args(["--parts", "storm,mqtt"]).part_names == ["storm", "mqtt"]
