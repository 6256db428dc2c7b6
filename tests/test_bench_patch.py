"""`positronic bench patch` at tiny sizes: every case runs against a real authority (a process
on loopback, or the engine in this process) and the JSON has the fields the issue names."""

from __future__ import annotations

import json

import pytest

from positronic.bench.cli import add_arguments, run
from positronic.bench.patch import Shape, Ticks, plan_cases, summarize

TINY = ["--layers", "2", "--kv-heads", "2", "--head-dim", "8", "--dtype", "float32"]


def parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["patch", *argv])


@pytest.mark.parametrize("transport", ["engine", "grpc"])
def test_bench_patch_writes_every_case(tmp_path, transport):
    out = tmp_path / "patch.json"
    args = parse("--rows", "12,20", "--patches", "12", "--warmup", "2", "--transport", transport,
                 "--durability", "fsync,none", "--json", str(out), "--follower", *TINY)  # fmt: skip
    assert run(args) == 0
    doc = json.loads(out.read_text())
    cases = doc["cases"]
    assert {(c["rows"], c["edit"], c["fsync"]) for c in cases} == {
        (r, e, f) for r in (12, 20) for e in ("append", "merge", "evict") for f in (True, False)
    }
    for c in cases:
        assert 0 < c["p50_ms"] <= c["p99_ms"] <= c["max_ms"]
        assert c["patches"] == 12 and c["durable"] == c["fsync"]
        assert c["durability"] == ("fsync" if c["fsync"] else "none")
    assert doc["shape"]["layers"] == 2 and doc["transport"] == transport and doc["follower"]


@pytest.mark.parametrize("edit", ["append", "merge", "evict"])
def test_ticks_keep_the_rows_constant(edit):
    ticks = Ticks(Shape(2, 2, 8, "float32", 50), 10, edit)
    ticks.prime_ops()
    start = len(ticks.tokens)
    for i in range(5):
        ops = ticks.tick_ops(i)
        kinds = [op.WhichOneof("op") for op in ops]
        want = {"append": [], "merge": ["replace_pair"], "evict": ["evict"]}[edit]
        assert kinds == ["set_brightness", *want, "append"]
        ticks.reset_ops()
        assert len(ticks.tokens) == start


def test_bad_cases_are_refused():
    with pytest.raises(ValueError):
        plan_cases(parse("--edits", "squash"))
    with pytest.raises(ValueError):
        plan_cases(parse("--durability", "maybe"))
    with pytest.raises(ValueError):
        plan_cases(parse("--rows", "4"))


def test_summary_reports_first_and_last_thousand():
    s = summarize([1.0] * 1000 + [2.0] * 1000)
    assert (s["p50_ms_first_1000"], s["p50_ms_last_1000"]) == (1.0, 2.0)
    assert s["p50_ms_by_tenth"] == [1.0] * 5 + [2.0] * 5
    assert "p50_ms_first_1000" not in summarize([1.0] * 30)
