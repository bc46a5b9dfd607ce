"""The MQTT benchmark produces figures; it never asserts on speed."""

from __future__ import annotations

import importlib.util
import json
import time

import psutil
import pytest

from bench import load, mqtt_bench, peers


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
            # multiprocessing's resource tracker lives as long as this process, by design.
            if child.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(child.cmdline()):
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
    vs_mosquitto, vs_amqtt = mqtt_bench.evaluate_targets(measurements)
    assert (vs_mosquitto.met, vs_amqtt.met) == (expect_vs_mosquitto, expect_vs_amqtt)
    ratios = {r.name: r.value for r in mqtt_bench.compute_ratios(measurements, (1,))}
    assert ratios["polygate/mosquitto"] == pytest.approx(polygate_us / 10.0)
    assert ratios["polygate/amqtt"] == pytest.approx(polygate_us / 300.0)
    assert ratios["polygate/polygate-none"] == pytest.approx(2.0)


def test_packet_reader_reassembles_packets_split_anywhere():
    encoder = load.PublishEncoder("bench/t", b"M" + b"x" * 200, 1)   # remaining length takes two bytes
    stream = b"".join(encoder.encode(i) for i in range(1, 4)) + b"\x40\x02\x00\x07"
    for cut in range(1, len(stream)):
        reader = load.PacketReader()
        packets = reader.feed(stream[:cut]) + reader.feed(stream[cut:])
        assert [header for header, _ in packets] == [0x32, 0x32, 0x32, 0x40]
        assert packets[1][1][2 + len("bench/t"):][:2] == b"\x00\x02"
        assert packets[3][1] == b"\x00\x07"


def test_options_reject_what_the_run_cannot_honour():
    with pytest.raises(ValueError, match="unknown broker"):
        mqtt_bench.BenchOptions(brokers=("rabbitmq",))
    with pytest.raises(ValueError, match="--qos"):
        mqtt_bench.BenchOptions(qos_levels=(2,))
    with pytest.raises(ValueError, match="--size"):
        mqtt_bench.BenchOptions(size=0)
