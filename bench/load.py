"""Publisher and subscriber worker processes that drive a broker.

Each worker is its own process so the load never shares a GIL with the
parent or with the other side. Workers report through shared-memory counters
(cheap enough to update per message) and take their cues from events set by
the parent: warm up, measure, stop. Errors go to a queue as text.

Two clients: paho-mqtt 2.x (CallbackAPIVersion.VERSION2), and `raw`, a lean
blocking-socket MQTT 3.1.1 client of our own (one packet per write like a
device, or `batch` packets gathered per write), because paho's per-packet
Python overhead caps it at a few thousand messages/s, below the brokers.
Both use the same topic and payload layout: the first payload byte says
whether a message belongs to the warm-up or the measurement, and the next 8
(when the payload is that long) carry the publisher's CLOCK_MONOTONIC at send
time in ns. That clock is system-wide on Linux, so the subscriber process
reads end-to-end latency straight off each message.

`storm_main` drives many raw connections from one process: every CONNECT is
sent before any CONNACK is read, so the broker sees them all at once.

With `tls_ca` set, the raw client connects over TLS (the broker's certificate
must be signed by that CA, for the name "localhost").
"""

from __future__ import annotations

import selectors
import socket
import ssl
import struct
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Protocol

CLIENT_PAHO = "paho"
CLIENT_RAW = "raw"
CLIENTS = (CLIENT_PAHO, CLIENT_RAW)

WARM = ord("W")
MEASURE = ord("M")

# Publisher counters (indices into its shared array).
P_CONNECTED, P_WARM_SENT, P_WARM_DONE, P_SENT, P_ACKED, P_T_START, P_T_END, P_DONE = range(8)
PUBLISHER_SLOTS = 8
# Subscriber counters; the latency percentiles are written once, when it stops.
S_READY, S_WARM, S_COUNT, S_FIRST, S_LAST, S_LAT_N, S_LAT_P50_US, S_LAT_P99_US = range(8)
SUBSCRIBER_SLOTS = 8
#: Payload bytes 1..8: the send time (monotonic ns, big-endian).
STAMP_END = 9
MAX_LATENCY_SAMPLES = 2_000_000
# Connection-storm counters (one process drives every connection of the storm).
C_READY, C_CONNECTED, C_CONNECT_S, C_SENT, C_ACKED, C_DONE = range(6)
STORM_SLOTS = 6

PACE_POLL_S = 0.0005   # QoS 0 pacing: how often a publisher that is ahead looks again
KEEPALIVE_S = 600      # longer than any run: an idle subscriber must not be dropped
CONNECT_TIMEOUT_S = 10.0
ACK_DRAIN_S = 10.0     # how long a publisher waits for its last PUBACKs
STORM_CONNECT_S = 60.0  # every CONNACK of a storm; the auth service may be checking many passwords


# A multiprocessing.RawArray of doubles, shared with the parent.
Counters = Any


class _Event(Protocol):
    def is_set(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class LoadConfig:
    host: str
    port: int
    client: str
    client_id: str
    topic: str
    qos: int
    size: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    warmup_messages: int = 0
    warmup_seconds: float = 0.0
    messages: int = 0
    seconds: float = 0.0
    inflight: int = 100
    batch: int = 1           # raw client: packets per write (1: one write per packet, as a device does)
    qos0_lead: int = 1000    # QoS 0: most messages a publisher may be ahead of the subscriber (0: unpaced)
    publishers: int = 1
    #: False: a persistent session (clean session 0), as bench persist's subscriber uses.
    clean_session: bool = True
    #: The CA file of the broker's certificate: the raw client connects over TLS.
    tls_ca: str | None = None

    def payload(self, phase: int, sent_ns: int = 0) -> bytes:
        if self.size < STAMP_END:
            return bytes([phase]) + b"x" * max(self.size - 1, 0)
        return bytes([phase]) + sent_ns.to_bytes(8, "big") + b"x" * (self.size - STAMP_END)


class LoadError(Exception):
    """The load side failed; the message says where."""


# ---- the lean raw client ----

def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _utf8(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("!H", len(raw)) + raw


def connect_packet(client_id: str, username: str | None, password: str | None, *, clean: bool = True) -> bytes:
    flags = 0x02 if clean else 0x00  # clean session, or a persistent one
    payload = _utf8(client_id)
    if username is not None:
        flags |= 0x80
        payload += _utf8(username)
        if password is not None:
            flags |= 0x40
            payload += _utf8(password)
    body = _utf8("MQTT") + bytes([4, flags]) + struct.pack("!H", KEEPALIVE_S) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def subscribe_packet(packet_id: int, topic: str, qos: int) -> bytes:
    body = struct.pack("!H", packet_id) + _utf8(topic) + bytes([qos])
    return b"\x82" + _remaining_length(len(body)) + body


def publish_packet(topic: str, payload: bytes) -> bytes:
    """One QoS 0 PUBLISH of any payload."""
    body = _utf8(topic) + payload
    return b"\x30" + _remaining_length(len(body)) + body


class PublishEncoder:
    """Precomputes everything but the packet id and the send-time stamp of a PUBLISH."""

    def __init__(self, config: LoadConfig, marker: int, qos: int) -> None:
        payload = config.payload(marker)
        topic_field = _utf8(config.topic)
        id_len = 2 if qos else 0
        self._qos = qos
        self._head = bytes([0x30 | (qos << 1)]) + _remaining_length(len(topic_field) + id_len + len(payload))
        self._head += topic_field
        self._stamped = len(payload) >= STAMP_END
        self._marker = payload[:1]
        self._rest = payload[STAMP_END:] if self._stamped else payload[1:]

    def encode(self, packet_id: int, sent_ns: int = 0) -> bytes:
        stamp = sent_ns.to_bytes(8, "big") if self._stamped else b""
        packet_id_field = struct.pack("!H", packet_id) if self._qos else b""
        return b"".join((self._head, packet_id_field, self._marker, stamp, self._rest))


class LatencyRecorder:
    """End-to-end latencies of stamped measured messages, reported as percentiles when the run ends."""

    def __init__(self, config: LoadConfig) -> None:
        self.enabled = config.size >= STAMP_END
        self.samples: list[int] = []

    def add(self, now_ns: int, payload: bytes | memoryview, offset: int = 0) -> None:
        if self.enabled and len(self.samples) < MAX_LATENCY_SAMPLES:
            self.samples.append(now_ns - int.from_bytes(payload[offset + 1:offset + STAMP_END], "big"))

    def report(self, counters: Counters) -> None:
        ordered = sorted(self.samples)
        if not ordered:
            return
        counters[S_LAT_P50_US] = ordered[len(ordered) // 2] / 1000
        counters[S_LAT_P99_US] = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] / 1000
        counters[S_LAT_N] = len(ordered)


class PacketReader:
    """Splits a byte stream into (first header byte, body) pairs."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buf = self._buffer
        buf += data
        packets: list[tuple[int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            length, multiplier, i, complete = 0, 1, pos + 1, False
            while i < end and i < pos + 5:
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * multiplier
                multiplier *= 128
                if not byte & 0x80:
                    complete = True
                    break
            if not complete:
                if i >= pos + 5:
                    raise LoadError("malformed remaining length from the broker")
                break
            if i + length > end:
                break
            packets.append((buf[pos], bytes(buf[i:i + length])))
            pos = i + length
        del buf[:pos]
        return packets


_TLS_CONTEXTS: dict[str, ssl.SSLContext] = {}
#: The name the brokers' benchmark certificates are made for.
TLS_SERVER_NAME = "localhost"


def tls_context(ca_file: str) -> ssl.SSLContext:
    """A client context trusting `ca_file`, one per process (contexts are costly to build)."""
    context = _TLS_CONTEXTS.get(ca_file)
    if context is None:
        context = _TLS_CONTEXTS[ca_file] = ssl.create_default_context(cafile=ca_file)
    return context


def recv_all(sock: socket.socket, size: int = 262144) -> bytes:
    """What one read returns, plus what a TLS socket has already decrypted: select() cannot see that."""
    data = sock.recv(size)
    if data and isinstance(sock, ssl.SSLSocket):
        while pending := sock.pending():
            data += sock.recv(pending)
    return data


def open_socket(config: LoadConfig) -> socket.socket:
    """A connection to the broker (blocking, with a timeout), over TLS when `config.tls_ca` is set."""
    sock = socket.create_connection((config.host, config.port), timeout=CONNECT_TIMEOUT_S)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if config.tls_ca:
            return tls_context(config.tls_ca).wrap_socket(sock, server_hostname=TLS_SERVER_NAME)
    except BaseException:
        sock.close()
        raise
    return sock


class RawClient:
    """Blocking-socket MQTT 3.1.1 client: just enough for the benchmark."""

    def __init__(self, config: LoadConfig) -> None:
        self.config = config
        self.reader = PacketReader()
        self.sock = open_socket(config)
        try:
            self.sock.sendall(connect_packet(config.client_id, config.username, config.password,
                                             clean=config.clean_session))
            _, body = self.expect(0x20)
        except BaseException:
            self.sock.close()
            raise
        if body[1] != 0:
            raise LoadError(f"{config.client_id}: CONNACK return code {body[1]} (refused)")

    def read_packets(self) -> list[tuple[int, bytes]]:
        data = recv_all(self.sock)
        if not data:
            raise LoadError(f"{self.config.client_id}: the broker closed the connection")
        return self.reader.feed(data)

    def expect(self, packet_type: int) -> tuple[int, bytes]:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while time.monotonic() < deadline:
            for header, body in self.read_packets():
                if header & 0xF0 == packet_type:
                    return header, body
        raise LoadError(f"{self.config.client_id}: no packet of type {packet_type >> 4} within "
                        f"{CONNECT_TIMEOUT_S:.0f} s")

    def close(self) -> None:
        try:
            self.sock.sendall(b"\xe0\x00")
        except OSError:
            pass
        self.sock.close()


@dataclass(frozen=True, slots=True, kw_only=True)
class _Phase:
    marker: int              # WARM or MEASURE, the first payload byte
    count: int
    seconds: float
    sent_slot: int
    acked_slot: int | None
    received_slot: int       # the subscriber's counter that QoS 0 pacing watches


WARM_PHASE = dict(marker=WARM, sent_slot=P_WARM_SENT, acked_slot=None, received_slot=S_WARM)
MEASURE_PHASE = dict(marker=MEASURE, sent_slot=P_SENT, acked_slot=P_ACKED, received_slot=S_COUNT)


def _qos0_room(config: LoadConfig, phase: _Phase, sent: int, sub_counters: Counters) -> int:
    """How many QoS 0 messages may go out now without running too far ahead of the subscriber.

    QoS 0 has no flow control of its own: unpaced, a slow broker would buffer
    without bound and the run would measure its queues, not its work.
    """
    want = min(config.batch, phase.count - sent)
    if not config.qos0_lead:
        return want
    delivered_share = sub_counters[phase.received_slot] / config.publishers
    return min(want, int(config.qos0_lead - (sent - delivered_share)))


def _raw_publish(client: RawClient, config: LoadConfig, phase: _Phase, counters: Counters,
                 sub_counters: Counters) -> int:
    """Publish up to `phase.count` messages within `phase.seconds`; returns how many were sent."""
    encoder = PublishEncoder(config, phase.marker, config.qos)
    deadline = time.monotonic() + phase.seconds
    sent = 0
    if config.qos == 0:
        while sent < phase.count and time.monotonic() < deadline:
            room = _qos0_room(config, phase, sent, sub_counters)
            if room <= 0:
                time.sleep(PACE_POLL_S)
                continue
            # One stamp per write: what the write holds leaves at once.
            client.sock.sendall(encoder.encode(0, time.monotonic_ns()) * room)
            sent += room
            counters[phase.sent_slot] = sent
        return sent
    acked = 0
    packet_id = 0
    client.sock.settimeout(1.0)
    while acked < sent or (sent < phase.count and time.monotonic() < deadline):
        room = min(config.inflight - (sent - acked), phase.count - sent)
        if room > 0 and time.monotonic() < deadline:
            for start in range(0, room, config.batch):
                chunk = []
                now_ns = time.monotonic_ns()
                for _ in range(min(config.batch, room - start)):
                    packet_id = packet_id % 65535 + 1
                    chunk.append(encoder.encode(packet_id, now_ns))
                client.sock.sendall(b"".join(chunk))
            sent += room
            counters[phase.sent_slot] = sent
        elif time.monotonic() > deadline + ACK_DRAIN_S:
            break
        try:
            packets = client.read_packets()
        except TimeoutError:
            continue
        acked += sum(1 for header, _ in packets if header & 0xF0 == 0x40)
        if phase.acked_slot is not None:
            counters[phase.acked_slot] = acked
    return sent


def _raw_subscribe(config: LoadConfig, counters: Counters, stop: _Event) -> None:
    client = RawClient(config)
    try:
        client.sock.sendall(subscribe_packet(1, config.topic, config.qos))
        _, suback = client.expect(0x90)
        if suback[2] == 0x80:
            raise LoadError(f"{config.client_id}: SUBSCRIBE to {config.topic!r} refused (SUBACK 0x80)")
        counters[S_READY] = 1
        client.sock.settimeout(0.2)
        warm = count = 0
        first = 0.0
        latencies = LatencyRecorder(config)
        while not stop.is_set():
            try:
                packets = client.read_packets()
            except TimeoutError:
                continue
            now_ns = time.monotonic_ns()
            now = now_ns / 1e9
            acks = []
            for header, body in packets:
                if header & 0xF0 != 0x30:
                    continue
                topic_len = (body[0] << 8) | body[1]
                offset = 2 + topic_len
                if header & 0x06:
                    ack = b"\x40\x02" + body[offset:offset + 2]
                    if config.batch == 1:
                        client.sock.sendall(ack)   # one write per PUBACK, as a device would
                    else:
                        acks.append(ack)
                    offset += 2
                if body[offset] == MEASURE:
                    count += 1
                    if count == 1:
                        first = now
                    latencies.add(now_ns, body, offset)
                else:
                    warm += 1
            for start in range(0, len(acks), config.batch):
                client.sock.sendall(b"".join(acks[start:start + config.batch]))
            counters[S_WARM] = warm
            if count:
                counters[S_FIRST] = first
                counters[S_LAST] = now
                counters[S_COUNT] = count
        latencies.report(counters)
    finally:
        client.close()


def _raw_publisher(config: LoadConfig, counters: Counters, sub_counters: Counters, go_warm: _Event,
                   go_measure: _Event, stop: _Event) -> None:
    client = RawClient(config)
    try:
        counters[P_CONNECTED] = 1
        _wait(go_warm, stop)
        if stop.is_set():
            return
        warm = _Phase(count=config.warmup_messages, seconds=config.warmup_seconds, **WARM_PHASE)
        _raw_publish(client, config, warm, counters, sub_counters)
        counters[P_WARM_DONE] = 1
        _wait(go_measure, stop)
        if stop.is_set():
            return
        counters[P_T_START] = time.monotonic()
        measured = _Phase(count=config.messages, seconds=config.seconds, **MEASURE_PHASE)
        _raw_publish(client, config, measured, counters, sub_counters)
        counters[P_T_END] = time.monotonic()
        counters[P_DONE] = 1
        stop.wait()
    finally:
        client.close()


# ---- a connection storm: many raw connections from one process ----

class _StormConnection:
    """One connection of a storm: its own client id, credentials and topic, QoS 1."""

    __slots__ = ("config", "sock", "reader", "encoder", "connacked", "sent", "acked", "packet_id")

    def __init__(self, config: LoadConfig, sock: socket.socket) -> None:
        self.config = config
        self.sock = sock
        self.reader = PacketReader()
        self.encoder = PublishEncoder(config, MEASURE, 1)
        self.connacked = False
        self.sent = self.acked = self.packet_id = 0

    def read(self) -> list[tuple[int, bytes]]:
        data = self.sock.recv(262144)
        if not data:
            raise LoadError(f"{self.config.client_id}: the broker closed the connection")
        return self.reader.feed(data)

    def fill_window(self, deadline: float) -> int:
        """Send what the QoS 1 window allows, `batch` packets per write; returns how many."""
        config = self.config
        room = min(config.inflight - (self.sent - self.acked), config.messages - self.sent)
        if room <= 0 or time.monotonic() > deadline:
            return 0
        for start in range(0, room, config.batch):
            chunk = []
            now_ns = time.monotonic_ns()
            for _ in range(min(config.batch, room - start)):
                self.packet_id = self.packet_id % 65535 + 1
                chunk.append(self.encoder.encode(self.packet_id, now_ns))
            self.sock.sendall(b"".join(chunk))
        self.sent += room
        return room


def _storm_select(selector: selectors.BaseSelector, deadline: float, what: str) -> list[_StormConnection]:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise LoadError(f"storm: timed out while {what}")
    return [key.data for key, _ in selector.select(min(remaining, 0.5))]


def _storm(configs: list[LoadConfig], counters: Counters, go: _Event, stop: _Event) -> None:
    """Connect every client at once (all CONNECTs before any CONNACK is read), then publish.

    Each client publishes `messages` QoS 1 messages to its own topic with its
    own window; the storm ends when every message was acknowledged.
    """
    counters[C_READY] = 1
    _wait(go, stop)
    if stop.is_set():
        return
    started = time.monotonic()
    selector = selectors.DefaultSelector()
    connections: list[_StormConnection] = []
    try:
        for config in configs:
            sock = socket.create_connection((config.host, config.port), timeout=CONNECT_TIMEOUT_S)
            connection = _StormConnection(config, sock)
            connections.append(connection)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(connect_packet(config.client_id, config.username, config.password))
            selector.register(sock, selectors.EVENT_READ, connection)
        waiting = len(connections)
        deadline = started + STORM_CONNECT_S
        while waiting:
            for connection in _storm_select(selector, deadline, f"waiting for {waiting} CONNACK(s)"):
                for header, body in connection.read():
                    if header & 0xF0 != 0x20 or connection.connacked:
                        continue
                    if body[1] != 0:
                        raise LoadError(f"{connection.config.client_id}: CONNACK return code {body[1]} (refused)")
                    connection.connacked = True
                    waiting -= 1
        counters[C_CONNECT_S] = time.monotonic() - started
        counters[C_CONNECTED] = len(connections)

        send_deadline = time.monotonic() + max(c.seconds for c in configs)
        sent = sum(connection.fill_window(send_deadline) for connection in connections)
        counters[C_SENT] = sent
        acked = 0
        ack_deadline = send_deadline + ACK_DRAIN_S
        while acked < sent or (time.monotonic() < send_deadline and sent < sum(c.messages for c in configs)):
            for connection in _storm_select(selector, ack_deadline, f"waiting for {sent - acked} PUBACK(s)"):
                acks = sum(1 for header, _ in connection.read() if header & 0xF0 == 0x40)
                connection.acked += acks
                acked += acks
                sent += connection.fill_window(send_deadline)
            counters[C_SENT] = sent
            counters[C_ACKED] = acked
        counters[C_DONE] = 1
        stop.wait()
    finally:
        selector.close()
        for connection in connections:
            try:
                connection.sock.sendall(b"\xe0\x00")
            except OSError:
                pass
            connection.sock.close()


# ---- paho ----

def _paho_client(config: LoadConfig) -> Any:
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id,
                         protocol=mqtt.MQTTv311, clean_session=config.clean_session)
    if config.username is not None:
        client.username_pw_set(config.username, config.password)
    client.max_inflight_messages_set(config.inflight)
    client.max_queued_messages_set(0)
    connack: dict[str, Any] = {}

    def on_connect(_client: Any, _userdata: Any, _flags: Any, reason_code: Any, _props: Any) -> None:
        connack["rc"] = reason_code

    client.on_connect = on_connect
    client.connect(config.host, config.port, keepalive=KEEPALIVE_S)
    deadline = time.monotonic() + CONNECT_TIMEOUT_S
    while "rc" not in connack and time.monotonic() < deadline:
        client.loop(timeout=0.1)
    if "rc" not in connack:
        raise LoadError(f"{config.client_id}: no CONNACK within {CONNECT_TIMEOUT_S:.0f} s")
    if connack["rc"].is_failure:
        raise LoadError(f"{config.client_id}: connection refused: {connack['rc']}")
    return client


def _paho_publish(client: Any, config: LoadConfig, phase: _Phase, counters: Counters,
                  sub_counters: Counters) -> int:
    deadline = time.monotonic() + phase.seconds
    acked = [0]

    def on_publish(_client: Any, _userdata: Any, _mid: int, _rc: Any, _props: Any) -> None:
        acked[0] += 1

    client.on_publish = on_publish
    sent = 0
    if config.qos == 0:
        while sent < phase.count and time.monotonic() < deadline:
            room = _qos0_room(config, phase, sent, sub_counters)
            if room <= 0:
                client.loop(timeout=PACE_POLL_S)
                continue
            info = None
            for _ in range(room):
                info = client.publish(config.topic, config.payload(phase.marker, time.monotonic_ns()), qos=0)
            sent += room
            counters[phase.sent_slot] = sent
            # Bound paho's in-memory queue: let the socket take what was published first.
            while info is not None and not info.is_published():
                client.loop(timeout=0.05)
        return sent
    while acked[0] < sent or (sent < phase.count and time.monotonic() < deadline):
        room = min(config.inflight - (sent - acked[0]), phase.count - sent)
        if room > 0 and time.monotonic() < deadline:
            for _ in range(room):
                client.publish(config.topic, config.payload(phase.marker, time.monotonic_ns()), qos=config.qos)
            sent += room
            counters[phase.sent_slot] = sent
        elif time.monotonic() > deadline + ACK_DRAIN_S:
            break
        client.loop(timeout=1.0)
        if phase.acked_slot is not None:
            counters[phase.acked_slot] = acked[0]
    return sent


def _paho_publisher(config: LoadConfig, counters: Counters, sub_counters: Counters, go_warm: _Event,
                    go_measure: _Event, stop: _Event) -> None:
    client = _paho_client(config)
    try:
        counters[P_CONNECTED] = 1
        _wait(go_warm, stop, idle=lambda: client.loop(timeout=0.05))
        if stop.is_set():
            return
        warm = _Phase(count=config.warmup_messages, seconds=config.warmup_seconds, **WARM_PHASE)
        _paho_publish(client, config, warm, counters, sub_counters)
        counters[P_WARM_DONE] = 1
        _wait(go_measure, stop, idle=lambda: client.loop(timeout=0.05))
        if stop.is_set():
            return
        counters[P_T_START] = time.monotonic()
        measured = _Phase(count=config.messages, seconds=config.seconds, **MEASURE_PHASE)
        _paho_publish(client, config, measured, counters, sub_counters)
        counters[P_T_END] = time.monotonic()
        counters[P_DONE] = 1
        _wait(stop, stop, idle=lambda: client.loop(timeout=0.05))
    finally:
        client.disconnect()


def _paho_subscriber(config: LoadConfig, counters: Counters, stop: _Event) -> None:
    client = _paho_client(config)
    state = {"warm": 0, "count": 0}
    subacked: dict[str, Any] = {}
    latencies = LatencyRecorder(config)

    def on_subscribe(_client: Any, _userdata: Any, _mid: int, reason_codes: Any, _props: Any) -> None:
        subacked["codes"] = reason_codes

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        if message.payload[0] == MEASURE:
            now_ns = time.monotonic_ns()
            now = now_ns / 1e9
            latencies.add(now_ns, message.payload)
            state["count"] += 1
            if state["count"] == 1:
                counters[S_FIRST] = now
            counters[S_LAST] = now
            counters[S_COUNT] = state["count"]
        else:
            state["warm"] += 1
            counters[S_WARM] = state["warm"]

    client.on_subscribe = on_subscribe
    client.on_message = on_message
    try:
        client.subscribe(config.topic, qos=config.qos)
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while "codes" not in subacked and time.monotonic() < deadline:
            client.loop(timeout=0.1)
        if "codes" not in subacked:
            raise LoadError(f"{config.client_id}: no SUBACK within {CONNECT_TIMEOUT_S:.0f} s")
        if any(code.is_failure for code in subacked["codes"]):
            raise LoadError(f"{config.client_id}: SUBSCRIBE to {config.topic!r} refused")
        counters[S_READY] = 1
        while not stop.is_set():
            client.loop(timeout=0.2)
        latencies.report(counters)
    finally:
        client.disconnect()


def _wait(event: _Event, stop: _Event, idle: Any = None) -> None:
    # Polls rather than blocks: the paho client must keep servicing its socket.
    while not event.is_set() and not stop.is_set():
        if idle is None:
            event.wait(0.05)
        else:
            idle()


# ---- process entry points (module-level so that `spawn` can import them) ----

def publisher_main(config: LoadConfig, counters: Counters, sub_counters: Counters, go_warm: _Event,
                   go_measure: _Event, stop: _Event, errors: Any) -> None:
    try:
        if config.client == CLIENT_RAW:
            _raw_publisher(config, counters, sub_counters, go_warm, go_measure, stop)
        else:
            _paho_publisher(config, counters, sub_counters, go_warm, go_measure, stop)
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the parent reports it once
    except Exception as exc:  # reported to the parent, which decides what to do
        errors.put(f"publisher {config.client_id}: {exc!r}\n{traceback.format_exc(limit=3)}")


def subscriber_main(config: LoadConfig, counters: Counters, stop: _Event, errors: Any) -> None:
    try:
        if config.client == CLIENT_RAW:
            _raw_subscribe(config, counters, stop)
        else:
            _paho_subscriber(config, counters, stop)
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the parent reports it once
    except Exception as exc:  # reported to the parent, which decides what to do
        errors.put(f"subscriber {config.client_id}: {exc!r}\n{traceback.format_exc(limit=3)}")


def storm_main(configs: list[LoadConfig], counters: Counters, go: _Event, stop: _Event, errors: Any) -> None:
    """Connect every client of `configs` at once on `go`, then let each publish its messages."""
    try:
        _storm(configs, counters, go, stop)
    except KeyboardInterrupt:
        pass  # Ctrl-C reaches the whole process group; the parent reports it once
    except Exception as exc:  # reported to the parent, which decides what to do
        errors.put(f"storm: {exc!r}\n{traceback.format_exc(limit=3)}")
