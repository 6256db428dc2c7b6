"""`positronic worker` as a real process: address on the first stdout line, health, reflection;
killed and restarted, it resyncs from the authority and returns identical results."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import grpc
import pytest
from worker_fixtures import At, append_step, health_status, prime_session, reflected_services

from cache_authority.server import AuthorityConfig, start_authority
from positronic.rpc import open_channel
from positronic.v1 import cache_authority_pb2, cache_authority_pb2_grpc, model_worker_pb2_grpc
from positronic.v1 import model_worker_pb2 as pb
from tests.conftest import REPO

pytestmark = pytest.mark.timeout(240)


class WorkerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("POSITRONIC_")}
        environ["PYTHONPATH"] = f"{REPO}{os.pathsep}{environ.get('PYTHONPATH', '')}"
        environ.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "positronic.cli", "worker", *args],
            cwd=REPO,
            env=environ,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        self.first_line = self.proc.stdout.readline().strip()
        if not self.first_line:
            self.proc.kill()
            raise AssertionError(f"no address: {self.proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]

    def stub(self):
        self.channel = open_channel(self.first_line)
        return model_worker_pb2_grpc.ModelWorkerStub(self.channel)

    def signal(self, sig: int) -> int:
        self.channel.close()
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=30)


def _results(worker, at: At, token: int, pair_tokens: list[int]):
    step = worker.Step(
        pb.StepRequest(
            **at.names(),
            input_token_id=token,
            sampling=pb.SamplingParams(temperature=0.9, top_k=40, top_p=0.95, seed=11),
            top_logprobs=5,
            return_logits=True,
            attention_reduction=pb.ATTENTION_REDUCTION_MEAN_LAYERS,
        )
    )
    step.forward_ns = 0  # timing is the one field allowed to differ
    kv = worker.ComputeKV(
        pb.ComputeKVRequest(**at.names(), insertions=[pb.Insertion(position=4, token_id=token)])
    )
    repair = worker.Repair(
        pb.RepairRequest(
            **at.names(),
            pairs=[pb.PairRef(position=6, expected_token_ids=pair_tokens)],
        )
    )
    return step, kv, repair


def test_killed_worker_restarts_resyncs_and_answers_identically(stories260k_dir):
    authority = start_authority(AuthorityConfig(listen="127.0.0.1:0"))
    address = f"127.0.0.1:{authority.port}"
    channel = open_channel(address)
    try:
        auth = cache_authority_pb2_grpc.CacheAuthorityStub(channel)
        first = WorkerProcess(
            ["--model", str(stories260k_dir), "--listen", "127.0.0.1:0", "--authority", address]
        )
        assert re.fullmatch(r"127\.0\.0\.1:\d+", first.first_line)
        assert health_status(first.first_line) == "SERVING"
        assert "positronic.v1.ModelWorker" in reflected_services(first.first_line)
        worker = first.stub()
        prompt = pb.TokenizeRequest(text="Once upon a time, a", add_bos=True)
        ids = list(worker.Tokenize(prompt).ids)
        geometry = worker.Info(pb.InfoRequest()).geometry
        at = prime_session(auth, worker, geometry, ids[:-1])
        token = ids[-1]
        for _ in range(3):  # generate a little, committing each step as the loop does
            step = worker.Step(pb.StepRequest(**at.names(), input_token_id=token))
            at = append_step(auth, "s", at, token, step)
            token = step.next_token_id
        rows = auth.GetSession(cache_authority_pb2.GetSessionRequest(session_id="s")).mirror
        pair = [rows[6].token_id, rows[7].token_id]
        before = _results(worker, at, token, pair)
        assert first.signal(signal.SIGKILL) == -signal.SIGKILL

        second = WorkerProcess(  # configured from the environment this time
            [],
            env={
                "POSITRONIC_MODEL": str(stories260k_dir),
                "POSITRONIC_LISTEN": "127.0.0.1:0",
                "POSITRONIC_AUTHORITY": address,
            },
        )
        worker = second.stub()
        after = _results(worker, at, token, pair)
        for a, b in zip(before, after, strict=True):
            assert a.SerializeToString(deterministic=True) == b.SerializeToString(
                deterministic=True
            )
        with pytest.raises(grpc.RpcError) as e:  # and it still refuses what it cannot reach
            ahead = {**at.names(), "version": at.version + 1}
            worker.Step(pb.StepRequest(**ahead, input_token_id=3))
        assert e.value.code() == grpc.StatusCode.ABORTED
        assert second.signal(signal.SIGTERM) == 0  # graceful stop
    finally:
        channel.close()
        authority.stop(0)


def test_missing_flags_exit_with_a_message():
    proc = subprocess.run(
        [sys.executable, "-m", "positronic.cli", "worker", "--model", "x"],
        cwd=REPO,
        env={
            **{k: v for k, v in os.environ.items() if not k.startswith("POSITRONIC_")},
            "PYTHONPATH": str(REPO),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "--authority" in proc.stderr and proc.stdout == ""
