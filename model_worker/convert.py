"""Proto <-> domain conversions of the ModelWorker messages (no tensor math here)."""

from __future__ import annotations

from cache_authority.convert import geometry_to_pb
from model_worker.attention import LAST_LAYER, MAX_LAYERS, MEAN_LAYERS
from model_worker.calls import StepParams, StepResult
from model_worker.errors import invalid
from model_worker.forward import KV
from model_worker.model import LoadedModel
from model_worker.repair import Candidate, PairRef
from model_worker.sampling import Sampling
from positronic import codec
from positronic.v1 import model_worker_pb2 as pb
from positronic.v1 import tensor_pb2

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


def step_params_from_pb(msg: pb.StepRequest) -> StepParams:
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
        return_logits=msg.return_logits,
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
    return [PairRef(m.position, tuple(m.expected_token_ids)) for m in msgs]


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


def info_to_pb(lm: LoadedModel, repairer: str) -> pb.InfoResponse:
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
        repairer=repairer,
        num_attention_heads=lm.num_attention_heads,
    )
