"""Development certificates: a CA, server and client certificates, and a listener's throwaway self-signed one.

Behind `polygate gen-cert` and `self_signed: true`. Keys are ECDSA P-256: small,
fast to make, and accepted by every client library the gateway is tested with.
Nothing here is meant for production PKI: certificates are long-lived and
nothing is revoked.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

#: What `gen-cert` puts in the server certificate when no --host is given.
DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1")
CA_DAYS = 3650
LEAF_DAYS = 825
#: A peer whose clock is a little behind still accepts a certificate made just now.
_CLOCK_SKEW = datetime.timedelta(minutes=5)
_FILE_SAFE = re.compile(r"[A-Za-z0-9_@-][A-Za-z0-9._@-]{0,127}", re.ASCII)


@dataclass(frozen=True, slots=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def key_pem(self, password: bytes | None = None) -> bytes:
        encryption: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
        )
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)


def fingerprint_sha256(certificate: x509.Certificate) -> str:
    """"AB:CD:..." as `openssl x509 -fingerprint -sha256` prints it, so operators can compare."""
    return certificate.fingerprint(hashes.SHA256()).hex(":").upper()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _builder(subject: str, issuer: x509.Name, key: ec.EllipticCurvePrivateKey, days: int) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def make_ca(common_name: str = "Polygate development CA", *, days: int = CA_DAYS) -> Issued:
    key = _new_key()
    certificate = (
        _builder(common_name, _name(common_name), key, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Issued(certificate, key)


def _leaf(
    common_name: str, issuer: Issued | None, *, hosts: Sequence[str], usage: x509.ObjectIdentifier, days: int
) -> Issued:
    """A certificate for one end of a connection; `issuer` None signs it with its own key."""
    key = _new_key()
    issuer_name = issuer.certificate.subject if issuer else _name(common_name)
    builder = (
        _builder(common_name, issuer_name, key, days)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def make_server(ca: Issued, hosts: Sequence[str] = DEFAULT_HOSTS, *, days: int = LEAF_DAYS) -> Issued:
    """A server certificate whose SANs are `hosts` (IP addresses or DNS names); CN is the first."""
    return _leaf(hosts[0] if hosts else "localhost", ca, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=days)


def make_client(ca: Issued, common_name: str, *, days: int = LEAF_DAYS) -> Issued:
    return _leaf(common_name, ca, hosts=(), usage=ExtendedKeyUsageOID.CLIENT_AUTH, days=days)


def make_self_signed(hosts: Sequence[str], *, days: int = LEAF_DAYS) -> Issued:
    """A server certificate that is its own issuer, for `self_signed: true`."""
    return _leaf(hosts[0] if hosts else "localhost", None, hosts=hosts, usage=ExtendedKeyUsageOID.SERVER_AUTH, days=days)


def write_pem(path: Path, data: bytes, *, private: bool) -> None:
    """Write `data`; a private key is 0600 from its first byte, never readable by others even briefly."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o600 if private else 0o644)
    try:
        if private:
            os.fchmod(fd, 0o600)  # the file may have existed with wider rights
        os.write(fd, data)
    finally:
        os.close(fd)


def load(cert_path: Path, key_path: Path) -> Issued:
    certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: not an EC key written by gen-cert")
    return Issued(certificate, key)


def write_issued(directory: Path, stem: str, issued: Issued) -> list[Path]:
    cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}-key.pem"
    write_pem(cert_path, issued.cert_pem, private=False)
    write_pem(key_path, issued.key_pem(), private=True)
    return [cert_path, key_path]


def generate(directory: Path, hosts: Sequence[str] = DEFAULT_HOSTS, clients: Sequence[str] = ()) -> list[Path]:
    """`gen-cert`: the CA (kept when DIR already has one, so later client certificates share it),
    a server certificate and one client certificate per name. Returns the files written."""
    for name in clients:
        if not _FILE_SAFE.fullmatch(name):
            # NAME becomes part of a file name: no "/" or "..", so it cannot write outside DIR.
            raise ValueError(f"client name {name!r}: use letters, digits and . _ @ - (not starting with .)")
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = directory / "ca.pem", directory / "ca-key.pem"
    written: list[Path] = []
    if ca_cert.exists() and ca_key.exists():
        ca = load(ca_cert, ca_key)
    else:
        ca = make_ca()
        written += write_issued(directory, "ca", ca)
    written += write_issued(directory, "server", make_server(ca, hosts or DEFAULT_HOSTS))
    for name in clients:
        written += write_issued(directory, f"client-{name}", make_client(ca, name))
    return written
