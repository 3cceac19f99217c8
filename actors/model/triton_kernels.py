"""Paged attention in Triton: one kernel for mixed prefill + decode batches over 16-token blocks.

Reads the paged cache in place (`[num_blocks, block_size, kv_heads, head_dim]`, one layer), so
no step ever copies a sequence's KV out of its blocks. The model is vLLM's Triton "unified
attention" (the same work split; this is our own, smaller code):

  - The batch is flat: sequence s owns query rows `cu_q[s] .. cu_q[s+1]` and attends to its first
    `seq_lens[s]` cache positions (its earlier context plus its new tokens, already stored).
    Query i of a chunk sits at position `seq_lens[s] - q_len + i` and sees keys at positions
    `<=` that: causal for a fresh prefill, for a chunk continuing a cached prefix and for a
    decode alike.
  - One program handles `Q_PER_PROGRAM` consecutive queries of one sequence for one KV head,
    together with the `GROUP` query heads sharing that KV head (GQA without copying KV): its
    `ROWS = Q_PER_PROGRAM * GROUP` query rows (padded to a power of two, at least 16 for
    `tl.dot`) share every K/V tile it loads. Program ids are assigned per sequence from
    `cu_q[s] // Q_PER_PROGRAM + s`, an upper bound that needs no host sync: the grid depends
    only on the number of tokens and sequences (CUDA graphs replay it as captured).
  - Keys are walked in `TILE`-position tiles, each position's block looked up in the block
    table; online softmax in fp32.
  - Decode-only batches that would leave the GPU idle split each sequence's keys into
    `num_segments` parts (split-KV); `merge_segments` combines the partial results.

Launch on CUDA, or on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1`, set before
this module is imported): that is how CI checks the kernels against SDPA without a GPU.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MIN_DOT = 16  # tl.dot needs every dimension >= 16


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _sequence_of_program(cu_q_ptr, pid, num_seqs, Q_PER_PROGRAM: tl.constexpr):
    """The last sequence whose first program id (cu_q[s] // Q_PER_PROGRAM + s) is <= pid."""
    lo: tl.int32 = 0
    hi: tl.int32 = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        first = tl.load(cu_q_ptr + mid) // Q_PER_PROGRAM + mid
        if first <= pid:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit(do_not_specialize=["num_seqs"])  # a batch of one must not compile its own kernel
def _paged_attention_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, cu_q_ptr,
    part_out_ptr, part_max_ptr, part_sum_ptr,
    scale, num_seqs,
    q_stride_t, q_stride_h, o_stride_t, o_stride_h,
    k_stride_b, k_stride_s, k_stride_h, v_stride_b, v_stride_s, v_stride_h, table_stride,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
    ROWS: tl.constexpr, Q_PER_PROGRAM: tl.constexpr, NUM_SEGMENTS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kv_head = tl.program_id(1)
    segment = tl.program_id(2)
    seq = _sequence_of_program(cu_q_ptr, pid, num_seqs, Q_PER_PROGRAM)
    q_start = tl.load(cu_q_ptr + seq)
    q_len = tl.load(cu_q_ptr + seq + 1) - q_start
    local = pid - (q_start // Q_PER_PROGRAM + seq)
    if local * Q_PER_PROGRAM >= q_len:
        return  # a spare program of the upper-bound grid
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # positions before this chunk's first query

    rows = tl.arange(0, ROWS)
    q_idx = local * Q_PER_PROGRAM + rows // GROUP  # query index inside the chunk
    head = kv_head * GROUP + rows % GROUP
    row_ok = (rows < Q_PER_PROGRAM * GROUP) & (q_idx < q_len)
    dims = tl.arange(0, HEAD_DIM_P2)
    dim_ok = dims < HEAD_DIM
    tok = (q_start + q_idx).to(tl.int64)
    q = tl.load(q_ptr + tok[:, None] * q_stride_t + head[:, None] * q_stride_h + dims[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    # Keys this program may need: up to its last query's position.
    kv_end = cached + tl.minimum(local * Q_PER_PROGRAM + Q_PER_PROGRAM, q_len)
    num_tiles = tl.cdiv(kv_end, TILE)
    tile_lo = 0
    tile_hi = num_tiles
    if NUM_SEGMENTS > 1:
        per_segment = tl.cdiv(num_tiles, NUM_SEGMENTS)
        tile_lo = segment * per_segment
        tile_hi = tl.minimum(tile_lo + per_segment, num_tiles)

    m = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    total = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM_P2], dtype=tl.float32)
    q_pos = cached + q_idx
    for t in range(tile_lo, tile_hi):
        pos = t * TILE + tl.arange(0, TILE)
        pos_ok = pos < kv_end
        block = tl.load(tables_ptr + seq * table_stride + pos // BLOCK_SIZE,
                        mask=pos_ok, other=0).to(tl.int64)
        slot = pos % BLOCK_SIZE
        k = tl.load(k_ptr + block[None, :] * k_stride_b + slot[None, :] * k_stride_s
                    + kv_head * k_stride_h + dims[:, None],
                    mask=dim_ok[:, None] & pos_ok[None, :], other=0.0)  # [HEAD_DIM_P2, TILE]
        v = tl.load(v_ptr + block[:, None] * v_stride_b + slot[:, None] * v_stride_s
                    + kv_head * v_stride_h + dims[None, :],
                    mask=pos_ok[:, None] & dim_ok[None, :], other=0.0)  # [TILE, HEAD_DIM_P2]
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale
        visible = row_ok[:, None] & (pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # rows that saw no key yet
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m - m_safe)
        total = total * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m = m_new

    if NUM_SEGMENTS == 1:
        out = acc / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * o_stride_t + head[:, None] * o_stride_h + dims[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dim_ok[None, :])
    else:
        part = (tok * NUM_HEADS + head) * NUM_SEGMENTS + segment
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM_P2 + dims[None, :], acc,
                 mask=row_ok[:, None])
        tl.store(part_max_ptr + part, m, mask=row_ok)
        tl.store(part_sum_ptr + part, total, mask=row_ok)


@triton.jit
def _merge_segments_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr, o_stride_t, o_stride_h,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_P2: tl.constexpr,
    NUM_SEGMENTS: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    part = (tok * NUM_HEADS + head) * NUM_SEGMENTS + tl.arange(0, NUM_SEGMENTS)
    seg_max = tl.load(part_max_ptr + part)
    weight = tl.exp(seg_max - tl.max(seg_max, axis=0))  # empty segments: exp(-inf) = 0
    total = tl.sum(tl.load(part_sum_ptr + part) * weight, axis=0)
    dims = tl.arange(0, HEAD_DIM_P2)
    acc = tl.load(part_out_ptr + part[:, None] * HEAD_DIM_P2 + dims[None, :])
    out = tl.sum(acc * weight[:, None], axis=0) / total
    tl.store(out_ptr + tok * o_stride_t + head * o_stride_h + dims, out.to(out_ptr.dtype.element_ty),
             mask=dims < HEAD_DIM)


def launch_shape(num_heads: int, num_kv_heads: int) -> tuple[int, int]:
    """(ROWS, Q_PER_PROGRAM): a program's query rows and how many queries they cover."""
    group = num_heads // num_kv_heads
    rows = max(MIN_DOT, triton.next_power_of_2(group))
    return rows, rows // group


def num_programs(num_tokens: int, num_seqs: int, num_heads: int, num_kv_heads: int) -> int:
    """Programs along the query axis: an upper bound of sum(ceil(q_len / Q_PER_PROGRAM))."""
    return num_tokens // launch_shape(num_heads, num_kv_heads)[1] + num_seqs


def decode_segments(programs: int, multiprocessors: int, max_segments: int = 16) -> int:
    """Split-KV factor for a decode-only batch: enough programs for ~4 per multiprocessor."""
    want = 4 * multiprocessors
    if programs >= want:
        return 1
    return min(max_segments, triton.next_power_of_2(-(-want // programs)))


def paged_attention(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                    cu_q: torch.Tensor, seq_lens: torch.Tensor, block_table: torch.Tensor,
                    scale: float, num_segments: int = 1, tile: int = 2 * MIN_DOT,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """q `[T, H, D]`; k/v pages `[num_blocks, block_size, Hkv, D]`; cu_q `[N + 1]`, seq_lens
    `[N]`, block_table `[N, W]` int32 -> `[T, H, D]`. KV of the new tokens must be stored.
    `tile`: key positions per inner step (vLLM: 32 with prefills, 16 for decodes)."""
    t, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_pages.shape
    for x in (q, k_pages, v_pages):
        assert x.stride(-1) == 1, "the head dimension must be contiguous"
    assert block_table.dtype == torch.int32 and block_table.stride(-1) == 1
    assert num_segments & (num_segments - 1) == 0, "num_segments must be a power of two"
    if q.device.type != "cuda" and not interpreting():
        raise RuntimeError("Triton attention on CPU tensors needs TRITON_INTERPRET=1")
    out = torch.empty_like(q) if out is None else out
    num_seqs = seq_lens.numel()
    rows, per_program = launch_shape(num_heads, num_kv_heads)
    head_dim_p2 = max(MIN_DOT, triton.next_power_of_2(head_dim))
    grid = (num_programs(t, num_seqs, num_heads, num_kv_heads), num_kv_heads, num_segments)
    parts = [out, out, out]  # unused pointers when there is one segment
    if num_segments > 1:
        parts = [torch.empty(t, num_heads, num_segments, head_dim_p2, dtype=torch.float32,
                             device=q.device),
                 torch.empty(t, num_heads, num_segments, dtype=torch.float32, device=q.device),
                 torch.empty(t, num_heads, num_segments, dtype=torch.float32, device=q.device)]
    _paged_attention_kernel[grid](
        out, q, k_pages, v_pages, block_table, seq_lens, cu_q, *parts,
        scale, num_seqs,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_pages.stride(0), k_pages.stride(1), k_pages.stride(2),
        v_pages.stride(0), v_pages.stride(1), v_pages.stride(2), block_table.stride(0),
        NUM_HEADS=num_heads, GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        HEAD_DIM_P2=head_dim_p2, BLOCK_SIZE=block_size,
        TILE=tile,
        ROWS=rows, Q_PER_PROGRAM=per_program, NUM_SEGMENTS=num_segments,
        # fp32 stays exact (no TF32); half precision uses Triton's default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
    )
    if num_segments > 1:
        _merge_segments_kernel[(t, num_heads)](
            out, *parts, out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            HEAD_DIM_P2=head_dim_p2, NUM_SEGMENTS=num_segments,
        )
    return out
