"""Certificates made by the tests (the `cryptography` package): a CA, a server certificate for
localhost / 127.0.0.1, a client certificate, and a stranger CA nobody trusts."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(cn: str = "positronic test CA") -> tuple[Pem, object, x509.Certificate]:
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def issue(ca_key, ca_cert: x509.Certificate, cn: str, hosts: tuple[str, ...] = ()) -> Pem:
    """A leaf certificate valid for TLS servers and clients, with `hosts` as SANs."""
    key = _key()
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


@dataclass(frozen=True)
class Certs:
    """PEM files under one folder: ca.pem, server.{pem,key}, client.{pem,key}, and a stranger's
    client certificate (stranger.{pem,key}) signed by a CA the servers do not trust."""

    folder: Path
    ca: bytes
    server: Pem
    client: Pem
    stranger: Pem

    def path(self, name: str) -> str:
        return str(self.folder / name)


def make_certs(folder: Path) -> Certs:
    ca_pem, ca_key, ca_cert = make_ca()
    server = issue(ca_key, ca_cert, "positronic server", ("localhost", "127.0.0.1", "authority"))
    client = issue(ca_key, ca_cert, "positronic client")
    _, other_key, other_cert = make_ca("stranger CA")
    stranger = issue(other_key, other_cert, "stranger")
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "ca.pem": ca_pem.cert,
        "server.pem": server.cert,
        "server.key": server.key,
        "client.pem": client.cert,
        "client.key": client.key,
        "stranger.pem": stranger.cert,
        "stranger.key": stranger.key,
    }
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return Certs(folder, ca_pem.cert, server, client, stranger)
