"""The memory, storm and authpath benchmarks produce figures; they never assert on speed."""

from __future__ import annotations

import importlib.util
import resource

import pytest

from bench import authpath_bench, connections, memory_bench, peers, storm_bench

needs_cli = pytest.mark.skipif(importlib.util.find_spec("gateway.cli") is None, reason="gateway.cli missing")


@needs_cli
def test_memory_short_run_measures_rss_per_connection():
    runs, skipped = memory_bench.run([50], [peers.POLYGATE_NONE], workers=2)

    assert not skipped, skipped
    (run,) = runs
    assert run.broker == peers.POLYGATE_NONE and run.connected == 50
    assert run.rss_before_kb > 0 and run.rss_after_kb > 0
    assert run.broker_nofile_soft != 0
    text = memory_bench.format_report(runs, skipped)
    assert "KB/conn" in text and "polygate-none" in text and "16 KB" in text


@needs_cli
def test_storm_short_run_counts_one_authenticate_callout_per_client():
    runs, skipped = storm_bench.run(20, ["grpc"], workers=2, max_inflight=None)

    assert not skipped, skipped
    assert [(r.transport, r.credentials) for r in runs] == [("grpc", storm_bench.DISTINCT),
                                                          ("grpc", storm_bench.IDENTICAL)]
    for r in runs:
        assert r.connected == 20 and r.refused == 0
        # The authn cache key holds the client id: identical credentials still call out per client.
        assert r.callouts_authenticate == 20 and r.callouts_not_allowed == 0
        assert r.elapsed_s > 0 and 0 < r.p50_ms <= r.p99_ms <= r.max_ms
    text = storm_bench.format_report(runs, skipped, None)
    assert text.count("20-client storm done in under 2 s") == 2 and "cheap one" in text


@needs_cli
def test_authpath_short_run_hits_miss_and_coalesces():
    runs = authpath_bench.run(hits=1000, misses=20, concurrency=50, batches=2)

    by_case = {(r.case.split()[0], r.provider): r for r in runs}
    assert by_case["hit", "none"].callouts == 0 and by_case["hit", "callout"].callouts == 0
    assert by_case["miss", "callout"].callouts == 20
    # 50 identical uncached decisions at once share one callout, per batch.
    assert by_case["coalesced", "callout"].callouts == 2 and by_case["coalesced", "callout"].decisions == 100
    assert all(r.wall_s > 0 and r.decisions_per_s > 0 for r in runs)
    assert "µs/decision" in authpath_bench.format_report(runs)


def test_connections_split_and_nofile_limit():
    assert connections.split(tuple(range(7)), 3) == [(0, 1, 2), (3, 4), (5, 6)]
    assert connections.split((1,), 4) == [(1,)]
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert connections.raise_nofile_limit(16) == soft      # never lowered
    assert storm_bench.percentile([3.0, 1.0, 2.0], 0.5) == 2.0 and storm_bench.percentile([], 0.99) == 0.0
