"""The memory, storm and authpath benchmarks produce figures; they never assert on speed."""

from __future__ import annotations

import importlib.util
import os
import resource

import pytest

from bench import authpath_bench, connections, memory_bench, peers, rabbitmq, storm_bench

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


# ---- RabbitMQ's MQTT plugin with the cached HTTP backend, the peer of the callout provider ----

RABBITMQ_TESTS_ENV = "POLYGATE_RABBITMQ_TESTS"


def test_rabbitmq_peer_calls_the_services_rabbitmq_endpoints():
    from gateway.auth_server import RABBITMQ_PATHS

    assert rabbitmq.AUTH_PATHS == dict(RABBITMQ_PATHS)
    lines = rabbitmq.mqtt_conf_lines(mqtt_port=1234, auth_url="http://127.0.0.1:5678/")
    assert "mqtt.listeners.tcp.default = 127.0.0.1:1234" in lines and "mqtt.allow_anonymous = false" in lines
    assert ["auth_backends.1 = cache", "auth_cache.cached_backend = http"] == [
        line for line in lines if line.startswith(("auth_backends", "auth_cache.cached"))]
    # One TTL in RabbitMQ: the gateway's warm decision TTL (60s).
    assert "auth_cache.cache_ttl = 60000" in lines
    assert "auth_http.topic_path = http://127.0.0.1:5678/rabbitmq/auth/topic" in lines


def _storm_run(broker: str, transport: str, kind: str, conn_per_s: float, p99_ms: float,
               per_connect: float) -> storm_bench.StormRun:
    return storm_bench.StormRun(
        broker=broker, transport=transport, credentials=kind, clients=100, connected=100, refused=0,
        elapsed_s=100 / conn_per_s, connects_per_s=conn_per_s, p50_ms=p99_ms / 2, p99_ms=p99_ms, max_ms=p99_ms,
        callouts_authenticate=100, callouts_authorize=0, callouts_not_allowed=0, callouts_per_connect=per_connect)


def test_storm_report_puts_rabbitmq_beside_polygate_with_ratios():
    runs = [_storm_run(storm_bench.POLYGATE, "http", storm_bench.DISTINCT, 1000.0, 50.0, 1.0),
            _storm_run(storm_bench.RABBITMQ_MQTT, "http", storm_bench.DISTINCT, 250.0, 400.0, 3.0)]
    ratios = storm_bench.rabbitmq_ratios(runs)
    assert "4.00x" in ratios[-1] and "0.12x" in ratios[-1] and "1.00 vs 3.00" in ratios[-1]
    text = storm_bench.format_report(runs, ["grpc: not measured"], None)
    assert "rabbitmq_auth_backend_cache" in text and "rabbitmq-mqtt  http      distinct" in text
    # The 2 s target is Polygate's; RabbitMQ's rows are figures only.
    assert text.count("-client storm done in under") == 1
    assert storm_bench.rabbitmq_ratios(runs[:1]) == []


@needs_cli
@pytest.mark.skipif(rabbitmq.rabbitmq_server_path() is None, reason="rabbitmq-server is not installed")
@pytest.mark.skipif(os.environ.get(RABBITMQ_TESTS_ENV) != "1",
                    reason=f"boots RabbitMQ (~20 s); set {RABBITMQ_TESTS_ENV}=1 to run it")
def test_storm_short_run_against_rabbitmq_counts_callouts_at_the_service():
    runs, skipped = storm_bench.run(20, ["http"], workers=2, max_inflight=None, rabbitmq_peer=True)

    assert not skipped, skipped
    peer = [r for r in runs if r.broker == storm_bench.RABBITMQ_MQTT]
    assert [r.credentials for r in peer] == [storm_bench.DISTINCT, storm_bench.IDENTICAL]
    for r in peer:
        assert r.connected == 20 and r.refused == 0 and r.callouts_not_allowed == 0
        # A cold cache (its keys hold the client id): at least one login check per client, and a vhost check.
        assert r.callouts_authenticate >= 20 and r.callouts_authorize >= 20
        assert r.callouts_per_connect >= 2 and 0 < r.p50_ms <= r.p99_ms <= r.max_ms
    text = storm_bench.format_report(runs, skipped, None)
    assert "polygate / rabbitmq-mqtt, same storm" in text
