"""The demo model ships inside the package: every file of its folder is package data (so a
non-editable install has it), it loads as a real Llama, and it is every command's default."""

from __future__ import annotations

import argparse
import json
import tomllib

from model_worker.main import add_arguments as worker_arguments
from model_worker.main import config_from_args as worker_config
from positronic.bench.cli import add_arguments as bench_arguments
from positronic.models import DEMO_MODEL, demo_model_dir
from tests.conftest import REPO

WHEEL_BUDGET_BYTES = 2 * 1024 * 1024  # the folder is 1.1 MB; a bigger model belongs outside


def test_every_file_of_the_model_folder_is_package_data():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    listed = pyproject["tool"]["setuptools"]["package-data"]["positronic.models"]
    folder = demo_model_dir()
    assert folder == REPO / "positronic" / "models" / DEMO_MODEL
    on_disk = sorted(f"{DEMO_MODEL}/{p.name}" for p in folder.iterdir() if p.is_file())
    assert sorted(listed) == on_disk
    assert {"LICENSE", "README.md", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in folder.iterdir()
    }
    assert sum(p.stat().st_size for p in folder.iterdir()) < WHEEL_BUDGET_BYTES


def test_the_packaged_model_is_the_small_llama_it_says_it_is():
    config = json.loads((demo_model_dir() / "config.json").read_text())
    assert config["model_type"] == "llama" and config["vocab_size"] == 512
    assert "MIT License" in (demo_model_dir() / "LICENSE").read_text()


def test_worker_defaults_to_the_packaged_model():
    parser = argparse.ArgumentParser()
    worker_arguments(parser)
    config = worker_config(parser.parse_args(["--authority", "127.0.0.1:1"]), {})
    assert config.model == str(demo_model_dir())
    from_env = worker_config(parser.parse_args([]), {"POSITRONIC_AUTHORITY": "a:1"})
    assert from_env.model == str(demo_model_dir())
    named = worker_config(
        parser.parse_args(["--model", "TinyLlama/x"]), {"POSITRONIC_AUTHORITY": "a:1"}
    )
    assert named.model == "TinyLlama/x"


def test_bench_quality_defaults_to_the_packaged_model():
    parser = argparse.ArgumentParser()
    bench_arguments(parser)
    args = parser.parse_args(["quality", "--text-file", "t.txt", "--budget", "16"])
    assert args.model == str(demo_model_dir())
