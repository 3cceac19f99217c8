"""ModelConfig: the few numbers of a Llama-architecture model our forward pass needs.

Built from a transformers `LlamaConfig` (4.x keeps `rope_theta`/`rope_scaling`, 5.x folds both
into `rope_parameters`; we read either), or from a named shape for `random:<shape>` models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class ModelLoadError(RuntimeError):
    """The model cannot be loaded: missing path, unsupported architecture, unreadable weights."""


# Architectures whose weights and forward are exactly Llama's (no biases, SwiGLU, RMSNorm).
LLAMA_MODEL_TYPES = {"llama"}


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_model_len: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] = field(default_factory=dict)  # {"rope_type": "llama3", ...}
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def layer_params(self) -> int:
        """Weights of one decoder layer that take part in matmuls (norms excluded)."""
        h, i = self.hidden_size, self.intermediate_size
        return h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i

    def flops_per_token(self, context_len: int = 0) -> float:
        """Forward FLOPs of one new token through all layers (LM head excluded)."""
        attention = 4 * context_len * self.q_size  # QK^T and PV
        return self.num_layers * (2 * self.layer_params + attention)

    @property
    def lm_head_flops(self) -> float:
        """FLOPs of the logits of one sampled row."""
        return 2 * self.hidden_size * self.vocab_size

    @classmethod
    def from_hf(cls, hf: Any) -> ModelConfig:
        """Read a transformers LlamaConfig; raises ModelLoadError for other architectures."""
        model_type = getattr(hf, "model_type", None)
        if model_type not in LLAMA_MODEL_TYPES:
            raise ModelLoadError(
                f"unsupported architecture {model_type!r}: fluidserve runs Llama-architecture "
                f"models only ({', '.join(sorted(LLAMA_MODEL_TYPES))})"
            )
        if getattr(hf, "attention_bias", False) or getattr(hf, "mlp_bias", False):
            raise ModelLoadError("Llama variants with attention/MLP biases are not supported")
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = float(rope.pop("rope_theta", getattr(hf, "rope_theta", None) or 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ModelLoadError(f"unsupported rope scaling {rope_type!r} (default, linear, llama3)")
        rope["rope_type"] = rope_type
        heads = hf.num_attention_heads
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.rms_norm_eps),
            max_model_len=int(hf.max_position_embeddings),
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            rope_theta=theta,
            rope_scaling=rope,
            bos_token_id=hf.bos_token_id,
            eos_token_ids=eos_ids,
        )


# Named shapes for `random:<shape>` (vocab None: the default tokenizer's, so real text works).
RANDOM_SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0,
        tie_word_embeddings=True, vocab_size=None,
    ),
    "tiny-llama3": dict(  # untied head + llama3 rope scaling: exercises both code paths
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 256},
        rope_theta=500000.0, vocab_size=None,
    ),
    "smollm2-135m": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
        tie_word_embeddings=True, vocab_size=None, rms_norm_eps=1e-5,
    ),
    "llama-2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, rope_theta=10000.0,
        tie_word_embeddings=False, vocab_size=None, rms_norm_eps=1e-5,
    ),
}


def random_hf_config(shape: str, default_vocab: int, bos: int | None, eos: int | None) -> Any:
    """A transformers LlamaConfig of a named shape (used to build random weights)."""
    from transformers import LlamaConfig

    if shape not in RANDOM_SHAPES:
        raise ModelLoadError(f"unknown random shape {shape!r}; known: {', '.join(RANDOM_SHAPES)}")
    kw = dict(RANDOM_SHAPES[shape])
    if kw.get("vocab_size") is None:
        kw["vocab_size"] = default_vocab
    kw.setdefault("rms_norm_eps", 1e-5)
    if kw["vocab_size"] == default_vocab:
        kw.update(bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return LlamaConfig(**kw)
