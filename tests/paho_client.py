"""paho-mqtt (an independent client) driven synchronously, with deadlines, for tests."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import ROOT_USER

# paho 2 reports MQTT 3.1.1 CONNACK codes as MQTT 5 reason codes; map them back.
_CONNACK_RAW = {0: 0, 132: 1, 133: 2, 136: 3, 134: 4, 135: 5}


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class PahoClient:
    def __init__(
        self,
        port: int,
        *,
        client_id: str = "",
        username: str | None = None,
        password: str | None = None,
        clean_session: bool = True,
        keepalive: int = 60,
        will: tuple[str, bytes, int, bool] | None = None,
    ) -> None:
        self.port = port
        self.keepalive = keepalive
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=clean_session,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        if username is not None:
            self.client.username_pw_set(username, password)
        if will is not None:
            topic, payload, qos, retain = will
            self.client.will_set(topic, payload, qos, retain)
        self.messages: queue.Queue[Received] = queue.Queue()
        self._connack: queue.Queue[tuple[int, bool]] = queue.Queue()
        self._subacks: dict[int, list[int]] = {}
        self._suback_event = threading.Condition()
        self.disconnected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self._connack.put((_CONNACK_RAW.get(reason_code.value, reason_code.value), bool(flags.session_present)))

    def _on_message(self, client, userdata, message) -> None:  # type: ignore[no-untyped-def]
        self.messages.put(Received(message.topic, bytes(message.payload), message.qos, bool(message.retain)))

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:  # type: ignore[no-untyped-def]
        with self._suback_event:
            self._subacks[mid] = [rc.value for rc in reason_codes]
            self._suback_event.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:  # type: ignore[no-untyped-def]
        self.disconnected.set()

    def connect(self, timeout: float = 10.0) -> tuple[int, bool]:
        """(raw CONNACK code, session present)."""
        self.client.connect("127.0.0.1", self.port, keepalive=self.keepalive)
        self.client.loop_start()
        try:
            return self._connack.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no CONNACK within the deadline") from None

    def connect_ok(self) -> PahoClient:
        code, _ = self.connect()
        assert code == 0, f"CONNACK {code}"
        return self

    def subscribe(self, *filters: tuple[str, int], timeout: float = 10.0) -> list[int]:
        result, mid = self.client.subscribe(list(filters))
        assert result == mqtt.MQTT_ERR_SUCCESS
        with self._suback_event:
            if not self._suback_event.wait_for(lambda: mid in self._subacks, timeout):
                raise AssertionError("no SUBACK within the deadline")
            return self._subacks.pop(mid)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False, timeout: float = 10.0) -> None:
        info = self.client.publish(topic, payload, qos, retain)
        info.wait_for_publish(timeout)

    def expect(self, count: int = 1, timeout: float = 10.0) -> list[Received]:
        got: list[Received] = []
        for _ in range(count):
            try:
                got.append(self.messages.get(timeout=timeout))
            except queue.Empty:
                raise AssertionError(f"expected {count} messages, got {len(got)}: {got[-3:]}") from None
        return got

    def next_message(self, timeout: float = 10.0) -> Received:
        return self.expect(1, timeout)[0]

    def disconnect(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def kill(self) -> None:
        """End the connection without DISCONNECT (an abnormal disconnect)."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


class AckCounter:
    """A paho QoS 1 publisher that knows which of its messages were PUBACKed, publishing without waiting
    (up to 100 in flight, nothing queued in paho beyond that)."""

    def __init__(self, port: int, password: str, client_id: str, username: str = ROOT_USER) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311,
                                  reconnect_on_failure=False)
        self.client.username_pw_set(username, password)
        self.client.max_inflight_messages_set(100)
        self.client.max_queued_messages_set(0)
        self._sent: list[tuple[int, mqtt.MQTTMessageInfo]] = []
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    @property
    def acked(self) -> set[int]:
        # is_published() turns true when the PUBACK arrived, never before.
        return {number for number, info in self._sent if info.is_published()}

    def publish(self, topic: str, number: int) -> None:
        self._sent.append((number, self.client.publish(topic, str(number).encode(), qos=1)))

    def wait_acked(self, count: int, timeout: float = 30.0) -> set[int]:
        deadline = time.monotonic() + timeout
        while len(acked := self.acked) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        return acked

    def stop(self) -> None:
        # Disconnecting first wakes the network thread, so loop_stop does not wait out its poll.
        self.client.disconnect()
        self.client.loop_stop()
