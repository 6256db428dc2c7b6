"""Configuration of `positronic authority`: flags win over POSITRONIC_* variables, and a bad
setting is refused when the config is built, not when it is first used."""

from __future__ import annotations

import argparse

import pytest

from cache_authority.main import add_arguments, config_from_args
from cache_authority.server import AuthorityConfig


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_win_over_the_environment(tmp_path):
    token = tmp_path / "token"
    token.write_text("sesame\n")
    env = {
        "POSITRONIC_LISTEN": "0.0.0.0:9000",
        "POSITRONIC_DATA_DIR": "/from/env",
        "POSITRONIC_AUTH_TOKEN_FILE": str(token),
        "POSITRONIC_METRICS_PORT": "9100",
    }
    from_env = config_from_args(parse(), env)
    assert (from_env.listen, from_env.data_dir, from_env.auth_token, from_env.metrics_port) == (
        "0.0.0.0:9000",
        "/from/env",
        "sesame",
        9100,
    )
    flags = config_from_args(parse("--listen", "127.0.0.1:0", "--data-dir", "/flag"), env)
    assert (flags.listen, flags.data_dir, flags.metrics_port) == ("127.0.0.1:0", "/flag", 9100)
    assert config_from_args(parse(), {}) == AuthorityConfig()


@pytest.mark.parametrize(
    "bad",
    [
        {"listen": "no-port"},
        {"listen": "host:99999"},
        {"metrics_port": -1},
        {"snapshot_every": 0},
        {"log_retention": -3},
        {"engine_threads": 0},
        {"durability": "sometimes"},
        {"fsync_interval_ms": 0},
    ],
)
def test_bad_settings_are_refused_up_front(bad):
    with pytest.raises(ValueError):
        AuthorityConfig(**bad)


def test_durability_comes_from_the_flag_or_the_environment():
    env = {"POSITRONIC_DURABILITY": "batch", "POSITRONIC_FSYNC_INTERVAL_MS": "20"}
    from_env = config_from_args(parse(), env)
    assert (from_env.durability, from_env.fsync_interval_ms) == ("batch", 20)
    flags = config_from_args(parse("--durability", "none"), env)
    assert (flags.durability, flags.fsync_interval_ms) == ("none", 20)
    assert AuthorityConfig().durability == "fsync"  # the safe default
    with pytest.raises(SystemExit):
        parse("--durability", "maybe")
