"""The MQTT benchmark produces figures; it never asserts on speed."""

from __future__ import annotations

import importlib.util
import json
import time

import psutil
import pytest

from bench import auth_bench, load, mqtt_bench, peers


def _available_brokers() -> tuple[str, ...]:
    brokers = []
    if importlib.util.find_spec("gateway.cli") is not None:
        brokers.append(peers.POLYGATE_NONE)
    if peers.mosquitto_path():
        brokers.append(peers.MOSQUITTO)
    if not brokers:
        brokers.append(peers.AMQTT)
    return tuple(brokers)


def test_short_run_produces_figures_for_every_available_broker(tmp_path):
    brokers = _available_brokers()
    options = mqtt_bench.BenchOptions(brokers=brokers, qos_levels=(0, 1), messages=3_000, seconds=1.0,
                                      warmup_messages=200, warmup_seconds=1.0)
    before = _live_children()

    report = mqtt_bench.run(options, keep_dir=tmp_path)

    assert not report.skipped, report.skipped
    assert {(m.broker, m.qos) for m in report.measurements} == {(b, q) for b in brokers for q in (0, 1)}
    for m in report.measurements:
        assert m.sent > 0 and 0 < m.received <= m.sent and m.lost == m.sent - m.received
        assert m.msgs_per_s > 0 and m.window_s > 0
        assert m.broker_cpu_s >= 0 and m.cpu_us_per_msg >= 0
    # psutil counts CPU in clock ticks, so one short run may round to zero; all of them cannot.
    assert sum(m.broker_cpu_s for m in report.measurements) > 0
    assert report.machine["nproc"] >= 1 and report.versions
    text = mqtt_bench.format_report(report)
    assert all(name in text for name in brokers) and "targets:" in text
    json.dumps(report.to_json())
    # Every broker and load process is gone.
    deadline = time.monotonic() + 5
    while _live_children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live_children() - before


def _live_children() -> set[int]:
    live = set()
    for child in psutil.Process().children(recursive=True):
        try:
            # multiprocessing's resource tracker and fork server live as long as this process, by design.
            cmdline = " ".join(child.cmdline())
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in cmdline \
                    and "forkserver" not in cmdline:
                live.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return live


def test_missing_gateway_cli_or_peer_is_a_skip_with_a_reason(tmp_path, monkeypatch):
    def unavailable(name, workdir, *, setup=False):
        raise peers.BrokerUnavailable(f"{name} is not installed")

    monkeypatch.setattr(peers, "start_broker", unavailable)
    report = mqtt_bench.run(mqtt_bench.BenchOptions(brokers=(peers.MOSQUITTO,)), keep_dir=tmp_path)
    assert report.measurements == []
    assert [(s.broker, s.qos, s.reason) for s in report.skipped] == [
        (peers.MOSQUITTO, None, "mosquitto is not installed")]
    assert all(t.met is None for t in report.targets)


def _measurement(broker: str, cpu_us: float, qos: int = 1) -> mqtt_bench.Measurement:
    return mqtt_bench.Measurement(
        broker=broker, qos=qos, sent=1000, received=1000, lost=0, window_s=1.0, delivery_s=1.0,
        msgs_per_s=1000.0, broker_cpu_s=cpu_us * 1e-3, cpu_us_per_msg=cpu_us, broker_cpu_pct=10.0,
        publisher_cpu_pct=10.0, subscriber_cpu_pct=10.0, load_saturated=False)


@pytest.mark.parametrize(("polygate_us", "expect_vs_mosquitto", "expect_vs_amqtt"), [
    (15.0, True, True),     # 1.5x mosquitto's 10 µs, 20x below amqtt's 300 µs
    (16.0, False, True),
    (31.0, False, False),
])
def test_targets_and_ratios(polygate_us, expect_vs_mosquitto, expect_vs_amqtt):
    measurements = [_measurement(peers.POLYGATE_LOCAL, polygate_us), _measurement(peers.MOSQUITTO, 10.0),
                    _measurement(peers.AMQTT, 300.0), _measurement(peers.POLYGATE_NONE, polygate_us / 2)]
    vs_mosquitto, vs_amqtt = mqtt_bench.evaluate_targets(
        measurements, brokers=(peers.POLYGATE_LOCAL, peers.MOSQUITTO, peers.AMQTT, peers.POLYGATE_NONE))
    assert (vs_mosquitto.met, vs_amqtt.met) == (expect_vs_mosquitto, expect_vs_amqtt)
    ratios = {r.name: r.value for r in mqtt_bench.compute_ratios(measurements, (1,))}
    assert ratios["polygate/mosquitto"] == pytest.approx(polygate_us / 10.0)
    assert ratios["polygate/amqtt"] == pytest.approx(polygate_us / 300.0)
    assert ratios["polygate/polygate-none"] == pytest.approx(2.0)


def _config(size: int, qos: int = 1) -> load.LoadConfig:
    return load.LoadConfig(host="127.0.0.1", port=1, client=load.CLIENT_RAW, client_id="c", topic="bench/t",
                           qos=qos, size=size)


def test_packet_reader_reassembles_packets_split_anywhere():
    encoder = load.PublishEncoder(_config(201), load.MEASURE, 1)   # remaining length takes two bytes
    stream = b"".join(encoder.encode(i) for i in range(1, 4)) + b"\x40\x02\x00\x07"
    for cut in range(1, len(stream)):
        reader = load.PacketReader()
        packets = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [header for header, _ in packets] == [0x32, 0x32, 0x32, 0x40]
        assert packets[1][1][2 + len("bench/t"):][:2] == b"\x00\x02"
        assert packets[3][1] == b"\x00\x07"


@pytest.mark.parametrize("size", [1, 8, 9, 100, 4096])
@pytest.mark.parametrize("qos", [0, 1])
def test_publish_encoder_stamps_the_send_time_when_the_payload_has_room(size: int, qos: int):
    encoder = load.PublishEncoder(_config(size, qos), load.MEASURE, qos)
    (header, body), = load.PacketReader().feed(encoder.encode(7, 123_456_789))
    assert header == 0x30 | (qos << 1)
    offset = 2 + len("bench/t") + (2 if qos else 0)
    payload = body[offset:]
    assert len(payload) == size and payload[0] == load.MEASURE
    recorder = load.LatencyRecorder(_config(size, qos))
    recorder.add(123_456_789 + 5_000, payload)
    assert recorder.samples == ([5_000] if size >= load.STAMP_END else [])


def test_latency_recorder_reports_percentiles_in_microseconds():
    recorder = load.LatencyRecorder(_config(100))
    recorder.samples = [n * 1000 for n in range(1, 101)]
    counters = [0.0] * load.SUBSCRIBER_SLOTS
    recorder.report(counters)
    assert counters[load.S_LAT_N] == 100
    assert counters[load.S_LAT_P50_US] == 51 and counters[load.S_LAT_P99_US] == 100


def test_options_reject_what_the_run_cannot_honour():
    with pytest.raises(ValueError, match="unknown broker"):
        mqtt_bench.BenchOptions(brokers=("rabbitmq",))
    with pytest.raises(ValueError, match="--qos"):
        mqtt_bench.BenchOptions(qos_levels=(2,))
    with pytest.raises(ValueError, match="--size"):
        mqtt_bench.BenchOptions(size=0)


# ---- python -m bench auth ----

def test_auth_short_run_counts_callouts_and_stops_everything(tmp_path):
    options = auth_bench.AuthBenchOptions(
        transports=(auth_bench.HTTP,), scenarios=(auth_bench.WARM, auth_bench.STORM), rounds=1, messages=300,
        warmup_messages=50, warmup_seconds=1.0, seconds=2.0, storm_clients=3, storm_messages=10)
    before = _live_children()

    report = auth_bench.run(options, keep_dir=tmp_path)

    assert not report.skipped, report.skipped
    runs = {(r.scenario, r.variant): r for r in report.runs}
    assert set(runs) == {(s, v) for s in (auth_bench.WARM, auth_bench.STORM) for v in (auth_bench.NONE, auth_bench.HTTP)}
    for r in report.runs:
        assert r.sent > 0 and 0 < r.received <= r.sent and r.operations > r.sent
        assert r.gateway_cpu_s >= 0 and r.callouts_not_allowed == 0
    assert all(r.callouts == 0 for r in report.runs if r.variant == auth_bench.NONE)
    # Warm caches: the publisher's and the subscriber's connects, the subscription and the one topic.
    warm = runs[(auth_bench.WARM, auth_bench.HTTP)]
    assert (warm.callouts_authenticate, warm.callouts_authorize) == (2, 2)
    # The storm: one authenticate per identity, one authorize per topic, whatever the message count.
    storm = runs[(auth_bench.STORM, auth_bench.HTTP)]
    assert (storm.connects, storm.callouts_authenticate, storm.callouts_authorize) == (3, 3, 3)
    assert [t.met for t in report.targets if t.description.startswith("storm")] == [True]
    assert len(report.summaries) == 4
    text = auth_bench.format_report(report)
    assert "targets:" in text and "warm-cache callout (http) CPU/msg <= 1.05x none" in text
    json.dumps(report.to_json())
    deadline = time.monotonic() + 5
    while _live_children() - before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _live_children() - before


def _auth_run(scenario: str, variant: str, cpu_us: float, *, authn: int = 0, authz: int = 0,
              connects: int = 0) -> auth_bench.AuthRun:
    return auth_bench.AuthRun(
        scenario=scenario, variant=variant, round=0, sent=10_000, received=10_000, lost=0, msgs_per_s=1000.0,
        gateway_cpu_s=cpu_us * 1e-2, cpu_us_per_msg=cpu_us, operations=10_000, callouts_authenticate=authn,
        callouts_authorize=authz, callouts_not_allowed=0, connects=connects)


@pytest.mark.parametrize(("none_us", "grpc_us", "expect"), [
    (20.0, 19.0, True),
    (16.0, 16.8, True),     # exactly 1.05x, though 16.8 / 16.0 is 1.0500000000000003 in floats
    (20.0, 21.01, False),
])
def test_auth_warm_target_is_five_percent_over_none(none_us, grpc_us, expect):
    options = auth_bench.AuthBenchOptions(transports=(auth_bench.GRPC,), scenarios=(auth_bench.WARM,))
    runs = [_auth_run(auth_bench.WARM, auth_bench.NONE, none_us), _auth_run(auth_bench.WARM, auth_bench.GRPC, grpc_us)]
    summaries = auth_bench.summarise(runs)
    assert summaries[1].ratio_to_none == pytest.approx(grpc_us / none_us)
    assert summaries[1].added_us_per_msg == pytest.approx(grpc_us - none_us)
    [target] = auth_bench.evaluate_targets(summaries, runs, options)
    assert target.met is expect


def test_auth_storm_target_needs_one_callout_per_identity_and_topic():
    options = auth_bench.AuthBenchOptions(transports=(auth_bench.HTTP,), scenarios=(auth_bench.STORM,),
                                          storm_clients=100)
    exact = _auth_run(auth_bench.STORM, auth_bench.HTTP, 40.0, authn=100, authz=100, connects=100)
    extra = _auth_run(auth_bench.STORM, auth_bench.HTTP, 40.0, authn=100, authz=101, connects=100)
    for runs, expect in (([exact], True), ([exact, extra], False), ([], None)):
        [target] = auth_bench.evaluate_targets(auth_bench.summarise(runs), runs, options)
        assert target.met is expect


def test_auth_counts_come_from_the_gateway_metrics():
    text = (
        '# TYPE polygate_auth_decisions counter\n'
        'polygate_auth_decisions_total{action="connect",outcome="allow",protocol="mqtt"} 2.0\n'
        'polygate_auth_decisions_total{action="publish",outcome="allow",protocol="mqtt"} 500.0\n'
        '# TYPE polygate_callouts counter\n'
        'polygate_callouts_total{method="authenticate",outcome="allow",transport="grpc"} 2.0\n'
        'polygate_callouts_total{method="authorize",outcome="allow",transport="grpc"} 3.0\n'
        'polygate_callouts_total{method="authorize",outcome="unavailable",transport="grpc"} 1.0\n')
    counts = auth_bench.parse_counts(text)
    assert counts == auth_bench.AuthCounts(decisions=502, authenticate=2, authorize=4, not_allowed=1)
    assert auth_bench.parse_counts("") == auth_bench.AuthCounts()


def test_auth_options_reject_what_the_run_cannot_honour():
    with pytest.raises(ValueError, match="--transports"):
        auth_bench.AuthBenchOptions(transports=("amqp",))
    with pytest.raises(ValueError, match="--scenarios"):
        auth_bench.AuthBenchOptions(scenarios=("hot",))
    with pytest.raises(ValueError, match="--rounds"):
        auth_bench.AuthBenchOptions(rounds=0)
