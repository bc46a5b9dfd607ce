"""SASL responses of Connection.StartOk: PLAIN (RFC 4616), RabbitMQ's AMQPLAIN, and EXTERNAL.

The password is wrapped in `Secret` here, at the one place it is read.
EXTERNAL (RFC 4422 appendix A) takes the identity from the verified client
certificate, as RabbitMQ's rabbitmq_auth_mechanism_ssl does; its response
may only confirm that identity.
"""

from __future__ import annotations

from pamqp import decode

from gateway.events import Secret

MECHANISMS = "PLAIN AMQPLAIN"
EXTERNAL = "EXTERNAL"
#: Offered on a TLS connection whose client presented a verified certificate with an identity.
MECHANISMS_WITH_EXTERNAL = f"{MECHANISMS} {EXTERNAL}"
#: RFC 4616 caps each of authzid, authcid and passwd at 255 octets.
_MAX_PART = 255


class SASLError(ValueError):
    """The response cannot be read; the message says why (it never contains the secret)."""


def as_bytes(response: str | bytes) -> bytes:
    """pamqp hands a long string back as `str` when it is valid UTF-8 and as `bytes` otherwise."""
    if isinstance(response, bytes):
        return response
    return response.encode("utf-8", "surrogateescape")


def parse_response(mechanism: str, response: str | bytes) -> tuple[str, Secret]:
    """(username, password) from a StartOk response."""
    raw = as_bytes(response)
    if mechanism == "PLAIN":
        parts = raw.split(b"\x00")
        if len(parts) != 3:
            raise SASLError("PLAIN response must be [authzid] NUL username NUL password")
        authzid, username, password = parts
        if any(len(part) > _MAX_PART for part in parts):
            raise SASLError("PLAIN response fields are limited to 255 bytes")
        if authzid and authzid != username:
            raise SASLError("PLAIN authorization identity must be empty or equal the username")
        return _text(username), Secret(password)
    if mechanism == "AMQPLAIN":
        try:
            _, table = decode.field_table(len(raw).to_bytes(4, "big") + raw)
        except Exception:  # pamqp raises struct/Value/Index errors on malformed tables
            raise SASLError("AMQPLAIN response is not a field table") from None
        login = table.get("LOGIN")
        password = table.get("PASSWORD")
        if not isinstance(login, (str, bytes)) or not isinstance(password, (str, bytes)):
            raise SASLError("AMQPLAIN response needs LOGIN and PASSWORD strings")
        return _text(as_bytes(login)), Secret(as_bytes(password))
    raise SASLError(f"unsupported SASL mechanism {mechanism[:32]!r}; use one of {MECHANISMS}")


def external_identity(response: str | bytes, tls_identity: str) -> str:
    """The certificate identity an EXTERNAL login stands for; SASLError when it cannot.

    The response is an authorization identity: empty (act as the certificate
    says) or exactly the certificate's identity. Anything else would be a
    request to act as someone else, which is not offered.
    """
    if not tls_identity:
        raise SASLError("EXTERNAL needs a verified client certificate with an identity")
    raw = as_bytes(response)
    if raw and raw != tls_identity.encode("utf-8"):
        raise SASLError("EXTERNAL authorization identity must be empty or equal the certificate's identity")
    return tls_identity


def _text(value: bytes) -> str:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise SASLError("username is not valid UTF-8") from None
