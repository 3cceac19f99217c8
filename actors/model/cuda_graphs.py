"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed on persistent inputs.

A decode step of a 7B model launches ~2,000 kernels; at small batches launching them costs more
CPU time than the GPU needs to run them. As nano-vllm's model runner does, we capture the whole
forward pass once per bucket (`capture_sizes`: 1, 2, 4, 8, then every 16 up to the largest)
into static input buffers. A decode-only step of n rows then fills the buffers of the smallest
bucket >= n, pads the rest (slot -1: the KV store skips it; context 1 on block 0: attention
reads one harmless row) and replays. Prefill steps, larger batches and `enforce_eager` run the
same forward eagerly. Only the `triton` attention backend is captured: it decides its launch
from shapes alone, and the cache's Triton store skips padded slots.

Everything but `capture` and `replay` (bucket choice, padding, buffer filling) is plain tensor
code that the tests run on CPU.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

import torch

from actors.model.attention import AttentionBackend
from actors.model.batch import StepBatch
from actors.model.llama import LlamaModel
from actors.model.triton_attention import TritonMeta
from kv.cache import KVCache


def capture_sizes(max_batch: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then multiples of 16, up to the first that
    holds `max_batch` (nano-vllm's buckets)."""
    sizes = [1, 2, 4, 8] + list(range(16, max_batch + 16, 16))
    return sizes[: bisect.bisect_left(sizes, max_batch) + 1]


def bucket_for(num_rows: int, sizes: list[int]) -> int | None:
    """The smallest captured size holding `num_rows`, or None when none does."""
    i = bisect.bisect_left(sizes, num_rows)
    return sizes[i] if i < len(sizes) else None


@dataclass
class DecodeBuffers:
    """The graphs' static inputs, sized for the largest bucket; each bucket uses a prefix."""

    input_ids: torch.Tensor  # [max_batch] long
    positions: torch.Tensor  # [max_batch] long
    slot_mapping: torch.Tensor  # [max_batch] long; -1 on padding rows
    sample_rows: torch.Tensor  # [max_batch] long: arange (every row gets logits)
    cu_q: torch.Tensor  # [max_batch + 1] int32: arange (one query per sequence)
    seq_lens: torch.Tensor  # [max_batch] int32; 1 on padding rows
    block_table: torch.Tensor  # [max_batch, max_blocks] int32

    @classmethod
    def allocate(cls, max_batch: int, max_blocks: int, device: torch.device) -> DecodeBuffers:
        def longs() -> torch.Tensor:
            return torch.zeros(max_batch, dtype=torch.long, device=device)

        return cls(input_ids=longs(), positions=longs(),
                   slot_mapping=torch.full((max_batch,), -1, dtype=torch.long, device=device),
                   sample_rows=torch.arange(max_batch, device=device),
                   cu_q=torch.arange(max_batch + 1, dtype=torch.int32, device=device),
                   seq_lens=torch.ones(max_batch, dtype=torch.int32, device=device),
                   block_table=torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device))

    @property
    def max_batch(self) -> int:
        return self.input_ids.numel()

    def fill(self, batch: StepBatch, meta: TritonMeta, bucket: int) -> None:
        """Copy a decode-only step of n <= bucket rows in; rows n .. bucket become padding."""
        n = batch.num_tokens
        width = meta.block_table.shape[1]
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.block_table[:n, :width].copy_(meta.block_table)
        # Padding rows: no KV write, one key on block 0 (stale table columns are never read:
        # a row reads only the blocks its context length covers).
        self.input_ids[n:bucket].zero_()
        self.positions[n:bucket].zero_()
        self.slot_mapping[n:bucket].fill_(-1)
        self.seq_lens[n:bucket].fill_(1)
        self.block_table[n:bucket, 0].zero_()

    def step(self, bucket: int, block_size: int) -> tuple[StepBatch, TritonMeta]:
        """The bucket's batch and attention metadata, as views of these buffers."""
        batch = StepBatch(input_ids=self.input_ids[:bucket], positions=self.positions[:bucket],
                          slot_mapping=self.slot_mapping[:bucket], prefills=[], decodes=[],
                          sample_rows=self.sample_rows[:bucket], sample_chunks=[],
                          block_size=block_size)
        meta = TritonMeta(cu_q=self.cu_q[: bucket + 1], seq_lens=self.seq_lens[:bucket],
                          block_table=self.block_table[:bucket], decode_only=True)
        return batch, meta


class DecodeGraphRunner:
    """Runs decode-only steps through captured graphs; `run` falls back to eager otherwise."""

    def __init__(self, model: LlamaModel, cache: KVCache, backend: AttentionBackend,
                 max_batch: int, max_blocks: int) -> None:
        self.model, self.cache, self.backend = model, cache, backend
        self.sizes = capture_sizes(max_batch)
        self.buffers = DecodeBuffers.allocate(self.sizes[-1], max_blocks, cache.k.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    @staticmethod
    def supported(backend: AttentionBackend, cache: KVCache) -> bool:
        return (cache.k.device.type == "cuda" and getattr(backend, "supports_cuda_graphs", False)
                and cache.skips_negative_slots)

    def capture(self) -> None:
        """Capture every bucket, largest first, into one shared memory pool (CUDA only)."""
        pool = None
        for bucket in reversed(self.sizes):
            batch, meta = self.buffers.step(bucket, self.cache.block_size)
            # The eager run compiles the Triton kernels for this shape before capture.
            self.model.forward(batch, self.cache, self.backend, meta)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool):
                self.logits[bucket] = self.model.forward(batch, self.cache, self.backend, meta)
            pool = graph.pool() if pool is None else pool
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.cache.k.device)

    def bucket(self, batch: StepBatch) -> int | None:
        """The graph that runs this step, or None when it runs eagerly."""
        if batch.prefills or not self.graphs:
            return None
        return bucket_for(batch.num_tokens, self.sizes)

    def run(self, batch: StepBatch, meta: object) -> torch.Tensor:
        """fp32 logits of the step's sampled rows, like `LlamaModel.forward`."""
        bucket = self.bucket(batch)
        if bucket is None:
            return self.model.forward(batch, self.cache, self.backend, meta)
        assert isinstance(meta, TritonMeta)
        self.buffers.fill(batch, meta, bucket)
        self.graphs[bucket].replay()
        return self.logits[bucket].index_select(0, batch.sample_rows)
