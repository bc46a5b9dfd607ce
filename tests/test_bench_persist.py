"""`python -m bench persist` (and `bench hotpath`) produce figures; they never assert on speed."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from bench import hotpath_bench, peers, persist_bench
from tests.test_bench_smoke import _live_children

REPO = Path(__file__).resolve().parent.parent
needs_cli = pytest.mark.skipif(importlib.util.find_spec("gateway.cli") is None, reason="gateway.cli missing")
POLYGATES = (persist_bench.POLYGATE_SQLITE, persist_bench.POLYGATE_MEMORY)


@needs_cli
def test_quick_run_produces_every_part_and_skips_missing_peers_with_a_reason(tmp_path):
    brokers = (*POLYGATES, persist_bench.MOSQUITTO_PERSIST)
    options = persist_bench.quick_options(brokers=brokers, rss_brokers=brokers)
    before = _live_children()

    report = persist_bench.run(options, keep_dir=tmp_path)

    measured = {r.broker for r in report.rows if r.part == "throughput"}
    skipped = {s.broker: s.reason for s in report.skipped}
    assert set(POLYGATES) <= measured, report.skipped
    if peers.mosquitto_path():
        assert persist_bench.MOSQUITTO_PERSIST in measured, report.skipped
    else:
        assert "not installed" in skipped[persist_bench.MOSQUITTO_PERSIST]
    assert set(skipped) <= {persist_bench.MOSQUITTO_PERSIST}, report.skipped
    for row in report.rows:
        assert row.msgs_per_s > 0 and row.cpu_us_per_msg >= 0 and row.rounds == 1
        assert row.p50_ms is not None and row.p50_ms <= row.p99_ms
    # The store's own counters come from Polygate's /metrics when it is durable.
    by_name = {(r.part, r.broker): r for r in report.rows}
    assert by_name[("throughput", persist_bench.POLYGATE_SQLITE)].msgs_per_commit is not None
    assert by_name[("throughput", persist_bench.POLYGATE_MEMORY)].written_per_msg is None
    assert {r.broker for r in report.rows if r.part == "fsync"} == {
        f"polygate-fsync-{mode}" for mode in persist_bench.FSYNC_MODES}
    rss = {r.broker: r for r in report.rss}
    assert set(POLYGATES) <= set(rss)
    for r in rss.values():
        # Every queued message reached the session once it came back.
        assert r.messages == r.delivered == options.queued_messages and r.rss_after_mb > 0
    assert rss[persist_bench.POLYGATE_SQLITE].in_memory == options.queued_messages
    # One target per baseline measured or not: none is left out silently.
    assert len(report.targets) == 2 and any(t.met is not None for t in report.targets)
    text = persist_bench.format_report(report)
    assert "1. throughput" in text and "2. fsync" in text and "3. rss" in text and "targets:" in text
    json.dumps(report.to_json())
    deadline = time.monotonic() + 5
    while _live_children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live_children() - before


def test_a_broker_that_cannot_start_is_skipped_and_its_targets_not_measured(tmp_path, monkeypatch):
    def unavailable(name, workdir, *, setup):
        raise peers.BrokerUnavailable(f"{name} is not installed")

    monkeypatch.setattr(persist_bench, "start_broker", unavailable)
    options = persist_bench.quick_options(rounds=2)
    report = persist_bench.run(options, keep_dir=tmp_path)

    assert report.rows == [] and report.rss == []
    # Each broker is tried once, not once per round.
    assert sorted(s.broker for s in report.skipped if s.part == "throughput") == sorted(persist_bench.BROKERS)
    assert [t.met for t in report.targets] == [None, None, None]
    assert "skipped:" in persist_bench.format_report(report)


def test_options_and_arguments():
    options, _, _ = persist_bench.parse_args(["--quick", "--parts", "rss", "--rss-brokers", "polygate-sqlite"])
    assert options.parts == ("rss",) and options.queued_messages == persist_bench.QUICK["queued_messages"]
    with pytest.raises(ValueError, match="unknown broker"):
        persist_bench.PersistOptions(brokers=("nope",))
    with pytest.raises(ValueError, match="--fsync"):
        persist_bench.PersistOptions(fsync_modes=("sometimes",))
    assert "storage: {backend: memory}" in persist_bench.polygate_yaml(Path("/x"), "memory", "batch")
    assert "fsync: always" in persist_bench.polygate_yaml(Path("/x"), "sqlite", "always")


@needs_cli
def test_hotpath_short_run_compares_a_checkout_with_this_tree(tmp_path):
    # This tree stands in for the base checkout: the run needs a tree, not a particular one.
    options = hotpath_bench.HotpathOptions(base=REPO, brokers=(peers.POLYGATE_NONE,), variants=("base", "paced", "memory"),
                                           qos_levels=(1,), sizes=(100,), rounds=1, messages=500,
                                           warmup_messages=50, warmup_seconds=1.0, seconds=1.0)
    report = hotpath_bench.run(options, keep_dir=tmp_path)

    assert not report.skipped, report.skipped
    assert [(r.variant, r.rounds) for r in report.rows] == [("base", 1), ("paced", 1), ("memory", 1)]
    assert report.rows[1].vs_base is not None or report.rows[0].cpu_us_per_msg == 0
    assert len(report.targets) == 1
    assert "vs base" in hotpath_bench.format_report(report)
    json.dumps(report.to_json())
    with pytest.raises(ValueError, match="not a Polygate checkout"):
        hotpath_bench.HotpathOptions(base=tmp_path)
