"""The worst-case step a model actor runs once at start, to measure its peak memory (as vLLM).

`max_num_batched_tokens` prompt tokens split over `max_num_seqs` sequences (what the scheduler
may send in one iteration), each sampled, through the real forward pass and a vocabulary sort
as large as a top-p sampler's. Its KV goes to a small scratch cache whose bytes are reported so
that the sizing does not count them: all sequences share the same few blocks (the written
values do not matter, only the memory the step needs).
"""
from __future__ import annotations

import torch

from actors.model.attention import AttentionBackend
from actors.model.batch import build_batch
from actors.model.llama import LlamaModel
from kv.cache import KVCache, KVShape
from scheduler.plan import Plan, ScheduledChunk


def peak_step_plan(max_tokens: int, max_seqs: int, block_size: int, max_model_len: int) -> Plan:
    """A plan of `max_tokens` prefill tokens over as many sequences as allowed (each at most
    `max_model_len` long); every sequence's table is blocks 0, 1, 2, ..."""
    seqs = max(1, min(max_seqs, max_tokens), -(-max_tokens // max_model_len))
    base, extra = divmod(max_tokens, seqs)
    chunks = []
    for i in range(seqs):
        n = base + (i < extra)
        table = list(range(-(-n // block_size)))
        chunks.append(ScheduledChunk(f"profile-{i}", [0] * n, 0, n, table, list(range(n)), True))
    return Plan(worker=0, iteration=-1, chunks=chunks, block_size=block_size)


def run_peak_step(model: LlamaModel, backend: AttentionBackend, plan: Plan) -> int:
    """Run `plan` once on a scratch cache; returns the scratch cache's bytes."""
    c = model.config
    shape = KVShape(c.num_layers, c.num_kv_heads, c.head_dim)
    num_blocks = max(len(chunk.block_table) for chunk in plan.chunks)
    scratch = KVCache(shape, num_blocks, plan.block_size, model.device, model.dtype)
    batch = build_batch(plan, model.device)
    logits = model.forward(batch, scratch, backend, backend.prepare(batch, scratch))
    torch.sort(logits, dim=-1, descending=True)  # the sampler's largest temporary
    return num_blocks * shape.bytes_per_block(plan.block_size, model.dtype)
