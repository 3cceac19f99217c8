"""Attention backends behind one small interface, and the torch SDPA backend.

A backend gets the new tokens' q/k/v of one layer (KV already written to the paged cache) and
returns the attention output. `prepare` runs once per step and builds whatever index tensors
all layers share. Backends: `sdpa` (torch, any device) here; `flash_attn` in flash_attention.py;
`triton` (paged attention reading the blocks in place) in triton_attention.py. `make_backend`
picks one for `attention: auto` from the device, its compute capability, the dtype and the
block size (`auto_backend`).

SDPA on CPU without the C kernel (with it, every row goes through cpu_kernels.paged_decode,
see SdpaBackend.paged_prefill):
  - a prefill chunk starting at position 0 attends only to its own tokens: causal SDPA on the
    fresh k/v, no gather at all;
  - a chunk continuing an earlier prefill gathers its blocks and uses an explicit causal mask
    aligned to the chunk's end (torch's is_causal is top-left aligned);
  - decodes (sorted by context length) are cut into groups of similar length; each group is
    one SDPA call over KV gathered block-wise and padded to the group's longest context.
    GQA without copying KV: the g query heads sharing a KV head become g "query positions".
  - CPU with a bf16 cache (and fp32 activations): k/v arrive and are gathered in bf16 and are
    widened to the query's fp32 for SDPA; the C decode kernel reads bf16 pages directly.
"""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from actors.model import cpu_kernels
from actors.model.batch import SeqSpan, StepBatch
from kv.cache import KVCache


class AttentionBackend(Protocol):
    name: str

    def prepare(self, batch: StepBatch, cache: KVCache) -> Any:
        """Per-step metadata shared by all layers."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache, meta: Any) -> torch.Tensor:
        """q `[T, H, D]`, k/v `[T, Hkv, D]` (already in the cache) -> `[T, H, D]`."""


@dataclass
class PrefillMeta:
    rows: slice
    blocks: torch.Tensor | None  # None: starts at 0, attend to the fresh k/v only
    mask: torch.Tensor | None  # [T, L] bool, True = attend


@dataclass
class DecodeGroupMeta:
    rows: slice
    blocks: torch.Tensor  # [B * max_blocks] block ids, gathered in one index_select
    num_blocks: int  # max_blocks
    mask: torch.Tensor | None  # [B, 1, 1, L] bool; None when every context fills L exactly


@dataclass
class PagedDecodeMeta:
    """All decodes of the step in one call of the C kernel (cpu_kernels.paged_decode)."""
    rows: slice
    tables: torch.Tensor  # [B, max_blocks] int64 block ids (0-padded, never read past lens)
    lens: torch.Tensor  # [B] int64 context lengths


@dataclass
class SdpaMeta:
    prefills: list[PrefillMeta]
    decode_groups: list[DecodeGroupMeta]
    paged_decode: PagedDecodeMeta | None = None


class SdpaBackend:
    name = "sdpa"

    def __init__(self, max_group_padding: float = 0.15, paged_kernel: bool = True,
                 paged_prefill: bool = True) -> None:
        # A decode group may waste this fraction of its gathered KV on padding; more groups
        # cost a few extra small calls per layer, more padding costs memory traffic.
        self.max_group_padding = max_group_padding
        # CPU: decodes go through the C kernel reading the paged cache in place...
        self.paged_kernel = paged_kernel
        # ...and so does every prefill row, as the decode of its own token would: a token's
        # output is then the same bits whether it was prefilled (in any chunking) or decoded,
        # so a request recomputed after an eviction or a crash continues the very same text.
        self.paged_prefill = paged_prefill

    def prepare(self, batch: StepBatch, cache: KVCache) -> SdpaMeta:
        dev, bs = batch.input_ids.device, batch.block_size
        paged = self.paged_kernel and cache.k.device.type == "cpu" \
            and cache.k.dtype in (torch.float32, torch.bfloat16) and cpu_kernels.available()
        if paged and self.paged_prefill:
            return SdpaMeta([], [], self._paged_decode_meta(batch.prefills + batch.decodes))
        prefills = [self._prefill_meta(s, bs, dev) for s in batch.prefills]
        if batch.decodes and paged:
            return SdpaMeta(prefills, [], self._paged_decode_meta(batch.decodes))
        groups = [self._group_meta(g, bs, dev) for g in self._group_decodes(batch.decodes, bs)]
        return SdpaMeta(prefills, groups)

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cache: KVCache, meta: SdpaMeta) -> torch.Tensor:
        k_pages, v_pages = cache.paged(layer)
        pd = meta.paged_decode
        if pd is not None and not meta.prefills and pd.rows == slice(0, q.shape[0]):
            # Only decodes (the common step): the kernel's output is the whole answer.
            return cpu_kernels.paged_decode(q, k_pages, v_pages, pd.tables, pd.lens,
                                            q.shape[-1] ** -0.5)
        out = torch.empty_like(q)
        for p in meta.prefills:
            out[p.rows] = self._prefill(q[p.rows], k[p.rows], v[p.rows], k_pages, v_pages, p)
        for g in meta.decode_groups:
            out[g.rows] = self._decode(q[g.rows], k_pages, v_pages, g)
        if pd is not None:
            out[pd.rows] = cpu_kernels.paged_decode(q[pd.rows], k_pages, v_pages, pd.tables,
                                                    pd.lens, q.shape[-1] ** -0.5)
        return out

    # -- prefill ---------------------------------------------------------------------------
    @staticmethod
    def _prefill_meta(s: SeqSpan, bs: int, dev: torch.device) -> PrefillMeta:
        rows = slice(s.row_start, s.row_start + s.num_tokens)
        if s.start_pos == 0:
            return PrefillMeta(rows, None, None)
        n_blocks = -(-s.context_len // bs)
        blocks = torch.tensor(s.block_table[:n_blocks], dtype=torch.long, device=dev)
        q_pos = torch.arange(s.start_pos, s.context_len, device=dev)
        k_pos = torch.arange(n_blocks * bs, device=dev)
        return PrefillMeta(rows, blocks, k_pos[None, :] <= q_pos[:, None])

    @staticmethod
    def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_pages: torch.Tensor,
                 v_pages: torch.Tensor, p: PrefillMeta) -> torch.Tensor:
        if p.blocks is not None:  # continue an earlier prefill: read all its KV from the cache
            k = k_pages.index_select(0, p.blocks).flatten(0, 1)
            v = v_pages.index_select(0, p.blocks).flatten(0, 1)
        k, v = k.to(q.dtype), v.to(q.dtype)  # CPU bf16 KV -> the fp32 activations (else no-op)
        # 4-D [1, heads, T, D]: torch's CPU flash kernel (GQA included) only takes 4-D inputs;
        # 3-D ones fall back to the unfused math path, 10x slower at a few hundred tokens.
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
            attn_mask=p.mask, is_causal=p.mask is None, enable_gqa=True,
        )
        return o[0].transpose(0, 1)

    # -- decode ----------------------------------------------------------------------------
    @staticmethod
    def _paged_decode_meta(spans: list[SeqSpan]) -> PagedDecodeMeta:
        """One kernel row per token of `spans` (consecutive rows): its sequence's block table
        and the context its own position sees."""
        rows = slice(spans[0].row_start, spans[-1].row_start + spans[-1].num_tokens)
        width = max(len(s.block_table) for s in spans)
        tables = torch.tensor([s.block_table + [0] * (width - len(s.block_table))
                               for s in spans], dtype=torch.long)
        if all(s.num_tokens == 1 for s in spans):  # decodes only
            return PagedDecodeMeta(rows, tables, torch.tensor([s.context_len for s in spans]))
        counts = torch.tensor([s.num_tokens for s in spans])
        lens = torch.cat([torch.arange(s.start_pos + 1, s.context_len + 1) for s in spans])
        return PagedDecodeMeta(rows, tables.repeat_interleave(counts, 0), lens)

    def _group_decodes(self, decodes: list[SeqSpan], bs: int) -> list[list[SeqSpan]]:
        """Cut decodes (ascending context) into runs whose padded KV wastes little."""
        groups: list[list[SeqSpan]] = []
        real = 0
        for s in decodes:
            blocks = -(-s.context_len // bs)
            if groups:
                padded = (len(groups[-1]) + 1) * blocks * bs  # s is the longest so far
                if padded <= (real + s.context_len) * (1 + self.max_group_padding) + 2 * bs:
                    groups[-1].append(s)
                    real += s.context_len
                    continue
            groups.append([s])
            real = s.context_len
        return groups

    @staticmethod
    def _group_meta(group: list[SeqSpan], bs: int, dev: torch.device) -> DecodeGroupMeta:
        rows = slice(group[0].row_start, group[-1].row_start + 1)
        width = -(-group[-1].context_len // bs)
        table = torch.zeros(len(group), width, dtype=torch.long)
        lens = torch.tensor([s.context_len for s in group])
        for r, s in enumerate(group):
            row = s.block_table[:width]
            table[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask = None
        if bool((lens != width * bs).any()):
            mask = (torch.arange(width * bs)[None, :] < lens[:, None])[:, None, None, :]
            mask = mask.to(dev)
        return DecodeGroupMeta(rows, table.flatten().to(dev), width, mask)

    @staticmethod
    def _decode(q: torch.Tensor, k_pages: torch.Tensor, v_pages: torch.Tensor,
                g: DecodeGroupMeta) -> torch.Tensor:
        b, h, d = q.shape
        _, bs, hkv, _ = k_pages.shape
        length = g.num_blocks * bs
        k = k_pages.index_select(0, g.blocks).view(b, length, hkv, d).transpose(1, 2).to(q.dtype)
        v = v_pages.index_select(0, g.blocks).view(b, length, hkv, d).transpose(1, 2).to(q.dtype)
        # [B, Hkv, g, D]: query heads of one KV head act as g query rows of that head.
        o = F.scaled_dot_product_attention(q.view(b, hkv, h // hkv, d), k, v, attn_mask=g.mask)
        return o.reshape(b, h, d)


def flash_attn_available(device: torch.device) -> bool:
    if device.type != "cuda":
        return False
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def triton_available(device: torch.device) -> bool:
    """Triton kernels run on CUDA, and on CPU tensors only under its interpreter (tests)."""
    if importlib.util.find_spec("triton") is None:
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


FLASH_PAGED_BLOCK_MULTIPLE = 256  # flash-attn reads a paged cache in place only at these sizes


def auto_backend(device_type: str, capability: tuple[int, int], dtype: torch.dtype,
                 block_size: int, have_flash: bool, have_triton: bool) -> str:
    """What `attention: auto` runs. flash-attn 2 needs Ampere+ (8.0) and fp16/bf16, and reads
    pages in place only at 256-multiple block sizes; Triton reads any block size in place
    (we ask 8.0 too: Triton's supported GPUs, and bf16 tensor cores); SDPA runs anywhere."""
    if device_type != "cuda":
        return "sdpa"
    ampere = capability >= (8, 0)
    flash_ok = have_flash and ampere and dtype in (torch.float16, torch.bfloat16)
    if flash_ok and block_size % FLASH_PAGED_BLOCK_MULTIPLE == 0:
        return "flash_attn"
    if have_triton and ampere:
        return "triton"
    return "flash_attn" if flash_ok else "sdpa"


def make_backend(name: str, device: torch.device, block_size: int,
                 dtype: torch.dtype = torch.float32) -> AttentionBackend:
    """`auto`: see auto_backend (the GPU's compute capability and the dtype decide).
    Explicit names are honoured where they can run, else a ValueError says why not."""
    if name == "auto":
        capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)
        name = auto_backend(device.type, capability, dtype, block_size,
                            flash_attn_available(device), triton_available(device))
    if name == "sdpa":
        return SdpaBackend()
    if name == "flash_attn":
        if not flash_attn_available(device):
            raise ValueError("attention='flash_attn' needs CUDA and the flash-attn package")
        from actors.model.flash_attention import FlashAttnBackend

        return FlashAttnBackend(block_size)
    if name == "triton":
        if not triton_available(device):
            raise ValueError("attention='triton' needs the triton package and CUDA (on CPU only "
                             "under TRITON_INTERPRET=1, Triton's interpreter, for tests)")
        from actors.model.triton_attention import TritonAttnBackend

        return TritonAttnBackend(device)
    raise ValueError(f"unknown attention backend {name!r} (auto, sdpa, flash_attn, triton)")
