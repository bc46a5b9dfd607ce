"""SASL EXTERNAL on plain values: the AMQP 1.0 SASL step and the AMQP 0.9.1 response check."""

from __future__ import annotations

import pytest

from gateway.amqp.sasl import SASL_HEADER, SaslCode, SaslError, SaslInit, SaslServer, encode_outcome
from gateway.amqp091.sasl import SASLError, external_identity, parse_response
from tests.unit.test_amqp_sasl import proton_init, sasl_frame


def _server(*mechanisms: str) -> SaslServer:
    server = SaslServer(mechanisms=mechanisms)
    assert server.receive_data(SASL_HEADER) is None
    server.data_to_send()
    return server


@pytest.mark.parametrize(("response", "authzid"), [(None, ""), (b"", ""), (b"dev1", "dev1"), ("é".encode(), "é")])
def test_external_init_carries_the_authzid_and_no_credentials(response: bytes | None, authzid: str) -> None:
    event = _server("EXTERNAL", "PLAIN").receive_data(sasl_frame(proton_init("EXTERNAL", response, "gw")))
    assert event == SaslInit(mechanism="EXTERNAL", authzid=authzid, hostname="gw")
    assert isinstance(event, SaslInit) and not event.username and not event.secret


def test_external_authzid_that_is_not_utf8_fails_with_outcome_auth() -> None:
    with pytest.raises(SaslError) as caught:
        _server("EXTERNAL").receive_data(sasl_frame(proton_init("EXTERNAL", b"\xff\xfe")))
    assert caught.value.reply == encode_outcome(SaslCode.AUTH)


def test_external_not_offered_fails_with_outcome_auth() -> None:
    with pytest.raises(SaslError) as caught:
        _server("PLAIN").receive_data(sasl_frame(proton_init("EXTERNAL", b"")))
    assert caught.value.reply == encode_outcome(SaslCode.AUTH)


@pytest.mark.parametrize("response", ["", b"", "dev1", b"dev1"])
def test_amqp091_external_response_empty_or_the_identity(response: str | bytes) -> None:
    assert external_identity(response, "dev1") == "dev1"


@pytest.mark.parametrize(("response", "identity"), [
    ("dev2", "dev1"), ("DEV1", "dev1"), ("dev1\x00", "dev1"), (b"\xff", "dev1"), ("", ""), ("dev1", ""),
])
def test_amqp091_external_anything_else_is_refused(response: str | bytes, identity: str) -> None:
    with pytest.raises(SASLError):
        external_identity(response, identity)


def test_amqp091_plain_parser_does_not_take_external() -> None:
    # EXTERNAL is decided by the frontend (it knows the certificate), never read as a password login.
    with pytest.raises(SASLError):
        parse_response("EXTERNAL", "dev1")
