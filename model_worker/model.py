"""Loading the causal model and its tokenizer, and describing them (`Info`).

The model is loaded once per process, switched to the row-recording attention function
(`attention.py`), and never trained or changed afterwards. Its description — geometry, RoPE,
special ids, fingerprint — is what the authority checks every patch's tensors against.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from cache_authority.state import Geometry
from model_worker import attention
from model_worker.lean_llama import LeanLlama, unsupported
from positronic.rope import Rope
from positronic.special_tokens import TextEncoder, special_id
from positronic.token_text import TokenTable

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

FORWARDS = ("lean", "hf")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Config keys that describe the library or the load, not the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype")


@dataclass(frozen=True)
class SpecialIds:
    """Ids of the tokenizer's special tokens; None where it has none."""

    bos: int | None
    eos: int | None
    pad: int | None
    unk: int | None
    all: frozenset[int]


@dataclass
class LoadedModel:
    """A causal LM ready for read-only forwards, with its tokenizer and description."""

    name: str
    model: PreTrainedModel  # eval mode, attention implementation = attention.NAME
    tokenizer: object
    geometry: Geometry  # L, H, D, dtype, RoPE, vocabulary, positions, fingerprint
    special: SpecialIds
    num_attention_heads: int
    encoder: TextEncoder  # the only way text becomes ids (never a special id)
    table: TokenTable  # each id's vocabulary piece and the bytes it adds to text
    # The worker's forward (lean_llama.py) where it reproduces the model; None: the library's.
    lean: LeanLlama | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.geometry.dtype

    @property
    def vocab_size(self) -> int:
        return self.geometry.vocab_size

    @property
    def max_positions(self) -> int:
        return self.geometry.max_position_embeddings


def choose_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but CUDA is not available")
    return torch.device(device)


def choose_dtype(dtype: str, device: torch.device, checkpoint_dtype: torch.dtype | None):
    """`auto`: float32 on CPU (bf16/fp16 matmuls there are slow and lossy); the checkpoint's own
    dtype on an accelerator."""
    if dtype != "auto":
        return DTYPES[dtype]
    if device.type == "cpu" or checkpoint_dtype not in DTYPES.values():
        return torch.float32
    return checkpoint_dtype


def fingerprint(model: PreTrainedModel) -> str:
    """sha256 over the config (minus library/load keys) and every weight's name, dtype, shape and
    bytes as loaded. Two workers agree iff they would compute the same K/V."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    return h.hexdigest()


def special_ids(tokenizer) -> SpecialIds:
    return SpecialIds(
        bos=special_id(tokenizer, "bos"),
        eos=special_id(tokenizer, "eos"),
        pad=special_id(tokenizer, "pad"),
        unk=special_id(tokenizer, "unk"),
        all=frozenset(int(i) for i in getattr(tokenizer, "all_special_ids", ()) or ()),
    )


def describe(name: str, model: PreTrainedModel, tokenizer, forward: str = "lean") -> LoadedModel:
    """Wrap a loaded causal LM: switch its attention, compute geometry and fingerprint, and pick
    the forward (`lean` where lean_llama.py reproduces the model, else the library's; `hf`: the
    library's always)."""
    if forward not in FORWARDS:
        raise ValueError(f"forward must be one of {', '.join(FORWARDS)}, got {forward!r}")
    attention.install(model)
    model.eval()
    config = model.config.get_text_config(decoder=True)
    params = dict(getattr(config, "rope_parameters", None) or {})
    n_heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // n_heads)
    dtype = next(model.parameters()).dtype
    scaling = {
        k: float(v)
        for k, v in params.items()
        if k not in ("rope_type", "rope_theta") and isinstance(v, int | float)
    }
    geometry = Geometry(
        num_layers=int(config.num_hidden_layers),
        num_kv_heads=int(getattr(config, "num_key_value_heads", None) or n_heads),
        head_dim=head_dim,
        dtype=dtype,
        rope=Rope.from_config(config),
        vocab_size=int(config.vocab_size),
        model_fingerprint=fingerprint(model),
        max_position_embeddings=int(config.max_position_embeddings),
        rope_type=str(params.get("rope_type", "default")),
        rope_theta=float(params.get("rope_theta", 10000.0)),
        rope_scaling=tuple(sorted(scaling.items())),
    )
    return LoadedModel(
        name=name,
        model=model,
        tokenizer=tokenizer,
        geometry=geometry,
        special=special_ids(tokenizer),
        num_attention_heads=n_heads,
        encoder=TextEncoder(tokenizer),
        table=TokenTable.from_tokenizer(tokenizer),
        lean=_lean_forward(name, model) if forward == "lean" else None,
    )


def _lean_forward(name: str, model: PreTrainedModel) -> LeanLlama | None:
    reason = unsupported(model)
    if reason is not None:
        logger.info("model %s: the library's forward (%s)", name, reason)
        return None
    return LeanLlama(model)


def load_model(
    name: str,
    *,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
    forward: str = "lean",
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a directory or hub id (tokenizer: same place by
    default)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dev = choose_device(device)
    config = AutoConfig.from_pretrained(name)
    checkpoint_dtype = getattr(config, "dtype", None)
    if isinstance(checkpoint_dtype, str):
        checkpoint_dtype = DTYPES.get(checkpoint_dtype)
    dt = choose_dtype(dtype, dev, checkpoint_dtype)
    logger.info("loading model %s on %s as %s", name, dev, dt)
    model = AutoModelForCausalLM.from_pretrained(name, dtype=dt).to(dev)
    tok = AutoTokenizer.from_pretrained(tokenizer or name)
    loaded = describe(name, model, tok, forward)
    logger.info(
        "model %s loaded: %d layers, %d kv heads, head dim %d, fingerprint %s",
        name,
        loaded.geometry.num_layers,
        loaded.geometry.num_kv_heads,
        loaded.geometry.head_dim,
        loaded.geometry.model_fingerprint[:16],
    )
    return loaded


def check_session_geometry(session: Geometry, model: Geometry) -> None:
    """A worker only computes on sessions created for its model (same shape, dtype and, when the
    session names one, the same fingerprint)."""
    from model_worker.errors import WorkerError

    mine = (model.num_layers, model.num_kv_heads, model.head_dim, model.dtype)
    theirs = (session.num_layers, session.num_kv_heads, session.head_dim, session.dtype)
    if mine != theirs:
        raise WorkerError(
            "FAILED_PRECONDITION",
            f"session geometry (L, H, D, dtype) {theirs} does not fit this model's {mine}",
        )
    if session.model_fingerprint and session.model_fingerprint != model.model_fingerprint:
        raise WorkerError(
            "FAILED_PRECONDITION",
            f"session was created for model {session.model_fingerprint[:16]}, "
            f"this worker serves {model.model_fingerprint[:16]}",
        )
