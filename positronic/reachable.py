"""Tell a client whose channel never comes up why, at once, instead of after a minute of retries.

A plaintext client talking to a TLS server (or a TLS client without the client certificate a
mutual-TLS server asks for, or one talking to a plaintext server) reaches a listening socket, but
the handshake fails, every call ends UNAVAILABLE with "Socket closed", and the callers' retries
go on for their whole deadline (attack report F4). So: wait a few seconds for the channel to be
ready; if it is not while a TCP connection to the address succeeds, something listens there but
will not talk gRPC with these settings, most likely a TLS mismatch: say so. When nothing listens
(a server still starting), say nothing: the callers' retries wait for it as before.
"""

from __future__ import annotations

import socket

import grpc

CONNECT_TIMEOUT_S = 5.0


class ConnectionSetupError(Exception):
    """Something listens at the address, but no gRPC channel comes up with these settings."""


def check_channel(
    channel: grpc.Channel,
    address: str,
    what: str,
    *,
    tls: bool,
    timeout_s: float = CONNECT_TIMEOUT_S,
) -> None:
    """Return once `channel` is ready, or when nothing listens at `address` (yet); raise
    ConnectionSetupError naming the likely cause when a server listens but the channel stays
    down for `timeout_s`."""
    try:
        grpc.channel_ready_future(channel).result(timeout=timeout_s)
        return
    except grpc.FutureTimeoutError:
        pass
    if not listening(address):
        return
    raise ConnectionSetupError(
        f"{what} at {address[:200]} accepts connections, but no gRPC connection came up within "
        f"{timeout_s:g} s; {tls_hint(tls)}"
    )


def tls_hint(tls: bool) -> str:
    """The likely cause when a server listens but no gRPC connection comes up."""
    if tls:
        return (
            "check the TLS flags: the server may not use TLS, may require a client certificate "
            "(--tls-cert, --tls-key), or may not be trusted by --tls-ca"
        )
    return (
        "it most likely requires TLS: give --tls-ca (and --tls-cert, --tls-key when it asks "
        "for a client certificate)"
    )


def unavailable_hint(error: grpc.RpcError, address: str, tls: bool) -> str:
    """For a failed call: the TLS hint when it ended UNAVAILABLE although something listens at
    `address` (a TLS mismatch answers "Socket closed"); "" otherwise."""
    code = error.code() if callable(getattr(error, "code", None)) else None  # type: ignore[attr-defined]
    if code != grpc.StatusCode.UNAVAILABLE or not listening(address):
        return ""
    return f"{address[:200]} accepts connections but the call failed: {tls_hint(tls)}"


def listening(address: str, timeout_s: float = 1.0) -> bool:
    """Whether a TCP connection to a single HOST:PORT succeeds (False for anything else, such
    as several addresses or a dns:/// target: then nothing is claimed)."""
    host, sep, port = address.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or "," in address or "/" in address:
        return False
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return True
    except OSError:
        return False
