"""Llama's forward written out over the replica's slot buffers: the worker's per-token pass.

Hugging Face's `LlamaForCausalLM.forward` is the reference; this is the same arithmetic in the same
order and dtypes (RMSNorm in float32 then cast, RoPE with the model's own `inv_freq` and
`attention_scaling`, `torch.nn.functional.scaled_dot_product_attention` with the same boolean mask
and scale, SiLU-gated MLP, `lm_head` on the kept positions only) on the model's own weight
tensors, so it agrees with the reference to float rounding (tests/test_lean_llama.py checks
logits, K/V and attention rows against it, with GQA, RoPE scaling and half precision).

Why write it out: on a small model the forward is all per-op overhead, not arithmetic. Measured on
stories260K (5 layers, 64 wide), the library's forward spends ~6 ms a token in module calls,
keyword plumbing, config lookups, mask building, the Cache protocol and output dataclasses around
~300 tensor ops; this pass issues ~20 ops a layer and calls no module. On a large model (TinyLlama
on CPU) the matmuls dominate and both cost the same. Nothing is fused or copied: the weights are
the model's tensors, read as they are.

It serves only what the worker asks of a forward (forward.py's `run`): new tokens at explicit
rotary positions, an explicit [q, N + q] boolean mask over the live rows and the new tokens, the
new tokens' K/V written into the free slots after the live rows, logits for the kept queries, and
the newest query's attention row in the layers a recorder names. Models it cannot reproduce
exactly (another architecture, another activation, per-layer attention types) return a reason
from `unsupported` and keep the library's forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from model_worker.attention import newest_query_row
from positronic.rope import rotate_half

SUPPORTED_TYPES = ("llama",)
# RoPE types whose inv_freq is fixed at load (read once here); the others update it per forward.
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def unsupported(model: Any) -> str | None:
    """Why this module cannot run the model exactly as the library does (None: it can)."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {SUPPORTED_TYPES}"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} (only silu)"
    if int(getattr(config, "pretraining_tp", 1) or 1) != 1:
        return "pretraining_tp > 1"
    rope = dict(getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE_TYPES:
        # dynamic / longrope change inv_freq during the library's forward, which this one skips
        return f"RoPE type {str(rope)[:32]!r} (only {', '.join(STATIC_ROPE_TYPES)})"
    layer_types = getattr(config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return "layers other than full attention"
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(model, "lm_head"):
        return "not a LlamaForCausalLM module layout"
    return None


@dataclass(frozen=True)
class _Linear:
    """A projection's weight [out, in] and bias [out] | None, called without the module."""

    weight: torch.Tensor
    bias: torch.Tensor | None

    @classmethod
    def of(cls, module: torch.nn.Module) -> _Linear:
        return cls(module.weight, getattr(module, "bias", None))  # type: ignore[arg-type]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class _Layer:
    input_norm: torch.Tensor  # [hidden]
    q: _Linear
    k: _Linear
    v: _Linear
    o: _Linear
    post_norm: torch.Tensor  # [hidden]
    gate: _Linear
    up: _Linear
    down: _Linear


class LeanLlama:
    """A read-only forward over a LlamaForCausalLM's own weights (never changed here)."""

    def __init__(self, model: Any):  # a LlamaForCausalLM
        reason = unsupported(model)
        if reason is not None:
            raise ValueError(f"the lean forward cannot run this model: {reason}")
        config = model.config
        inner = model.model
        self.embed: torch.Tensor = inner.embed_tokens.weight  # [V, hidden]
        self.final_norm: torch.Tensor = inner.norm.weight
        self.lm_head = _Linear.of(model.lm_head)
        self.eps = float(config.rms_norm_eps)
        self.n_heads = int(config.num_attention_heads)
        self.n_kv = int(getattr(config, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // self.n_heads)
        self.scaling = self.head_dim**-0.5
        rotary = inner.rotary_emb
        self.inv_freq: torch.Tensor = rotary.inv_freq  # [D/2] float32, the model's own buffer
        self.attention_scaling = float(getattr(rotary, "attention_scaling", 1.0))
        self.layers = [
            _Layer(
                layer.input_layernorm.weight,
                _Linear.of(layer.self_attn.q_proj),
                _Linear.of(layer.self_attn.k_proj),
                _Linear.of(layer.self_attn.v_proj),
                _Linear.of(layer.self_attn.o_proj),
                layer.post_attention_layernorm.weight,
                _Linear.of(layer.mlp.gate_proj),
                _Linear.of(layer.mlp.up_proj),
                _Linear.of(layer.mlp.down_proj),
            )
            for layer in inner.layers
        ]
        for layer, norm in ((inner.layers[0], "input_layernorm"), (inner, "norm")):
            eps = getattr(getattr(layer, norm), "variance_epsilon", self.eps)
            if float(eps) != self.eps:
                raise ValueError("the model's RMSNorm epsilons differ from its config")

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # LlamaRMSNorm: float32 statistics, cast back, then the weight. In float32 that is one
        # op with the weight folded in (the same products; ~1/3 cheaper on a small model).
        if x.dtype == torch.float32 and weight.dtype == torch.float32:
            return torch.rms_norm(x, (x.shape[-1],), weight, self.eps)
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos, sin [q, D] as LlamaRotaryEmbedding computes them (float32, scaled, cast)."""
        freqs = positions.float()[:, None] * self.inv_freq.float()[None, :]  # [q, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(dtype)
        sin = (emb.sin() * self.attention_scaling).to(dtype)
        return cos, sin

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return x * cos + rotate_half(x) * sin

    def forward(
        self,
        token_ids: torch.Tensor,  # [q] long
        positions: torch.Tensor,  # [q] long
        mask: torch.Tensor | None,  # [q, N + q] bool, True attends; None: all (q = 1 only)
        keys: torch.Tensor,  # [L, H, S, D] slot buffers: live rows at [first, first + N)
        values: torch.Tensor,
        first: int,
        count: int,
        keep: torch.Tensor,  # [k] long: queries whose logits come back
        row_layers: frozenset[int] = frozenset(),
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Logits [k, V] (model dtype) and, per layer in row_layers, the newest query's
        attention row [nH, N + q]; writes the new tokens' K/V into slots [first + N, + q)."""
        q = token_ids.shape[0]
        start = first + count
        h, d = self.n_kv, self.head_dim
        x = F.embedding(token_ids, self.embed)  # [q, hidden]
        cos, sin = self._rope(positions, x.dtype)  # [q, D]
        attn_mask = mask[None, None] if mask is not None else None  # [1, 1, q, N + q]
        rows: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            y = self._norm(x, layer.input_norm)
            # Queries and keys rotated in one go (each element's products are the same).
            qk = torch.cat((layer.q(y).view(q, self.n_heads, d), layer.k(y).view(q, h, d)), 1)
            qk = self._rotate(qk.transpose(0, 1), cos, sin)  # [nH + H, q, D]
            qs, ks = qk[: self.n_heads], qk[self.n_heads :]
            vs = layer.v(y).view(q, h, d).transpose(0, 1)  # [H, q, D]
            keys[i, :, start : start + q] = ks
            values[i, :, start : start + q] = vs
            k_all = keys[i, None, :, first : start + q]  # [1, H, N + q, D]
            v_all = values[i, None, :, first : start + q]
            out = F.scaled_dot_product_attention(
                qs[None],
                k_all,
                v_all,
                attn_mask=attn_mask,
                scale=self.scaling,
                enable_gqa=self.n_heads != h,
            )  # [1, nH, q, D]
            if i in row_layers:
                rows[i] = newest_query_row(qs[None], k_all, attn_mask, self.scaling)[0, :, 0]
            x = x + layer.o(out[0].transpose(0, 1).reshape(q, self.n_heads * d))
            y = self._norm(x, layer.post_norm)
            x = x + layer.down(F.silu(layer.gate(y)) * layer.up(y))
        x = self._norm(x[keep], self.final_norm)
        return self.lm_head(x), rows
