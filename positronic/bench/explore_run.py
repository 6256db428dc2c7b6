"""One simulated teacher-forced stream: the loop's tick, with the cache edited directly.

A tick, as `positronic/loop.py` runs it (and as the fast tick will, with `lag`):

    step      forward the input token over the S rows (SimCache.step)       -> NLL, attention
    update    scores' = policy.update(scores, attention)                    (pure policy code)
    plan      merges / evictions = policy.plan(...) or a search selection   (pure)
              lag: planned from the committed scores, before the step (the fast tick's order)
    repair    a replacement per merged pair, built on the rows before the edit
    patch     set scores, merge / evict from the highest position down, append the input row

`Candidate` names everything a configuration changes: the policy spec (bench/specs.py), the
repairer and its settings, the selection, the lag, and the proportional-attention bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from model_worker.lm_repair import LMRepairer
from model_worker.model import LoadedModel
from model_worker.repair import banned_ids
from positronic.bench import explore_repair as rep
from positronic.bench.explore_cache import BatchCache, nll
from positronic.bench.specs import PolicySpec, parse_spec
from positronic.policies import Plan, Policy
from positronic.selection import adjacent_similarity, select_balanced_pairs, select_redundant_pairs

REPAIRERS = ("lm", "pair", "kv", "evict")  # evict: the pair's dimmer row goes (no merge)
SELECTIONS = ("policy", "redundant", "balanced")
_KEYS = {"repair", "weights", "key", "pool", "cont", "kvw", "prior", "select", "cap", "lag"}
_KEYS |= {"bias", "biascap"}


@dataclass(frozen=True)
class Candidate:
    """A configuration to simulate: `policy spec[|key=value...]`, e.g.
    `halo|repair=kv|weights=equal|key=mean|lag=1`."""

    text: str
    policy: PolicySpec
    repair: str = "lm"
    weights: str = "attention"
    key: str = "mean"
    pool: int = 0
    cont: str = "kl"
    kvw: float = 1.0
    prior: bool = False
    select: str = "policy"
    cap: float = math.inf  # balanced: most tokens one merged row may represent
    lag: bool = False
    bias: bool = False  # add log(tokens represented) to every attention logit of a row...
    biascap: float = math.inf  # ...up to this

    @property
    def bias_cap(self) -> float:
        return self.biascap if self.bias else 0.0

    @property
    def merges(self) -> bool:
        return self.policy.make().merges or self.select != "policy"


def parse_candidate(text: str) -> Candidate:
    spec, *parts = text.strip().split("|")
    fields: dict = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in _KEYS:
            raise ValueError(f"{text!r}: {part!r} is not one of {', '.join(sorted(_KEYS))}=VALUE")
        fields[key] = value
    typed: dict = {}
    for key, value in fields.items():
        if key in ("pool",):
            typed[key] = int(value)
        elif key in ("kvw", "cap", "biascap"):
            typed[key] = float(value)
        elif key in ("prior", "lag", "bias"):
            typed[key] = value in ("1", "true", "yes")
        else:
            typed[key] = value
    policy = parse_spec(spec)
    preset = policy.make().repair  # a preset's own repairer, unless the text overrides it
    if preset is not None and preset.repairer == "kv_merge":
        typed = {"repair": "kv", "weights": preset.kv_weights, "key": preset.kv_key} | typed
    if preset is not None and preset.repairer == "pair_lm":  # the worker's setting
        typed = {"repair": "pair", "cont": "next"} | typed
    cand = Candidate(text.strip(), policy, **typed)
    if cand.repair not in REPAIRERS or cand.select not in SELECTIONS:
        raise ValueError(f"{text!r}: repair in {REPAIRERS}, select in {SELECTIONS}")
    if cand.weights not in rep.WEIGHTS or cand.key not in rep.KEYS:
        raise ValueError(f"{text!r}: weights in {rep.WEIGHTS}, key in {rep.KEYS}")
    return cand


@dataclass
class SimRun:
    nll: list[float] = field(default_factory=list)  # -log p of token_ids[2:]
    merges: int = 0
    evictions: int = 0
    forwards: int = 0  # forward passes beyond the step, over the whole stream
    merged_rows_at_end: int = 0
    max_count_at_end: float = 1.0  # the most tokens one row stood for at the end
    merges_at: list[int] = field(default_factory=list)  # merges whose pair started at row i


def _plan(cand: Candidate, policy: Policy, cache: BatchCache, b: int, scores, excess: int) -> Plan:
    structural = torch.tensor([*cache.structural[b], False])
    if cand.select == "policy":
        return policy.plan(scores, structural, excess)
    protected = policy.protected(structural)
    protected[: getattr(policy, "sinks", 0)] = True
    if cand.select == "redundant":
        rows = cache.rows(b)
        pairs = select_redundant_pairs(
            rows.keys, rows.values, protected[:-1], excess, cache.lm.geometry.rope
        )
        return Plan(merges=pairs)
    counts = torch.cat([cache.count[b, : cache.size], torch.ones(1)])
    pairs = select_balanced_pairs(counts, protected, excess, cand.cap)
    evictions: list[int] = []
    if len(pairs) < excess:  # every mergeable pair is full: evict the oldest unprotected rows
        taken = protected.clone()
        for p in pairs:
            taken[p] = taken[p + 1] = True
        free = (~taken).nonzero().flatten().tolist()
        evictions = free[: excess - len(pairs)]
    return Plan(merges=pairs, evictions=evictions)


@dataclass
class _Session:
    """One (candidate, stream) of a batch: its policy, scores and tallies."""

    cand: Candidate
    token_ids: list[int]
    policy: Policy
    scores: torch.Tensor
    run: SimRun = field(default_factory=SimRun)


def simulate(lm: LoadedModel, jobs: list[tuple[Candidate, list[int]]], budget: int) -> list[SimRun]:
    """Each job: prime BOS, feed token_ids[1], then force (and score) every later token, with
    at most `budget` rows after every tick — what `positronic bench quality` runs — all jobs in
    lockstep, one batched forward per tick. Streams must have equal lengths, and candidates
    of one call the same `bias` (an additive mask changes the forward's numerics slightly)."""
    lengths = {len(t) for _, t in jobs}
    if len(lengths) != 1 or len({c.bias for c, _ in jobs}) != 1:
        raise ValueError("one batch needs streams of one length and one bias setting")
    sessions = []
    for cand, ids in jobs:
        policy = cand.policy.make()
        protected = policy.recent_window + getattr(policy, "sinks", 0) + 1
        if protected >= budget:  # what LoopConfig refuses
            raise ValueError(f"{cand.text} protects {protected} rows of a budget of {budget}")
        sessions.append(_Session(cand, ids, policy, torch.tensor([policy.initial_score()])))
    length = lengths.pop()
    caps = [c.bias_cap for c, _ in jobs]
    cache = BatchCache(lm, len(jobs), budget + 1, length, bias_caps=caps)
    lm_repairer = LMRepairer(lm)
    banned = torch.tensor(sorted(banned_ids(lm)), dtype=torch.long)
    bos = [ids[0] for _, ids in jobs]
    reductions = [c.policy.reduction for c, _ in jobs]
    cache.append(bos, cache.step(bos, reductions), 0, structural=True)
    for i in range(length - 2):
        tokens = [s.token_ids[1 + i] for s in sessions]
        n = cache.size
        steps = cache.step(tokens, reductions)
        sizes = []
        for b, (sess, step) in enumerate(zip(sessions, steps, strict=True)):
            sess.run.nll.append(nll(step.logits, sess.token_ids[2 + i]))
            cache.accumulated[b, :n] += step.attention[:-1]
            sizes.append(_tick(cache, b, sess, step, budget, lm_repairer, banned))
        cache.resize(sizes)
        cache.append(tokens, steps, n)
        for b, sess in enumerate(sessions):
            if len(sess.scores) != cache.size or len(cache.token_ids[b]) != cache.size:
                raise RuntimeError(f"session {b}: scores, tokens and rows disagree")
    for b, sess in enumerate(sessions):
        count = cache.count[b, : cache.size]
        sess.run.merged_rows_at_end = int((count > 1).sum())
        sess.run.max_count_at_end = float(count.max())
    return [s.run for s in sessions]


def _tick(cache: BatchCache, b: int, sess: _Session, step, budget: int, lm_repairer, banned):
    """Session b's update, plan, repairs and edit for this tick; returns its new row count
    before the append (the input row is appended for every session at once)."""
    cand, policy, run = sess.cand, sess.policy, sess.run
    n = cache.size
    committed = torch.cat([sess.scores, torch.tensor([policy.initial_score()])])
    similarity = _similarity(cache, b, step) if policy.reads_similarity else None
    new_scores, new_score = policy.update(sess.scores, step.attention, similarity)
    fresh = torch.cat([new_scores, torch.tensor([new_score])])
    excess = n + 1 - budget
    plan = Plan()
    if excess > 0:
        lagged = cand.lag and cand.merges
        plan = _plan(cand, policy, cache, b, committed if lagged else fresh, excess)
    merges: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}
    merged_scores: dict[int, float] = {}
    evictions = list(plan.evictions)
    for p in plan.merges:
        r: rep.Replacement | None
        if cand.repair == "evict":
            r = None
        elif cand.repair == "lm":
            r = rep.repair_lm(lm_repairer, cache, b, p, cand.policy.candidates)
        elif cand.repair == "kv":
            r = rep.repair_kv(cache, b, step, p, cand.weights, cand.key)
        else:
            pair = rep.PairLM(cand.pool, cand.cont, cand.kvw, cand.prior)
            r = pair.repair(cache, b, p, banned)
        if r is None:  # no replacement: evict the pair's dimmer row (as the loop does)
            evictions.append(p if fresh[p] <= fresh[p + 1] else p + 1)
            continue
        merges[p] = (r.token_id, r.keys, r.values)
        if len(run.merges_at) < budget:
            run.merges_at.extend([0] * (budget - len(run.merges_at)))
        run.merges_at[p] += 1
        merged_scores[p] = policy.merged_score(fresh, p)
        run.forwards += r.forwards
    values = new_scores.tolist()
    for p, s in merged_scores.items():
        values[p] = s  # the row that stays at p after the merge carries the merged score
    evictions = sorted(set(evictions))
    size = cache.edit(b, merges, evictions)
    sess.scores = torch.cat([_edited_scores(values, merges, evictions), torch.tensor([new_score])])
    run.merges += len(merges)
    run.evictions += len(evictions)
    if size + 1 > budget:
        raise RuntimeError(f"{size + 1} rows after a tick, budget {budget}")
    return size


def _similarity(cache: BatchCache, b: int, step) -> torch.Tensor:
    """What the Tick returns as adjacent_similarity (model_worker/similarity.py): row i's
    similarity to row i + 1, the input row last, over the rows before this tick's edit."""
    rows = cache.rows(b)
    keys = torch.cat([rows.keys, step.keys], dim=2)  # [L, H, S + 1, D]
    values = torch.cat([rows.values, step.values], dim=2)
    return adjacent_similarity(keys, values, cache.lm.geometry.rope)


def _edited_scores(values: list[float], merges, evictions) -> torch.Tensor:
    edits = [(p, "m") for p in merges] + [(p, "e") for p in evictions]
    for p, kind in sorted(edits, reverse=True):
        if kind == "m":
            values[p : p + 2] = [values[p]]
        else:
            del values[p]
    return torch.tensor(values, dtype=torch.float32)
