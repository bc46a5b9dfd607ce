"""What the gateway reads from a verified client certificate for Atom: serial number and fingerprint.

The serial is checked against the certificate's own DER bytes (a small DER
reader below, independent of `cryptography`), because Atom stores the hex of
the INTEGER's content bytes (absmach/atom: `normalize_serial(raw_serial_as_string())`),
leading 00 included; the fingerprint against hashlib over the DER.
"""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from auth_providers.atom import certificate_expiry
from gateway import certs
from gateway.frontends.peers import (
    NO_CERTIFICATE,
    PeerCertificate,
    certificate_details,
    certificate_serial,
    peer_certificate,
    peer_identity,
)

_KEY = ec.generate_private_key(ec.SECP256R1())
_NAME = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "device-1")])


def _certificate(serial: int, sans: list[x509.GeneralName] | None = None) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_NAME).issuer_name(_NAME).public_key(_KEY.public_key())
        .serial_number(serial).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(_KEY, hashes.SHA256())


def _der(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.DER)


def _element(data: bytes, at: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at `at`."""
    tag, length, at = data[at], data[at + 1], at + 2
    if length & 0x80:
        size = length & 0x7F
        length, at = int.from_bytes(data[at:at + size], "big"), at + size
    return tag, at, at + length


def der_serial_hex(der: bytes) -> str:
    """Hex of the serialNumber INTEGER's content bytes, read straight from the DER."""
    _, certificate, _ = _element(der, 0)
    _, tbs, _ = _element(der, certificate)
    tag, start, end = _element(der, tbs)
    if tag == 0xA0:  # [0] EXPLICIT version comes first in a v3 certificate
        tag, start, end = _element(der, end)
    assert tag == 0x02, "serialNumber is not an INTEGER"
    return der[start:end].hex()


@pytest.mark.parametrize(("serial", "expected"), [
    (1, "01"),
    (0x7F, "7f"),
    (0x80, "0080"),  # top bit set: DER and Atom keep the 00 byte
    (0xFF, "00ff"),
    (0x0100, "0100"),
    (0xA1B2, "00a1b2"),
    (2**159 - 1, "7f" + "ff" * 19),  # the largest serial cryptography makes (20 bytes)
])
def test_the_serial_is_the_hex_of_the_der_integer(serial: int, expected: str) -> None:
    certificate = _certificate(serial)
    assert certificate_serial(certificate) == expected == der_serial_hex(_der(certificate))


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=1, max_value=2**159 - 1))
def test_any_serial_reads_as_its_der_bytes(serial: int) -> None:
    certificate = _certificate(serial)
    text = certificate_serial(certificate)
    assert text == der_serial_hex(_der(certificate))
    assert text == text.lower() and len(text) % 2 == 0 and int(text, 16) == serial


@pytest.mark.filterwarnings("ignore:Parsed a serial number which wasn't positive")
def test_a_negative_serial_keeps_its_sign_bits() -> None:
    # RFC 5280 forbids it and cryptography warns, but such certificates exist: read the bytes as they are.
    der = _der(_certificate(0x7F))
    at = der.index(bytes([0x02, 0x01, 0x7F]))
    negative = der[: at + 2] + b"\x80" + der[at + 3 :]
    certificate = x509.load_der_x509_certificate(negative)
    assert certificate.serial_number == -128
    assert certificate_serial(certificate) == "80" == der_serial_hex(negative)


def test_fingerprint_is_sha256_of_the_der_in_lowercase_hex() -> None:
    issued = certs.make_client(certs.make_ca(), "device-1")
    details = certificate_details(issued.certificate)
    der = _der(issued.certificate)
    assert details.fingerprint == hashlib.sha256(der).hexdigest()
    # The same value `gen-cert` and `openssl x509 -fingerprint -sha256` print, separators aside.
    assert certs.fingerprint_sha256(issued.certificate).replace(":", "").lower() == details.fingerprint
    assert details == PeerCertificate(identity="device-1", serial=der_serial_hex(der), fingerprint=details.fingerprint)
    assert details.serial == format(issued.certificate.serial_number, "x").rjust(len(details.serial), "0")


def test_the_identity_follows_mtls_identity_and_an_empty_one_keeps_serial_and_fingerprint() -> None:
    certificate = _certificate(42, [x509.DNSName("dev.example.com")])
    assert certificate_details(certificate, "san_dns").identity == "dev.example.com"
    no_uri = certificate_details(certificate, "san_uri")
    assert (no_uri.identity, no_uri.serial) == ("", "2a") and len(no_uri.fingerprint) == 64
    assert no_uri  # still a verified certificate


class _SSLObject:
    def __init__(self, der: bytes, verified: bool) -> None:
        self.der, self.verified = der, verified

    def getpeercert(self, binary_form: bool = False) -> Any:
        if binary_form:
            return self.der
        # As ssl answers: a dict of the certificate when it was verified, {} when it was not.
        return {"subject": ((("commonName", "device-1"),),)} if self.verified else {}


class _Transport:
    def __init__(self, ssl_object: _SSLObject | None) -> None:
        self.ssl_object = ssl_object

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.ssl_object if name == "ssl_object" else default


def test_peer_certificate_only_for_a_verified_certificate() -> None:
    certificate = _certificate(0xA1B2)
    der = _der(certificate)
    verified = peer_certificate(_Transport(_SSLObject(der, True)))  # type: ignore[arg-type]
    assert verified == PeerCertificate("device-1", "00a1b2", hashlib.sha256(der).hexdigest())
    assert peer_identity(_Transport(_SSLObject(der, True))) == "device-1"  # type: ignore[arg-type]
    for transport in (_Transport(None), _Transport(_SSLObject(der, False)), _Transport(_SSLObject(b"", True)),
                      _Transport(_SSLObject(b"\x30\x03not a certificate", True))):
        assert peer_certificate(transport) is NO_CERTIFICATE  # type: ignore[arg-type]
        assert peer_identity(transport) == ""  # type: ignore[arg-type]
    assert not NO_CERTIFICATE


@pytest.mark.parametrize(("text", "expected"), [
    ("2030-01-02T03:04:05+00:00", datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)),
    # chrono's to_rfc3339 writes nanoseconds; Python keeps microseconds.
    ("2030-01-02T03:04:05.123456789+00:00", datetime.datetime(2030, 1, 2, 3, 4, 5, 123456, tzinfo=datetime.timezone.utc)),
    ("2030-01-02T03:04:05Z", datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)),
    ("2030-01-02T05:04:05+02:00", datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)),
    ("2030-01-02T03:04:05", datetime.datetime(2030, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)),  # taken as UTC
    ("", None),
])
def test_certificate_expiry(text: str, expected: datetime.datetime | None) -> None:
    assert certificate_expiry(text) == expected


@pytest.mark.parametrize("text", ["tomorrow", "2030-13-01T00:00:00Z", "1700000000"])
def test_certificate_expiry_that_is_not_a_time(text: str) -> None:
    with pytest.raises(ValueError):
        certificate_expiry(text)
