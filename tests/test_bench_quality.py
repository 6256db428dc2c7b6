"""`positronic bench quality` end to end on a tiny run: the JSON people and machines read."""

from __future__ import annotations

import json

import pytest

from positronic.bench.specs import parse_spec, parse_specs
from positronic.cli import main


def test_policy_specs():
    user = parse_spec("halo-user")
    assert user.reduction == "last"
    p = user.make()
    assert (p.params.seed, p.params.decay, p.params.gain, p.params.max) == (255, 2, 10, 255)
    assert p.sinks == 0
    halo = parse_spec("halo").make()  # the default: the search's best K/V merge
    assert (halo.params.decay, halo.params.gain, halo.sinks) == (2, 30, 0)
    old = parse_spec("halo-lm").make()  # the previous default
    assert (old.params.decay, old.params.gain, old.sinks) == (2, 0, 4)
    tuned = parse_spec("halo-user:decay=0.5:window=4:reduction=mean")
    assert tuned.make().params.decay == 0.5 and tuned.make().params.gain == 10
    assert tuned.make().recent_window == 4 and tuned.reduction == "mean"
    assert parse_spec("streaming:sinks=2").make().sinks == 2
    bad_specs = ("nope", "halo:colour=1", "tova:decay=1", "halo:reduction=median", "tova:sinks=2")
    for bad in (*bad_specs, "halo:decay=-1"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    with pytest.raises(ValueError):
        parse_specs("tova,tova")


def test_halo_sinks_are_never_compacted():
    import torch

    halo = parse_spec("halo:sinks=3:window=2").make()
    scores = torch.tensor([255.0, 1.0, 2.0, 3.0, 50.0, 60.0, 70.0, 255.0])  # oldest dimmest
    structural = torch.zeros(8, dtype=torch.bool)
    structural[0] = True
    assert halo.plan(scores, structural, excess=1).merges == [3]  # (1, 2) would be dimmer
    assert parse_spec("halo:sinks=0:window=2").make().plan(scores, structural, 1).merges == [1]


def test_tiny_quality_run_writes_the_documented_json(
    tmp_path, stories260k_dir, tinystories_path, capsys
):
    out, png, npz = tmp_path / "q.json", tmp_path / "q.png", tmp_path / "q.npz"
    argv = ["--log-level", "WARNING", "bench", "quality", "--model", str(stories260k_dir)]
    argv += ["--text-file", str(tinystories_path), "--budget", "16", "--streams", "2"]
    argv += ["--stream-tokens", "40", "--policies", "halo-lm,streaming", "--processes", "1"]
    argv += ["--json", str(out), "--plot", str(png), "--nll-file", str(npz)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["budget"] == 16
    assert doc["reference"]["perplexity"] > 1.0
    assert doc["reference"]["scored_tokens"] == 2 * 38
    assert doc["reference"]["full_cache"]["fits"] is True
    assert set(doc["policies"]) == {"halo-lm", "streaming"}
    for p in doc["policies"].values():
        assert p["perplexity"] > 1.0
        lo, hi = p["ratio_ci95"]
        assert lo <= p["ratio"] <= hi
        assert p["max_rows"] <= 16 and p["consistent"]
    halo, streaming = doc["policies"]["halo-lm"], doc["policies"]["streaming"]
    assert halo["merges"] > 0 and streaming["evictions"] > 0 and streaming["merges"] == 0
    assert halo["vs_best_eviction"]["baseline"] == "streaming"
    # Long-range recall and the gap closed, as docs/benchmarks.md documents them.
    far = doc["reference"]["far_recall_tokens"]
    assert far > 0 and doc["reference"]["far_recall_tokens_in_full_cache_part"] == far
    for p in (halo, streaming):
        assert p["far_recall"]["tokens"] == far and p["far_recall"]["perplexity"] > 1.0
    lo, hi = halo["gap_closed"]["ci95"]
    assert lo <= halo["gap_closed"]["value"] <= hi
    fr = halo["far_recall"]
    lo, hi = fr["vs_best_eviction"]["ratio_ci95"]
    assert lo <= fr["vs_best_eviction"]["ratio"] <= hi
    assert set(fr["gap_closed"]) == {"value", "ci95"}
    assert "gap_closed" not in streaming and "vs_best_eviction" not in streaming["far_recall"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "sliding window (reference)" in printed and "halo-lm" in printed


def test_a_budget_the_protected_rows_fill_is_refused_before_anything_runs(
    tmp_path, stories260k_dir, tinystories_path, capsys
):
    """`bench quality` refuses up front (exit 2) what the loop would refuse, instead of failing
    inside a worker process: here a budget that halo-lm's 4 sinks, 8 recent rows and BOS fill."""
    out = tmp_path / "q.json"
    argv = ["--log-level", "WARNING", "bench", "quality", "--model", str(stories260k_dir)]
    argv += ["--text-file", str(tinystories_path), "--budget", "12", "--streams", "1"]
    argv += ["--stream-tokens", "20", "--policies", "streaming,halo-lm", "--json", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "halo-lm: policy halo-lm protects 13 rows" in err
    assert not out.exists()
