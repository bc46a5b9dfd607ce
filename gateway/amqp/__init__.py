"""AMQP 1.0: the SASL layer the gateway speaks itself (sans-IO); proton runs the rest."""

from gateway.amqp.sasl import (
    AMQP_HEADER,
    EXTERNAL,
    MAX_SASL_FRAME,
    SASL_HEADER,
    SaslCode,
    SaslError,
    SaslEvent,
    SaslInit,
    SaslServer,
    SaslSkipped,
    encode_mechanisms,
    encode_outcome,
)

__all__ = [
    "AMQP_HEADER",
    "EXTERNAL",
    "MAX_SASL_FRAME",
    "SASL_HEADER",
    "SaslCode",
    "SaslError",
    "SaslEvent",
    "SaslInit",
    "SaslServer",
    "SaslSkipped",
    "encode_mechanisms",
    "encode_outcome",
]
