"""The AMQP 1.0 SASL server step, on bytes alone (proton only encodes peers' frames)."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from proton import Data

from gateway.amqp.sasl import (
    AMQP_HEADER,
    MAX_SASL_FRAME,
    SASL_HEADER,
    SaslCode,
    SaslError,
    SaslInit,
    SaslServer,
    SaslSkipped,
    encode_mechanisms,
    encode_outcome,
)
from gateway.events import Secret


def sasl_frame(body: bytes, *, frame_type: int = 1, doff: int = 2) -> bytes:
    return struct.pack(">IBBH", doff * 4 + len(body), doff, frame_type, 0) + b"\x00" * (doff * 4 - 8) + body


def proton_init(mechanism: str, response: bytes | None, hostname: str | None = None, descriptor: object = 0x41) -> bytes:
    """A sasl-init body as proton's client encodes it (list32, str/sym/vbin as proton picks)."""
    data = Data()
    data.put_described()
    data.enter()
    if isinstance(descriptor, int):
        data.put_ulong(descriptor)
    else:
        data.put_symbol(str(descriptor))
    data.put_list()
    data.enter()
    data.put_symbol(mechanism)
    if response is None:
        data.put_null()
    else:
        data.put_binary(response)
    if hostname is None:
        data.put_null()
    else:
        data.put_string(hostname)
    data.exit()
    data.exit()
    return bytes(data.encode())


def plain_init(user: str = "bob", password: str = "s3cret", authzid: str = "") -> bytes:
    response = f"{authzid}\0{user}\0{password}".encode()
    return sasl_frame(proton_init("PLAIN", response, "gw.example"))


def init_list8(fields: bytes, count: int) -> bytes:
    """A sasl-init body with a list8 of hand-encoded fields."""
    return b"\x00\x53\x41\xc0" + bytes((len(fields) + 1, count)) + fields


def decoded(frame: bytes) -> object:
    data = Data()
    data.decode(frame[8:])
    data.rewind()
    data.next()
    return data.get_object()


def opened(server: SaslServer | None = None) -> SaslServer:
    server = server or SaslServer()
    assert server.receive_data(SASL_HEADER) is None
    assert server.data_to_send().startswith(SASL_HEADER)
    return server


# -- encoding ------------------------------------------------------------------------------


def test_mechanisms_frame_is_an_array_of_symbols() -> None:
    value = decoded(encode_mechanisms(["PLAIN", "ANONYMOUS"]))
    assert value.descriptor == 0x40
    (mechanisms,) = value.value
    assert mechanisms.type == Data.SYMBOL
    assert list(mechanisms.elements) == ["PLAIN", "ANONYMOUS"]


def test_many_mechanisms_use_the_wide_array_encoding() -> None:
    names = [f"MECH-{i:03d}" for i in range(40)]
    value = decoded(encode_mechanisms(names))
    assert list(value.value[0].elements) == names


@pytest.mark.parametrize("code", list(SaslCode))
def test_outcome_code_is_a_ubyte(code: SaslCode) -> None:
    frame = encode_outcome(code)
    assert struct.unpack_from(">IBB", frame) == (len(frame), 2, 1)
    value = decoded(frame)
    assert value.descriptor == 0x44
    assert value.value[0] == code
    # Proton's client reads a code of another type as ok: it must be a ubyte (0x50).
    assert frame[-2:] == bytes((0x50, code))


def test_mechanism_names_are_checked() -> None:
    with pytest.raises(ValueError):
        encode_mechanisms([])
    with pytest.raises(ValueError):
        encode_mechanisms([""])


# -- the exchange ----------------------------------------------------------------------------


def test_plain_exchange() -> None:
    server = SaslServer()
    assert server.receive_data(SASL_HEADER) is None
    out = server.data_to_send()
    assert out[:8] == SASL_HEADER
    assert list(decoded(out[8:]).value[0].elements) == ["PLAIN"]
    event = server.receive_data(plain_init())
    assert event == SaslInit(mechanism="PLAIN", username="bob", secret=Secret("s3cret"), hostname="gw.example")
    assert server.data_to_send() == b""
    server.succeed()
    assert server.data_to_send() == encode_outcome(SaslCode.OK)
    assert server.done
    assert server.remainder == b""


def test_every_split_of_the_input_gives_the_same_event() -> None:
    stream = SASL_HEADER + plain_init() + AMQP_HEADER
    for cut in range(1, len(stream)):
        server = SaslServer()
        events = [server.receive_data(stream[:cut]), server.receive_data(stream[cut:])]
        (event,) = [e for e in events if e is not None]
        assert isinstance(event, SaslInit), cut
        assert event.username == "bob" and event.secret == Secret("s3cret")
        server.succeed()
        assert server.remainder == AMQP_HEADER


def test_byte_by_byte() -> None:
    server = SaslServer()
    events = [server.receive_data(bytes((b,))) for b in SASL_HEADER + plain_init()]
    assert [e for e in events if e is not None] == [SaslInit(mechanism="PLAIN", username="bob",
                                                             secret=Secret("s3cret"), hostname="gw.example")]


def test_bytes_pipelined_after_init_belong_to_the_amqp_layer() -> None:
    server = opened()
    assert isinstance(server.receive_data(plain_init() + AMQP_HEADER + b"open"), SaslInit)
    assert server.receive_data(b"-more") is None
    server.succeed()
    assert server.remainder == AMQP_HEADER + b"open-more"
    with pytest.raises(SaslError):
        server.receive_data(b"x")


def test_fail_sends_the_outcome_and_ends_the_exchange() -> None:
    server = opened()
    server.receive_data(plain_init())
    server.fail(SaslCode.SYS_TEMP)
    assert server.data_to_send() == encode_outcome(SaslCode.SYS_TEMP)
    with pytest.raises(SaslError):
        server.receive_data(b"anything")
    with pytest.raises(RuntimeError):
        server.succeed()


def test_decisions_only_follow_an_init() -> None:
    server = SaslServer()
    with pytest.raises(RuntimeError):
        server.succeed()
    server = opened()
    server.receive_data(plain_init())
    with pytest.raises(ValueError):
        server.fail(SaslCode.OK)


def test_empty_frames_are_heartbeats() -> None:
    server = opened()
    assert server.receive_data(sasl_frame(b"") * 3) is None
    assert isinstance(server.receive_data(plain_init()), SaslInit)


def test_extended_header_is_skipped() -> None:
    server = opened()
    event = server.receive_data(sasl_frame(proton_init("PLAIN", b"\0u\0p"), doff=4))
    assert isinstance(event, SaslInit) and event.username == "u"


def test_symbolic_descriptor_and_short_encodings() -> None:
    server = opened()
    assert server.receive_data(sasl_frame(proton_init("PLAIN", b"\0u\0p", descriptor="amqp:sasl-init:list")))
    # list8, sym8, vbin8 and a missing hostname, as small clients write it.
    body = init_list8(b"\xa3\x05PLAIN\xa0\x05\x00u\x00pw", 2)
    server = opened()
    event = server.receive_data(sasl_frame(body))
    assert isinstance(event, SaslInit) and event.secret == Secret("pw") and event.hostname == ""


def test_unknown_trailing_fields_are_skipped() -> None:
    # sasl-init with a fourth field (a described map): later versions may add fields.
    body = init_list8(b"\xa3\x05PLAIN\xa0\x05\x00u\x00pw\x40\x00\x53\x07\xc1\x01\x00", 4)
    event = opened().receive_data(sasl_frame(body))
    assert isinstance(event, SaslInit) and event.username == "u"


def test_anonymous_when_offered() -> None:
    server = opened(SaslServer(mechanisms=("PLAIN", "ANONYMOUS")))
    event = server.receive_data(sasl_frame(proton_init("ANONYMOUS", b"trace", None)))
    assert event == SaslInit(mechanism="ANONYMOUS")


def test_plain_header_without_sasl_when_allowed() -> None:
    server = SaslServer(allow_skip=True)
    assert server.receive_data(AMQP_HEADER[:5]) is None
    assert server.receive_data(AMQP_HEADER[5:] + b"open") == SaslSkipped()
    assert server.remainder == AMQP_HEADER + b"open"
    assert server.done


# -- refusals: each says what to send before closing -----------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        b"GET / HTTP/1.1\r\n",
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello on a plain port
        b"AMQP\x00\x00\x09\x01",  # AMQP 0.9.1
        b"AMQP\x02\x01\x00\x00",  # TLS-in-AMQP
        AMQP_HEADER,  # SASL required
    ],
)
def test_wrong_header_is_answered_with_ours(header: bytes) -> None:
    server = SaslServer()
    with pytest.raises(SaslError) as caught:
        server.receive_data(header)
    assert caught.value.reply == SASL_HEADER
    with pytest.raises(SaslError):
        server.receive_data(SASL_HEADER)


def test_garbage_is_refused_at_its_first_byte() -> None:
    with pytest.raises(SaslError):
        SaslServer().receive_data(b"X")


def auth_refusal(frame: bytes, server: SaslServer | None = None) -> SaslError:
    server = opened(server)
    with pytest.raises(SaslError) as caught:
        server.receive_data(frame)
    assert caught.value.reply == encode_outcome(SaslCode.AUTH)
    return caught.value


@pytest.mark.parametrize(
    "response",
    [
        None,
        b"",
        b"bob\0secret",  # no authzid separator
        b"\0\0secret",  # empty user
        b"\0bob\0secret\0extra",
        b"\0\xff\xfe\0secret",  # not UTF-8
        b"alice\0bob\0secret",  # acting as another user
    ],
)
def test_unusable_plain_response(response: bytes | None) -> None:
    auth_refusal(sasl_frame(proton_init("PLAIN", response)))


def test_same_authzid_is_accepted() -> None:
    event = opened().receive_data(plain_init(authzid="bob"))
    assert isinstance(event, SaslInit) and event.username == "bob"


def test_mechanism_not_offered() -> None:
    auth_refusal(sasl_frame(proton_init("ANONYMOUS", None)))
    auth_refusal(sasl_frame(proton_init("SCRAM-SHA-256", b"n,,n=bob,r=x")))


def test_frame_problems() -> None:
    auth_refusal(sasl_frame(proton_init("PLAIN", b"\0u\0p"), frame_type=0))  # an AMQP frame
    auth_refusal(struct.pack(">IBBH", 4, 2, 1, 0))  # size below the header
    auth_refusal(struct.pack(">IBBH", 12, 1, 1, 0) + b"\0" * 4)  # doff below 2
    auth_refusal(struct.pack(">IBBH", MAX_SASL_FRAME + 1, 2, 1, 0))  # too large, refused unread
    auth_refusal(sasl_frame(b"\x00\x53\x43\x45"))  # sasl-response before any challenge
    auth_refusal(sasl_frame(b"\x00\x53\x41\xc0\x10\x03\xa3"))  # truncated list
    auth_refusal(sasl_frame(b"\x41\x42"))  # not a described type
    auth_refusal(sasl_frame(b"\x00" * 40))  # descriptors nested beyond reason
    auth_refusal(sasl_frame(proton_init("PLAIN", b"\0u\0p")[:-3]))


def test_type_confusion_in_fields() -> None:
    # mechanism as a string instead of a symbol; response as a symbol instead of binary.
    assert "mechanism" in str(auth_refusal(sasl_frame(init_list8(b"\xa1\x05PLAIN\xa0\x05\x00u\x00pw", 2))))
    assert "binary" in str(auth_refusal(sasl_frame(init_list8(b"\xa3\x05PLAIN\xa3\x05\x00u\x00pw", 2))))


def test_too_much_pipelined_while_deciding() -> None:
    server = opened()
    server.receive_data(plain_init())
    with pytest.raises(SaslError):
        server.receive_data(b"\0" * (1 << 20) + b"\0")


# -- open-ended input ------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_raise_nothing_but_sasl_error(data: bytes, after_header: bool) -> None:
    server = SaslServer(mechanisms=("PLAIN", "ANONYMOUS"))
    try:
        if after_header:
            server.receive_data(SASL_HEADER)
        server.receive_data(data)
    except SaslError as exc:
        assert exc.reply in (SASL_HEADER, encode_outcome(SaslCode.AUTH))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=1, max_size=200))
def test_arbitrary_frame_bodies_raise_nothing_but_sasl_error(body: bytes) -> None:
    server = opened(SaslServer(mechanisms=("PLAIN", "ANONYMOUS")))
    try:
        event = server.receive_data(sasl_frame(body))
    except SaslError:
        return
    assert event is None or isinstance(event, SaslInit)


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=40).filter(lambda u: "\0" not in u),
    st.binary(max_size=80).filter(lambda p: b"\0" not in p),
    st.lists(st.integers(min_value=1, max_value=20), max_size=8),
)
def test_credentials_survive_any_chunking(user: str, password: bytes, cuts: list[int]) -> None:
    stream = SASL_HEADER + sasl_frame(proton_init("PLAIN", b"\0" + user.encode() + b"\0" + password))
    server = SaslServer()
    events = []
    pos = 0
    for size in cuts + [len(stream)]:
        chunk = stream[pos:pos + size]
        pos += len(chunk)
        if chunk:
            event = server.receive_data(chunk)
            if event is not None:
                events.append(event)
    assert events == [SaslInit(mechanism="PLAIN", username=user, secret=Secret(password))]
