"""Listener TLS contexts (gateway.frontends.tls) and development certificates (gateway.certs), without sockets.

Handshakes run in memory (two `ssl.MemoryBIO` pairs), so these tests see
exactly what OpenSSL decides for a context; the integration tests in
tests/integration/test_tls.py do the same with real clients over loopback.
"""

from __future__ import annotations

import logging
import os
import shutil
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from gateway import certs
from gateway.cli import main as cli_main
from gateway.config_types import ListenerConfig
from gateway.frontends import tls
from gateway.frontends.tls import RELOAD_CHECK_INTERVAL, ReloadingContext, TLSSetupError


def handshake(server_context: ssl.SSLContext, client_context: ssl.SSLContext) -> ssl.SSLObject:
    """The client's side of a completed in-memory handshake; raises the first side's SSLError."""
    client_in, client_out, server_in, server_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_context.wrap_bio(client_in, client_out, server_hostname="localhost")
    server = server_context.wrap_bio(server_in, server_out, server_side=True)
    done = {"client": False, "server": False}
    for _ in range(20):
        for name, side in (("client", client), ("server", server)):
            if not done[name]:
                try:
                    side.do_handshake()
                    done[name] = True
                except ssl.SSLWantReadError:
                    pass
        server_in.write(client_out.read())
        client_in.write(server_out.read())
        if all(done.values()):
            # TLS 1.3 verifies the client's certificate after the client thinks it is done: read once more.
            try:
                server.read(1)
            except ssl.SSLWantReadError:
                pass
            return client
    raise AssertionError("handshake did not finish")


def served_serial(client: ssl.SSLObject) -> int:
    der = client.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    certs.generate(directory, clients=["device-1"])
    other = directory / "other"
    certs.generate(other, clients=["device-1"])  # a second CA, same client name
    return directory


def client_context(pki: Path, *, client: Path | None = None, maximum: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if client is not None:
        context.load_cert_chain(client / "client-device-1.pem", client / "client-device-1-key.pem")
    if maximum is not None:
        context.maximum_version = maximum
    return context


def listener(directory: Path, **settings: object) -> ListenerConfig:
    files = {"cert_file": str(directory / "server.pem"), "key_file": str(directory / "server-key.pem")}
    return ListenerConfig(name="server.tcp.tls", addr="127.0.0.1:0", host="127.0.0.1", port=0, **{**files, **settings})  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- versions, ciphers, client certificates ------------------------------------------------------


def test_min_version_tls13_refuses_a_tls12_client(pki: Path) -> None:
    server = ReloadingContext(listener(pki, min_version="tls1.3")).context
    with pytest.raises(ssl.SSLError):
        handshake(server, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert handshake(server, client_context(pki)).version() == "TLSv1.3"


def test_default_min_version_serves_tls12(pki: Path) -> None:
    server = ReloadingContext(listener(pki)).context
    assert handshake(server, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2)).version() == "TLSv1.2"


def test_cipher_suites_choose_the_tls12_cipher(pki: Path) -> None:
    server = ReloadingContext(listener(pki, cipher_suites="ECDHE-ECDSA-CHACHA20-POLY1305")).context
    client = handshake(server, client_context(pki, maximum=ssl.TLSVersion.TLSv1_2))
    assert client.cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"


@pytest.mark.parametrize("who", ["no certificate", "another CA's certificate"])
def test_require_refuses_clients_without_a_certificate_of_its_ca(pki: Path, who: str) -> None:
    server = ReloadingContext(listener(pki, ca_file=str(pki / "ca.pem"), client_auth="require")).context
    assert handshake(server, client_context(pki, client=pki)).getpeercert() is not None
    rejected = client_context(pki, client=pki / "other" if who != "no certificate" else None)
    with pytest.raises(ssl.SSLError):
        handshake(server, rejected)


def test_request_lets_a_client_without_a_certificate_in(pki: Path) -> None:
    server = ReloadingContext(listener(pki, ca_file=str(pki / "ca.pem"), client_auth="request")).context
    handshake(server, client_context(pki))
    with pytest.raises(ssl.SSLError):
        handshake(server, client_context(pki, client=pki / "other"))


def test_unloadable_files_are_a_setup_error_naming_the_listener(tmp_path: Path) -> None:
    (tmp_path / "server.pem").write_text("-----BEGIN PLACEHOLDER-----\n")
    (tmp_path / "server-key.pem").write_text("-----BEGIN PLACEHOLDER-----\n")
    with pytest.raises(TLSSetupError, match="^server.tcp.tls: cannot load"):
        ReloadingContext(listener(tmp_path))


# -- reload -----------------------------------------------------------------------------------------


def test_changed_files_serve_the_next_connection_checked_at_most_once_a_second(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(pki / name, tmp_path / name)
    clock = Clock()
    reloading = ReloadingContext(listener(tmp_path), clock=clock)
    first = served_serial(handshake(reloading.context, client_context(pki)))

    ca = certs.load(pki / "ca.pem", pki / "ca-key.pem")
    replacement = certs.make_server(ca)
    certs.write_issued(tmp_path, "server", replacement)
    clock.now += RELOAD_CHECK_INTERVAL / 2
    assert served_serial(handshake(reloading.context, client_context(pki))) == first
    clock.now += RELOAD_CHECK_INTERVAL
    with caplog.at_level(logging.INFO, logger="polygate.tls"):
        assert served_serial(handshake(reloading.context, client_context(pki))) == replacement.certificate.serial_number
    assert "server.tcp.tls: certificate files changed" in caplog.text


def test_a_broken_replacement_keeps_the_old_certificate_and_is_logged_once(
    pki: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("server.pem", "server-key.pem"):
        shutil.copy(pki / name, tmp_path / name)
    clock = Clock()
    reloading = ReloadingContext(listener(tmp_path), clock=clock)
    first = served_serial(handshake(reloading.context, client_context(pki)))
    # Half of a replacement: a new certificate beside the old key.
    ca = certs.load(pki / "ca.pem", pki / "ca-key.pem")
    replacement = certs.make_server(ca)
    certs.write_pem(tmp_path / "server.pem", replacement.cert_pem, private=False)
    with caplog.at_level(logging.INFO, logger="polygate.tls"):
        for _ in range(3):
            clock.now += RELOAD_CHECK_INTERVAL
            assert served_serial(handshake(reloading.context, client_context(pki))) == first
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "keep the previous ones" in errors[0].getMessage()
    # The other half arrives: the next connection gets the new certificate.
    certs.write_pem(tmp_path / "server-key.pem", replacement.key_pem(), private=True)
    clock.now += RELOAD_CHECK_INTERVAL
    assert served_serial(handshake(reloading.context, client_context(pki))) == replacement.certificate.serial_number


def test_a_changed_ca_file_decides_the_next_client(pki: Path, tmp_path: Path) -> None:
    shutil.copy(pki / "ca.pem", tmp_path / "clients.pem")
    clock = Clock()
    server = ReloadingContext(listener(pki, ca_file=str(tmp_path / "clients.pem"), client_auth="require"), clock=clock).context
    handshake(server, client_context(pki, client=pki))
    shutil.copy(pki / "other" / "ca.pem", tmp_path / "clients.pem")
    clock.now += RELOAD_CHECK_INTERVAL
    handshake(server, client_context(pki, client=pki / "other"))
    with pytest.raises(ssl.SSLError):
        handshake(server, client_context(pki, client=pki))


# -- self-signed --------------------------------------------------------------------------------------


def test_self_signed_serves_its_own_certificate_and_logs_the_fingerprint(caplog: pytest.LogCaptureFixture) -> None:
    config = ListenerConfig(name="server.http.tls", addr="127.0.0.1:0", host="127.0.0.1", port=0, self_signed=True)
    with caplog.at_level(logging.INFO, logger="polygate.tls"):
        server = tls.server_ssl_context(config)
    client = ssl.create_default_context()
    client.check_hostname, client.verify_mode = False, ssl.CERT_NONE
    der = handshake(server, client).getpeercert(binary_form=True)
    assert der is not None
    certificate = x509.load_der_x509_certificate(der)
    assert certs.fingerprint_sha256(certificate) in caplog.text
    assert "server.http.tls" in caplog.text
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)


# -- gen-cert -------------------------------------------------------------------------------------------


def test_gen_cert_writes_a_ca_server_and_clients(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "pki"
    assert cli_main(["gen-cert", "--out", str(out), "--host", "gw.example", "--host", "10.0.0.5", "--client", "dev1"]) == 0
    expected = {"ca.pem", "ca-key.pem", "server.pem", "server-key.pem", "client-dev1.pem", "client-dev1-key.pem"}
    assert {p.name for p in out.iterdir()} == expected
    assert {Path(line).name for line in capsys.readouterr().out.split()} == expected
    for name in expected:
        mode = stat.S_IMODE(os.stat(out / name).st_mode)
        assert (mode == 0o600) if name.endswith("-key.pem") else not mode & 0o022, (name, oct(mode))
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["gw.example"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["10.0.0.5"]
    client = x509.load_pem_x509_certificate((out / "client-dev1.pem").read_bytes())
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1"
    ca = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    client.verify_directly_issued_by(ca)
    server.verify_directly_issued_by(ca)


def test_gen_cert_defaults_and_reuses_the_ca(tmp_path: Path) -> None:
    assert cli_main(["gen-cert", "--out", str(tmp_path)]) == 0
    ca_before = (tmp_path / "ca.pem").read_bytes()
    server = x509.load_pem_x509_certificate((tmp_path / "server.pem").read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cli_main(["gen-cert", "--out", str(tmp_path), "--client", "later"]) == 0
    assert (tmp_path / "ca.pem").read_bytes() == ca_before
    ca = x509.load_pem_x509_certificate(ca_before)
    x509.load_pem_x509_certificate((tmp_path / "client-later.pem").read_bytes()).verify_directly_issued_by(ca)


@pytest.mark.parametrize("name", ["../evil", "a/b", ".hidden", ""])
def test_gen_cert_refuses_a_client_name_that_is_no_file_name(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["gen-cert", "--out", str(tmp_path / "pki"), "--client", name]) == 1
    assert "client name" in capsys.readouterr().err
    assert not (tmp_path / "pki").exists()
