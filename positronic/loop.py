"""The Halo Weave loop driver (DESIGN.md "The loop"): a client of both services, owning nothing.

    0/4  Patch(session, V, ops)          the only mutation; the prime is the Patch at V = 0
    1    plan merges from the committed scores (one tick behind: the pair is chosen from the
         previous tick's brightness)                                              pure
    1    Tick(session, V, last_token, pairs)   read-only, one call: next token and its text,
         attention row, K/V of last_token, and each pair's replacement with its K/V
    2    scores' = policy.update(...)    pure; evictions of eviction-only policies planned now,
         from the fresh attention (as the papers do)
    4    Patch(session, V, [SetBrightness, ReplacePair/Evict..., Append(last_token)]) -> V + 1

So the critical path of an iteration is two calls, one Tick and one Patch; the worker's replica
follows the authority's commits off that path (model_worker/follower.py). Exactly one Patch per
iteration plus one for the prime. The driver's `View` of the session is a read of committed
state: it is changed only after the authority acknowledges a patch, by the same edits the patch
made, or re-read with GetSession when another writer got there first. The text comes from each
Tick's `next_token_bytes` through a UTF-8 assembler: no Detokenize call per token.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import grpc
import torch

from positronic import codec
from positronic.clients import Endpoints, call_with_retry, send_patch
from positronic.loop_view import View, apply_edits, view_from_mirror
from positronic.policies import Policy
from positronic.repair_params import repair_params_pb
from positronic.token_text import Utf8Assembler
from positronic.v1 import cache_authority_pb2, model_worker_pb2, session_pb2

logger = logging.getLogger(__name__)

# A worker that is down or hung is retried; ABORTED (it cannot reach the version we name) is
# permanent for that version, so it goes back to the loop, which re-reads the session.
WORKER_RETRY = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
REDUCTIONS = {
    "last": model_worker_pb2.ATTENTION_REDUCTION_LAST_LAYER,
    "mean": model_worker_pb2.ATTENTION_REDUCTION_MEAN_LAYERS,
    "max": model_worker_pb2.ATTENTION_REDUCTION_MAX_LAYERS,
}


MAX_STALE_IN_A_ROW = 20


class LoopError(RuntimeError):
    """The loop cannot go on (a prompt over the budget, `full` out of positions...)."""


class LoopConfigError(LoopError):
    """The configuration cannot work with this model (found before anything is created)."""


@dataclass
class LoopConfig:
    policy: Policy
    target_rows: int = 96
    hard_max_rows: int = 0  # 0: target_rows + 32
    max_new_tokens: int = 256
    seed: int = 0
    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    attention_reduction: str = "last"
    repair_candidates: int = 0  # candidates an lm/mlm repair ranks per pair; 0: the policy's
    retry_timeout_s: float = 60.0  # how long to retry a peer that is down
    call_timeout_s: float = 30.0  # deadline of one read-only call (Prefill: 10x)
    stop_at_eos: bool = False
    forced_tokens: list[int] | None = None  # teacher forcing (benchmarks): feed these, score them
    session_id: str = ""
    progress_every: int = 100

    def __post_init__(self) -> None:
        if self.hard_max_rows == 0:
            self.hard_max_rows = self.target_rows + 32
        if not 2 <= self.target_rows <= self.hard_max_rows:
            raise ValueError("need 2 <= target_rows <= hard_max_rows")
        if self.max_new_tokens < 0:
            raise ValueError("max_new_tokens must be >= 0")
        protected = self.policy.recent_window + getattr(self.policy, "sinks", 0) + 1
        if protected >= self.target_rows:
            raise ValueError(
                f"policy {self.policy.name} protects {protected} rows (recent window, sinks, BOS);"
                f" target_rows {self.target_rows} leaves nothing to compact"
            )
        if self.attention_reduction not in REDUCTIONS:
            raise ValueError(f"attention_reduction must be one of {', '.join(REDUCTIONS)}")


@dataclass
class LoopStats:
    session_id: str = ""
    tokens_generated: int = 0
    iterations: int = 0
    mutating_rpcs: int = 0
    max_rows: int = 0
    hard_max: int = 0
    merges: int = 0
    evictions: int = 0
    final_version: int = 0
    tokens_per_s: float = 0.0
    elapsed_s: float = 0.0
    stale_retries: int = 0
    consistent: bool = False  # the driver's view matched the authority's mirror at the end
    rpcs_per_iteration: float = 0.0  # calls on the critical path (Tick, Patch, re-reads)
    forwards_per_iteration: float = 0.0  # the worker's forward passes (TickResponse.forwards)
    merging_iterations: int = 0  # iterations whose Tick built replacements
    forwards_per_merging_iteration: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)  # teacher-forced runs: -log p per token
    critical_calls: int = 0
    forwards: int = 0
    merging_forwards: int = 0

    def to_json(self) -> dict:
        hidden = ("token_ids", "nll", "critical_calls", "forwards", "merging_forwards")
        return {k: v for k, v in asdict(self).items() if k not in hidden}

    def count_tick(self, forwards: int, merging: bool) -> None:
        self.forwards += forwards
        if merging:
            self.merging_iterations += 1
            self.merging_forwards += forwards

    def finish(self) -> None:
        n = max(self.iterations, 1)
        self.rpcs_per_iteration = self.critical_calls / n
        self.forwards_per_iteration = self.forwards / n
        if self.merging_iterations:
            self.forwards_per_merging_iteration = self.merging_forwards / self.merging_iterations


def _sampling(config: LoopConfig, iteration: int) -> model_worker_pb2.SamplingParams:
    seed = (config.seed * 0x9E3779B97F4A7C15 + iteration) % 2**64
    return model_worker_pb2.SamplingParams(
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
        repetition_penalty=config.repetition_penalty,
        seed=seed,
    )


class Loop:
    """One session's generation. `run()` primes and iterates; every mutation is a Patch."""

    def __init__(self, endpoints: Endpoints, config: LoopConfig, on_text: Callable[[str], None]):
        self.ep = endpoints
        self.cfg = config
        self.on_text = on_text
        self.stats = LoopStats(hard_max=config.hard_max_rows)
        self.info = self._worker_call(lambda: self.ep.worker.Info(model_worker_pb2.InfoRequest()))
        self.eos = self.info.special_tokens.eos_token_id
        policy = config.policy
        self._repair = repair_params_pb(policy.repair if policy.merges else None)
        if config.repair_candidates:
            self._repair.max_candidates = config.repair_candidates
        self._pending_piece = ""
        self._check_budget_fits_positions()

    def _check_budget_fits_positions(self) -> None:
        """A compacting policy feeds each token at the row count, up to the hard maximum: rows
        at or past the model's positions would fail mid-stream, so they are refused here."""
        positions = self.info.geometry.max_position_embeddings
        cfg = self.cfg
        if cfg.policy.name == "full" or not positions or cfg.hard_max_rows < positions:
            return
        raise LoopConfigError(
            f"target {cfg.target_rows} / hard maximum {cfg.hard_max_rows} rows do not fit the "
            f"model's {positions} positions: the hard maximum (default target + 32) must be "
            f"below {positions} (lower --target-size or --hard-max)"
        )

    def _worker_call(self, fn, what: str = "worker"):
        return call_with_retry(
            fn, what, timeout_s=self.cfg.retry_timeout_s, retry_codes=WORKER_RETRY
        )

    def _detokenize(self, req: model_worker_pb2.DetokenizeRequest):
        return self._worker_call(
            lambda: self.ep.worker.Detokenize(req, timeout=self.cfg.call_timeout_s), "Detokenize"
        )

    def _pieces(self, ids: list[int]) -> list[str]:
        """Vocabulary pieces of ids given as ids (benchmarks), in one call per 4,096."""
        out: list[str] = []
        for i in range(0, len(ids), 4096):
            req = model_worker_pb2.DetokenizeRequest(ids=ids[i : i + 4096])
            out += list(self._detokenize(req).pieces)
        return out

    # -- 0: create and prime -------------------------------------------------------------------
    def create_session(self) -> tuple[str, bytes]:
        req = cache_authority_pb2.CreateSessionRequest(
            session_id=self.cfg.session_id,
            geometry=self.info.geometry,
            budget=session_pb2.Budget(
                target_rows=self.cfg.target_rows, hard_max_rows=self.cfg.hard_max_rows
            ),
            seed_brightness=self.cfg.policy.initial_score(),
        )
        resp = call_with_retry(lambda: self.ep.authority.CreateSession(req), "CreateSession")
        return resp.session.session_id, resp.session.digest

    def prime(
        self,
        session_id: str,
        digest: bytes,
        ids: list[int],
        pieces: list[str],
        structural: list[bool],
    ) -> View:
        """Prefill all prompt tokens but the last, and commit them as version 1."""
        n = len(ids)
        if n > self.cfg.hard_max_rows:
            raise LoopError(
                f"the prompt has {n} tokens; the session holds at most {self.cfg.hard_max_rows} "
                "rows (raise --hard-max or shorten the prompt)"
            )
        if self.cfg.policy.name == "full":
            self._check_positions(n)
        req = model_worker_pb2.PrefillRequest(
            session_id=session_id,
            version=0,
            token_ids=ids,
            start_position=0,
            expected_digest=digest,
        )
        chunks = self._worker_call(
            lambda: list(self.ep.worker.Prefill(req, timeout=10 * self.cfg.call_timeout_s)),
            "Prefill",
        )
        score = self.cfg.policy.initial_score()
        ops = []
        for chunk in chunks:
            first = chunk.first_token_index
            count = chunk.kv.keys.shape[2]
            # One Append per run of equal source: structural (BOS) rows are recorded as such.
            for start, end in _runs(structural, first, first + count):
                kv = chunk.kv
                if (start, end) != (first, first + count):
                    kv = _kv_slice(kv, start - first, end - first)
                source = (
                    session_pb2.TOKEN_SOURCE_STRUCTURAL
                    if structural[start]
                    else session_pb2.TOKEN_SOURCE_PROMPT
                )
                ops.append(
                    session_pb2.PatchOp(
                        append=session_pb2.AppendOp(
                            position=start,
                            token_ids=ids[start:end],
                            kv=kv,
                            pieces=pieces[start:end],
                            brightness=[score] * (end - start),
                            source=source,
                        )
                    )
                )
        resp = send_patch(
            self.ep,
            session_id,
            0,
            _request_id(),
            ops,
            timeout_s=self.cfg.retry_timeout_s,
            call_timeout_s=10 * self.cfg.call_timeout_s,  # a prime may be large
        )
        self.stats.max_rows = max(self.stats.max_rows, resp.row_count)
        return View(
            version=resp.version,
            digest=resp.digest,
            token_ids=list(ids),
            structural=list(structural),
            scores=torch.full((n,), float(score)),
        )

    def _check_positions(self, rows: int) -> None:
        limit = min(self.info.geometry.max_position_embeddings or rows, self.cfg.hard_max_rows)
        if rows > limit:
            raise LoopError(
                f"policy 'full' needs {rows} rows, past the limit of {limit} "
                "(the model's positions or the session's hard maximum)"
            )

    # -- 1..4: one iteration -------------------------------------------------------------------
    def iterate(self, session_id: str, view: View, token: int, iteration: int, source: Any):
        """Plan merges, Tick, score, Patch. Returns (new view, the Tick's response)."""
        n = len(view.token_ids)
        policy = self.cfg.policy
        if policy.name == "full":
            self._check_positions(n + 1)
        structural = torch.tensor([*view.structural, False])
        excess = n + 1 - self.cfg.target_rows
        pairs: list[int] = []
        evictions: list[int] = []
        if policy.merges and excess > 0:
            # One tick behind: the committed scores (the previous tick's), the new row seeded.
            committed = torch.cat([view.scores, torch.tensor([policy.initial_score()])])
            plan = policy.plan(committed, structural, excess)
            pairs, evictions = plan.merges, list(plan.evictions)
        tick = self._tick(session_id, view, token, iteration, pairs)
        attention = torch.tensor(tick.attention, dtype=torch.float32)
        if attention.numel() != n + 1:
            raise LoopError(f"attention row of {attention.numel()} values for {n} rows + 1")
        similarity = torch.tensor(tick.adjacent_similarity) if policy.reads_similarity else None
        scores, new_score = policy.update(view.scores, attention, similarity)
        all_scores = torch.cat([scores, torch.tensor([new_score])])
        if not policy.merges and excess > 0:
            evictions = list(policy.plan(all_scores, structural, excess).evictions)
        merges = []
        for p, merge in zip(pairs, tick.merges, strict=True):
            if merge.merged:
                merges.append((p, merge, policy.merged_score(all_scores, p)))
            else:  # no single token fits: the pair's dimmer row goes instead
                evictions.append(p if all_scores[p] <= all_scores[p + 1] else p + 1)
        evictions = sorted(set(evictions))
        ops = self._ops(view, scores, merges, evictions, token, tick.input_kv, new_score, source)
        resp = send_patch(
            self.ep,
            session_id,
            view.version,
            _request_id(),
            ops,
            timeout_s=self.cfg.retry_timeout_s,
            call_timeout_s=self.cfg.call_timeout_s,
        )
        self.stats.critical_calls += 1
        new_view = apply_edits(
            view,
            scores=scores,
            merges=[(p, m.token_id, score) for p, m, score in merges],
            evictions=evictions,
            appended=(token, new_score),
            version=resp.version,
            digest=resp.digest,
        )
        if len(new_view.token_ids) != resp.row_count:
            raise LoopError(
                f"session {session_id}@{resp.version}: driver expects "
                f"{len(new_view.token_ids)} rows, authority has {resp.row_count}"
            )
        self.stats.merges += len(merges)
        self.stats.evictions += len(evictions)
        self.stats.max_rows = max(self.stats.max_rows, resp.row_count)
        self.stats.count_tick(tick.forwards, bool(pairs))
        return new_view, tick

    def _tick(self, session_id: str, view: View, token: int, iteration: int, pairs: list[int]):
        """The iteration's one read-only call: step, text, and each pair's replacement."""
        request = model_worker_pb2.TickRequest(
            session_id=session_id,
            version=view.version,
            expected_digest=view.digest,
            input_token_id=token,
            sampling=_sampling(self.cfg, iteration),
            attention_reduction=REDUCTIONS[self.cfg.attention_reduction],
            merges=[
                model_worker_pb2.PairRef(position=p, expected_token_ids=view.token_ids[p : p + 2])
                for p in pairs
            ],
            repair=self._repair,
            adjacent_similarity=self.cfg.policy.reads_similarity,
        )
        forced = self.cfg.forced_tokens
        if forced is not None:
            request.forced_next_token_id = forced[iteration]
        self.stats.critical_calls += 1
        return self._worker_call(
            lambda: self.ep.worker.Tick(request, timeout=self.cfg.call_timeout_s), "Tick"
        )

    def _ops(self, view, scores, merges, evictions, token, input_kv, new_score, source):
        """The iteration's Patch: brightness, merges, evictions, then the input token."""
        ops: list[session_pb2.PatchOp] = []
        if self.cfg.policy.keeps_scores:
            ops.append(
                session_pb2.PatchOp(
                    set_brightness=session_pb2.SetBrightnessOp(
                        expected_row_count=len(view.token_ids), brightness=scores.tolist()
                    )
                )
            )
        for p, merge, score in merges:
            ops.append(
                session_pb2.PatchOp(
                    replace_pair=session_pb2.ReplacePairOp(
                        position=p,
                        expected_token_ids=view.token_ids[p : p + 2],
                        token_id=merge.token_id,
                        kv=merge.kv,
                        piece=merge.piece,
                        brightness=score,
                        replaced_text=merge.replaced_text,
                    )
                )
            )
        for p in evictions:
            ops.append(
                session_pb2.PatchOp(
                    evict=session_pb2.EvictOp(position=p, expected_token_id=view.token_ids[p])
                )
            )
        ops.append(
            session_pb2.PatchOp(
                append=session_pb2.AppendOp(
                    position=len(view.token_ids),
                    token_ids=[token],
                    kv=input_kv,
                    pieces=[self._pending_piece],
                    brightness=[new_score],
                    source=source,
                )
            )
        )
        return ops

    def reread(self, session_id: str) -> View:
        self.stats.critical_calls += 1
        resp = call_with_retry(
            lambda: self.ep.authority.GetSession(
                cache_authority_pb2.GetSessionRequest(session_id=session_id)
            ),
            "GetSession",
        )
        return view_from_mirror(resp)

    # -- the whole generation ------------------------------------------------------------------
    def run(self, prompt: str, prompt_ids: list[int] | None = None) -> LoopStats:
        """Generate from `prompt` (tokenized by the worker, BOS added by the policy), or from
        `prompt_ids` exactly as given (benchmarks; a leading BOS is marked structural)."""
        cfg = self.cfg
        if prompt_ids is None:
            tok = self._worker_call(
                lambda: self.ep.worker.Tokenize(
                    model_worker_pb2.TokenizeRequest(text=prompt, add_bos=True)
                ),
                "Tokenize",
            )
            ids, pieces, structural = list(tok.ids), list(tok.pieces), list(tok.structural)
        else:
            ids = list(prompt_ids)
            bos = self.info.special_tokens.bos_token_id
            structural = [i == 0 and t == bos for i, t in enumerate(ids)]
            pieces = self._pieces(ids)
        if len(ids) < 2 or all(structural):
            raise LoopError("the prompt has no text tokens")
        session_id, digest = self.create_session()
        self.stats.session_id = session_id
        logger.info(
            "session %s: prompt of %d tokens (%d structural), policy %s, target %d, hard max %d",
            session_id,
            len(ids),
            sum(structural),
            cfg.policy.name,
            cfg.target_rows,
            cfg.hard_max_rows,
        )
        view = self.prime(session_id, digest, ids[:-1], pieces[:-1], structural[:-1])
        token, source = ids[-1], session_pb2.TOKEN_SOURCE_PROMPT
        self._pending_piece = pieces[-1]
        text_out = Utf8Assembler()
        steps = len(cfg.forced_tokens) if cfg.forced_tokens is not None else cfg.max_new_tokens
        t0 = time.perf_counter()
        i = stale_in_a_row = 0
        while i < steps:
            try:
                view, tick = self.iterate(session_id, view, token, i, source)
            except grpc.RpcError as e:
                if e.code() != grpc.StatusCode.ABORTED:  # type: ignore[attr-defined]
                    raise
                # Another writer committed first: re-read the committed state and go on.
                self.stats.stale_retries += 1
                stale_in_a_row += 1
                if stale_in_a_row > MAX_STALE_IN_A_ROW:
                    raise LoopError(
                        f"session {session_id}: {stale_in_a_row} stale versions in a row; "
                        "another writer keeps committing first"
                    ) from e
                logger.warning("session %s@%d: stale version, re-reading", session_id, view.version)
                view = self.reread(session_id)
                continue
            i += 1
            stale_in_a_row = 0
            next_token = tick.next_token_id
            self.stats.iterations = i
            self.stats.token_ids.append(next_token)
            self._pending_piece = tick.next_token_piece
            if cfg.forced_tokens is not None:  # teacher forcing scores; prints nothing
                self.stats.nll.append(-float(tick.next_token_logprob))
                source = session_pb2.TOKEN_SOURCE_PROMPT
                text = ""
            else:
                source = session_pb2.TOKEN_SOURCE_GENERATED
                text = text_out.push(tick.next_token_bytes)
                if next_token == self.eos:
                    text += text_out.flush() + "\n\n"
            if text:
                self.on_text(text)
            token = next_token
            if cfg.progress_every and i % cfg.progress_every == 0:
                logger.info(
                    "session %s@%d: %d/%d tokens, %d rows, %d merges, %d evictions",
                    session_id,
                    view.version,
                    i,
                    steps,
                    len(view.token_ids),
                    self.stats.merges,
                    self.stats.evictions,
                )
            if cfg.stop_at_eos and next_token == self.eos:
                break
        tail = text_out.flush()
        if tail:
            self.on_text(tail)
        elapsed = time.perf_counter() - t0
        self.stats.tokens_generated = self.stats.iterations
        self.stats.elapsed_s = elapsed
        self.stats.tokens_per_s = self.stats.iterations / elapsed if elapsed > 0 else 0.0
        self.stats.final_version = view.version
        self.stats.mutating_rpcs = self.ep.counter.patch_calls
        self.stats.finish()
        self.stats.consistent = self.reread(session_id) == view
        return self.stats


def run_loop(
    endpoints: Endpoints,
    prompt: str,
    config: LoopConfig,
    on_text: Callable[[str], None],
    *,
    prompt_ids: list[int] | None = None,
) -> LoopStats:
    return Loop(endpoints, config, on_text).run(prompt, prompt_ids)


def _request_id() -> str:
    return uuid.uuid4().hex


def _runs(flags: list[bool], start: int, stop: int):
    """Maximal [a, b) runs of equal flags within [start, stop)."""
    a = start
    while a < stop:
        b = a
        while b < stop and flags[b] == flags[a]:
            b += 1
        yield a, b
        a = b


def _kv_slice(kv, a: int, b: int):
    keys = codec.decode(kv.keys)[:, :, a:b]
    values = codec.decode(kv.values)[:, :, a:b]
    return codec.encode_kv(keys, values)
