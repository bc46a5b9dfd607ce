"""The sans-IO AMQP 0.9.1 framing, on bytes alone, pinned against pamqp's own encoding."""

from __future__ import annotations

import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pamqp import body as pamqp_body, commands, frame as pamqp_frame, header as pamqp_header, heartbeat

from gateway.amqp091.framing import (
    CONTENT_TOO_LARGE,
    FRAME_ERROR,
    FRAME_MAX,
    HEARTBEAT,
    PROPERTIES_NONE,
    PROPERTIES_PERSISTENT,
    PROTOCOL_HEADER,
    PUBLISH_ARGS_CACHE_SIZE,
    SYNTAX_ERROR,
    UNEXPECTED_FRAME,
    Ack,
    ContentTooLarge,
    FrameDecoder,
    FramingError,
    MethodFrame,
    ProtocolHeaderReceived,
    Publish,
    UnknownMethod,
    decode_properties,
    deliver_prefix,
    encode_basic_ack,
    encode_content,
    encode_deliver,
    encode_get_ok,
    encode_method,
    encode_return,
    exchange_and_key,
    reply_text,
)


def opened(max_body_size: int = 1 << 20, frame_max: int = FRAME_MAX) -> FrameDecoder:
    decoder = FrameDecoder(max_body_size=max_body_size, frame_max=frame_max)
    assert [type(e) for e in decoder.feed(PROTOCOL_HEADER)] == [ProtocolHeaderReceived]
    return decoder


def publish_bytes(channel: int, exchange: str, routing_key: str, body: bytes, *, frame_max: int = FRAME_MAX,
                  properties: commands.Basic.Properties | None = None, mandatory: bool = False) -> bytes:
    """A publish as a client library (pamqp, like aiormq) writes it."""
    frames = [
        pamqp_frame.marshal(commands.Basic.Publish(exchange=exchange, routing_key=routing_key, mandatory=mandatory),
                            channel),
        pamqp_frame.marshal(pamqp_header.ContentHeader(0, len(body), properties or commands.Basic.Properties()),
                            channel),
    ]
    chunk = frame_max - 8
    for start in range(0, len(body), chunk):
        frames.append(pamqp_frame.marshal(pamqp_body.ContentBody(body[start:start + chunk]), channel))
    return b"".join(frames)


def unmarshal_all(data: bytes) -> list[tuple[int, object]]:
    out = []
    while data:
        used, channel, value = pamqp_frame.unmarshal(data)
        out.append((channel, value))
        data = data[used:]
    return out


# -- the protocol header ------------------------------------------------------------------------


def test_header_may_arrive_in_pieces() -> None:
    decoder = FrameDecoder(max_body_size=100)
    assert decoder.feed(b"AM") == []
    assert not decoder.header_received
    events = decoder.feed(b"QP\x00\x00\x09\x01")
    assert [type(e) for e in events] == [ProtocolHeaderReceived]
    assert decoder.header_received


@pytest.mark.parametrize("header", [
    b"AMQP\x00\x01\x00\x00",  # AMQP 1.0
    b"AMQP\x03\x01\x00\x00",  # AMQP 1.0 SASL
    b"AMQP\x00\x00\x08\x00",  # 0-8
    b"GET / HTTP/1.1\r\n",
    b"\x10\x0c\x00\x04MQTT",
])
def test_a_foreign_header_is_refused_at_the_first_wrong_byte(header: bytes) -> None:
    decoder = FrameDecoder(max_body_size=100)
    with pytest.raises(FramingError) as info:
        decoder.feed(header)
    assert info.value.bad_header
    # Sticky: the decoder stays broken.
    with pytest.raises(FramingError):
        decoder.feed(PROTOCOL_HEADER)


def test_a_foreign_header_prefix_is_refused_before_eight_bytes() -> None:
    decoder = FrameDecoder(max_body_size=100)
    with pytest.raises(FramingError) as info:
        decoder.feed(b"AMQP\x01")
    assert info.value.bad_header


def test_header_and_frames_in_one_read() -> None:
    decoder = FrameDecoder(max_body_size=100)
    events = decoder.feed(PROTOCOL_HEADER + encode_method(0, commands.Connection.TuneOk(2047, 131072, 60)))
    assert type(events[0]) is ProtocolHeaderReceived
    assert isinstance(events[1], MethodFrame) and isinstance(events[1].method, commands.Connection.TuneOk)


# -- methods ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", [
    commands.Connection.StartOk(client_properties={"connection_name": "c1", "capabilities": {"a": True}},
                                mechanism="PLAIN", response="\x00u\x00p", locale="en_US"),
    commands.Channel.Open(),
    commands.Queue.Declare(queue="q1", durable=True, exclusive=True, auto_delete=True, arguments={"x": 1}),
    commands.Queue.Bind(queue="q1", exchange="amq.topic", routing_key="a.*.c"),
    commands.Basic.Consume(queue="q1", consumer_tag="t1", no_ack=False, exclusive=True),
    commands.Basic.Nack(delivery_tag=7, multiple=True, requeue=False),
    commands.Basic.Qos(prefetch_count=100, global_=True),
])
def test_methods_round_trip(method: object) -> None:
    decoder = opened()
    events = decoder.feed(encode_method(3, method))  # type: ignore[arg-type]
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, MethodFrame) and event.channel == 3
    assert type(event.method) is type(method)
    assert dict(event.method) == dict(method)  # type: ignore[call-overload]


def test_basic_ack_is_decoded_by_hand_like_pamqp() -> None:
    decoder = opened()
    events = decoder.feed(pamqp_frame.marshal(commands.Basic.Ack(delivery_tag=2**40 + 5, multiple=True), 9))
    assert len(events) == 1 and isinstance(events[0], Ack)
    assert (events[0].channel, events[0].delivery_tag, events[0].multiple) == (9, 2**40 + 5, True)


def test_unknown_method_is_reported_not_fatal() -> None:
    decoder = opened()
    payload = struct.pack(">HH", 60, 99)
    frame = struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce"
    events = decoder.feed(frame + encode_method(1, commands.Channel.CloseOk()))
    assert isinstance(events[0], UnknownMethod) and (events[0].class_id, events[0].method_id) == (60, 99)
    assert isinstance(events[1], MethodFrame)


def test_malformed_method_arguments_are_a_syntax_error() -> None:
    decoder = opened()
    payload = struct.pack(">HH", 50, 10) + b"\x00"  # queue.declare cut short
    with pytest.raises(FramingError) as info:
        decoder.feed(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
    assert info.value.reply_code == SYNTAX_ERROR


def test_malformed_publish_is_a_syntax_error() -> None:
    decoder = opened()
    payload = struct.pack(">HHH", 60, 40, 0) + b"\x09amq"  # exchange runs past the end
    with pytest.raises(FramingError) as info:
        decoder.feed(struct.pack(">BHI", 1, 1, len(payload)) + payload + b"\xce")
    assert info.value.reply_code == SYNTAX_ERROR


# -- content assembly ------------------------------------------------------------------------------


def test_publish_is_assembled_from_split_body_frames() -> None:
    body = bytes(range(256)) * 100  # 25,600 bytes: 7 frames at frame_max 4096
    data = publish_bytes(5, "amq.topic", "a.b", body, frame_max=4096, mandatory=True)
    decoder = opened(frame_max=4096)
    events = decoder.feed(data)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Publish)
    assert (event.channel, event.exchange, event.routing_key, event.mandatory, event.immediate) == (
        5, "amq.topic", "a.b", True, False)
    assert event.body == body
    assert event.properties == PROPERTIES_NONE and not event.persistent


def test_partial_data_byte_by_byte_gives_the_same_events() -> None:
    body = b"x" * 5000
    data = publish_bytes(1, "", "q", body, frame_max=4096) + HEARTBEAT + encode_method(1, commands.Basic.Get(queue="q"))
    decoder = opened(frame_max=4096)
    events: list[object] = []
    for index in range(len(data)):
        events += decoder.feed(data[index:index + 1])
    assert [type(e) for e in events] == [Publish, MethodFrame]
    assert events[0].body == body  # type: ignore[attr-defined]


def test_interleaved_channels_assemble_separately() -> None:
    a = publish_bytes(1, "", "qa", b"A" * 10)
    b = publish_bytes(2, "", "qb", b"B" * 10)
    a_frames = [f for f in _split_frames(a)]
    b_frames = [f for f in _split_frames(b)]
    mixed = b"".join(x + y for x, y in zip(a_frames, b_frames))
    events = opened().feed(mixed)
    assert [(e.channel, e.body) for e in events] == [(1, b"A" * 10), (2, b"B" * 10)]  # type: ignore[attr-defined]


def _split_frames(data: bytes) -> list[bytes]:
    frames = []
    while data:
        size = struct.unpack_from(">I", data, 3)[0]
        frames.append(data[:size + 8])
        data = data[size + 8:]
    return frames


def test_properties_travel_raw_and_persistence_is_read() -> None:
    properties = commands.Basic.Properties(content_type="application/json", delivery_mode=2,
                                           headers={"k": "v", "n": 3}, correlation_id="c-1")
    events = opened().feed(publish_bytes(1, "amq.topic", "t", b"{}", properties=properties))
    event = events[0]
    assert isinstance(event, Publish) and event.persistent
    assert event.properties == properties.marshal()
    decoded = decode_properties(event.properties)
    assert (decoded.content_type, decoded.headers, decoded.correlation_id) == ("application/json", {"k": "v", "n": 3}, "c-1")


def test_delivery_mode_only_fast_path() -> None:
    properties = commands.Basic.Properties(delivery_mode=2)
    assert properties.marshal() == PROPERTIES_PERSISTENT
    event = opened().feed(publish_bytes(1, "amq.topic", "t", b"x", properties=properties))[0]
    assert event.persistent  # type: ignore[attr-defined]


def test_empty_body_ends_at_the_header() -> None:
    events = opened().feed(publish_bytes(1, "amq.topic", "t", b""))
    assert len(events) == 1 and events[0].body == b""  # type: ignore[attr-defined]


def test_too_large_content_is_reported_and_its_body_skipped() -> None:
    decoder = opened(max_body_size=1000)
    data = publish_bytes(1, "amq.topic", "t", b"y" * 5000, frame_max=4096) + publish_bytes(1, "amq.topic", "t", b"ok")
    events = decoder.feed(data)
    assert isinstance(events[0], ContentTooLarge) and events[0].body_size == 5000
    assert isinstance(events[1], Publish) and events[1].body == b"ok"


@pytest.mark.parametrize(("frames", "code"), [
    # A content header with no publish before it.
    (lambda: pamqp_frame.marshal(pamqp_header.ContentHeader(0, 1, commands.Basic.Properties()), 1), UNEXPECTED_FRAME),
    # A body frame with no header.
    (lambda: pamqp_frame.marshal(pamqp_body.ContentBody(b"x"), 1), UNEXPECTED_FRAME),
    # A method where the content header was expected.
    (lambda: pamqp_frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)
        + encode_method(1, commands.Channel.CloseOk()), UNEXPECTED_FRAME),
    # More body than the header announced.
    (lambda: pamqp_frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)
        + pamqp_frame.marshal(pamqp_header.ContentHeader(0, 1, commands.Basic.Properties()), 1)
        + pamqp_frame.marshal(pamqp_body.ContentBody(b"xy"), 1), FRAME_ERROR),
    # A heartbeat on a channel other than 0.
    (lambda: struct.pack(">BHI", 8, 1, 0) + b"\xce", FRAME_ERROR),
    # An unknown frame type.
    (lambda: struct.pack(">BHI", 9, 0, 0) + b"\xce", FRAME_ERROR),
    # A truncated frame: the frame-end octet is not where the size says.
    (lambda: struct.pack(">BHI", 1, 0, 10) + b"\x00\x0a\x00\x0b\xce" + encode_method(0, commands.Connection.CloseOk()),
     FRAME_ERROR),
])
def test_broken_streams_raise_with_a_reply_code(frames, code: int) -> None:  # type: ignore[no-untyped-def]
    decoder = opened()
    with pytest.raises(FramingError) as info:
        decoder.feed(frames())
    assert info.value.reply_code == code
    assert info.value.reply_text.startswith(("FRAME_ERROR", "UNEXPECTED_FRAME", "SYNTAX_ERROR"))


def test_frames_decoded_before_a_fault_are_handed_over() -> None:
    decoder = opened()
    good = encode_method(1, commands.Basic.Get(queue="q"))
    with pytest.raises(FramingError) as info:
        decoder.feed(good + b"\x01\x00\x01\x00\x00\x00\x01\x00\x00")  # wrong frame end
    assert [type(e) for e in info.value.events] == [MethodFrame]


def test_frame_max_is_enforced_on_input() -> None:
    decoder = opened(frame_max=4096)
    payload = b"z" * 4089  # 4089 + 8 > 4096
    with pytest.raises(FramingError) as info:
        decoder.feed(pamqp_frame.marshal(commands.Basic.Publish(exchange="", routing_key="q"), 1)
                     + pamqp_frame.marshal(pamqp_header.ContentHeader(0, 4089, commands.Basic.Properties()), 1)
                     + struct.pack(">BHI", 3, 1, len(payload)) + payload + b"\xce")
    assert info.value.reply_code == FRAME_ERROR


def test_frame_max_is_checked_before_the_body_arrives() -> None:
    decoder = opened(frame_max=4096)
    with pytest.raises(FramingError):
        decoder.feed(struct.pack(">BHI", 3, 1, 1 << 30))


def test_heartbeats_are_consumed_silently() -> None:
    assert opened().feed(HEARTBEAT * 3) == []
    assert HEARTBEAT == heartbeat.Heartbeat.marshal()


# -- encoding, byte for byte like pamqp ----------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4088, 4089, 10000])
def test_deliver_matches_pamqp(size: int) -> None:
    body = bytes(i % 251 for i in range(size))
    properties = commands.Basic.Properties(delivery_mode=2, headers={"a": "b"})
    ours = encode_deliver(7, deliver_prefix("ctag-1"), 42, True, exchange_and_key("amq.topic", "a.b.c"),
                          properties.marshal(), body, 4096)
    expected = pamqp_frame.marshal(commands.Basic.Deliver("ctag-1", 42, True, "amq.topic", "a.b.c"), 7)
    expected += pamqp_frame.marshal(pamqp_header.ContentHeader(0, size, properties), 7)
    for start in range(0, size, 4088):
        expected += pamqp_frame.marshal(pamqp_body.ContentBody(body[start:start + 4088]), 7)
    assert ours == expected
    assert all(len(frame) <= 4096 for frame in _split_frames(ours))


def test_get_ok_and_return_match_pamqp() -> None:
    ours = encode_get_ok(2, 9, False, exchange_and_key("", "q1"), 3, PROPERTIES_NONE, b"hi", FRAME_MAX)
    channel, method = unmarshal_all(ours)[0]
    assert channel == 2 and isinstance(method, commands.Basic.GetOk)
    assert dict(method) == dict(commands.Basic.GetOk(9, False, "", "q1", 3))
    ours = encode_return(2, 312, "NO_ROUTE", exchange_and_key("amq.topic", "x.y"), PROPERTIES_NONE, b"hi", FRAME_MAX)
    frames = unmarshal_all(ours)
    assert dict(frames[0][1]) == dict(commands.Basic.Return(312, "NO_ROUTE", "amq.topic", "x.y"))  # type: ignore[call-overload]
    assert frames[2][1].value == b"hi"  # type: ignore[attr-defined]


def test_basic_ack_matches_pamqp() -> None:
    assert encode_basic_ack(3, 77, True) == pamqp_frame.marshal(commands.Basic.Ack(77, True), 3)
    assert encode_basic_ack(3, 1, False) == pamqp_frame.marshal(commands.Basic.Ack(1, False), 3)


def test_content_is_split_at_frame_max() -> None:
    parts = encode_content(1, PROPERTIES_NONE, b"q" * 10000, 4096)
    frames = _split_frames(b"".join(parts))
    assert [len(f) for f in frames[1:]] == [4096, 4096, 10000 - 2 * 4088 + 8]


def test_reply_text_fits_a_short_string() -> None:
    text = reply_text(403, "é" * 300)
    assert text.startswith("ACCESS_REFUSED - ") and len(text.encode()) <= 255
    assert reply_text(CONTENT_TOO_LARGE, "big") == "CONTENT_TOO_LARGE - big"


# -- open-ended input ----------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.booleans())
def test_arbitrary_bytes_raise_only_framing_errors(data: bytes, after_header: bool) -> None:
    decoder = FrameDecoder(max_body_size=1000, frame_max=4096)
    if after_header:
        decoder.feed(PROTOCOL_HEADER)
    try:
        decoder.feed(data)
    except FramingError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 3), st.sampled_from([1, 2, 3, 8]), st.binary(max_size=40)), max_size=8))
def test_arbitrary_frames_raise_only_framing_errors(frames: list[tuple[int, int, bytes]]) -> None:
    """Well-delimited frames with hostile payloads reach pamqp's decoders: still only FramingError."""
    decoder = opened(max_body_size=1000, frame_max=4096)
    data = b"".join(struct.pack(">BHI", kind, channel, len(p)) + p + b"\xce" for channel, kind, p in frames)
    try:
        decoder.feed(data)
    except FramingError:
        pass


def feed_in_pieces(decoder: Any, data: bytes, cuts: list[int]) -> list[object]:
    """Feed `data` cut after each length in `cuts`, then the rest; every event, in order."""
    pieces: list[object] = []
    position = 0
    for cut in cuts:
        pieces += decoder.feed(data[position:position + cut])
        position += cut
    return pieces + decoder.feed(data[position:])


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3000), st.lists(st.integers(1, 200), max_size=40))
def test_any_split_gives_the_same_events(body: bytes, cuts: list[int]) -> None:
    data = publish_bytes(1, "amq.topic", "a.b", body, frame_max=4096) + encode_method(1, commands.Basic.Get(queue="q"))
    whole = opened(frame_max=4096).feed(data)
    pieces = feed_in_pieces(opened(frame_max=4096), data, cuts)
    assert [type(e) for e in pieces] == [type(e) for e in whole] == [Publish, MethodFrame]
    assert pieces[0].body == whole[0].body == body  # type: ignore[attr-defined]


# -- the hand-written hot path against pamqp, both directions -------------------------------------------
# Each encoder output is decoded by pamqp, or compared with pamqp's bytes; each decoder input is
# written by pamqp. So neither side can drift from the library that clients are built on.

_NAME_CHARS = "abcXYZ019-_.:"
exchange_names = st.text(alphabet=_NAME_CHARS, max_size=127)
# Short strings of up to 255 UTF-8 bytes (at most 4 bytes a character).
short_strings = st.text(max_size=63)
# The spec's delivery tags are unsigned 64-bit; pamqp reads and writes them signed, so the
# comparison covers the range on which both agree (a tag never reaches 2**63 in practice).
delivery_tags = st.integers(0, 2**63 - 1)


@st.composite
def basic_properties(draw: st.DrawFn) -> commands.Basic.Properties:
    """Any mix of the properties clients set, none of them to keep it short. Values are never
    empty or zero: pamqp writes those as "not set", so they would not read back as given."""
    values_ = st.text(min_size=1, max_size=63)
    fields: dict[str, object] = {}
    for name, values in (
        ("content_type", values_), ("content_encoding", values_),
        ("headers", st.dictionaries(st.text(alphabet="abcxyz", min_size=1, max_size=8),
                                    st.one_of(st.text(max_size=20), st.integers(-2**31, 2**31 - 1), st.booleans()),
                                    min_size=1, max_size=3)),
        ("delivery_mode", st.sampled_from([1, 2])), ("priority", st.integers(1, 9)),
        ("correlation_id", values_), ("reply_to", values_),
        ("expiration", st.integers(0, 10**9).map(str)), ("message_id", values_),
        ("message_type", values_), ("user_id", values_), ("app_id", values_),
    ):
        if draw(st.booleans()):
            fields[name] = draw(values)
    return commands.Basic.Properties(**fields)  # type: ignore[arg-type]


@st.composite
def publishes(draw: st.DrawFn) -> tuple[int, str, str, bool, commands.Basic.Properties, bytes]:
    return (draw(st.integers(1, 4)), draw(st.sampled_from(["amq.topic", ""]) | exchange_names),
            draw(short_strings), draw(st.booleans()), draw(basic_properties()),
            draw(st.binary(max_size=9000)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 65535), short_strings, delivery_tags, st.booleans(), exchange_names,
       short_strings, basic_properties(), st.binary(max_size=9000), st.sampled_from([4096, 5000, FRAME_MAX]))
def test_deliver_is_pamqps_deliver_for_any_arguments(channel: int, consumer_tag: str, delivery_tag: int,
                                                     redelivered: bool, exchange: str, routing_key: str,
                                                     properties: commands.Basic.Properties, body: bytes,
                                                     frame_max: int) -> None:
    ours = encode_deliver(channel, deliver_prefix(consumer_tag), delivery_tag, redelivered,
                          exchange_and_key(exchange, routing_key), properties.marshal(), body, frame_max)
    expected = pamqp_frame.marshal(commands.Basic.Deliver(consumer_tag, delivery_tag, redelivered, exchange,
                                                          routing_key), channel)
    expected += pamqp_frame.marshal(pamqp_header.ContentHeader(0, len(body), properties), channel)
    for start in range(0, len(body), frame_max - 8):
        expected += pamqp_frame.marshal(pamqp_body.ContentBody(body[start:start + frame_max - 8]), channel)
    assert ours == expected
    assert all(len(frame) <= frame_max for frame in _split_frames(ours))


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 65535), delivery_tags, st.booleans(), exchange_names, short_strings,
       st.integers(0, 2**32 - 1), basic_properties(), st.binary(max_size=300))
def test_get_ok_and_return_decode_in_pamqp_for_any_arguments(channel: int, delivery_tag: int, redelivered: bool,
                                                             exchange: str, routing_key: str, count: int,
                                                             properties: commands.Basic.Properties,
                                                             body: bytes) -> None:
    raw = properties.marshal()
    get_ok = unmarshal_all(encode_get_ok(channel, delivery_tag, redelivered, exchange_and_key(exchange, routing_key),
                                         count, raw, body, FRAME_MAX))
    assert dict(get_ok[0][1]) == dict(commands.Basic.GetOk(delivery_tag, redelivered, exchange, routing_key, count))  # type: ignore[call-overload]
    returned = unmarshal_all(encode_return(channel, 312, "NO_ROUTE", exchange_and_key(exchange, routing_key), raw,
                                           body, FRAME_MAX))
    assert dict(returned[0][1]) == dict(commands.Basic.Return(312, "NO_ROUTE", exchange, routing_key))  # type: ignore[call-overload]
    for frames in (get_ok, returned):
        assert all(number == channel for number, _ in frames)
        header = frames[1][1]
        assert header.body_size == len(body) and dict(header.properties) == dict(properties)  # type: ignore[attr-defined]
        assert b"".join(frame.value for _, frame in frames[2:]) == body  # type: ignore[attr-defined]


@given(st.integers(0, 65535), delivery_tags, st.booleans())
def test_basic_ack_both_ways_like_pamqp(channel: int, delivery_tag: int, multiple: bool) -> None:
    pamqps = pamqp_frame.marshal(commands.Basic.Ack(delivery_tag, multiple), channel)
    assert encode_basic_ack(channel, delivery_tag, multiple) == pamqps
    [event] = opened().feed(pamqps)
    assert isinstance(event, Ack) and (event.channel, event.delivery_tag, event.multiple) == (
        channel, delivery_tag, multiple)


def _assert_publish(event: object, publish: tuple[int, str, str, bool, commands.Basic.Properties, bytes]) -> None:
    channel, exchange, routing_key, mandatory, properties, body = publish
    assert isinstance(event, Publish)
    assert (event.channel, event.exchange, event.routing_key, event.mandatory, event.immediate, event.body) == (
        channel, exchange, routing_key, mandatory, False, body)
    assert event.properties == properties.marshal()
    assert dict(decode_properties(event.properties)) == dict(properties)
    assert event.persistent == (properties.delivery_mode == 2)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(publishes(), min_size=1, max_size=4), st.lists(st.integers(0, 7), min_size=1, max_size=12),
       st.lists(st.integers(1, 400), max_size=30))
def test_publishes_written_by_pamqp_decode_to_what_was_sent(distinct: list[tuple[int, str, str, bool,
                                                                                 commands.Basic.Properties, bytes]],
                                                            order: list[int], cuts: list[int]) -> None:
    """A stream of publishes, some repeating earlier ones exactly (the decoder's repeat path),
    fed whole and in arbitrary pieces, decodes to exactly what pamqp encoded."""
    sent = [distinct[index % len(distinct)] for index in order]
    data = b"".join(publish_bytes(channel, exchange, key, body, frame_max=4096, properties=properties,
                                  mandatory=mandatory)
                    for channel, exchange, key, mandatory, properties, body in sent)
    whole = opened(frame_max=4096).feed(data)
    pieces = feed_in_pieces(opened(frame_max=4096), data, cuts)
    assert len(whole) == len(pieces) == len(sent)
    for event_whole, event_pieces, publish in zip(whole, pieces, sent):
        _assert_publish(event_whole, publish)
        _assert_publish(event_pieces, publish)


def test_a_repeated_publish_with_a_bad_end_octet_is_still_a_frame_error() -> None:
    decoder = opened()
    data = publish_bytes(1, "amq.topic", "a.b", b"x" * 10)
    assert len(decoder.feed(data)) == 1
    assert len(decoder.feed(data)) == 1  # the repeat path
    with pytest.raises(FramingError) as info:
        decoder.feed(data[:-1] + b"\x00")
    assert info.value.reply_code == FRAME_ERROR


def test_a_repeated_publish_while_content_is_pending_is_an_unexpected_frame() -> None:
    decoder = opened()
    data = publish_bytes(1, "amq.topic", "a.b", b"x" * 10)
    decoder.feed(data)
    method_and_header = b"".join(_split_frames(data)[:2])
    assert decoder.feed(method_and_header) == []  # the body is still to come
    with pytest.raises(FramingError) as info:
        decoder.feed(data)
    assert info.value.reply_code == UNEXPECTED_FRAME


def test_a_lower_frame_max_applies_to_a_publish_seen_before() -> None:
    decoder = opened()
    data = publish_bytes(1, "amq.topic", "a.b", b"x" * 5000)  # one body frame at frame_max 131072
    decoder.feed(data)
    decoder.frame_max = 4096
    with pytest.raises(FramingError) as info:
        decoder.feed(data)
    assert info.value.reply_code == FRAME_ERROR


def test_a_repeat_of_a_different_size_or_channel_is_decoded_afresh() -> None:
    decoder = opened()
    first = publish_bytes(1, "amq.topic", "a.b", b"x" * 10)
    events = decoder.feed(first + publish_bytes(1, "amq.topic", "a.b", b"y" * 11)
                          + publish_bytes(2, "amq.topic", "a.b", b"z" * 10) + first)
    assert [(e.channel, e.body) for e in events] == [  # type: ignore[attr-defined]
        (1, b"x" * 10), (1, b"y" * 11), (2, b"z" * 10), (1, b"x" * 10)]


def test_more_routing_keys_than_the_decoder_remembers_all_decode() -> None:
    decoder = opened()
    keys = [f"k.{index}" for index in range(PUBLISH_ARGS_CACHE_SIZE * 2 + 1)]
    for _ in range(2):
        events = decoder.feed(b"".join(publish_bytes(1, "amq.topic", key, key.encode()) for key in keys))
        assert [(e.routing_key, e.body) for e in events] == [(key, key.encode()) for key in keys]  # type: ignore[attr-defined]
