"""TLS and mTLS on every TCP listener, with the real clients of each protocol, on both event loops.

paho (MQTT over TCP), websockets (MQTT over wss: an MQTT CONNECT in a binary
frame), aiohttp (HTTP publish over https), pika (AMQP 0.9.1) and
python-qpid-proton (AMQP 1.0) each connect, authenticate and publish through
a `tls` and an `mtls` listener. Certificates come from `gateway.certs`, the
code behind `polygate gen-cert`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiohttp
import paho.mqtt.client as mqtt
import pika
import pika.exceptions
import pytest
import websockets.asyncio.client
import websockets.exceptions
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from paho.mqtt.enums import CallbackAPIVersion
from proton import Message, ProtonException, SSLDomain
from proton.utils import BlockingConnection

from gateway import certs
from tests.conftest import ROOT_USER, loopback_config
from tests.gateway_thread import GatewayThread
from tests.integration.test_websocket import connect_packet
from tests.paho_client import PahoClient

KINDS = ("tcp", "websocket", "http", "amqp", "amqp091")
DEADLINE = 10.0


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with a server and a client certificate, and in `other/` a second CA with the same names."""
    directory = tmp_path_factory.mktemp("pki")
    certs.generate(directory, clients=["device-1"])
    certs.generate(directory / "other", clients=["device-1"])
    return directory


@dataclass(frozen=True)
class ClientTLS:
    """What a client brings: the CA it trusts, its certificate (a directory of gen-cert files), a version cap."""

    ca_file: Path
    cert_dir: Path | None = None
    max_version: ssl.TLSVersion | None = None

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if self.cert_dir is not None:
            context.load_cert_chain(self.cert_dir / "client-device-1.pem", self.cert_dir / "client-device-1-key.pem")
        if self.max_version is not None:
            context.maximum_version = self.max_version
        return context


# -- one real client per protocol: True when it connected, authenticated and published ----------------


def mqtt_tcp(port: int, tls: ClientTLS, password: str) -> bool:
    answers: queue.Queue[object] = queue.Queue()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311, reconnect_on_failure=False)
    client.username_pw_set(ROOT_USER, password)
    client.tls_set_context(tls.context())
    client.on_connect = lambda c, u, f, reason, p: answers.put(reason.value)
    client.on_disconnect = lambda *_: answers.put("closed")
    try:
        client.connect("127.0.0.1", port)
    except (ssl.SSLError, OSError):
        return False
    client.loop_start()
    try:
        if answers.get(timeout=DEADLINE) != 0:
            return False
        client.publish("tls/mqtt", b"x", qos=1).wait_for_publish(DEADLINE)
        return True
    finally:
        client.disconnect()
        client.loop_stop()


def mqtt_wss(port: int, tls: ClientTLS, password: str) -> bool:
    # The asyncio client, not websockets.sync: the sync client closes a refused
    # connection's socket while its reader thread may still be entering SSL_read
    # on the descriptor *number*; the gateway, in this same process, reuses that
    # number for its next accepted socket and the stale read swallows that
    # connection's first bytes (a wss upgrade then goes unanswered).
    async def handshake() -> bool:
        try:
            async with websockets.asyncio.client.connect(
                f"wss://127.0.0.1:{port}/mqtt", ssl=tls.context(), subprotocols=["mqtt"],  # type: ignore[list-item]
                open_timeout=DEADLINE,
            ) as ws:
                await ws.send(connect_packet("wss-client", ROOT_USER, password))
                return await asyncio.wait_for(ws.recv(), DEADLINE) == b"\x20\x02\x00\x00"
        except (ssl.SSLError, OSError, TimeoutError, websockets.exceptions.WebSocketException):
            return False

    return asyncio.run(handshake())


def http_publish(port: int, tls: ClientTLS, password: str) -> bool:
    async def publish() -> bool:
        connector = aiohttp.TCPConnector(ssl=tls.context())
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session:
            try:
                async with session.post(
                    f"https://127.0.0.1:{port}/tls/http", data=b"x", auth=aiohttp.BasicAuth(ROOT_USER, password)
                ) as response:
                    return response.status == 202
            except (aiohttp.ClientError, ssl.SSLError, OSError):
                return False

    return asyncio.run(publish())


def amqp091_publish(port: int, tls: ClientTLS, password: str) -> bool:
    params = pika.ConnectionParameters(
        "127.0.0.1", port, credentials=pika.PlainCredentials(ROOT_USER, password), connection_attempts=1,
        socket_timeout=DEADLINE, ssl_options=pika.SSLOptions(tls.context(), "127.0.0.1"),
    )
    try:
        connection = pika.BlockingConnection(params)
    except (pika.exceptions.AMQPError, ssl.SSLError, OSError):
        return False
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", "tls.amqp091", b"x")
        return True
    finally:
        connection.close()


def amqp10_publish(port: int, tls: ClientTLS, password: str) -> bool:
    if tls.max_version is not None:
        # proton has no setting for the highest TLS version: that case is covered by `raw_handshake`.
        raise NotImplementedError
    domain = SSLDomain(SSLDomain.MODE_CLIENT)
    domain.set_trusted_ca_db(str(tls.ca_file))
    # VERIFY_PEER: the chain; proton's host-name check does not read IP address SANs.
    domain.set_peer_authentication(SSLDomain.VERIFY_PEER)
    if tls.cert_dir is not None:
        domain.set_credentials(str(tls.cert_dir / "client-device-1.pem"), str(tls.cert_dir / "client-device-1-key.pem"), None)
    try:
        connection = BlockingConnection(f"amqps://127.0.0.1:{port}", user=ROOT_USER, password=password,
                                        allowed_mechs="PLAIN", ssl_domain=domain, timeout=DEADLINE)
    except ProtonException:
        return False
    try:
        connection.create_sender("tls/amqp").send(Message(body=b"x"))
        return True
    finally:
        connection.close()


CLIENTS: dict[str, Callable[[int, ClientTLS, str], bool]] = {
    "tcp": mqtt_tcp, "websocket": mqtt_wss, "http": http_publish, "amqp": amqp10_publish, "amqp091": amqp091_publish,
}


def raw_handshake(port: int, context: ssl.SSLContext) -> x509.Certificate:
    """The certificate a listener serves to the next connection (a plain ssl socket, no protocol on top)."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE) as sock:
        with context.wrap_socket(sock, server_hostname="127.0.0.1") as tls_sock:
            der = tls_sock.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def no_verify() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    return context


def files(directory: Path) -> dict[str, str]:
    return {"cert_file": str(directory / "server.pem"), "key_file": str(directory / "server-key.pem")}


# -- tests ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_tls_and_mtls(kind: str, pki: Path, start_gateway: Callable[..., GatewayThread], tmp_path: Path,
                      root_password: str) -> None:
    """mtls: our CA's client certificate in; none, or another CA's, out. tls with min_version tls1.3: a TLS 1.2 client out."""
    blocks = {
        "tls": {"addr": "127.0.0.1:0", **files(pki), "min_version": "tls1.3"},
        "mtls": {"addr": "127.0.0.1:0", **files(pki), "ca_file": str(pki / "ca.pem")},
    }
    gw = start_gateway(loopback_config(tmp_path, server={kind: blocks}))
    assert gw.gateway is not None
    (_, tls_port), (_, mtls_port) = gw.gateway.bound(kind)
    connect = CLIENTS[kind]
    trusted = ClientTLS(pki / "ca.pem")

    assert connect(mtls_port, replace(trusted, cert_dir=pki), root_password)
    assert not connect(mtls_port, trusted, root_password), "a client without a certificate got in"
    assert not connect(mtls_port, replace(trusted, cert_dir=pki / "other"), root_password), "another CA's certificate got in"

    assert connect(tls_port, trusted, root_password), f"{kind}: a trusted client was refused on the tls listener"
    assert raw_handshake(tls_port, trusted.context()).serial_number == x509.load_pem_x509_certificate(
        (pki / "server.pem").read_bytes()).serial_number
    tls12 = replace(trusted, max_version=ssl.TLSVersion.TLSv1_2)
    if kind == "amqp":
        with pytest.raises(ssl.SSLError):
            raw_handshake(tls_port, tls12.context())
    else:
        assert not connect(tls_port, tls12, root_password), "a TLS 1.2 client got past min_version: tls1.3"
    # Refused handshakes closed only their own connections.
    assert connect(mtls_port, replace(trusted, cert_dir=pki), root_password)


def test_replaced_certificate_serves_the_next_connection_while_open_ones_go_on(
    pki: Path, start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str
) -> None:
    served = tmp_path / "served"
    served.mkdir()
    ca = certs.load(pki / "ca.pem", pki / "ca-key.pem")
    certs.write_issued(served, "server", certs.make_server(ca))
    old_serial = x509.load_pem_x509_certificate((served / "server.pem").read_bytes()).serial_number
    server = {kind: {"tls": {"addr": "127.0.0.1:0", **files(served)}} for kind in KINDS}
    gw = start_gateway(loopback_config(tmp_path, server=server))
    assert gw.gateway is not None
    ports = {kind: gw.gateway.bound(kind)[-1][1] for kind in KINDS}
    trust = ClientTLS(pki / "ca.pem")

    open_client = PahoClient(ports["tcp"], client_id="before-reload", username=ROOT_USER, password=root_password)
    open_client.client.tls_set_context(trust.context())
    open_client.connect_ok()
    try:
        assert open_client.subscribe(("reload/#", 1)) == [1]
        replacement = certs.make_server(ca)
        # As an operator's tool would: new files beside the old ones, renamed into place.
        certs.write_issued(tmp_path, "next", replacement)
        os.replace(tmp_path / "next-key.pem", served / "server-key.pem")
        os.replace(tmp_path / "next.pem", served / "server.pem")
        new_serial = replacement.certificate.serial_number
        assert new_serial != old_serial

        deadline = time.monotonic() + DEADLINE
        for kind, port in ports.items():
            while (serial := raw_handshake(port, trust.context()).serial_number) != new_serial:
                assert serial == old_serial and time.monotonic() < deadline, f"{kind} still serves the old certificate"
                time.sleep(0.05)
            # The real client of each protocol works with the new certificate.
            assert CLIENTS[kind](port, trust, root_password), kind

        # The connection made before the reload still works, on the old certificate.
        sock = open_client.client.socket()
        assert isinstance(sock, ssl.SSLSocket)
        der = sock.getpeercert(binary_form=True)
        assert der is not None and x509.load_der_x509_certificate(der).serial_number == old_serial
        open_client.publish("reload/after", b"still here", qos=1)
        assert open_client.next_message().payload == b"still here"
    finally:
        open_client.disconnect()


def test_self_signed_serves_on_every_protocol(
    start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str, caplog: pytest.LogCaptureFixture
) -> None:
    server = {kind: {"tls": {"addr": "127.0.0.1:0", "self_signed": True}} for kind in KINDS}
    with caplog.at_level(logging.INFO, logger="polygate.tls"):
        gw = start_gateway(loopback_config(tmp_path, server=server))
    assert gw.gateway is not None
    for kind in KINDS:
        port = gw.gateway.bound(kind)[-1][1]
        certificate = raw_handshake(port, no_verify())
        assert certificate.issuer == certificate.subject
        assert f"server.{kind}.tls: serving a self-signed certificate" in caplog.text
        assert certs.fingerprint_sha256(certificate) in caplog.text
        # Pinned: the client trusts exactly the certificate it was shown, and verifies it.
        pinned = tmp_path / f"pinned-{kind}.pem"
        pinned.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        assert CLIENTS[kind](port, ClientTLS(pinned), root_password), kind


def test_handshakes_are_limited_bounded_counted_and_logged(
    pki: Path, start_gateway: Callable[..., GatewayThread], tmp_path: Path, root_password: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket in its TLS handshake counts against the per-IP cap, is closed after handshake_timeout,
    and a failed handshake is one WARNING with the peer and OpenSSL's reason, and a metric."""
    server = {"tcp": {"mtls": {"addr": "127.0.0.1:0", **files(pki), "ca_file": str(pki / "ca.pem")}}}
    with caplog.at_level(logging.WARNING, logger="polygate.state"):
        gw = start_gateway(loopback_config(tmp_path, server=server,
                                           limits={"handshake_timeout": "500ms", "max_connections_per_ip": 2}))
        assert gw.gateway is not None
        port = gw.gateway.bound("tcp")[-1][1]
        trusted = ClientTLS(pki / "ca.pem")

        for _ in range(3):  # no certificate: refused in the handshake
            assert not mqtt_tcp(port, trusted, root_password)
        failures = [r for r in caplog.records if "TLS handshake failed: peer did not return a certificate" in r.getMessage()]
        assert len(failures) == 1, "one line per interval, not one per handshake"
        assert "server.tcp.mtls refused a connection from 127.0.0.1:" in failures[0].getMessage()
        metrics = gw.call(lambda: gw.gateway.metrics.render().decode())  # type: ignore[union-attr]
        assert 'polygate_connections_refused_total{listener="server.tcp.mtls",protocol="mqtt",reason="tls_handshake"} 3.0' in metrics

        # Two silent sockets hold the source's two slots while they handshake...
        silent = [socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.9", 0)) for _ in range(2)]
        try:
            deadline = time.monotonic() + DEADLINE
            while gw.call(lambda: gw.gateway.state.connections_from("127.0.0.9")) != 2:  # type: ignore[union-attr]
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with socket.create_connection(("127.0.0.1", port), timeout=5, source_address=("127.0.0.9", 0)) as third:
                assert third.recv(10) == b"", "a third socket from the source got past max_connections_per_ip"
            # ...and the handshake timeout closes them.
            started = time.monotonic()
            for sock in silent:
                assert sock.recv(10) == b""
            assert time.monotonic() - started < 3
        finally:
            for sock in silent:
                sock.close()
        deadline = time.monotonic() + DEADLINE
        while "TLS handshake not complete within limits.handshake_timeout" not in caplog.text:
            assert time.monotonic() < deadline, "a handshake timeout was not logged"
            time.sleep(0.01)
        # Another source is served all along, and with a certificate the first source is too, again.
        assert mqtt_tcp(port, replace(trusted, cert_dir=pki), root_password)
