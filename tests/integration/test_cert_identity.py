"""Certificate identities (`auth.mtls_identity`, `users --cert-identity`, callout) and
`auth.require_tls_for_passwords`, with real clients over loopback on both event loops.

The certificates are made here with `cryptography`: a CA, a server certificate
for 127.0.0.1 and client certificates with a CN and subject alternative names.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ipaddress
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiocoap
import aiohttp
import pika
import pika.exceptions
import pytest
from aiocoap import POST, Message
from aiocoap.numbers import codes
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from proton import ConnectionException
from proton.utils import BlockingConnection

from auth_providers.local_store import LocalStore
from tests.callout_doubles import AuthServiceLogic, GrpcAuthService, HttpAuthService, ServiceThread
from tests.conftest import ROOT_USER, cli_env, loopback_config
from tests.gateway_process import GatewayProcess
from tests.gateway_thread import GatewayThread
from tests.paho_client import PahoClient

StartGateway = Callable[..., GatewayThread]
CONNACK_BAD_CREDENTIALS = 4
CONNACK_NOT_AUTHORIZED = 5


# -- certificates -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Path
    server_key: Path
    #: name -> (certificate, key) of the client certificates.
    clients: dict[str, tuple[Path, Path]]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Polygate, Test"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _issue(directory: Path, stem: str, subject: x509.Name, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey | None,
           extensions: list[x509.ExtensionType], *, ca: bool = False) -> tuple[Path, Path, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                          encipher_only=False, decipher_only=False), critical=True)
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    certificate = builder.sign(signer or key, hashes.SHA256())
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path, key


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca_name = _name("Polygate Test CA")
    ca, _, ca_key = _issue(directory, "ca", ca_name, ca_name, None, [], ca=True)
    server, server_key, _ = _issue(directory, "server", _name("127.0.0.1"), ca_name, ca_key,
                                   [x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])])
    sans = x509.SubjectAlternativeName([
        x509.DNSName("dev1.example.com"), x509.DNSName("second.example.com"),
        x509.UniformResourceIdentifier("spiffe://acme/dev1"), x509.RFC822Name("dev1@example.com"),
    ])
    clients = {}
    for stem, cn, extensions in (("dev1", "dev1", [sans]), ("stranger", "stranger", [])):
        cert, key, _ = _issue(directory, stem, _name(cn), ca_name, ca_key, extensions)
        clients[stem] = (cert, key)
    return Pki(ca=ca, server=server, server_key=server_key, clients=clients)


def _mtls_block(pki: Pki, name: str = "mtls") -> dict[str, Any]:
    block: dict[str, Any] = {"addr": "127.0.0.1:0", "cert_file": str(pki.server), "key_file": str(pki.server_key),
                             "ca_file": str(pki.ca)}
    if name == "tls":
        block["client_auth"] = "require"
    return block


def _client_context(pki: Pki, client: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.ca))
    if client is not None:
        cert, key = pki.clients[client]
        context.load_cert_chain(cert, key)
    return context


def _tls_port(gw: GatewayThread, kind: str) -> int:
    """The port of the kind's TLS listener (the plain one, when there is one, comes first)."""
    assert gw.gateway is not None
    return gw.gateway.bound(kind)[-1][1]


class TlsPaho(PahoClient):
    def __init__(self, port: int, pki: Pki, client: str | None, **kwargs: Any) -> None:
        super().__init__(port, **kwargs)
        if client is None:
            self.client.tls_set(ca_certs=str(pki.ca))
        else:
            cert, key = pki.clients[client]
            self.client.tls_set(ca_certs=str(pki.ca), certfile=str(cert), keyfile=str(key))


def _connack(port: int, pki: Pki, client: str | None, client_id: str, **kwargs: Any) -> int:
    paho = TlsPaho(port, pki, client, client_id=client_id, **kwargs)
    try:
        code, _ = paho.connect()
        return code
    finally:
        paho.disconnect()


def _users(db: Path, *users: tuple[str, str, str]) -> None:
    """(username, certificate identity, topic granted) for each user; no passwords."""
    with LocalStore(str(db)) as store:
        for username, identity, topic in users:
            store.add_user(username, None, cert_identity=identity)
            store.grant(username, topic, {"publish", "subscribe"})


@pytest.fixture
def mtls_gateway(tmp_path: Path, pki: Pki, start_gateway: StartGateway) -> Callable[..., GatewayThread]:
    def start(auth: dict[str, Any] | None = None, **server: Any) -> GatewayThread:
        listeners = {"tcp": {"plain": {"addr": "127.0.0.1:0"}, "mtls": _mtls_block(pki)}, **server}
        return start_gateway(loopback_config(tmp_path, auth=auth, server=listeners))

    return start


# -- local: a certificate instead of a password ---------------------------------------------------------


def test_a_certificate_whose_cn_is_a_local_user_publishes_without_a_password(
    tmp_path: Path, pki: Pki, mtls_gateway: Callable[..., GatewayThread]
) -> None:
    _users(tmp_path / "auth.db", ("dev1", "dev1", "dev1/#"))
    gw = mtls_gateway()
    port = _tls_port(gw, "tcp")
    # No username at all, then the certificate's own user named without a password: both are dev1.
    anonymous = TlsPaho(port, pki, "dev1", client_id="dev1-a").connect_ok()
    named = TlsPaho(port, pki, "dev1", client_id="dev1-b", username="dev1").connect_ok()
    try:
        assert anonymous.subscribe(("dev1/#", 1)) == [1]
        # Authorized as dev1: its ACL holds, nothing more.
        assert anonymous.subscribe(("other/#", 1)) == [0x80]
        named.publish("dev1/temp", b"21.5", qos=1)
        received = anonymous.next_message()
        assert (received.topic, received.payload) == ("dev1/temp", b"21.5")
    finally:
        anonymous.disconnect()
        named.disconnect()


def test_mtls_identity_san_dns_takes_the_first_dns_name(
    tmp_path: Path, pki: Pki, mtls_gateway: Callable[..., GatewayThread]
) -> None:
    _users(tmp_path / "auth.db", ("by-cn", "dev1", "cn/#"), ("by-dns", "dev1.example.com", "dns/#"),
           ("by-second-dns", "second.example.com", "second/#"))
    gw = mtls_gateway(auth={"mtls_identity": "san_dns"})
    client = TlsPaho(_tls_port(gw, "tcp"), pki, "dev1", client_id="dns").connect_ok()
    try:
        # by-dns, and only by-dns: not the CN's user, not the second SAN's.
        assert client.subscribe(("dns/#", 0), ("cn/#", 0), ("second/#", 0)) == [0, 0x80, 0x80]
    finally:
        client.disconnect()
    # A certificate without any DNS name has no identity under san_dns.
    assert _connack(_tls_port(gw, "tcp"), pki, "stranger", "no-san") == CONNACK_NOT_AUTHORIZED


def test_an_unknown_certificate_is_refused_unless_a_password_is_given(
    tmp_path: Path, pki: Pki, root_password: str, mtls_gateway: Callable[..., GatewayThread]
) -> None:
    _users(tmp_path / "auth.db", ("dev1", "dev1", "dev1/#"))
    gw = mtls_gateway()
    port = _tls_port(gw, "tcp")
    assert _connack(port, pki, "stranger", "s1") == CONNACK_NOT_AUTHORIZED
    assert _connack(port, pki, "stranger", "s2", username=ROOT_USER, password=root_password) == 0
    # A certificate never logs in another user: naming someone else means their password decides.
    assert _connack(port, pki, "dev1", "s3", username=ROOT_USER) == CONNACK_BAD_CREDENTIALS
    # A user without a certificate identity is never reached by one.
    assert _connack(port, pki, "stranger", "s4", username=ROOT_USER) == CONNACK_BAD_CREDENTIALS
    # Clearing the identity takes effect without a restart (the store is watched).
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.set_cert_identity("dev1", None)
    deadline = time.monotonic() + 5
    while _connack(port, pki, "dev1", "s5") != CONNACK_NOT_AUTHORIZED:
        assert time.monotonic() < deadline, "the cleared certificate identity still logs dev1 in"


def test_http_with_a_client_certificate_needs_no_authorization_header(
    tmp_path: Path, pki: Pki, start_gateway: StartGateway
) -> None:
    _users(tmp_path / "auth.db", ("dev1", "dev1", "dev1/#"))
    gw = start_gateway(loopback_config(tmp_path, server={"http": {"tls": _mtls_block(pki, "tls")}}))
    url = f"https://127.0.0.1:{_tls_port(gw, 'http')}"

    async def post(client: str, topic: str) -> int:
        connector = aiohttp.TCPConnector(ssl=_client_context(pki, client))
        async with aiohttp.ClientSession(connector=connector) as session:
            async with session.post(f"{url}/{topic}", data=b"1") as response:
                return response.status

    assert asyncio.run(post("dev1", "dev1/x")) == 202
    assert asyncio.run(post("dev1", "other/x")) == 403
    assert asyncio.run(post("stranger", "dev1/x")) == 401


# -- callout: the identity as the username --------------------------------------------------------------


@pytest.mark.parametrize("transport", ["grpc", "http"])
def test_callout_receives_the_certificate_identity_as_the_username(
    transport: str, tmp_path: Path, pki: Pki, start_gateway: StartGateway
) -> None:
    thread = ServiceThread()
    logic = AuthServiceLogic({"dev1": ""})
    server: GrpcAuthService | HttpAuthService = GrpcAuthService(logic) if transport == "grpc" else HttpAuthService(logic)
    try:
        thread.run(server.start())
        url = server.address if isinstance(server, GrpcAuthService) else server.url
        listeners = {"tcp": {"mtls": _mtls_block(pki)}}
        gw = start_gateway(loopback_config(tmp_path, auth={"provider": "callout", "url": url, "transport": transport},
                                           server=listeners))
        port = _tls_port(gw, "tcp")
        assert _connack(port, pki, "dev1", "cert-only") == 0
        # A username the client sends is sent as it is: the certificate does not replace it.
        assert _connack(port, pki, "dev1", "named", username="someone", password="pw") == CONNACK_BAD_CREDENTIALS
        sent = thread.call(lambda: [r.fields for r in logic.requests if r.method == "authenticate"])
        assert [(f["client_id"], f["username"], f["password"]) for f in sent] == [
            ("cert-only", "dev1", ""), ("named", "someone", "pw"),
        ]
    finally:
        thread.run(server.stop())
        thread.close()


# -- auth.require_tls_for_passwords ---------------------------------------------------------------------


def test_require_tls_for_passwords_refuses_passwords_on_plaintext_listeners(
    tmp_path: Path, pki: Pki, root_password: str, start_gateway: StartGateway
) -> None:
    _users(tmp_path / "auth.db", ("dev1", "dev1", "dev1/#"))
    with LocalStore(str(tmp_path / "auth.db")) as store:
        store.grant("anonymous", "public/#", {"publish", "subscribe"})
    listeners = {
        # client_auth optional ("request"): a certificate may be sent, and need not be.
        "tcp": {"plain": {"addr": "127.0.0.1:0"}, "tls": {**_mtls_block(pki, "tls"), "client_auth": "optional"}},
        "amqp091": {"plain": {"addr": "127.0.0.1:0"}},
        "amqp": {"plain": {"addr": "127.0.0.1:0"}},
        "coap": {"plain": {"addr": "127.0.0.1:0"}},
    }
    auth = {"require_tls_for_passwords": True, "local": {"allow_anonymous": True}}
    gw = start_gateway(loopback_config(tmp_path, auth=auth, server=listeners))
    assert gw.gateway is not None
    plain_port, tls_port = (port for _, port in gw.gateway.bound("tcp"))

    # MQTT: 0x05 on plaintext, even for the right password; the same password over TLS works.
    refused = PahoClient(plain_port, client_id="p1", username=ROOT_USER, password=root_password)
    try:
        assert refused.connect()[0] == CONNACK_NOT_AUTHORIZED
    finally:
        refused.disconnect()
    assert _connack(tls_port, pki, None, "p2", username=ROOT_USER, password=root_password) == 0
    # Certificate and anonymous access still work.
    assert _connack(tls_port, pki, "dev1", "p3") == 0
    anonymous = PahoClient(plain_port, client_id="p4").connect_ok()
    anonymous.disconnect()

    # HTTP: 403 for Basic over plaintext; anonymous still publishes.
    async def http(headers: dict[str, str]) -> int:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{gw.http_port}/public/x", data=b"1", headers=headers) as r:
                return r.status

    assert asyncio.run(http({"Authorization": aiohttp.BasicAuth(ROOT_USER, root_password).encode()})) == 403
    assert asyncio.run(http({})) == 202

    # AMQP 0.9.1: connection refused with 403 ACCESS_REFUSED.
    params = pika.ConnectionParameters("127.0.0.1", gw.port("amqp091"),
                                       credentials=pika.PlainCredentials(ROOT_USER, root_password),
                                       connection_attempts=1, socket_timeout=5)
    with pytest.raises(pika.exceptions.ProbableAuthenticationError) as info:
        pika.BlockingConnection(params)
    assert "403" in str(info.value) and "ACCESS_REFUSED" in str(info.value)

    # AMQP 1.0: the SASL exchange fails.
    with pytest.raises(ConnectionException):
        BlockingConnection(f"amqp://127.0.0.1:{gw.port('amqp')}", user=ROOT_USER, password=root_password,
                           allowed_mechs="PLAIN", timeout=10)

    # CoAP (always plaintext): 4.01 for a password; anonymous still publishes.
    async def coap() -> tuple[aiocoap.numbers.Code, aiocoap.numbers.Code]:
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            base = f"coap://127.0.0.1:{gw.port('coap')}/public/x"
            async with asyncio.timeout(5):
                with_password = await context.request(
                    Message(code=POST, uri=f"{base}?username={ROOT_USER}&password={root_password}", payload=b"1")
                ).response
                without = await context.request(Message(code=POST, uri=base, payload=b"1")).response
            return with_password.code, without.code
        finally:
            await context.shutdown()

    assert asyncio.run(coap()) == (codes.UNAUTHORIZED, codes.CHANGED)


@pytest.fixture
def process(tmp_path: Path, loop_name: str, root_password: str) -> Iterator[Callable[[dict[str, Any]], GatewayProcess]]:
    started: list[GatewayProcess] = []

    def start(config: dict[str, Any]) -> GatewayProcess:
        gateway = GatewayProcess(tmp_path, config, loop=loop_name).start()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.terminate()


def test_plaintext_listeners_that_accept_passwords_are_warned_about_at_start(
    tmp_path: Path, pki: Pki, process: Callable[[dict[str, Any]], GatewayProcess]
) -> None:
    listeners = {"tcp": {"plain": {"addr": "127.0.0.1:0"}, "mtls": _mtls_block(pki)},
                 "coap": {"plain": {"addr": "127.0.0.1:0"}}}
    # HTTP's auth is off: its plaintext listener takes no password, so it is not warned about.
    config = loopback_config(tmp_path, auth={"protocols": {"http": False}}, server=listeners)
    gateway = process(config)
    warnings = [line for line in gateway.lines if "accepts passwords in plaintext" in line]
    assert len(warnings) == 2, warnings
    assert any("server.tcp.plain" in line for line in warnings)
    assert any("server.coap.plain" in line for line in warnings)
    assert all(json.loads(line)["level"] == "warning" for line in warnings), warnings
    gateway.terminate()
    # Refusing them: nothing to warn about.
    config["auth"]["require_tls_for_passwords"] = True
    gateway = process(config)
    assert not any("accepts passwords in plaintext" in line for line in gateway.lines)



def test_users_cli_sets_changes_and_clears_certificate_identities(tmp_path: Path) -> None:
    db = str(tmp_path / "cli.db")

    def polygate(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "gateway", *args, "--db", db], input=stdin, text=True,
                              capture_output=True, timeout=30, env=cli_env())

    assert polygate("users", "add", "dev1", "--cert-identity", "dev1", "--no-password").returncode == 0
    assert polygate("users", "add", "dev2", "--password-stdin", "--cert-identity", "dev2", stdin="pw\n").returncode == 0
    taken = polygate("users", "add", "dev3", "--no-password", "--cert-identity", "dev1")
    assert taken.returncode == 1 and "already belongs to user 'dev1'" in taken.stderr
    assert polygate("users", "add", "dev4", "--no-password").returncode == 2  # could never log in
    assert polygate("users", "cert-identity", "dev2", "dev2.example.com").returncode == 0
    assert polygate("users", "cert-identity", "dev1", "--clear").returncode == 0
    assert polygate("users", "cert-identity", "dev1").returncode == 2  # neither VALUE nor --clear
    listing = polygate("users", "list").stdout.splitlines()
    assert listing[0].split() == ["USER", "SUPERUSER", "CREATED", "CERT_IDENTITY"]
    assert [(row.split()[0], row.split()[-1]) for row in listing[1:]] == [("dev1", "-"), ("dev2", "dev2.example.com")]
    with LocalStore(db) as store:
        assert {u.username: u.cert_identity for u in store.list_users()} == {"dev1": "", "dev2": "dev2.example.com"}
