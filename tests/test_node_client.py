"""A second language proves the protos: the Node.js client (clients/node), written from the .proto
files, generates the same text and leaves the session at the same version and digest as the
Python CLI, for `streaming` and `halo`, greedy and seeded, against the same services."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import grpc
import pytest

from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc
from tests.conftest import REPO
from tests.loop_fixtures import authority_process, env, worker_process

CLIENT = REPO / "clients" / "node"
# Short, but long enough past the target that both policies compact many times.
SETTINGS = ["--prompt", "Once upon a time", "--target-size", "24"]
TOKENS = "48"
PIPES = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}


def node_binary() -> str:
    """Node.js and the client's locked dependencies are part of the test, never skipped."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: this test runs the Node.js client (clients/node)")
    if not (CLIENT / "node_modules" / "@grpc" / "grpc-js").is_dir():
        pytest.fail(
            "clients/node/node_modules is missing: run `(cd clients/node && npm ci "
            "--ignore-scripts)` (.ci/run does)"
        )
    return node


@pytest.fixture(scope="module")
def services(stories260k_dir):
    node_binary()
    authority = authority_process()
    try:
        worker = worker_process(stories260k_dir, authority.address)
        try:
            yield authority.address, worker.address
        finally:
            worker.stop()
    finally:
        authority.stop()


def python_cli(authority: str, worker: str, extra: list[str], stats) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "positronic.cli", "generate", *SETTINGS]
    cmd += ["--max-new-tokens", TOKENS, "--authority", authority, "--worker", worker]
    cmd += ["--no-progress", "--stats-json", str(stats), *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=env(), **PIPES)


def node_client(authority: str, worker: str, extra: list[str]) -> subprocess.Popen:
    cmd = [node_binary(), str(CLIENT / "generate.js"), *SETTINGS, "--tokens", TOKENS]
    cmd += ["--authority", authority, "--worker", worker, "--print-digest", *extra]
    return subprocess.Popen(cmd, cwd=REPO, **PIPES)


def finish(proc: subprocess.Popen) -> tuple[str, str]:
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    return out, err


def session_at(authority: str, session_id: str) -> tuple[int, str]:
    with grpc.insecure_channel(authority) as channel:
        stub = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        resp = stub.GetSession(cache_authority_pb2.GetSessionRequest(session_id=session_id))
    return resp.session.version, resp.session.digest.hex()


@pytest.mark.parametrize("policy", ["streaming", "halo"])
@pytest.mark.parametrize(
    "sampling",
    [["--temperature", "0"], ["--temperature", "0.8", "--seed", "7"]],
    ids=["greedy", "seeded"],
)
def test_node_client_matches_python_cli_byte_for_byte(services, policy, sampling, tmp_path):
    authority, worker = services
    extra = ["--policy", policy, *sampling]
    # Both at once (two sessions on the same services; each is deterministic on its own).
    py_proc = python_cli(authority, worker, extra, tmp_path / "stats.json")
    js_proc = node_client(authority, worker, extra)
    js_text, js_err = finish(js_proc)
    py_text, _ = finish(py_proc)
    js = json.loads(js_err.strip().splitlines()[-1])
    py = json.loads((tmp_path / "stats.json").read_text())

    assert js_text == py_text
    assert py_text.startswith("Once upon a time") and len(py_text.split()) > 20
    # Two sessions, one history: the same version and hash-chain digest at the authority.
    assert js["session_id"] != py["session_id"]
    py_version, py_digest = session_at(authority, py["session_id"])
    assert session_at(authority, js["session_id"]) == (py_version, py_digest)
    assert (js["version"], js["digest"]) == (py_version, py_digest)
    assert py["final_version"] == py_version
    assert js["consistent"] and py["consistent"]
    # The budget was exercised: many compactions, of the policy's kind, counted alike.
    assert (js["merges"], js["evictions"]) == (py["merges"], py["evictions"])
    compactions = py["merges"] if policy == "halo" else py["evictions"]
    assert compactions >= 20
    assert py["max_rows"] == js["max_rows"] == 24
