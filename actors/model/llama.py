"""Our Llama forward pass over a flattened mixed batch (prefill chunks + decodes).

Every token of the step goes through each layer's matmuls together (one GEMM per projection
per layer, whatever the mix); only attention looks at sequence boundaries, through the backend.
Logits are computed only for the rows that sample. Q/K/V and gate/up projections are fused into
one weight each at load time: fewer, larger GEMMs.

On CPU the activations, norms and rotary tables are always fp32; `dtype` says how the weights
and the KV cache are stored. bf16 halves the bytes every decode step streams and, through
cpu_kernels.linear_bf16 (AVX512-BF16), doubles the GEMM rate of prefills and large batches:
weights packed once at load, activations rounded to bf16 at each projection's input, sums in
fp32. fp32 stays exact (oneDNN's fp32 GEMM). On GPUs everything runs in the model dtype.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from actors.model import cpu_kernels
from actors.model.attention import AttentionBackend
from actors.model.batch import StepBatch
from actors.model.config import ModelConfig, ModelLoadError
from actors.model.loader import LoadedModel
from actors.model.rotary import RotaryEmbedding, apply_rotary
from kv.cache import KVCache

Weight = Any  # a plain tensor, or a cpu_kernels.PackedWeight


@dataclass(frozen=True)
class Projections:
    """How this device and dtype store projection weights and multiply by them."""
    name: str
    prepare: Callable[[torch.Tensor], Weight]  # once, at load
    apply: Callable[[torch.Tensor, Weight], torch.Tensor]  # x @ w.T, in the activation dtype


def projections(device: torch.device, dtype: torch.dtype) -> Projections:
    """CPU fp32: oneDNN's linear, 10% faster than the MKL sgemm behind F.linear on 1,000-row
    prefills and 30-45% faster on 1-256-row decode batches (AVX-512, cold weights);
    `FLUIDSERVE_ONEDNN=0` falls back to F.linear. CPU bf16: the packed AVX512-BF16 kernel where
    it builds, else torch's bf16 GEMM on an input cast to bf16. Elsewhere: F.linear."""
    def same(w: torch.Tensor) -> Weight:
        return w

    if device.type != "cpu":
        return Projections("torch", same, F.linear)
    if dtype == torch.float32:
        op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
        if op is None or not torch.backends.mkldnn.is_available() \
                or os.environ.get("FLUIDSERVE_ONEDNN", "1") == "0":
            return Projections("torch", same, F.linear)
        return Projections("onednn-fp32", same, lambda x, w: op(x, w, None, "none", [], ""))
    if dtype == torch.bfloat16 and cpu_kernels.linear_bf16_available():
        def prepare(w: torch.Tensor) -> Weight:
            return cpu_kernels.pack_bf16(w) if cpu_kernels.can_pack(w) else w
        return Projections("avx512-bf16", prepare, _apply_packed)
    return Projections(f"torch-{str(dtype).removeprefix('torch.')}", same,
                       lambda x, w: F.linear(x.to(w.dtype), w).float())


def _apply_packed(x: torch.Tensor, w: Weight) -> torch.Tensor:
    if isinstance(w, cpu_kernels.PackedWeight):
        return cpu_kernels.linear_bf16(x, w)
    return F.linear(x.to(w.dtype), w).float()  # a shape the kernel does not take


@dataclass
class LayerWeights:
    input_norm: torch.Tensor  # [hidden]
    qkv: Weight  # [q_size + 2 * kv_size, hidden]
    o: Weight  # [hidden, q_size]
    post_norm: torch.Tensor  # [hidden]
    gate_up: Weight  # [2 * intermediate, hidden]
    down: Weight  # [hidden, intermediate]


class LlamaModel:
    def __init__(self, loaded: LoadedModel) -> None:
        self.config: ModelConfig = loaded.config
        self.device, self.dtype = loaded.device, loaded.dtype
        # CPU: fp32 activations whatever the storage dtype (see the module docstring).
        self.act_dtype = torch.float32 if self.device.type == "cpu" else self.dtype
        self.proj = projections(self.device, self.dtype)
        self.linear = self.proj.apply  # x @ w.T for this model's weights (the name callers knew)
        w = dict(loaded.weights)
        loaded.weights = {}  # the fused copies below replace them; let the originals go
        try:
            embed = w.pop("model.embed_tokens.weight")
            self.final_norm = w.pop("model.norm.weight").to(self.act_dtype)
            self.layers = [self._layer(w, i) for i in range(self.config.num_layers)]
            # Tied models share the embedding matrix (a checkpoint may still carry a copy).
            head = w.pop("lm_head.weight", None)
            tied = self.config.tie_word_embeddings or head is None
        except KeyError as exc:
            raise ModelLoadError(f"{loaded.name}: missing weight {exc.args[0]}") from None
        self.lm_head = self.proj.prepare(embed if tied else head)
        # A tied, packed head is also the embedding table: its rows are read back from it.
        self.embed = self.lm_head if tied and not isinstance(self.lm_head, torch.Tensor) else embed
        c = self.config
        self.rotary = RotaryEmbedding(c.head_dim, c.max_model_len, c.rope_theta, c.rope_scaling,
                                      self.device, self.act_dtype)
        # CPU: the elementwise steps as C kernels, their outputs in the projections' input dtype.
        self.fused = self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16) \
            and cpu_kernels.elementwise_available()
        self.proj_input_dtype = torch.bfloat16 if self.proj.name == "avx512-bf16" else torch.float32

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> LayerWeights:
        p = f"model.layers.{i}."
        qkv = [w.pop(p + f"self_attn.{n}_proj.weight") for n in ("q", "k", "v")]
        gate_up = [w.pop(p + f"mlp.{n}_proj.weight") for n in ("gate", "up")]
        prepare, act = self.proj.prepare, self.act_dtype
        return LayerWeights(
            input_norm=w.pop(p + "input_layernorm.weight").to(act),
            qkv=prepare(torch.cat(qkv).contiguous()),
            o=prepare(w.pop(p + "self_attn.o_proj.weight")),
            post_norm=w.pop(p + "post_attention_layernorm.weight").to(act),
            gate_up=prepare(torch.cat(gate_up).contiguous()),
            down=prepare(w.pop(p + "mlp.down_proj.weight")),
        )

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.embed, cpu_kernels.PackedWeight):
            return self.embed.rows(ids).to(self.act_dtype)
        return F.embedding(ids, self.embed).to(self.act_dtype)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        eps = self.config.rms_norm_eps
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, eps)
        # Half precision: normalise in fp32 and cast back before the weight, as transformers does.
        return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight

    # -- the per-layer elementwise steps: torch ops, or one C call each on CPU ----------------
    def add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                 weight: torch.Tensor | None) -> torch.Tensor | None:
        """h += delta (in place), then RMSNorm(h) * weight (None without a weight)."""
        if self.fused:
            return cpu_kernels.add_rms_norm(h, delta, weight, self.config.rms_norm_eps,
                                            self.proj_input_dtype)
        if delta is not None:
            h.add_(delta)
        return self.rms_norm(h, weight) if weight is not None else None

    def mlp_act(self, gate_up: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu_kernels.silu_mul(gate_up, self.proj_input_dtype)
        i = self.config.intermediate_size
        return F.silu(gate_up[:, :i]).mul_(gate_up[:, i:])

    def qkv_store(self, layer: int, qkv: torch.Tensor, batch: StepBatch, cache: KVCache,
                  rope: tuple[torch.Tensor, torch.Tensor] | None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotary q/k from the fused projection; k/v written to the cache. Attention sees k/v
        as stored (bf16 KV on CPU): a prefill reads the same values whether they come fresh or
        from the cache in a later chunk."""
        c = self.config
        if self.fused:
            k_cache, v_cache = cache.flat(layer)
            return cpu_kernels.rope_store(qkv, self.rotary.cos, self.rotary.sin, batch.positions,
                                          batch.slot_mapping, k_cache, v_cache, c.num_heads,
                                          c.num_kv_heads, c.head_dim)
        assert rope is not None
        cos, sin = rope
        t = qkv.shape[0]
        q = apply_rotary(qkv[:, : c.q_size].view(t, c.num_heads, c.head_dim), cos, sin)
        k = apply_rotary(qkv[:, c.q_size : c.q_size + c.kv_size]
                         .view(t, c.num_kv_heads, c.head_dim), cos, sin)
        v = qkv[:, c.q_size + c.kv_size :].view(t, c.num_kv_heads, c.head_dim)
        k, v = k.to(cache.k.dtype), v.to(cache.k.dtype)
        cache.write(layer, k, v, batch.slot_mapping)
        return q, k, v

    @torch.inference_mode()
    def forward(self, batch: StepBatch, cache: KVCache, backend: AttentionBackend,
                meta: object) -> torch.Tensor:
        """Run one step; returns fp32 logits `[num_sampled_rows, vocab]`."""
        c, linear, layers = self.config, self.proj.apply, self.layers
        t = batch.num_tokens
        rope = None if self.fused else self.rotary.tables(batch.positions)
        h = self.embed_tokens(batch.input_ids)
        x = self.add_norm(h, None, layers[0].input_norm)
        for i, layer in enumerate(layers):
            q, k, v = self.qkv_store(i, linear(x, layer.qkv), batch, cache, rope)
            attn = backend.forward(i, q, k, v, cache, meta)
            x = self.add_norm(h, linear(attn.view(t, c.q_size), layer.o), layer.post_norm)
            act = self.mlp_act(linear(x, layer.gate_up))
            # The next layer's input norm; after the last one only the sampled rows get one.
            x = self.add_norm(h, linear(act, layer.down),
                              layers[i + 1].input_norm if i + 1 < len(layers) else None)
        last = self.rms_norm(h.index_select(0, batch.sample_rows), self.final_norm)
        return linear(last, self.lm_head).float()
