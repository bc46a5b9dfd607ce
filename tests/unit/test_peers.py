"""gateway.frontends.peers: certificate identities and the plaintext-password rule, on plain values."""

from __future__ import annotations

import datetime
import ipaddress
import logging

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import parse_config
from gateway.config_types import AuthConfig, ListenerConfig
from gateway.events import Outcome, Secret
from gateway.frontends.peers import (
    MTLS_IDENTITY_FIELDS,
    certificate_identity,
    password_refused,
    plaintext_password_listeners,
    warn_plaintext_passwords,
)

_KEY = ec.generate_private_key(ec.SECP256R1())


def _certificate(cn: str | None = None, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    attributes = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "CN=admin, O=x")]
    if cn is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(x509.Name(attributes)).issuer_name(x509.Name(attributes))
        .public_key(_KEY.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


FULL = _certificate("device-1", [
    x509.DNSName("a.example.com"), x509.DNSName("b.example.com"),
    x509.UniformResourceIdentifier("spiffe://acme/device-1"), x509.UniformResourceIdentifier("urn:second"),
    x509.RFC822Name("device-1@example.com"),
])


@pytest.mark.parametrize(("field", "expected"), [
    ("common_name", "device-1"),
    ("san_dns", "a.example.com"),
    ("san_uri", "spiffe://acme/device-1"),
    ("san_email", "device-1@example.com"),
])
def test_each_field_is_its_first_value(field: str, expected: str) -> None:
    assert certificate_identity(FULL, field) == expected


def test_the_common_name_is_the_value_not_the_rfc4514_subject() -> None:
    # An O that reads like "CN=admin" must not become the identity "admin".
    assert certificate_identity(_certificate("device-1")) == "device-1"


@pytest.mark.parametrize("field", MTLS_IDENTITY_FIELDS)
def test_a_certificate_without_the_field_has_no_identity(field: str) -> None:
    assert certificate_identity(_certificate(None), field) == ""
    if field != "common_name":
        only_an_ip = _certificate("device-1", [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))])
        assert certificate_identity(only_an_ip, field) == ""


# cryptography caps a CN at 64 bytes of UTF-8.
common_names = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=64).filter(
    lambda cn: len(cn.encode()) <= 64
)


@settings(max_examples=30, deadline=None)
@given(common_names)
def test_any_common_name_comes_back_unchanged(cn: str) -> None:
    assert certificate_identity(_certificate(cn)) == cn


def _listener(name: str, *, tls: bool) -> ListenerConfig:
    return ListenerConfig(name=name, addr="127.0.0.1:0", host="127.0.0.1", port=0,
                          cert_file="server.pem" if tls else None)


def test_passwords_are_refused_only_on_plaintext_and_only_when_required() -> None:
    required, default = AuthConfig(require_tls_for_passwords=True), AuthConfig()
    plain, tls = _listener("server.tcp.plain", tls=False), _listener("server.tcp.tls", tls=True)
    refused = password_refused(required, plain, Secret("pw"))
    assert refused is not None and refused.outcome is Outcome.DENY
    assert "pw" not in refused.reason
    assert password_refused(required, tls, Secret("pw")) is None
    assert password_refused(required, plain, Secret("")) is None  # anonymous or certificate
    assert password_refused(default, plain, Secret("pw")) is None


def test_plaintext_listeners_of_protocols_with_auth_are_the_ones_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({
        "server": {
            "tcp": {"plain": {"addr": "127.0.0.1:0"}},
            "http": {"plain": {"addr": "127.0.0.1:0"}},
            "coap": {"plain": {"addr": "127.0.0.1:0"}},
            "amqp091": {"plain": {"addr": "127.0.0.1:0"}},
        },
        "auth": {"protocols": {"amqp091": False}},
    })
    names = [listener.name for listener in plaintext_password_listeners(config)]
    assert names == ["server.tcp.plain", "server.http.plain", "server.coap.plain"]
    with caplog.at_level(logging.WARNING, logger="polygate.tls"):
        warn_plaintext_passwords(config)
    assert [r.getMessage().split(" ")[0] for r in caplog.records] == names
    caplog.clear()
    refusing = parse_config({"server": {"tcp": {"plain": {"addr": "127.0.0.1:0"}}},
                             "auth": {"require_tls_for_passwords": True}})
    warn_plaintext_passwords(refusing)
    assert caplog.records == []
    assert plaintext_password_listeners(parse_config({"auth": {"provider": "none"}})) == []
