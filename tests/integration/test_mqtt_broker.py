"""The MQTT frontend seen from paho-mqtt, over loopback, with the local provider."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from auth_providers.local_store import LocalStore
from gateway.events import Secret
from tests.conftest import ROOT_USER, cli_env, loopback_config
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

ALICE_PASSWORD = "alice-pw-7f3a"


@pytest.fixture
def alice_db(db_path: str) -> str:
    store = LocalStore(db_path)
    try:
        store.add_user("alice", Secret(ALICE_PASSWORD))
        store.grant("alice", "tenants/alice/#", {"publish", "subscribe"})
    finally:
        store.close()
    return db_path


@pytest.fixture
def clients() -> Any:
    made: list[PahoClient] = []

    def make(port: int, **kwargs: Any) -> PahoClient:
        client = PahoClient(port, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        try:
            client.disconnect()
        except Exception:
            pass


def root(port: int, clients: Callable[..., PahoClient], root_password: str, client_id: str = "root-sub", **kw: Any) -> PahoClient:
    return clients(port, client_id=client_id, username=ROOT_USER, password=root_password, **kw).connect_ok()


# -- authentication -------------------------------------------------------------------------------


def test_connack_codes_for_credentials(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    assert clients(port, client_id="a", username=ROOT_USER, password="wrong").connect()[0] == 4
    assert clients(port, client_id="b", username="nobody", password="x").connect()[0] == 4
    assert clients(port, client_id="c").connect()[0] == 5  # no username, anonymous off
    assert clients(port, client_id="d", username=ROOT_USER, password=root_password).connect()[0] == 0


def test_anonymous_allowed_uses_anonymous_acl(start_gateway: Any, tmp_path: Path, clients: Any, root_password: str) -> None:
    store = LocalStore(str(tmp_path / "auth.db"))
    store.grant("anonymous", "public/#", {"publish", "subscribe"})
    store.close()
    gw = start_gateway(auth={"local": {"allow_anonymous": True}})
    anon = clients(gw.mqtt_port, client_id="anon").connect_ok()
    assert anon.subscribe(("public/#", 0), ("private/#", 0)) == [0, 0x80]


# -- ACLs -------------------------------------------------------------------------------------------


def test_user_limited_to_own_tenant(start_gateway: Any, alice_db: str, clients: Any, root_password: str) -> None:
    gw = start_gateway()
    port = gw.mqtt_port
    watcher = root(port, clients, root_password)
    assert watcher.subscribe(("#", 1)) == [1]
    alice = clients(port, client_id="alice-1", username="alice", password=ALICE_PASSWORD).connect_ok()
    assert alice.subscribe(("tenants/bob/#", 1), ("#", 1), ("tenants/+/x", 1), ("tenants/alice/+/x", 1)) == [
        0x80, 0x80, 0x80, 1,
    ]
    alice.publish("tenants/bob/x", b"must not arrive", qos=1)
    alice.publish("tenants/alice/x", b"marker", qos=1)
    first = watcher.next_message()
    assert (first.topic, first.payload) == ("tenants/alice/x", b"marker")


def test_acl_revoked_with_cli_applies_within_two_seconds(
    start_gateway: Any, alice_db: str, clients: Any, root_password: str
) -> None:
    gw = start_gateway()
    port = gw.mqtt_port
    watcher = root(port, clients, root_password)
    watcher.subscribe(("tenants/#", 1))
    alice = clients(port, client_id="alice-1", username="alice", password=ALICE_PASSWORD).connect_ok()
    alice.publish("tenants/alice/t", b"before", qos=1)
    assert watcher.next_message().payload == b"before"

    subprocess.run(
        [sys.executable, "-m", "gateway", "acl", "revoke", "alice", "tenants/alice/#", "--db", alice_db],
        check=True, env=cli_env(), capture_output=True, timeout=60,
    )
    revoked_at = time.monotonic()
    blocked_after = None
    probe = 0
    while time.monotonic() - revoked_at < 5:
        probe += 1
        alice.publish("tenants/alice/t", f"probe-{probe}".encode(), qos=1)
        try:
            watcher.next_message(timeout=0.2)
        except AssertionError:
            blocked_after = time.monotonic() - revoked_at
            break
    assert blocked_after is not None, "the revoked client could still publish after 5 s"
    assert blocked_after <= 2.0 + 0.2  # + one probe's wait


# -- delivery -----------------------------------------------------------------------------------------


def test_thousand_qos1_messages_in_order(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="sub")
    sub.subscribe(("seq/#", 1))
    pub = root(port, clients, root_password, client_id="pub")
    for i in range(1000):
        pub.client.publish("seq/a", str(i).encode(), qos=1)
    got = sub.expect(1000, timeout=30)
    assert [int(m.payload) for m in got] == list(range(1000))
    assert all(m.qos == 1 for m in got)


def test_delivery_qos_is_min_of_publish_and_subscription(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="sub")
    sub.subscribe(("q/0", 0), ("q/#", 2))  # overlapping: one delivery at the highest granted QoS
    pub = root(port, clients, root_password, client_id="pub")
    pub.publish("q/0", b"a", qos=1)
    pub.publish("q/0", b"b", qos=0)
    got = sub.expect(2)
    assert [(m.payload, m.qos) for m in got] == [(b"a", 1), (b"b", 0)]
    assert sub.messages.empty()


def test_fan_out_gives_each_subscriber_its_own_flags_sizes_and_packet_ids(
    gateway: GatewayThread, clients: Any, root_password: str
) -> None:
    """One message to subscribers of every QoS, of varying size and topic, live and retained.

    The frontend reuses a PUBLISH head for the next subscriber or message with
    the same topic, payload length and flags; any mix-up of flags, lengths or
    packet ids between them shows up here as a wrong or unparseable packet.
    """
    port = gateway.mqtt_port
    subs = [root(port, clients, root_password, client_id=f"fan-{qos}") for qos in (0, 1, 2)]
    for qos, sub in enumerate(subs):
        sub.subscribe(("fan/#", qos))
    pub = root(port, clients, root_password, client_id="fan-pub")
    sent: list[tuple[str, bytes, int]] = []
    for index in range(60):
        topic = "fan/bb" if index % 7 == 0 else "fan/a"
        # Sizes cross the one- and two-byte remaining-length boundary and come in pairs,
        # so heads are reused, and a topic change meets an unchanged size and flags.
        payload = bytes([index]) * (100 + (index // 2 % 4) * 20)
        qos = index % 3
        pub.publish(topic, payload, qos=qos)
        sent.append((topic, payload, qos))
    for granted, sub in enumerate(subs):
        got = sub.expect(len(sent), timeout=30)
        # Sorted: paho hands a QoS 2 message over only at PUBREL, after later QoS 0 ones.
        assert sorted((m.payload, m.topic, m.qos, m.retain) for m in got) == sorted(
            (payload, topic, min(qos, granted), False) for topic, payload, qos in sent
        )
    pub.publish("fan/kept", b"r" * 130, qos=2, retain=True)
    for granted, sub in enumerate(subs):
        live = sub.next_message()
        assert (live.topic, live.payload, live.qos, live.retain) == ("fan/kept", b"r" * 130, granted, False)
    late = root(port, clients, root_password, client_id="fan-late")
    late.subscribe(("fan/kept", 1))
    kept = late.next_message()
    assert (kept.topic, kept.payload, kept.qos, kept.retain) == ("fan/kept", b"r" * 130, 1, True)


def test_persistent_session_receives_what_was_published_offline(
    gateway: GatewayThread, clients: Any, root_password: str
) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="persist", clean_session=False)
    assert sub.subscribe(("offline/#", 2)) == [2]
    sub.disconnect()
    pub = root(port, clients, root_password, client_id="pub")
    # One QoS for all: MQTT orders messages per QoS level, and paho hands QoS 2
    # messages to the application at PUBREL, QoS 1 ones at PUBLISH.
    for i in range(50):
        pub.publish("offline/x", f"m{i}".encode(), qos=2)
    again = clients(port, client_id="persist", username=ROOT_USER, password=root_password, clean_session=False)
    code, session_present = again.connect()
    assert (code, session_present) == (0, True)
    got = again.expect(50)
    assert [m.payload for m in got] == [f"m{i}".encode() for i in range(50)]
    # Exactly once: nothing more arrives after a marker.
    pub.publish("offline/x", b"end", qos=1)
    assert again.next_message().payload == b"end"


def test_clean_session_discards_subscriptions(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="c1", clean_session=False)
    sub.subscribe(("gone/#", 1))
    sub.disconnect()
    fresh = clients(port, client_id="c1", username=ROOT_USER, password=root_password, clean_session=True)
    assert fresh.connect() == (0, False)
    fresh.subscribe(("marker", 1))
    pub = root(port, clients, root_password, client_id="pub")
    pub.publish("gone/x", b"old subscription", qos=1)
    pub.publish("marker", b"m", qos=1)
    assert fresh.next_message().payload == b"m"


def test_will_published_on_abnormal_disconnect_only(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    watcher = root(port, clients, root_password, client_id="watcher")
    watcher.subscribe(("wills/#", 1))
    polite = clients(port, client_id="polite", username=ROOT_USER, password=root_password,
                     will=("wills/polite", b"polite died", 1, False)).connect_ok()
    polite.disconnect()
    rude = clients(port, client_id="rude", username=ROOT_USER, password=root_password,
                   will=("wills/rude", b"rude died", 1, False)).connect_ok()
    rude.kill()
    message = watcher.next_message()
    assert (message.topic, message.payload) == ("wills/rude", b"rude died")


def test_will_published_on_keepalive_expiry(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    watcher = root(port, clients, root_password, client_id="watcher")
    watcher.subscribe(("wills/#", 1))
    # A raw client that sends CONNECT with keepalive 1 s and then stays silent.
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(_connect_bytes("silent", ROOT_USER, root_password, keepalive=1, will=("wills/silent", b"gone")))
        assert sock.recv(4) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        message = watcher.next_message(timeout=5)
        assert message.payload == b"gone"
        assert 1.0 <= time.monotonic() - started <= 3.0  # 1.5 x keepalive
    finally:
        sock.close()


def test_session_takeover(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    first = root(port, clients, root_password, client_id="same")
    second = root(port, clients, root_password, client_id="same")
    assert first.disconnected.wait(5)
    second.subscribe(("t", 0))
    second.publish("t", b"still works", qos=1)
    assert second.next_message().payload == b"still works"


def test_zero_length_client_id(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    assert clients(port, client_id="", username=ROOT_USER, password=root_password).connect()[0] == 0
    sock = socket.create_connection(("127.0.0.1", port))
    try:
        sock.sendall(_connect_bytes("", ROOT_USER, root_password, clean=False))
        assert sock.recv(4) == b"\x20\x02\x00\x02"  # identifier rejected
    finally:
        sock.close()


def test_retained_messages(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    pub = root(port, clients, root_password, client_id="pub")
    pub.publish("status/dev1", b"online", qos=1, retain=True)
    first = root(port, clients, root_password, client_id="s1")
    first.subscribe(("status/+", 1))
    message = first.next_message()
    assert (message.payload, message.retain) == (b"online", True)
    # Live messages are not flagged retained (MQTT-3.3.1-9).
    pub.publish("status/dev1", b"live", qos=1, retain=True)
    live = first.next_message()
    assert (live.payload, live.retain) == (b"live", False)
    pub.publish("status/dev1", b"", qos=1, retain=True)  # clears it
    assert first.next_message().payload == b""
    second = root(port, clients, root_password, client_id="s2")
    second.subscribe(("status/+", 1))
    pub.publish("status/marker", b"m", qos=1)
    assert second.next_message().payload == b"m"


def test_unsubscribe_and_ping(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="sub", keepalive=1)
    sub.subscribe(("u/a", 1), ("u/b", 1))
    result, _mid = sub.client.unsubscribe("u/a")
    assert result == 0
    pub = root(port, clients, root_password, client_id="pub")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # wait for the UNSUBACK to have been processed
        pub.publish("u/a", b"x", qos=1)
        pub.publish("u/b", b"y", qos=1)
        got = [m.payload for m in sub.expect(1)]
        if got == [b"y"]:
            break
        sub.expect(1)
    else:
        raise AssertionError("unsubscribe never took effect")
    # keepalive 1 s: paho pings; the connection survives 2.5 s of silence from our side.
    time.sleep(2.5)
    pub.publish("u/b", b"z", qos=1)
    assert sub.next_message().payload == b"z"


# -- QoS 2 at the protocol level ---------------------------------------------------------------------


def test_qos2_exactly_once_across_subscriber_reconnect(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    """The subscriber acknowledges PUBREC then drops before PUBCOMP; on reconnect it gets PUBREL, not the message."""
    port = gateway.mqtt_port
    raw = _RawClient(port)
    raw.send(_connect_bytes("q2", ROOT_USER, root_password, clean=False))
    assert raw.read_packet()[0] == 0x20
    raw.send(b"\x82\x08\x00\x01\x00\x03q/2\x02")  # SUBSCRIBE q/2 at QoS 2
    assert raw.read_packet() == (0x90, b"\x00\x01\x02")
    pub = root(port, clients, root_password, client_id="pub")
    pub.publish("q/2", b"once", qos=2)
    header, body = raw.read_packet()
    assert header & 0xF0 == 0x30 and (header >> 1) & 3 == 2
    packet_id = body[5:7]
    assert body.endswith(b"once")
    raw.send(b"\x50\x02" + packet_id)  # PUBREC
    assert raw.read_packet() == (0x62, packet_id)  # PUBREL
    raw.close()  # gone before PUBCOMP

    again = _RawClient(port)
    again.send(_connect_bytes("q2", ROOT_USER, root_password, clean=False))
    assert again.read_packet() == (0x20, b"\x01\x00")  # session present
    assert again.read_packet() == (0x62, packet_id)  # only PUBREL again, no second PUBLISH
    again.send(b"\x70\x02" + packet_id)  # PUBCOMP
    pub.publish("q/2", b"next", qos=2)
    header, body = again.read_packet()
    assert body.endswith(b"next") and not header & 0x08  # a new message, not a DUP
    again.close()


def test_unacknowledged_qos1_redelivered_with_dup(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    port = gateway.mqtt_port
    raw = _RawClient(port)
    raw.send(_connect_bytes("q1", ROOT_USER, root_password, clean=False))
    raw.read_packet()
    raw.send(b"\x82\x08\x00\x01\x00\x03q/1\x01")
    assert raw.read_packet() == (0x90, b"\x00\x01\x01")
    pub = root(port, clients, root_password, client_id="pub")
    pub.publish("q/1", b"again", qos=1)
    header, body = raw.read_packet()
    assert not header & 0x08
    raw.close()  # no PUBACK
    again = _RawClient(port)
    again.send(_connect_bytes("q1", ROOT_USER, root_password, clean=False))
    again.read_packet()
    header, body2 = again.read_packet()
    assert header & 0x08 and body2 == body  # same packet id and payload, DUP set
    again.close()


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x10\xff\xff\xff\xff\x7f",  # remaining length of 5 bytes
        b"\x30\x05\x00\x03a/#x",  # publish before CONNECT
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00",  # truncated, then garbage
        b"\xf0\x00",  # reserved packet type 15
    ],
)
def test_malformed_packet_closes_only_that_connection(
    gateway: GatewayThread, clients: Any, root_password: str, garbage: bytes
) -> None:
    port = gateway.mqtt_port
    sub = root(port, clients, root_password, client_id="good-sub")
    sub.subscribe(("ok", 1))
    bad = socket.create_connection(("127.0.0.1", port))
    bad.settimeout(5)
    bad.sendall(garbage + b"\x00" * 64)
    assert _read_until_closed(bad) is True
    pub = root(port, clients, root_password, client_id="good-pub")
    pub.publish("ok", b"still serving", qos=1)
    assert sub.next_message().payload == b"still serving"


def test_invalid_topic_in_publish_closes_connection(gateway: GatewayThread, root_password: str) -> None:
    raw = _RawClient(gateway.mqtt_port)
    raw.send(_connect_bytes("bad-topic", ROOT_USER, root_password))
    raw.read_packet()
    raw.send(b"\x30\x06\x00\x03a/+x")  # wildcard in a topic name
    assert _read_until_closed(raw.sock)


def test_oversized_packet_refused(start_gateway: Any, tmp_path: Path, clients: Any, root_password: str) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={"max_message_size": 1024}))
    raw = _RawClient(gw.mqtt_port)
    raw.send(_connect_bytes("big", ROOT_USER, root_password))
    raw.read_packet()
    raw.send(b"\x30\xff\xff\x03")  # announces ~64 KB: refused from the header alone
    assert _read_until_closed(raw.sock)
    ok = root(gw.mqtt_port, clients, root_password, client_id="ok")
    ok.subscribe(("s", 0))
    ok.publish("s", b"x" * 1000, qos=1)
    assert len(ok.next_message().payload) == 1000


def test_deny_publish_action_disconnect(start_gateway: Any, alice_db: str, clients: Any, root_password: str) -> None:
    gw = start_gateway(auth={"deny_publish_action": "disconnect"})
    alice = clients(gw.mqtt_port, client_id="alice", username="alice", password=ALICE_PASSWORD).connect_ok()
    alice.client.publish("tenants/bob/x", b"no", qos=1)
    assert alice.disconnected.wait(5)


def test_metrics_count_mqtt_traffic(gateway: GatewayThread, clients: Any, root_password: str) -> None:
    import urllib.request

    sub = root(gateway.mqtt_port, clients, root_password, client_id="m-sub")
    sub.subscribe(("m", 1))
    sub.publish("m", b"x", qos=1)
    sub.next_message()
    text = urllib.request.urlopen(f"http://127.0.0.1:{gateway.health_port}/metrics", timeout=5).read().decode()
    assert 'polygate_messages_in_total{protocol="mqtt"} 1.0' in text
    assert 'polygate_messages_out_total{protocol="mqtt"} 1.0' in text
    assert 'polygate_auth_decisions_total{action="connect",outcome="allow",protocol="mqtt"} 1.0' in text
    assert 'polygate_connections{protocol="mqtt"} 1.0' in text


# -- helpers ------------------------------------------------------------------------------------------------


def _mqtt_string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return len(data).to_bytes(2, "big") + data


def _connect_bytes(
    client_id: str, username: str, password: str, *, clean: bool = True, keepalive: int = 60,
    will: tuple[str, bytes] | None = None,
) -> bytes:
    """CONNECT written out by hand from the 3.1.1 spec (independent of our codec)."""
    flags = 0x80 | 0x40 | (0x02 if clean else 0)
    payload = _mqtt_string(client_id)
    if will is not None:
        flags |= 0x04 | 0x08  # will flag, will QoS 1
        payload += _mqtt_string(will[0]) + _mqtt_string(will[1])
    payload += _mqtt_string(username) + _mqtt_string(password)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return bytes([0x10, len(body)]) + body


class _RawClient:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.settimeout(5)
        self._buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise AssertionError("connection closed")
            self._buffer += chunk
        data, self._buffer = self._buffer[:count], self._buffer[count:]
        return data

    def read_packet(self) -> tuple[int, bytes]:
        header = self._read(1)[0]
        length, shift = 0, 0
        while True:
            byte = self._read(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        return header, self._read(length)

    def close(self) -> None:
        self.sock.close()


def _read_until_closed(sock: socket.socket) -> bool:
    """True when the peer closed the connection (EOF or reset) within the socket timeout."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False
    finally:
        sock.close()


def test_slow_subscriber_under_block_policy_holds_publisher_back_instead_of_dropping(
    start_gateway: Any, tmp_path: Path, clients: Any, root_password: str
) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={
        "max_queued_messages": 100, "max_inflight_messages": 10, "queue_overflow": {"mqtt": "block"}}))
    port = gw.mqtt_port
    slow = _RawClient(port)
    slow.send(_connect_bytes("slow", ROOT_USER, root_password))
    slow.read_packet()
    slow.send(b"\x82\x08\x00\x01\x00\x03b/p\x01")
    assert slow.read_packet() == (0x90, b"\x00\x01\x01")
    pub = root(port, clients, root_password, client_id="fast-pub")
    total = 2000
    for i in range(total):
        pub.client.publish("b/p", str(i).encode(), qos=1)

    def queued() -> int:
        assert gw.gateway is not None
        registry = gw.gateway.state.shared("mqtt.sessions", lambda: None)
        return len(registry.sessions["slow"].queue)

    deadline = time.monotonic() + 10
    while queued() < 50 and time.monotonic() < deadline:  # the subscriber is congested
        time.sleep(0.01)
    assert queued() >= 50
    received = []
    while len(received) < total:
        header, body = slow.read_packet()
        assert header & 0xF0 == 0x30
        topic_length = int.from_bytes(body[:2], "big")
        packet_id = body[2 + topic_length: 4 + topic_length]
        received.append(int(body[4 + topic_length:]))
        slow.send(b"\x40\x02" + packet_id)
    assert received == list(range(total))
    slow.close()
    dropped = gw.call(lambda: sum(gw.gateway.metrics.messages_dropped.values()))  # type: ignore[union-attr]
    assert dropped == 0


def test_retained_cap_is_counted_in_metrics(start_gateway: Any, tmp_path: Path, clients: Any, root_password: str) -> None:
    import urllib.request

    gw = start_gateway(loopback_config(tmp_path, limits={"max_retained_messages": 1}))
    pub = root(gw.mqtt_port, clients, root_password, client_id="pub")
    pub.publish("keep/1", b"a", qos=1, retain=True)
    pub.publish("keep/2", b"b", qos=1, retain=True)  # over the cap: delivered, not stored
    text = urllib.request.urlopen(f"http://127.0.0.1:{gw.health_port}/metrics", timeout=5).read().decode()
    assert "polygate_retained_messages 1.0" in text
    assert "polygate_retained_refused_total 1.0" in text
    late = root(gw.mqtt_port, clients, root_password, client_id="late")
    late.subscribe(("keep/+", 1))
    assert late.next_message().payload == b"a"


def test_empty_topic_in_publish_closes_connection_cleanly(
    gateway: GatewayThread, clients: Any, root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    raw = _RawClient(gateway.mqtt_port)
    raw.send(_connect_bytes("empty-topic", ROOT_USER, root_password))
    raw.read_packet()
    raw.send(b"\x30\x04\x00\x00hi")  # QoS 0 PUBLISH with a zero-length topic (MQTT-4.7.3-1)
    assert _read_until_closed(raw.sock)
    assert "Fatal error" not in caplog.text and "Traceback" not in caplog.text
    ok = root(gateway.mqtt_port, clients, root_password, client_id="still-ok")
    ok.subscribe(("t", 0))
    ok.publish("t", b"x", qos=1)
    assert ok.next_message().payload == b"x"


def test_topic_over_max_length_in_utf8_bytes_closes_connection_cleanly(
    start_gateway: Any, tmp_path: Path, clients: Any, root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    gw = start_gateway(loopback_config(tmp_path, limits={"max_topic_length": 64}))
    raw = _RawClient(gw.mqtt_port)
    raw.send(_connect_bytes("long-topic", ROOT_USER, root_password))
    raw.read_packet()
    topic = ("\u20ac" * 30).encode()  # 30 characters, 90 UTF-8 bytes: over a 64-byte limit
    body = len(topic).to_bytes(2, "big") + topic + b"x"
    raw.send(bytes([0x30, len(body)]) + body)
    assert _read_until_closed(raw.sock)
    assert "Fatal error" not in caplog.text
    ok = root(gw.mqtt_port, clients, root_password, client_id="still-ok")
    ok.subscribe(("t", 0))
    ok.publish("t", b"x", qos=1)
    assert ok.next_message().payload == b"x"
