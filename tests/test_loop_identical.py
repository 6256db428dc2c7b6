"""Embedded and split deployments generate the same bytes, for every kind of compaction (evicting,
merging with the lm repairer, merging in K/V space, the pair-aware lm repairer, selection by the
Tick's adjacent similarity or by tokens represented), greedy and seeded; and the loop's critical
path is one Tick then exactly one mutating call (Patch) per iteration, in both."""

from __future__ import annotations

import pytest

from positronic.clients import Endpoints, MutationCounter
from positronic.embedded import embedded_services
from positronic.loop import LoopConfig, LoopStats, run_loop
from positronic.policies import make_policy
from positronic.rpc import open_channel
from positronic.v1 import cache_authority_pb2_grpc, model_worker_pb2_grpc
from tests.loop_fixtures import authority_process, worker_process

PROMPT = "Once upon a time"
POLICIES = ("streaming", "halo", "halo-kv", "halo-pair", "halo-redundant", "halo-balanced")
# halo-redundant protects 37 rows (4 sinks, a recent window of 32, the new one).
TARGET_ROWS = {"halo-redundant": 40}
SAMPLING = {"greedy": 0.0, "seeded": 0.8}
READ_ONLY_SETUP = {"Info", "Tokenize", "CreateSession", "Prefill", "GetSession"}


@pytest.fixture(scope="module")
def embedded(stories260k_dir):
    with embedded_services(str(stories260k_dir)) as addresses:
        yield addresses.authority, addresses.worker


@pytest.fixture(scope="module")
def split(stories260k_dir):
    authority = authority_process()
    try:
        worker = worker_process(stories260k_dir, authority.address)
        try:
            yield authority.address, worker.address
        finally:
            worker.stop()
    finally:
        authority.stop()


class Sequenced:
    """A stub whose calls append their method name to a shared, ordered list."""

    def __init__(self, stub, calls: list[str]):
        self._stub, self._calls = stub, calls

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        def call(*args, **kw):
            self._calls.append(name)
            return method(*args, **kw)

        return call


def generate(addresses, policy: str, temperature: float) -> tuple[str, LoopStats, list[str], int]:
    """One generation: its text, stats, the ordered calls of both stubs, and the Patch calls a
    test-owned interceptor counted on the wire."""
    authority, worker = addresses
    wire, loop_counter = MutationCounter(), MutationCounter()
    a = open_channel(authority, interceptors=[wire, loop_counter])
    w = open_channel(worker)
    calls: list[str] = []
    endpoints = Endpoints(
        authority=Sequenced(cache_authority_pb2_grpc.CacheAuthorityStub(a), calls),  # type: ignore[arg-type]
        worker=Sequenced(model_worker_pb2_grpc.ModelWorkerStub(w), calls),  # type: ignore[arg-type]
        counter=loop_counter,
        channels=[a, w],
    )
    config = LoopConfig(
        policy=make_policy(policy),
        target_rows=TARGET_ROWS.get(policy, 20),
        max_new_tokens=70,
        seed=5,
        temperature=temperature,
    )
    out: list[str] = []
    try:
        stats = run_loop(endpoints, PROMPT, config, out.append)
    finally:
        endpoints.close()
    return "".join(out), stats, calls, wire.patch_calls


@pytest.mark.parametrize("sampling", sorted(SAMPLING))
@pytest.mark.parametrize("policy", POLICIES)
def test_embedded_and_split_are_byte_identical_with_one_patch_per_iteration(
    embedded, split, policy, sampling
):
    results = {
        name: generate(addresses, policy, SAMPLING[sampling])
        for name, addresses in (("embedded", embedded), ("split", split))
    }
    (text_e, stats_e, _, _), (text_s, stats_s, _, _) = results["embedded"], results["split"]
    assert len(text_e.split()) > 10
    assert text_s.encode() == text_e.encode()
    assert stats_s.token_ids == stats_e.token_ids
    compacted = stats_e.merges if policy != "streaming" else stats_e.evictions
    assert compacted > 0  # the budget was reached: the compaction path ran
    for key in ("merges", "evictions", "final_version", "max_rows", "iterations"):
        assert getattr(stats_s, key) == getattr(stats_e, key), key
    for _text, stats, calls, patches_on_wire in results.values():
        assert stats.iterations == stats.tokens_generated == 70
        # The prime, then one per iteration, counted on the wire and by the driver alike.
        assert patches_on_wire == stats.mutating_rpcs == stats.iterations + 1
        # Before the first Tick: read-only setup calls and the prime, the only Patch there.
        first_tick = calls.index("Tick")
        setup = calls[:first_tick]
        assert setup.count("Patch") == 1 and set(setup) - {"Patch"} <= READ_ONLY_SETUP
        # Then each iteration is one Tick and one Patch, nothing else on the critical path
        # (GetSession: the read-only consistency check after the last iteration).
        assert calls[first_tick : first_tick + 2 * stats.iterations] == (
            ["Tick", "Patch"] * stats.iterations
        )
        assert set(calls[first_tick + 2 * stats.iterations :]) <= {"GetSession"}
        assert stats.rpcs_per_iteration == 2.0
        assert stats.consistent
