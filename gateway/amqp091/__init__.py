"""AMQP 0.9.1: sans-IO framing (`framing`), topic mapping (`routing`), queues and
bindings (`broker`) and channel state (`channel`). The asyncio connection lives
in `gateway.frontends.amqp091`."""
