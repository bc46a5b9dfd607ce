"""The one error of the MQTT protocol core: the peer broke the protocol, the connection ends.

A leaf module, so the packet values, the properties and the codec can all raise it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.errors import ProtocolError
from gateway.mqtt.reasons import MALFORMED_PACKET

if TYPE_CHECKING:
    from gateway.mqtt.packets import Packet


class MQTTProtocolError(ProtocolError):
    """The peer broke MQTT; the connection must be closed.

    `reason_code` is the MQTT 5 reason code to tell a v5 peer (in a CONNACK
    before the connection is accepted, in a DISCONNECT after): 0x81 malformed
    packet unless the error says otherwise (0x82 protocol error, 0x95 packet
    too large, 0x93 receive maximum exceeded, ...). A 3.1.1 peer is told
    nothing: the connection is closed. `connack_code` is set when MQTT 3.1.1
    wants a CONNACK with that return code before closing (1 for an
    unsupported protocol level, 2 for a refused client id). `decoded` holds
    the packets that arrived intact before the error in the same call, so the
    broker may still act on them.
    """

    def __init__(
        self, message: str, *, reason_code: int = MALFORMED_PACKET, connack_code: int | None = None
    ) -> None:
        super().__init__(message)
        self.reason_code: int = reason_code
        self.connack_code: int | None = connack_code
        self.decoded: tuple[Packet, ...] = ()

    def again(self) -> MQTTProtocolError:
        """A fresh copy (no `decoded` packets), for an error raised again on every later call."""
        return MQTTProtocolError(str(self), reason_code=self.reason_code, connack_code=self.connack_code)
