"""`positronic bench quality` end to end on a tiny run: the JSON people and machines read."""

from __future__ import annotations

import json

import pytest

from positronic.bench.specs import parse_spec, parse_specs
from positronic.cli import main


def test_policy_specs():
    user = parse_spec("halo-user")
    assert user.name == "halo" and user.reduction == "last"
    p = user.make()
    assert (p.params.seed, p.params.decay, p.params.gain, p.params.max) == (255, 2, 10, 255)
    tuned = parse_spec("halo:decay=0.5:gain=200:window=4:reduction=mean")
    assert tuned.make().params.decay == 0.5 and tuned.make().recent_window == 4
    assert tuned.reduction == "mean"
    assert parse_spec("streaming:sinks=2").make().sinks == 2
    for bad in ("nope", "halo:colour=1", "tova:decay=1", "halo:reduction=median", "halo:decay=-1"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(ValueError):
        parse_specs("tova,tova")


def test_tiny_quality_run_writes_the_documented_json(
    tmp_path, stories260k_dir, tinystories_path, capsys
):
    out, png, npz = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "q.npz"
    argv = ["--log-level", "WARNING", "bench", "quality", "--model", str(stories260k_dir)]
    argv += ["--text-file", str(tinystories_path), "--budget", "16", "--streams", "2"]
    argv += ["--stream-tokens", "40", "--policies", "halo,streaming", "--processes", "1"]
    argv += ["--json", str(out), "--plot", str(png), "--nll-file", str(npz)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["budget"] == 16
    assert doc["reference"]["perplexity"] > 1.0
    assert doc["reference"]["scored_tokens"] == 2 * 38
    assert doc["reference"]["full_cache"]["fits"] is True
    assert set(doc["policies"]) == {"halo", "streaming"}
    for p in doc["policies"].values():
        assert p["perplexity"] > 1.0
        lo, hi = p["ratio_ci95"]
        assert lo <= p["ratio"] <= hi
        assert p["max_rows"] <= 16 and p["consistent"]
    halo, streaming = doc["policies"]["halo"], doc["policies"]["streaming"]
    assert halo["merges"] > 0 and streaming["evictions"] > 0 and streaming["merges"] == 0
    assert halo["vs_best_eviction"]["baseline"] == "streaming"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "sliding window (reference)" in printed and "halo" in printed
