"""The KV write of one layer as one Triton kernel (CUDA; CPU tensors under TRITON_INTERPRET=1).

`torch.index_copy_` writes K and V in two launches and cannot skip rows; this kernel stores
each new token's K and V row (`kv_heads * head_dim` values) at its slot in one launch, and
skips slots < 0: the padding rows of a CUDA-graph batch write nothing. nano-vllm's
`store_kvcache` is the model. Imported lazily by kv.cache, only where Triton is used.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, k_stride, v_stride,
                     ROW: tl.constexpr, ROW_P2: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    if slot < 0:
        return
    cols = tl.arange(0, ROW_P2)
    ok = cols < ROW
    k = tl.load(k_ptr + token * k_stride + cols, mask=ok)
    v = tl.load(v_ptr + token * v_stride + cols, mask=ok)
    tl.store(k_cache_ptr + slot * ROW + cols, k, mask=ok)
    tl.store(v_cache_ptr + slot * ROW + cols, v, mask=ok)


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slots: torch.Tensor) -> None:
    """k/v `[T, kv_heads, head_dim]` (rows may be strided views) -> cache `[num_slots, kv_heads,
    head_dim]` (contiguous) at `slots` `[T]`; slot -1 skips its row."""
    t, heads, dim = k.shape
    row = heads * dim
    for x in (k, v):  # one token's K (or V) must be one contiguous run of `row` values
        assert x.stride(2) == 1 and x.stride(1) == dim, "k/v rows must be contiguous"
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert k_cache.shape[1:] == (heads, dim) and slots.numel() == t
    if t == 0:
        return
    _store_kv_kernel[(t,)](k, v, k_cache, v_cache, slots, k.stride(0), v.stride(0),
                           ROW=row, ROW_P2=triton.next_power_of_2(row))
