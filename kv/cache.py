"""KVCache: the key/value tensors of one model actor, paged in blocks.

Layout per layer: `[num_blocks, block_size, kv_heads, head_dim]` for K and for V (flash-attn's
paged layout), stored as one `[num_layers, ...]` tensor each. Slot `s` is token `s % block_size`
of block `s // block_size`. The scheduler's `kv.blocks.BlockPool` owns which blocks belong to
whom; this class only writes where a step's slot mapping says. Diff plans are checked against
the actor's own copy of every block table (`kv.tables`); a self-contained `Plan` is checked here,
with numpy over the whole plan: every slot lies inside the writing request's own blocks. On CUDA
one Triton kernel (kv/triton_store.py) writes a layer's K and V; `from_budget` sizes the cache
like vLLM (kv/memory.py).
"""
from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from kv.memory import KVBudget, MemorySnapshot, profile_peak
from kv.tables import PlanError
from scheduler.plan import Plan

__all__ = ["KVCache", "KVShape", "PlanError", "validate_plan"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * block_size * self.num_kv_heads * self.head_dim * elem


class KVCache:
    def __init__(self, shape: KVShape, num_blocks: int, block_size: int,
                 device: torch.device, dtype: torch.dtype,
                 triton_store: bool | None = None) -> None:
        if num_blocks <= 0:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.shape, self.num_blocks, self.block_size = shape, num_blocks, block_size
        dims = (shape.num_layers, num_blocks, block_size, shape.num_kv_heads, shape.head_dim)
        self.k = torch.zeros(dims, device=device, dtype=dtype)
        self.v = torch.zeros(dims, device=device, dtype=dtype)
        # CUDA: K and V of a layer written by one Triton kernel that also skips slot -1 (the
        # padding rows of CUDA graphs). Elsewhere, or without Triton: two index_copy_.
        if triton_store is None:
            triton_store = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        self._store = None
        if triton_store:
            from kv.triton_store import store_kv

            self._store = store_kv

    @property
    def skips_negative_slots(self) -> bool:
        """Whether `write` ignores slot -1 (padding rows) instead of failing."""
        return self._store is not None

    @classmethod
    def from_budget(cls, shape: KVShape, block_size: int, device: torch.device,
                    dtype: torch.dtype, cpu_tokens: int = 16384,
                    gpu_memory_utilization: float = 0.9, before: MemorySnapshot | None = None,
                    profile_step: Callable[[], int] | None = None) -> KVCache:
        """CPU: `cpu_tokens` tokens. GPU: what `gpu_memory_utilization` of the device's total
        memory leaves after the weights (already loaded), the peak of `profile_step` and the
        memory used outside torch since `before` (see kv.memory)."""
        if device.type != "cuda":
            return cls(shape, cpu_tokens // block_size, block_size, device, dtype)
        before = before or MemorySnapshot.take(device)
        peak, after = profile_peak(device, profile_step)
        budget = KVBudget.measure(before, after, peak, gpu_memory_utilization)
        num_blocks = budget.kv_bytes // shape.bytes_per_block(block_size, dtype)
        if num_blocks <= 0:
            raise ValueError(f"no room for a KV cache: {budget.describe()}")
        log.info("KV cache: %d blocks of %d tokens; %s", num_blocks, block_size, budget.describe())
        return cls(shape, num_blocks, block_size, device, dtype)

    @property
    def num_slots(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def capacity_tokens(self) -> int:
        return self.num_slots

    def paged(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer as `[num_blocks, block_size, kv_heads, head_dim]`."""
        return self.k[layer], self.v[layer]

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of a layer as `[num_slots, kv_heads, head_dim]` (views, no copy)."""
        s = self.shape
        return (self.k[layer].view(-1, s.num_kv_heads, s.head_dim),
                self.v[layer].view(-1, s.num_kv_heads, s.head_dim))

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store new tokens' K/V `[tokens, kv_heads, head_dim]` at `slots` (validated plans only)."""
        k_flat, v_flat = self.flat(layer)
        if self._store is not None:
            self._store(k, v, k_flat, v_flat, slots)
            return
        k_flat.index_copy_(0, slots, k)
        v_flat.index_copy_(0, slots, v)

    def gather(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V at `slots` (any shape of slot ids) -> `[*slots.shape, kv_heads, head_dim]`."""
        k_flat, v_flat = self.flat(layer)
        flat_slots = slots.reshape(-1)
        out_shape = (*slots.shape, self.shape.num_kv_heads, self.shape.head_dim)
        return (k_flat.index_select(0, flat_slots).view(out_shape),
                v_flat.index_select(0, flat_slots).view(out_shape))

    def validate(self, plan: Plan) -> None:
        """Raise PlanError unless every chunk writes only inside its own blocks of this cache."""
        validate_plan(plan, self.num_blocks, self.block_size)


def validate_plan(plan: Plan, num_blocks: int, block_size: int) -> None:
    """Raise PlanError unless every chunk of a self-contained plan writes only inside its own
    blocks, no two chunks write one slot, and its lengths agree."""
    if plan.block_size != block_size:
        raise PlanError(f"plan block_size {plan.block_size} != the cache's {block_size}")
    ids = [c.request_id for c in plan.chunks]
    if len(set(ids)) != len(ids):
        twice = next(r for r in ids if ids.count(r) > 1)
        raise PlanError(f"{twice}: appears twice in plan {plan.iteration}")
    for chunk in plan.chunks:
        _check_chunk(chunk, num_blocks, block_size)
    if not plan.chunks:
        return
    # Each slot must be exactly where the request's own table puts that position: this is what
    # guarantees a plan never overwrites another request's KV.
    slots = np.concatenate([np.asarray(c.slot_mapping, dtype=np.int64) for c in plan.chunks])
    expected = np.concatenate([_slots_of(c, block_size) for c in plan.chunks])
    bad = slots != expected
    if bad.any():
        k = int(np.argmax(bad))
        owner = plan.chunks[int(np.searchsorted(np.cumsum([c.num_tokens for c in plan.chunks]), k, "right"))]
        raise PlanError(f"{owner.request_id}: slot {int(slots[k])} is not in its block table")
    if len(np.unique(slots)) != len(slots):
        raise PlanError("a chunk writes a slot another request in the plan also writes")


def _check_chunk(chunk, num_blocks: int, block_size: int) -> None:
    rid, n = chunk.request_id, chunk.num_tokens
    if n <= 0 or len(chunk.token_ids) != n or len(chunk.slot_mapping) != n:
        raise PlanError(f"{rid}: num_tokens {n}, {len(chunk.token_ids)} token ids and "
                        f"{len(chunk.slot_mapping)} slots must agree and be positive")
    if chunk.start_pos < 0:
        raise PlanError(f"{rid}: negative start_pos {chunk.start_pos}")
    table = np.asarray(chunk.block_table, dtype=np.int64)
    bad = table[(table < 0) | (table >= num_blocks)]
    if len(bad):
        raise PlanError(f"{rid}: block ids {bad[:4].tolist()} outside the cache's {num_blocks} blocks")
    if len(table) * block_size < chunk.context_len:
        raise PlanError(f"{rid}: {len(table)} blocks cannot hold {chunk.context_len} tokens")
    if len(np.unique(table)) != len(table):
        raise PlanError(f"{rid}: block table repeats a block")


def _slots_of(chunk, block_size: int) -> np.ndarray:
    positions = np.arange(chunk.start_pos, chunk.context_len)
    return np.asarray(chunk.block_table, dtype=np.int64)[positions // block_size] * block_size \
        + positions % block_size
