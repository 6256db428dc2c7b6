"""Command-line flags and their POSITRONIC_* environment variables, merged one way everywhere:
a flag given on the command line wins, then a non-empty environment variable, then the default.

The TLS flags of every command that serves or calls a service are declared and read here.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping

from positronic.tls import ClientTls, ServerTls

# flag dest -> environment variable, for the TLS flags
TLS_ENV = {
    "tls_cert": "POSITRONIC_TLS_CERT",
    "tls_key": "POSITRONIC_TLS_KEY",
    "tls_client_ca": "POSITRONIC_TLS_CLIENT_CA",
    "tls_ca": "POSITRONIC_TLS_CA",
    "tls_server_name": "POSITRONIC_TLS_SERVER_NAME",
}


def pick(
    args: argparse.Namespace,
    dest: str,
    env: str,
    environ: Mapping[str, str],
    default: str | None = None,
) -> str | None:
    """The flag if given, else the environment variable if set and non-empty, else default."""
    value = getattr(args, dest, None)
    if value is not None:
        return str(value)
    return environ.get(env) or default


def pick_int(
    args: argparse.Namespace, dest: str, env: str, environ: Mapping[str, str]
) -> int | None:
    value = pick(args, dest, env, environ)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{env} / --{dest.replace('_', '-')} must be an integer") from None


def add_server_tls_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--tls-cert", help="PEM certificate chain to serve TLS with [POSITRONIC_TLS_CERT]")
    a("--tls-key", help="PEM private key of --tls-cert [POSITRONIC_TLS_KEY]")
    a(
        "--tls-client-ca",
        help="PEM CA; clients must present a certificate it signed (mutual TLS) "
        "[POSITRONIC_TLS_CLIENT_CA]",
    )


def add_client_tls_arguments(parser: argparse.ArgumentParser, *, with_cert: bool = True) -> None:
    a = parser.add_argument
    a("--tls-ca", help="PEM CA that signed the servers' certificates: use TLS [POSITRONIC_TLS_CA]")
    if with_cert:
        a("--tls-cert", help="PEM client certificate for mutual TLS [POSITRONIC_TLS_CERT]")
        a("--tls-key", help="PEM key of the client certificate [POSITRONIC_TLS_KEY]")
    a(
        "--tls-server-name",
        help="name the server certificate must carry, when it differs from the address's host "
        "[POSITRONIC_TLS_SERVER_NAME]",
    )


def _tls(args: argparse.Namespace, environ: Mapping[str, str], dest: str) -> str | None:
    return pick(args, dest, TLS_ENV[dest], environ)


def server_tls(args: argparse.Namespace, environ: Mapping[str, str]) -> ServerTls | None:
    """TLS of a server from --tls-cert/--tls-key[/--tls-client-ca]; None when neither is set."""
    cert, key = _tls(args, environ, "tls_cert"), _tls(args, environ, "tls_key")
    client_ca = _tls(args, environ, "tls_client_ca")
    if not cert and not key:
        if client_ca:
            raise ValueError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if not (cert and key):
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return ServerTls.from_files(cert, key, client_ca)


def client_tls(args: argparse.Namespace, environ: Mapping[str, str]) -> ClientTls | None:
    """TLS of a client from --tls-ca (and --tls-cert/--tls-key for mutual TLS); None without
    --tls-ca (a worker's --tls-cert alone is its server certificate)."""
    ca = _tls(args, environ, "tls_ca")
    cert, key = _tls(args, environ, "tls_cert"), _tls(args, environ, "tls_key")
    if not ca:
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs both --tls-cert and --tls-key")
    return ClientTls.from_files(ca, cert, key, _tls(args, environ, "tls_server_name"))


def read_text_file(path: str) -> str:
    """The whole text of a UTF-8 file, exactly: the bytes of the file are the text (no newline
    translation: `\\r\\n` stays two characters). ValueError, naming the file and the first bad
    byte, when it is not UTF-8 or cannot be read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"{path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 1]
        raise ValueError(f"{path}: not UTF-8 (byte {e.start}: {bad!r})") from None
