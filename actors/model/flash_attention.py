"""The flash-attn backend (CUDA only; imported lazily, only where `flash_attn` imports).

One varlen call per layer covers the whole mixed batch: each chunk is a "sequence" whose
queries are its new tokens and whose keys are all its context (causal masks in flash-attn 2.1+
are aligned to the bottom-right corner, exactly a chunk continuing its own prefix).

Upstream flash-attn reads a paged cache directly (`block_table=`) only when the page size is a
multiple of 256. With smaller blocks (fluidserve's default is 16, like vLLM) we gather each
sequence's KV into one packed buffer first and call the unpaged varlen kernel: `attention: auto`
picks the `triton` backend there instead, which reads 16-token blocks in place. Pure-decode
steps on 256-multiple pages use `flash_attn_with_kvcache`, the split-KV decode kernel.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

from actors.model.attention import FLASH_PAGED_BLOCK_MULTIPLE
from actors.model.batch import SeqSpan, StepBatch, padded_block_table
from kv.cache import KVCache


@dataclass
class FlashMeta:
    cu_seqlens_q: torch.Tensor  # [N + 1] int32
    cu_seqlens_k: torch.Tensor  # [N + 1] int32
    seqlens_k: torch.Tensor  # [N] int32
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor | None  # [N, max_blocks] int32 when the cache is read paged
    kv_slots: torch.Tensor | None  # [total_k] long when KV is gathered into a packed buffer
    decode_only: bool


class FlashAttnBackend:
    name = "flash_attn"

    def __init__(self, block_size: int) -> None:
        self.paged = block_size % FLASH_PAGED_BLOCK_MULTIPLE == 0

    def prepare(self, batch: StepBatch, cache: KVCache) -> FlashMeta:
        dev = batch.input_ids.device
        spans: list[SeqSpan] = batch.prefills + batch.decodes  # the row order of the batch
        q_lens = [s.num_tokens for s in spans]
        k_lens = [s.context_len for s in spans]
        block_table = kv_slots = None
        if self.paged:
            block_table = padded_block_table(spans, dev)
        else:
            bs = batch.block_size
            kv_slots = torch.cat([
                torch.tensor(s.block_table, dtype=torch.long).repeat_interleave(bs)[: s.context_len]
                * bs + torch.arange(s.context_len) % bs
                for s in spans
            ]).to(dev)
        return FlashMeta(
            cu_seqlens_q=_cumsum(q_lens, dev), cu_seqlens_k=_cumsum(k_lens, dev),
            seqlens_k=torch.tensor(k_lens, dtype=torch.int32, device=dev),
            max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
            block_table=block_table, kv_slots=kv_slots, decode_only=max(q_lens) == 1,
        )

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache, meta: FlashMeta) -> torch.Tensor:
        if meta.block_table is not None:
            k_pages, v_pages = cache.paged(layer)
            if meta.decode_only:
                out = flash_attn_with_kvcache(
                    q.unsqueeze(1), k_pages, v_pages, cache_seqlens=meta.seqlens_k,
                    block_table=meta.block_table, causal=True,
                )
                return out.squeeze(1)
            return flash_attn_varlen_func(
                q, k_pages, v_pages, meta.cu_seqlens_q, meta.cu_seqlens_k,
                meta.max_seqlen_q, meta.max_seqlen_k, causal=True, block_table=meta.block_table,
            )
        k_all, v_all = cache.gather(layer, meta.kv_slots)
        return flash_attn_varlen_func(
            q, k_all, v_all, meta.cu_seqlens_q, meta.cu_seqlens_k,
            meta.max_seqlen_q, meta.max_seqlen_k, causal=True,
        )


def _cumsum(lengths: list[int], dev: torch.device) -> torch.Tensor:
    out = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    out[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    return out.to(dev)
