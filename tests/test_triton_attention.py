"""The Triton paged-attention and KV-store kernels against SDPA, on CPU through Triton's
interpreter (on CUDA where one is present), and the `triton` backend inside the model."""
from __future__ import annotations

import os
import random

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():  # must precede the first import of a Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the triton package is a test dependency")

from actors.model.attention import SdpaBackend, auto_backend, make_backend
from actors.model.batch import build_batch
from actors.model.llama import LlamaModel
from actors.model.loader import load_model
from actors.model.triton_attention import TritonAttnBackend
from actors.model.triton_kernels import decode_segments, launch_shape, paged_attention
from kv.cache import KVCache, KVShape
from kv.triton_store import store_kv
from scheduler.plan import Plan, ScheduledChunk

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32_TOL = 2e-5


def paged_case(seqs: list[tuple[int, int]], heads: int, kv_heads: int, head_dim: int = 16,
               block_size: int = 16, seed: int = 0):
    """Random paged K/V, shuffled disjoint block tables and queries for (q_len, seq_len) pairs."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum(-(-sl // block_size) for _, sl in seqs) + 3
    k_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_pages = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    ids = list(range(num_blocks))
    random.Random(seed).shuffle(ids)
    tables = []
    for _, sl in seqs:
        n = -(-sl // block_size)
        tables.append(ids[:n])
        ids = ids[n:]
    width = max(len(t) for t in tables)
    table = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        table[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    cu_q = torch.tensor([0] + [ql for ql, _ in seqs], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, head_dim, generator=gen)
    seq_lens = torch.tensor([sl for _, sl in seqs], dtype=torch.int32)
    return q, k_pages, v_pages, cu_q, seq_lens, table


def sdpa_reference(q, k_pages, v_pages, cu_q, seq_lens, table) -> torch.Tensor:
    """Each sequence through SDPA over its gathered KV, causal to the chunk's end."""
    out = torch.empty_like(q)
    kv_heads, head_dim = k_pages.shape[2:]
    for s in range(seq_lens.numel()):
        lo, hi, sl = int(cu_q[s]), int(cu_q[s + 1]), int(seq_lens[s])
        blocks = table[s, : -(-sl // k_pages.shape[1])].long()
        k = k_pages[blocks].reshape(-1, kv_heads, head_dim)[:sl]
        v = v_pages[blocks].reshape(-1, kv_heads, head_dim)[:sl]
        q_pos = torch.arange(sl - (hi - lo), sl)
        mask = torch.arange(sl)[None, :] <= q_pos[:, None]
        o = F.scaled_dot_product_attention(q[lo:hi].transpose(0, 1)[None], k.transpose(0, 1)[None],
                                           v.transpose(0, 1)[None], attn_mask=mask,
                                           enable_gqa=True)
        out[lo:hi] = o[0].transpose(0, 1)
    return out


CASES = {
    "pure-decode": [(1, 1), (1, 15), (1, 16), (1, 17), (1, 70)],
    "pure-prefill": [(5, 5), (16, 16), (33, 33), (1, 1)],
    "chunked-prefill": [(7, 40), (16, 48), (30, 31)],  # continuing a cached prefix
    "mixed": [(20, 20), (9, 41), (1, 64), (1, 3), (2, 18)],
}
GQA = [(4, 4), (4, 2), (6, 2), (8, 1)]  # (query heads, KV heads): MHA, GQA 2, GQA 3, MQA


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("heads, kv_heads", GQA, ids=lambda x: str(x))
def test_kernel_matches_sdpa(case: str, heads: int, kv_heads: int) -> None:
    args = paged_case(CASES[case], heads, kv_heads, seed=len(case))
    ref = sdpa_reference(*args)
    args = [a.to(DEV) for a in args]
    out = paged_attention(*args, scale=16**-0.5)
    assert (out.cpu() - ref).abs().max() < FP32_TOL


@pytest.mark.parametrize("segments, tile", [(1, 16), (4, 16), (16, 16), (2, 32)])
def test_split_kv_and_tiles_match_sdpa(segments: int, tile: int) -> None:
    """Decodes split over their keys (more segments than tiles too), partial last blocks."""
    args = paged_case([(1, 5), (1, 100), (1, 33), (1, 250)], 4, 2, head_dim=32, seed=3)
    ref = sdpa_reference(*args)
    out = paged_attention(*[a.to(DEV) for a in args], scale=32**-0.5, num_segments=segments,
                          tile=tile)
    assert (out.cpu() - ref).abs().max() < FP32_TOL


@pytest.mark.parametrize("segments", [1, 4])
def test_half_precision_within_fp16_rounding(segments: int) -> None:
    """fp16 inputs, fp32 accumulation, fp16 output. (bf16 is checked on GPUs only, by
    bench/gpu_check.py: Triton's interpreter (3.7.1, 3.9.0) multiplies bf16 tiles wrongly.)"""
    args = paged_case(CASES["mixed"], 4, 2, seed=9)
    ref = sdpa_reference(*args)
    q, k_pages, v_pages, *index = [a.to(DEV) for a in args]
    out = paged_attention(q.half(), k_pages.half(), v_pages.half(), *index, scale=0.25,
                          num_segments=segments, tile=16)
    assert out.dtype == torch.float16 and (out.float().cpu() - ref).abs().max() < 5e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")
@pytest.mark.parametrize("segments", [1, 8])
def test_bf16_on_gpu_within_bf16_rounding(segments: int) -> None:
    args = paged_case(CASES["mixed"], 32, 8, head_dim=128, seed=4)
    ref = sdpa_reference(*args)
    q, k_pages, v_pages, *index = [a.cuda() for a in args]
    out = paged_attention(q.bfloat16(), k_pages.bfloat16(), v_pages.bfloat16(), *index,
                          scale=128**-0.5, num_segments=segments, tile=16)
    assert (out.float().cpu() - ref).abs().max() < 3e-2


def test_other_block_sizes_and_head_dims() -> None:
    for block_size, head_dim in [(32, 64), (256, 16), (8, 24)]:  # 24: a padded head dim
        args = paged_case([(3, 300), (1, 9), (12, 12)], 4, 2, head_dim, block_size, seed=5)
        ref = sdpa_reference(*args)
        out = paged_attention(*[a.to(DEV) for a in args], scale=head_dim**-0.5)
        assert (out.cpu() - ref).abs().max() < FP32_TOL, (block_size, head_dim)


def test_launch_shape_and_split_choice() -> None:
    assert launch_shape(32, 32) == (16, 16)  # Llama-2-7B: 16 queries of one head per program
    assert launch_shape(32, 8) == (16, 4)  # GQA 4
    assert launch_shape(9, 3) == (16, 5)  # GQA 3: 15 of 16 rows used
    assert launch_shape(64, 2) == (32, 1)
    assert decode_segments(programs=64, multiprocessors=132) == 16  # batch 1 on an H100
    assert decode_segments(programs=2176, multiprocessors=132) == 1  # batch 64: enough programs
    assert decode_segments(programs=200, multiprocessors=132) == 4


def test_store_kv_writes_rows_and_skips_padding() -> None:
    heads, kv_heads, dim = 4, 2, 16
    qkv = torch.randn(6, (heads + 2 * kv_heads) * dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(6, kv_heads, dim)  # strided rows
    v = qkv[:, (heads + kv_heads) * dim :].view(6, kv_heads, dim)
    k_cache, v_cache = torch.zeros(64, kv_heads, dim), torch.zeros(64, kv_heads, dim)
    slots = torch.tensor([3, -1, 40, 7, -1, 63])
    store_kv(k.to(DEV), v.to(DEV), k_cache := k_cache.to(DEV), v_cache := v_cache.to(DEV),
             slots.to(DEV))
    written = k_cache.abs().sum(dim=(1, 2)).nonzero().flatten().tolist()
    assert written == [3, 7, 40, 63]
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            assert torch.equal(k_cache[slot].cpu(), k[row]) and torch.equal(v_cache[slot].cpu(), v[row])


def test_kv_cache_write_through_the_triton_store() -> None:
    cache = KVCache(KVShape(2, 2, 16), 8, 4, DEV, torch.float32, triton_store=True)
    assert cache.skips_negative_slots
    k, v = torch.randn(3, 2, 16, device=DEV), torch.randn(3, 2, 16, device=DEV)
    cache.write(1, k, v, torch.tensor([5, -1, 30], device=DEV))
    got_k, got_v = cache.gather(1, torch.tensor([5, 30], device=DEV))
    assert torch.equal(got_k, k[[0, 2]]) and torch.equal(got_v, v[[0, 2]])
    assert cache.k[0].abs().sum() == 0 and cache.k[1].abs().sum() == k[[0, 2]].abs().sum()


@pytest.mark.parametrize("dtype, block_size, flash, triton_ok, expected", [
    (torch.bfloat16, 16, True, True, "triton"),  # 16-token blocks: Triton reads them in place
    (torch.bfloat16, 256, True, True, "flash_attn"),  # flash-attn's native page size
    (torch.bfloat16, 16, True, False, "flash_attn"),  # no Triton: flash-attn gathering
    (torch.float32, 256, True, True, "triton"),  # flash-attn has no fp32
    (torch.float32, 16, True, False, "sdpa"),
])
def test_auto_backend_on_an_ampere_gpu(dtype, block_size, flash, triton_ok, expected) -> None:
    assert auto_backend("cuda", (8, 0), dtype, block_size, flash, triton_ok) == expected


def test_auto_backend_on_older_gpus_and_cpu() -> None:
    assert auto_backend("cuda", (7, 5), torch.float16, 16, True, True) == "sdpa"  # T4
    assert auto_backend("cuda", (9, 0), torch.bfloat16, 16, False, True) == "triton"  # H100
    assert auto_backend("cpu", (0, 0), torch.float32, 16, True, True) == "sdpa"
    assert make_backend("auto", torch.device("cpu"), 16).name == "sdpa"
    with pytest.raises(ValueError, match="unknown attention backend"):
        make_backend("paged", torch.device("cpu"), 16)


# -- the backend inside the model --------------------------------------------------------------
BS = 16


def chunk(rid: str, tokens: list[int], start: int, table: list[int], sample: bool = True) -> ScheduledChunk:
    slots = [table[p // BS] * BS + p % BS for p in range(start, start + len(tokens))]
    return ScheduledChunk(rid, list(tokens), start, len(tokens), table, slots, sample,
                          is_prefill=len(tokens) > 1)


class Twin:
    """The tiny model with the SDPA backend and with the Triton backend, one cache each."""

    def __init__(self) -> None:
        loaded, _ = load_model("random:tiny", DEV, "float32")
        self.model = LlamaModel(loaded)
        c = self.model.config
        shape = KVShape(c.num_layers, c.num_kv_heads, c.head_dim)
        self.vocab = c.vocab_size
        self.sdpa = (SdpaBackend(), KVCache(shape, 64, BS, DEV, torch.float32))
        # 64 "multiprocessors": decode-only steps of this tiny batch split their keys.
        self.triton = (TritonAttnBackend(DEV, multiprocessors=64),
                       KVCache(shape, 64, BS, DEV, torch.float32, triton_store=True))

    def run(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for backend, cache in (self.sdpa, self.triton):
            batch = build_batch(Plan(0, 0, chunks, BS), DEV)
            out.append(self.model.forward(batch, cache, backend, backend.prepare(batch, cache)))
        return out[0], out[1]


def test_triton_backend_matches_sdpa_through_prefill_chunks_and_decodes() -> None:
    twin = Twin()
    gen = torch.Generator().manual_seed(0)
    lengths = [40, 7, 21]
    seqs = [torch.randint(0, twin.vocab, (n,), generator=gen).tolist() for n in lengths]
    tables = [[5, 9, 2, 30], [11, 3], [40, 41, 17]]
    # Step 1: a first chunk of seq 0, whole prompts of 1 and 2 (a mixed prefill batch).
    a, b = twin.run([chunk("0", seqs[0][:24], 0, tables[0]), chunk("1", seqs[1], 0, tables[1]),
                     chunk("2", seqs[2], 0, tables[2])])
    assert (a - b).abs().max() / a.abs().max() < 1e-4
    # Step 2: seq 0 continues its cached prefix while 1 and 2 decode (mixed).
    a, b = twin.run([chunk("1", [7], 7, tables[1]), chunk("0", seqs[0][24:], 24, tables[0]),
                     chunk("2", [9], 21, tables[2])])
    assert (a - b).abs().max() / a.abs().max() < 1e-4
    # Steps 3-5: pure decodes, split over the keys, crossing block boundaries.
    for step in range(3):
        a, b = twin.run([chunk("0", [3], 40 + step, tables[0]), chunk("1", [4], 8 + step, tables[1]),
                         chunk("2", [5], 22 + step, tables[2])])
        assert (a - b).abs().max() / a.abs().max() < 1e-4
