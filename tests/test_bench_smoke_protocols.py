"""The latency and AMQP benchmarks produce figures; they never assert on speed."""

from __future__ import annotations

import importlib.util
import json

import pytest

from bench import amqp_bench, latency_bench

needs_cli = pytest.mark.skipif(importlib.util.find_spec("gateway.cli") is None, reason="gateway.cli missing")
needs_pika = pytest.mark.skipif(importlib.util.find_spec("pika") is None, reason="pika is not installed")


@needs_cli
@needs_pika
def test_latency_short_run_reports_every_path_against_the_baseline(tmp_path):
    paths = (latency_bench.BASELINE, (latency_bench.AMQP091, latency_bench.MQTT))
    report = latency_bench.run(latency_bench.LatencyOptions(paths=paths, messages=20, warmup=2), keep_dir=tmp_path)

    assert not report.skipped, report.skipped
    assert [r.path for r in report.results] == ["mqtt -> mqtt", "amqp091 -> mqtt"]
    for r in report.results:
        assert r.received == r.sent == 20 and r.lost == 0
        assert 0 < r.p50_ms <= r.p99_ms <= r.max_ms
    assert report.results[0].ratio_p50_to_baseline == pytest.approx(1.0)
    assert "p50 / mqtt->mqtt" in latency_bench.format_report(report)
    json.dumps(report.to_json())


def test_latency_summary_and_path_validation():
    result = latency_bench.summarise("x", 5, [1_000_000, 2_000_000, 3_000_000, 4_000_000])
    assert (result.received, result.lost, result.p50_ms, result.max_ms) == (4, 1, 2.5, 4.0)
    with pytest.raises(ValueError, match="unknown path"):
        latency_bench.LatencyOptions(paths=(("mqtt", "coap"),))


@needs_cli
@needs_pika
def test_amqp_short_run_against_polygate(tmp_path):
    options = amqp_bench.AmqpOptions(brokers=(amqp_bench.POLYGATE,), messages=200, warmup=20)
    report = amqp_bench.run(options, keep_dir=tmp_path)

    assert not report.skipped, report.skipped
    [m] = report.measurements
    assert m.received == m.sent == 200 and m.lost == 0 and m.msgs_per_s > 0 and m.cpu_us_per_msg >= 0
    assert "polygate-none" in amqp_bench.format_report(report)
    json.dumps(report.to_json())
