"""SASL EXTERNAL on AMQP 0.9.1 (pika) and AMQP 1.0 (python-qpid-proton) over mutual TLS, on both event loops.

The certificate is the credential: `users add USER --cert-identity VALUE`
(local) or the identity sent as the username (callout), as for MQTT in
test_cert_identity.py. Certificates come from `gateway.certs`, as `polygate
gen-cert` makes them: a CA, a server certificate for 127.0.0.1 and client
certificates whose CN is their name.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pika
import pika.exceptions
import pytest
from pamqp import commands, frame as pamqp_frame
from proton import ConnectionException, Message, SSLDomain
from proton.utils import BlockingConnection, LinkDetached

from auth_providers.local_store import LocalStore
from gateway import certs
from gateway.amqp.sasl import SASL_HEADER, SaslCode, encode_outcome
from gateway.amqp091.framing import PROTOCOL_HEADER
from tests.callout_doubles import AuthServiceLogic, HttpAuthService, ServiceThread
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_thread import GatewayThread

KINDS = ("amqp091", "amqp")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.generate(directory, clients=["dev1", "stranger"])
    return directory


def _tls_block(pki: Path) -> dict[str, Any]:
    # client_auth request: a certificate may be sent, and need not be (one listener for both cases).
    return {"addr": "127.0.0.1:0", "cert_file": str(pki / "server.pem"), "key_file": str(pki / "server-key.pem"),
            "ca_file": str(pki / "ca.pem"), "client_auth": "request"}


def _listeners(pki: Path) -> dict[str, Any]:
    return {kind: {"plain": {"addr": "127.0.0.1:0"}, "tls": _tls_block(pki)} for kind in KINDS}


@pytest.fixture
def gw(tmp_path: Path, pki: Path, start_gateway: Callable[..., GatewayThread]) -> GatewayThread:
    """dev1's certificate is user `device` (a name of its own, to show the identity is mapped); no passwords."""
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.add_user("device", None, cert_identity="dev1")
        store.grant("device", "dev1/#", {"publish", "subscribe"})
    return start_gateway(loopback_config(tmp_path, server=_listeners(pki)))


def _tls_port(gw: GatewayThread, kind: str) -> int:
    assert gw.gateway is not None
    return gw.gateway.bound(kind)[-1][1]


def _context(pki: Path, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client is not None:
        context.load_cert_chain(pki / f"client-{client}.pem", pki / f"client-{client}-key.pem")
    return context


# -- AMQP 0.9.1 -------------------------------------------------------------------------------------------


def _pika(gw: GatewayThread, pki: Path, client: str | None,
          credentials: pika.credentials.VALID_TYPES | None = None) -> pika.BlockingConnection:
    params = pika.ConnectionParameters(
        "127.0.0.1", _tls_port(gw, "amqp091"), credentials=credentials or pika.credentials.ExternalCredentials(),
        ssl_options=pika.SSLOptions(_context(pki, client), "127.0.0.1"), connection_attempts=1, socket_timeout=5)
    return pika.BlockingConnection(params)


def test_pika_external_logs_in_as_the_certificates_user(gw: GatewayThread, pki: Path) -> None:
    connection = _pika(gw, pki, "dev1")
    try:
        channel = connection.channel()
        queue = channel.queue_declare("", exclusive=True).method.queue
        channel.queue_bind(queue, "amq.topic", "dev1.#")
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", "dev1.temp", b"21.5")
        assert channel.basic_get(queue, auto_ack=True)[2] == b"21.5"
        # Authorized as `device`: its ACL holds, nothing more.
        with pytest.raises(pika.exceptions.ChannelClosedByBroker) as denied:
            channel.queue_bind(queue, "amq.topic", "other.#")
        assert denied.value.reply_code == 403
    finally:
        connection.close()


def test_pika_external_is_refused_for_an_unknown_certificate(gw: GatewayThread, pki: Path) -> None:
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as info:
        _pika(gw, pki, "stranger")
    assert "403" in str(info.value) and "ACCESS_REFUSED" in str(info.value)


def test_pika_external_without_a_certificate_finds_it_not_offered(gw: GatewayThread, pki: Path) -> None:
    with pytest.raises(pika.exceptions.AuthenticationError) as info:
        _pika(gw, pki, None)
    assert "EXTERNAL" in str(info.value)


def test_a_password_still_works_beside_a_certificate(gw: GatewayThread, pki: Path, root_password: str) -> None:
    connection = _pika(gw, pki, "dev1", pika.PlainCredentials(ROOT_USER, root_password))
    connection.close()


class RawAMQP091:
    """The connection.start / start-ok exchange by hand: what pika never sends."""

    def __init__(self, port: int, context: ssl.SSLContext | None) -> None:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock = context.wrap_socket(sock, server_hostname="127.0.0.1") if context is not None else sock
        self.buffer = b""

    def frame(self) -> object:
        while True:
            if len(self.buffer) >= 7:
                size = struct.unpack_from(">I", self.buffer, 3)[0]
                if len(self.buffer) >= size + 8:
                    used, _, value = pamqp_frame.unmarshal(self.buffer)
                    self.buffer = self.buffer[used:]
                    return value
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk

    def start(self) -> commands.Connection.Start:
        self.sock.sendall(PROTOCOL_HEADER)
        start = self.frame()
        assert isinstance(start, commands.Connection.Start)
        return start

    def start_ok(self, mechanism: str, response: str) -> object:
        self.sock.sendall(pamqp_frame.marshal(commands.Connection.StartOk(
            client_properties={}, mechanism=mechanism, response=response), 0))
        return self.frame()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def raw091(gw: GatewayThread, pki: Path, client: str | None, *, tls: bool = True) -> Iterator[RawAMQP091]:
    port = _tls_port(gw, "amqp091") if tls else gw.port("amqp091")
    raw = RawAMQP091(port, _context(pki, client) if tls else None)
    try:
        yield raw
    finally:
        raw.close()


def test_amqp091_external_is_offered_only_with_a_verified_certificate(gw: GatewayThread, pki: Path) -> None:
    with raw091(gw, pki, "dev1") as raw:
        assert raw.start().mechanisms.split() == ["PLAIN", "AMQPLAIN", "EXTERNAL"]
    with raw091(gw, pki, None) as raw:
        assert "EXTERNAL" not in raw.start().mechanisms.split()
    with raw091(gw, pki, None, tls=False) as raw:
        start = raw.start()
        assert "EXTERNAL" not in start.mechanisms.split()
        # Chosen anyway where it is not offered: refused.
        close = raw.start_ok("EXTERNAL", "")
        assert isinstance(close, commands.Connection.Close) and close.reply_code == 403


@pytest.mark.parametrize(("response", "accepted"), [("", True), ("dev1", True), ("device", False), ("root", False)])
def test_amqp091_external_response_may_only_confirm_the_identity(
    gw: GatewayThread, pki: Path, response: str, accepted: bool
) -> None:
    with raw091(gw, pki, "dev1") as raw:
        raw.start()
        answer = raw.start_ok("EXTERNAL", response)
    if accepted:
        assert isinstance(answer, commands.Connection.Tune), answer
    else:
        assert isinstance(answer, commands.Connection.Close) and answer.reply_code == 403, answer


# -- AMQP 1.0 ---------------------------------------------------------------------------------------------


def _domain(pki: Path, client: str | None) -> SSLDomain:
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(pki / "ca.pem"))
    # VERIFY_PEER: the chain; proton's host-name check does not read IP address SANs.
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER)
    if client is not None:
        domain.set_credentials(str(pki / f"client-{client}.pem"), str(pki / f"client-{client}-key.pem"), None)
    return domain


def _proton(gw: GatewayThread, pki: Path, client: str | None, **kwargs: Any) -> BlockingConnection:
    kwargs.setdefault("allowed_mechs", "EXTERNAL")
    return BlockingConnection(f"amqps://127.0.0.1:{_tls_port(gw, 'amqp')}", ssl_domain=_domain(pki, client),
                              timeout=10, **kwargs)


def test_proton_external_logs_in_as_the_certificates_user(gw: GatewayThread, pki: Path) -> None:
    connection = _proton(gw, pki, "dev1")
    try:
        receiver = connection.create_receiver("dev1/#", credit=5)
        connection.create_sender("dev1/temp").send(Message(body=b"21.5", inferred=True))
        assert receiver.receive(timeout=10).body == b"21.5"
        receiver.accept()
        with pytest.raises(LinkDetached) as denied:
            connection.create_sender("other/x")
        assert denied.value.condition == "amqp:unauthorized-access"
    finally:
        connection.close()


def test_proton_external_is_refused_for_an_unknown_certificate(gw: GatewayThread, pki: Path) -> None:
    with pytest.raises(ConnectionException) as info:
        _proton(gw, pki, "stranger")
    assert getattr(info.value, "condition", None) == "amqp:unauthorized-access"


def test_proton_external_without_a_certificate_finds_it_not_offered(gw: GatewayThread, pki: Path) -> None:
    with pytest.raises(ConnectionException):
        _proton(gw, pki, None)


def _sasl_frames(gw: GatewayThread, pki: Path, client: str | None, data: bytes = b"", *, tls: bool = True) -> bytes:
    """What the server sends after our SASL header (and `data`) until it has sent mechanisms plus one more
    frame when `data` is given, or closes."""
    port = _tls_port(gw, "amqp") if tls else gw.port("amqp")
    frames = 2 if data else 1
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        sock = _context(pki, client).wrap_socket(plain, server_hostname="127.0.0.1") if tls else plain
        sock.sendall(SASL_HEADER + data)
        received = b""
        while True:
            at, complete = 8, 0
            while len(received) >= at + 4 and len(received) >= at + struct.unpack_from(">I", received, at)[0]:
                at += struct.unpack_from(">I", received, at)[0]
                complete += 1
            if complete >= frames:
                break
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
    assert received.startswith(SASL_HEADER)
    return received[8:]


def _external_init(response: bytes | None) -> bytes:
    """A sasl-init choosing EXTERNAL, with `response` as its initial response (None: the field left out)."""
    fields = b"\xa3\x08EXTERNAL" + (b"" if response is None else b"\xa0" + bytes((len(response),)) + response)
    body = b"\x00\x53\x41\xc0" + bytes((len(fields) + 1, 1 if response is None else 2)) + fields
    return struct.pack(">IBBH", 8 + len(body), 2, 1, 0) + body


def test_amqp10_external_is_offered_only_with_a_verified_certificate(gw: GatewayThread, pki: Path) -> None:
    assert b"EXTERNAL" in _sasl_frames(gw, pki, "dev1")
    assert b"EXTERNAL" not in _sasl_frames(gw, pki, None)
    assert b"EXTERNAL" not in _sasl_frames(gw, pki, None, tls=False)
    # Chosen anyway where it is not offered: outcome auth (1).
    assert _sasl_frames(gw, pki, None, _external_init(b""), tls=False).endswith(encode_outcome(SaslCode.AUTH))


@pytest.mark.parametrize(("response", "accepted"), [
    (None, True), (b"", True), (b"dev1", True), (b"device", False), (b"root", False), (b"\xff", False),
])
def test_amqp10_external_initial_response_may_only_confirm_the_identity(
    gw: GatewayThread, pki: Path, response: bytes | None, accepted: bool
) -> None:
    # proton's client always sends an empty one: these are written by hand.
    outcome = encode_outcome(SaslCode.OK if accepted else SaslCode.AUTH)
    assert _sasl_frames(gw, pki, "dev1", _external_init(response)).endswith(outcome)


def test_a_proton_password_still_works_beside_a_certificate(gw: GatewayThread, pki: Path, root_password: str) -> None:
    connection = _proton(gw, pki, "dev1", user=ROOT_USER, password=root_password, allowed_mechs="PLAIN")
    connection.close()


# -- callout: the identity is sent as the username ---------------------------------------------------------


def test_callout_receives_the_certificate_identity_as_the_username(
    tmp_path: Path, pki: Path, start_gateway: Callable[..., GatewayThread]
) -> None:
    thread = ServiceThread()
    logic = AuthServiceLogic({"dev1": ""})
    server = HttpAuthService(logic)
    try:
        thread.run(server.start())
        gw = start_gateway(loopback_config(tmp_path, auth={"provider": "callout", "url": server.url,
                                                           "transport": "http"}, server=_listeners(pki)))
        _pika(gw, pki, "dev1", pika.credentials.ExternalCredentials()).close()
        _proton(gw, pki, "dev1").close()
        sent = thread.call(lambda: [r.fields for r in logic.requests if r.method == "authenticate"])
        assert [(f["username"], f["password"]) for f in sent] == [("dev1", ""), ("dev1", "")]
    finally:
        thread.run(server.stop())
        thread.close()
