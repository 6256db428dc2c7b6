"""Proto <-> domain conversions of the ModelWorker messages (no tensor math here)."""

from __future__ import annotations

import torch

from cache_authority.convert import geometry_to_pb
from model_worker.attention import LAST_LAYER, MAX_LAYERS, MEAN_LAYERS
from model_worker.calls import StepParams, StepResult
from model_worker.errors import invalid
from model_worker.forward import KV
from model_worker.kv_merge import ATTENTION, EQUAL, HEAVIER, MEAN
from model_worker.model import LoadedModel
from model_worker.repair import Candidate, PairRef
from model_worker.sampling import Sampling
from model_worker.tick import (
    KV_MERGE,
    LM,
    MLM,
    PAIR_LM,
    RepairChoice,
    Repairers,
    TickParams,
    TickResult,
)
from positronic import codec
from positronic.v1 import model_worker_pb2 as pb
from positronic.v1 import tensor_pb2

_REPAIRERS = {pb.REPAIRER_UNSPECIFIED: "", pb.REPAIRER_LM: LM, pb.REPAIRER_MLM: MLM,
              pb.REPAIRER_KV_MERGE: KV_MERGE, pb.REPAIRER_PAIR_LM: PAIR_LM}  # fmt: skip
_KV_WEIGHTS = {pb.KV_MERGE_WEIGHTS_UNSPECIFIED: ATTENTION, pb.KV_MERGE_WEIGHTS_ATTENTION: ATTENTION,
               pb.KV_MERGE_WEIGHTS_EQUAL: EQUAL}  # fmt: skip
_KV_KEYS = {pb.KV_MERGE_KEY_UNSPECIFIED: MEAN, pb.KV_MERGE_KEY_MEAN: MEAN,
            pb.KV_MERGE_KEY_HEAVIER: HEAVIER}  # fmt: skip
_REDUCTIONS = {
    pb.ATTENTION_REDUCTION_UNSPECIFIED: LAST_LAYER,
    pb.ATTENTION_REDUCTION_LAST_LAYER: LAST_LAYER,
    pb.ATTENTION_REDUCTION_MEAN_LAYERS: MEAN_LAYERS,
    pb.ATTENTION_REDUCTION_MAX_LAYERS: MAX_LAYERS,
}


def sampling_from_pb(msg: pb.SamplingParams) -> Sampling:
    try:
        return Sampling(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p,
            repetition_penalty=msg.repetition_penalty,
            seed=msg.seed,
        )
    except ValueError as e:
        raise invalid(f"sampling: {e}") from None


def step_params_from_pb(msg: pb.StepRequest | pb.TickRequest) -> StepParams:
    if msg.attention_reduction not in _REDUCTIONS:
        raise invalid(f"unknown attention_reduction {msg.attention_reduction}")
    return StepParams(
        input_token_id=msg.input_token_id,
        sampling=sampling_from_pb(msg.sampling),
        top_logprobs=msg.top_logprobs,
        forced_next_token_id=(
            msg.forced_next_token_id if msg.HasField("forced_next_token_id") else None
        ),
        reduction=_REDUCTIONS[msg.attention_reduction],
        return_logits=getattr(msg, "return_logits", False),
    )


def kv_to_pb(kv: KV) -> tensor_pb2.KVBlock:
    return codec.encode_kv(kv.keys, kv.values)


def step_result_to_pb(result: StepResult) -> pb.StepResponse:
    out = result.output
    msg = pb.StepResponse(
        next_token_id=result.next_token_id,
        next_token_logprob=result.next_token_logprob,
        top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in result.top_logprobs],
        attention=out.attention.tolist(),
        input_kv=kv_to_pb(out.kv),
        position=out.position,
        forward_ns=out.forward_ns,
    )
    if result.logits is not None:
        msg.logits.CopyFrom(codec.encode(result.logits))
    return msg


def pairs_from_pb(msgs) -> list[PairRef]:
    return [PairRef(m.position, tuple(m.expected_token_ids), tuple(m.weights)) for m in msgs]


def tick_params_from_pb(msg: pb.TickRequest) -> TickParams:
    r = msg.repair
    if r.repairer not in _REPAIRERS or r.kv_weights not in _KV_WEIGHTS or r.kv_key not in _KV_KEYS:
        raise invalid("unknown repairer, kv_weights or kv_key")
    return TickParams(
        step=step_params_from_pb(msg),
        merges=tuple(pairs_from_pb(msg.merges)),
        repair=RepairChoice(
            repairer=_REPAIRERS[r.repairer],
            max_candidates=r.max_candidates,
            kv_weights=_KV_WEIGHTS[r.kv_weights],
            kv_key=_KV_KEYS[r.kv_key],
        ),
    )


def tick_result_to_pb(
    result: TickResult, similarity: torch.Tensor | None = None
) -> pb.TickResponse:
    step = result.step
    out = step.output
    return pb.TickResponse(
        next_token_id=step.next_token_id,
        next_token_logprob=step.next_token_logprob,
        top_logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in step.top_logprobs],
        next_token_piece=result.next_piece,
        next_token_bytes=result.next_bytes,
        attention=out.attention.tolist(),
        input_kv=kv_to_pb(out.kv),
        position=out.position,
        merges=[
            pb.PairMerge(
                position=m.position,
                merged=m.merged,
                token_id=m.token_id,
                piece=m.piece,
                kv=kv_to_pb(m.kv) if m.kv is not None else None,
                score=m.score,
                replaced_text=m.replaced_text,
            )
            for m in result.merges
        ],
        forwards=result.forwards,
        forward_ns=result.forward_ns,
        adjacent_similarity=similarity.tolist() if similarity is not None else [],
    )


def repairs_to_pb(pairs: list[PairRef], results: list[list[Candidate]]) -> pb.RepairResponse:
    return pb.RepairResponse(
        repairs=[
            pb.PairRepair(
                position=pair.position,
                candidates=[
                    pb.RepairCandidate(token_id=c.token_id, piece=c.piece, score=c.score)
                    for c in cands
                ],
            )
            for pair, cands in zip(pairs, results, strict=True)
        ]
    )


def _id_or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def info_to_pb(lm: LoadedModel, repairers: Repairers | None) -> pb.InfoResponse:
    s = lm.special
    return pb.InfoResponse(
        geometry=geometry_to_pb(lm.geometry),
        special_tokens=pb.SpecialTokens(
            bos_token_id=_id_or_minus_one(s.bos),
            eos_token_id=_id_or_minus_one(s.eos),
            pad_token_id=_id_or_minus_one(s.pad),
            unk_token_id=_id_or_minus_one(s.unk),
        ),
        model_name=lm.name,
        device=str(lm.device),
        repairer=repairers.default if repairers else "",
        num_attention_heads=lm.num_attention_heads,
        repairers=[
            pb.REPAIRER_LM,
            *([pb.REPAIRER_MLM] if repairers and repairers.mlm is not None else []),
            pb.REPAIRER_KV_MERGE,
            pb.REPAIRER_PAIR_LM,
        ]
        if repairers
        else [],
    )
