"""`python -m bench tls` produces figures over TLS; it never asserts on speed."""

from __future__ import annotations

import dataclasses
import importlib.util
import json

import pytest

from bench import peers, tls_bench
from tests.test_bench_smoke import _live_children

needs_cli = pytest.mark.skipif(importlib.util.find_spec("gateway.cli") is None, reason="gateway.cli missing")


@needs_cli
def test_quick_run_measures_polygate_over_tls_and_skips_a_missing_mosquitto_with_a_reason(tmp_path):
    options = tls_bench.TLSOptions(**{**tls_bench.QUICK, "clients": 20})
    before = _live_children()

    report = tls_bench.run(options, keep_dir=tmp_path)

    measured = {(r.part, r.broker) for r in report.rows}
    assert {(tls_bench.THROUGHPUT, tls_bench.POLYGATE_TLS), (tls_bench.STORM, tls_bench.POLYGATE_TLS)} <= measured
    if peers.mosquitto_path():
        assert (tls_bench.THROUGHPUT, tls_bench.MOSQUITTO_TLS) in measured, report.skipped
        assert [t.met for t in report.targets] != [None]
    else:
        assert any("not installed" in reason for reason in report.skipped)
    for row in report.rows:
        assert row.rate > 0 and row.cpu >= 0 and row.lost == 0
    storm = next(s for s in report.storms if s.broker == tls_bench.POLYGATE_TLS)
    assert storm.connected == 20 and storm.refused == 0
    # The gateway served MQTT on a TLS listener only (the clients' handshakes would fail on a plain one).
    config = (tmp_path / "r1" / tls_bench.THROUGHPUT / tls_bench.POLYGATE_TLS / "polygate.yaml").read_text()
    assert "tcp: {tls: {" in config and "plain" not in config
    json.dumps(report.to_json())
    assert "targets:" in tls_bench.format_report(report)
    assert _live_children() <= before


def test_options_are_checked():
    with pytest.raises(ValueError, match="--parts"):
        tls_bench.TLSOptions(parts=("nope",))
    with pytest.raises(ValueError, match="--brokers"):
        tls_bench.TLSOptions(brokers=("rabbitmq",))
    with pytest.raises(ValueError, match="positive"):
        dataclasses.replace(tls_bench.TLSOptions(), clients=0)
