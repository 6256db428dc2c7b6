"""TLS material for servers and clients: PEM files read once at start-up, turned into gRPC
credentials.

Server: a certificate chain and its key; with a client CA, mutual TLS (a client without a
certificate signed by that CA is refused during the handshake). Client: the CA that signed the
server's certificate (none: the system's roots), and for mutual TLS its own certificate and key.
The bearer token (`--auth-token-file`) rides on top; over TLS it is the production setup.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


def read_pem(path: str, what: str) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    if b"-----BEGIN" not in data:
        raise ValueError(f"{what} {path} is not a PEM file")
    return data


@dataclass(frozen=True, repr=False)  # repr=False: never print a private key
class ServerTls:
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None = None  # set: mutual TLS, clients must present a certificate

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.private_key, self.cert_chain)],
            root_certificates=self.client_ca,
            require_client_auth=self.client_ca is not None,
        )

    @classmethod
    def from_files(cls, cert: str, key: str, client_ca: str | None = None) -> ServerTls:
        return cls(
            read_pem(cert, "TLS certificate"),
            read_pem(key, "TLS key"),
            read_pem(client_ca, "TLS client CA") if client_ca else None,
        )

    def __repr__(self) -> str:
        return f"ServerTls(mutual={self.client_ca is not None})"


@dataclass(frozen=True, repr=False)
class ClientTls:
    ca: bytes | None = None  # None: the system's root certificates
    cert_chain: bytes | None = None  # with private_key: mutual TLS
    private_key: bytes | None = None
    server_name: str | None = None  # name to check the server's certificate against

    def __post_init__(self) -> None:
        if (self.cert_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its key, and a key its certificate")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca,
            private_key=self.private_key,
            certificate_chain=self.cert_chain,
        )

    @classmethod
    def from_files(
        cls,
        ca: str | None,
        cert: str | None = None,
        key: str | None = None,
        server_name: str | None = None,
    ) -> ClientTls:
        return cls(
            read_pem(ca, "TLS CA") if ca else None,
            read_pem(cert, "TLS certificate") if cert else None,
            read_pem(key, "TLS key") if key else None,
            server_name or None,
        )

    def __repr__(self) -> str:
        return f"ClientTls(mutual={self.cert_chain is not None}, server_name={self.server_name})"
