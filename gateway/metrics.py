"""Operator metrics, rendered as Prometheus text at `/metrics`.

Hot paths only bump plain integers in dicts (a few tens of nanoseconds);
prometheus-client renders them through a custom collector when scraped.
Each gateway has its own registry so several can run in one process (tests).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.events import Action, Outcome, Protocol


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.connections_open: dict[Protocol, int] = {p: 0 for p in Protocol}
        self.connections_total: dict[Protocol, int] = {p: 0 for p in Protocol}
        self.connections_refused: defaultdict[tuple[Protocol, str], int] = defaultdict(int)
        #: The same refusals by (protocol, listener, reason): what /metrics shows.
        self.connections_refused_by_listener: defaultdict[tuple[Protocol, str, str], int] = defaultdict(int)
        self.messages_in: dict[Protocol, int] = {p: 0 for p in Protocol}
        self.messages_out: dict[Protocol, int] = {p: 0 for p in Protocol}
        self.auth_decisions: defaultdict[tuple[Protocol, Action, Outcome], int] = defaultdict(int)
        self.messages_dropped: defaultdict[tuple[Protocol, str], int] = defaultdict(int)
        #: Full queues, by the subscriber's protocol and the overflow policy that applied.
        self.overflows: defaultdict[tuple[Protocol, str], int] = defaultdict(int)
        #: Messages a queue refused to a publisher (reject_new), by the publisher's protocol.
        self.messages_refused: dict[Protocol, int] = {p: 0 for p in Protocol}
        #: Counters of other components (caches, providers): name -> (help, labels, fn).
        self._extra: list[Callable[[], Iterable[Metric]]] = []
        self.registry.register(_Collector(self))

    # Hot-path helpers are plain dict bumps; callers may also bump the dicts directly.
    def connection_opened(self, protocol: Protocol) -> None:
        self.connections_open[protocol] += 1
        self.connections_total[protocol] += 1

    def connection_closed(self, protocol: Protocol) -> None:
        self.connections_open[protocol] -= 1

    def connection_refused(self, protocol: Protocol, reason: str, listener: str = "") -> None:
        self.connections_refused[(protocol, reason)] += 1
        self.connections_refused_by_listener[(protocol, listener, reason)] += 1

    def auth_decision(self, protocol: Protocol, action: Action, outcome: Outcome) -> None:
        self.auth_decisions[(protocol, action, outcome)] += 1

    def dropped(self, protocol: Protocol, reason: str, count: int = 1) -> None:
        """A message accepted from or meant for a client was not delivered: never silent."""
        self.messages_dropped[(protocol, reason)] += count

    def add_collector(self, collect: Callable[[], Iterable[Metric]]) -> None:
        """Let a component (cache, provider) export metric families of its own."""
        self._extra.append(collect)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[Metric]:
        m = self._m
        gauge = GaugeMetricFamily("polygate_connections", "Open client connections", labels=["protocol"])
        total = CounterMetricFamily("polygate_connections_accepted", "Accepted client connections", labels=["protocol"])
        for p in Protocol:
            gauge.add_metric([p.value], m.connections_open[p])
            total.add_metric([p.value], m.connections_total[p])
        yield gauge
        yield total
        refused = CounterMetricFamily(
            "polygate_connections_refused", "Connections refused before a session began",
            labels=["protocol", "listener", "reason"],
        )
        for (p, listener, reason), n in sorted(m.connections_refused_by_listener.items(), key=_label_key):
            refused.add_metric([p.value, listener, reason], n)
        yield refused
        msg_in = CounterMetricFamily("polygate_messages_in", "Messages received from clients", labels=["protocol"])
        msg_out = CounterMetricFamily("polygate_messages_out", "Messages delivered to clients", labels=["protocol"])
        for p in Protocol:
            msg_in.add_metric([p.value], m.messages_in[p])
            msg_out.add_metric([p.value], m.messages_out[p])
        yield msg_in
        yield msg_out
        decisions = CounterMetricFamily(
            "polygate_auth_decisions", "Auth decisions by protocol, action and outcome",
            labels=["protocol", "action", "outcome"],
        )
        for (p, a, o), n in sorted(m.auth_decisions.items(), key=_label_key):
            decisions.add_metric([p.value, a.value, o.value], n)
        yield decisions
        dropped = CounterMetricFamily(
            "polygate_messages_dropped", "Messages not delivered, by reason",
            labels=["protocol", "reason"],
        )
        for (p, reason), n in sorted(m.messages_dropped.items(), key=_label_key):
            dropped.add_metric([p.value, reason], n)
        yield dropped
        overflows = CounterMetricFamily(
            "polygate_queue_overflows", "Times a full queue applied its overflow policy",
            labels=["protocol", "policy"],
        )
        for (p, policy), n in sorted(m.overflows.items(), key=_label_key):
            overflows.add_metric([p.value, policy], n)
        yield overflows
        refused = CounterMetricFamily(
            "polygate_messages_refused", "Publishes refused to their publisher because a queue was full",
            labels=["protocol"],
        )
        for p in Protocol:
            refused.add_metric([p.value], m.messages_refused[p])
        yield refused
        for extra in m._extra:
            yield from extra()


def _label_key(item: tuple[tuple[object, ...], int]) -> tuple[str, ...]:
    return tuple(getattr(v, "value", str(v)) for v in item[0])
