"""Helpers for the model worker's tests: tiny models built offline, replicas filled with
`apply_ops` from a real forward, and a miniature authority that serves Sync from a log."""

from __future__ import annotations

import copy
import functools
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cache_authority.ops import GENESIS_DIGEST, AppendOp, Op, chain_digest, op_to_pb
from cache_authority.state import Budget, SessionState, apply_ops
from model_worker.errors import WorkerError
from model_worker.forward import Rows
from model_worker.model import LoadedModel, describe
from model_worker.replica import rows_of as replica_rows
from positronic.v1 import cache_authority_pb2, session_pb2

_WORDS = (
    "once upon a time there was big little cat dog girl boy tree house sun happy sad ran "
    "jumped saw the and to he she it . , play ball friend mom dad day park water red blue "
    "green fun went home good bad elephant wonderful butterfly"
)
TINY_WORDS = tuple(_WORDS.split(" "))


def word_tokenizer(words=TINY_WORDS, *, wordpiece: bool = False):
    """A whitespace word-level (or WordPiece, for BERT) tokenizer built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if wordpiece:
        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = {w: i for i, w in enumerate([*specials, *words, "##s", "##ed"])}
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            unk_token="[UNK]",
            pad_token="[PAD]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            mask_token="[MASK]",
        )
    specials = ["<unk>", "<s>", "</s>"]
    vocab = {w: i for i, w in enumerate([*specials, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A random 2-layer Llama (GQA 4/2 heads, head dim 8) over a word-level tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(dtype)
    return describe("tiny-random-llama", model, tok)


def tiny_masked_lm(directory: Path):
    """Save a random tiny BERT masked LM and its WordPiece tokenizer to `directory`."""
    from transformers import BertConfig, BertForMaskedLM

    tok = word_tokenizer(wordpiece=True)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    torch.manual_seed(0)
    BertForMaskedLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


def full_forward(lm: LoadedModel, token_ids: list[int], eager: bool = False):
    """A monolithic HF forward from scratch (no replica involved)."""
    with torch.inference_mode():
        return lm.model(
            input_ids=torch.tensor([token_ids]),
            position_ids=torch.arange(len(token_ids))[None],
            use_cache=True,
            output_attentions=eager,
        )


def kv_of(out) -> tuple[torch.Tensor, torch.Tensor]:
    """[L, H, N, D] keys and values of a forward's cache."""
    keys = torch.stack([layer.keys[0] for layer in out.cache.layers])
    values = torch.stack([layer.values[0] for layer in out.cache.layers])
    return keys.clone(), values.clone()


def append_op(lm: LoadedModel, token_ids: list[int], position: int = 0, context=()) -> AppendOp:
    """An AppendOp whose K/V come from a from-scratch forward of context + token_ids."""
    keys, values = kv_of(full_forward(lm, [*context, *token_ids]))
    n = len(token_ids)
    return AppendOp(
        position=position,
        token_ids=tuple(token_ids),
        keys=keys[:, :, -n:].contiguous(),
        values=values[:, :, -n:].contiguous(),
    )


def new_state(
    lm: LoadedModel, session_id: str = "s", hard_max: int = 64, rotated: bool = True
) -> SessionState:
    """A replica (rotated keys kept, as workers hold them) or, rotated=False, the authority's
    kind of state."""
    return SessionState(
        session_id=session_id,
        geometry=lm.geometry,
        budget=Budget(target_rows=hard_max, hard_max_rows=hard_max),
        digest=GENESIS_DIGEST,
        rotated=rotated,
        scratch_slots=8 if rotated else 0,
    )


def commit(state: SessionState, ops: list[Op]) -> list:
    """Apply ops as the next version, with the chained digest; returns the ops as protos."""
    ops_pb = [op_to_pb(op) for op in ops]
    version = state.version + 1
    apply_ops(state, ops, version, chain_digest(state.digest, version, ops_pb))
    return ops_pb


def replica_of(lm: LoadedModel, token_ids: list[int], hard_max: int = 64) -> SessionState:
    state = new_state(lm, hard_max=hard_max)
    commit(state, [append_op(lm, token_ids)])
    return state


def rows_of(state: SessionState) -> Rows:
    """The replica's rows as the worker reads them: views of its buffers, forwards writing new
    tokens' K/V in place after them."""
    return replica_rows(state)


def snapshot_of(state: SessionState, live: bool = False) -> tuple[torch.Tensor, ...]:
    """What a replica holds, copied, for before/after comparisons: every buffer, or only the
    live rows (what a snapshot carries)."""
    a, b = state.slot_range() if live else (0, state.capacity)
    assert state.rotated_keys is not None
    return (
        state.rotated_keys[:, :, a:b].clone(),
        state.canonical_keys[:, :, a:b].clone(),
        state.values[:, :, a:b].clone(),
        state.token_ids[a:b].clone(),
        state.origin_positions[a:b].clone(),
        state.brightness[a:b].clone(),
        torch.tensor([state.version, state.row_count, state.next_ledger_id]),
        torch.tensor([state.position_offset]),
        torch.tensor(list(state.digest)),
    )


def same(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@dataclass
class MiniAuthority:
    """A test double of the authority's Sync: one master state per session and its log.

    Sync from 0 (or from before `log_floor`) sends a snapshot; otherwise the retained deltas,
    each split in `parts` messages. `corrupt_version` sends a wrong digest for that version."""

    states: dict[str, SessionState] = field(default_factory=dict)
    log: dict[str, list[session_pb2.CommittedPatch]] = field(default_factory=dict)
    log_floor: int = 0
    parts: int = 1
    chunk_bytes: int = 1000
    corrupt_version: int | None = None
    reachable: bool = True
    calls: list[tuple[str, int]] = field(default_factory=list)
    follows: list[tuple[str, int]] = field(default_factory=list)
    follow_delay_s: float = 0.0
    _changed: threading.Condition = field(default_factory=threading.Condition)

    def create(self, lm: LoadedModel, session_id: str, hard_max: int = 64) -> SessionState:
        self.states[session_id] = new_state(lm, session_id, hard_max)
        self.log[session_id] = []
        return self.states[session_id]

    def patch(self, session_id: str, ops: list[Op]) -> int:
        state = self.states[session_id]
        ops_pb = commit(state, ops)
        with self._changed:
            self.log[session_id].append(
                session_pb2.CommittedPatch(version=state.version, digest=state.digest, ops=ops_pb)
            )
            self._changed.notify_all()
        return state.version

    def delete(self, session_id: str) -> None:
        with self._changed:
            del self.states[session_id], self.log[session_id]
            self._changed.notify_all()

    def follow(self, session_id: str, from_version: int) -> MiniFollow:
        """Sync(follow=True): the deltas after from_version, then each patch as it is made;
        NOT_FOUND once the session is deleted. `follow_delay_s` holds each delta back."""
        self.follows.append((session_id, from_version))
        return MiniFollow(self, session_id, from_version)

    def sync(
        self, session_id: str, from_version: int
    ) -> Iterator[cache_authority_pb2.SyncResponse]:
        self.calls.append((session_id, from_version))
        if not self.reachable:
            raise WorkerError("UNAVAILABLE", "mini authority unreachable")
        if session_id not in self.states:
            raise WorkerError("NOT_FOUND", f"no session {session_id}")
        return self._stream(session_id, from_version)

    def _stream(self, session_id: str, from_version: int):
        from cache_authority.snapshot import state_to_snapshot

        state = self.states[session_id]
        if from_version == 0 or from_version < self.log_floor:
            header, data = state_to_snapshot(state)
            yield cache_authority_pb2.SyncResponse(snapshot_header=header)
            for off in range(0, len(data), self.chunk_bytes):
                chunk = cache_authority_pb2.SnapshotChunk(
                    offset=off, data=data[off : off + self.chunk_bytes]
                )
                yield cache_authority_pb2.SyncResponse(snapshot_chunk=chunk)
            return
        for patch in self.log[session_id][from_version:]:
            digest = b"\0" * 32 if patch.version == self.corrupt_version else patch.digest
            ops = list(patch.ops)
            k = max(1, min(self.parts, len(ops)))
            for i in range(k):
                share = ops[i * len(ops) // k : (i + 1) * len(ops) // k]
                last = i == k - 1
                part = session_pb2.CommittedPatch(
                    version=patch.version, digest=digest if last else b"", ops=share
                )
                yield cache_authority_pb2.SyncResponse(
                    delta=cache_authority_pb2.PatchDelta(patch=part, final=last)
                )


STORY = "Once upon a time, there was a little girl named Lily. She loved to play in the park."


@functools.cache
def stories(path: str) -> LoadedModel:
    from model_worker.model import load_model

    return load_model(path, device="cpu", dtype="float32")


def story_ids(lm: LoadedModel, text: str = STORY) -> list[int]:
    from positronic.special_tokens import encode_prompt

    return encode_prompt(lm.encoder, text).ids


def eager_copy(lm: LoadedModel):
    """The same weights with HF's eager attention (which returns full attention maps)."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    return model


def health_status(address: str, service: str = "") -> str:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def reflected_services(address: str, token: str | None = None) -> list[str]:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from positronic.rpc import open_channel

    with open_channel(address, token) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (resp,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    return [s.name for s in resp.list_services_response.service]


@dataclass(frozen=True)
class At:
    """A committed version of a session and its digest: what every compute call names."""

    version: int
    digest: bytes

    def names(self, session_id: str = "s") -> dict:
        """The fields a compute request needs to name this state of `session_id`."""
        return {"session_id": session_id, "version": self.version, "expected_digest": self.digest}


def prime_session(authority, worker, geometry, prompt_ids: list[int], session_id: str = "s") -> At:
    """CreateSession, Prefill on the worker at version 0, Patch the K/V in: version 1."""
    from cache_authority.ops import AppendOp, op_to_pb
    from positronic import codec
    from positronic.v1 import model_worker_pb2, session_pb2

    created = authority.CreateSession(
        cache_authority_pb2.CreateSessionRequest(
            session_id=session_id,
            geometry=geometry,
            budget=session_pb2.Budget(target_rows=64, hard_max_rows=128),
        )
    )
    chunks = list(
        worker.Prefill(
            model_worker_pb2.PrefillRequest(
                session_id=session_id,
                version=0,
                expected_digest=created.session.digest,
                token_ids=prompt_ids,
                chunk_tokens=5,
            )
        )
    )
    keys = torch.cat([codec.decode(c.kv.keys) for c in chunks], dim=2)
    values = torch.cat([codec.decode(c.kv.values) for c in chunks], dim=2)
    op = AppendOp(0, tuple(prompt_ids), keys, values)
    return patch(authority, session_id, 0, [op_to_pb(op)])


def patch(authority, session_id: str, version: int, ops) -> At:
    import uuid

    request = cache_authority_pb2.PatchRequest(
        session_id=session_id,
        expected_version=version,
        request_id=uuid.uuid4().hex,
        ops=ops,
        end_of_patch=True,
    )
    resp = authority.Patch(iter([request]))
    return At(resp.version, resp.digest)


def append_step(authority, session_id: str, at: At, token_id: int, step) -> At:
    """Commit a Step's input token and its K/V, as the loop does."""
    op = session_pb2.PatchOp(
        append=session_pb2.AppendOp(position=step.position, token_ids=[token_id], kv=step.input_kv)
    )
    return patch(authority, session_id, at.version, [op])


class MiniFollow:
    """A MiniAuthority follow stream; cancel() ends it (from any thread)."""

    def __init__(self, authority: MiniAuthority, session_id: str, from_version: int):
        self._a, self._sid, self._next = authority, session_id, from_version + 1
        self._cancelled = False

    def cancel(self) -> None:
        with self._a._changed:
            self._cancelled = True
            self._a._changed.notify_all()

    def __iter__(self) -> Iterator[cache_authority_pb2.SyncResponse]:
        a = self._a
        while True:
            with a._changed:
                a._changed.wait_for(
                    lambda: (
                        self._cancelled
                        or self._sid not in a.log
                        or len(a.log[self._sid]) >= self._next
                    ),
                    timeout=30,
                )
                if self._cancelled:
                    return
                if self._sid not in a.log:
                    raise WorkerError("NOT_FOUND", f"no session {self._sid}")
                patch = a.log[self._sid][self._next - 1]
            time.sleep(a.follow_delay_s)
            self._next += 1
            yield cache_authority_pb2.SyncResponse(
                delta=cache_authority_pb2.PatchDelta(patch=patch, final=True)
            )
