"""The AMQP 0.9.1 decoder bounds the bodies it holds half-received, all channels together."""

from __future__ import annotations

import pytest
from pamqp import body as pamqp_body, commands, frame as pamqp_frame, header as pamqp_header

from gateway.amqp091.framing import (
    MIN_PENDING_CONTENT,
    PROTOCOL_HEADER,
    RESOURCE_ERROR,
    FrameDecoder,
    FramingError,
    Publish,
)

BODY = 1 << 20  # the default limits.max_message_size
CHUNK = 65536


def started(channel: int, body_size: int = BODY) -> bytes:
    """basic.publish and its content header: the body is still to come."""
    return (pamqp_frame.marshal(commands.Basic.Publish(exchange="amq.topic", routing_key="a.b"), channel)
            + pamqp_frame.marshal(pamqp_header.ContentHeader(0, body_size, commands.Basic.Properties()), channel))


def body(channel: int, size: int = CHUNK) -> bytes:
    return pamqp_frame.marshal(pamqp_body.ContentBody(b"x" * size), channel)


def decoder() -> FrameDecoder:
    decoder = FrameDecoder(max_body_size=BODY)
    decoder.feed(PROTOCOL_HEADER)
    return decoder


def test_the_default_bound_is_eight_of_the_largest_bodies() -> None:
    assert decoder().max_pending == max(MIN_PENDING_CONTENT, 8 * BODY)
    assert FrameDecoder(max_body_size=1000).max_pending == MIN_PENDING_CONTENT


def test_one_channel_never_reaches_it() -> None:
    events = decoder().feed(started(1) + b"".join(body(1) for _ in range(BODY // CHUNK)))
    assert len(events) == 1 and isinstance(events[0], Publish) and len(events[0].body) == BODY


def test_many_channels_each_holding_part_of_a_body_are_refused_with_506() -> None:
    feed = decoder().feed
    channels = decoder().max_pending // (BODY // 2) + 1
    with pytest.raises(FramingError) as caught:
        for channel in range(1, channels + 1):
            feed(started(channel) + b"".join(body(channel) for _ in range(BODY // 2 // CHUNK)))
    assert caught.value.reply_code == RESOURCE_ERROR
    assert channel == channels  # refused at the one that went over, not before


def test_finished_bodies_give_their_share_back() -> None:
    feed = decoder().feed
    # Far more than the bound in total, never more than one body at a time.
    for channel in range(1, 40):
        events = feed(started(channel) + b"".join(body(channel) for _ in range(BODY // CHUNK)))
        assert [type(e) for e in events] == [Publish]
