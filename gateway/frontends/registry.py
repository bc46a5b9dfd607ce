"""Which frontend serves which listener kind (`server.<kind>` in the config).

A kind is built when its module is present; the config refuses listeners of a
kind that is not, and the defaults switch on every kind that is.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import Any

#: listener kind -> "module:Class"
FRONTENDS: dict[str, str] = {
    "tcp": "gateway.frontends.mqtt:MQTTFrontend",
    "websocket": "gateway.frontends.websocket:WebSocketFrontend",
    "http": "gateway.frontends.http:HTTPFrontend",
    "coap": "gateway.frontends.coap:CoAPFrontend",
    "amqp": "gateway.frontends.amqp:AMQPFrontend",
    "amqp091": "gateway.frontends.amqp091:AMQP091Frontend",
}


def built_kinds() -> frozenset[str]:
    return frozenset(kind for kind, target in FRONTENDS.items() if importlib.util.find_spec(target.split(":")[0]))


def frontend_class(kind: str) -> Any:
    module_name, _, attr = FRONTENDS[kind].partition(":")
    return getattr(importlib.import_module(module_name), attr)
