"""MQTT control packet types (the high nibble of the first byte) and the protocol levels.

A leaf module: the properties table, the packet values and the codec all key on these.
"""

from __future__ import annotations

CONNECT = 1
CONNACK = 2
PUBLISH = 3
PUBACK = 4
PUBREC = 5
PUBREL = 6
PUBCOMP = 7
SUBSCRIBE = 8
SUBACK = 9
UNSUBSCRIBE = 10
UNSUBACK = 11
PINGREQ = 12
PINGRESP = 13
DISCONNECT = 14
#: MQTT 5 only; type 15 is reserved in 3.1.1.
AUTH = 15
#: Not a packet type: the will properties inside a CONNECT, which have a property table of their own.
WILL = 16

NAMES = {
    CONNECT: "CONNECT",
    CONNACK: "CONNACK",
    PUBLISH: "PUBLISH",
    PUBACK: "PUBACK",
    PUBREC: "PUBREC",
    PUBREL: "PUBREL",
    PUBCOMP: "PUBCOMP",
    SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK",
    UNSUBSCRIBE: "UNSUBSCRIBE",
    UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ",
    PINGRESP: "PINGRESP",
    DISCONNECT: "DISCONNECT",
    AUTH: "AUTH",
    WILL: "will",
}

#: Protocol levels (CONNECT's "protocol version" byte).
MQTT_31 = 3
MQTT_311 = 4
MQTT_5 = 5
PROTOCOL_NAME = "MQTT"
PROTOCOL_NAME_31 = "MQIsdp"
