"""The Atom provider with mTLS client certificates: `CertificateService.ResolveCertificate`.

Certificates come from `gateway.certs` (the code behind `polygate gen-cert`):
a CA, a server certificate for 127.0.0.1 and client certificates, two of them
with the same CN. The fake Atom (tests/fake_atom.py) knows some of them by
serial number and fingerprint. Real clients connect over TLS to the whole
gateway: paho (MQTT), aiohttp (HTTP) and pika (AMQP 0.9.1). The last tests call
the provider directly for the details of the contract.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import hashlib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pika
import pika.exceptions
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from gateway import certs
from gateway.errors import ProviderUnavailable
from gateway.events import Action, AuthEvent, Identity, Outcome, Protocol, Secret
from gateway.frontends.peers import PeerCertificate, certificate_details
from tests.conftest import loopback_config
from tests.fake_atom import AtomData, FakeAtom
from tests.gateway_thread import GatewayThread
from tests.integration.test_atom import (
    ACME,
    CONNACK_BAD_CREDENTIALS,
    CONNACK_OK,
    CONNACK_UNAVAILABLE,
    DEVICE,
    DEVICE_ID,
    DEVICE_SECRET,
    SERVICE_TOKEN,
    TOKEN_ENV,
    WATCHER,
    WATCHER_ID,
    WATCHER_SECRET,
    Atom,
    atom_data,
    make_provider,
    running_atom,
)
from tests.paho_client import PahoClient
from tests.unit.test_certificate_details import der_serial_hex

CONNACK_NOT_AUTHORIZED = 5
#: Client certificates: file stem -> CN. "twin" has device-1's CN but is another certificate.
CLIENTS = {"device-1": "device-1", "twin": "device-1", "watcher": "watcher", "stranger": "stranger",
           "lapsed": "lapsed", "no-expiry": "no-expiry"}


@dataclass(frozen=True)
class Pki:
    directory: Path
    #: stem -> what the gateway reads from that certificate.
    details: dict[str, PeerCertificate]

    @property
    def ca(self) -> Path:
        return self.directory / "ca.pem"

    def files(self, stem: str) -> tuple[Path, Path]:
        return self.directory / f"client-{stem}.pem", self.directory / f"client-{stem}-key.pem"

    def context(self, stem: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if stem is not None:
            context.load_cert_chain(*self.files(stem))
        return context


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    directory = tmp_path_factory.mktemp("atom-pki")
    ca = certs.make_ca()
    certs.write_issued(directory, "ca", ca)
    certs.write_issued(directory, "server", certs.make_server(ca, ("127.0.0.1",)))
    details = {}
    for stem, cn in CLIENTS.items():
        issued = certs.make_client(ca, cn)
        certs.write_issued(directory, f"client-{stem}", issued)
        details[stem] = certificate_details(issued.certificate)
    return Pki(directory, details)


def _in(delta: datetime.timedelta) -> str:
    """An RFC 3339 time `delta` from now, as Atom (chrono's to_rfc3339) writes it."""
    return (datetime.datetime.now(datetime.timezone.utc) + delta).isoformat()


def cert_atom_data(pki: Pki) -> AtomData:
    data = atom_data()
    known = pki.details
    data.add_certificate(known["device-1"].serial, known["device-1"].fingerprint, DEVICE, _in(datetime.timedelta(days=30)))
    data.add_certificate(known["watcher"].serial, known["watcher"].fingerprint, WATCHER, _in(datetime.timedelta(days=30)))
    # Atom itself answers NOT_FOUND for an expired certificate; this mapping tests the gateway's own check.
    data.add_certificate(known["lapsed"].serial, known["lapsed"].fingerprint, DEVICE, _in(-datetime.timedelta(minutes=1)))
    data.add_certificate(known["no-expiry"].serial, known["no-expiry"].fingerprint, DEVICE, "")
    return data


@pytest.fixture
def atom(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Iterator[Atom]:
    monkeypatch.setenv(TOKEN_ENV, SERVICE_TOKEN)
    yield from running_atom(cert_atom_data(pki))


@pytest.fixture
def gateway(tmp_path: Path, pki: Pki, atom: Atom, start_gateway: Callable[..., GatewayThread]) -> Callable[..., GatewayThread]:
    """A gateway with Atom auth and an mTLS listener for MQTT, HTTP and AMQP 0.9.1 (beside plain MQTT)."""

    def start(**auth: Any) -> GatewayThread:
        mtls = {"addr": "127.0.0.1:0", "cert_file": str(pki.directory / "server.pem"),
                "key_file": str(pki.directory / "server-key.pem"), "ca_file": str(pki.ca)}
        server = {"tcp": {"plain": {"addr": "127.0.0.1:0"}, "mtls": mtls}, "http": {"mtls": mtls},
                  "amqp091": {"mtls": mtls}}
        section = {"provider": "atom",
                   "atom": {"grpc_addr": atom.address, "insecure": True, "service_token_env": TOKEN_ENV}, **auth}
        return start_gateway(loopback_config(tmp_path, auth=section, server=server))

    return start


def tls_port(gw: GatewayThread, kind: str) -> int:
    assert gw.gateway is not None
    return gw.gateway.bound(kind)[-1][1]


def tls_client(gw: GatewayThread, pki: Pki, stem: str | None, client_id: str, **kwargs: Any) -> PahoClient:
    client = PahoClient(tls_port(gw, "tcp"), client_id=client_id, **kwargs)
    client.client.tls_set_context(pki.context(stem))
    return client


def connack(gw: GatewayThread, pki: Pki, stem: str | None, client_id: str, **kwargs: Any) -> int:
    client = tls_client(gw, pki, stem, client_id, **kwargs)
    try:
        return client.connect()[0]
    finally:
        client.disconnect()


def resolved(atom: Atom) -> list[tuple[str, str]]:
    return list(atom.read(lambda d: [(r.request.serial_number, r.request.fingerprint_sha256)
                                     for r in d.recorded("ResolveCertificate")]))


# -- with real clients ------------------------------------------------------------------------------


def test_a_known_certificate_publishes_without_a_password(pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]) -> None:
    gw = gateway()
    watcher = PahoClient(gw.mqtt_port, client_id="watcher", username=WATCHER_ID, password=WATCHER_SECRET).connect_ok()
    dev = tls_client(gw, pki, "device-1", "dev").connect_ok()
    try:
        assert watcher.subscribe(("m/acme/c/sensors/#", 1)) == [1]
        # Authorized as Atom's entity: its channel, not another.
        assert dev.subscribe(("m/acme/c/sensors/#", 1), ("m/acme/c/other/#", 1)) == [1, 0x80]
        dev.publish("m/acme/c/sensors/temp", b"21.5", qos=1)
        message = watcher.next_message(timeout=5)
        assert (message.topic, message.payload) == ("m/acme/c/sensors/temp", b"21.5")
    finally:
        dev.disconnect()
        watcher.disconnect()
    der = x509.load_pem_x509_certificate(pki.files("device-1")[0].read_bytes()).public_bytes(serialization.Encoding.DER)
    # Exactly the forms Atom stores: hex of the serial's DER bytes, SHA-256 of the DER; lowercase, no separators.
    assert resolved(atom) == [(der_serial_hex(der), hashlib.sha256(der).hexdigest())]
    # Only the watcher's password went to Atom: the device sent none.
    assert atom.read(lambda d: [r.request.identifier for r in d.recorded("AuthenticateCredential")]) == [WATCHER_ID]
    metadata = atom.read(lambda d: {r.metadata.get("authorization") for r in d.recorded("ResolveCertificate")})
    assert metadata == {f"Bearer {SERVICE_TOKEN}"}


def test_unknown_expired_and_unavailable_are_refused_with_their_own_codes(
    pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]
) -> None:
    gw = gateway(timeout="500ms", retries=0)
    assert connack(gw, pki, "stranger", "s1") == CONNACK_NOT_AUTHORIZED
    assert connack(gw, pki, "lapsed", "s2") == CONNACK_NOT_AUTHORIZED
    # A username without a password still means the certificate decides.
    assert connack(gw, pki, "stranger", "s3", username=DEVICE_ID) == CONNACK_BAD_CREDENTIALS
    # Atom gave no expiry: the mapping stands as Atom answered it.
    assert connack(gw, pki, "no-expiry", "s4") == CONNACK_OK
    assert len(resolved(atom)) == 4
    atom.stop()
    # Fail closed, and say so: "unavailable", never "not authorized".
    assert connack(gw, pki, "device-1", "s5") == CONNACK_UNAVAILABLE


def test_two_certificates_with_one_cn_do_not_share_a_cache_entry(
    pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]
) -> None:
    gw = gateway()  # auth.atom.authn_cache_ttl: 30s by default
    assert pki.details["twin"].identity == pki.details["device-1"].identity == "device-1"
    assert connack(gw, pki, "device-1", "same-id") == CONNACK_OK
    assert connack(gw, pki, "device-1", "same-id") == CONNACK_OK
    assert len(resolved(atom)) == 1  # the second was the authn cache's
    # Same client id, same CN, no password: only the certificate differs, and Atom does not know this one.
    assert connack(gw, pki, "twin", "same-id") == CONNACK_NOT_AUTHORIZED
    assert [fingerprint for _, fingerprint in resolved(atom)] == [pki.details["device-1"].fingerprint,
                                                                  pki.details["twin"].fingerprint]


def test_a_password_beside_a_certificate_takes_the_credential_path(
    pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]
) -> None:
    gw = gateway()
    # An unknown certificate with the right credential: the credential decides.
    assert connack(gw, pki, "stranger", "p1", username=DEVICE_ID, password=DEVICE_SECRET) == CONNACK_OK
    # A known certificate does not rescue a wrong password.
    assert connack(gw, pki, "device-1", "p2", username=DEVICE_ID, password="wrong") == CONNACK_BAD_CREDENTIALS
    assert atom.calls("AuthenticateCredential") == 2
    assert resolved(atom) == []


def test_http_over_mtls_without_an_authorization_header(pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]) -> None:
    gw = gateway(timeout="500ms", retries=0)
    url = f"https://127.0.0.1:{tls_port(gw, 'http')}"

    async def post(stem: str, topic: str) -> int:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.context(stem))) as session:
            async with session.post(f"{url}/{topic}", data=b"1") as response:
                return response.status

    watcher = PahoClient(gw.mqtt_port, client_id="watcher", username=WATCHER_ID, password=WATCHER_SECRET).connect_ok()
    try:
        assert watcher.subscribe(("m/acme/c/sensors/#", 1)) == [1]
        assert asyncio.run(post("device-1", "m/acme/c/sensors/http")) == 202
        assert watcher.next_message(timeout=5).topic == "m/acme/c/sensors/http"
    finally:
        watcher.disconnect()
    assert asyncio.run(post("device-1", "m/acme/c/other/http")) == 403
    assert asyncio.run(post("stranger", "m/acme/c/sensors/http")) == 401
    assert asyncio.run(post("lapsed", "m/acme/c/sensors/http")) == 401
    atom.stop()
    assert asyncio.run(post("stranger", "m/acme/c/sensors/http")) == 503


def test_amqp091_over_tls_with_an_empty_password(pki: Pki, atom: Atom, gateway: Callable[..., GatewayThread]) -> None:
    gw = gateway()

    def open_connection(stem: str) -> pika.BlockingConnection:
        params = pika.ConnectionParameters(
            "127.0.0.1", tls_port(gw, "amqp091"), credentials=pika.PlainCredentials("device-1", ""),
            connection_attempts=1, socket_timeout=10, ssl_options=pika.SSLOptions(pki.context(stem), "127.0.0.1"),
        )
        return pika.BlockingConnection(params)

    watcher = PahoClient(gw.mqtt_port, client_id="watcher", username=WATCHER_ID, password=WATCHER_SECRET).connect_ok()
    connection = open_connection("device-1")
    try:
        assert watcher.subscribe(("m/acme/c/sensors/#", 1)) == [1]
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("amq.topic", "m.acme.c.sensors.amqp", b"from pika")
        message = watcher.next_message(timeout=5)
        assert (message.topic, message.payload) == ("m/acme/c/sensors/amqp", b"from pika")
    finally:
        connection.close()
        watcher.disconnect()
    with pytest.raises(pika.exceptions.ProbableAuthenticationError):
        open_connection("stranger")


# -- the provider on its own ------------------------------------------------------------------------


@pytest.fixture
async def local_atom(pki: Pki, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv(TOKEN_ENV, SERVICE_TOKEN)
    server = await FakeAtom(cert_atom_data(pki)).start()
    yield server
    await server.stop()


def cert_connect(details: PeerCertificate, secret: str = "", username: str = "") -> AuthEvent:
    return AuthEvent(protocol=Protocol.MQTT, action=Action.CONNECT, client_id="c1", username=username,
                     secret=Secret(secret), tls_identity=details.identity, tls_serial=details.serial,
                     tls_fingerprint=details.fingerprint)


async def test_resolve_certificate_outcomes(pki: Pki, local_atom: FakeAtom) -> None:
    data = local_atom.data
    known = pki.details
    p = make_provider(local_atom.address)
    await p.start()
    try:
        allowed = await p.authenticate(cert_connect(known["device-1"]))
        assert allowed.outcome is Outcome.ALLOW
        assert allowed.identity == Identity(external_id=DEVICE.entity_id, tenant=ACME, username="device-1")
        # Cached until at most the mapping's expiry, less the caches' jitter; never longer than asked.
        assert allowed.ttl is not None and 0.85 * 30 * 86400 < allowed.ttl <= 0.9 * 30 * 86400
        no_expiry = await p.authenticate(cert_connect(known["no-expiry"]))
        assert no_expiry.outcome is Outcome.ALLOW and no_expiry.ttl is None
        for stem in ("stranger", "lapsed"):
            assert (await p.authenticate(cert_connect(known[stem]))).outcome is Outcome.DENY, stem
        # The right serial with another certificate's fingerprint is not that certificate.
        forged = PeerCertificate(identity="device-1", serial=known["device-1"].serial, fingerprint=known["twin"].fingerprint)
        assert (await p.authenticate(cert_connect(forged))).outcome is Outcome.DENY
        assert (await p.authenticate(cert_connect(PeerCertificate(serial="xyz", fingerprint="ab")))).outcome is Outcome.DENY

        record = data.certificates[known["device-1"].serial]
        data.certificates[known["device-1"].serial] = dataclasses.replace(record, expires_at="tomorrow")
        with pytest.raises(ProviderUnavailable, match="expires_at"):
            await p.authenticate(cert_connect(known["device-1"]))
        for status, retryable in ((grpc.StatusCode.UNAVAILABLE, True), (grpc.StatusCode.INTERNAL, False)):
            data.fail_with = status
            with pytest.raises(ProviderUnavailable, match=status.name) as info:
                await p.authenticate(cert_connect(known["watcher"]))
            assert info.value.retryable is retryable
        data.fail_with = grpc.StatusCode.PERMISSION_DENIED
        assert (await p.authenticate(cert_connect(known["watcher"]))).outcome is Outcome.DENY
        data.fail_with = None

        # A secret beside the certificate: the credential path, and no ResolveCertificate.
        data.reset()
        with_password = await p.authenticate(cert_connect(known["stranger"], DEVICE_SECRET, DEVICE_ID))
        assert with_password.outcome is Outcome.ALLOW
        http_token = AuthEvent(protocol=Protocol.HTTP, action=Action.CONNECT, client_id="c1",
                               secret=Secret("Bearer nope"), tls_serial=known["device-1"].serial,
                               tls_fingerprint=known["device-1"].fingerprint)
        assert (await p.authenticate(http_token)).outcome is Outcome.DENY
        assert (data.calls["AuthenticateCredential"], data.calls["Authenticate"], data.calls["ResolveCertificate"]) == (1, 1, 0)
    finally:
        await p.aclose()
