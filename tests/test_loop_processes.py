"""The loop across real processes: split equals embedded byte for byte; a worker killed in the
middle of a generation is restarted, resyncs, and the generation completes unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from positronic.clients import Endpoints
from positronic.loop import LoopConfig, run_loop
from positronic.policies import make_policy
from tests.conftest import REPO
from tests.loop_fixtures import authority_process, env, free_port, worker_process

ARGS = [
    "--prompt",
    "Once upon a time",
    "--max-new-tokens",
    "120",
    "--target-size",
    "24",
    "--seed",
    "3",
    "--policy",
    "halo",
]


def generate_cli(model, *extra: str, stats=None) -> str:
    cmd = [sys.executable, "-m", "positronic.cli", "generate", "--model", str(model), *ARGS, *extra]
    if stats is not None:
        cmd += ["--stats-json", str(stats)]
    r = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


def test_split_processes_print_byte_identical_text(stories260k_dir, tmp_path):
    embedded = generate_cli(stories260k_dir, stats=tmp_path / "embedded.json")
    authority = authority_process(tmp_path / "data")
    try:
        worker = worker_process(stories260k_dir, authority.address)
        try:
            split = generate_cli(
                stories260k_dir,
                "--authority",
                authority.address,
                "--worker",
                worker.address,
                stats=tmp_path / "split.json",
            )
        finally:
            worker.stop()
    finally:
        authority.stop()
    assert len(embedded.split()) > 20
    assert split == embedded
    a = json.loads((tmp_path / "embedded.json").read_text())
    b = json.loads((tmp_path / "split.json").read_text())
    for key in (
        "tokens_generated",
        "iterations",
        "mutating_rpcs",
        "merges",
        "evictions",
        "final_version",
        "max_rows",
    ):
        assert a[key] == b[key], key
    assert a["mutating_rpcs"] == a["iterations"] + 1


def test_worker_killed_mid_generation_restarts_and_generation_completes(stories260k_dir):
    authority = authority_process()
    port = free_port()
    worker = worker_process(stories260k_dir, authority.address, port=port)
    address = f"127.0.0.1:{port}"

    def run(progress=None):
        endpoints = Endpoints.connect(authority.address, address)
        config = LoopConfig(
            policy=make_policy("halo-lm"),
            target_rows=24,
            max_new_tokens=80,
            seed=5,
            retry_timeout_s=120.0,
        )
        try:
            return run_loop(endpoints, "Once upon a time", config, progress or (lambda t: None))
        finally:
            endpoints.close()

    try:
        reference = run()  # uninterrupted
        seen = threading.Event()
        count = {"n": 0}

        def progress(text):
            count["n"] += 1
            if count["n"] == 20:
                seen.set()

        result = {}
        t = threading.Thread(target=lambda: result.update(stats=run(progress)))
        t.start()
        assert seen.wait(120)
        worker.kill()  # SIGKILL in the middle of the generation
        time.sleep(1.0)
        worker = worker_process(stories260k_dir, authority.address, port=port)
        t.join(300)
        assert not t.is_alive()
        stats = result["stats"]
        assert stats.iterations == 80 and stats.consistent
        assert stats.token_ids == reference.token_ids  # same stream as the uninterrupted run
    finally:
        worker.stop()
        authority.stop()
