"""TLS and mutual TLS with certificates made by the test: plaintext and strangers are refused,
the bearer token still applies over TLS, and every command that talks to a service (health,
inspect, the worker's Sync, generate) works over mutual TLS with a token."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from positronic import rpc
from positronic.reachable import ConnectionSetupError, check_channel
from positronic.tls import ClientTls, ServerTls
from positronic.v1 import cache_authority_pb2 as ca
from tests.authority_fixtures import (
    append_pb,
    create_request,
    patch_stream,
    running_authority,
    stub,
)
from tests.conftest import REPO
from tests.loop_fixtures import Service, env
from tests.tls_fixtures import make_certs

C = grpc.StatusCode


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs"))


def _list(channel) -> list[str]:
    reply = stub(channel).ListSessions(ca.ListSessionsRequest(), timeout=10)
    return [s.session_id for s in reply.sessions]


def _refused(channel) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        _list(channel)
    return err.value.code()


def test_tls_serves_tls_clients_and_refuses_plaintext(certs):
    tls = ServerTls(certs.server.cert, certs.server.key)
    with running_authority(tls=tls) as (server, _):
        address = f"localhost:{server.port}"
        secure = rpc.open_channel(address, tls=ClientTls(ca=certs.ca))
        stub(secure).CreateSession(create_request("s"))
        stub(secure).Patch(patch_stream("s", 0, "p", [append_pb(0, [1, 2], 3)]))
        assert _list(secure) == ["s"]
        assert _refused(rpc.open_channel(address)) == C.UNAVAILABLE
        # A client that trusts another CA does not trust this server.
        assert _refused(rpc.open_channel(address, tls=ClientTls(ca=certs.stranger.cert))) in (
            C.UNAVAILABLE,
        )
        by_ip = rpc.open_channel(f"127.0.0.1:{server.port}", tls=ClientTls(ca=certs.ca))
        assert _list(by_ip) == ["s"]  # the certificate names 127.0.0.1 too
        for ch in (secure, by_ip):
            ch.close()


def test_mutual_tls_refuses_a_client_without_a_certificate_or_with_a_strangers(certs):
    tls = ServerTls(certs.server.cert, certs.server.key, client_ca=certs.ca)
    with running_authority(tls=tls) as (server, _):
        address = f"localhost:{server.port}"
        no_cert = rpc.open_channel(address, tls=ClientTls(ca=certs.ca))
        assert _refused(no_cert) == C.UNAVAILABLE
        stranger = rpc.open_channel(
            address,
            tls=ClientTls(
                ca=certs.ca, cert_chain=certs.stranger.cert, private_key=certs.stranger.key
            ),
        )
        assert _refused(stranger) == C.UNAVAILABLE
        good = rpc.open_channel(
            address,
            tls=ClientTls(ca=certs.ca, cert_chain=certs.client.cert, private_key=certs.client.key),
        )
        assert _list(good) == []
        for ch in (no_cert, stranger, good):
            ch.close()


def test_the_bearer_token_still_applies_over_tls(certs):
    tls = ServerTls(certs.server.cert, certs.server.key)
    client_tls = ClientTls(ca=certs.ca)
    with running_authority(tls=tls, auth_token="sesame") as (server, _):
        address = f"localhost:{server.port}"
        assert _refused(rpc.open_channel(address, tls=client_tls)) == C.UNAUTHENTICATED
        assert _refused(rpc.open_channel(address, "wrong", tls=client_tls)) == C.UNAUTHENTICATED
        assert _list(rpc.open_channel(address, "sesame", tls=client_tls)) == []
        health = health_pb2_grpc.HealthStub(rpc.open_channel(address, tls=client_tls))
        assert health.Check(health_pb2.HealthCheckRequest()).status == 1  # open to probes


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "positronic.cli", *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_every_command_works_over_mutual_tls_with_a_token(certs, stories260k_dir, tmp_path):
    token = tmp_path / "token"
    token.write_text("sesame\n")
    server_flags = [
        "--tls-cert", certs.path("server.pem"), "--tls-key", certs.path("server.key"),
        "--tls-client-ca", certs.path("ca.pem"), "--auth-token-file", str(token),
    ]  # fmt: skip
    client_flags = [
        "--tls-ca", certs.path("ca.pem"),
        "--tls-cert", certs.path("client.pem"), "--tls-key", certs.path("client.key"),
    ]  # fmt: skip
    authority = Service(["authority", "--listen", "127.0.0.1:0", *server_flags])
    try:
        worker = Service(
            ["worker", "--model", str(stories260k_dir), "--listen", "127.0.0.1:0",
             "--authority", authority.address, "--device", "cpu", *server_flags,
             "--tls-ca", certs.path("ca.pem")],
            timeout_s=120,
        )  # fmt: skip
        try:
            for address in (authority.address, worker.address):
                ok = _cli("health", "--address", address, *client_flags)
                assert ok.returncode == 0 and "SERVING" in ok.stdout, ok.stdout + ok.stderr
                plain = _cli("health", "--address", address)
                assert plain.returncode == 1
            generated = _cli(
                "generate", "--model", str(stories260k_dir), "--prompt", "Once upon a time",
                "--max-new-tokens", "12", "--target-size", "24", "--seed", "1",
                "--authority", authority.address, "--worker", worker.address,
                "--auth-token-file", str(token), *client_flags,
            )  # fmt: skip
            assert generated.returncode == 0, generated.stderr[-3000:]
            assert generated.stdout.strip()
            listed = _cli(
                "inspect", "--authority", authority.address, "--auth-token-file", str(token),
                *client_flags,
            )  # fmt: skip
            assert listed.returncode == 0 and "version 13" in listed.stdout, listed.stdout
            without_cert = _cli(
                "inspect", "--authority", authority.address, "--auth-token-file", str(token),
                "--tls-ca", certs.path("ca.pem"),
            )  # fmt: skip
            assert without_cert.returncode == 1 and "UNAVAILABLE" in without_cert.stdout
        finally:
            worker.stop()
    finally:
        authority.stop()


def test_a_channel_that_never_comes_up_names_tls_as_the_likely_cause(certs):
    """Plaintext against TLS, or no client certificate against mutual TLS: the check says what
    is likely wrong instead of letting retries run for a minute (F4); nothing listening is no
    error (a server still starting is waited for by the callers' retries)."""
    mutual = ServerTls(certs.server.cert, certs.server.key, client_ca=certs.ca)
    with running_authority(tls=mutual) as (server, _):
        address = f"localhost:{server.port}"
        with pytest.raises(ConnectionSetupError, match="requires TLS: give --tls-ca"):
            check_channel(rpc.open_channel(address), address, "the authority", tls=False)
        no_cert = rpc.open_channel(address, tls=ClientTls(ca=certs.ca))
        with pytest.raises(ConnectionSetupError, match="may require a client certificate"):
            check_channel(no_cert, address, "the authority", tls=True, timeout_s=2)
        good = rpc.open_channel(
            address,
            tls=ClientTls(ca=certs.ca, cert_chain=certs.client.cert, private_key=certs.client.key),
        )
        check_channel(good, address, "the authority", tls=True)
    check_channel(rpc.open_channel(address), address, "the authority", tls=False, timeout_s=1)


def test_generate_in_plaintext_against_a_tls_authority_says_it_requires_tls(certs):
    tls = ServerTls(certs.server.cert, certs.server.key)
    with running_authority(tls=tls) as (server, _):
        address = f"127.0.0.1:{server.port}"
        plain = _cli(
            "generate", "--prompt", "Once", "--authority", address, "--worker", address
        )  # fmt: skip
    assert plain.returncode == 1
    assert "the authority at 127.0.0.1" in plain.stderr and "requires TLS" in plain.stderr
    assert "Traceback" not in plain.stderr


def test_health_and_inspect_in_plaintext_against_a_tls_authority_say_it_requires_tls(certs):
    """Not just "UNAVAILABLE"/"Socket closed": the same hint as generate's (F4)."""
    tls = ServerTls(certs.server.cert, certs.server.key)
    with running_authority(tls=tls) as (server, _):
        address = f"127.0.0.1:{server.port}"
        health = _cli("health", "--address", address)
        inspect = _cli("inspect", "--authority", address)
        trusted = _cli(
            "health", "--address", f"localhost:{server.port}", "--tls-ca", certs.path("ca.pem")
        )
    for plain in (health, inspect):
        assert plain.returncode == 1, plain.stdout
        assert "UNAVAILABLE" in plain.stdout and "requires TLS: give --tls-ca" in plain.stdout
        assert "Traceback" not in plain.stderr
    assert trusted.returncode == 0 and "SERVING" in trusted.stdout
    assert "TLS" not in trusted.stdout
