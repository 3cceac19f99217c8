"""The `triton` attention backend: paged attention over the cache's blocks in place (CUDA).

Any block size (16 by default), mixed prefill + decode batches, chunked prefill continuing a
cached prefix, GQA: one launch per layer of `triton_kernels.paged_attention` (two for a
decode-only batch split over its keys). Unlike the `flash_attn` backend with 16-token blocks
and the `sdpa` backend on CUDA, it never gathers a sequence's KV into a packed copy.

`prepare` builds the step's metadata (query offsets, context lengths, block tables) in one
int32 host buffer moved to the device in one copy. CUDA graphs build the same `TritonMeta`
from their persistent buffers instead (`cuda_graphs.DecodeGraphRunner`); `forward` chooses
its launch from shapes only, so a captured graph replays exactly what an eager step runs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actors.model.batch import StepBatch
from kv.cache import KVCache

DECODE_TILE = 16  # vLLM's split: short tiles for decodes, 32-position tiles with prefills
PREFILL_TILE = 32


@dataclass
class TritonMeta:
    cu_q: torch.Tensor  # [N + 1] int32: sequence s owns query rows cu_q[s] .. cu_q[s + 1]
    seq_lens: torch.Tensor  # [N] int32: positions attended by its last query (cached + new)
    block_table: torch.Tensor  # [N, W] int32: W covers the longest context of the step
    decode_only: bool


class TritonAttnBackend:
    name = "triton"
    supports_cuda_graphs = True

    def __init__(self, device: torch.device, multiprocessors: int | None = None) -> None:
        # Imported here: this module (and TritonMeta, which CUDA graphs use) loads without Triton.
        from actors.model import triton_kernels

        self.kernels = triton_kernels
        # Split-KV decoding aims at a few programs per multiprocessor (SM).
        if multiprocessors is None:
            multiprocessors = (torch.cuda.get_device_properties(device).multi_processor_count
                               if device.type == "cuda" else 1)
        self.multiprocessors = multiprocessors

    def prepare(self, batch: StepBatch, cache: KVCache) -> TritonMeta:
        spans = batch.prefills + batch.decodes  # the batch's row order
        n, bs = len(spans), batch.block_size
        q_lens = np.fromiter((s.num_tokens for s in spans), np.int32, n)
        seq_lens = np.fromiter((s.context_len for s in spans), np.int32, n)
        used = -(-seq_lens // bs)  # blocks each sequence reads
        width = int(used.max())
        host = np.zeros(2 * n + 1 + n * width, dtype=np.int32)
        np.cumsum(q_lens, out=host[1 : n + 1])
        host[n + 1 : 2 * n + 1] = seq_lens
        table = host[2 * n + 1 :].reshape(n, width)
        for row, (span, k) in enumerate(zip(spans, used.tolist())):
            table[row, :k] = span.block_table[:k]
        dev = torch.from_numpy(host).to(batch.input_ids.device)
        return TritonMeta(cu_q=dev[: n + 1], seq_lens=dev[n + 1 : 2 * n + 1],
                          block_table=dev[2 * n + 1 :].view(n, width),
                          decode_only=bool(q_lens.max() == 1))

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache, meta: TritonMeta) -> torch.Tensor:
        k_pages, v_pages = cache.paged(layer)
        t, heads, head_dim = q.shape
        segments, tile = 1, PREFILL_TILE
        if meta.decode_only:
            kv_heads = k_pages.shape[2]
            programs = self.kernels.num_programs(t, meta.seq_lens.numel(), heads, kv_heads)
            segments = self.kernels.decode_segments(programs * kv_heads, self.multiprocessors)
            tile = DECODE_TILE
        return self.kernels.paged_attention(q, k_pages, v_pages, meta.cu_q, meta.seq_lens,
                                            meta.block_table, head_dim**-0.5,
                                            num_segments=segments, tile=tile)

